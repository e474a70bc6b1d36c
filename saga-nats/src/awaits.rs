//! Await steps over NATS: where what a saga waits for is kept, how the coordinator finds it,
//! and the matchers that keep domain events under the values they carry.
//!
//! - A **matcher** per await specification (event subject, field, window) is a durable
//!   consumer of `DOMAIN_EVENTS` shared by the coordinator replicas. It reads the field of each
//!   event and keeps the event on `saga.await.<spec>.<value>` in `SAGA_AWAIT` (the newest one
//!   per subject), then acknowledges it.
//! - A **signal** is kept on `saga.signal.<id>.<saga>.<name>` in `SAGA_AWAIT` by the client
//!   that sends it.
//! - A saga that begins waiting registers the subjects it waits on with its replica, then
//!   reads them (an event or a signal that came first is there); whatever is stored on them
//!   later reaches the replica live, through its ordered consumer of `SAGA_AWAIT` (which
//!   delivers only what is stored). Either way the first one
//!   completes the step; the state machine refuses the rest. A replica that dies before the
//!   step's completion is logged leaves the saga to another, which begins the wait again
//!   from the log and reads the same subjects.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream;
use saga_core::wire::{ArrivalMessage, SignalMessage, PROTOCOL_VERSION};
use saga_core::{
    correlation_value, AwaitOn, Awaiting, Codec, Event, Payload, Plan, SagaDefinition, SagaId,
    SagaName, Timestamp,
};
use tracing::{debug, info};

use crate::follow::{consume, FollowError, Following};
use crate::subjects::{self, DOMAIN_STREAM};

/// The subjects saga `id` of definition `saga` waits on for `a`, each with whether what
/// arrives there fails the step (an await's `fail_event`) rather than completing it.
pub(crate) fn subjects_of(a: &Awaiting, id: &SagaId, saga: &SagaName) -> Vec<(String, bool)> {
    match &a.on {
        AwaitOn::Event { event, fail_event, field, value, window } => {
            let mut out = vec![(
                subjects::arrival(&subjects::await_spec(event, field, *window), value),
                false,
            )];
            if let Some(fail) = fail_event {
                let spec = subjects::await_spec(fail, field, *window);
                out.push((subjects::arrival(&spec, value), true));
            }
            out
        }
        AwaitOn::Signal { name } => vec![(subjects::signal(id, saga, name), false)],
    }
}

/// The state-machine event for what arrived on one of `a`'s subjects (`fails`: a fail
/// event's), stored at `stored`; `Err` says why it does not count (it does not decode, or an
/// event is older than the await's window).
pub(crate) fn event_for(
    id: &SagaId,
    a: &Awaiting,
    fails: bool,
    payload: &[u8],
    codec: &Codec,
    now: Timestamp,
) -> Result<Event, String> {
    let (output, what) = match &a.on {
        AwaitOn::Event { window, .. } => {
            let arrival: ArrivalMessage =
                codec.decode(payload).map_err(|e| format!("kept event does not decode: {e}"))?;
            let age = Duration::from_millis(now.0.saturating_sub(arrival.at.0));
            if age > *window {
                return Err(format!(
                    "event {} (sequence {}) is older than the await's window of {}",
                    arrival.subject,
                    arrival.seq,
                    humantime_serde::re::humantime::format_duration(*window)
                ));
            }
            let what = format!("event {} (sequence {})", arrival.subject, arrival.seq);
            (arrival.payload, what)
        }
        AwaitOn::Signal { name } => {
            let signal: SignalMessage =
                codec.decode(payload).map_err(|e| format!("signal does not decode: {e}"))?;
            if signal.name != *name || signal.saga_id != *id {
                return Err(format!(
                    "signal {} to saga {} on the subject of signal {name} to saga {id}",
                    saga_core::wire::quote(&signal.name),
                    signal.saga_id
                ));
            }
            (signal.payload, format!("signal {name}"))
        }
    };
    // What arrived becomes the step's output, which travels in later commands and in every
    // later log record: the same bound as a handler's output.
    let limit = codec.max_size / 4;
    let size = output.as_bytes().len();
    if size > limit {
        return Err(format!(
            "{what} carries {size} bytes, more than the {limit} bytes a step's output may have (a quarter of the message size limit)"
        ));
    }
    Ok(if fails {
        // A fail event's own reason, if it gives one, says why.
        let reason = match fail_reason(&output) {
            Some(why) => format!("{what}: {why}"),
            None => what,
        };
        Event::StepFailed { step: a.step.clone(), attempt: a.attempt, reason, transient: false }
    } else {
        Event::StepSucceeded { step: a.step.clone(), attempt: a.attempt, output }
    })
}

/// The `reason` field of an event's payload, when the payload is a map that has one as a
/// non-empty string (as a service's "declined" event usually does), quoted and cut short:
/// the event comes from another service.
fn fail_reason(payload: &Payload) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct WithReason {
        reason: Option<String>,
    }
    let why = saga_core::wire::decode_nested::<WithReason>(payload.as_bytes()).ok()?.reason?;
    let why = why.trim();
    (!why.is_empty()).then(|| saga_core::wire::quote(why))
}

/// Which sagas wait on which subjects, for one replica: filled when a wait begins, read when
/// something is stored on a subject.
#[derive(Debug, Default)]
pub(crate) struct Waiting(Mutex<HashMap<String, HashSet<SagaId>>>);

impl Waiting {
    /// Saga `id` waits on `subject`.
    pub(crate) fn add(&self, subject: &str, id: &SagaId) {
        let mut map = self.0.lock().expect("not poisoned");
        map.entry(subject.to_owned()).or_default().insert(id.clone());
    }

    /// Saga `id` no longer waits on `subject`.
    pub(crate) fn remove(&self, subject: &str, id: &SagaId) {
        let mut map = self.0.lock().expect("not poisoned");
        if let Some(ids) = map.get_mut(subject) {
            ids.remove(id);
            if ids.is_empty() {
                map.remove(subject);
            }
        }
    }

    /// The sagas waiting on `subject`.
    pub(crate) fn on(&self, subject: &str) -> Vec<SagaId> {
        let map = self.0.lock().expect("not poisoned");
        map.get(subject).map(|ids| ids.iter().cloned().collect()).unwrap_or_default()
    }
}

/// One await specification: the event subject (after `domain.`), the field and the window.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Spec {
    event: String,
    field: String,
    window: Duration,
}

impl Spec {
    fn digest(&self) -> String {
        subjects::await_spec(&self.event, &self.field, self.window)
    }
}

/// The await specifications of `definitions`: each await step's event and fail event.
pub(crate) fn specs(definitions: &[SagaDefinition]) -> BTreeSet<Spec> {
    let mut out = BTreeSet::new();
    for step in definitions.iter().flat_map(|d| &d.steps) {
        let Some(spec) = &step.awaits else { continue };
        let Some(m) = &spec.matching else { continue };
        for event in spec.event.iter().chain(&spec.fail_event) {
            out.insert(Spec { event: event.clone(), field: m.field.clone(), window: spec.window });
        }
    }
    out
}

/// The matchers one replica runs: one per await specification of the definitions it
/// started with, and of every definition with await steps it has run a saga of since (one
/// registered while it runs, say). Matchers of one specification share a durable consumer
/// across replicas, from the stream's start, so one started late still stores every event.
#[derive(Debug)]
pub(crate) struct Matchers {
    client: async_nats::Client,
    codec: Codec,
    running: tokio::sync::Mutex<(BTreeSet<Spec>, Vec<Following>)>,
    /// Digests of the definitions whose specifications run (checked before the lock).
    seen: Mutex<HashSet<String>>,
}

impl Matchers {
    /// Matchers for nothing yet.
    pub(crate) fn new(client: async_nats::Client, codec: Codec) -> Matchers {
        Matchers { client, codec, running: Default::default(), seen: Default::default() }
    }

    /// Runs a matcher for every await specification of `definitions` that has none.
    pub(crate) async fn ensure(&self, definitions: &[SagaDefinition]) -> Result<(), FollowError> {
        let mut running = self.running.lock().await;
        for spec in specs(definitions) {
            if running.0.contains(&spec) {
                continue;
            }
            let matcher = start_matcher(self.client.clone(), spec.clone(), self.codec).await?;
            running.0.insert(spec);
            running.1.push(matcher);
        }
        Ok(())
    }

    /// Runs the matchers of `plan`'s await steps, if it has any and they do not run yet.
    pub(crate) async fn ensure_for(&self, plan: &Plan) -> Result<(), FollowError> {
        if !plan.steps().iter().any(|s| s.awaits.is_some()) {
            return Ok(());
        }
        if self.seen.lock().expect("not poisoned").contains(plan.digest()) {
            return Ok(());
        }
        self.ensure(std::slice::from_ref(plan.definition())).await?;
        self.seen.lock().expect("not poisoned").insert(plan.digest().to_owned());
        Ok(())
    }

    /// Stops every matcher.
    pub(crate) async fn shutdown(&self) {
        let matchers = std::mem::take(&mut self.running.lock().await.1);
        for matcher in matchers {
            matcher.shutdown().await;
        }
    }
}

/// One domain event, as a matcher reads it.
struct Seen {
    subject: String,
    seq: u64,
    at: Timestamp,
    payload: Vec<u8>,
}

/// Starts the matcher of `spec`: keeps every event on its subject under the value of its
/// field. Events without the field are acknowledged and counted; a failed write is retried
/// with the consumer's redeliveries.
pub(crate) async fn start_matcher(
    client: async_nats::Client,
    spec: Spec,
    codec: Codec,
) -> Result<Following, FollowError> {
    let digest = spec.digest();
    let durable = subjects::await_consumer(&digest);
    info!(%durable, event = %spec.event, field = %spec.field, "matching domain events for await steps");
    let js = jetstream::new(client.clone());
    let field = spec.field.clone();
    consume(
        client,
        DOMAIN_STREAM,
        &durable,
        format!("domain.{}", spec.event),
        |msg: &jetstream::Message| {
            let info = msg.info().map_err(|e| format!("not a JetStream message: {e}"))?;
            Ok(Seen {
                subject: msg.subject.to_string(),
                seq: info.stream_sequence,
                at: crate::deliver::millis(info.published),
                payload: msg.payload.to_vec(),
            })
        },
        move |seen: Seen| {
            let (js, field, digest) = (js.clone(), field.clone(), digest.clone());
            async move {
                let Some(value) = correlation_value(&seen.payload, &field) else {
                    crate::observe::await_event("no_field");
                    debug!(subject = %seen.subject, seq = seen.seq, %field, "domain event without the await's field, or not MessagePack nested at most 64 deep: ignored");
                    return Ok::<(), String>(());
                };
                let arrival = ArrivalMessage {
                    v: PROTOCOL_VERSION,
                    subject: seen.subject,
                    seq: seen.seq,
                    at: seen.at,
                    payload: Payload::new(seen.payload),
                };
                let body = codec.encode(&arrival).map_err(|e| e.to_string())?;
                js.publish(subjects::arrival(&digest, &value), body.into())
                    .await
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                crate::observe::await_event("kept");
                Ok(())
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declined(payload: &impl serde::Serialize) -> Result<Event, String> {
        arrived(true, rmp_serde::to_vec_named(payload).expect("encodes"))
    }

    fn arrived(fails: bool, payload: Vec<u8>) -> Result<Event, String> {
        let a = Awaiting {
            step: "payment".into(),
            attempt: 1,
            deadline: Timestamp(10_000),
            on: AwaitOn::Event {
                event: "payments.confirmed".into(),
                fail_event: Some("payments.declined".into()),
                field: "order_id".into(),
                value: "\"o-1\"".into(),
                window: Duration::from_secs(60),
            },
        };
        let arrival = ArrivalMessage {
            v: PROTOCOL_VERSION,
            subject: "domain.payments.declined".into(),
            seq: 7,
            at: Timestamp(1_000),
            payload: Payload::new(payload),
        };
        let codec = Codec::default();
        let bytes = codec.encode(&arrival).expect("encodes");
        event_for(&SagaId::from("s1"), &a, fails, &bytes, &codec, Timestamp(2_000))
    }

    #[test]
    fn an_event_too_large_to_be_an_output_does_not_count() {
        let limit = Codec::default().max_size / 4;
        let fits = rmp_serde::to_vec(&serde_bytes::ByteBuf::from(vec![7; limit - 10])).unwrap();
        assert!(matches!(arrived(false, fits), Ok(Event::StepSucceeded { .. })));
        let big = rmp_serde::to_vec(&serde_bytes::ByteBuf::from(vec![7; limit + 10])).unwrap();
        let err = arrived(false, big).unwrap_err();
        assert!(err.contains("more than the 262144 bytes a step's output may have"), "{err}");
    }

    fn reason_of(event: Result<Event, String>) -> String {
        match event {
            Ok(Event::StepFailed { reason, transient: false, .. }) => reason,
            other => panic!("not a step failure: {other:?}"),
        }
    }

    #[test]
    fn a_fail_event_gives_the_step_its_own_reason() {
        let reason = reason_of(declined(&serde_json::json!({
            "order_id": "o-1", "reason": "card declined\nby the issuer"
        })));
        assert_eq!(
            reason,
            "event domain.payments.declined (sequence 7): card declined by the issuer"
        );
    }

    #[test]
    fn a_fail_event_without_a_reason_is_named_by_subject_and_sequence() {
        for payload in [
            serde_json::json!({"order_id": "o-1"}),
            serde_json::json!({"order_id": "o-1", "reason": "  "}),
            serde_json::json!({"order_id": "o-1", "reason": 42}),
            serde_json::json!(["not", "a", "map"]),
        ] {
            assert_eq!(
                reason_of(declined(&payload)),
                "event domain.payments.declined (sequence 7)",
                "{payload}"
            );
        }
    }

    #[test]
    fn a_deeply_nested_event_is_refused_as_a_reason_not_a_crash() {
        // {"x": [[[[…]]]]}, nested far deeper than any decoder should follow.
        let mut bytes = vec![0x81, 0xa1, b'x'];
        bytes.extend(std::iter::repeat_n(0x91, 100_000));
        bytes.push(0xc0);
        assert_eq!(fail_reason(&Payload::new(bytes)), None);
    }

    #[test]
    fn a_long_reason_from_another_service_is_cut_short() {
        let long = "x".repeat(10_000);
        let reason = reason_of(declined(&serde_json::json!({"reason": long})));
        assert!(reason.len() < 300, "{} bytes", reason.len());
        assert!(reason.ends_with('…'));
    }
}
