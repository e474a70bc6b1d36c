//! The wire messages and their codec.
//!
//! Every message is a MessagePack map with named fields (so fields can be added without
//! breaking older readers) and a protocol version `v`. `docs/PROTOCOL.md` describes each one
//! field by field.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ids::{
    CommandId, CommandName, Phase, SagaId, SagaName, ServiceName, StepName, Timestamp,
};
use crate::machine::{Dispatch, Event, LifecycleKind, Payload, SagaStatus, Timer};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// The default largest message accepted or produced: 1 MiB (the default `max_payload` of
/// nats-server).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// A command from the coordinator to a participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandMessage {
    /// Protocol version.
    pub v: u16,
    /// The saga instance.
    pub saga_id: SagaId,
    /// The saga definition's name.
    pub saga: SagaName,
    /// The command's deterministic id (`<saga-id>.<step>.<a|c>.<attempt>`).
    pub command_id: CommandId,
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
    /// When the attempt times out (ms since the epoch); a reply after it may be ignored.
    pub deadline: Timestamp,
    /// The saga's input (MessagePack bytes).
    pub input: Payload,
    /// Outputs of the steps this step runs after, by step name (MessagePack bytes each).
    pub deps: BTreeMap<StepName, Payload>,
    /// For a compensation: the action's output, if it succeeded.
    #[serde(default)]
    pub output: Option<Payload>,
}

impl CommandMessage {
    /// The message for a dispatch effect of saga `saga_id` (of definition `saga`).
    pub fn from_dispatch(saga_id: &SagaId, saga: &SagaName, d: &Dispatch) -> Self {
        CommandMessage {
            v: PROTOCOL_VERSION,
            saga_id: saga_id.clone(),
            saga: saga.clone(),
            command_id: d.command_id.clone(),
            step: d.step.clone(),
            phase: d.phase,
            attempt: d.attempt,
            service: d.service.clone(),
            command: d.command.clone(),
            deadline: d.deadline,
            input: d.input.clone(),
            deps: d.deps.clone(),
            output: d.output.clone(),
        }
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

/// A participant's reply to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyMessage {
    /// Protocol version.
    pub v: u16,
    /// The saga instance.
    pub saga_id: SagaId,
    /// The command answered.
    pub command_id: CommandId,
    /// The step.
    pub step: StepName,
    /// `action` or `compensation`.
    pub phase: Phase,
    /// The attempt answered.
    pub attempt: u32,
    /// How it ended.
    pub outcome: ReplyOutcome,
}

impl ReplyMessage {
    /// A reply to `cmd` with `outcome`.
    pub fn to(cmd: &CommandMessage, outcome: ReplyOutcome) -> Self {
        ReplyMessage {
            v: PROTOCOL_VERSION,
            saga_id: cmd.saga_id.clone(),
            command_id: cmd.command_id.clone(),
            step: cmd.step.clone(),
            phase: cmd.phase,
            attempt: cmd.attempt,
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
            (Phase::Compensation, ReplyOutcome::Failure { reason, .. }) => {
                Event::CompensationFailed { step, attempt, reason: reason.clone() }
            }
        }
    }
}

/// A saga lifecycle event, for services that follow sagas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleMessage {
    /// Protocol version.
    pub v: u16,
    /// The saga instance.
    pub saga_id: SagaId,
    /// The saga definition's name.
    pub saga: SagaName,
    /// What happened.
    pub kind: LifecycleKind,
    /// The saga's status after it happened.
    pub status: SagaStatus,
    /// The step concerned, if any.
    #[serde(default)]
    pub step: Option<StepName>,
    /// A reason, if any.
    #[serde(default)]
    pub reason: Option<String>,
    /// When (ms since the epoch).
    pub at: Timestamp,
    /// The saga's input (MessagePack bytes), on `started` and terminal events.
    #[serde(default)]
    pub input: Option<Payload>,
}

/// A request to start a saga (client to coordinator).
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
    /// The idempotency key the id was derived from, if any.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// A fired timer (the scheduler to the coordinator).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimerMessage {
    /// Protocol version.
    pub v: u16,
    /// The saga.
    pub saga_id: SagaId,
    /// The timer.
    pub timer: Timer,
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

/// An operator action on a saga (client to coordinator).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorMessage {
    /// Protocol version.
    pub v: u16,
    /// The saga.
    pub saga_id: SagaId,
    /// What to do.
    pub action: OperatorAction,
    /// Why (recorded in the saga's history).
    pub reason: String,
    /// Who asked (recorded in the saga's history).
    #[serde(default)]
    pub by: Option<String>,
}

impl OperatorMessage {
    /// The state-machine event this action stands for.
    pub fn to_event(&self) -> Event {
        let reason = match &self.by {
            Some(by) => format!("{} (by {by})", self.reason),
            None => self.reason.clone(),
        };
        match self.action {
            OperatorAction::Cancel => Event::Cancel { reason },
            OperatorAction::Retry => Event::OperatorRetry { reason },
            OperatorAction::Skip => Event::OperatorSkip { reason },
            OperatorAction::Resolve => Event::OperatorResolve { reason },
        }
    }
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
    /// The value could not be encoded.
    #[error("{what}: cannot encode: {detail}")]
    Encode {
        /// The message type.
        what: &'static str,
        /// The encoder's message.
        detail: String,
    },
}

/// A message type of the protocol: carries a version and a name for errors.
pub trait WireMessage: Serialize + DeserializeOwned {
    /// The type's name in errors (`command`, `reply`…).
    const WHAT: &'static str;
    /// The message's protocol version.
    fn version(&self) -> u16;
}

impl WireMessage for CommandMessage {
    const WHAT: &'static str = "command";
    fn version(&self) -> u16 {
        self.v
    }
}
impl WireMessage for ReplyMessage {
    const WHAT: &'static str = "reply";
    fn version(&self) -> u16 {
        self.v
    }
}
impl WireMessage for LifecycleMessage {
    const WHAT: &'static str = "lifecycle event";
    fn version(&self) -> u16 {
        self.v
    }
}

impl WireMessage for StartMessage {
    const WHAT: &'static str = "start";
    fn version(&self) -> u16 {
        self.v
    }
}
impl WireMessage for TimerMessage {
    const WHAT: &'static str = "timer";
    fn version(&self) -> u16 {
        self.v
    }
}
impl WireMessage for OperatorMessage {
    const WHAT: &'static str = "operator action";
    fn version(&self) -> u16 {
        self.v
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

    /// Decodes a protocol message, checking size and version.
    pub fn decode<T: WireMessage>(&self, bytes: &[u8]) -> Result<T, CodecError> {
        let what = T::WHAT;
        let msg: T = self.decode_value(what, bytes).map_err(|e| match e {
            // A message of another version may fail to decode: say so rather than "malformed".
            CodecError::Malformed { .. } => match rmp_serde::from_slice::<VersionProbe>(bytes) {
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
        rmp_serde::from_slice(bytes)
            .map_err(|e| CodecError::Malformed { what, detail: e.to_string() })
    }
}
