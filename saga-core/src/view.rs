//! The public, versioned views of a saga: its [`SagaSnapshot`] and its typed timeline.
//!
//! The state machine ([`SagaState`](crate::SagaState)) keeps its fields private so that it can
//! change freely; these types are what clients, tools and other languages read, and what the
//! coordinator stores. They are plain data with named fields: a reader that does not know a
//! field added later ignores it. [`VIEW_VERSION`] changes when a field changes meaning.

use serde::{Deserialize, Serialize};

use crate::ids::{CommandName, Phase, SagaId, SagaName, ServiceName, StepName, Timestamp};
use crate::machine::{Cause, Payload, SagaStatus, StepStatus};

/// The version of the view types in this module, carried in [`SagaSnapshot::v`].
pub const VIEW_VERSION: u16 = 2;

/// A saga's state as clients, tools and other languages read it (also what the coordinator
/// stores). [`SagaState::snapshot`](crate::SagaState::snapshot) takes one;
/// [`SagaState::from_snapshot`](crate::SagaState::from_snapshot) rebuilds the machine from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaSnapshot {
    /// The view version, [`VIEW_VERSION`].
    pub v: u16,
    /// The instance id.
    pub id: SagaId,
    /// The definition's name.
    pub saga: SagaName,
    /// The definition version (digest) the instance runs.
    pub digest: String,
    /// Where the saga is.
    pub status: SagaStatus,
    /// The saga's input (MessagePack bytes).
    pub input: Payload,
    /// Each step, in definition order.
    pub steps: Vec<StepSnapshot>,
    /// Why the saga is compensating, once it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// When the saga started (ms since the epoch; 0 before the start).
    pub started_at: Timestamp,
    /// When the saga last changed.
    pub updated_at: Timestamp,
    /// How many events the saga accepted so far.
    pub events: u64,
}

/// One step of a [`SagaSnapshot`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSnapshot {
    /// The step's name.
    pub name: StepName,
    /// Where the step is.
    pub status: StepStatus,
    /// The action's latest attempt number (0: never dispatched).
    pub attempt: u32,
    /// The compensation's latest attempt number (0: never dispatched).
    #[serde(default, skip_serializing_if = "crate::wire::is_zero")]
    pub comp_attempt: u32,
    /// Compensation attempts before this number were made before an operator's retry; the
    /// compensation's retry budget counts from here.
    #[serde(default, skip_serializing_if = "crate::wire::is_zero")]
    pub comp_budget_from: u32,
    /// Some action attempt timed out, so the action's outcome is unknown.
    #[serde(default, skip_serializing_if = "crate::wire::is_false")]
    pub timed_out: bool,
    /// When the step's pending timer (timeout, backoff or redelivery) fires, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer_at: Option<Timestamp>,
    /// The action's output (MessagePack bytes), once it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Payload>,
    /// The latest failure reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Consecutive sends of the current attempt that found no responder (0: none pending).
    #[serde(default, skip_serializing_if = "crate::wire::is_zero")]
    pub undelivered: u32,
    /// The current attempt found no responder and waits to be sent again at `timer_at`
    /// (`false` once it was sent again, even if `undelivered` is still above 0).
    #[serde(default, skip_serializing_if = "crate::wire::is_false")]
    pub awaiting_redelivery: bool,
    /// The attempt in flight was sent unclaimed (exclusive): a driver that takes the saga
    /// over sends it again only after its deadline has passed.
    #[serde(default, skip_serializing_if = "crate::wire::is_false")]
    pub exclusive: bool,
}

/// One entry of a saga's typed timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// When (ms since the epoch).
    pub at: Timestamp,
    /// What happened.
    pub event: TimelineEvent,
}

/// What happened to a saga. Each accepted event appends zero or more of these
/// ([`Handled::timeline`](crate::Handled::timeline)); the driver stores or publishes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum TimelineEvent {
    /// The saga started.
    Started,
    /// A command was sent: a new attempt, or the same attempt again after it found no
    /// responder.
    Dispatched {
        /// The step.
        step: StepName,
        /// Action or compensation.
        phase: Phase,
        /// The attempt (from 1).
        attempt: u32,
        /// The participant service.
        service: ServiceName,
        /// The command.
        command: CommandName,
        /// When the attempt times out.
        deadline: Timestamp,
    },
    /// An await step began waiting for a domain event or a signal.
    Awaiting {
        /// The step.
        step: StepName,
        /// What it waits for: `event payments.confirmed where order_id = "o-1"` or
        /// `signal approve`.
        waits_for: String,
        /// When it times out.
        deadline: Timestamp,
    },
    /// An await step stopped waiting because the saga began compensating.
    StoppedWaiting {
        /// The step.
        step: StepName,
    },
    /// An attempt succeeded.
    Succeeded {
        /// The step.
        step: StepName,
        /// Action or compensation.
        phase: Phase,
        /// The attempt.
        attempt: u32,
    },
    /// An attempt failed.
    Failed {
        /// The step.
        step: StepName,
        /// Action or compensation.
        phase: Phase,
        /// The attempt.
        attempt: u32,
        /// Why, as the participant said.
        reason: String,
        /// A transient error (worth retrying) rather than a business failure. A compensation
        /// is retried either way, a transient failure against the longer budget.
        transient: bool,
    },
    /// An attempt timed out.
    TimedOut {
        /// The step.
        step: StepName,
        /// Action or compensation.
        phase: Phase,
        /// The attempt.
        attempt: u32,
    },
    /// An attempt's command found no responder; the same attempt is sent again at `retry_at`.
    NotDelivered {
        /// The step.
        step: StepName,
        /// Action or compensation.
        phase: Phase,
        /// The attempt.
        attempt: u32,
        /// When it is sent again.
        retry_at: Timestamp,
    },
    /// A failed attempt will be followed by another one.
    RetryScheduled {
        /// The step.
        step: StepName,
        /// Action or compensation.
        phase: Phase,
        /// The attempt that will be sent.
        next_attempt: u32,
        /// When it will be sent.
        at: Timestamp,
    },
    /// Compensation began.
    CompensationStarted {
        /// Why.
        cause: Cause,
    },
    /// Cancellation was requested (and accepted).
    CancelRequested {
        /// The reason given.
        reason: String,
        /// Who asked, if known.
        #[serde(default)]
        by: Option<String>,
    },
    /// A compensation exhausted its retries: the saga needs an operator.
    Parked {
        /// The stuck step.
        step: StepName,
        /// Why, in words.
        reason: String,
    },
    /// An operator retried the stuck compensations.
    OperatorRetry {
        /// The reason given.
        reason: String,
        /// Who asked, if known.
        #[serde(default)]
        by: Option<String>,
    },
    /// An operator skipped the stuck compensations.
    OperatorSkip {
        /// The reason given.
        reason: String,
        /// Who asked, if known.
        #[serde(default)]
        by: Option<String>,
    },
    /// An operator marked the saga resolved.
    OperatorResolve {
        /// The reason given.
        reason: String,
        /// Who asked, if known.
        #[serde(default)]
        by: Option<String>,
    },
    /// The saga ended.
    Finished {
        /// Its terminal status.
        status: SagaStatus,
    },
}

impl TimelineEvent {
    /// The step concerned, if any.
    pub fn step(&self) -> Option<&StepName> {
        match self {
            TimelineEvent::Dispatched { step, .. }
            | TimelineEvent::Awaiting { step, .. }
            | TimelineEvent::StoppedWaiting { step }
            | TimelineEvent::Succeeded { step, .. }
            | TimelineEvent::Failed { step, .. }
            | TimelineEvent::TimedOut { step, .. }
            | TimelineEvent::NotDelivered { step, .. }
            | TimelineEvent::RetryScheduled { step, .. }
            | TimelineEvent::Parked { step, .. } => Some(step),
            TimelineEvent::Started
            | TimelineEvent::CompensationStarted { .. }
            | TimelineEvent::CancelRequested { .. }
            | TimelineEvent::OperatorRetry { .. }
            | TimelineEvent::OperatorSkip { .. }
            | TimelineEvent::OperatorResolve { .. }
            | TimelineEvent::Finished { .. } => None,
        }
    }

    /// The entry's type as written in its `type` field (`not_delivered`).
    pub fn name(&self) -> &'static str {
        match self {
            TimelineEvent::Started => "started",
            TimelineEvent::Dispatched { .. } => "dispatched",
            TimelineEvent::Awaiting { .. } => "awaiting",
            TimelineEvent::StoppedWaiting { .. } => "stopped_waiting",
            TimelineEvent::Succeeded { .. } => "succeeded",
            TimelineEvent::Failed { .. } => "failed",
            TimelineEvent::TimedOut { .. } => "timed_out",
            TimelineEvent::NotDelivered { .. } => "not_delivered",
            TimelineEvent::RetryScheduled { .. } => "retry_scheduled",
            TimelineEvent::CompensationStarted { .. } => "compensation_started",
            TimelineEvent::CancelRequested { .. } => "cancel_requested",
            TimelineEvent::Parked { .. } => "parked",
            TimelineEvent::OperatorRetry { .. } => "operator_retry",
            TimelineEvent::OperatorSkip { .. } => "operator_skip",
            TimelineEvent::OperatorResolve { .. } => "operator_resolve",
            TimelineEvent::Finished { .. } => "finished",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_serialized_type() {
        let events = [
            TimelineEvent::Started,
            TimelineEvent::Dispatched {
                step: "s".into(),
                phase: Phase::Action,
                attempt: 1,
                service: "svc".into(),
                command: "do".into(),
                deadline: Timestamp(5),
            },
            TimelineEvent::Awaiting {
                step: "s".into(),
                waits_for: "signal go".into(),
                deadline: Timestamp(9),
            },
            TimelineEvent::StoppedWaiting { step: "s".into() },
            TimelineEvent::Succeeded { step: "s".into(), phase: Phase::Action, attempt: 1 },
            TimelineEvent::Failed {
                step: "s".into(),
                phase: Phase::Compensation,
                attempt: 2,
                reason: "no".into(),
                transient: true,
            },
            TimelineEvent::TimedOut { step: "s".into(), phase: Phase::Action, attempt: 1 },
            TimelineEvent::NotDelivered {
                step: "s".into(),
                phase: Phase::Action,
                attempt: 1,
                retry_at: Timestamp(500),
            },
            TimelineEvent::RetryScheduled {
                step: "s".into(),
                phase: Phase::Action,
                next_attempt: 2,
                at: Timestamp(100),
            },
            TimelineEvent::CompensationStarted {
                cause: Cause::Cancelled { reason: "changed my mind".into() },
            },
            TimelineEvent::CancelRequested { reason: "r".into(), by: Some("ann".into()) },
            TimelineEvent::Parked { step: "s".into(), reason: "stuck".into() },
            TimelineEvent::OperatorRetry { reason: "r".into(), by: None },
            TimelineEvent::OperatorSkip { reason: "r".into(), by: None },
            TimelineEvent::OperatorResolve { reason: "r".into(), by: None },
            TimelineEvent::Finished { status: SagaStatus::Cancelled },
        ];
        for event in events {
            let json = serde_json::to_value(&event).unwrap();
            assert_eq!(json["type"], event.name(), "{json}");
            let back: TimelineEvent = serde_json::from_value(json.clone()).unwrap();
            assert_eq!(back, event);
            assert_eq!(event.step().is_some(), json.get("step").is_some(), "{json}");
        }
    }

    #[test]
    fn who_asked_may_be_left_out() {
        let event: TimelineEvent =
            serde_json::from_str(r#"{"type":"cancel_requested","reason":"r"}"#).unwrap();
        assert_eq!(event, TimelineEvent::CancelRequested { reason: "r".into(), by: None });
    }
}
