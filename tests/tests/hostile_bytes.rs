//! Arbitrary bytes on any subject a service may publish on, against a real server: no
//! process panics or stops, and no saga changes. Inputs (starts, operator actions), commands
//! (a participant's own subjects), replies (the coordinator's) and lifecycle-looking events
//! are generated at random, with random or well-formed subjects; then the live saga goes on to
//! its own end, the finished one is as it was, and a new saga still runs.
//!
//! The number of messages follows `PROPTEST_CASES` (default 256 here).

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use saga_core::{Phase, SagaStatus};
use saga_nats::subjects::{self, ReplyTo};
use saga_tests::support::*;

const WAIT: Duration = Duration::from_secs(120);

/// Where a generated message goes.
#[derive(Debug, Clone)]
enum Target {
    Start,
    Operator,
    Command(&'static str),
    Reply(&'static str),
    Domain,
    /// A subject of random tokens under `saga.`.
    Random(Vec<String>),
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        Just(Target::Start),
        Just(Target::Operator),
        prop_oneof![Just("a"), Just("b"), Just("undo-a")].prop_map(Target::Command),
        prop_oneof![Just("a"), Just("b")].prop_map(Target::Reply),
        Just(Target::Domain),
        prop::collection::vec("[a-z0-9*>_-]{1,8}", 1..6).prop_map(Target::Random),
    ]
}

fn message() -> impl Strategy<Value = (Target, Vec<u8>, bool)> {
    (target(), prop::collection::vec(any::<u8>(), 0..2048), any::<bool>())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256).min(2000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_bytes_on_any_subject_change_no_saga() {
    init_logging();
    let stack = echo_stack("two", &["a", "b"], Duration::from_secs(5)).await;
    let (nats, fx, client) = (stack.nats.clone(), stack.effects.clone(), stack.client.clone());
    let js = jetstream::new(nats.clone());
    let replica = stack.coordinator.replica().to_owned();

    let finished = client.start("two", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    assert_eq!(client.wait(&finished, WAIT).await.unwrap().status(), SagaStatus::Completed);
    let before = client.get(&finished).await.unwrap().unwrap().snapshot;
    // Live for about 5 s: b hangs on its first attempt, then succeeds.
    let input = TestInput { n: 2, hang: vec![("b".into(), 1)], ..Default::default() };
    let live = client.start("two", &input).await.unwrap();

    let mut runner = TestRunner::new(Config { failure_persistence: None, ..Config::default() });
    let strategy = message();
    let n = cases();
    for _ in 0..n {
        let (target, payload, about_live) = strategy.new_tree(&mut runner).unwrap().current();
        let id = if about_live { live.clone() } else { finished.clone() };
        let payload = Bytes::from(payload);
        match target {
            Target::Start => {
                let subject = subjects::start(&id, &"two".into());
                let _ = js.publish(subject, payload).await.unwrap().await;
            }
            Target::Operator => {
                // One action per saga and operator waits at a time: once the previous one is
                // handled (dead-lettered, mostly), the stream takes the next.
                let subject = subjects::operator(&id, &"two".into(), "fuzz");
                publish_when_free(&js, &subject, payload.to_vec(), WAIT).await;
            }
            Target::Command(command) => {
                let reply = ReplyTo {
                    replica: "fuzz".into(),
                    service: "svc".into(),
                    saga_id: id.clone(),
                    step: command.trim_start_matches("undo-").into(),
                    phase: if command.starts_with("undo-") {
                        Phase::Compensation
                    } else {
                        Phase::Action
                    },
                    attempt: 1,
                };
                let subject = subjects::command(&"svc".into(), &command.into());
                nats.publish_with_reply(subject, reply.subject(), payload).await.unwrap();
            }
            Target::Reply(step) => {
                let reply = ReplyTo {
                    replica: replica.clone(),
                    service: "svc".into(),
                    saga_id: id.clone(),
                    step: step.into(),
                    phase: Phase::Action,
                    attempt: 1,
                };
                nats.publish(reply.subject(), payload).await.unwrap();
            }
            Target::Domain => {
                js.publish("domain.fuzz.event", payload).await.unwrap().await.unwrap();
            }
            Target::Random(tokens) => {
                // Not under saga.log (only the coordinator may write there: see permissions.rs).
                let subject = format!("saga.in.{}", tokens.join("."));
                if !subject.contains('*') && !subject.contains('>') {
                    let _ = js.publish(subject, payload).await.unwrap().await;
                }
            }
        }
    }
    nats.flush().await.unwrap();

    // The live saga ends its own way; the finished one is as it was; nothing ran twice.
    let view = client.wait(&live, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed, "{:?}", view.snapshot);
    assert_eq!(view.input::<TestInput>().unwrap().n, 2);
    assert_eq!(client.get(&finished).await.unwrap().unwrap().snapshot, before);
    assert_eq!((fx.count(&live, "a", "a"), fx.count(&live, "b", "a")), (1, 1));
    assert_eq!(fx.count(&live, "a", "c") + fx.count(&live, "b", "c"), 0);
    assert!(fx.duplicates().is_empty(), "{:?}", fx.duplicates());

    // Every process still works.
    let next = client.start("two", &TestInput { n: 3, ..Default::default() }).await.unwrap();
    assert_eq!(client.wait(&next, WAIT).await.unwrap().status(), SagaStatus::Completed);
    eprintln!("{n} hostile messages sent; the sagas are unchanged");
}
