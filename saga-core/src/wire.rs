//! Protocol v2: the wire messages, the stored records and their codec.
//!
//! Every message is a MessagePack map with named fields (so fields can be added without
//! breaking older readers) and a protocol version `v`. A message of another version is refused
//! with an error that says so. Every identifier inside a body is checked like a subject token,
//! so a body cannot smuggle `.`, `*`, `>` or white space into a subject or a key.
//! `docs/PROTOCOL.md` describes each message field by field; `docs/vectors/` holds recorded
//! examples.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ids::{
    check_token, CommandId, CommandName, Phase, SagaId, SagaName, ServiceName, StepName, Timestamp,
    TokenError,
};
use crate::machine::{Dispatch, Event, LifecycleKind, Payload};
use crate::view::{SagaSnapshot, TimelineEntry};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 2;

/// The default largest message accepted or produced: 1 MiB (the default `max_payload` of
/// nats-server).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// The most characters of an attacker-supplied value that a log line or an error repeats.
pub const MAX_QUOTED: usize = 120;

/// The longest start key (idempotency key) accepted, in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// How deeply arrays and maps may nest in MessagePack that this crate and saga-nats decode:
/// protocol messages, and payloads from other services (inputs, outputs, domain events).
/// Decoding nests by recursion, so a hostile payload nested thousands deep would otherwise
/// overflow the stack of whatever process reads it; no protocol message comes near this.
pub const MAX_NESTING: usize = 64;

/// Decodes MessagePack into `T`, refusing nesting deeper than [`MAX_NESTING`] (the error
/// says "depth limit exceeded"). Use it for any bytes that come from the bus.
///
/// ```
/// let deep: Vec<u8> = std::iter::repeat(0x91).take(100_000).chain([0xc0]).collect();
/// assert!(saga_core::wire::decode_nested::<serde_json::Value>(&deep).is_err());
/// let flat = rmp_serde::to_vec(&[1, 2, 3]).unwrap();
/// assert_eq!(saga_core::wire::decode_nested::<Vec<u8>>(&flat).unwrap(), vec![1, 2, 3]);
/// ```
pub fn decode_nested<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_NESTING);
    T::deserialize(&mut de)
}

/// `s` cut to at most [`MAX_QUOTED`] characters (with `…` when cut), control characters
/// replaced: for repeating a received value in a log line or an error.
pub fn quote(s: &str) -> String {
    let mut out: String =
        s.chars().take(MAX_QUOTED).map(|c| if c.is_control() { ' ' } else { c }).collect();
    if s.chars().nth(MAX_QUOTED).is_some() {
        out.push('…');
    }
    out
}

/// A command from the coordinator to a participant, sent as a core NATS request on
/// `saga.cmd.<service>.<command>` with the reply subject
/// `saga.reply.<replica>.<service>.<saga-id>.<step>.<a|c>.<attempt>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandMessage {
    /// Protocol version.
    pub v: u16,
    /// The saga instance.
    pub saga_id: SagaId,
    /// The saga definition's name.
    pub saga: SagaName,
    /// The step.
    pub step: StepName,
    /// `action` or `compensation`.
    pub phase: Phase,
    /// The attempt, from 1.
    pub attempt: u32,
    /// The participant service.
    pub service: ServiceName,
    /// The command.
    pub command: CommandName,
    /// When the attempt times out (ms since the epoch): the participant does not start the
    /// handler after it, stops waiting for the handler at it, and its claim on the effect
    /// lapses then.
    pub deadline: Timestamp,
    /// The saga's input (MessagePack bytes).
    pub input: Payload,
    /// Outputs of the steps this step runs after, by step name (MessagePack bytes each).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub deps: BTreeMap<StepName, Payload>,
    /// For a compensation: the action's output, if the coordinator saw it succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Payload>,
    /// No other delivery of this effect can be running or have run: the participant runs the
    /// handler without claiming the effect first, and records its outcome after replying.
    /// Set only on the first send of an action's first attempt.
    #[serde(default, skip_serializing_if = "is_false")]
    pub exclusive: bool,
}

impl CommandMessage {
    /// The message for a dispatch effect of saga `saga_id` (of definition `saga`).
    pub fn from_dispatch(saga_id: &SagaId, saga: &SagaName, d: &Dispatch) -> Self {
        CommandMessage {
            v: PROTOCOL_VERSION,
            saga_id: saga_id.clone(),
            saga: saga.clone(),
            step: d.step.clone(),
            phase: d.phase,
            attempt: d.attempt,
            service: d.service.clone(),
            command: d.command.clone(),
            deadline: d.deadline,
            input: d.input.clone(),
            deps: d.deps.clone(),
            output: d.output.clone(),
            exclusive: d.exclusive,
        }
    }

    /// The command's deterministic id (`<saga-id>.<step>.<a|c>.<attempt>`).
    pub fn command_id(&self) -> CommandId {
        CommandId::new(&self.saga_id, &self.step, self.phase, self.attempt)
    }

    /// The participant's effect key (`<saga-id>.<step>.<a|c>`).
    pub fn effect_key(&self) -> String {
        CommandId::effect_key(&self.saga_id, &self.step, self.phase)
    }
}

/// How a command ended, as a participant reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReplyOutcome {
    /// It succeeded, with an output (MessagePack bytes; empty for a compensation).
    Success {
        /// The output.
        output: Payload,
    },
    /// It failed.
    Failure {
        /// Why, in words.
        reason: String,
        /// `true`: a transient error, worth retrying. `false`: a business failure.
        transient: bool,
    },
}

/// A participant's reply to a command, published on the command's reply subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyMessage {
    /// Protocol version.
    pub v: u16,
    /// The saga instance.
    pub saga_id: SagaId,
    /// The step.
    pub step: StepName,
    /// `action` or `compensation`.
    pub phase: Phase,
    /// The attempt answered.
    pub attempt: u32,
    /// The service that ran it.
    pub service: ServiceName,
    /// The command it ran: the coordinator checks it is the one the step's phase sends.
    pub command: CommandName,
    /// How it ended.
    pub outcome: ReplyOutcome,
}

impl ReplyMessage {
    /// A reply to `cmd` with `outcome`.
    pub fn to(cmd: &CommandMessage, outcome: ReplyOutcome) -> Self {
        ReplyMessage {
            v: PROTOCOL_VERSION,
            saga_id: cmd.saga_id.clone(),
            step: cmd.step.clone(),
            phase: cmd.phase,
            attempt: cmd.attempt,
            service: cmd.service.clone(),
            command: cmd.command.clone(),
            outcome,
        }
    }

    /// The state-machine event this reply stands for.
    pub fn to_event(&self) -> Event {
        let step = self.step.clone();
        let attempt = self.attempt;
        match (self.phase, &self.outcome) {
            (Phase::Action, ReplyOutcome::Success { output }) => {
                Event::StepSucceeded { step, attempt, output: output.clone() }
            }
            (Phase::Action, ReplyOutcome::Failure { reason, transient }) => {
                Event::StepFailed { step, attempt, reason: reason.clone(), transient: *transient }
            }
            (Phase::Compensation, ReplyOutcome::Success { .. }) => {
                Event::CompensationSucceeded { step, attempt }
            }
            (Phase::Compensation, ReplyOutcome::Failure { reason, transient }) => {
                Event::CompensationFailed {
                    step,
                    attempt,
                    reason: reason.clone(),
                    transient: *transient,
                }
            }
        }
    }
}

/// A request to start a saga (client to coordinator), on `saga.in.<id>.<saga>.start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartMessage {
    /// Protocol version.
    pub v: u16,
    /// The new saga's id.
    pub saga_id: SagaId,
    /// The definition's name.
    pub saga: SagaName,
    /// The definition version (digest) to run.
    pub digest: String,
    /// The saga's input (MessagePack bytes).
    pub input: Payload,
    /// The key the id derives from (`saga_id` is [`SagaId::for_key`] of `saga` and `key`):
    /// the caller's idempotency key, or a random one.
    pub key: String,
}

/// What an operator (or a client cancelling) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorAction {
    /// Cancel: compensate what is done.
    Cancel,
    /// Retry stuck compensations.
    Retry,
    /// Skip stuck compensations.
    Skip,
    /// Mark resolved.
    Resolve,
}

impl OperatorAction {
    /// Every action.
    pub const ALL: [OperatorAction; 4] = [
        OperatorAction::Cancel,
        OperatorAction::Retry,
        OperatorAction::Skip,
        OperatorAction::Resolve,
    ];

    /// The action named by a word (`cancel`, `retry`, `skip`, `resolve`).
    pub fn parse(word: &str) -> Option<OperatorAction> {
        OperatorAction::ALL.into_iter().find(|a| a.as_str() == word)
    }

    /// The action as a word.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorAction::Cancel => "cancel",
            OperatorAction::Retry => "retry",
            OperatorAction::Skip => "skip",
            OperatorAction::Resolve => "resolve",
        }
    }
}

/// An operator action on a saga (client to coordinator), on
/// `saga.in.<id>.<saga>.op.<operator>`: the subject names the operator, so NATS permissions
/// decide who may act and the history records who did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorMessage {
    /// Protocol version.
    pub v: u16,
    /// The saga.
    pub saga_id: SagaId,
    /// What to do.
    pub action: OperatorAction,
    /// Why (recorded in the saga's timeline).
    pub reason: String,
}

impl OperatorMessage {
    /// The state-machine event this action stands for, asked by operator `by` (the operator
    /// token of the subject it arrived on).
    pub fn to_event(&self, by: &str) -> Event {
        let reason = self.reason.clone();
        let by = Some(by.to_owned());
        match self.action {
            OperatorAction::Cancel => Event::Cancel { reason, by },
            OperatorAction::Retry => Event::OperatorRetry { reason, by },
            OperatorAction::Skip => Event::OperatorSkip { reason, by },
            OperatorAction::Resolve => Event::OperatorResolve { reason, by },
        }
    }
}

/// A domain event an await step waits for, kept by the coordinator under the correlation it
/// carries (`saga.await.<spec>.<value>`, the newest one per subject): what a saga that
/// reaches its await step finds, even when the event came first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArrivalMessage {
    /// Protocol version.
    pub v: u16,
    /// The event's subject (`domain.…`).
    pub subject: String,
    /// Its sequence in `DOMAIN_EVENTS`.
    pub seq: u64,
    /// When `DOMAIN_EVENTS` stored it.
    pub at: Timestamp,
    /// Its payload (MessagePack): the await step's output.
    pub payload: Payload,
}

/// A signal to one saga, on `saga.signal.<id>.<saga>.<name>` (the newest one per subject is
/// kept until the saga's log expires): completes an await step waiting for `name`, now or
/// when the saga gets there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalMessage {
    /// Protocol version.
    pub v: u16,
    /// The saga.
    pub saga_id: SagaId,
    /// The signal's name.
    pub name: String,
    /// Its payload (MessagePack): the await step's output.
    pub payload: Payload,
}

/// A lifecycle event of one transition: what services that follow sagas react to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleNote {
    /// What happened.
    pub kind: LifecycleKind,
    /// The step concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepName>,
    /// A reason, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One record of a saga's log (`saga.log.<id>.<saga>.<kind>`): written by the coordinator for
/// each recorded transition, compare-and-swap fenced over all of the saga's log subjects.
/// The newest record holds everything needed to resume the saga; the records in order hold
/// its whole timeline. The subject's last token is [`LogRecord::headline`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Protocol version.
    pub v: u16,
    /// The saga after the transition.
    pub snapshot: SagaSnapshot,
    /// The timeline entries since the previous record.
    pub timeline: Vec<TimelineEntry>,
    /// The lifecycle events since the previous record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<LifecycleNote>,
    /// The saga's W3C trace context (`traceparent`), from the request that started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

impl LifecycleNote {
    /// The lifecycle events among a transition's effects, in order.
    pub fn of(effects: &[crate::Effect]) -> Vec<LifecycleNote> {
        effects
            .iter()
            .filter_map(|e| match e {
                crate::Effect::Publish { kind, step, reason } => {
                    Some(LifecycleNote { kind: *kind, step: step.clone(), reason: reason.clone() })
                }
                _ => None,
            })
            .collect()
    }
}

/// The most significant of a record's lifecycle events, named in its subject so that
/// followers can filter on it: a terminal event, else needs-intervention, compensating, a
/// failed step, started, a compensated step, a succeeded step; `updated` when none.
pub fn headline(events: &[LifecycleNote]) -> &'static str {
    fn rank(k: LifecycleKind) -> u8 {
        match k {
            LifecycleKind::Completed
            | LifecycleKind::Compensated
            | LifecycleKind::Cancelled
            | LifecycleKind::Resolved => 7,
            LifecycleKind::NeedsIntervention => 6,
            LifecycleKind::Compensating => 5,
            LifecycleKind::StepFailed => 4,
            LifecycleKind::Started => 3,
            LifecycleKind::StepCompensated => 2,
            LifecycleKind::StepSucceeded => 1,
        }
    }
    events.iter().map(|e| e.kind).max_by_key(|k| rank(*k)).map_or("updated", LifecycleKind::as_str)
}

impl LogRecord {
    /// The subject token naming this record's most significant lifecycle event.
    pub fn headline(&self) -> &'static str {
        headline(&self.events)
    }
}

/// Whether a number field holds its default (0), which the encoder then leaves out.
pub(crate) fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Whether a flag holds its default (`false`), which the encoder then leaves out.
pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

/// What a participant records for an effect key (`<saga-id>.<step>.<a|c>`) in its own bucket
/// `saga_fx_<service>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum EffectRecord {
    /// A handler is running attempt `attempt` until `until` (ms since the epoch): the
    /// command's deadline. After it the claim has lapsed: the handler may have partly run.
    InProgress {
        /// When the claim lapses.
        until: u64,
        /// The attempt that holds it.
        #[serde(default)]
        attempt: u32,
    },
    /// It ran; this is its reply.
    Done {
        /// How it ended.
        outcome: ReplyOutcome,
        /// The attempt that ran it.
        #[serde(default)]
        attempt: u32,
    },
    /// Attempt `attempt` failed transiently (or, for a compensation, failed): a later copy of
    /// that attempt gets the same answer without running; a later attempt takes the key over.
    Failed {
        /// The attempt that failed.
        attempt: u32,
        /// Its reason.
        reason: String,
        /// Whether the failure was transient, as its reply said (a compensation's business
        /// failure is recorded here too, with `false`). A missing flag reads as `true`.
        #[serde(default = "transient_by_default")]
        transient: bool,
    },
    /// The action must never run: its compensation came first (`lapsed: false`: the action
    /// never ran, the compensation is a no-op), or took over the action's lapsed claim
    /// (`lapsed: true`: the action may have partly run, so every compensation attempt
    /// compensates for real).
    Barrier {
        /// Whether it was written over a lapsed claim of the action.
        #[serde(default)]
        lapsed: bool,
    },
}

fn transient_by_default() -> bool {
    true
}

/// Why a message could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The message is empty.
    #[error("{what}: empty message")]
    Empty {
        /// The message type expected.
        what: &'static str,
    },
    /// The message is larger than the limit.
    #[error("{what}: {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The message type.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The message carries a protocol version this build does not speak.
    #[error("{what}: protocol version {found} is not supported (this build speaks {supported})")]
    UnsupportedVersion {
        /// The message type.
        what: &'static str,
        /// The version found.
        found: u16,
        /// The version supported.
        supported: u16,
    },
    /// The bytes are not a valid message of this type.
    #[error("{what}: malformed MessagePack: {detail}")]
    Malformed {
        /// The message type expected.
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },
    /// A field holds a value the protocol does not allow.
    #[error("{what}: field {field} {value:?} {problem}")]
    BadField {
        /// The message type.
        what: &'static str,
        /// The field.
        field: &'static str,
        /// The value, quoted and cut to [`MAX_QUOTED`] characters.
        value: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The value could not be encoded.
    #[error("{what}: cannot encode: {detail}")]
    Encode {
        /// The message type.
        what: &'static str,
        /// The encoder's message.
        detail: String,
    },
}

/// A message type of the protocol: carries a version, a name for errors, and checks its
/// identifiers.
pub trait WireMessage: Serialize + DeserializeOwned {
    /// The type's name in errors (`command`, `reply`…).
    const WHAT: &'static str;
    /// The message's protocol version.
    fn version(&self) -> u16;
    /// Checks every identifier in the body.
    fn check(&self) -> Result<(), CodecError> {
        Ok(())
    }
}

fn token(what: &'static str, field: &'static str, value: &str) -> Result<(), CodecError> {
    check_token(value).map_err(|e: TokenError| CodecError::BadField {
        what,
        field,
        value: quote(value),
        problem: e.to_string(),
    })
}

impl WireMessage for CommandMessage {
    const WHAT: &'static str = "command";
    fn version(&self) -> u16 {
        self.v
    }
    fn check(&self) -> Result<(), CodecError> {
        token(Self::WHAT, "saga_id", self.saga_id.as_str())?;
        token(Self::WHAT, "saga", self.saga.as_str())?;
        token(Self::WHAT, "step", self.step.as_str())?;
        token(Self::WHAT, "service", self.service.as_str())?;
        token(Self::WHAT, "command", self.command.as_str())?;
        for step in self.deps.keys() {
            token(Self::WHAT, "deps", step.as_str())?;
        }
        Ok(())
    }
}

impl WireMessage for ReplyMessage {
    const WHAT: &'static str = "reply";
    fn version(&self) -> u16 {
        self.v
    }
    fn check(&self) -> Result<(), CodecError> {
        token(Self::WHAT, "saga_id", self.saga_id.as_str())?;
        token(Self::WHAT, "step", self.step.as_str())?;
        token(Self::WHAT, "service", self.service.as_str())?;
        token(Self::WHAT, "command", self.command.as_str())
    }
}

impl WireMessage for StartMessage {
    const WHAT: &'static str = "start";
    fn version(&self) -> u16 {
        self.v
    }
    fn check(&self) -> Result<(), CodecError> {
        token(Self::WHAT, "saga_id", self.saga_id.as_str())?;
        token(Self::WHAT, "saga", self.saga.as_str())?;
        if self.digest.len() != 32 || !self.digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CodecError::BadField {
                what: Self::WHAT,
                field: "digest",
                value: quote(&self.digest),
                problem: "is not a definition digest (32 hexadecimal digits)".into(),
            });
        }
        if self.key.is_empty() || self.key.len() > MAX_KEY_LEN {
            return Err(CodecError::BadField {
                what: Self::WHAT,
                field: "key",
                value: quote(&self.key),
                problem: format!("must be 1 to {MAX_KEY_LEN} bytes long"),
            });
        }
        if self.saga_id != SagaId::for_key(&self.saga, &self.key) {
            return Err(CodecError::BadField {
                what: Self::WHAT,
                field: "saga_id",
                value: quote(self.saga_id.as_str()),
                problem: format!(
                    "is not the id of a saga {} started with this key (the first 16 bytes of SHA-256 over the saga name, a zero byte and the key)",
                    self.saga
                ),
            });
        }
        Ok(())
    }
}

impl WireMessage for OperatorMessage {
    const WHAT: &'static str = "operator action";
    fn version(&self) -> u16 {
        self.v
    }
    fn check(&self) -> Result<(), CodecError> {
        token(Self::WHAT, "saga_id", self.saga_id.as_str())
    }
}

impl WireMessage for ArrivalMessage {
    const WHAT: &'static str = "arrival";
    fn version(&self) -> u16 {
        self.v
    }
}

impl WireMessage for SignalMessage {
    const WHAT: &'static str = "signal";
    fn version(&self) -> u16 {
        self.v
    }
    fn check(&self) -> Result<(), CodecError> {
        token(Self::WHAT, "saga_id", self.saga_id.as_str())?;
        token(Self::WHAT, "name", &self.name)
    }
}

impl WireMessage for LogRecord {
    const WHAT: &'static str = "saga log record";
    fn version(&self) -> u16 {
        self.v
    }
    fn check(&self) -> Result<(), CodecError> {
        token(Self::WHAT, "snapshot.id", self.snapshot.id.as_str())?;
        token(Self::WHAT, "snapshot.saga", self.snapshot.saga.as_str())
    }
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u16,
}

/// Encodes and decodes protocol messages with a size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    /// The largest message, in bytes, accepted or produced.
    pub max_size: usize,
}

impl Default for Codec {
    fn default() -> Self {
        Codec { max_size: DEFAULT_MAX_MESSAGE_SIZE }
    }
}

impl Codec {
    /// A codec with the given size limit.
    pub fn with_max_size(max_size: usize) -> Self {
        Codec { max_size }
    }

    /// Encodes a protocol message.
    pub fn encode<T: WireMessage>(&self, msg: &T) -> Result<Vec<u8>, CodecError> {
        self.encode_value(T::WHAT, msg)
    }

    /// Decodes a protocol message, checking size, version and identifiers.
    pub fn decode<T: WireMessage>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let what = T::WHAT;
        let msg: T = self.decode_value(what, bytes).map_err(|e| match e {
            // A message of another version may fail to decode: say so rather than "malformed".
            CodecError::Malformed { .. } => match decode_nested::<VersionProbe>(bytes) {
                Ok(p) if p.v != PROTOCOL_VERSION => {
                    CodecError::UnsupportedVersion { what, found: p.v, supported: PROTOCOL_VERSION }
                }
                _ => e,
            },
            other => other,
        })?;
        if msg.version() != PROTOCOL_VERSION {
            return Err(CodecError::UnsupportedVersion {
                what,
                found: msg.version(),
                supported: PROTOCOL_VERSION,
            });
        }
        msg.check()?;
        Ok(msg)
    }

    /// Encodes any serde value as named-field MessagePack, within the size limit.
    pub fn encode_value<T: Serialize + ?Sized>(
        &self,
        what: &'static str,
        value: &T,
    ) -> Result<Vec<u8>, CodecError> {
        let bytes = rmp_serde::to_vec_named(value)
            .map_err(|e| CodecError::Encode { what, detail: e.to_string() })?;
        if bytes.len() > self.max_size {
            return Err(CodecError::TooLarge { what, size: bytes.len(), limit: self.max_size });
        }
        Ok(bytes)
    }

    /// Decodes any serde value from MessagePack, within the size limit.
    pub fn decode_value<T: DeserializeOwned>(
        &self,
        what: &'static str,
        bytes: &[u8],
    ) -> Result<T, CodecError> {
        if bytes.is_empty() {
            return Err(CodecError::Empty { what });
        }
        if bytes.len() > self.max_size {
            return Err(CodecError::TooLarge { what, size: bytes.len(), limit: self.max_size });
        }
        decode_nested(bytes).map_err(|e| CodecError::Malformed { what, detail: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_cuts_and_cleans() {
        assert_eq!(quote("a\nb"), "a b");
        let long = "x".repeat(500);
        let q = quote(&long);
        assert_eq!(q.chars().count(), MAX_QUOTED + 1);
        assert!(q.ends_with('…'));
    }

    /// `{"v": 2, …fields of op…, "x": [[[…]]]}`: a message with an extra field nested
    /// `depth` deep, which a decoder skips by recursion.
    fn with_deep_extra_field(op: &OperatorMessage, depth: usize) -> Vec<u8> {
        let mut bytes = rmp_serde::to_vec_named(op).unwrap();
        assert_eq!(bytes[0], 0x84, "a map of 4 fields");
        bytes[0] = 0x85;
        bytes.extend([0xa1, b'x']);
        bytes.extend(std::iter::repeat_n(0x91, depth));
        bytes.push(0xc0);
        bytes
    }

    #[test]
    fn a_failed_effect_record_without_its_flag_reads_as_transient() {
        #[derive(Serialize)]
        struct Old<'a> {
            state: &'a str,
            attempt: u32,
            reason: &'a str,
        }
        let old =
            rmp_serde::to_vec_named(&Old { state: "failed", attempt: 2, reason: "r" }).unwrap();
        let record: EffectRecord = decode_nested(&old).unwrap();
        assert_eq!(
            record,
            EffectRecord::Failed { attempt: 2, reason: "r".into(), transient: true }
        );
        let business = EffectRecord::Failed { attempt: 1, reason: "no".into(), transient: false };
        let bytes = rmp_serde::to_vec_named(&business).unwrap();
        assert_eq!(decode_nested::<EffectRecord>(&bytes).unwrap(), business);
    }

    #[test]
    fn hostile_nesting_is_refused_with_a_clear_error_not_a_stack_overflow() {
        let codec = Codec::default();
        let op = OperatorMessage {
            v: PROTOCOL_VERSION,
            saga_id: SagaId::from("s-1"),
            action: OperatorAction::Cancel,
            reason: "r".into(),
        };
        let fine = codec.decode::<OperatorMessage>(&with_deep_extra_field(&op, 8)).unwrap();
        assert_eq!(fine, op);
        let err =
            codec.decode::<OperatorMessage>(&with_deep_extra_field(&op, 200_000)).unwrap_err();
        assert!(err.to_string().contains("depth limit exceeded"), "{err}");
        let deep: Vec<u8> = std::iter::repeat_n(0x91, 200_000).chain([0xc0]).collect();
        assert!(crate::correlation_value(&deep, "").is_none());
        assert!(codec.decode_value::<serde_json::Value>("input", &deep).is_err());
    }

    #[test]
    fn bodies_with_bad_tokens_are_refused() {
        let codec = Codec::default();
        let op = OperatorMessage {
            v: PROTOCOL_VERSION,
            saga_id: SagaId::new_unchecked(">"),
            action: OperatorAction::Cancel,
            reason: "r".into(),
        };
        let bytes = codec.encode(&op).unwrap();
        let err = codec.decode::<OperatorMessage>(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::BadField { field: "saga_id", .. }), "{err}");
    }

    #[test]
    fn other_versions_are_named() {
        let codec = Codec::default();
        let op = OperatorMessage {
            v: 1,
            saga_id: SagaId::new_unchecked("a"),
            action: OperatorAction::Cancel,
            reason: "r".into(),
        };
        let bytes = codec.encode(&op).unwrap();
        let err = codec.decode::<OperatorMessage>(&bytes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "operator action: protocol version 1 is not supported (this build speaks 2)"
        );
    }

    #[test]
    fn headline_prefers_terminal_events() {
        let n = |kind| LifecycleNote { kind, step: None, reason: None };
        assert_eq!(headline(&[]), "updated");
        assert_eq!(
            headline(&[n(LifecycleKind::Started), n(LifecycleKind::StepSucceeded)]),
            "started"
        );
        assert_eq!(
            headline(&[n(LifecycleKind::StepSucceeded), n(LifecycleKind::Completed)]),
            "completed"
        );
    }
}
