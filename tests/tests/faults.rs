//! Fault tests: kill -9 of the coordinator process (its held sagas are taken over), two
//! replicas at once, nats-server restarts, participants that are down, a participant process
//! killed mid-handler, a take-over or a compensation after a success the coordinator never
//! saw; all against real nats-server processes.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use saga_core::wire::{EffectRecord, ReplyOutcome};
use saga_core::{Phase, SagaDefinition, SagaId, SagaStatus, TimelineEvent, Timestamp};
use saga_nats::{Coordinator, Participant, SagaClient, StepError};
use saga_tests::support::*;
use saga_tests::NatsServer;

const WAIT: Duration = Duration::from_secs(120);

/// The coordinator command line, as a process of its own.
const COORDINATOR: &str = env!("CARGO_BIN_EXE_saga-coordinator");

/// Checks what every saga's effects must be: completed sagas ran each action once and no
/// compensation; compensated ones ran a and b once, compensated each once, never ran c.
fn check_effects(
    fx: &Effects,
    ids: &[SagaId],
    statuses: &[SagaStatus],
    failing: impl Fn(usize) -> bool,
) {
    for (i, (id, status)) in ids.iter().zip(statuses).enumerate() {
        if failing(i) {
            assert_eq!(*status, SagaStatus::Compensated, "saga {i} ({id})");
            for step in ["a", "b"] {
                assert_eq!(fx.count(id, step, "a"), 1, "saga {i} step {step} action");
                assert_eq!(fx.count(id, step, "c"), 1, "saga {i} step {step} compensation");
            }
            assert_eq!(fx.count(id, "c", "a"), 0, "saga {i}: c failed");
        } else {
            assert_eq!(*status, SagaStatus::Completed, "saga {i} ({id})");
            for step in ["a", "b", "c"] {
                assert_eq!(fx.count(id, step, "a"), 1, "saga {i} step {step} action");
                assert_eq!(fx.count(id, step, "c"), 0, "saga {i} step {step} compensation");
            }
        }
    }
    assert!(fx.duplicates().is_empty(), "effects ran twice: {:?}", fx.duplicates());
}

fn input(i: usize, failing: bool) -> TestInput {
    TestInput {
        n: i as u64,
        fail: if failing { vec!["c".into()] } else { vec![] },
        delay_ms: 50,
        ..Default::default()
    }
}

/// Counts the log records whose subject matches `filter` as they are written (a core
/// subscription sees every message the log stream stores).
async fn count_records(nats: &async_nats::Client, filter: &str) -> Arc<Mutex<usize>> {
    let count = Arc::new(Mutex::new(0));
    let mut sub = nats.subscribe(filter.to_owned()).await.unwrap();
    nats.flush().await.unwrap();
    let c = count.clone();
    tokio::spawn(async move {
        while sub.next().await.is_some() {
            *c.lock().unwrap() += 1;
        }
    });
    count
}

/// Waits (up to a minute) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..6000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not reached within a minute: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_coordinator_with_sagas_in_flight_loses_nothing() {
    init_logging();
    const SAGAS: usize = 240;
    let server = NatsServer::start();
    let nats = server.connect().await;
    let def = chain("k9", &["a", "b", "c"], Duration::from_secs(30));
    let dir = definitions_dir(&[def]);
    let mut coord = CoordinatorProcess::start(COORDINATOR, &server.url(), &dir);
    let client = client_when_ready(nats.clone(), "k9").await;
    let fx = Effects::default();
    let _p = echo_participant(nats.clone(), "svc", &["a", "b", "c"], fx.clone()).await;
    let finished = count_records(&nats, "saga.log.*.k9.completed").await;

    let failing = |i: usize| i % 5 == 0;
    let starts = (0..SAGAS).map(|i| {
        let client = client.clone();
        async move { client.start("k9", &input(i, failing(i))).await.unwrap() }
    });
    let ids: Vec<SagaId> = futures::future::join_all(starts).await;
    // Kill the coordinator once some sagas have completed: it holds the others' starts.
    until("10 sagas completed", || *finished.lock().unwrap() >= 10).await;
    let done_at_kill = *finished.lock().unwrap();
    coord.kill9();
    eprintln!("killed the coordinator with {done_at_kill} of {SAGAS} sagas completed");
    assert!(done_at_kill < SAGAS, "the kill came while sagas were in flight");
    // The held starts are redelivered after the ack wait (2 s) to the new process, which
    // takes the sagas over from their logs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _coord2 = CoordinatorProcess::start(COORDINATOR, &server.url(), &dir);

    let statuses = wait_all(&client, &ids, WAIT).await;
    check_effects(&fx, &ids, &statuses, failing);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_work_and_never_dispatch_a_step_twice() {
    init_logging();
    const SAGAS: usize = 200;
    let server = NatsServer::start();
    let def = chain("two", &["a", "b", "c"], Duration::from_secs(30));
    let replica = |name: &str| {
        let mut config = coordinator_config(vec![def.clone()], Duration::from_secs(5));
        config.replica = Some(name.to_owned());
        config
    };
    let _c1 = Coordinator::start(server.connect().await, replica("r1")).await.unwrap();
    let _c2 = Coordinator::start(server.connect().await, replica("r2")).await.unwrap();
    let nats = server.connect().await;
    let fx = Effects::default();
    let _p = echo_participant(server.connect().await, "svc", &["a", "b", "c"], fx.clone()).await;
    let client = client(nats.clone()).await;

    // Every command sent, by `<service>.<saga>.<step>.<a|c>.<attempt>` from its reply subject
    // (`saga.reply.<replica>.…`), with the replicas that sent it.
    let sent: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let mut sub = nats.subscribe("saga.cmd.>").await.unwrap();
    let s = sent.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let reply = msg.reply.map(|r| r.to_string()).unwrap_or_default();
            let mut parts = reply.splitn(4, '.');
            let (_, _, replica, command) = (parts.next(), parts.next(), parts.next(), parts.next());
            s.lock()
                .unwrap()
                .entry(command.unwrap_or(&reply).to_owned())
                .or_default()
                .push(replica.unwrap_or_default().to_owned());
        }
    });
    nats.flush().await.unwrap();

    let failing = |i: usize| i % 4 == 0;
    let mut ids = Vec::new();
    for i in 0..SAGAS {
        ids.push(client.start("two", &input(i, failing(i))).await.unwrap());
    }
    let statuses = wait_all(&client, &ids, WAIT).await;
    check_effects(&fx, &ids, &statuses, failing);
    let sent = sent.lock().unwrap();
    let twice: Vec<_> = sent.iter().filter(|(_, by)| by.len() > 1).collect();
    assert!(twice.is_empty(), "commands sent more than once: {twice:?}");
    let expected: usize = (0..SAGAS).map(|i| if failing(i) { 5 } else { 3 }).sum();
    assert_eq!(sent.len(), expected, "one command per action and compensation");
    let mut by_replica: HashMap<&str, usize> = HashMap::new();
    for replica in sent.values().flatten() {
        *by_replica.entry(replica.as_str()).or_default() += 1;
    }
    eprintln!("commands by replica: {by_replica:?}");
    assert_eq!(by_replica.len(), 2, "both replicas drove sagas: {by_replica:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restart_mid_run_loses_nothing() {
    init_logging();
    const SAGAS: usize = 100;
    let mut server = NatsServer::start();
    let def = chain("rs", &["a", "b", "c"], Duration::from_secs(20));
    let nats = server.connect().await;
    let _coord = Coordinator::start(
        server.connect().await,
        coordinator_config(vec![def], Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let fx = Effects::default();
    // A participant claims each effect until its command's deadline (20 s), well beyond the
    // outage (about 2 s), and keeps trying to record what ran until the server is back: every
    // effect runs once.
    let _p = echo_participant(server.connect().await, "svc", &["a", "b", "c"], fx.clone()).await;
    let client = client(nats.clone()).await;
    let records = count_records(&nats, "saga.log.*.rs.*").await;

    let failing = |i: usize| i % 5 == 1;
    let mut ids = Vec::new();
    for i in 0..SAGAS {
        ids.push(client.start("rs", &input(i, failing(i))).await.unwrap());
    }
    until("50 transitions logged", || *records.lock().unwrap() >= 50).await;
    server.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart();

    let statuses = wait_all(&client, &ids, WAIT).await;
    check_effects(&fx, &ids, &statuses, failing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_down_while_sagas_start_then_up_burns_no_attempts() {
    init_logging();
    const SAGAS: usize = 100;
    let server = NatsServer::start();
    let nats = server.connect().await;
    let def = chain("down", &["a", "b", "c"], Duration::from_secs(30));
    let _coord = coordinator(nats.clone(), vec![def]).await;
    let fx = Effects::default();
    // The participant makes its effect bucket, then goes away.
    let p = echo_participant(server.connect().await, "svc", &["a", "b", "c"], fx.clone()).await;
    p.shutdown().await;
    let client = client(nats.clone()).await;

    let failing = |i: usize| i % 10 == 3;
    let mut ids = Vec::new();
    for i in 0..SAGAS {
        ids.push(client.start("down", &input(i, failing(i))).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for id in &ids {
        let status = client.get(id).await.unwrap().map(|v| v.status());
        assert_eq!(
            status,
            Some(SagaStatus::Running),
            "nothing can finish while the participant is down"
        );
    }
    let _p = echo_participant(server.connect().await, "svc", &["a", "b", "c"], fx.clone()).await;
    let statuses = wait_all(&client, &ids, WAIT).await;
    check_effects(&fx, &ids, &statuses, failing);

    // Finding no responder is not an attempt: every step ran on its first one.
    let mut undelivered = 0;
    for id in &ids {
        let view = client.get(id).await.unwrap().expect("the saga is there");
        for step in &view.snapshot.steps {
            assert_eq!(step.attempt, 1, "saga {id} step {}: {:?}", step.name, step.last_error);
        }
        let timeline = client.timeline(id).await.unwrap();
        undelivered += timeline
            .iter()
            .filter(|e| {
                matches!(&e.event, TimelineEvent::NotDelivered { step, phase: Phase::Action, attempt: 1, .. } if step.as_str() == "a")
            })
            .count();
    }
    assert!(undelivered >= SAGAS, "each first command found no responder: {undelivered}");
}

/// A participant process (`tests/src/bin/echo-participant.rs`) that records its runs
/// durably, killed on drop. A thread reads its stdout: handlers started and ended.
struct ParticipantProcess {
    child: Child,
    started: Arc<AtomicUsize>,
    ended: Arc<AtomicUsize>,
}

impl ParticipantProcess {
    async fn start(url: &str, instance: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_echo-participant"))
            .args([url, instance])
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("participant process starts");
        let stdout = child.stdout.take().expect("piped");
        let (started, ended) = (Arc::<AtomicUsize>::default(), Arc::<AtomicUsize>::default());
        let ready = Arc::new(AtomicUsize::new(0));
        let (s, e, r) = (started.clone(), ended.clone(), ready.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let counter = match line.split(' ').next() {
                    Some("start") => &s,
                    Some("end") => &e,
                    Some("ready") => &r,
                    _ => continue,
                };
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        until("the participant process is ready", || ready.load(Ordering::SeqCst) > 0).await;
        ParticipantProcess { child, started, ended }
    }

    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

impl Drop for ParticipantProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_participant_mid_handler_under_load_parks_no_saga() {
    init_logging();
    const SAGAS: usize = 60;
    let server = NatsServer::start();
    let nats = server.connect().await;
    let step = |s: saga_core::StepBuilder, undo: &str| {
        s.compensation(undo).timeout(Duration::from_secs(5)).retry(quick_retry(5))
    };
    let def = SagaDefinition::builder("pk9")
        .step("a", "svc", "a", |s| step(s, "undo-a"))
        .step("b", "svc", "b", |s| step(s, "undo-b"))
        .step("c", "svc", "c", |s| step(s, "undo-c"))
        .build();
    let _coord = coordinator(nats.clone(), vec![def]).await;
    let client = client(nats.clone()).await;
    runs_bucket(nats.clone()).await;
    let mut first = ParticipantProcess::start(&server.url(), "p1").await;

    let mut ids = Vec::new();
    for i in 0..SAGAS {
        let input = TestInput { n: i as u64, delay_ms: 300, ..Default::default() };
        ids.push(client.start("pk9", &input).await.unwrap());
    }
    // Kill it once a good part of the work is done and many handlers are running.
    until("handlers ended and running", || {
        // Ended first: a handler ends after it starts, so this never undercounts.
        let ended = first.ended.load(Ordering::SeqCst);
        let started = first.started.load(Ordering::SeqCst);
        ended >= SAGAS && started.saturating_sub(ended) >= 10
    })
    .await;
    first.kill9();
    // Counted after the kill: the handlers that started and never ended were cut by it.
    let cut =
        first.started.load(Ordering::SeqCst).saturating_sub(first.ended.load(Ordering::SeqCst));
    let at_kill = effect_records(nats.clone(), "svc").await;
    let done_by_first: HashSet<&String> = at_kill
        .iter()
        .filter(|(_, r)| matches!(r, EffectRecord::Done { .. }))
        .map(|(k, _)| k)
        .collect();
    eprintln!(
        "killed the participant with {} effects done and {cut} handlers under way",
        done_by_first.len()
    );
    assert!(cut > 0, "the kill came in the middle of handlers");

    let _second = ParticipantProcess::start(&server.url(), "p2").await;
    let statuses = wait_all(&client, &ids, WAIT).await;
    for (id, status) in ids.iter().zip(&statuses) {
        assert_eq!(*status, SagaStatus::Completed, "saga {id}");
    }

    let runs = recorded_runs(nats.clone()).await;
    let records = effect_records(nats.clone(), "svc").await;
    let mut rerun = 0;
    for id in &ids {
        for step in ["a", "b", "c"] {
            let effect = format!("{id}.{step}.a");
            let by = runs.get(&effect).cloned().unwrap_or_default();
            assert!(!by.is_empty(), "{effect} ran");
            assert!(
                matches!(
                    records.get(&effect),
                    Some(EffectRecord::Done { outcome: ReplyOutcome::Success { .. }, .. })
                ),
                "{effect} is recorded done: {:?}",
                records.get(&effect)
            );
            if done_by_first.contains(&effect) {
                assert_eq!(by, ["p1"], "{effect} was recorded done before the kill: never again");
            } else {
                let again = by.iter().filter(|i| *i == "p2").count();
                assert!(again <= 1, "{effect} ran {again} times on the second instance");
                if by.len() > 1 {
                    rerun += 1;
                }
            }
            assert!(!runs.contains_key(&format!("{id}.{step}.c")), "{id}.{step} compensated");
        }
    }
    // An effect whose run ended just before the kill, but whose record did not make it, runs
    // again: that is the at-least-once window the claim cannot close.
    eprintln!("{rerun} effects ran on both instances");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_takes_a_success_the_first_replica_never_saw_from_its_record() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    // `b` has one attempt: were it to time out, the saga would compensate.
    let timeout = Duration::from_secs(5);
    let def = SagaDefinition::builder("unseen")
        .step("a", "svc", "a", |s| s.compensation("undo-a").retry(quick_retry(3)))
        .step("b", "svc", "b", |s| s.compensation("undo-b").timeout(timeout).retry(quick_retry(1)))
        .build();
    let first_nats = server.connect().await;
    let first = Coordinator::start(
        first_nats.clone(),
        coordinator_config(vec![def.clone()], Duration::from_secs(5)),
    )
    .await
    .unwrap();
    let client = client(nats.clone()).await;

    // `b`'s action tells the test it runs, then waits for the test to let it succeed.
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<()>();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let runs = Arc::new(AtomicUsize::new(0));
    let compensations = Arc::new(AtomicUsize::new(0));
    let (g, r, c) = (gate.clone(), runs.clone(), compensations.clone());
    let _p = Participant::builder(server.connect().await, "svc")
        .action("a", |cmd: saga_nats::Command<TestInput>| async move {
            Ok(EchoOutput { step: "a".into(), n: cmd.input.n })
        })
        .compensation("undo-a", |_: saga_nats::Command<TestInput>| async { Ok(()) })
        .action("b", move |cmd: saga_nats::Command<TestInput>| {
            let (entered_tx, g, r) = (entered_tx.clone(), g.clone(), r.clone());
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                let _ = entered_tx.send(());
                g.acquire().await.expect("open").forget();
                Ok(EchoOutput { step: "b-output".into(), n: cmd.input.n })
            }
        })
        .compensation("undo-b", move |_: saga_nats::Command<TestInput>| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();

    let id = client.start("unseen", &TestInput { n: 7, ..Default::default() }).await.unwrap();
    tokio::time::timeout(WAIT, entered.recv()).await.expect("b runs").unwrap();
    // The coordinator goes away (its reply subject with it) while `b` runs, and a second one
    // takes the saga over at once; then `b` succeeds and its outcome is recorded, but its
    // reply reaches nobody.
    first.shutdown().await;
    first_nats.flush().await.unwrap();
    let _second = coordinator(server.connect().await, vec![def]).await;
    gate.add_permits(1);
    let effect = format!("{id}.b.a");
    let mut recorded = false;
    for _ in 0..600 {
        if let Some(EffectRecord::Done { .. }) =
            effect_records(nats.clone(), "svc").await.remove(&effect)
        {
            recorded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recorded, "b's success is recorded");

    // `b`'s first attempt went out unclaimed: the second replica sends it again only after
    // its deadline, claimed, and gets the recorded success instead of timing it out.
    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed, "{:?}", view.snapshot);
    let output = view.output::<EchoOutput>("b").expect("b's output").unwrap();
    assert_eq!(output, EchoOutput { step: "b-output".into(), n: 7 });
    assert_eq!(runs.load(Ordering::SeqCst), 1, "b ran once");
    assert_eq!(compensations.load(Ordering::SeqCst), 0, "nothing compensated");
    let timeline = client.timeline(&id).await.unwrap();
    let sends: Vec<Timestamp> = timeline
        .iter()
        .filter_map(|e| match &e.event {
            TimelineEvent::Dispatched {
                step, phase: Phase::Action, attempt: 1, deadline, ..
            } if step.as_str() == "b" => Some(*deadline),
            _ => None,
        })
        .collect();
    assert_eq!(sends.len(), 2, "b's attempt 1 sent twice: {timeline:?}");
    let resent_at = timeline
        .iter()
        .filter(|e| {
            matches!(&e.event, TimelineEvent::Dispatched { step, attempt: 1, .. } if step.as_str() == "b")
        })
        .nth(1)
        .map(|e| e.at)
        .unwrap();
    assert!(
        resent_at >= sends[0].after(saga_core::UNCLAIMED_GRACE),
        "re-sent at {resent_at:?}, not before the first send's deadline {:?} and the grace",
        sends[0]
    );
    assert!(
        !timeline.iter().any(|e| matches!(&e.event, TimelineEvent::TimedOut { .. })),
        "nothing timed out: {timeline:?}"
    );
}

/// A reply the server drops (here: the service may not publish the action's replies of step
/// `b`, so every such reply is lost) leaves the coordinator to time the step out; the
/// compensation then gets the output the participant recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_gets_the_output_of_a_success_whose_reply_was_lost() {
    init_logging();
    let timeout = Duration::from_secs(2);
    let def = SagaDefinition::builder("lost")
        .step("a", "svc", "a", |s| s.compensation("undo-a").retry(quick_retry(3)))
        .step("b", "svc", "b", |s| s.compensation("undo-b").timeout(timeout).retry(quick_retry(1)))
        .build();
    let access = saga_nats::permissions::Access {
        starters: [("shop".into(), ["lost".into()].into())].into(),
        ..Default::default()
    };
    let mut users =
        saga_nats::permissions::permissions(std::slice::from_ref(&def), &access).unwrap();
    let svc = users.iter_mut().find(|u| u.user == "svc").expect("the service's user");
    let replies = "saga.reply.*.svc.>".to_owned();
    assert!(svc.publish.remove(&replies), "{:?}", svc.publish);
    svc.publish.insert("saga.reply.*.svc.*.a.>".into());
    svc.publish.insert("saga.reply.*.svc.*.b.c.*".into());
    let bus = saga_tests::auth::Bus::start_with(&users, Default::default());
    let (nats, _) = bus.connect("coordinator").await;
    let _coordinator = Coordinator::start(nats, coordinator_config(vec![def], WAIT)).await.unwrap();
    let (nats, svc_denials) = bus.connect("svc").await;
    let (output_tx, mut outputs) =
        tokio::sync::mpsc::unbounded_channel::<Option<Result<EchoOutput, StepError>>>();
    let _p = Participant::builder(nats, "svc")
        .action("a", |cmd: saga_nats::Command<TestInput>| async move {
            Ok(EchoOutput { step: "a".into(), n: cmd.input.n })
        })
        .compensation("undo-a", |_: saga_nats::Command<TestInput>| async { Ok(()) })
        .action("b", |cmd: saga_nats::Command<TestInput>| async move {
            Ok(EchoOutput { step: "b-output".into(), n: cmd.input.n })
        })
        .compensation("undo-b", move |cmd: saga_nats::Command<TestInput>| {
            let output_tx = output_tx.clone();
            async move {
                let _ = output_tx.send(cmd.action_output::<EchoOutput>());
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    let (nats, _) = bus.connect("shop").await;
    let shop = SagaClient::new(nats).await.unwrap().only(["lost"]).unwrap();

    let id = shop.start("lost", &TestInput { n: 9, ..Default::default() }).await.unwrap();
    let view = shop.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Compensated, "{:?}", view.snapshot);
    assert!(view.output::<EchoOutput>("b").is_none(), "the coordinator never saw b's output");
    saga_tests::auth::expect_denied("svc", &svc_denials, "saga.reply.").await;
    let timeline = shop.timeline(&id).await.unwrap();
    assert!(
        timeline.iter().any(
            |e| matches!(&e.event, TimelineEvent::TimedOut { step, .. } if step.as_str() == "b")
        ),
        "b timed out: {timeline:?}"
    );
    let given = tokio::time::timeout(WAIT, outputs.recv()).await.expect("undo-b ran").unwrap();
    let expected = EchoOutput { step: "b-output".into(), n: 9 };
    assert_eq!(given.map(|r| r.unwrap()), Some(expected), "undo-b got b's recorded output");
    assert!(outputs.try_recv().is_err(), "undo-b ran once");
}
