//! Await steps against a real nats-server: a step completed by a correlated domain event or
//! a signal, with the event early, late, twice, for several sagas, or never; and kill -9 of
//! the coordinator between the event and the step's completion.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use std::time::Duration;

use saga_core::{OnTimeout, SagaDefinition, SagaId, SagaStatus, StepStatus, TimelineEvent as T};
use saga_nats::follow::publish_domain_event;
use saga_nats::{Command, ErrorKind, Participant, SagaClient};
use saga_tests::support::*;
use saga_tests::NatsServer;
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(60);
const COORDINATOR: &str = env!("CARGO_BIN_EXE_saga-coordinator");
const SAGACTL: &str = env!("CARGO_BIN_EXE_sagactl");

/// What the payments service publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Payment {
    order: u64,
    amount: u32,
}

/// reserve (command) -> payment (await `payments.confirmed`, or `payments.declined`, where
/// `order` = the input's `n`) -> ship (command).
fn pay(timeout: Duration, on_timeout: OnTimeout) -> SagaDefinition {
    SagaDefinition::builder("pay")
        .step("reserve", "svc", "reserve", |s| s.compensation("undo-reserve").retry(quick_retry(3)))
        .await_step("payment", |a| {
            a.event("payments.confirmed")
                .fail_event("payments.declined")
                .matching("order", "input.n")
                .timeout(timeout)
                .on_timeout(on_timeout)
        })
        .step("ship", "shipping", "ship", |s| s.compensation("undo-ship").retry(quick_retry(3)))
        .build()
}

/// The payments each `ship` command carried (the await step's output), by saga.
#[derive(Clone, Default)]
struct Shipped(Arc<Mutex<Vec<(SagaId, Payment)>>>);

/// The echo participant for `reserve`, and a `ship` handler that records the payment it got.
async fn participants(
    nats: async_nats::Client,
    fx: Effects,
    shipped: Shipped,
) -> (Participant, Participant) {
    let echo = echo_participant(nats.clone(), "svc", &["reserve"], fx.clone()).await;
    let ship = Participant::builder(nats, "shipping")
        .action("ship", move |cmd: Command<TestInput>| {
            let shipped = shipped.clone();
            async move {
                let payment: Payment = cmd.dep("payment")?;
                shipped.0.lock().unwrap().push((cmd.saga_id.clone(), payment));
                Ok(EchoOutput { step: "ship".into(), n: cmd.input.n })
            }
        })
        .compensation("undo-ship", |_cmd: Command<TestInput>| async move { Ok(()) })
        .start()
        .await
        .expect("ship participant starts");
    (echo, ship)
}

async fn publish(nats: &async_nats::Client, subject: &str, id: &str, payment: &Payment) {
    publish_domain_event(nats, subject, id, payment).await.expect("event published");
}

/// Waits until saga `id`'s step `step` has status `status`.
async fn until_step(client: &SagaClient, id: &SagaId, step: &str, status: StepStatus) {
    for _ in 0..600 {
        if let Some(view) = client.get(id).await.unwrap() {
            if view.snapshot.steps.iter().any(|s| s.name.as_str() == step && s.status == status) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("saga {id}: step {step} never reached {status:?}");
}

/// A fresh server running `defs` with an in-process coordinator, the participants and a
/// client. Keep it alive for the test.
struct Stack {
    _server: NatsServer,
    nats: async_nats::Client,
    client: SagaClient,
    fx: Effects,
    shipped: Shipped,
    _coordinator: saga_nats::Coordinator,
    _participants: (Participant, Participant),
}

async fn stack(defs: Vec<SagaDefinition>) -> Stack {
    let server = NatsServer::start();
    let nats = server.connect().await;
    let _coordinator = coordinator(nats.clone(), defs).await;
    let (fx, shipped) = (Effects::default(), Shipped::default());
    let _participants = participants(nats.clone(), fx.clone(), shipped.clone()).await;
    let client = client(nats.clone()).await;
    Stack { _server: server, nats, client, fx, shipped, _coordinator, _participants }
}

fn input(n: u64) -> TestInput {
    TestInput { n, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_completes_the_step_and_its_payload_reaches_the_next_step() {
    init_logging();
    let s = stack(vec![pay(WAIT, OnTimeout::Fail)]).await;
    let (nats, client, shipped) = (s.nats.clone(), s.client.clone(), s.shipped.clone());

    let id = client.start("pay", &input(41)).await.unwrap();
    until_step(&client, &id, "payment", StepStatus::Running).await;
    // Another order's payment completes nothing here.
    publish(&nats, "payments.confirmed", "p-40", &Payment { order: 40, amount: 1 }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.get(&id).await.unwrap().unwrap().status(), SagaStatus::Running);
    let paid = Payment { order: 41, amount: 12 };
    publish(&nats, "payments.confirmed", "p-41", &paid).await;

    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    assert_eq!(view.output::<Payment>("payment").unwrap().unwrap(), paid);
    assert_eq!(*shipped.0.lock().unwrap(), vec![(id.clone(), paid)]);
    let timeline = client.timeline(&id).await.unwrap();
    assert!(
        timeline.iter().any(|e| matches!(&e.event, T::Awaiting { step, waits_for, .. }
            if step.as_str() == "payment" && waits_for == "event payments.confirmed where order = 41")),
        "{timeline:?}"
    );
    assert!(
        !timeline
            .iter()
            .any(|e| matches!(&e.event, T::Dispatched { step, .. } if step.as_str() == "payment")),
        "an await step sends no command"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_comes_before_the_saga_waits_completes_the_step_when_it_gets_there() {
    init_logging();
    let s = stack(vec![pay(WAIT, OnTimeout::Fail)]).await;
    let (nats, client) = (s.nats.clone(), s.client.clone());

    // Paid before the order's saga even starts; reserve takes a while, too.
    let paid = Payment { order: 7, amount: 3 };
    publish(&nats, "payments.confirmed", "p-7", &paid).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = client
        .start("pay", &TestInput { n: 7, delay_ms: 300, ..Default::default() })
        .await
        .unwrap();
    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    assert_eq!(view.output::<Payment>("payment").unwrap().unwrap(), paid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_event_or_a_timeout_compensates_and_continue_goes_on() {
    init_logging();
    let strict = pay(Duration::from_secs(2), OnTimeout::Fail);
    let mut lenient = pay(Duration::from_secs(2), OnTimeout::Continue);
    lenient.name = "pay-later".into();
    let s = stack(vec![strict, lenient]).await;
    let (nats, client, fx) = (s.nats.clone(), s.client.clone(), s.fx.clone());

    let declined = client.start("pay", &input(1)).await.unwrap();
    let timed_out = client.start("pay", &input(2)).await.unwrap();
    until_step(&client, &declined, "payment", StepStatus::Running).await;
    publish(&nats, "payments.declined", "d-1", &Payment { order: 1, amount: 0 }).await;

    let view = client.wait(&declined, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Compensated);
    assert_eq!(fx.count(&declined, "reserve", "c"), 1, "reserve compensated once");
    let payment = view.snapshot.steps.iter().find(|s| s.name.as_str() == "payment").unwrap();
    assert_eq!(payment.status, StepStatus::Failed);
    assert!(
        payment
            .last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("event domain.payments.declined")),
        "{:?}",
        payment.last_error
    );

    let view = client.wait(&timed_out, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Compensated);
    assert_eq!(fx.count(&timed_out, "reserve", "c"), 1);
    let payment = view.snapshot.steps.iter().find(|s| s.name.as_str() == "payment").unwrap();
    assert_eq!(
        payment.last_error.as_deref(),
        Some("no event payments.confirmed where order = input.n within 2s")
    );

    // With on_timeout: continue the saga goes on without a payment: ship is sent, finds
    // none, and refuses the order.
    let id = client.start("pay-later", &input(3)).await.unwrap();
    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Compensated);
    assert!(view.output::<Payment>("payment").is_none());
    let payment = view.snapshot.steps.iter().find(|s| s.name.as_str() == "payment").unwrap();
    assert_eq!(payment.status, StepStatus::Succeeded);
    let ship = view.snapshot.steps.iter().find(|s| s.name.as_str() == "ship").unwrap();
    assert_eq!(ship.status, StepStatus::Failed);
    assert!(
        ship.last_error.as_deref().is_some_and(|e| e.contains("no output of step \"payment\"")),
        "{:?}",
        ship.last_error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_event_completes_once_and_one_event_completes_every_saga_it_matches() {
    init_logging();
    let s = stack(vec![pay(WAIT, OnTimeout::Fail)]).await;
    let (nats, client, shipped) = (s.nats.clone(), s.client.clone(), s.shipped.clone());

    // Two sagas for order 5 (two keys), one for order 6.
    let a = client.start_with_key("pay", "a", &input(5)).await.unwrap();
    let b = client.start_with_key("pay", "b", &input(5)).await.unwrap();
    let c = client.start_with_key("pay", "c", &input(6)).await.unwrap();
    for id in [&a, &b, &c] {
        until_step(&client, id, "payment", StepStatus::Running).await;
    }
    let paid = Payment { order: 5, amount: 9 };
    // The same event twice (two ids, so the stream keeps both), and a third time with the
    // same id (the stream drops it).
    publish(&nats, "payments.confirmed", "p-5", &paid).await;
    publish(&nats, "payments.confirmed", "p-5-again", &paid).await;
    publish(&nats, "payments.confirmed", "p-5", &paid).await;
    for id in [&a, &b] {
        assert_eq!(client.wait(id, WAIT).await.unwrap().status(), SagaStatus::Completed);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shipped = shipped.0.lock().unwrap().clone();
    assert_eq!(shipped.iter().filter(|(id, _)| *id == a).count(), 1, "{shipped:?}");
    assert_eq!(shipped.iter().filter(|(id, _)| *id == b).count(), 1, "{shipped:?}");
    for id in [&a, &b] {
        let completions = client
            .timeline(id)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| matches!(&e.event, T::Succeeded { step, .. } if step.as_str() == "payment"))
            .count();
        assert_eq!(completions, 1, "saga {id}: payment completed once");
    }
    assert_eq!(client.get(&c).await.unwrap().unwrap().status(), SagaStatus::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_reach_a_waiting_saga_wait_for_a_later_one_and_are_refused_after_the_end() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let def = SagaDefinition::builder("review")
        .step("reserve", "svc", "reserve", |s| s.compensation("undo-reserve").retry(quick_retry(3)))
        .await_step("approval", |a| a.signal("approve").timeout(WAIT))
        .build();
    let _coord = coordinator(nats.clone(), vec![def]).await;
    let fx = Effects::default();
    let _p = echo_participant(nats.clone(), "svc", &["reserve"], fx.clone()).await;
    let client = client(nats.clone()).await;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Approval {
        by: String,
    }
    // Waiting already.
    let waiting = client.start("review", &input(1)).await.unwrap();
    until_step(&client, &waiting, "approval", StepStatus::Running).await;
    client.signal(&waiting, "approve", &Approval { by: "ann".into() }).await.unwrap();
    let view = client.wait(&waiting, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    assert_eq!(
        view.output::<Approval>("approval").unwrap().unwrap(),
        Approval { by: "ann".into() }
    );

    // Not waiting yet: reserve is slow; the signal is kept until it is.
    let early = client
        .start("review", &TestInput { n: 2, delay_ms: 1000, ..Default::default() })
        .await
        .unwrap();
    client.signal(&early, "approve", &Approval { by: "bob".into() }).await.unwrap();
    assert_eq!(client.get(&early).await.unwrap().unwrap().status(), SagaStatus::Running);
    let view = client.wait(&early, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    assert_eq!(
        view.output::<Approval>("approval").unwrap().unwrap(),
        Approval { by: "bob".into() }
    );

    // From a terminal: `sagactl signal`, then refused once the saga ended (exit code 1).
    let by_cli = client.start("review", &input(3)).await.unwrap();
    until_step(&client, &by_cli, "approval", StepStatus::Running).await;
    let url = server.url();
    let sagactl = |args: &[&str]| {
        let out = std::process::Command::new(SAGACTL)
            .args(args)
            .env("NATS_URL", &url)
            .output()
            .expect("sagactl runs");
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
    };
    let (code, out, err) = sagactl(&["show", by_cli.as_str()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("waits for signal approve, until "), "{out}");
    let (code, out, err) =
        sagactl(&["signal", by_cli.as_str(), "approve", "--payload", r#"{"by": "cli"}"#]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), format!("signal approve: sent to saga {by_cli}"));
    let view = client.wait(&by_cli, WAIT).await.unwrap();
    assert_eq!(
        view.output::<Approval>("approval").unwrap().unwrap(),
        Approval { by: "cli".into() }
    );
    let (code, _, err) = sagactl(&["signal", by_cli.as_str(), "approve"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already finished as completed: signal approve refused"), "{err}");

    // Finished, unknown, or a bad name: refused, and nothing is stored.
    let err = client.signal(&waiting, "approve", &Approval { by: "eve".into() }).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotApplicable);
    assert!(err.to_string().contains("already finished as completed"), "{err}");
    let unknown = SagaId::new("0123456789abcdef0123456789abcdef").unwrap();
    let err = client.signal(&unknown, "approve", &Approval { by: "eve".into() }).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    let err =
        client.signal(&early, "approve now", &Approval { by: "eve".into() }).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_coordinator_between_the_event_and_the_completion_loses_nothing() {
    init_logging();
    const SAGAS: u64 = 40;
    let server = NatsServer::start();
    let nats = server.connect().await;
    let def = pay(WAIT, OnTimeout::Fail);
    let dir = definitions_dir(&[def]);
    let mut coord = CoordinatorProcess::start(COORDINATOR, &server.url(), &dir);
    let client = client_when_ready(nats.clone(), "pay").await;
    let (fx, shipped) = (Effects::default(), Shipped::default());
    let _p = participants(nats.clone(), fx.clone(), shipped.clone()).await;

    let mut ids = Vec::new();
    for n in 0..SAGAS {
        ids.push(client.start("pay", &input(1000 + n)).await.unwrap());
    }
    for id in &ids {
        until_step(&client, id, "payment", StepStatus::Running).await;
    }
    // The events go out while the coordinator dies: some are completed by it, some are
    // stored after it died and found by the next one when it takes the sagas over.
    let publisher = {
        let nats = nats.clone();
        tokio::spawn(async move {
            for n in 0..SAGAS {
                let p = Payment { order: 1000 + n, amount: 1 };
                publish(&nats, "payments.confirmed", &format!("k-{n}"), &p).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    coord.kill9();
    publisher.await.unwrap();
    let _coord2 = CoordinatorProcess::start(COORDINATOR, &server.url(), &dir);

    let statuses = wait_all(&client, &ids, WAIT).await;
    assert!(statuses.iter().all(|s| *s == SagaStatus::Completed), "{statuses:?}");
    let shipped = shipped.0.lock().unwrap().clone();
    for (i, id) in ids.iter().enumerate() {
        let got: Vec<_> = shipped.iter().filter(|(s, _)| s == id).collect();
        assert!(!got.is_empty(), "saga {id} shipped");
        assert!(got.iter().all(|(_, p)| p.order == 1000 + i as u64), "{got:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The payment event goes out from inside the step before the await step, as a real service's
/// would, so the coordinator begins each wait while its event is being matched and stored.
/// Every saga must hear of it, whichever comes first. (The race the coordinator's consumer
/// closes, a subscriber hearing of a message before the stream stores it, showed in release
/// builds under `saga-bench --await-step`, a few sagas in a few thousand; this debug-build
/// test did not hit it in 8 runs, so it guards the flow, not that race.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stored_while_the_wait_begins_are_never_missed() {
    init_logging();
    const SAGAS: u64 = 1000;
    const AT_ONCE: usize = 64;
    let server = NatsServer::start();
    let nats = server.connect().await;
    let _coordinator = coordinator(nats.clone(), vec![pay(WAIT, OnTimeout::Fail)]).await;
    let publisher = nats.clone();
    let _reserve = Participant::builder(nats.clone(), "svc")
        .action("reserve", move |cmd: Command<TestInput>| {
            let nats = publisher.clone();
            async move {
                let paid = Payment { order: cmd.input.n, amount: 1 };
                publish(&nats, "payments.confirmed", &format!("r-{}", cmd.input.n), &paid).await;
                Ok(EchoOutput { step: "reserve".into(), n: cmd.input.n })
            }
        })
        .compensation("undo-reserve", |_cmd: Command<TestInput>| async move { Ok(()) })
        .start()
        .await
        .expect("reserve participant starts");
    let (_, _ship) = participants(nats.clone(), Effects::default(), Shipped::default()).await;
    let client = client(nats.clone()).await;

    let ids: Vec<SagaId> = futures::stream::iter(0..SAGAS)
        .map(|n| {
            let client = client.clone();
            async move { client.start("pay", &input(5000 + n)).await.unwrap() }
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    let mut missed = Vec::new();
    for id in &ids {
        match client.wait(id, Duration::from_secs(20)).await {
            Ok(view) if view.status() == SagaStatus::Completed => {}
            other => missed.push((id.clone(), other.map(|v| v.status()))),
        }
    }
    assert!(
        missed.is_empty(),
        "{} of {SAGAS} sagas missed their payment: {missed:?}",
        missed.len()
    );
}

/// A definition with an await step registered while the coordinator runs (it started with
/// another): its events are matched too, the first of them published before any of its sagas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_registered_at_run_time_gets_its_events_matched() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let other = SagaDefinition::builder("other").step("a", "svc", "reserve", |s| s).build();
    let _coordinator = coordinator(nats.clone(), vec![other]).await;
    let (fx, shipped) = (Effects::default(), Shipped::default());
    let _participants = participants(nats.clone(), fx, shipped.clone()).await;
    let client = client(nats.clone()).await;
    client.register(&pay(WAIT, OnTimeout::Fail)).await.unwrap();

    let early = Payment { order: 70, amount: 5 };
    publish(&nats, "payments.confirmed", "late-70", &early).await;
    let first = client.start("pay", &input(70)).await.unwrap();
    let second = client.start("pay", &input(71)).await.unwrap();
    until_step(&client, &second, "payment", StepStatus::Running).await;
    let paid = Payment { order: 71, amount: 6 };
    publish(&nats, "payments.confirmed", "late-71", &paid).await;

    for (id, payment) in [(first, early), (second, paid)] {
        let view = client.wait(&id, WAIT).await.unwrap();
        assert_eq!(view.status(), SagaStatus::Completed, "{id}");
        assert_eq!(view.output::<Payment>("payment").unwrap().unwrap(), payment);
    }
}

/// `{"order": order, "x": [[[…]]]}`, the array nested `depth` deep.
fn deeply_nested(order: u64, depth: usize) -> Vec<u8> {
    let mut bytes = vec![0x82, 0xa5];
    bytes.extend(b"order");
    bytes.extend(rmp_serde::to_vec(&order).unwrap());
    bytes.extend([0xa1, b'x']);
    bytes.extend(std::iter::repeat_n(0x91, depth));
    bytes.push(0xc0);
    bytes
}

/// `{"order": order, "blob": <a binary holding a binary holding … "end">}`, `layers` deep.
fn binaries_within_binaries(order: u64, layers: usize) -> Vec<u8> {
    // MessagePack bin 32: 0xc6, the length (4 bytes, big-endian), the bytes.
    let bin = |bytes: Vec<u8>| {
        let mut out = vec![0xc6];
        out.extend(u32::try_from(bytes.len()).unwrap().to_be_bytes());
        out.extend(bytes);
        out
    };
    let mut blob = rmp_serde::to_vec(&"end").unwrap();
    for _ in 0..layers {
        blob = bin(blob);
    }
    let mut bytes = vec![0x82, 0xa5];
    bytes.extend(b"order");
    bytes.extend(rmp_serde::to_vec(&order).unwrap());
    bytes.extend([0xa4]);
    bytes.extend(b"blob");
    bytes.extend(bin(blob));
    bytes
}

/// A service may publish any bytes on its own event subjects. Payloads nested far deeper than
/// any decoder should follow, on the subjects an await step waits on and tagged with the
/// waiting saga's id (so the admin service shows them with it), crash nothing: the matcher
/// ignores them, the admin service answers, and the saga goes on when the real event comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_events_are_ignored_and_shown_without_crashing_anything() {
    init_logging();
    let s = stack(vec![pay(WAIT, OnTimeout::Fail)]).await;
    let (nats, client) = (s.nats.clone(), s.client.clone());
    let js = async_nats::jetstream::new(nats.clone());

    let id = client.start("pay", &input(9)).await.unwrap();
    until_step(&client, &id, "payment", StepStatus::Running).await;
    let hostile = [
        ("domain.payments.confirmed", deeply_nested(9, 200_000)),
        ("domain.payments.declined", deeply_nested(9, 200_000)),
        ("domain.payments.confirmed", binaries_within_binaries(99, 20_000)),
    ];
    for (subject, body) in hostile {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Saga-Id", id.as_str());
        js.publish_with_headers(subject, headers, body.into()).await.unwrap().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(client.get(&id).await.unwrap().unwrap().status(), SagaStatus::Running);

    // The admin service, in the coordinator, decodes what it shows within the nesting limit.
    let shown = client.domain_events("pay", &id).await.unwrap();
    assert_eq!(shown.events.len(), 3, "{shown:?}");

    let paid = Payment { order: 9, amount: 5 };
    publish(&nats, "payments.confirmed", "p-9", &paid).await;
    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    assert_eq!(view.output::<Payment>("payment").unwrap().unwrap(), paid);
}
