//! The saga instance state machine: events in, effects out, no I/O.
//!
//! [`SagaState::handle`] takes the time and one [`Event`] and either accepts it, changing the
//! state and returning the [`Effect`]s the driver must carry out and the [`TimelineEntry`]s it
//! wrote, or rejects it with a [`Rejection`] that says why and changes nothing. The state is a
//! plain value with private fields; it equals the fold of the accepted events
//! ([`SagaState::replay`]) and comes back from its [`SagaSnapshot`]
//! ([`SagaState::from_snapshot`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::definition::{OnTimeout, StepKind};
use crate::ids::{
    CommandId, CommandName, Phase, SagaId, SagaName, ServiceName, StepName, Timestamp, TokenError,
};
use crate::retry::fnv1a;
use crate::validate::Plan;
use crate::view::{SagaSnapshot, StepSnapshot, TimelineEntry, TimelineEvent, VIEW_VERSION};

/// Opaque bytes: a saga's input or a step's output, MessagePack-encoded by the SDK.
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Payload(pub serde_bytes::ByteBuf);

impl Payload {
    /// Wraps bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Payload(serde_bytes::ByteBuf::from(bytes.into()))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({} bytes)", self.0.len())
    }
}

/// Where a saga instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Created, not yet started.
    New,
    /// Steps are running forward.
    Running,
    /// A step failed or the saga was cancelled; completed steps are being compensated.
    Compensating,
    /// A compensation exhausted its retries; an operator must retry, skip or resolve.
    NeedsIntervention,
    /// Every step succeeded. Terminal.
    Completed,
    /// A step failed and every completed step was compensated. Terminal.
    Compensated,
    /// Cancelled on request and every completed step was compensated. Terminal.
    Cancelled,
    /// Marked resolved by an operator from needs-intervention. Terminal.
    Resolved,
}

impl SagaStatus {
    /// Whether the saga has ended.
    pub fn is_terminal(self) -> bool {
        match self {
            SagaStatus::Completed
            | SagaStatus::Compensated
            | SagaStatus::Cancelled
            | SagaStatus::Resolved => true,
            SagaStatus::New
            | SagaStatus::Running
            | SagaStatus::Compensating
            | SagaStatus::NeedsIntervention => false,
        }
    }

    /// The status as a lowercase word (`needs_intervention`), as used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::New => "new",
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::NeedsIntervention => "needs_intervention",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Cancelled => "cancelled",
            SagaStatus::Resolved => "resolved",
        }
    }

    /// Every status, for parsing and listings.
    pub const ALL: [SagaStatus; 8] = [
        SagaStatus::New,
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::NeedsIntervention,
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::Cancelled,
        SagaStatus::Resolved,
    ];
}

impl fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not dispatched (and, once the saga fails, never will be).
    Pending,
    /// The action's current attempt is in flight.
    Running,
    /// An attempt failed or timed out; the next waits for its backoff timer.
    RetryWait,
    /// The action succeeded.
    Succeeded,
    /// The action failed (business failure, or transient failures until retries ran out). It
    /// had no effect, so it is not compensated.
    Failed,
    /// The action timed out and will not be retried, or ran with an output that could not be
    /// kept: it may have run, so it is compensated (the participant's barrier makes that safe
    /// if it never ran, and gives the compensation the output the participant recorded).
    Unknown,
    /// The compensation's current attempt is in flight.
    Compensating,
    /// A compensation attempt failed; the next waits for its backoff timer.
    CompensationRetryWait,
    /// The compensation succeeded.
    Compensated,
    /// The compensation exhausted its retries: the saga needs intervention.
    CompensationStuck,
    /// An operator skipped the compensation.
    CompensationSkipped,
}

/// Why a saga is compensating.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Cause {
    /// A step failed.
    StepFailed {
        /// The step.
        step: StepName,
        /// Its reason.
        reason: String,
    },
    /// The saga was cancelled.
    Cancelled {
        /// The reason given.
        reason: String,
    },
}

impl std::fmt::Display for Cause {
    /// `step reserve-items failed: out of stock` or `cancelled: customer asked`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::StepFailed { step, reason } => write!(f, "step {step} failed: {reason}"),
            Cause::Cancelled { reason } => write!(f, "cancelled: {reason}"),
        }
    }
}

/// One step's state inside a [`SagaState`]; clients read it as a [`StepSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct StepState {
    name: StepName,
    status: StepStatus,
    /// The action's latest attempt number (0: never dispatched).
    attempt: u32,
    /// The compensation's latest attempt number (0: never dispatched).
    comp_attempt: u32,
    /// Compensation attempts before this number were made before an operator's retry; the
    /// retry budget counts from here.
    comp_budget_from: u32,
    /// Some action attempt timed out (its outcome is unknown).
    timed_out: bool,
    /// When the step's pending timer (timeout, backoff or redelivery) fires, if it has one.
    timer_at: Option<Timestamp>,
    output: Option<Payload>,
    last_error: Option<String>,
    /// Consecutive sends of the current attempt that found no responder.
    undelivered: u32,
    /// The current attempt found no responder and waits for its redelivery timer.
    awaiting_redelivery: bool,
    /// The attempt in flight was sent unclaimed ([`Dispatch::exclusive`]).
    exclusive: bool,
}

impl StepState {
    /// The current attempt of `phase`.
    fn attempt_of(&self, phase: Phase) -> u32 {
        match phase {
            Phase::Action => self.attempt,
            Phase::Compensation => self.comp_attempt,
        }
    }

    /// Whether `attempt` of `phase` is the one in flight (sent, or waiting to be re-sent).
    fn in_flight(&self, phase: Phase, attempt: u32) -> bool {
        let status = match phase {
            Phase::Action => StepStatus::Running,
            Phase::Compensation => StepStatus::Compensating,
        };
        self.status == status && self.attempt_of(phase) == attempt
    }

    /// The timer armed for the attempt in flight: its timeout, or its redelivery.
    fn in_flight_timer(&self) -> TimerKind {
        if self.awaiting_redelivery {
            TimerKind::Redeliver
        } else {
            TimerKind::Timeout
        }
    }

    /// The attempt in flight has an answer (or is abandoned): no redelivery is pending.
    fn attempt_settled(&mut self) {
        self.undelivered = 0;
        self.awaiting_redelivery = false;
        self.exclusive = false;
    }
}

/// A timer the state machine asks for. At most one is pending per step: a step's timer is
/// replaced when the step moves on, so a driver may key timers by saga and step.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Timer {
    /// The step.
    pub step: StepName,
    /// Whose timer: the action's or the compensation's.
    pub phase: Phase,
    /// The attempt it belongs to.
    pub attempt: u32,
    /// Timeout of the attempt, end of the backoff before the next one, or redelivery.
    pub kind: TimerKind,
}

/// What a timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerKind {
    /// The attempt's time is up.
    Timeout,
    /// The backoff after a failed attempt is over: send the next one.
    Backoff,
    /// The attempt's command found no responder; send the same attempt again.
    Redeliver,
}

/// An input to the state machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Start the saga with its input.
    Start {
        /// The saga's input.
        input: Payload,
    },
    /// A step's action succeeded.
    StepSucceeded {
        /// The step.
        step: StepName,
        /// The attempt that succeeded.
        attempt: u32,
        /// Its output.
        output: Payload,
    },
    /// A step's action failed.
    StepFailed {
        /// The step.
        step: StepName,
        /// The attempt that failed.
        attempt: u32,
        /// Why.
        reason: String,
        /// `true` for a transient error (retried while attempts remain), `false` for a business
        /// failure (the step fails at once).
        transient: bool,
    },
    /// A step's action succeeded, but its output cannot be kept (too large for the saga's
    /// record): its effect happened, yet the saga cannot go on from it. A step with a
    /// compensation is compensated (its participant's barrier gives the compensation the
    /// recorded output); any other step fails as on a business failure.
    StepOutputRefused {
        /// The step.
        step: StepName,
        /// The attempt that succeeded.
        attempt: u32,
        /// Why the output was refused.
        reason: String,
    },
    /// A step's compensation succeeded.
    CompensationSucceeded {
        /// The step.
        step: StepName,
        /// The compensation attempt.
        attempt: u32,
    },
    /// A step's compensation failed.
    CompensationFailed {
        /// The step.
        step: StepName,
        /// The compensation attempt.
        attempt: u32,
        /// Why.
        reason: String,
        /// The participant says another attempt may succeed (its store had no leader, a
        /// dependency was down): it counts against the longer budget a timed-out attempt
        /// has ([`COMPENSATION_TIMEOUT_ATTEMPTS`]), since it has the same kind of cause.
        #[serde(default)]
        transient: bool,
    },
    /// The driver sent `attempt` of `step`'s `phase` and nobody was listening (NATS "no
    /// responders"). Not an attempt: the same attempt is sent again after a growing delay
    /// ([`TimerKind::Redeliver`]).
    Undelivered {
        /// The step.
        step: StepName,
        /// Action or compensation.
        phase: Phase,
        /// The attempt that was not delivered.
        attempt: u32,
    },
    /// A timer fired: a timeout, the end of a backoff, or a redelivery.
    TimerFired(Timer),
    /// Cancel the saga: compensate what is done. Refused once the pivot succeeded.
    Cancel {
        /// Why (recorded in the timeline).
        reason: String,
        /// Who asked (recorded in the timeline).
        #[serde(default)]
        by: Option<String>,
    },
    /// Operator: retry the stuck compensations.
    OperatorRetry {
        /// Why (recorded in the timeline).
        reason: String,
        /// Who asked (recorded in the timeline).
        #[serde(default)]
        by: Option<String>,
    },
    /// Operator: skip the stuck compensations and go on.
    OperatorSkip {
        /// Why (recorded in the timeline).
        reason: String,
        /// Who asked (recorded in the timeline).
        #[serde(default)]
        by: Option<String>,
    },
    /// Operator: mark the saga resolved (ends it).
    OperatorResolve {
        /// Why (recorded in the timeline).
        reason: String,
        /// Who asked (recorded in the timeline).
        #[serde(default)]
        by: Option<String>,
    },
}

impl Event {
    /// The event's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Start { .. } => "start",
            Event::StepSucceeded { .. } => "step_succeeded",
            Event::StepFailed { .. } => "step_failed",
            Event::StepOutputRefused { .. } => "step_output_refused",
            Event::CompensationSucceeded { .. } => "compensation_succeeded",
            Event::CompensationFailed { .. } => "compensation_failed",
            Event::Undelivered { .. } => "undelivered",
            Event::TimerFired(_) => "timer_fired",
            Event::Cancel { .. } => "cancel",
            Event::OperatorRetry { .. } => "operator_retry",
            Event::OperatorSkip { .. } => "operator_skip",
            Event::OperatorResolve { .. } => "operator_resolve",
        }
    }
}

/// A command to send to a participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dispatch {
    /// The command's deterministic id.
    pub command_id: CommandId,
    /// The step.
    pub step: StepName,
    /// Action or compensation.
    pub phase: Phase,
    /// The attempt (from 1).
    pub attempt: u32,
    /// The participant service.
    pub service: ServiceName,
    /// The command name.
    pub command: CommandName,
    /// When the attempt times out.
    pub deadline: Timestamp,
    /// The saga's input.
    pub input: Payload,
    /// The outputs of the steps this step runs after, by step name.
    pub deps: BTreeMap<StepName, Payload>,
    /// For a compensation: the action's own output, when it succeeded.
    pub output: Option<Payload>,
    /// No other delivery of this effect can be running or have run: the participant may run
    /// it without claiming its effect first. Only the first send of an action's first attempt
    /// is exclusive. It times out [`UNCLAIMED_GRACE`] after its deadline, and a driver that
    /// re-sends it (after a take-over) waits until then, and sends it claimed with a fresh
    /// deadline.
    pub exclusive: bool,
}

/// How long after an unclaimed (exclusive) attempt's deadline it may still be recording its
/// outcome: a driver re-sends it only after this much more time.
pub const UNCLAIMED_GRACE: Duration = Duration::from_millis(1000);

/// How many compensation attempts in a row may time out before the saga parks, when the
/// step's retry policy allows fewer. A compensation must run, and a timeout says only that no
/// answer came in time: on a cluster, a stream electing a new leader stops every write for
/// several seconds (up to 20 s measured, RELIABILITY.md), and a participant that cannot record
/// its barrier meanwhile does not answer. A failure reply counts against `max_attempts` alone.
pub const COMPENSATION_TIMEOUT_ATTEMPTS: u32 = 10;

/// Lifecycle events published for services that follow sagas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleKind {
    /// The saga started.
    Started,
    /// A step's action succeeded.
    StepSucceeded,
    /// A step's action failed for good.
    StepFailed,
    /// A step was compensated.
    StepCompensated,
    /// Compensation began.
    Compensating,
    /// The saga completed.
    Completed,
    /// The saga was compensated.
    Compensated,
    /// The saga was cancelled (and compensated).
    Cancelled,
    /// The saga needs an operator.
    NeedsIntervention,
    /// An operator resolved the saga.
    Resolved,
}

impl LifecycleKind {
    /// The kind as a lowercase word, used as a subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleKind::Started => "started",
            LifecycleKind::StepSucceeded => "step_succeeded",
            LifecycleKind::StepFailed => "step_failed",
            LifecycleKind::StepCompensated => "step_compensated",
            LifecycleKind::Compensating => "compensating",
            LifecycleKind::Completed => "completed",
            LifecycleKind::Compensated => "compensated",
            LifecycleKind::Cancelled => "cancelled",
            LifecycleKind::NeedsIntervention => "needs_intervention",
            LifecycleKind::Resolved => "resolved",
        }
    }
}

/// What an await step waits for, resolved for one saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AwaitOn {
    /// A domain event whose field `field` holds `value`.
    Event {
        /// The subject (after `domain.`) of the event that completes the step; may hold
        /// wildcards.
        event: String,
        /// The subject of an event that fails the step.
        fail_event: Option<String>,
        /// The event's field (dotted).
        field: String,
        /// The saga's value, as canonical JSON (see [`correlation_value`]).
        value: String,
        /// How long an event that arrived before the saga waited is kept for it.
        #[serde(with = "humantime_serde")]
        window: Duration,
    },
    /// A signal of this name sent to the saga.
    Signal {
        /// The signal's name.
        name: String,
    },
}

impl fmt::Display for AwaitOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AwaitOn::Event { event, field, value, .. } => {
                write!(f, "event {event} where {field} = {value}")
            }
            AwaitOn::Signal { name } => write!(f, "signal {name}"),
        }
    }
}

/// An await step is waiting. When what it waits for arrives, the driver completes it with
/// [`Event::StepSucceeded`] (this attempt, the payload as output) or, for an await's
/// `fail_event`, fails it with [`Event::StepFailed`] (not transient).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Awaiting {
    /// The step.
    pub step: StepName,
    /// The attempt (always 1: an await step is not retried).
    pub attempt: u32,
    /// When it times out.
    pub deadline: Timestamp,
    /// What it waits for.
    pub on: AwaitOn,
}

/// Something the driver must do. Effects are data: the state machine never performs them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Effect {
    /// Send a command to a participant.
    Dispatch(Dispatch),
    /// Wait for a domain event or a signal (an await step).
    Await(Awaiting),
    /// Arm a timer (replacing the step's pending one).
    ScheduleTimer {
        /// The timer.
        timer: Timer,
        /// When it fires.
        at: Timestamp,
    },
    /// Disarm a timer.
    CancelTimer {
        /// The timer.
        timer: Timer,
    },
    /// Publish a lifecycle event.
    Publish {
        /// Its kind.
        kind: LifecycleKind,
        /// The step concerned, if any.
        step: Option<StepName>,
        /// A reason, if any.
        reason: Option<String>,
    },
    /// The saga ended with this status.
    Finish {
        /// The terminal status.
        status: SagaStatus,
    },
}

/// Why an event was rejected. A rejected event changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The state belongs to another definition version.
    #[error("saga runs definition {expected}, not {found}")]
    WrongDefinition {
        /// The saga's digest.
        expected: String,
        /// The plan's digest.
        found: String,
    },
    /// The saga has not started.
    #[error("saga has not started; {event} is not applicable")]
    NotStarted {
        /// The event.
        event: &'static str,
    },
    /// The saga started already.
    #[error("saga already started")]
    AlreadyStarted,
    /// The saga has ended.
    #[error("saga already finished as {status}; {event} ignored")]
    Finished {
        /// Its terminal status.
        status: SagaStatus,
        /// The event.
        event: &'static str,
    },
    /// No such step in the definition.
    #[error("unknown step {step:?}")]
    UnknownStep {
        /// The name given.
        step: String,
    },
    /// The event was already applied.
    #[error("duplicate: step {step} {phase} attempt {attempt} was already {already}")]
    Duplicate {
        /// The step.
        step: StepName,
        /// The phase.
        phase: Phase,
        /// The attempt.
        attempt: u32,
        /// What it already is.
        already: &'static str,
    },
    /// The event is for an attempt or state the step is no longer in.
    #[error("stale: step {step} {phase} attempt {attempt} is not in flight (step is {status:?}, attempt {current})")]
    Stale {
        /// The step.
        step: StepName,
        /// The phase.
        phase: Phase,
        /// The attempt named by the event.
        attempt: u32,
        /// The step's current attempt for that phase.
        current: u32,
        /// The step's status.
        status: StepStatus,
    },
    /// The event does not apply in the saga's status.
    #[error("{event} is not applicable while the saga is {status}: {why}")]
    NotApplicable {
        /// The event.
        event: &'static str,
        /// The saga's status.
        status: SagaStatus,
        /// Why not.
        why: &'static str,
    },
}

/// The rows of the transition table: which `(status, event)` arm handled an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Rule {
    /// (new, start)
    Start,
    /// (new, anything but start)
    NotStarted,
    /// (started, start)
    AlreadyStarted,
    /// (terminal, anything but start)
    Finished,
    /// (running, step succeeded)
    ActionSucceeded,
    /// (running, step failed)
    ActionFailed,
    /// (running, timer)
    RunningTimer,
    /// (running, compensation reply)
    NoCompensationRunning,
    /// (running, cancel)
    CancelRunning,
    /// (running or compensating, operator action)
    NotParked,
    /// (compensating or needs-intervention, step succeeded)
    LateActionSucceeded,
    /// (compensating or needs-intervention, step failed)
    LateActionFailed,
    /// (compensating or needs-intervention, compensation succeeded)
    CompensationSucceeded,
    /// (compensating or needs-intervention, compensation failed)
    CompensationFailed,
    /// (compensating or needs-intervention, timer)
    CompensatingTimer,
    /// (compensating or needs-intervention, cancel)
    AlreadyCompensating,
    /// (needs-intervention, operator retry)
    OperatorRetry,
    /// (needs-intervention, operator skip)
    OperatorSkip,
    /// (needs-intervention, operator resolve)
    OperatorResolve,
    /// (running, compensating or needs-intervention, undelivered)
    Undelivered,
}

impl Rule {
    /// Every row of the table.
    pub const ALL: [Rule; 20] = [
        Rule::Start,
        Rule::NotStarted,
        Rule::AlreadyStarted,
        Rule::Finished,
        Rule::ActionSucceeded,
        Rule::ActionFailed,
        Rule::RunningTimer,
        Rule::NoCompensationRunning,
        Rule::CancelRunning,
        Rule::NotParked,
        Rule::LateActionSucceeded,
        Rule::LateActionFailed,
        Rule::CompensationSucceeded,
        Rule::CompensationFailed,
        Rule::CompensatingTimer,
        Rule::AlreadyCompensating,
        Rule::OperatorRetry,
        Rule::OperatorSkip,
        Rule::OperatorResolve,
        Rule::Undelivered,
    ];
}

/// The result of handling one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    /// The row of the table that handled the event.
    pub rule: Rule,
    /// What the driver must do, or why the event changed nothing.
    pub result: Result<Vec<Effect>, Rejection>,
    /// The entries this transition appended to the saga's timeline, in order (empty when the
    /// event was rejected).
    pub timeline: Vec<TimelineEntry>,
}

/// What one transition produces besides the new state.
#[derive(Default)]
struct Out {
    fx: Vec<Effect>,
    timeline: Vec<TimelineEntry>,
}

impl Out {
    fn record(&mut self, at: Timestamp, event: TimelineEvent) {
        self.timeline.push(TimelineEntry { at, event });
    }
}

/// A saga instance: the state machine. Its fields are private; read it through its accessors
/// or a [`SagaSnapshot`] ([`snapshot`](SagaState::snapshot)), and rebuild it from a snapshot
/// ([`from_snapshot`](SagaState::from_snapshot)) or from its accepted events
/// ([`replay`](SagaState::replay)).
#[derive(Debug, Clone, PartialEq)]
pub struct SagaState {
    id: SagaId,
    saga: SagaName,
    digest: String,
    status: SagaStatus,
    input: Payload,
    /// Each step's state, in definition order.
    steps: Vec<StepState>,
    cause: Option<Cause>,
    started_at: Timestamp,
    updated_at: Timestamp,
    /// How many events it accepted.
    events: u64,
}

/// Why a [`SagaSnapshot`] cannot be turned back into a [`SagaState`] for a plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The snapshot has a view version this build does not read.
    #[error(
        "snapshot of saga {id}: view version {found} is not supported (this build reads version \
         {supported}); convert it with a build that reads version {found}"
    )]
    UnsupportedVersion {
        /// The saga id in the snapshot.
        id: SagaId,
        /// The version found.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// The snapshot's saga id is not a valid token.
    #[error("snapshot saga id {id:?} {source}; saga ids are tokens of `A-Z a-z 0-9 _ -`")]
    InvalidId {
        /// The id found.
        id: SagaId,
        /// What is wrong with it.
        source: TokenError,
    },
    /// The snapshot is of another saga definition than the plan.
    #[error(
        "snapshot of saga {id} is of definition {found:?}, not {expected:?}; load it with the \
         plan of {found:?}"
    )]
    WrongSaga {
        /// The saga id.
        id: SagaId,
        /// The plan's definition name.
        expected: SagaName,
        /// The snapshot's definition name.
        found: SagaName,
    },
    /// The snapshot runs another version of the definition than the plan.
    #[error(
        "snapshot of saga {id} runs definition {saga:?} version {found}, but the plan is version \
         {expected}; load it with the plan of digest {found}"
    )]
    WrongDigest {
        /// The saga id.
        id: SagaId,
        /// The definition name.
        saga: SagaName,
        /// The plan's digest.
        expected: String,
        /// The snapshot's digest.
        found: String,
    },
    /// The snapshot has another number of steps than the plan.
    #[error(
        "snapshot of saga {id} has {found} steps, but definition {saga:?} has {expected}; the \
         snapshot does not match its digest"
    )]
    StepCount {
        /// The saga id.
        id: SagaId,
        /// The definition name.
        saga: SagaName,
        /// The plan's number of steps.
        expected: usize,
        /// The snapshot's number of steps.
        found: usize,
    },
    /// A step of the snapshot is not the plan's step at that position.
    #[error(
        "snapshot of saga {id}: step #{index} is {found:?}, but definition {saga:?} has \
         {expected:?} there; the snapshot does not match its digest"
    )]
    StepName {
        /// The saga id.
        id: SagaId,
        /// The definition name.
        saga: SagaName,
        /// The step's position (from 0).
        index: usize,
        /// The plan's step name at that position.
        expected: StepName,
        /// The snapshot's step name at that position.
        found: StepName,
    },
}

impl SagaState {
    /// A new, not yet started instance of `plan`.
    pub fn new(id: SagaId, plan: &Plan) -> SagaState {
        SagaState {
            id,
            saga: plan.name().clone(),
            digest: plan.digest().to_owned(),
            status: SagaStatus::New,
            input: Payload::default(),
            steps: plan
                .steps()
                .iter()
                .map(|s| StepState {
                    name: s.name.clone(),
                    status: StepStatus::Pending,
                    attempt: 0,
                    comp_attempt: 0,
                    comp_budget_from: 0,
                    timed_out: false,
                    timer_at: None,
                    output: None,
                    last_error: None,
                    undelivered: 0,
                    awaiting_redelivery: false,
                    exclusive: false,
                })
                .collect(),
            cause: None,
            started_at: Timestamp(0),
            updated_at: Timestamp(0),
            events: 0,
        }
    }

    /// The instance id.
    pub fn id(&self) -> &SagaId {
        &self.id
    }

    /// The definition's name.
    pub fn saga(&self) -> &SagaName {
        &self.saga
    }

    /// The definition version (digest) the instance runs.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Where the saga is.
    pub fn status(&self) -> SagaStatus {
        self.status
    }

    /// The saga's input.
    pub fn input(&self) -> &Payload {
        &self.input
    }

    /// Why the saga is compensating, once it is.
    pub fn cause(&self) -> Option<&Cause> {
        self.cause.as_ref()
    }

    /// When the saga started (0 before the start).
    pub fn started_at(&self) -> Timestamp {
        self.started_at
    }

    /// When the saga last changed.
    pub fn updated_at(&self) -> Timestamp {
        self.updated_at
    }

    /// How many events the saga accepted.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Where step `step` is, if the definition has such a step.
    pub fn step_status(&self, step: &StepName) -> Option<StepStatus> {
        self.steps.iter().find(|s| &s.name == step).map(|s| s.status)
    }

    /// The latest attempt number of step `step`'s `phase` (0: never dispatched), if the
    /// definition has such a step.
    pub fn step_attempt(&self, step: &StepName, phase: Phase) -> Option<u32> {
        self.steps.iter().find(|s| &s.name == step).map(|s| s.attempt_of(phase))
    }

    /// The saga as clients read it, and as the coordinator stores it.
    pub fn snapshot(&self) -> SagaSnapshot {
        SagaSnapshot {
            v: VIEW_VERSION,
            id: self.id.clone(),
            saga: self.saga.clone(),
            digest: self.digest.clone(),
            status: self.status,
            input: self.input.clone(),
            steps: self
                .steps
                .iter()
                .map(|s| StepSnapshot {
                    name: s.name.clone(),
                    status: s.status,
                    attempt: s.attempt,
                    comp_attempt: s.comp_attempt,
                    comp_budget_from: s.comp_budget_from,
                    timed_out: s.timed_out,
                    timer_at: s.timer_at,
                    output: s.output.clone(),
                    last_error: s.last_error.clone(),
                    undelivered: s.undelivered,
                    awaiting_redelivery: s.awaiting_redelivery,
                    exclusive: s.exclusive,
                })
                .collect(),
            cause: self.cause.clone(),
            started_at: self.started_at,
            updated_at: self.updated_at,
            events: self.events,
        }
    }

    /// Rebuilds the instance a [`snapshot`](SagaState::snapshot) was taken of, refusing a
    /// snapshot of another view version, another definition or definition version, or with
    /// steps other than the plan's.
    ///
    /// # Examples
    ///
    /// ```
    /// use saga_core::{Event, Payload, SagaDefinition, SagaId, SagaState, Timestamp};
    ///
    /// let plan = SagaDefinition::builder("s")
    ///     .step("only", "svc", "do-it", |s| s)
    ///     .build()
    ///     .validate()?;
    /// let mut saga = SagaState::new(SagaId::new("id1")?, &plan);
    /// saga.handle(&plan, Timestamp(0), &Event::Start { input: Payload::new(vec![1]) });
    /// let stored = serde_json::to_string(&saga.snapshot())?;
    /// let loaded = SagaState::from_snapshot(&plan, &serde_json::from_str(&stored)?)?;
    /// assert_eq!(loaded, saga);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_snapshot(plan: &Plan, snap: &SagaSnapshot) -> Result<SagaState, SnapshotError> {
        let id = &snap.id;
        if snap.v != VIEW_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                id: id.clone(),
                found: snap.v,
                supported: VIEW_VERSION,
            });
        }
        if let Err(source) = id.check() {
            return Err(SnapshotError::InvalidId { id: id.clone(), source });
        }
        if &snap.saga != plan.name() {
            return Err(SnapshotError::WrongSaga {
                id: id.clone(),
                expected: plan.name().clone(),
                found: snap.saga.clone(),
            });
        }
        if snap.digest != plan.digest() {
            return Err(SnapshotError::WrongDigest {
                id: id.clone(),
                saga: snap.saga.clone(),
                expected: plan.digest().to_owned(),
                found: snap.digest.clone(),
            });
        }
        if snap.steps.len() != plan.steps().len() {
            return Err(SnapshotError::StepCount {
                id: id.clone(),
                saga: snap.saga.clone(),
                expected: plan.steps().len(),
                found: snap.steps.len(),
            });
        }
        for (index, (s, def)) in snap.steps.iter().zip(plan.steps()).enumerate() {
            if s.name != def.name {
                return Err(SnapshotError::StepName {
                    id: id.clone(),
                    saga: snap.saga.clone(),
                    index,
                    expected: def.name.clone(),
                    found: s.name.clone(),
                });
            }
        }
        Ok(SagaState {
            id: id.clone(),
            saga: snap.saga.clone(),
            digest: snap.digest.clone(),
            status: snap.status,
            input: snap.input.clone(),
            steps: snap
                .steps
                .iter()
                .map(|s| StepState {
                    name: s.name.clone(),
                    status: s.status,
                    attempt: s.attempt,
                    comp_attempt: s.comp_attempt,
                    comp_budget_from: s.comp_budget_from,
                    timed_out: s.timed_out,
                    timer_at: s.timer_at,
                    output: s.output.clone(),
                    last_error: s.last_error.clone(),
                    undelivered: s.undelivered,
                    awaiting_redelivery: s.awaiting_redelivery,
                    exclusive: s.exclusive,
                })
                .collect(),
            cause: snap.cause.clone(),
            started_at: snap.started_at,
            updated_at: snap.updated_at,
            events: snap.events,
        })
    }

    /// Rebuilds an instance from its accepted events, in order.
    pub fn replay<'a>(
        id: SagaId,
        plan: &Plan,
        events: impl IntoIterator<Item = &'a (Timestamp, Event)>,
    ) -> Result<SagaState, (usize, Rejection)> {
        let mut state = SagaState::new(id, plan);
        for (n, (now, event)) in events.into_iter().enumerate() {
            state.handle(plan, *now, event).result.map_err(|e| (n, e))?;
        }
        Ok(state)
    }

    /// Handles one event at time `now`. On rejection the state is unchanged.
    ///
    /// # Examples
    ///
    /// ```
    /// use saga_core::{Effect, Event, Payload, SagaDefinition, SagaId, SagaState, Timestamp};
    ///
    /// let plan = SagaDefinition::builder("s")
    ///     .step("only", "svc", "do-it", |s| s)
    ///     .build()
    ///     .validate()
    ///     .unwrap();
    /// let mut saga = SagaState::new(SagaId::from("id1"), &plan);
    /// let effects = saga
    ///     .handle(&plan, Timestamp(0), &Event::Start { input: Payload::new(vec![1]) })
    ///     .result
    ///     .unwrap();
    /// let sent: Vec<_> = effects
    ///     .iter()
    ///     .filter_map(|e| match e {
    ///         Effect::Dispatch(d) => Some(d.command_id.as_str()),
    ///         _ => None,
    ///     })
    ///     .collect();
    /// assert_eq!(sent, ["id1.only.a.1"]);
    /// ```
    pub fn handle(&mut self, plan: &Plan, now: Timestamp, event: &Event) -> Handled {
        use SagaStatus as S;
        if plan.digest() != self.digest {
            let rejection = Rejection::WrongDefinition {
                expected: self.digest.clone(),
                found: plan.digest().to_owned(),
            };
            let rule = if self.status == S::New { Rule::NotStarted } else { Rule::Finished };
            return Handled { rule, result: Err(rejection), timeline: Vec::new() };
        }
        let mut out = Out::default();
        let o = &mut out;
        let (rule, outcome): (Rule, Result<(), Rejection>) = match (self.status, event) {
            (S::New, Event::Start { input }) => (Rule::Start, {
                self.start(plan, now, input, o);
                Ok(())
            }),
            (
                S::New,
                Event::StepSucceeded { .. }
                | Event::StepFailed { .. }
                | Event::StepOutputRefused { .. }
                | Event::CompensationSucceeded { .. }
                | Event::CompensationFailed { .. }
                | Event::Undelivered { .. }
                | Event::TimerFired(_)
                | Event::Cancel { .. }
                | Event::OperatorRetry { .. }
                | Event::OperatorSkip { .. }
                | Event::OperatorResolve { .. },
            ) => (Rule::NotStarted, Err(Rejection::NotStarted { event: event.name() })),
            (
                S::Running
                | S::Compensating
                | S::NeedsIntervention
                | S::Completed
                | S::Compensated
                | S::Cancelled
                | S::Resolved,
                Event::Start { .. },
            ) => (Rule::AlreadyStarted, Err(Rejection::AlreadyStarted)),
            (
                status @ (S::Completed | S::Compensated | S::Cancelled | S::Resolved),
                Event::StepSucceeded { .. }
                | Event::StepFailed { .. }
                | Event::StepOutputRefused { .. }
                | Event::CompensationSucceeded { .. }
                | Event::CompensationFailed { .. }
                | Event::Undelivered { .. }
                | Event::TimerFired(_)
                | Event::Cancel { .. }
                | Event::OperatorRetry { .. }
                | Event::OperatorSkip { .. }
                | Event::OperatorResolve { .. },
            ) => (Rule::Finished, Err(Rejection::Finished { status, event: event.name() })),

            (S::Running, Event::StepSucceeded { step, attempt, output }) => {
                (Rule::ActionSucceeded, self.action_succeeded(plan, now, step, *attempt, output, o))
            }
            (S::Running, Event::StepFailed { step, attempt, reason, transient }) => (
                Rule::ActionFailed,
                self.action_failed(plan, now, step, *attempt, reason, *transient, o),
            ),
            (S::Running, Event::StepOutputRefused { step, attempt, reason }) => {
                (Rule::ActionFailed, self.output_refused(plan, now, step, *attempt, reason, o))
            }
            (S::Running, Event::TimerFired(timer)) => {
                (Rule::RunningTimer, self.timer_fired(plan, now, timer, o))
            }
            (
                S::Running,
                Event::CompensationSucceeded { step, attempt }
                | Event::CompensationFailed { step, attempt, .. },
            ) => (
                Rule::NoCompensationRunning,
                Err(self.stale_or_unknown(plan, step, Phase::Compensation, *attempt)),
            ),
            (S::Running, Event::Cancel { reason, by }) => {
                (Rule::CancelRunning, self.cancel(plan, now, reason, by, o))
            }
            (
                status @ (S::Running | S::Compensating),
                Event::OperatorRetry { .. }
                | Event::OperatorSkip { .. }
                | Event::OperatorResolve { .. },
            ) => (
                Rule::NotParked,
                Err(Rejection::NotApplicable {
                    event: event.name(),
                    status,
                    why: "operator actions apply only to a saga in needs_intervention",
                }),
            ),
            (
                S::Running | S::Compensating | S::NeedsIntervention,
                Event::Undelivered { step, phase, attempt },
            ) => (Rule::Undelivered, self.undelivered(plan, now, step, *phase, *attempt, o)),

            (
                S::Compensating | S::NeedsIntervention,
                Event::StepSucceeded { step, attempt, output },
            ) => (
                Rule::LateActionSucceeded,
                self.action_succeeded(plan, now, step, *attempt, output, o),
            ),
            (
                S::Compensating | S::NeedsIntervention,
                Event::StepFailed { step, attempt, reason, transient },
            ) => (
                Rule::LateActionFailed,
                self.action_failed(plan, now, step, *attempt, reason, *transient, o),
            ),
            (
                S::Compensating | S::NeedsIntervention,
                Event::StepOutputRefused { step, attempt, reason },
            ) => {
                (Rule::LateActionFailed, self.output_refused(plan, now, step, *attempt, reason, o))
            }
            (
                S::Compensating | S::NeedsIntervention,
                Event::CompensationSucceeded { step, attempt },
            ) => (
                Rule::CompensationSucceeded,
                self.compensation_succeeded(plan, now, step, *attempt, o),
            ),
            (
                S::Compensating | S::NeedsIntervention,
                Event::CompensationFailed { step, attempt, reason, transient },
            ) => (
                Rule::CompensationFailed,
                self.compensation_failed(plan, now, step, *attempt, reason, *transient, o),
            ),
            (S::Compensating | S::NeedsIntervention, Event::TimerFired(timer)) => {
                (Rule::CompensatingTimer, self.timer_fired(plan, now, timer, o))
            }
            (status @ (S::Compensating | S::NeedsIntervention), Event::Cancel { .. }) => (
                Rule::AlreadyCompensating,
                Err(Rejection::NotApplicable {
                    event: event.name(),
                    status,
                    why: "the saga is already being compensated",
                }),
            ),
            (S::NeedsIntervention, Event::OperatorRetry { reason, by }) => (Rule::OperatorRetry, {
                self.operator_retry(plan, now, reason, by, o);
                Ok(())
            }),
            (S::NeedsIntervention, Event::OperatorSkip { reason, by }) => (Rule::OperatorSkip, {
                self.operator_skip(plan, now, reason, by, o);
                Ok(())
            }),
            (S::NeedsIntervention, Event::OperatorResolve { reason, by }) => {
                (Rule::OperatorResolve, {
                    self.operator_resolve(now, reason, by, o);
                    Ok(())
                })
            }
        };
        match outcome {
            Ok(()) => {
                self.events += 1;
                self.updated_at = now;
                Handled { rule, result: Ok(out.fx), timeline: out.timeline }
            }
            Err(rejection) => Handled { rule, result: Err(rejection), timeline: Vec::new() },
        }
    }

    /// The effects that must already have happened for the saga to make progress: the
    /// in-flight commands and the pending timers. A driver that is not sure the effects of
    /// the latest transition were carried out (after a crash, or on a redelivered event)
    /// carries these out again; they are idempotent (same command ids, same timers). An
    /// attempt that found no responder is not re-sent here: its redelivery timer is.
    pub fn outstanding(&self, plan: &Plan) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.status.is_terminal() {
            return fx;
        }
        for (i, s) in self.steps.iter().enumerate() {
            let at = s.timer_at.unwrap_or(self.updated_at);
            let (phase, attempt, kind) = match s.status {
                StepStatus::Running => (Phase::Action, s.attempt, s.in_flight_timer()),
                StepStatus::RetryWait => (Phase::Action, s.attempt, TimerKind::Backoff),
                StepStatus::Compensating => {
                    (Phase::Compensation, s.comp_attempt, s.in_flight_timer())
                }
                StepStatus::CompensationRetryWait => {
                    (Phase::Compensation, s.comp_attempt, TimerKind::Backoff)
                }
                StepStatus::Pending
                | StepStatus::Succeeded
                | StepStatus::Failed
                | StepStatus::Unknown
                | StepStatus::Compensated
                | StepStatus::CompensationStuck
                | StepStatus::CompensationSkipped => continue,
            };
            // An unclaimed attempt may still be running: send it again (claimed) only when it
            // would time out (its deadline and the grace period have passed).
            let kind =
                if kind == TimerKind::Timeout && s.exclusive { TimerKind::Redeliver } else { kind };
            if kind == TimerKind::Timeout {
                match self.awaiting(plan, i, at) {
                    Some(Ok(awaiting)) => fx.push(Effect::Await(awaiting)),
                    // Unreachable in practice: the value was found when the wait began.
                    Some(Err(_)) => {}
                    None => {
                        fx.push(Effect::Dispatch(self.command(plan, i, phase, attempt, at, false)))
                    }
                }
            }
            fx.push(Effect::ScheduleTimer {
                timer: Timer { step: s.name.clone(), phase, attempt, kind },
                at,
            });
        }
        fx
    }

    /// The index of step `name`.
    fn index(&self, plan: &Plan, name: &StepName) -> Result<usize, Rejection> {
        plan.step_index(name).ok_or_else(|| Rejection::UnknownStep { step: name.to_string() })
    }

    fn stale_or_unknown(
        &self,
        plan: &Plan,
        step: &StepName,
        phase: Phase,
        attempt: u32,
    ) -> Rejection {
        match self.index(plan, step) {
            Err(e) => e,
            Ok(i) => self.stale(i, phase, attempt),
        }
    }

    fn stale(&self, i: usize, phase: Phase, attempt: u32) -> Rejection {
        let s = &self.steps[i];
        let current = match phase {
            Phase::Action => s.attempt,
            Phase::Compensation => s.comp_attempt,
        };
        let already = match (phase, s.status) {
            (Phase::Action, StepStatus::Succeeded) if attempt <= current => Some("succeeded"),
            (Phase::Action, StepStatus::Failed) if attempt == current => Some("failed"),
            (Phase::Compensation, StepStatus::Compensated) if attempt <= current => {
                Some("compensated")
            }
            _ => None,
        };
        match already {
            Some(already) => Rejection::Duplicate { step: s.name.clone(), phase, attempt, already },
            None => {
                Rejection::Stale { step: s.name.clone(), phase, attempt, current, status: s.status }
            }
        }
    }

    fn start(&mut self, plan: &Plan, now: Timestamp, input: &Payload, out: &mut Out) {
        self.status = SagaStatus::Running;
        self.input = input.clone();
        self.started_at = now;
        out.record(now, TimelineEvent::Started);
        out.fx.push(Effect::Publish { kind: LifecycleKind::Started, step: None, reason: None });
        self.advance(plan, now, out);
    }

    fn command(
        &self,
        plan: &Plan,
        i: usize,
        phase: Phase,
        attempt: u32,
        deadline: Timestamp,
        exclusive: bool,
    ) -> Dispatch {
        let def = &plan.steps()[i];
        let s = &self.steps[i];
        let command = match phase {
            Phase::Action => def.action.clone(),
            Phase::Compensation => def.compensation.clone().unwrap_or_else(|| def.action.clone()),
        };
        let deps = plan
            .deps(i)
            .iter()
            .filter_map(|&d| self.steps[d].output.clone().map(|o| (self.steps[d].name.clone(), o)))
            .collect();
        Dispatch {
            command_id: CommandId::new(&self.id, &s.name, phase, attempt),
            step: s.name.clone(),
            phase,
            attempt,
            service: def.service.clone(),
            command,
            deadline,
            input: self.input.clone(),
            deps,
            output: match phase {
                Phase::Action => None,
                Phase::Compensation => s.output.clone(),
            },
            exclusive,
        }
    }

    /// Sends the next attempt of step `i`'s `phase` and arms its timeout.
    fn dispatch(&mut self, plan: &Plan, now: Timestamp, i: usize, phase: Phase, out: &mut Out) {
        let s = &mut self.steps[i];
        let attempt = match phase {
            Phase::Action => {
                s.attempt += 1;
                s.status = StepStatus::Running;
                s.attempt
            }
            Phase::Compensation => {
                s.comp_attempt += 1;
                s.status = StepStatus::Compensating;
                s.comp_attempt
            }
        };
        s.attempt_settled();
        if phase == Phase::Action && plan.steps()[i].awaits.is_some() {
            return self.wait(plan, now, i, attempt, out);
        }
        // The first send of an action's first attempt: nothing else can be running it.
        let exclusive = phase == Phase::Action && attempt == 1;
        self.send(plan, now, i, phase, attempt, exclusive, out);
    }

    /// What await step `i` waits for, for this saga, with the deadline `deadline`: `None`
    /// for a command step, an error when the saga's value to match is missing.
    fn awaiting(
        &self,
        plan: &Plan,
        i: usize,
        deadline: Timestamp,
    ) -> Option<Result<Awaiting, String>> {
        let spec = plan.steps()[i].awaits.as_ref()?;
        let on = match (&spec.signal, &spec.event, &spec.matching) {
            (Some(name), _, _) => Ok(AwaitOn::Signal { name: name.clone() }),
            (None, Some(event), Some(m)) => {
                self.saga_value(plan, &m.equals).map(|value| AwaitOn::Event {
                    event: event.clone(),
                    fail_event: spec.fail_event.clone(),
                    field: m.field.clone(),
                    value,
                    window: spec.window,
                })
            }
            // Validation refuses these.
            (None, _, _) => {
                Err("the await step names neither an event with match nor a signal".to_owned())
            }
        };
        let step = self.steps[i].name.clone();
        Some(on.map(|on| Awaiting { step, attempt: self.steps[i].attempt, deadline, on }))
    }

    /// The saga's value at `equals` (`input`, `input.<path>`, `steps.<step>.<path>`) as
    /// canonical JSON, or why it is missing.
    fn saga_value(&self, plan: &Plan, equals: &str) -> Result<String, String> {
        let (payload, path, whose) = match equals.split_once('.') {
            None => (Some(&self.input), "", "the saga's input".to_owned()),
            Some(("input", path)) => (Some(&self.input), path, "the saga's input".to_owned()),
            Some((_, rest)) => {
                let (step, path) = rest.split_once('.').unwrap_or((rest, ""));
                let output = plan
                    .step_index(&StepName::from(step))
                    .and_then(|j| self.steps[j].output.as_ref());
                (output, path, format!("step {step}'s output"))
            }
        };
        payload.and_then(|p| correlation_value(p.as_bytes(), path)).ok_or_else(|| {
            format!("await: {equals} is missing from {whose}, so no event can match")
        })
    }

    /// Await step `i` begins waiting (its only attempt) and arms its timeout; it fails at once
    /// when the saga has no value to match.
    fn wait(&mut self, plan: &Plan, now: Timestamp, i: usize, attempt: u32, out: &mut Out) {
        let deadline = now.after(plan.steps()[i].timeout);
        let awaiting = match self.awaiting(plan, i, deadline) {
            Some(Ok(awaiting)) => awaiting,
            Some(Err(reason)) => {
                let step = self.steps[i].name.clone();
                self.steps[i].last_error = Some(reason.clone());
                out.record(
                    now,
                    TimelineEvent::Failed {
                        step,
                        phase: Phase::Action,
                        attempt,
                        reason: reason.clone(),
                        transient: false,
                    },
                );
                return self.attempt_failed(plan, now, i, false, false, &reason, out);
            }
            None => unreachable!("wait is called for await steps only"),
        };
        let s = &mut self.steps[i];
        s.timer_at = Some(deadline);
        out.record(
            now,
            TimelineEvent::Awaiting {
                step: s.name.clone(),
                waits_for: awaiting.on.to_string(),
                deadline,
            },
        );
        let timer =
            Timer { step: s.name.clone(), phase: Phase::Action, attempt, kind: TimerKind::Timeout };
        out.fx.push(Effect::Await(awaiting));
        out.fx.push(Effect::ScheduleTimer { timer, at: deadline });
    }

    /// Sends `attempt` of step `i`'s `phase` (a new attempt, or one sent again) with a fresh
    /// deadline, and arms its timeout.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        i: usize,
        phase: Phase,
        attempt: u32,
        exclusive: bool,
        out: &mut Out,
    ) {
        let deadline = now.after(plan.steps()[i].timeout);
        // An unclaimed attempt times out a grace period after its deadline: the participant
        // stops its handler at the deadline and may still be replying and recording. Nothing
        // that follows a timeout (a retry, the compensation) meets that delivery.
        let fires = if exclusive { deadline.after(UNCLAIMED_GRACE) } else { deadline };
        let s = &mut self.steps[i];
        s.timer_at = Some(fires);
        s.awaiting_redelivery = false;
        s.exclusive = exclusive;
        let dispatch = self.command(plan, i, phase, attempt, deadline, exclusive);
        out.record(
            now,
            TimelineEvent::Dispatched {
                step: dispatch.step.clone(),
                phase,
                attempt,
                service: dispatch.service.clone(),
                command: dispatch.command.clone(),
                deadline,
            },
        );
        let timer = Timer { step: dispatch.step.clone(), phase, attempt, kind: TimerKind::Timeout };
        out.fx.push(Effect::Dispatch(dispatch));
        out.fx.push(Effect::ScheduleTimer { timer, at: fires });
    }

    fn cancel_timer(
        &mut self,
        i: usize,
        phase: Phase,
        attempt: u32,
        kind: TimerKind,
        out: &mut Out,
    ) {
        let s = &mut self.steps[i];
        s.timer_at = None;
        out.fx.push(Effect::CancelTimer {
            timer: Timer { step: s.name.clone(), phase, attempt, kind },
        });
    }

    /// Arms the backoff timer before the next attempt of step `i`'s `phase`.
    fn backoff(&mut self, plan: &Plan, now: Timestamp, i: usize, phase: Phase, out: &mut Out) {
        let s = &mut self.steps[i];
        let attempt = s.attempt_of(phase);
        let seed = fnv1a(&[
            self.id.as_str().as_bytes(),
            s.name.as_str().as_bytes(),
            phase.code().as_bytes(),
        ]);
        let at = now.after(plan.steps()[i].retry.backoff(attempt, seed ^ u64::from(attempt)));
        s.status = match phase {
            Phase::Action => StepStatus::RetryWait,
            Phase::Compensation => StepStatus::CompensationRetryWait,
        };
        s.timer_at = Some(at);
        let step = s.name.clone();
        let timer = Timer { step: step.clone(), phase, attempt, kind: TimerKind::Backoff };
        out.record(
            now,
            TimelineEvent::RetryScheduled { step, phase, next_attempt: attempt + 1, at },
        );
        out.fx.push(Effect::ScheduleTimer { timer, at });
    }

    /// The delay before an attempt that found no responder `undelivered` times in a row is
    /// sent again: 500 ms, doubling, at most 30 s.
    fn redelivery_delay(undelivered: u32) -> Duration {
        const FIRST_MS: u64 = 500;
        const MAX_MS: u64 = 30_000;
        let factor = 1u64.checked_shl(undelivered.saturating_sub(1)).unwrap_or(u64::MAX);
        Duration::from_millis(FIRST_MS.saturating_mul(factor).min(MAX_MS))
    }

    /// The driver could not deliver `attempt` of `step`'s `phase`: send it again later.
    fn undelivered(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        step: &StepName,
        phase: Phase,
        attempt: u32,
        out: &mut Out,
    ) -> Result<(), Rejection> {
        let i = self.index(plan, step)?;
        let s = &self.steps[i];
        if !s.in_flight(phase, attempt) || plan.steps()[i].awaits.is_some() {
            return Err(self.stale(i, phase, attempt));
        }
        if s.awaiting_redelivery {
            // Not sent again since: the same report twice.
            return Err(Rejection::Duplicate {
                step: step.clone(),
                phase,
                attempt,
                already: "reported undelivered",
            });
        }
        self.cancel_timer(i, phase, attempt, TimerKind::Timeout, out);
        let s = &mut self.steps[i];
        s.undelivered += 1;
        s.awaiting_redelivery = true;
        let at = now.after(Self::redelivery_delay(s.undelivered));
        s.timer_at = Some(at);
        out.record(
            now,
            TimelineEvent::NotDelivered { step: step.clone(), phase, attempt, retry_at: at },
        );
        let timer = Timer { step: step.clone(), phase, attempt, kind: TimerKind::Redeliver };
        out.fx.push(Effect::ScheduleTimer { timer, at });
        Ok(())
    }

    /// Takes a success of step `i`'s action attempt `attempt`, if it is the one in flight
    /// (or, while running, the one that failed or timed out and waits to be retried): its
    /// timer is cancelled and the attempt settled.
    fn take_success(&mut self, i: usize, attempt: u32, out: &mut Out) -> Result<(), Rejection> {
        let s = &self.steps[i];
        let kind = match s.status {
            StepStatus::Running if s.attempt == attempt => s.in_flight_timer(),
            // A late success of the attempt that failed or timed out: take it.
            StepStatus::RetryWait if s.attempt == attempt && self.status == SagaStatus::Running => {
                TimerKind::Backoff
            }
            _ => return Err(self.stale(i, Phase::Action, attempt)),
        };
        self.cancel_timer(i, Phase::Action, attempt, kind, out);
        self.steps[i].attempt_settled();
        Ok(())
    }

    fn action_succeeded(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        step: &StepName,
        attempt: u32,
        output: &Payload,
        out: &mut Out,
    ) -> Result<(), Rejection> {
        let i = self.index(plan, step)?;
        self.take_success(i, attempt, out)?;
        let s = &mut self.steps[i];
        s.status = StepStatus::Succeeded;
        s.output = Some(output.clone());
        out.record(
            now,
            TimelineEvent::Succeeded { step: step.clone(), phase: Phase::Action, attempt },
        );
        out.fx.push(Effect::Publish {
            kind: LifecycleKind::StepSucceeded,
            step: Some(step.clone()),
            reason: None,
        });
        self.advance(plan, now, out);
        Ok(())
    }

    /// A success whose output cannot be kept. The action ran, so a step with a compensation
    /// is compensated, never retried (a retry would get the same recorded output); any other
    /// step fails as on a business failure.
    fn output_refused(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        step: &StepName,
        attempt: u32,
        reason: &str,
        out: &mut Out,
    ) -> Result<(), Rejection> {
        let i = self.index(plan, step)?;
        if plan.steps()[i].compensation.is_none() {
            return self.action_failed(plan, now, step, attempt, reason, false, out);
        }
        self.take_success(i, attempt, out)?;
        self.record_action_failure(now, i, attempt, reason, false, out);
        // It ran: its outcome is known to the participant only, as after a timeout.
        self.steps[i].status = StepStatus::Unknown;
        self.failed_for_good(plan, now, i, reason, out);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn action_failed(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        step: &StepName,
        attempt: u32,
        reason: &str,
        transient: bool,
        out: &mut Out,
    ) -> Result<(), Rejection> {
        let i = self.index(plan, step)?;
        let s = &self.steps[i];
        if !s.in_flight(Phase::Action, attempt) {
            return Err(self.stale(i, Phase::Action, attempt));
        }
        let kind = s.in_flight_timer();
        self.cancel_timer(i, Phase::Action, attempt, kind, out);
        self.steps[i].attempt_settled();
        self.record_action_failure(now, i, attempt, reason, transient, out);
        self.attempt_failed(plan, now, i, transient, false, reason, out);
        Ok(())
    }

    /// Notes that step `i`'s action attempt `attempt` failed: its last error, and the
    /// timeline's `failed` entry.
    fn record_action_failure(
        &mut self,
        now: Timestamp,
        i: usize,
        attempt: u32,
        reason: &str,
        transient: bool,
        out: &mut Out,
    ) {
        let s = &mut self.steps[i];
        s.last_error = Some(reason.to_owned());
        out.record(
            now,
            TimelineEvent::Failed {
                step: s.name.clone(),
                phase: Phase::Action,
                attempt,
                reason: reason.to_owned(),
                transient,
            },
        );
    }

    /// Step `i`'s current action attempt failed or timed out: retry it, or fail the step.
    #[allow(clippy::too_many_arguments)]
    fn attempt_failed(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        i: usize,
        transient: bool,
        timed_out: bool,
        reason: &str,
        out: &mut Out,
    ) {
        let def = &plan.steps()[i];
        let s = &mut self.steps[i];
        // Once any attempt timed out, the action may have run: its outcome stays unknown.
        s.timed_out |= timed_out;
        let retriable = def.kind == StepKind::Retriable;
        let may_retry =
            retriable || ((transient || timed_out) && s.attempt < def.retry.max_attempts);
        if self.status == SagaStatus::Running && may_retry {
            self.backoff(plan, now, i, Phase::Action, out);
            return;
        }
        s.status = if s.timed_out { StepStatus::Unknown } else { StepStatus::Failed };
        self.failed_for_good(plan, now, i, reason, out);
    }

    /// Step `i`'s action failed for good (its status is set): the saga compensates, or goes
    /// on compensating.
    fn failed_for_good(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        i: usize,
        reason: &str,
        out: &mut Out,
    ) {
        let name = self.steps[i].name.clone();
        out.fx.push(Effect::Publish {
            kind: LifecycleKind::StepFailed,
            step: Some(name.clone()),
            reason: Some(reason.to_owned()),
        });
        if self.status == SagaStatus::Running {
            let cause = Cause::StepFailed { step: name, reason: reason.to_owned() };
            self.begin_compensation(plan, now, cause, out);
        } else {
            self.advance(plan, now, out);
        }
    }

    fn timer_fired(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        timer: &Timer,
        out: &mut Out,
    ) -> Result<(), Rejection> {
        let i = self.index(plan, &timer.step)?;
        let s = &self.steps[i];
        let expected = match (timer.phase, timer.kind) {
            (phase, TimerKind::Timeout) => {
                s.in_flight(phase, timer.attempt) && !s.awaiting_redelivery
            }
            // Found no responder, or sent unclaimed before a take-over.
            (phase, TimerKind::Redeliver) => {
                s.in_flight(phase, timer.attempt) && (s.awaiting_redelivery || s.exclusive)
            }
            (Phase::Action, TimerKind::Backoff) => {
                s.status == StepStatus::RetryWait
                    && s.attempt == timer.attempt
                    && self.status == SagaStatus::Running
            }
            (Phase::Compensation, TimerKind::Backoff) => {
                s.status == StepStatus::CompensationRetryWait && s.comp_attempt == timer.attempt
            }
        };
        if !expected {
            return Err(self.stale(i, timer.phase, timer.attempt));
        }
        self.steps[i].timer_at = None;
        let step = timer.step.clone();
        match (timer.phase, timer.kind) {
            (phase, TimerKind::Timeout) => {
                self.steps[i].attempt_settled();
                out.record(now, TimelineEvent::TimedOut { step, phase, attempt: timer.attempt });
                match phase {
                    Phase::Action if plan.steps()[i].awaits.is_some() => {
                        self.await_timed_out(plan, now, i, out)
                    }
                    Phase::Action => {
                        let reason = format!("attempt {} timed out", timer.attempt);
                        self.attempt_failed(plan, now, i, false, true, &reason, out);
                    }
                    Phase::Compensation => {
                        let reason = format!("compensation attempt {} timed out", timer.attempt);
                        self.compensation_attempt_failed(plan, now, i, &reason, true, out);
                    }
                }
            }
            // Maybe delivered before: claimed from now on.
            (phase, TimerKind::Redeliver) => {
                self.send(plan, now, i, phase, timer.attempt, false, out)
            }
            (phase, TimerKind::Backoff) => self.dispatch(plan, now, i, phase, out),
        }
        Ok(())
    }

    /// Await step `i` waited its whole timeout: it fails (nothing ran, so nothing is
    /// compensated for it) or, with `on_timeout: continue`, succeeds with no output.
    fn await_timed_out(&mut self, plan: &Plan, now: Timestamp, i: usize, out: &mut Out) {
        let def = &plan.steps()[i];
        let on_timeout = def.awaits.as_ref().map(|a| a.on_timeout).unwrap_or_default();
        let waited = humantime_serde::re::humantime::format_duration(def.timeout);
        let what = def.awaits.as_ref().map(|a| a.describe()).unwrap_or_default();
        match on_timeout {
            OnTimeout::Fail => {
                let reason = format!("no {what} within {waited}");
                self.steps[i].last_error = Some(reason.clone());
                self.attempt_failed(plan, now, i, false, false, &reason, out);
            }
            OnTimeout::Continue => {
                let s = &mut self.steps[i];
                s.status = StepStatus::Succeeded;
                s.output = None;
                out.fx.push(Effect::Publish {
                    kind: LifecycleKind::StepSucceeded,
                    step: Some(s.name.clone()),
                    reason: Some(format!("no {what} within {waited}; on_timeout: continue")),
                });
                self.advance(plan, now, out);
            }
        }
    }

    fn cancel(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        reason: &str,
        by: &Option<String>,
        out: &mut Out,
    ) -> Result<(), Rejection> {
        if let Some(p) = plan.pivot() {
            let why = match self.steps[p].status {
                StepStatus::Succeeded => {
                    Some("the pivot step succeeded; the saga can no longer be cancelled")
                }
                StepStatus::Running | StepStatus::RetryWait => {
                    Some("the pivot step is in flight; its outcome decides the saga")
                }
                _ => None,
            };
            if let Some(why) = why {
                return Err(Rejection::NotApplicable { event: "cancel", status: self.status, why });
            }
        }
        out.record(
            now,
            TimelineEvent::CancelRequested { reason: reason.to_owned(), by: by.clone() },
        );
        self.begin_compensation(plan, now, Cause::Cancelled { reason: reason.to_owned() }, out);
        Ok(())
    }

    fn begin_compensation(&mut self, plan: &Plan, now: Timestamp, cause: Cause, out: &mut Out) {
        self.status = SagaStatus::Compensating;
        let reason = match &cause {
            Cause::StepFailed { step, reason } => format!("step {step} failed: {reason}"),
            Cause::Cancelled { reason } => format!("cancelled: {reason}"),
        };
        out.record(now, TimelineEvent::CompensationStarted { cause: cause.clone() });
        self.cause = Some(cause);
        out.fx.push(Effect::Publish {
            kind: LifecycleKind::Compensating,
            step: None,
            reason: Some(reason),
        });
        // Steps waiting to retry will not be retried now, and await steps stop waiting: what
        // they wait for changes nothing that needs undoing.
        for i in 0..self.steps.len() {
            if self.steps[i].status == StepStatus::Running && plan.steps()[i].awaits.is_some() {
                let attempt = self.steps[i].attempt;
                self.cancel_timer(i, Phase::Action, attempt, TimerKind::Timeout, out);
                let s = &mut self.steps[i];
                s.status = StepStatus::Failed;
                s.last_error = Some("stopped waiting: the saga is compensating".to_owned());
                out.record(now, TimelineEvent::StoppedWaiting { step: s.name.clone() });
            }
            if self.steps[i].status == StepStatus::RetryWait {
                let attempt = self.steps[i].attempt;
                self.cancel_timer(i, Phase::Action, attempt, TimerKind::Backoff, out);
                let s = &mut self.steps[i];
                s.status = if s.timed_out { StepStatus::Unknown } else { StepStatus::Failed };
            }
        }
        self.advance(plan, now, out);
    }

    fn needs_compensation(&self, plan: &Plan, i: usize) -> bool {
        matches!(self.steps[i].status, StepStatus::Succeeded | StepStatus::Unknown)
            && plan.steps()[i].compensation.is_some()
    }

    /// Moves the saga forward as far as it can go now: dispatches what is ready, and finishes
    /// when nothing is left.
    fn advance(&mut self, plan: &Plan, now: Timestamp, out: &mut Out) {
        match self.status {
            SagaStatus::Running => {
                let ready: Vec<usize> = (0..self.steps.len())
                    .filter(|&i| {
                        self.steps[i].status == StepStatus::Pending
                            && plan
                                .deps(i)
                                .iter()
                                .all(|&d| self.steps[d].status == StepStatus::Succeeded)
                    })
                    .collect();
                for i in ready {
                    self.dispatch(plan, now, i, Phase::Action, out);
                }
                if self.steps.iter().all(|s| s.status == StepStatus::Succeeded) {
                    self.finish(now, SagaStatus::Completed, out);
                }
            }
            SagaStatus::Compensating => {
                // Compensate a step once everything that ran after it is settled.
                let ready: Vec<usize> = (0..self.steps.len())
                    .filter(|&i| {
                        self.needs_compensation(plan, i) && self.descendants_settled(plan, i)
                    })
                    .collect();
                for i in ready {
                    self.dispatch(plan, now, i, Phase::Compensation, out);
                }
                if (0..self.steps.len()).all(|i| self.settled(plan, i)) {
                    let status = match self.cause {
                        Some(Cause::Cancelled { .. }) => SagaStatus::Cancelled,
                        Some(Cause::StepFailed { .. }) | None => SagaStatus::Compensated,
                    };
                    self.finish(now, status, out);
                }
            }
            SagaStatus::NeedsIntervention
            | SagaStatus::New
            | SagaStatus::Completed
            | SagaStatus::Compensated
            | SagaStatus::Cancelled
            | SagaStatus::Resolved => {}
        }
    }

    /// Whether every step that runs after step `i`, directly or through other steps, needs
    /// nothing more: then `i` may be compensated.
    fn descendants_settled(&self, plan: &Plan, i: usize) -> bool {
        let mut seen = vec![false; self.steps.len()];
        let mut stack: Vec<usize> = plan.dependents(i).to_vec();
        while let Some(d) = stack.pop() {
            if std::mem::replace(&mut seen[d], true) {
                continue;
            }
            if !self.settled(plan, d) {
                return false;
            }
            stack.extend_from_slice(plan.dependents(d));
        }
        true
    }

    /// Whether step `i` needs nothing more during compensation.
    fn settled(&self, plan: &Plan, i: usize) -> bool {
        match self.steps[i].status {
            StepStatus::Pending
            | StepStatus::Failed
            | StepStatus::Compensated
            | StepStatus::CompensationSkipped => true,
            StepStatus::Succeeded | StepStatus::Unknown => !self.needs_compensation(plan, i),
            StepStatus::Running
            | StepStatus::RetryWait
            | StepStatus::Compensating
            | StepStatus::CompensationRetryWait
            | StepStatus::CompensationStuck => false,
        }
    }

    fn finish(&mut self, now: Timestamp, status: SagaStatus, out: &mut Out) {
        self.status = status;
        out.record(now, TimelineEvent::Finished { status });
        let kind = match status {
            SagaStatus::Completed => LifecycleKind::Completed,
            SagaStatus::Cancelled => LifecycleKind::Cancelled,
            SagaStatus::Resolved => LifecycleKind::Resolved,
            SagaStatus::Compensated
            | SagaStatus::New
            | SagaStatus::Running
            | SagaStatus::Compensating
            | SagaStatus::NeedsIntervention => LifecycleKind::Compensated,
        };
        out.fx.push(Effect::Publish { kind, step: None, reason: None });
        out.fx.push(Effect::Finish { status });
    }

    fn compensation_succeeded(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        step: &StepName,
        attempt: u32,
        out: &mut Out,
    ) -> Result<(), Rejection> {
        let i = self.index(plan, step)?;
        let s = &self.steps[i];
        let armed = match s.status {
            StepStatus::Compensating if s.comp_attempt == attempt => Some(s.in_flight_timer()),
            StepStatus::CompensationRetryWait if s.comp_attempt == attempt => {
                Some(TimerKind::Backoff)
            }
            // A late success of the attempt that exhausted the retries.
            StepStatus::CompensationStuck if s.comp_attempt == attempt => None,
            _ => return Err(self.stale(i, Phase::Compensation, attempt)),
        };
        match armed {
            Some(kind) => self.cancel_timer(i, Phase::Compensation, attempt, kind, out),
            None => self.steps[i].timer_at = None,
        }
        self.steps[i].attempt_settled();
        self.steps[i].status = StepStatus::Compensated;
        out.record(
            now,
            TimelineEvent::Succeeded { step: step.clone(), phase: Phase::Compensation, attempt },
        );
        out.fx.push(Effect::Publish {
            kind: LifecycleKind::StepCompensated,
            step: Some(step.clone()),
            reason: None,
        });
        // Nothing stuck any more: the saga no longer needs an operator.
        if self.status == SagaStatus::NeedsIntervention && self.stuck().is_empty() {
            self.status = SagaStatus::Compensating;
        }
        self.advance(plan, now, out);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn compensation_failed(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        step: &StepName,
        attempt: u32,
        reason: &str,
        transient: bool,
        out: &mut Out,
    ) -> Result<(), Rejection> {
        let i = self.index(plan, step)?;
        let s = &self.steps[i];
        if !s.in_flight(Phase::Compensation, attempt) {
            return Err(self.stale(i, Phase::Compensation, attempt));
        }
        let kind = s.in_flight_timer();
        self.cancel_timer(i, Phase::Compensation, attempt, kind, out);
        self.steps[i].attempt_settled();
        out.record(
            now,
            TimelineEvent::Failed {
                step: step.clone(),
                phase: Phase::Compensation,
                attempt,
                reason: reason.to_owned(),
                transient,
            },
        );
        self.compensation_attempt_failed(plan, now, i, reason, transient, out);
        Ok(())
    }

    /// A compensation attempt failed (a failure reply) or timed out: try again, or park the
    /// saga once the budget is spent. A timed-out attempt may have been slowed by NATS itself
    /// (a stream electing a leader, a node restarting), and a failure the participant calls
    /// `transient` has the same kinds of cause, so both get a longer budget (`long`):
    /// [`COMPENSATION_TIMEOUT_ATTEMPTS`] attempts, or the policy's `max_attempts` if larger.
    fn compensation_attempt_failed(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        i: usize,
        reason: &str,
        long: bool,
        out: &mut Out,
    ) {
        let s = &mut self.steps[i];
        s.last_error = Some(reason.to_owned());
        let max_attempts = plan.steps()[i].retry.max_attempts;
        let budget = match long {
            true => max_attempts.max(COMPENSATION_TIMEOUT_ATTEMPTS),
            false => max_attempts,
        };
        if s.comp_attempt - s.comp_budget_from < budget {
            self.backoff(plan, now, i, Phase::Compensation, out);
            return;
        }
        s.status = StepStatus::CompensationStuck;
        let why = format!(
            "compensation of step {} failed {} times: {reason}",
            s.name,
            s.comp_attempt - s.comp_budget_from
        );
        let step = s.name.clone();
        self.status = SagaStatus::NeedsIntervention;
        out.record(now, TimelineEvent::Parked { step: step.clone(), reason: why.clone() });
        out.fx.push(Effect::Publish {
            kind: LifecycleKind::NeedsIntervention,
            step: Some(step),
            reason: Some(why),
        });
    }

    fn stuck(&self) -> Vec<usize> {
        (0..self.steps.len())
            .filter(|&i| self.steps[i].status == StepStatus::CompensationStuck)
            .collect()
    }

    fn operator_retry(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        reason: &str,
        by: &Option<String>,
        out: &mut Out,
    ) {
        out.record(now, TimelineEvent::OperatorRetry { reason: reason.to_owned(), by: by.clone() });
        self.status = SagaStatus::Compensating;
        for i in self.stuck() {
            let s = &mut self.steps[i];
            s.comp_budget_from = s.comp_attempt;
            self.dispatch(plan, now, i, Phase::Compensation, out);
        }
        self.advance(plan, now, out);
    }

    fn operator_skip(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        reason: &str,
        by: &Option<String>,
        out: &mut Out,
    ) {
        out.record(now, TimelineEvent::OperatorSkip { reason: reason.to_owned(), by: by.clone() });
        self.status = SagaStatus::Compensating;
        for i in self.stuck() {
            self.steps[i].status = StepStatus::CompensationSkipped;
        }
        self.advance(plan, now, out);
    }

    fn operator_resolve(
        &mut self,
        now: Timestamp,
        reason: &str,
        by: &Option<String>,
        out: &mut Out,
    ) {
        out.record(
            now,
            TimelineEvent::OperatorResolve { reason: reason.to_owned(), by: by.clone() },
        );
        for i in 0..self.steps.len() {
            let s = &self.steps[i];
            let pending = match s.status {
                StepStatus::Running => Some((Phase::Action, s.attempt, s.in_flight_timer())),
                StepStatus::Compensating => {
                    Some((Phase::Compensation, s.comp_attempt, s.in_flight_timer()))
                }
                StepStatus::CompensationRetryWait => {
                    Some((Phase::Compensation, s.comp_attempt, TimerKind::Backoff))
                }
                _ => None,
            };
            if let Some((phase, attempt, kind)) = pending {
                self.cancel_timer(i, phase, attempt, kind, out);
                self.steps[i].attempt_settled();
            }
        }
        self.finish(now, SagaStatus::Resolved, out);
    }
}

/// The value at the dotted `path` of a MessagePack payload (the whole payload for an empty
/// path), as canonical JSON: what an await step matches on. `None` when the payload is not
/// a map-shaped MessagePack value, the path leads nowhere, or the value is nil.
///
/// # Examples
///
/// ```
/// use saga_core::correlation_value;
///
/// #[derive(serde::Serialize)]
/// struct Order { id: String, total: u32 }
/// let input = rmp_serde::to_vec_named(&Order { id: "o-1".into(), total: 7 }).unwrap();
/// assert_eq!(correlation_value(&input, "id").as_deref(), Some("\"o-1\""));
/// assert_eq!(correlation_value(&input, "total").as_deref(), Some("7"));
/// assert_eq!(correlation_value(&input, "missing"), None);
/// ```
pub fn correlation_value(payload: &[u8], path: &str) -> Option<String> {
    let mut value: serde_json::Value = crate::wire::decode_nested(payload).ok()?;
    if !path.is_empty() {
        for key in path.split('.') {
            value = match value {
                serde_json::Value::Object(mut map) => map.remove(key)?,
                _ => return None,
            };
        }
    }
    if value.is_null() {
        return None;
    }
    serde_json::to_string(&value).ok()
}
