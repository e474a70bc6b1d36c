//! The participant SDK's metrics, through the `metrics` facade: a service exports them with
//! its own recorder. Here a debugging recorder (this test binary's only one) captures them
//! while a real saga runs against a real nats-server.

use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::{CompositeKey, MetricKind};
use saga_core::SagaStatus;
use saga_tests::support::*;

const WAIT: Duration = Duration::from_secs(60);

/// One snapshot of the recorder (it hands each histogram value out once).
type Snapshot =
    Vec<(CompositeKey, Option<metrics::Unit>, Option<metrics::SharedString>, DebugValue)>;

/// The counter `name` with label `service="svc"`, or 0.
fn counter(snapshot: &Snapshot, name: &str) -> u64 {
    snapshot
        .iter()
        .filter(|(key, ..)| key.kind() == MetricKind::Counter)
        .filter(|(key, ..)| key.key().name() == name)
        .filter(|(key, ..)| key.key().labels().any(|l| l.key() == "service" && l.value() == "svc"))
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => *n,
            _ => 0,
        })
        .sum()
}

/// How many handler runs of `command` ended with `outcome`.
fn handler_runs(snapshot: &Snapshot, command: &str, outcome: &str) -> usize {
    snapshot
        .iter()
        .filter(|(key, ..)| key.key().name() == saga_nats::observe::HANDLER_SECONDS)
        .filter(|(key, ..)| {
            let labels: Vec<_> = key.key().labels().map(|l| (l.key(), l.value())).collect();
            labels.contains(&("command", command)) && labels.contains(&("outcome", outcome))
        })
        .map(|(.., value)| match value {
            DebugValue::Histogram(values) => values.len(),
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_participant_records_handler_runs_unclaimed_runs_and_dedup_hits() {
    init_logging();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("the only recorder of this test binary");

    let stack = echo_stack("counted", &["a", "b"], Duration::from_secs(10)).await;
    let client = stack.client.clone();
    let ok = client.start("counted", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    // b fails transiently once: its second attempt is claimed.
    let input = TestInput { n: 2, transient: vec![("b".into(), 1)], ..Default::default() };
    let retried = client.start("counted", &input).await.unwrap();
    for id in [&ok, &retried] {
        assert_eq!(client.wait(id, WAIT).await.unwrap().status(), SagaStatus::Completed);
    }

    // Four first attempts ran unclaimed; b's retry was claimed.
    let snapshot = snapshotter.snapshot().into_vec();
    assert_eq!(counter(&snapshot, saga_nats::observe::UNCLAIMED_RUNS), 4);
    assert_eq!(handler_runs(&snapshot, "a", "success"), 2);
    assert_eq!(handler_runs(&snapshot, "b", "success"), 2);
    assert_eq!(handler_runs(&snapshot, "b", "transient_failure"), 1);
    assert_eq!(counter(&snapshot, saga_nats::observe::DEDUP_HITS), 0);

    // The same command again (as a take-over would send it): answered from the record.
    let command = saga_core::wire::CommandMessage {
        v: saga_core::wire::PROTOCOL_VERSION,
        saga_id: ok.clone(),
        saga: "counted".into(),
        step: "a".into(),
        phase: saga_core::Phase::Action,
        attempt: 1,
        service: "svc".into(),
        command: "a".into(),
        deadline: saga_core::Timestamp(u64::MAX / 2),
        input: client.get(&ok).await.unwrap().unwrap().snapshot.input,
        deps: Default::default(),
        output: None,
        exclusive: false,
    };
    let reply = saga_nats::subjects::ReplyTo {
        replica: "test".into(),
        service: "svc".into(),
        saga_id: ok.clone(),
        step: "a".into(),
        phase: saga_core::Phase::Action,
        attempt: 1,
    };
    let mut replies = stack.nats.subscribe(reply.subject()).await.unwrap();
    let body = saga_core::Codec::default().encode(&command).unwrap();
    stack
        .nats
        .publish_with_reply(
            saga_nats::subjects::command(&"svc".into(), &"a".into()),
            reply.subject(),
            body.into(),
        )
        .await
        .unwrap();
    use futures::StreamExt;
    tokio::time::timeout(WAIT, replies.next()).await.expect("the recorded reply").unwrap();
    let snapshot = snapshotter.snapshot().into_vec();
    assert_eq!(counter(&snapshot, saga_nats::observe::DEDUP_HITS), 1);
    assert_eq!(handler_runs(&snapshot, "a", "success"), 0, "the handler did not run again");
}
