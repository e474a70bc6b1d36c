//! The saga instance state machine: events in, effects out, no I/O.
//!
//! [`SagaState::handle`] takes the time and one [`Event`] and either accepts it, changing the
//! state and returning the [`Effect`]s the driver must carry out, or rejects it with a
//! [`Rejection`] that says why and changes nothing. The state is a plain serializable value,
//! and it equals the fold of the accepted events: [`SagaState::replay`] rebuilds it.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::definition::StepKind;
use crate::ids::{
    CommandId, CommandName, Phase, SagaId, SagaName, ServiceName, StepName, Timestamp,
};
use crate::retry::fnv1a;
use crate::validate::Plan;

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
    /// The action timed out and will not be retried: it may or may not have run, so it is
    /// compensated (the participant's barrier makes that safe if it never ran).
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

/// One step's state inside a [`SagaState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState {
    /// The step's name.
    pub name: StepName,
    /// Where it is.
    pub status: StepStatus,
    /// The action's latest attempt number (0: never dispatched).
    pub attempt: u32,
    /// The compensation's latest attempt number (0: never dispatched).
    pub comp_attempt: u32,
    /// Compensation attempts before this number were made before an operator's retry; the
    /// retry budget counts from here.
    pub comp_budget_from: u32,
    /// The latest action attempt timed out (its outcome is unknown).
    pub timed_out: bool,
    /// When the step's pending timer (timeout or backoff) fires, if it has one.
    pub timer_at: Option<Timestamp>,
    /// The action's output, once it succeeded.
    pub output: Option<Payload>,
    /// The latest failure reason.
    pub last_error: Option<String>,
}

/// What happened, as recorded in a saga's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryKind {
    /// The saga started.
    Started,
    /// A command was sent.
    Dispatched,
    /// A command succeeded.
    Succeeded,
    /// A command failed.
    Failed,
    /// A command timed out.
    TimedOut,
    /// A retry was scheduled.
    RetryScheduled,
    /// Compensation began.
    CompensationStarted,
    /// Cancellation was requested.
    CancelRequested,
    /// The saga parked in needs-intervention.
    Parked,
    /// An operator retried stuck compensations.
    OperatorRetry,
    /// An operator skipped stuck compensations.
    OperatorSkip,
    /// An operator marked the saga resolved.
    OperatorResolve,
    /// The saga ended.
    Finished,
}

/// One entry of a saga's history: every attempt of every step, when, which command, and how it
/// ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When.
    pub at: Timestamp,
    /// What.
    pub kind: HistoryKind,
    /// The step concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepName>,
    /// Action or compensation, when a step is concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The attempt concerned (0 when none).
    #[serde(default)]
    pub attempt: u32,
    /// The command sent, for dispatches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandName>,
    /// A reason, a status or a time, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
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
    /// Timeout of the attempt, or end of the backoff before the next one.
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
    },
    /// A timer fired: a timeout or the end of a backoff.
    TimerFired(Timer),
    /// Cancel the saga: compensate what is done. Refused once the pivot succeeded.
    Cancel {
        /// Why.
        reason: String,
    },
    /// Operator: retry the stuck compensations.
    OperatorRetry {
        /// Why (recorded in the history).
        reason: String,
    },
    /// Operator: skip the stuck compensations and go on.
    OperatorSkip {
        /// Why (recorded in the history).
        reason: String,
    },
    /// Operator: mark the saga resolved (ends it).
    OperatorResolve {
        /// Why (recorded in the history).
        reason: String,
    },
}

impl Event {
    /// The event's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Start { .. } => "start",
            Event::StepSucceeded { .. } => "step_succeeded",
            Event::StepFailed { .. } => "step_failed",
            Event::CompensationSucceeded { .. } => "compensation_succeeded",
            Event::CompensationFailed { .. } => "compensation_failed",
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
}

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

/// Something the driver must do. Effects are data: the state machine never performs them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Effect {
    /// Send a command to a participant.
    Dispatch(Dispatch),
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
}

impl Rule {
    /// Every row of the table.
    pub const ALL: [Rule; 19] = [
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
    ];
}

/// The result of handling one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Handled {
    /// The row of the table that handled the event.
    pub rule: Rule,
    /// What the driver must do, or why the event changed nothing.
    pub result: Result<Vec<Effect>, Rejection>,
}

/// A saga instance: a serializable value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    /// The instance id.
    pub id: SagaId,
    /// The definition's name.
    pub saga: SagaName,
    /// The definition version (digest) the instance runs.
    pub digest: String,
    /// Where it is.
    pub status: SagaStatus,
    /// Its input.
    pub input: Payload,
    /// Each step's state, in definition order.
    pub steps: Vec<StepState>,
    /// Why it is compensating, once it is.
    pub cause: Option<Cause>,
    /// Everything that happened.
    pub history: Vec<HistoryEntry>,
    /// When it started.
    pub started_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// How many events it accepted.
    pub events: u64,
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
                })
                .collect(),
            cause: None,
            history: Vec::new(),
            started_at: Timestamp(0),
            updated_at: Timestamp(0),
            events: 0,
        }
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
            return Handled { rule, result: Err(rejection) };
        }
        let mut fx = Vec::new();
        let (rule, outcome): (Rule, Result<(), Rejection>) = match (self.status, event) {
            (S::New, Event::Start { input }) => (Rule::Start, {
                self.start(plan, now, input, &mut fx);
                Ok(())
            }),
            (
                S::New,
                Event::StepSucceeded { .. }
                | Event::StepFailed { .. }
                | Event::CompensationSucceeded { .. }
                | Event::CompensationFailed { .. }
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
                | Event::CompensationSucceeded { .. }
                | Event::CompensationFailed { .. }
                | Event::TimerFired(_)
                | Event::Cancel { .. }
                | Event::OperatorRetry { .. }
                | Event::OperatorSkip { .. }
                | Event::OperatorResolve { .. },
            ) => (Rule::Finished, Err(Rejection::Finished { status, event: event.name() })),

            (S::Running, Event::StepSucceeded { step, attempt, output }) => (
                Rule::ActionSucceeded,
                self.action_succeeded(plan, now, step, *attempt, output, &mut fx),
            ),
            (S::Running, Event::StepFailed { step, attempt, reason, transient }) => (
                Rule::ActionFailed,
                self.action_failed(plan, now, step, *attempt, reason, *transient, &mut fx),
            ),
            (S::Running, Event::TimerFired(timer)) => {
                (Rule::RunningTimer, self.timer_fired(plan, now, timer, &mut fx))
            }
            (
                S::Running,
                Event::CompensationSucceeded { step, attempt }
                | Event::CompensationFailed { step, attempt, .. },
            ) => (
                Rule::NoCompensationRunning,
                Err(self.stale_or_unknown(plan, step, Phase::Compensation, *attempt)),
            ),
            (S::Running, Event::Cancel { reason }) => {
                (Rule::CancelRunning, self.cancel(plan, now, reason, &mut fx))
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
                S::Compensating | S::NeedsIntervention,
                Event::StepSucceeded { step, attempt, output },
            ) => (
                Rule::LateActionSucceeded,
                self.action_succeeded(plan, now, step, *attempt, output, &mut fx),
            ),
            (
                S::Compensating | S::NeedsIntervention,
                Event::StepFailed { step, attempt, reason, transient },
            ) => (
                Rule::LateActionFailed,
                self.action_failed(plan, now, step, *attempt, reason, *transient, &mut fx),
            ),
            (
                S::Compensating | S::NeedsIntervention,
                Event::CompensationSucceeded { step, attempt },
            ) => (
                Rule::CompensationSucceeded,
                self.compensation_succeeded(plan, now, step, *attempt, &mut fx),
            ),
            (
                S::Compensating | S::NeedsIntervention,
                Event::CompensationFailed { step, attempt, reason },
            ) => (
                Rule::CompensationFailed,
                self.compensation_failed(plan, now, step, *attempt, reason, &mut fx),
            ),
            (S::Compensating | S::NeedsIntervention, Event::TimerFired(timer)) => {
                (Rule::CompensatingTimer, self.timer_fired(plan, now, timer, &mut fx))
            }
            (status @ (S::Compensating | S::NeedsIntervention), Event::Cancel { .. }) => (
                Rule::AlreadyCompensating,
                Err(Rejection::NotApplicable {
                    event: event.name(),
                    status,
                    why: "the saga is already being compensated",
                }),
            ),
            (S::NeedsIntervention, Event::OperatorRetry { reason }) => (Rule::OperatorRetry, {
                self.operator_retry(plan, now, reason, &mut fx);
                Ok(())
            }),
            (S::NeedsIntervention, Event::OperatorSkip { reason }) => (Rule::OperatorSkip, {
                self.operator_skip(plan, now, reason, &mut fx);
                Ok(())
            }),
            (S::NeedsIntervention, Event::OperatorResolve { reason }) => (Rule::OperatorResolve, {
                self.operator_resolve(now, reason, &mut fx);
                Ok(())
            }),
        };
        match outcome {
            Ok(()) => {
                self.events += 1;
                self.updated_at = now;
                Handled { rule, result: Ok(fx) }
            }
            Err(rejection) => Handled { rule, result: Err(rejection) },
        }
    }

    /// The effects that must already have happened for the saga to make progress: the
    /// in-flight commands and the pending timers. A driver that is not sure the effects of
    /// the latest transition were carried out (after a crash, or on a redelivered event)
    /// carries these out again; they are idempotent (same command ids, same timers).
    pub fn outstanding(&self, plan: &Plan) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.status.is_terminal() {
            return fx;
        }
        for (i, s) in self.steps.iter().enumerate() {
            let at = s.timer_at.unwrap_or(self.updated_at);
            let (phase, attempt, kind) = match s.status {
                StepStatus::Running => (Phase::Action, s.attempt, TimerKind::Timeout),
                StepStatus::RetryWait => (Phase::Action, s.attempt, TimerKind::Backoff),
                StepStatus::Compensating => {
                    (Phase::Compensation, s.comp_attempt, TimerKind::Timeout)
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
            if kind == TimerKind::Timeout {
                fx.push(Effect::Dispatch(self.command(plan, i, phase, attempt, at)));
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

    fn record(
        &mut self,
        now: Timestamp,
        kind: HistoryKind,
        step: Option<(usize, Phase, u32)>,
        detail: Option<String>,
    ) {
        let (step, phase, attempt) = match step {
            Some((i, phase, attempt)) => (Some(self.steps[i].name.clone()), Some(phase), attempt),
            None => (None, None, 0),
        };
        self.history.push(HistoryEntry {
            at: now,
            kind,
            step,
            phase,
            attempt,
            command: None,
            detail,
        });
    }

    fn start(&mut self, plan: &Plan, now: Timestamp, input: &Payload, fx: &mut Vec<Effect>) {
        self.status = SagaStatus::Running;
        self.input = input.clone();
        self.started_at = now;
        self.record(now, HistoryKind::Started, None, None);
        fx.push(Effect::Publish { kind: LifecycleKind::Started, step: None, reason: None });
        self.advance(plan, now, fx);
    }

    fn command(
        &self,
        plan: &Plan,
        i: usize,
        phase: Phase,
        attempt: u32,
        deadline: Timestamp,
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
        }
    }

    /// Sends the next attempt of step `i`'s `phase` and arms its timeout.
    fn dispatch(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        i: usize,
        phase: Phase,
        fx: &mut Vec<Effect>,
    ) {
        let deadline = now.after(plan.steps()[i].timeout);
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
        s.timer_at = Some(deadline);
        let dispatch = self.command(plan, i, phase, attempt, deadline);
        self.history.push(HistoryEntry {
            at: now,
            kind: HistoryKind::Dispatched,
            step: Some(dispatch.step.clone()),
            phase: Some(phase),
            attempt,
            command: Some(dispatch.command.clone()),
            detail: Some(format!("to {}, id {}", dispatch.service, dispatch.command_id)),
        });
        let timer = Timer { step: dispatch.step.clone(), phase, attempt, kind: TimerKind::Timeout };
        fx.push(Effect::Dispatch(dispatch));
        fx.push(Effect::ScheduleTimer { timer, at: deadline });
    }

    fn cancel_timer(
        &mut self,
        i: usize,
        phase: Phase,
        attempt: u32,
        kind: TimerKind,
        fx: &mut Vec<Effect>,
    ) {
        let s = &mut self.steps[i];
        s.timer_at = None;
        fx.push(Effect::CancelTimer {
            timer: Timer { step: s.name.clone(), phase, attempt, kind },
        });
    }

    /// Arms the backoff timer before the next attempt of step `i`'s `phase`.
    fn backoff(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        i: usize,
        phase: Phase,
        fx: &mut Vec<Effect>,
    ) {
        let s = &mut self.steps[i];
        let attempt = match phase {
            Phase::Action => s.attempt,
            Phase::Compensation => s.comp_attempt,
        };
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
        let timer = Timer { step: s.name.clone(), phase, attempt, kind: TimerKind::Backoff };
        self.record(
            now,
            HistoryKind::RetryScheduled,
            Some((i, phase, attempt + 1)),
            Some(format!("at {}", at.0)),
        );
        fx.push(Effect::ScheduleTimer { timer, at });
    }

    fn action_succeeded(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        step: &StepName,
        attempt: u32,
        output: &Payload,
        fx: &mut Vec<Effect>,
    ) -> Result<(), Rejection> {
        let i = self.index(plan, step)?;
        let s = &self.steps[i];
        let kind = match s.status {
            StepStatus::Running if s.attempt == attempt => TimerKind::Timeout,
            // A late success of the attempt that failed or timed out: take it.
            StepStatus::RetryWait if s.attempt == attempt && self.status == SagaStatus::Running => {
                TimerKind::Backoff
            }
            _ => return Err(self.stale(i, Phase::Action, attempt)),
        };
        self.cancel_timer(i, Phase::Action, attempt, kind, fx);
        let s = &mut self.steps[i];
        s.status = StepStatus::Succeeded;
        s.output = Some(output.clone());
        self.record(now, HistoryKind::Succeeded, Some((i, Phase::Action, attempt)), None);
        fx.push(Effect::Publish {
            kind: LifecycleKind::StepSucceeded,
            step: Some(step.clone()),
            reason: None,
        });
        self.advance(plan, now, fx);
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
        fx: &mut Vec<Effect>,
    ) -> Result<(), Rejection> {
        let i = self.index(plan, step)?;
        let s = &self.steps[i];
        if !(s.status == StepStatus::Running && s.attempt == attempt) {
            return Err(self.stale(i, Phase::Action, attempt));
        }
        self.cancel_timer(i, Phase::Action, attempt, TimerKind::Timeout, fx);
        self.steps[i].last_error = Some(reason.to_owned());
        let what = if transient { "transient error" } else { "business failure" };
        self.record(
            now,
            HistoryKind::Failed,
            Some((i, Phase::Action, attempt)),
            Some(format!("{what}: {reason}")),
        );
        self.attempt_failed(plan, now, i, transient, false, reason, fx);
        Ok(())
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
        fx: &mut Vec<Effect>,
    ) {
        let def = &plan.steps()[i];
        let s = &mut self.steps[i];
        // Once any attempt timed out, the action may have run: its outcome stays unknown.
        s.timed_out |= timed_out;
        let retriable = def.kind == StepKind::Retriable;
        let may_retry =
            retriable || ((transient || timed_out) && s.attempt < def.retry.max_attempts);
        if self.status == SagaStatus::Running && may_retry {
            self.backoff(plan, now, i, Phase::Action, fx);
            return;
        }
        s.status = if s.timed_out { StepStatus::Unknown } else { StepStatus::Failed };
        fx.push(Effect::Publish {
            kind: LifecycleKind::StepFailed,
            step: Some(s.name.clone()),
            reason: Some(reason.to_owned()),
        });
        if self.status == SagaStatus::Running {
            let cause = Cause::StepFailed { step: s.name.clone(), reason: reason.to_owned() };
            self.begin_compensation(plan, now, cause, fx);
        } else {
            self.advance(plan, now, fx);
        }
    }

    fn timer_fired(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        timer: &Timer,
        fx: &mut Vec<Effect>,
    ) -> Result<(), Rejection> {
        let i = self.index(plan, &timer.step)?;
        let s = &self.steps[i];
        let expected = match (timer.phase, timer.kind) {
            (Phase::Action, TimerKind::Timeout) => {
                s.status == StepStatus::Running && s.attempt == timer.attempt
            }
            (Phase::Action, TimerKind::Backoff) => {
                s.status == StepStatus::RetryWait
                    && s.attempt == timer.attempt
                    && self.status == SagaStatus::Running
            }
            (Phase::Compensation, TimerKind::Timeout) => {
                s.status == StepStatus::Compensating && s.comp_attempt == timer.attempt
            }
            (Phase::Compensation, TimerKind::Backoff) => {
                s.status == StepStatus::CompensationRetryWait && s.comp_attempt == timer.attempt
            }
        };
        if !expected {
            return Err(self.stale(i, timer.phase, timer.attempt));
        }
        self.steps[i].timer_at = None;
        match (timer.phase, timer.kind) {
            (Phase::Action, TimerKind::Timeout) => {
                self.record(
                    now,
                    HistoryKind::TimedOut,
                    Some((i, Phase::Action, timer.attempt)),
                    None,
                );
                let reason = format!("attempt {} timed out", timer.attempt);
                self.attempt_failed(plan, now, i, false, true, &reason, fx);
            }
            (Phase::Action, TimerKind::Backoff) => self.dispatch(plan, now, i, Phase::Action, fx),
            (Phase::Compensation, TimerKind::Timeout) => {
                self.record(
                    now,
                    HistoryKind::TimedOut,
                    Some((i, Phase::Compensation, timer.attempt)),
                    None,
                );
                let reason = format!("compensation attempt {} timed out", timer.attempt);
                self.compensation_attempt_failed(plan, now, i, &reason, fx);
            }
            (Phase::Compensation, TimerKind::Backoff) => {
                self.dispatch(plan, now, i, Phase::Compensation, fx)
            }
        }
        Ok(())
    }

    fn cancel(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        reason: &str,
        fx: &mut Vec<Effect>,
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
        self.record(now, HistoryKind::CancelRequested, None, Some(reason.to_owned()));
        self.begin_compensation(plan, now, Cause::Cancelled { reason: reason.to_owned() }, fx);
        Ok(())
    }

    fn begin_compensation(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        cause: Cause,
        fx: &mut Vec<Effect>,
    ) {
        self.status = SagaStatus::Compensating;
        let reason = match &cause {
            Cause::StepFailed { step, reason } => format!("step {step} failed: {reason}"),
            Cause::Cancelled { reason } => format!("cancelled: {reason}"),
        };
        self.cause = Some(cause);
        self.record(now, HistoryKind::CompensationStarted, None, Some(reason.clone()));
        fx.push(Effect::Publish {
            kind: LifecycleKind::Compensating,
            step: None,
            reason: Some(reason),
        });
        // Steps waiting to retry will not be retried now.
        for i in 0..self.steps.len() {
            if self.steps[i].status == StepStatus::RetryWait {
                let attempt = self.steps[i].attempt;
                self.cancel_timer(i, Phase::Action, attempt, TimerKind::Backoff, fx);
                let s = &mut self.steps[i];
                s.status = if s.timed_out { StepStatus::Unknown } else { StepStatus::Failed };
            }
        }
        self.advance(plan, now, fx);
    }

    fn needs_compensation(&self, plan: &Plan, i: usize) -> bool {
        matches!(self.steps[i].status, StepStatus::Succeeded | StepStatus::Unknown)
            && plan.steps()[i].compensation.is_some()
    }

    /// Moves the saga forward as far as it can go now: dispatches what is ready, and finishes
    /// when nothing is left.
    fn advance(&mut self, plan: &Plan, now: Timestamp, fx: &mut Vec<Effect>) {
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
                    self.dispatch(plan, now, i, Phase::Action, fx);
                }
                if self.steps.iter().all(|s| s.status == StepStatus::Succeeded) {
                    self.finish(now, SagaStatus::Completed, fx);
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
                    self.dispatch(plan, now, i, Phase::Compensation, fx);
                }
                if (0..self.steps.len()).all(|i| self.settled(plan, i)) {
                    let status = match self.cause {
                        Some(Cause::Cancelled { .. }) => SagaStatus::Cancelled,
                        Some(Cause::StepFailed { .. }) | None => SagaStatus::Compensated,
                    };
                    self.finish(now, status, fx);
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

    fn finish(&mut self, now: Timestamp, status: SagaStatus, fx: &mut Vec<Effect>) {
        self.status = status;
        self.record(now, HistoryKind::Finished, None, Some(status.to_string()));
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
        fx.push(Effect::Publish { kind, step: None, reason: None });
        fx.push(Effect::Finish { status });
    }

    fn compensation_succeeded(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        step: &StepName,
        attempt: u32,
        fx: &mut Vec<Effect>,
    ) -> Result<(), Rejection> {
        let i = self.index(plan, step)?;
        let s = &self.steps[i];
        let armed = match s.status {
            StepStatus::Compensating if s.comp_attempt == attempt => Some(TimerKind::Timeout),
            StepStatus::CompensationRetryWait if s.comp_attempt == attempt => {
                Some(TimerKind::Backoff)
            }
            // A late success of the attempt that exhausted the retries.
            StepStatus::CompensationStuck if s.comp_attempt == attempt => None,
            _ => return Err(self.stale(i, Phase::Compensation, attempt)),
        };
        match armed {
            Some(kind) => self.cancel_timer(i, Phase::Compensation, attempt, kind, fx),
            None => self.steps[i].timer_at = None,
        }
        self.steps[i].status = StepStatus::Compensated;
        self.record(now, HistoryKind::Succeeded, Some((i, Phase::Compensation, attempt)), None);
        fx.push(Effect::Publish {
            kind: LifecycleKind::StepCompensated,
            step: Some(step.clone()),
            reason: None,
        });
        // Nothing stuck any more: the saga no longer needs an operator.
        if self.status == SagaStatus::NeedsIntervention && self.stuck().is_empty() {
            self.status = SagaStatus::Compensating;
        }
        self.advance(plan, now, fx);
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
        fx: &mut Vec<Effect>,
    ) -> Result<(), Rejection> {
        let i = self.index(plan, step)?;
        let s = &self.steps[i];
        if !(s.status == StepStatus::Compensating && s.comp_attempt == attempt) {
            return Err(self.stale(i, Phase::Compensation, attempt));
        }
        self.cancel_timer(i, Phase::Compensation, attempt, TimerKind::Timeout, fx);
        self.record(
            now,
            HistoryKind::Failed,
            Some((i, Phase::Compensation, attempt)),
            Some(reason.to_owned()),
        );
        self.compensation_attempt_failed(plan, now, i, reason, fx);
        Ok(())
    }

    fn compensation_attempt_failed(
        &mut self,
        plan: &Plan,
        now: Timestamp,
        i: usize,
        reason: &str,
        fx: &mut Vec<Effect>,
    ) {
        let s = &mut self.steps[i];
        s.last_error = Some(reason.to_owned());
        if s.comp_attempt - s.comp_budget_from < plan.steps()[i].retry.max_attempts {
            self.backoff(plan, now, i, Phase::Compensation, fx);
            return;
        }
        s.status = StepStatus::CompensationStuck;
        let why = format!(
            "compensation of step {} failed {} times: {reason}",
            s.name,
            s.comp_attempt - s.comp_budget_from
        );
        let step = s.name.clone();
        if self.status != SagaStatus::NeedsIntervention {
            self.status = SagaStatus::NeedsIntervention;
        }
        self.record(
            now,
            HistoryKind::Parked,
            Some((i, Phase::Compensation, self.steps[i].comp_attempt)),
            Some(why.clone()),
        );
        fx.push(Effect::Publish {
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

    fn operator_retry(&mut self, plan: &Plan, now: Timestamp, reason: &str, fx: &mut Vec<Effect>) {
        self.record(now, HistoryKind::OperatorRetry, None, Some(reason.to_owned()));
        self.status = SagaStatus::Compensating;
        for i in self.stuck() {
            let s = &mut self.steps[i];
            s.comp_budget_from = s.comp_attempt;
            self.dispatch(plan, now, i, Phase::Compensation, fx);
        }
        self.advance(plan, now, fx);
    }

    fn operator_skip(&mut self, plan: &Plan, now: Timestamp, reason: &str, fx: &mut Vec<Effect>) {
        self.record(now, HistoryKind::OperatorSkip, None, Some(reason.to_owned()));
        self.status = SagaStatus::Compensating;
        for i in self.stuck() {
            self.steps[i].status = StepStatus::CompensationSkipped;
        }
        self.advance(plan, now, fx);
    }

    fn operator_resolve(&mut self, now: Timestamp, reason: &str, fx: &mut Vec<Effect>) {
        self.record(now, HistoryKind::OperatorResolve, None, Some(reason.to_owned()));
        for i in 0..self.steps.len() {
            let s = &self.steps[i];
            let pending = match s.status {
                StepStatus::Running => Some((Phase::Action, s.attempt, TimerKind::Timeout)),
                StepStatus::Compensating => {
                    Some((Phase::Compensation, s.comp_attempt, TimerKind::Timeout))
                }
                StepStatus::CompensationRetryWait => {
                    Some((Phase::Compensation, s.comp_attempt, TimerKind::Backoff))
                }
                _ => None,
            };
            if let Some((phase, attempt, kind)) = pending {
                self.cancel_timer(i, phase, attempt, kind, fx);
            }
        }
        self.finish(now, SagaStatus::Resolved, fx);
    }
}
