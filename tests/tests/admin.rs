//! The admin service's listing, reads and counts, and `sagactl` over them, against a real
//! nats-server with sagas in every status.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use saga_core::{SagaId, SagaStatus, StepName, Timestamp};
use saga_nats::index::{ListPage, ListRequest, SagaCounts, Which};
use saga_nats::SagaClient;
use saga_tests::support::*;

const WAIT: Duration = Duration::from_secs(60);
const SAGACTL: &str = env!("CARGO_BIN_EXE_sagactl");

/// Sagas of `lst` (steps a, b, c) in every status: 4 completed, 2 compensated (b failed),
/// 2 parked (a's compensation keeps failing), 3 live at b (b hangs).
struct Population {
    stack: EchoStack,
    completed: Vec<SagaId>,
    compensated: Vec<SagaId>,
    parked: Vec<SagaId>,
    hanging: Vec<SagaId>,
}

async fn population() -> Population {
    let stack = echo_stack("lst", &["a", "b", "c"], Duration::from_secs(60)).await;
    let client = stack.client.clone();
    let start = |input: TestInput| {
        let client = client.clone();
        async move { client.start("lst", &input).await.unwrap() }
    };
    let mut p = Population {
        completed: Vec::new(),
        compensated: Vec::new(),
        parked: Vec::new(),
        hanging: Vec::new(),
        stack,
    };
    for n in 0..4 {
        p.completed.push(start(TestInput { n, ..Default::default() }).await);
    }
    for n in 10..12 {
        p.compensated
            .push(start(TestInput { n, fail: vec!["b".into()], ..Default::default() }).await);
    }
    for n in 20..22 {
        let input = TestInput {
            n,
            fail: vec!["b".into()],
            comp_fail: vec![("a".into(), 100)],
            ..Default::default()
        };
        p.parked.push(start(input).await);
    }
    for n in 30..33 {
        p.hanging.push(
            start(TestInput { n, hang: vec![("b".into(), 100)], ..Default::default() }).await,
        );
    }
    let settled: Vec<SagaId> =
        p.completed.iter().chain(&p.compensated).chain(&p.parked).cloned().collect();
    wait_all(&client, &settled, WAIT).await;
    // The hanging ones have reached b.
    for id in &p.hanging {
        for _ in 0..600 {
            let view = client.get(id).await.unwrap().unwrap();
            if view.logged && view.step_status("b") == Some(saga_core::StepStatus::Running) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    p
}

fn ids(page: &ListPage) -> BTreeSet<SagaId> {
    page.sagas.iter().map(|s| s.id.clone()).collect()
}

fn set(ids: &[SagaId]) -> BTreeSet<SagaId> {
    ids.iter().cloned().collect()
}

async fn list(client: &SagaClient, request: ListRequest) -> ListPage {
    client.list("lst", &request).await.unwrap()
}

fn status(s: SagaStatus) -> ListRequest {
    ListRequest { status: Which::Status(s), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_by_status_step_and_time_and_pages_with_a_cursor() {
    init_logging();
    let p = population().await;
    let client = &p.stack.client;

    // Live (the default): the parked and the hanging ones, oldest first.
    let live = list(client, ListRequest::default()).await;
    assert_eq!(ids(&live), &set(&p.parked) | &set(&p.hanging), "{live:?}");
    let order: Vec<SagaId> = live.sagas.iter().map(|s| s.id.clone()).collect();
    let expected: Vec<SagaId> = p.parked.iter().chain(&p.hanging).cloned().collect();
    assert_eq!(order, expected, "live sagas come in the order they were accepted");

    let running = list(client, status(SagaStatus::Running)).await;
    assert_eq!(ids(&running), set(&p.hanging));
    assert!(running.sagas.iter().all(|s| s.step == Some(StepName::from("b"))), "{running:?}");

    let parked =
        list(client, ListRequest { status: Which::parse("parked").unwrap(), ..Default::default() })
            .await;
    assert_eq!(ids(&parked), set(&p.parked));
    for s in &parked.sagas {
        assert_eq!(s.status, SagaStatus::NeedsIntervention);
        assert_eq!(s.step, Some(StepName::from("a")), "parked at a's compensation: {s:?}");
        assert!(s.reason.is_some(), "a parked saga says why: {s:?}");
    }

    let finished =
        list(client, ListRequest { status: Which::Finished, ..Default::default() }).await;
    assert_eq!(ids(&finished), &set(&p.completed) | &set(&p.compensated));
    assert_eq!(ids(&list(client, status(SagaStatus::Completed)).await), set(&p.completed));
    let compensated = list(client, status(SagaStatus::Compensated)).await;
    assert_eq!(ids(&compensated), set(&p.compensated));
    for s in &compensated.sagas {
        assert_eq!(s.step, Some(StepName::from("b")), "the step that failed: {s:?}");
        assert!(s.reason.as_deref().is_some_and(|r| !r.is_empty()), "{s:?}");
    }
    assert!(list(client, status(SagaStatus::Cancelled)).await.sagas.is_empty());

    // By step: live sagas at b are the hanging ones; compensated ones that failed at b.
    let at_b = ListRequest { step: Some("b".into()), ..Default::default() };
    assert_eq!(ids(&list(client, at_b).await), set(&p.hanging));

    // By time: nothing started in the future; everything started since the epoch.
    let future = Timestamp(u64::MAX / 2);
    let later = ListRequest { status: Which::Finished, since: Some(future), ..Default::default() };
    assert!(list(client, later).await.sagas.is_empty());
    let earlier =
        ListRequest { status: Which::Finished, until: Some(future), ..Default::default() };
    assert_eq!(list(client, earlier).await.sagas.len(), 6);

    // Pages of 4: every finished saga once, then the end.
    let mut request = ListRequest { status: Which::Finished, limit: Some(4), ..Default::default() };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = list(client, request.clone()).await;
        pages += 1;
        assert!(page.sagas.len() <= 4);
        seen.extend(page.sagas.iter().map(|s| s.id.clone()));
        match page.next {
            Some(next) if !page.sagas.is_empty() => request.cursor = Some(next),
            _ => break,
        }
        assert!(pages < 10, "the cursor does not move on");
    }
    assert_eq!(seen.len(), 6, "no saga twice: {seen:?}");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), ids(&finished));
    assert!(pages >= 2, "6 sagas in pages of 4 take two pages");

    // Counts, from the streams.
    let c: SagaCounts = client.stats("lst").await.unwrap();
    assert_eq!(c.in_flight, 5, "{c:?}");
    assert_eq!(c.parked, 2, "{c:?}");
    assert_eq!(c.finished.get("completed"), Some(&4), "{c:?}");
    assert_eq!(c.finished.get("compensated"), Some(&2), "{c:?}");
    assert!(c.oldest_in_flight_at.is_some(), "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requests_get_clear_errors_and_the_service_answers_get() {
    init_logging();
    let stack = echo_stack("adm", &["a", "b"], Duration::from_secs(10)).await;
    let nats = &stack.nats;
    let id = stack.client.start("adm", &TestInput::default()).await.unwrap();
    stack.client.wait(&id, WAIT).await.unwrap();

    let ask = |subject: &'static str, body: &'static str| async move {
        let answer = nats.request(subject, Bytes::from_static(body.as_bytes())).await.unwrap();
        let code = answer
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .map(|v| v.as_str().to_owned());
        let error = answer
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error"))
            .map(|v| v.as_str().to_owned());
        (code, error, answer.payload)
    };
    // Discovery: the admin service answers $SRV.PING and lists its endpoints in $SRV.INFO.
    let ping = nats.request("$SRV.PING.saga-admin", Bytes::new()).await.unwrap();
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "saga-admin", "{ping}");
    let info = nats.request("$SRV.INFO.saga-admin", Bytes::new()).await.unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    let endpoints: BTreeSet<&str> =
        info["endpoints"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
    assert_eq!(endpoints, saga_nats::admin::ENDPOINTS.into_iter().collect(), "{info}");

    let (code, error, _) = ask("saga.admin.list.adm", r#"{"status": "sleeping"}"#).await;
    assert_eq!(code.as_deref(), Some("400"));
    assert!(error.unwrap().contains("request body"), "names what was wrong");
    let (code, error, _) = ask("saga.admin.list.adm", r#"{"limit": 100000}"#).await;
    assert_eq!(code.as_deref(), Some("400"));
    assert!(error.unwrap().contains("limit must be 1 to 500"));
    let (code, error, _) = ask("saga.admin.get.adm", r#"{"id": "no-such-saga"}"#).await;
    assert_eq!(code.as_deref(), Some("404"));
    assert!(error.unwrap().contains("no saga no-such-saga of definition adm"));
    let (code, _, _) = ask("saga.admin.get.adm", r#"{"id": "a.b"}"#).await;
    assert_eq!(code.as_deref(), Some("400"), "a dotted id is refused, not looked up");

    let body = serde_json::to_vec(&serde_json::json!({ "id": id })).unwrap();
    let answer = nats.request("saga.admin.get.adm", body.into()).await.unwrap();
    let got: saga_nats::admin::GetAnswer = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(got.snapshot.id, id);
    assert_eq!(got.snapshot.status, SagaStatus::Completed);
    assert!(got.logged);
    // The definition names the saga: asking under another definition finds nothing.
    let body = serde_json::to_vec(&serde_json::json!({ "id": id })).unwrap();
    let answer = nats.request("saga.admin.get.other", body.into()).await.unwrap();
    let code = answer.headers.as_ref().and_then(|h| h.get("Nats-Service-Error-Code"));
    assert_eq!(code.map(|v| v.as_str()), Some("404"));
}

/// Runs `sagactl` against the server; returns its exit code, stdout and stderr.
fn sagactl(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(SAGACTL)
        .args(args)
        .env("NATS_URL", url)
        .env("SAGA_OPERATOR", "cli-operator")
        .output()
        .expect("sagactl runs");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagactl_lists_shows_starts_and_acts_with_exit_codes_scripts_can_rely_on() {
    init_logging();
    let p = population().await;
    let url = p.stack.server.url();
    let url = url.as_str();
    let run = |args: Vec<String>| {
        let url = url.to_owned();
        async move {
            tokio::task::spawn_blocking(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                sagactl(&url, &args)
            })
            .await
            .unwrap()
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

    // list: a table by default, JSON with --json.
    let (code, out, err) = run(args(&["list", "lst", "--status", "parked"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ID"), "a table with titles: {out}");
    for id in &p.parked {
        assert!(out.contains(id.as_str()), "{out}");
    }
    let (code, out, err) = run(args(&["list", "lst", "--status", "finished", "--json"])).await;
    assert_eq!(code, 0, "{err}");
    let page: ListPage = serde_json::from_str(&out).unwrap();
    assert_eq!(ids(&page), &set(&p.completed) | &set(&p.compensated));
    let (code, _, err) = run(args(&["list", "lst", "--status", "sleeping"])).await;
    assert_eq!(code, 2, "bad usage");
    assert!(err.contains("--status sleeping"), "{err}");

    // show: the steps, the timeline with the failure's reason, and the lifecycle events with
    // the followers that consumed them (a follower of the terminal events, here "audit").
    let _audit = saga_nats::follow::follow_sagas(
        p.stack.nats.clone(),
        "audit",
        Some("lst"),
        &[saga_core::LifecycleKind::Compensated],
        |_| async { Ok::<(), String>(()) },
    )
    .await
    .unwrap();
    let failed = p.compensated[0].as_str();
    let mut shown = String::new();
    for _ in 0..300 {
        let (code, out, err) = run(args(&["show", failed])).await;
        assert_eq!(code, 0, "{err}");
        shown = out;
        if shown.contains("audit (consumed)") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for needle in [
        "compensated",
        "STEP",
        "WHEN",
        "dispatched",
        "failed",
        "compensation_started",
        "finished",
        "LIFECYCLE EVENTS",
        "step_failed",
        "audit (consumed)",
    ] {
        assert!(shown.contains(needle), "{needle} missing from:\n{shown}");
    }
    let (code, _, err) = run(args(&["show", "no-such-saga"])).await;
    assert_eq!(code, 3, "not found: {err}");

    // stats.
    let (code, out, err) = run(args(&["stats", "lst", "--json"])).await;
    assert_eq!(code, 0, "{err}");
    let counts: SagaCounts = serde_json::from_str(&out).unwrap();
    assert_eq!((counts.in_flight, counts.parked), (5, 2));

    // start --wait: a saga that completes.
    let (code, out, err) =
        run(args(&["start", "lst", "--input", r#"{"n": 99}"#, "--key", "k-99", "--wait"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.trim_end().ends_with("completed"), "{out}");
    // The same key with other input: refused, exit 1.
    let (code, _, err) =
        run(args(&["start", "lst", "--input", r#"{"n": 98}"#, "--key", "k-99"])).await;
    assert_eq!(code, 1, "a conflict: {err}");
    assert!(err.contains("other input"), "{err}");
    let (code, _, err) = run(args(&["start", "lst", "--input", "{not json"])).await;
    assert_eq!(code, 2, "{err}");

    // Operator actions: a retry of a parked saga is applied; a cancel of a finished one is
    // refused with the coordinator's reason.
    let parked = p.parked[0].as_str();
    let (code, out, err) = run(args(&["skip", parked, "--reason", "released by hand"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("applied"), "{out}");
    let done = p.completed[0].as_str();
    let (code, _, err) = run(args(&["cancel", done, "--reason", "too late"])).await;
    assert_eq!(code, 1, "refused: {err}");
    let hanging = p.hanging[0].as_str();
    let (code, out, err) = run(args(&["cancel", hanging, "--reason", "customer called"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("applied"), "{out}");
    // b's attempt is still in flight (it hangs until its 60 s timeout), so the saga is
    // compensated once that attempt ends; the cancellation and its operator are recorded now.
    let timeline = p.stack.client.timeline(&p.hanging[0]).await.unwrap();
    assert!(
        timeline.iter().any(|e| matches!(&e.event,
            saga_core::TimelineEvent::CancelRequested { by, .. } if by.as_deref() == Some("cli-operator"))),
        "the cancellation names the operator: {timeline:?}"
    );
    let view = p.stack.client.wait(&p.parked[0], WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Compensated);
    let timeline = p.stack.client.timeline(&p.parked[0]).await.unwrap();
    assert!(
        timeline.iter().any(|e| matches!(&e.event,
            saga_core::TimelineEvent::OperatorSkip { by, .. } if by.as_deref() == Some("cli-operator"))),
        "the skip names the operator: {timeline:?}"
    );

    // defs: show the registered one; validate a broken file offline.
    let (code, out, err) = run(args(&["defs", "show", "lst"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("lst version 1") && out.contains("svc"), "{out}");
    let (code, out, err) = run(args(&["defs", "ls"])).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("NAME") && out.contains("lst"), "{out}");

    // dlq: nothing dead-lettered here; a sequence that does not exist is not found.
    let (code, out, err) = run(args(&["dlq", "ls", "--json"])).await;
    assert_eq!(code, 0, "{err}");
    let page: saga_nats::dlq::DlqPage = serde_json::from_str(&out).unwrap();
    assert!(page.letters.is_empty(), "{page:?}");
    let (code, _, err) = run(args(&["dlq", "show", "999999"])).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no dead letter 999999"), "{err}");
    let dir = std::env::temp_dir().join(format!("sagactl-defs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "name: bad\nsteps:\n  - name: a\n    service: s\n    action: do\n    after: [zz]\n",
    )
    .unwrap();
    let (code, _, err) = run(args(&["defs", "validate", bad.to_str().unwrap()])).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("zz"), "names what is wrong: {err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `WAIT`.
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: did not happen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_redriven_and_discarded() {
    init_logging();
    let stack = echo_stack("adm", &["a"], Duration::from_secs(10)).await;
    let (nats, client) = (stack.nats.clone(), stack.client.clone());
    let js = async_nats::jetstream::new(nats.clone());

    // A start of a definition nobody registered yet: the coordinator dead-letters it.
    let late = chain("late", &["a"], Duration::from_secs(10));
    let start = saga_core::wire::StartMessage {
        v: saga_core::wire::PROTOCOL_VERSION,
        saga_id: SagaId::for_key(&"late".into(), "k1"),
        saga: "late".into(),
        digest: late.digest(),
        // {"n": 1}: a TestInput.
        input: saga_core::Payload::new(vec![0x81, 0xa1, b'n', 1]),
        key: "k1".into(),
    };
    let id = start.saga_id.clone();
    let subject = saga_nats::subjects::start(&id, &start.saga);
    let payload = saga_core::Codec::default().encode(&start).unwrap();
    js.publish(subject.clone(), payload.into()).await.unwrap().await.unwrap();
    let coordinator = saga_nats::dlq::DlqListRequest {
        component: Some("coordinator".into()),
        ..Default::default()
    };
    let letter = eventually("the start is dead-lettered", || async {
        client.dead_letters(&coordinator).await.unwrap().letters.into_iter().next()
    })
    .await;
    assert_eq!(letter.subject, subject);
    assert!(letter.reason.contains("is not registered"), "{letter:?}");
    let shown = client.dead_letter(letter.seq).await.unwrap();
    assert_eq!(shown.body.as_ref().and_then(|b| b["saga"].as_str()), Some("late"), "{shown:?}");

    // Registered now, the start is re-driven and the saga runs; the dead letter is gone.
    client.register(&late).await.unwrap();
    let redriven = client.redrive(letter.seq).await.unwrap();
    assert_eq!(redriven.subject, subject);
    assert_eq!(client.wait(&id, WAIT).await.unwrap().status(), SagaStatus::Completed);
    let gone = client.dead_letter(letter.seq).await.unwrap_err();
    assert_eq!(gone.kind(), saga_nats::ErrorKind::NotFound, "{gone}");

    // A command with no reply subject: the participant dead-letters it. It cannot be
    // re-driven (the coordinator re-sends commands itself); it can be discarded.
    nats.publish("saga.cmd.svc.a", Bytes::from_static(b"junk")).await.unwrap();
    let svc =
        saga_nats::dlq::DlqListRequest { component: Some("svc".into()), ..Default::default() };
    let letter = eventually("the command is dead-lettered", || async {
        client.dead_letters(&svc).await.unwrap().letters.into_iter().next()
    })
    .await;
    assert_eq!(letter.component, "svc");
    let refused = client.redrive(letter.seq).await.unwrap_err();
    assert_eq!(refused.kind(), saga_nats::ErrorKind::NotApplicable, "{refused}");
    assert!(refused.to_string().contains("only coordinator inputs"), "{refused}");
    client.discard(letter.seq).await.unwrap();
    assert!(client.dead_letters(&svc).await.unwrap().letters.is_empty());
    let bad =
        saga_nats::dlq::DlqListRequest { component: Some("a.b".into()), ..Default::default() };
    let err = client.dead_letters(&bad).await.unwrap_err();
    assert!(err.to_string().contains("component"), "names what is wrong: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_list_every_version_and_the_live_sagas_running_each() {
    init_logging();
    let stack = echo_stack("adm", &["a"], Duration::from_secs(30)).await;
    let client = stack.client.clone();
    let v1 = client.definition("adm").await.unwrap().digest().to_owned();
    // One saga of version 1 stays live (its step hangs).
    let input = TestInput { n: 1, hang: vec![("a".into(), 100)], ..Default::default() };
    let live = client.start("adm", &input).await.unwrap();
    let v2def = {
        let mut d = chain("adm", &["a"], Duration::from_secs(30));
        d.version = 2;
        d
    };
    let v2 = client.register(&v2def).await.unwrap();
    assert_ne!(v1, v2);

    let defs = eventually("the coordinator sees version 2 as the latest", || async {
        let defs = client.definitions("adm").await.unwrap();
        (defs.latest == v2).then_some(defs)
    })
    .await;
    let digests: BTreeSet<&str> = defs.versions.iter().map(|v| v.digest.as_str()).collect();
    assert_eq!(digests, [v1.as_str(), v2.as_str()].into());
    let live_of = |d: &str| defs.versions.iter().find(|v| v.digest == d).unwrap().live;
    assert_eq!((live_of(&v1), live_of(&v2)), (1, 0), "{defs:?}");
    assert_eq!(client.definition_names().await.unwrap(), vec![saga_core::SagaName::from("adm")]);
    let err = client.definitions("nope").await.unwrap_err();
    assert_eq!(err.kind(), saga_nats::ErrorKind::UnknownSaga, "{err}");
    client.cancel(&live, "test over").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parked_among_thousands_are_listed_without_reading_the_others() {
    init_logging();
    let stack = echo_stack("many", &["a", "b"], Duration::from_secs(30)).await;
    let (nats, client) = (stack.nats.clone(), stack.client.clone());
    const DONE: u64 = 2_000;
    let mut ids = Vec::new();
    for chunk in (0..DONE).collect::<Vec<_>>().chunks(100) {
        let starts =
            chunk.iter().map(|&n| {
                let client = client.clone();
                async move {
                    client.start("many", &TestInput { n, ..Default::default() }).await.unwrap()
                }
            });
        ids.extend(futures::future::join_all(starts).await);
    }
    let mut parked = Vec::new();
    for n in 0..3 {
        let input = TestInput {
            n: 10_000 + n,
            fail: vec!["b".into()],
            comp_fail: vec![("a".into(), 100)],
            ..Default::default()
        };
        parked.push(client.start("many", &input).await.unwrap());
    }
    wait_all(&client, &parked, WAIT).await;
    eventually("every saga has ended", || async {
        let c = client.stats("many").await.unwrap();
        (c.finished.get("completed") == Some(&DONE) && c.in_flight == 3).then_some(())
    })
    .await;

    // Every read the listing makes is a JetStream direct get: count them.
    let mut reads = nats.subscribe("$JS.API.DIRECT.GET.>").await.unwrap();
    nats.flush().await.unwrap();
    let parked_only = ListRequest { status: Which::parse("parked").unwrap(), ..Default::default() };
    let page = client.list("many", &parked_only).await.unwrap();
    let listed: BTreeSet<SagaId> = page.sagas.iter().map(|s| s.id.clone()).collect();
    assert_eq!(listed, set(&parked), "exactly the parked ones");
    nats.flush().await.unwrap();
    let mut n = 0;
    while tokio::time::timeout(Duration::from_millis(300), reads.next()).await.is_ok() {
        n += 1;
    }
    eprintln!("listing the parked: {n} direct gets among {} sagas", DONE + 3);
    // A few reads per parked saga (and the coordinator's own keep-alive reads of them), not
    // one per saga: 2,003 sagas are stored.
    assert!(n <= 40, "{n} direct gets to list 3 parked sagas among {}", DONE + 3);
    assert!(n >= 3, "the listing reads through direct gets ({n} seen): the count means something");
}
