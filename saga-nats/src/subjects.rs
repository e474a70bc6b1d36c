//! Every NATS subject, stream, consumer and bucket name, built (and parsed) in one place.
//!
//! `docs/PROTOCOL.md` documents them for participants written in other languages. Every
//! variable part is a token (`A-Z a-z 0-9 _ -`, 1 to 64 characters), so a subject never
//! holds a wildcard or an extra level, and every subject family can be confined by NATS
//! permissions to the processes that own it.

use saga_core::{
    check_token, CommandName, LifecycleKind, Phase, SagaId, SagaName, ServiceName, StepName,
};

/// The stream of inputs to the coordinator (work queue): starts and operator actions
/// (`saga.in.<id>.<kind>`).
pub const INPUT_STREAM: &str = "SAGA_IN";
/// The stream of saga logs (`saga.log.<id>.<saga>.<event>`): every recorded transition, with
/// the saga's snapshot and timeline entries. Followers read lifecycle events from it.
pub const LOG_STREAM: &str = "SAGA_LOG";
/// The dead-letter stream (`saga.dlq.<component>`).
pub const DLQ_STREAM: &str = "SAGA_DLQ";
/// The stream of domain events services publish (`domain.>`).
pub const DOMAIN_STREAM: &str = "DOMAIN_EVENTS";
/// The stream of what await steps wait for: the newest domain event per await
/// specification and correlation value (`saga.await.<spec>.<value>`), and the newest signal
/// per saga and name (`saga.signal.<id>.<saga>.<name>`).
pub const AWAIT_STREAM: &str = "SAGA_AWAIT";
/// The durable consumer all coordinator replicas share on [`INPUT_STREAM`].
pub const COORDINATOR_CONSUMER: &str = "saga-coordinator";
/// The key-value bucket of saga definitions.
pub const DEFINITIONS_BUCKET: &str = "saga_definitions";

/// The key-value bucket where participant service `service` records its effects (dedup and
/// barrier): one bucket per service, so NATS permissions can give each service its own.
pub fn effects_bucket(service: &ServiceName) -> String {
    format!("saga_fx_{service}")
}

/// The kinds of coordinator input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// Start the saga.
    Start,
    /// An operator action or a cancellation.
    Operator,
}

impl InputKind {
    /// The subject token.
    pub fn token(self) -> &'static str {
        match self {
            InputKind::Start => "start",
            InputKind::Operator => "op",
        }
    }
}

/// The subject of the start of saga `id` of definition `saga`: `saga.in.<id>.<saga>.start`.
/// NATS permissions let a starter publish only the starts of the sagas it may start.
pub fn start(id: &SagaId, saga: &SagaName) -> String {
    format!("saga.in.{id}.{saga}.start")
}

/// The start subjects of saga `id`: of definition `saga`, or of any (`None`).
pub fn starts_of(id: &SagaId, saga: Option<&SagaName>) -> String {
    format!("saga.in.{id}.{}.start", saga.map_or("*", SagaName::as_str))
}

/// The subject of an action by operator `operator` on saga `id` of definition `saga`:
/// `saga.in.<id>.<saga>.op.<operator>`. NATS permissions let each operator publish only
/// with its own name, so the name the history records is the one the server authenticated.
pub fn operator(id: &SagaId, saga: &SagaName, operator: &str) -> String {
    format!("saga.in.{id}.{saga}.op.{operator}")
}

/// A coordinator input subject, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The saga.
    pub id: SagaId,
    /// Its definition's name.
    pub saga: SagaName,
    /// Start or operator action.
    pub kind: InputKind,
    /// The operator, for an operator action.
    pub operator: Option<String>,
}

/// Parses an input subject.
pub fn parse_input(subject: &str) -> Option<Input> {
    let parts: Vec<&str> = subject.split('.').collect();
    let (id, saga, kind, operator) = match parts.as_slice() {
        ["saga", "in", id, saga, "start"] => (id, saga, InputKind::Start, None),
        ["saga", "in", id, saga, "op", operator] => {
            check_token(operator).ok()?;
            (id, saga, InputKind::Operator, Some((*operator).to_owned()))
        }
        _ => return None,
    };
    Some(Input { id: SagaId::new(*id).ok()?, saga: SagaName::new(*saga).ok()?, kind, operator })
}

/// The digest naming one await specification: the event subject it waits for (after
/// `domain.`), the field it matches on and its window. 16 hexadecimal digits.
pub fn await_spec(event: &str, field: &str, window: std::time::Duration) -> String {
    digest(&[event.as_bytes(), field.as_bytes(), window.as_millis().to_string().as_bytes()])
}

/// Where the newest event of await specification `spec` that carries `value` (canonical
/// JSON, see [`saga_core::correlation_value`]) is kept: `saga.await.<spec>.<value digest>`.
pub fn arrival(spec: &str, value: &str) -> String {
    format!("saga.await.{spec}.{}", digest(&[value.as_bytes()]))
}

/// The durable consumer of `DOMAIN_EVENTS` that keeps the events of await specification
/// `spec` under their correlation values.
pub fn await_consumer(spec: &str) -> String {
    format!("saga-await-{spec}")
}

/// The subject of signal `name` to saga `id` of definition `saga`:
/// `saga.signal.<id>.<saga>.<name>`. NATS permissions let a client send only the signals
/// it may send, to the definitions it may signal.
pub fn signal(id: &SagaId, saga: &SagaName, name: &str) -> String {
    format!("saga.signal.{id}.{saga}.{name}")
}

/// Parses a signal subject into saga id, definition and signal name.
pub fn parse_signal(subject: &str) -> Option<(SagaId, SagaName, &str)> {
    match subject.split('.').collect::<Vec<_>>().as_slice() {
        ["saga", "signal", id, saga, name] => {
            check_token(name).ok()?;
            Some((SagaId::new(*id).ok()?, SagaName::new(*saga).ok()?, name))
        }
        _ => None,
    }
}

/// The first 8 bytes of SHA-256 over `parts`, each followed by a zero byte, in hex.
fn digest(parts: &[&[u8]]) -> String {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
        h.update([0]);
    }
    h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The subject of a log record of saga `id`, named after its most significant event.
pub fn log(id: &SagaId, saga: &SagaName, event: &str) -> String {
    format!("saga.log.{id}.{saga}.{event}")
}

/// Every log subject of saga `id`: the compare-and-swap filter and the timeline's.
pub fn log_of(id: &SagaId) -> String {
    format!("saga.log.{id}.>")
}

/// The log subjects of saga `id` of definition `saga`, or of any definition (`None`): what a
/// client reads, within what its permissions allow.
pub fn log_in(id: &SagaId, saga: Option<&SagaName>) -> String {
    match saga {
        Some(saga) => format!("saga.log.{id}.{saga}.*"),
        None => log_of(id),
    }
}

/// A filter over log records: `None` parts match anything.
pub fn log_filter(saga: Option<&SagaName>, event: Option<LifecycleKind>) -> String {
    format!(
        "saga.log.*.{}.{}",
        saga.map_or("*", SagaName::as_str),
        event.map_or("*", LifecycleKind::as_str)
    )
}

/// Whether `subject` (no wildcards) matches the NATS subject filter `filter` (`*` one token,
/// `>` the rest).
pub fn matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether two subject filters can match a subject in common.
pub fn overlap(a: &str, b: &str) -> bool {
    let mut a = a.split('.');
    let mut b = b.split('.');
    loop {
        match (a.next(), b.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == "*" || y == "*" || x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Splits a log subject into saga id, saga name and event token.
pub fn parse_log(subject: &str) -> Option<(SagaId, SagaName, &str)> {
    let mut parts = subject.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("saga"), Some("log"), Some(id), Some(saga), Some(event), None) => {
            Some((SagaId::new(id).ok()?, SagaName::new(saga).ok()?, event))
        }
        _ => None,
    }
}

/// The subject of a command to `service`.
pub fn command(service: &ServiceName, command: &CommandName) -> String {
    format!("saga.cmd.{service}.{command}")
}

/// The filter of every command to `service`.
pub fn commands_of(service: &ServiceName) -> String {
    format!("saga.cmd.{service}.>")
}

/// The queue group the instances of participant `service` share.
pub fn participant_group(service: &ServiceName) -> String {
    format!("saga-{service}")
}

/// Where a reply to one command goes: the coordinator replica that sent it, the service
/// that must answer, and the command's saga, step, phase and attempt. NATS permissions let
/// each service publish only on reply subjects that carry its own name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    /// The coordinator replica that sent the command.
    pub replica: String,
    /// The service that must answer.
    pub service: ServiceName,
    /// The saga.
    pub saga_id: SagaId,
    /// The step.
    pub step: StepName,
    /// Action or compensation.
    pub phase: Phase,
    /// The attempt.
    pub attempt: u32,
}

impl ReplyTo {
    /// The subject: `saga.reply.<replica>.<service>.<saga-id>.<step>.<a|c>.<attempt>`.
    pub fn subject(&self) -> String {
        format!(
            "saga.reply.{}.{}.{}.{}.{}.{}",
            self.replica,
            self.service,
            self.saga_id,
            self.step,
            self.phase.code(),
            self.attempt
        )
    }

    /// Parses a reply subject.
    pub fn parse(subject: &str) -> Option<ReplyTo> {
        let mut parts = subject.split('.');
        let (Some("saga"), Some("reply")) = (parts.next(), parts.next()) else { return None };
        let replica = parts.next()?;
        check_token(replica).ok()?;
        let service = ServiceName::new(parts.next()?).ok()?;
        let saga_id = SagaId::new(parts.next()?).ok()?;
        let step = StepName::new(parts.next()?).ok()?;
        let phase = match parts.next()? {
            "a" => Phase::Action,
            "c" => Phase::Compensation,
            _ => return None,
        };
        let attempt = parts.next()?;
        if attempt.starts_with('0') || attempt.len() > 10 {
            return None;
        }
        let attempt: u32 = attempt.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(ReplyTo { replica: replica.to_owned(), service, saga_id, step, phase, attempt })
    }
}

/// Every reply subject of coordinator replica `replica`.
pub fn replies_of(replica: &str) -> String {
    format!("saga.reply.{replica}.>")
}

/// The dead-letter subject of a component (`coordinator`, a participant service name, or a
/// follower's durable name).
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
    /// Compare-and-swap on the subject's (or the filter's) last sequence.
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
    /// The subject filter the compare-and-swap is checked against.
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT: &str =
        "Nats-Expected-Last-Subject-Sequence-Subject";

    /// On an operator action: the inbox (`_INBOX.…`) where the coordinator sends its verdict.
    pub const VERDICT_TO: &str = "Saga-Verdict-To";

    /// Headers JetStream puts on the answer to a read of a stored message (a direct get):
    /// a message carrying one was not published by a client but relayed by the server, to
    /// whatever reply subject the reader named. (Not `Nats-Subject`: the server's own "no
    /// responders" status carries that one.)
    pub const RELAYED: [&str; 4] =
        ["Nats-Stream", "Nats-Sequence", "Nats-Time-Stamp", "Nats-Last-Sequence"];

    /// The relay header `headers` carries, if any (see [`RELAYED`]).
    pub fn relayed(headers: Option<&async_nats::HeaderMap>) -> Option<&'static str> {
        let headers = headers?;
        RELAYED.into_iter().find(|name| headers.get(*name).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_subjects_and_each_other() {
        assert!(matches("saga.log.>", "saga.log.x.order.completed"));
        assert!(matches("saga.log.*.order.*", "saga.log.x.order.completed"));
        assert!(!matches("saga.log.*.order.*", "saga.log.x.refund.completed"));
        assert!(!matches("saga.log.*.order", "saga.log.x.order.completed"));
        assert!(!matches("saga.log.*.order.*.more", "saga.log.x.order.completed"));
        assert!(overlap("saga.log.>", "saga.log.*.order.*"));
        assert!(overlap("saga.log.*.*.completed", "saga.log.*.order.*"));
        assert!(!overlap("saga.log.*.refund.*", "saga.log.*.order.*"));
        assert!(!overlap("saga.log.*.order", "saga.log.*.order.*"));
    }

    #[test]
    fn input_subjects_round_trip() {
        let id = SagaId::from("abc");
        let saga = SagaName::from("place-order");
        let s = operator(&id, &saga, "alice");
        assert_eq!(s, "saga.in.abc.place-order.op.alice");
        let parsed = parse_input(&s).unwrap();
        assert_eq!((parsed.kind, parsed.operator.as_deref()), (InputKind::Operator, Some("alice")));
        assert_eq!((parsed.id, parsed.saga), (id.clone(), saga.clone()));
        let s = start(&id, &saga);
        assert_eq!(s, "saga.in.abc.place-order.start");
        assert_eq!(parse_input(&s).map(|i| (i.kind, i.operator)), Some((InputKind::Start, None)));
        assert_eq!(starts_of(&id, None), "saga.in.abc.*.start");
        for bad in [
            "saga.in.abc.x.nope",
            "saga.in.abc.start",
            "saga.in.abc.x.op",
            "saga.in.abc.x.op.a.b",
            "saga.in.abc.x.start.y",
            "saga.in.a b.x.start",
        ] {
            assert_eq!(parse_input(bad), None, "{bad}");
        }
    }

    #[test]
    fn relayed_messages_are_told_by_their_jetstream_headers_and_503s_are_not() {
        let mut no_responders = async_nats::HeaderMap::new();
        no_responders.insert("Nats-Subject", "saga.cmd.svc.a");
        assert_eq!(headers::relayed(Some(&no_responders)), None);
        let mut direct_get = no_responders.clone();
        direct_get.insert("Nats-Stream", "KV_saga_fx_svc");
        direct_get.insert("Nats-Sequence", "7");
        assert_eq!(headers::relayed(Some(&direct_get)), Some("Nats-Stream"));
        assert_eq!(headers::relayed(None), None);
    }

    #[test]
    fn reply_subjects_round_trip() {
        let r = ReplyTo {
            replica: "r1".into(),
            service: "seller".into(),
            saga_id: "s1".into(),
            step: "reserve".into(),
            phase: Phase::Compensation,
            attempt: 3,
        };
        assert_eq!(r.subject(), "saga.reply.r1.seller.s1.reserve.c.3");
        assert_eq!(ReplyTo::parse(&r.subject()), Some(r));
        assert_eq!(ReplyTo::parse("saga.reply.r1.seller.s1.reserve.x.3"), None);
        assert_eq!(ReplyTo::parse("saga.reply.r1.seller.s1.reserve.a.03"), None);
        assert_eq!(ReplyTo::parse("saga.reply.r1.seller.s1.reserve.a.3.4"), None);
        assert_eq!(ReplyTo::parse("saga.reply.r1.seller.s1.reserve.a"), None);
    }

    #[test]
    fn log_subjects_round_trip() {
        let s = log(&"id1".into(), &"place-order".into(), "completed");
        assert_eq!(s, "saga.log.id1.place-order.completed");
        let (id, saga, ev) = parse_log(&s).unwrap();
        assert_eq!((id.as_str(), saga.as_str(), ev), ("id1", "place-order", "completed"));
        assert_eq!(log_filter(Some(&"x".into()), None), "saga.log.*.x.*");
    }
}
