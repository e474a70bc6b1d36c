//! Every NATS subject, stream, consumer and bucket name, built in one place.
//!
//! `docs/PROTOCOL.md` documents them for participants written in other languages.

use saga_core::{CommandName, LifecycleKind, SagaId, SagaName, ServiceName, StepName};

/// The stream holding each saga's latest state record (`saga.state.<id>`).
pub const STATE_STREAM: &str = "SAGA_STATE";
/// The stream of inputs to sagas: starts, replies, fired timers, operator actions
/// (`saga.in.<id>.<kind>`), and the pending timer schedules (`saga.timer.<id>.<step>`).
pub const INPUT_STREAM: &str = "SAGA_IN";
/// The stream of commands to participants (`saga.cmd.<service>.<command>`).
pub const COMMAND_STREAM: &str = "SAGA_CMD";
/// The stream of saga lifecycle events (`saga.event.<saga>.<kind>.<id>`).
pub const EVENT_STREAM: &str = "SAGA_EVENTS";
/// The dead-letter stream (`saga.dlq.<component>`).
pub const DLQ_STREAM: &str = "SAGA_DLQ";
/// The durable consumer all coordinator replicas share on [`INPUT_STREAM`].
pub const COORDINATOR_CONSUMER: &str = "saga-coordinator";
/// The key-value bucket of saga definitions.
pub const DEFINITIONS_BUCKET: &str = "saga_definitions";
/// The key-value bucket where participants record effects (dedup and barrier).
pub const EFFECTS_BUCKET: &str = "saga_effects";

/// The subject of saga `id`'s state record.
pub fn state(id: &SagaId) -> String {
    format!("saga.state.{id}")
}

/// The kinds of saga input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// Start the saga.
    Start,
    /// A participant's reply.
    Reply,
    /// A fired timer.
    Timer,
    /// An operator action or a cancellation.
    Operator,
}

impl InputKind {
    /// The subject token.
    pub fn token(self) -> &'static str {
        match self {
            InputKind::Start => "start",
            InputKind::Reply => "reply",
            InputKind::Timer => "timer",
            InputKind::Operator => "op",
        }
    }

    /// Parses a subject token.
    pub fn from_token(token: &str) -> Option<InputKind> {
        Some(match token {
            "start" => InputKind::Start,
            "reply" => InputKind::Reply,
            "timer" => InputKind::Timer,
            "op" => InputKind::Operator,
            _ => return None,
        })
    }
}

/// The subject of an input to saga `id`.
pub fn input(id: &SagaId, kind: InputKind) -> String {
    format!("saga.in.{id}.{}", kind.token())
}

/// Splits an input subject into saga id and kind.
pub fn parse_input(subject: &str) -> Option<(SagaId, InputKind)> {
    let mut parts = subject.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("saga"), Some("in"), Some(id), Some(kind), None) => {
            let id = SagaId::new(id).ok()?;
            Some((id, InputKind::from_token(kind)?))
        }
        _ => None,
    }
}

/// The subject holding the pending timer of one step of saga `id`.
pub fn timer(id: &SagaId, step: &StepName) -> String {
    format!("saga.timer.{id}.{step}")
}

/// All timer subjects of saga `id`.
pub fn timers(id: &SagaId) -> String {
    format!("saga.timer.{id}.>")
}

/// The subject of a command to `service`.
pub fn command(service: &ServiceName, command: &CommandName) -> String {
    format!("saga.cmd.{service}.{command}")
}

/// The filter of every command to `service`.
pub fn commands_of(service: &ServiceName) -> String {
    format!("saga.cmd.{service}.>")
}

/// The durable consumer name of a participant service.
pub fn participant_consumer(service: &ServiceName) -> String {
    format!("participant-{service}")
}

/// The subject of a lifecycle event.
pub fn event(saga: &SagaName, kind: LifecycleKind, id: &SagaId) -> String {
    format!("saga.event.{saga}.{}.{id}", kind.as_str())
}

/// A filter over lifecycle events: `None` parts match anything.
pub fn events_filter(saga: Option<&SagaName>, kind: Option<LifecycleKind>) -> String {
    format!(
        "saga.event.{}.{}.*",
        saga.map_or("*", SagaName::as_str),
        kind.map_or("*", LifecycleKind::as_str)
    )
}

/// The dead-letter subject of a component (`coordinator`, or a participant service name).
pub fn dlq(component: &str) -> String {
    format!("saga.dlq.{component}")
}

/// Header names used on every message.
pub mod headers {
    /// The saga id.
    pub const SAGA_ID: &str = "Saga-Id";
    /// Why a message was dead-lettered.
    pub const DLQ_REASON: &str = "Saga-Dlq-Reason";
    /// The subject a dead-lettered message was received on.
    pub const DLQ_SUBJECT: &str = "Saga-Dlq-Subject";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// NATS JetStream deduplication id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// Per-message time to live.
    pub const TTL: &str = "Nats-TTL";
    /// Compare-and-swap on the subject's last sequence.
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
    /// A scheduled message's time (`@at <RFC3339>`).
    pub const SCHEDULE: &str = "Nats-Schedule";
    /// A scheduled message's target subject.
    pub const SCHEDULE_TARGET: &str = "Nats-Schedule-Target";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_subjects_round_trip() {
        let id = SagaId::from("abc");
        let s = input(&id, InputKind::Reply);
        assert_eq!(s, "saga.in.abc.reply");
        assert_eq!(parse_input(&s), Some((id, InputKind::Reply)));
        assert_eq!(parse_input("saga.in.abc.nope"), None);
        assert_eq!(parse_input("saga.in.a.b.reply"), None);
    }
}
