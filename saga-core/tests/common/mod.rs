//! Shared helpers for the state-machine tests: a participant model, a saga simulator that keeps
//! the driver's view (in-flight commands, armed timers, accepted-event log), a random-run driver
//! and a generator of random valid definitions.
//!
//! Each test crate uses a subset of these helpers.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use saga_core::{
    Awaiting, Dispatch, Effect, Event, Handled, Payload, Phase, Plan, Rejection, RetryPolicy,
    SagaDefinition, SagaId, SagaSnapshot, SagaState, SagaStatus, StepKind, StepName, StepStatus,
    TimelineEntry, Timer, TimerKind, Timestamp,
};

/// The id of every simulated saga, so command ids read `id.<step>.<a|c>.<attempt>`.
pub(crate) const SAGA_ID: &str = "id";

/// The most events a random run sends before it is driven to completion deterministically.
pub(crate) const MAX_RANDOM_EVENTS: usize = 500;

/// The output a participant returns for step `step` (the same for every attempt).
pub(crate) fn output_of(step: &StepName) -> Payload {
    Payload::new(format!("out:{step}").into_bytes())
}

/// The saga input used by the simulator.
pub(crate) fn saga_input() -> Payload {
    Payload::new(b"input".to_vec())
}

// ---------------------------------------------------------------------------------------------
// Event constructors.

/// `StepSucceeded` for `step`'s `attempt`, with the participant's output.
pub(crate) fn succeeded(step: &str, attempt: u32) -> Event {
    let step = StepName::from(step);
    Event::StepSucceeded { output: output_of(&step), step, attempt }
}

/// `StepFailed` for `step`'s `attempt`.
/// The coordinator's refusal of a success whose output it cannot keep.
pub(crate) fn refused(step: StepName, attempt: u32) -> Event {
    Event::StepOutputRefused { step, attempt, reason: "output too large".into() }
}

pub(crate) fn failed(step: &str, attempt: u32, transient: bool) -> Event {
    let reason = if transient { "unavailable" } else { "declined" };
    Event::StepFailed { step: step.into(), attempt, reason: reason.into(), transient }
}

/// `CompensationSucceeded` for `step`'s compensation `attempt`.
pub(crate) fn comp_ok(step: &str, attempt: u32) -> Event {
    Event::CompensationSucceeded { step: step.into(), attempt }
}

/// `CompensationFailed` for `step`'s compensation `attempt`.
pub(crate) fn comp_failed(step: &str, attempt: u32) -> Event {
    Event::CompensationFailed {
        step: step.into(),
        attempt,
        reason: "comp unavailable".into(),
        transient: false,
    }
}

/// A timer event.
pub(crate) fn timer(step: &str, phase: Phase, attempt: u32, kind: TimerKind) -> Event {
    Event::TimerFired(Timer { step: step.into(), phase, attempt, kind })
}

/// The action timeout of `step`'s `attempt`.
pub(crate) fn timeout(step: &str, attempt: u32) -> Event {
    timer(step, Phase::Action, attempt, TimerKind::Timeout)
}

/// The end of the backoff after `step`'s action `attempt`.
pub(crate) fn backoff(step: &str, attempt: u32) -> Event {
    timer(step, Phase::Action, attempt, TimerKind::Backoff)
}

/// `Undelivered` for `step`'s action `attempt`.
pub(crate) fn undelivered(step: &str, attempt: u32) -> Event {
    Event::Undelivered { step: step.into(), phase: Phase::Action, attempt }
}

/// The redelivery of `step`'s action `attempt`.
pub(crate) fn redeliver(step: &str, attempt: u32) -> Event {
    timer(step, Phase::Action, attempt, TimerKind::Redeliver)
}

/// `Cancel`.
pub(crate) fn cancel() -> Event {
    Event::Cancel { reason: "customer changed their mind".into(), by: None }
}

// ---------------------------------------------------------------------------------------------
// Effect summaries, for exact assertions that stay readable.

fn timer_str(t: &Timer) -> String {
    let kind = match t.kind {
        TimerKind::Timeout => "timeout",
        TimerKind::Backoff => "backoff",
        TimerKind::Redeliver => "redeliver",
    };
    format!("{}.{}.{}.{kind}", t.step, t.phase.code(), t.attempt)
}

/// One line per effect: `dispatch <command id> <command> @<deadline>`, `arm <timer> @<at>`,
/// `disarm <timer>`, `publish <kind> [<step>]`, `finish <status>`; timers read
/// `<step>.<a|c>.<attempt>.<timeout|backoff|redeliver>`.
pub(crate) fn summary(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .map(|e| match e {
            Effect::Dispatch(d) => {
                format!("dispatch {} {} @{}", d.command_id, d.command, d.deadline.0)
            }
            Effect::ScheduleTimer { timer, at } => format!("arm {} @{}", timer_str(timer), at.0),
            Effect::CancelTimer { timer } => format!("disarm {}", timer_str(timer)),
            Effect::Publish { kind, step, .. } => match step {
                Some(step) => format!("publish {} {step}", kind.as_str()),
                None => format!("publish {}", kind.as_str()),
            },
            Effect::Finish { status } => format!("finish {status}"),
            Effect::Await(a) => format!("await {} {} @{}", a.step, a.on, a.deadline.0),
        })
        .collect()
}

/// The dispatches among `effects`.
pub(crate) fn dispatches(effects: &[Effect]) -> Vec<&Dispatch> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch(d) => Some(d),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Plans.

/// A retry policy without jitter, so backoff times are exact: 100 ms, 200 ms, 400 ms...
pub(crate) fn exact_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(10),
        multiplier: 2.0,
        jitter: 0.0,
    }
}

/// Validates `def`, panicking with the error if it is refused.
pub(crate) fn plan(def: SagaDefinition) -> Plan {
    match def.validate() {
        Ok(plan) => plan,
        Err(e) => panic!("test definition refused: {e}"),
    }
}

/// The chain `a -> b -> c`: each step compensatable (`undo-<x>`), 1 s timeout, 3 attempts.
pub(crate) fn chain3() -> Plan {
    let mut b = SagaDefinition::builder("chain3");
    for name in ["a", "b", "c"] {
        b = b.step(name, &format!("svc-{name}"), &format!("do-{name}"), |s| {
            s.compensation(&format!("undo-{name}"))
                .timeout(Duration::from_secs(1))
                .retry(exact_retry(3))
        });
    }
    plan(b.build())
}

/// The diamond `a -> {b, c} -> d`, each step compensatable, 1 s timeout, 3 attempts.
pub(crate) fn diamond() -> Plan {
    let step = |s: saga_core::StepBuilder, name: &str, after: &[&str]| {
        s.compensation(&format!("undo-{name}"))
            .after(after)
            .timeout(Duration::from_secs(1))
            .retry(exact_retry(3))
    };
    plan(
        SagaDefinition::builder("diamond")
            .step("a", "svc-a", "do-a", |s| step(s, "a", &[]))
            .step("b", "svc-b", "do-b", |s| step(s, "b", &["a"]))
            .step("c", "svc-c", "do-c", |s| step(s, "c", &["a"]))
            .step("d", "svc-d", "do-d", |s| step(s, "d", &["b", "c"]))
            .build(),
    )
}

/// `a` (compensatable) `-> p` (pivot) `-> r` (retriable, `max_attempts` 2).
pub(crate) fn pivot_plan() -> Plan {
    plan(
        SagaDefinition::builder("pivoted")
            .step("a", "svc-a", "do-a", |s| {
                s.compensation("undo-a").timeout(Duration::from_secs(1)).retry(exact_retry(3))
            })
            .step("p", "svc-p", "do-p", |s| {
                s.kind(StepKind::Pivot).timeout(Duration::from_secs(1)).retry(exact_retry(2))
            })
            .step("r", "svc-r", "do-r", |s| {
                s.kind(StepKind::Retriable).timeout(Duration::from_secs(1)).retry(exact_retry(2))
            })
            .build(),
    )
}

// ---------------------------------------------------------------------------------------------
// The participant model.

/// What a run would like a participant to answer (the participant may answer otherwise: it
/// deduplicates, and its barrier refuses an action after its compensation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wish {
    /// Succeed (run the effect).
    Success,
    /// A business failure (recorded: later attempts get the same answer).
    Business,
    /// A transient failure (nothing done; later copies of the same attempt get the same
    /// answer, a later attempt runs).
    Transient,
    /// Succeed with an output the coordinator cannot keep (the effect ran; every later
    /// attempt gets the same output, refused again).
    OutputRefused,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ActionRecord {
    Executed(Payload),
    /// Executed, with an output the coordinator refuses.
    Refused,
    Declined(String),
    /// This attempt failed transiently (the SDK's `failed` effect record).
    Failed(u32),
}

/// A participant with the usual guarantees: an action runs at most once per step (effects
/// keyed by [`saga_core::CommandId::effect_key`]; a later attempt gets the recorded reply), a
/// compensation whose action never ran is a recorded no-op, and an action arriving after its
/// compensation does not run and fails (the barrier).
#[derive(Debug, Clone, Default)]
pub(crate) struct Participant {
    actions: BTreeMap<StepName, ActionRecord>,
    compensations: BTreeSet<StepName>,
    /// How many times each (step, phase) effect was actually carried out.
    pub(crate) executed: BTreeMap<(StepName, Phase), u32>,
    /// How many commands of each (step, phase) arrived.
    pub(crate) received: BTreeMap<(StepName, Phase), u32>,
    /// Compensations that were no-ops (their action never ran).
    pub(crate) noop_compensations: BTreeMap<StepName, u32>,
    /// Actions refused by the barrier.
    pub(crate) barrier_refusals: BTreeMap<StepName, u32>,
}

impl Participant {
    /// Handles one command and returns the reply.
    pub(crate) fn handle(&mut self, d: &Dispatch, wish: Wish) -> Event {
        *self.received.entry((d.step.clone(), d.phase)).or_default() += 1;
        match d.phase {
            Phase::Action => self.action(d, wish),
            Phase::Compensation => self.compensation(d, wish),
        }
    }

    fn action(&mut self, d: &Dispatch, wish: Wish) -> Event {
        let step = d.step.clone();
        let attempt = d.attempt;
        if self.compensations.contains(&step) {
            *self.barrier_refusals.entry(step.clone()).or_default() += 1;
            let reason = "compensated before the action arrived".to_owned();
            return Event::StepFailed { step, attempt, reason, transient: false };
        }
        match self.actions.get(&step) {
            Some(ActionRecord::Executed(output)) => {
                return Event::StepSucceeded { step, attempt, output: output.clone() }
            }
            Some(ActionRecord::Refused) => return refused(step, attempt),
            Some(ActionRecord::Declined(reason)) => {
                return Event::StepFailed {
                    step,
                    attempt,
                    reason: reason.clone(),
                    transient: false,
                }
            }
            Some(ActionRecord::Failed(failed)) if attempt <= *failed => {
                return Event::StepFailed {
                    step,
                    attempt,
                    reason: "unavailable".into(),
                    transient: true,
                }
            }
            Some(ActionRecord::Failed(_)) | None => {}
        }
        match wish {
            Wish::Success => {
                let output = output_of(&step);
                self.actions.insert(step.clone(), ActionRecord::Executed(output.clone()));
                *self.executed.entry((step.clone(), Phase::Action)).or_default() += 1;
                Event::StepSucceeded { step, attempt, output }
            }
            Wish::Business => {
                let reason = "declined".to_owned();
                self.actions.insert(step.clone(), ActionRecord::Declined(reason.clone()));
                Event::StepFailed { step, attempt, reason, transient: false }
            }
            Wish::Transient => {
                self.actions.insert(step.clone(), ActionRecord::Failed(attempt));
                Event::StepFailed { step, attempt, reason: "unavailable".into(), transient: true }
            }
            Wish::OutputRefused => {
                self.actions.insert(step.clone(), ActionRecord::Refused);
                *self.executed.entry((step.clone(), Phase::Action)).or_default() += 1;
                refused(step, attempt)
            }
        }
    }

    fn compensation(&mut self, d: &Dispatch, wish: Wish) -> Event {
        let step = d.step.clone();
        let attempt = d.attempt;
        if self.compensations.contains(&step) {
            return Event::CompensationSucceeded { step, attempt };
        }
        if wish != Wish::Success {
            return Event::CompensationFailed {
                step,
                attempt,
                reason: "comp unavailable".into(),
                transient: false,
            };
        }
        self.compensations.insert(step.clone());
        if self.action_executed(&step) {
            *self.executed.entry((step.clone(), Phase::Compensation)).or_default() += 1;
        } else {
            *self.noop_compensations.entry(step.clone()).or_default() += 1;
        }
        Event::CompensationSucceeded { step, attempt }
    }

    /// Whether `step`'s action effect was carried out.
    pub(crate) fn action_executed(&self, step: &StepName) -> bool {
        matches!(self.actions.get(step), Some(ActionRecord::Executed(_) | ActionRecord::Refused))
    }

    /// Whether `step`'s compensation was recorded (carried out or a no-op).
    pub(crate) fn compensation_recorded(&self, step: &StepName) -> bool {
        self.compensations.contains(step)
    }

    /// How many times (step, phase) was carried out.
    pub(crate) fn executions(&self, step: &StepName, phase: Phase) -> u32 {
        self.executed.get(&(step.clone(), phase)).copied().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// The simulator.

/// One event handed to the state machine, with what came of it.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    /// When.
    pub(crate) at: Timestamp,
    /// The event.
    pub(crate) event: Event,
    /// The machine's answer.
    pub(crate) handled: Handled,
    /// The saga's status after the event.
    pub(crate) status_after: SagaStatus,
    /// Each step's status after the event.
    pub(crate) steps_after: Vec<StepStatus>,
}

impl Record {
    /// The effects, if the event was accepted.
    pub(crate) fn effects(&self) -> &[Effect] {
        match &self.handled.result {
            Ok(fx) => fx,
            Err(_) => &[],
        }
    }

    /// Whether the event was accepted.
    pub(crate) fn accepted(&self) -> bool {
        self.handled.result.is_ok()
    }
}

/// A driver's view of one saga: its state, the commands in flight, the armed timers (the latest
/// per step), the accepted-event log, and a participant.
#[derive(Debug, Clone)]
pub(crate) struct Sim {
    /// The plan.
    pub(crate) plan: Plan,
    /// The saga.
    pub(crate) state: SagaState,
    /// Simulated time.
    pub(crate) now: Timestamp,
    /// Commands sent and not yet delivered to the participant.
    pub(crate) inflight: Vec<Dispatch>,
    /// Every command ever sent, in order.
    pub(crate) sent: Vec<Dispatch>,
    /// Every wait an await step began, in order.
    pub(crate) waits: Vec<Awaiting>,
    /// Armed timers, keyed by step.
    pub(crate) timers: BTreeMap<StepName, (Timer, Timestamp)>,
    /// Every timer ever armed, in order.
    pub(crate) armed_ever: Vec<Timer>,
    /// The accepted events, for [`SagaState::replay`].
    pub(crate) log: Vec<(Timestamp, Event)>,
    /// Every event handled, accepted or not.
    pub(crate) records: Vec<Record>,
    /// The timeline: every accepted event's [`Handled::timeline`], in order.
    pub(crate) timeline: Vec<TimelineEntry>,
    /// `Undelivered` events handed to the machine (for duplicates).
    pub(crate) undelivered: Vec<Event>,
    /// Replies handed to the machine (for duplicates).
    pub(crate) delivered: Vec<Event>,
    /// The participant.
    pub(crate) participant: Participant,
    /// Things that must never happen (a rejection that changed the state, a timer replaced
    /// without being disarmed, a stale or post-terminal event accepted...).
    pub(crate) anomalies: Vec<String>,
    /// `CancelTimer` effects naming a timer that was not armed (harmless for a driver).
    pub(crate) unarmed_cancels: Vec<Timer>,
}

impl Sim {
    /// A new, not yet started saga of `plan`.
    pub(crate) fn new(plan: &Plan) -> Sim {
        Sim {
            state: SagaState::new(SagaId::from(SAGA_ID), plan),
            plan: plan.clone(),
            now: Timestamp(0),
            inflight: Vec::new(),
            sent: Vec::new(),
            waits: Vec::new(),
            timers: BTreeMap::new(),
            armed_ever: Vec::new(),
            log: Vec::new(),
            records: Vec::new(),
            timeline: Vec::new(),
            undelivered: Vec::new(),
            delivered: Vec::new(),
            participant: Participant::default(),
            anomalies: Vec::new(),
            unarmed_cancels: Vec::new(),
        }
    }

    /// Sets the simulated time (milliseconds).
    pub(crate) fn at(&mut self, ms: u64) -> &mut Sim {
        self.now = Timestamp(ms);
        self
    }

    /// Hands `event` to the machine at the current time and carries out the effects the way a
    /// driver would. A rejection that changed the state is recorded as an anomaly.
    pub(crate) fn handle(&mut self, event: Event) -> Handled {
        let before = self.state.clone();
        let handled = self.state.handle(&self.plan, self.now, &event);
        match &handled.result {
            Ok(fx) => {
                self.log.push((self.now, event.clone()));
                self.timeline.extend(handled.timeline.iter().cloned());
                let fx = fx.clone();
                self.apply(&fx);
                if let Some(why) = self.snapshot_mismatch() {
                    self.anomalies.push(format!("after {event:?}: {why}"));
                }
            }
            Err(rejection) => {
                if !handled.timeline.is_empty() {
                    self.anomalies.push(format!("rejected {event:?} but wrote a timeline"));
                }
                if self.state != before {
                    self.anomalies.push(format!(
                        "rejected {event:?} ({rejection}) but the state changed:\nbefore {before:?}\nafter {:?}",
                        self.state
                    ));
                }
            }
        }
        self.records.push(Record {
            at: self.now,
            event,
            handled: handled.clone(),
            status_after: self.state.status(),
            steps_after: self.statuses(),
        });
        handled
    }

    /// Each step's status, in definition order.
    pub(crate) fn statuses(&self) -> Vec<StepStatus> {
        self.state.snapshot().steps.iter().map(|s| s.status).collect()
    }

    /// Why the state does not come back from its snapshot, directly and through MessagePack,
    /// if it does not.
    pub(crate) fn snapshot_mismatch(&self) -> Option<String> {
        let snap = self.state.snapshot();
        match SagaState::from_snapshot(&self.plan, &snap) {
            Ok(back) if back == self.state => {}
            Ok(back) => {
                return Some(format!("from_snapshot differs:\n{back:?}\n!=\n{:?}", self.state))
            }
            Err(e) => return Some(format!("from_snapshot refused its own snapshot: {e}")),
        }
        let bytes = match rmp_serde::to_vec_named(&snap) {
            Ok(bytes) => bytes,
            Err(e) => return Some(format!("snapshot does not encode: {e}")),
        };
        match rmp_serde::from_slice::<SagaSnapshot>(&bytes) {
            Ok(back) if back == snap => None,
            Ok(back) => Some(format!("MessagePack round trip differs: {back:?}")),
            Err(e) => Some(format!("snapshot does not decode: {e}")),
        }
    }

    fn apply(&mut self, fx: &[Effect]) {
        for e in fx {
            match e {
                Effect::Dispatch(d) => {
                    self.inflight.push(d.clone());
                    self.sent.push(d.clone());
                }
                Effect::ScheduleTimer { timer, at } => {
                    self.armed_ever.push(timer.clone());
                    if let Some((old, _)) =
                        self.timers.insert(timer.step.clone(), (timer.clone(), *at))
                    {
                        if old != *timer {
                            self.anomalies
                                .push(format!("timer {old:?} replaced by {timer:?} while armed"));
                        }
                    }
                }
                Effect::CancelTimer { timer } => match self.timers.get(&timer.step) {
                    Some((armed, _)) if armed == timer => {
                        self.timers.remove(&timer.step);
                    }
                    _ => self.unarmed_cancels.push(timer.clone()),
                },
                Effect::Await(a) => self.waits.push(a.clone()),
                Effect::Publish { .. } | Effect::Finish { .. } => {}
            }
        }
    }

    /// Handles `event`, panicking if it is rejected; returns the effects.
    pub(crate) fn ok(&mut self, event: Event) -> Vec<Effect> {
        let shown = format!("{event:?}");
        match self.handle(event).result {
            Ok(fx) => fx,
            Err(e) => panic!("{shown} rejected: {e:?}\nstate: {:?}", self.state.snapshot().steps),
        }
    }

    /// Handles `event`, panicking if it is accepted or if the rejection changed the state;
    /// returns the rejection.
    pub(crate) fn err(&mut self, event: Event) -> Rejection {
        let before = self.state.clone();
        let shown = format!("{event:?}");
        match self.handle(event).result {
            Ok(fx) => panic!("{shown} accepted: {:?}", summary(&fx)),
            Err(e) => {
                assert_eq!(self.state, before, "a rejection must leave the state unchanged");
                e
            }
        }
    }

    /// Starts the saga with [`saga_input`].
    pub(crate) fn start(&mut self) -> Vec<Effect> {
        self.ok(Event::Start { input: saga_input() })
    }

    /// The status of step `name`.
    pub(crate) fn step(&self, name: &str) -> StepStatus {
        self.state.step_status(&StepName::from(name)).expect("known step")
    }

    /// Delivers in-flight command `idx` to the participant and its reply to the machine.
    pub(crate) fn deliver(&mut self, idx: usize, wish: Wish) -> Handled {
        let d = self.inflight.remove(idx);
        let reply = self.participant.handle(&d, wish);
        self.delivered.push(reply.clone());
        self.handle(reply)
    }

    /// The driver finds no responder for in-flight command `idx`: it never reaches the
    /// participant, and the machine is told.
    pub(crate) fn undeliver(&mut self, idx: usize) -> Handled {
        let d = self.inflight.remove(idx);
        let event = Event::Undelivered { step: d.step, phase: d.phase, attempt: d.attempt };
        self.undelivered.push(event.clone());
        self.handle(event)
    }

    /// Fires the armed timer of `step`, advancing the time to it.
    pub(crate) fn fire(&mut self, step: &StepName) -> Handled {
        let (timer, at) = self.timers.remove(step).expect("an armed timer");
        self.now = self.now.max(at);
        self.handle(Event::TimerFired(timer))
    }

    /// The step whose armed timer fires first.
    pub(crate) fn earliest_timer(&self) -> Option<StepName> {
        self.timers
            .iter()
            .min_by_key(|(step, (_, at))| (*at, (*step).clone()))
            .map(|(s, _)| s.clone())
    }

    /// Whether the saga has ended.
    pub(crate) fn terminal(&self) -> bool {
        self.state.status().is_terminal()
    }

    /// Drives the saga to its end: delivers every command with success, fires timers, and
    /// applies `operator` whenever the saga is parked with nothing else to do.
    pub(crate) fn drain(&mut self, operator: u32) {
        for _ in 0..100_000 {
            if self.terminal() {
                return;
            }
            if !self.inflight.is_empty() {
                self.deliver(0, Wish::Success);
            } else if let Some(step) = self.earliest_timer() {
                self.fire(&step);
            } else if self.state.status() == SagaStatus::NeedsIntervention {
                self.handle(operator_event(operator));
            } else {
                panic!(
                    "deadlock: saga {} with nothing in flight and no timer armed: {:?}",
                    self.state.status(),
                    self.state.snapshot().steps
                );
            }
        }
        panic!("saga did not end: {:?}", self.state);
    }

    /// Why `outstanding()` does not match the driver's view (every re-emitted dispatch equal
    /// to one sent, the re-emitted timers equal to the armed ones), if it does not.
    pub(crate) fn outstanding_mismatch(&self) -> Option<String> {
        if self.terminal() {
            return None;
        }
        let mut timers = BTreeMap::new();
        for e in self.state.outstanding(&self.plan) {
            match e {
                Effect::Dispatch(d) => {
                    if !self.sent.contains(&d) {
                        return Some(format!("outstanding() re-emits {d:?}, never sent as such"));
                    }
                }
                Effect::Await(a) => {
                    if !self.waits.contains(&a) {
                        return Some(format!("outstanding() re-emits {a:?}, never begun as such"));
                    }
                }
                Effect::ScheduleTimer { timer, at } => {
                    timers.insert(timer.step.clone(), (timer, at));
                }
                other => return Some(format!("outstanding() emits {other:?}")),
            }
        }
        // An attempt sent unclaimed is not re-sent at once but redelivered (claimed) when it
        // would time out: the timer a driver taking the saga over would arm.
        let exclusive: BTreeSet<StepName> = self
            .state
            .snapshot()
            .steps
            .into_iter()
            .filter(|s| s.exclusive)
            .map(|s| s.name)
            .collect();
        let mut armed = self.timers.clone();
        for (step, (timer, _)) in armed.iter_mut() {
            if exclusive.contains(step) && timer.kind == TimerKind::Timeout {
                timer.kind = TimerKind::Redeliver;
            }
        }
        (timers != armed)
            .then(|| format!("outstanding() timers {timers:?} != armed {:?}", self.timers))
    }

    /// After the end: delivers whatever is still in flight to the participant and its reply to
    /// the machine, and fires the remaining timers; all must be refused.
    pub(crate) fn flush(&mut self) {
        while !self.inflight.is_empty() {
            let h = self.deliver(0, Wish::Success);
            if h.result.is_ok() {
                self.anomalies.push(format!(
                    "reply accepted after the end: {:?}",
                    self.records.last().map(|r| &r.event)
                ));
            }
        }
        while let Some(step) = self.earliest_timer() {
            if self.fire(&step).result.is_ok() {
                self.anomalies.push(format!("timer of {step} accepted after the end"));
            }
        }
    }
}

/// The operator event numbered `n % 3`: retry, skip, resolve.
pub(crate) fn operator_event(n: u32) -> Event {
    match n % 3 {
        0 => Event::OperatorRetry { reason: "fixed the downstream".into(), by: Some("ops".into()) },
        1 => Event::OperatorSkip { reason: "undone by hand".into(), by: None },
        _ => Event::OperatorResolve { reason: "written off".into(), by: None },
    }
}

// ---------------------------------------------------------------------------------------------
// Random runs.

/// How a participant answers one step's commands when a run lets it choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Behaviour {
    /// Weight of a success.
    pub(crate) success: u32,
    /// Weight of a business failure.
    pub(crate) business: u32,
    /// Weight of a transient failure.
    pub(crate) transient: u32,
    /// Percentage of compensation attempts that fail.
    pub(crate) comp_fail: u32,
    /// Weight of a success whose output the coordinator refuses.
    pub(crate) refused: u32,
}

impl Behaviour {
    /// Always succeeds.
    pub(crate) const RELIABLE: Behaviour =
        Behaviour { success: 1, business: 0, transient: 0, comp_fail: 0, refused: 0 };

    fn wish(&self, phase: Phase, roll: u32) -> Wish {
        match phase {
            Phase::Action => {
                let total = (self.success + self.business + self.transient + self.refused).max(1);
                let r = roll % total;
                if r < self.success {
                    Wish::Success
                } else if r < self.success + self.business {
                    Wish::Business
                } else if r < self.success + self.business + self.transient {
                    Wish::Transient
                } else {
                    Wish::OutputRefused
                }
            }
            Phase::Compensation => {
                if roll % 100 < self.comp_fail {
                    Wish::Transient
                } else {
                    Wish::Success
                }
            }
        }
    }
}

/// Choices read one by one; `None` once they run out.
struct Choices<'a> {
    data: &'a [u32],
    pos: usize,
}

impl Choices<'_> {
    fn next(&mut self) -> Option<u32> {
        let c = self.data.get(self.pos).copied();
        self.pos += 1;
        c
    }

    /// The next choice, or 0 once they ran out.
    fn pick(&mut self) -> u32 {
        self.next().unwrap_or(0)
    }
}

/// Runs a saga of `plan` under the interleaving described by `choices`, then drives it to its
/// end (see [`Sim::drain`]) and flushes what is left in flight (see [`Sim::flush`]).
///
/// Each choice picks one move: deliver an in-flight command (the participant answers per
/// `behaviours`), lose an in-flight command and report it undelivered (sometimes twice),
/// duplicate a delivered reply or an undelivered report, send a stale reply or report (an
/// attempt that was never sent), fire the earliest or a random armed timer or one armed earlier
/// (late, or after it was disarmed), cancel, act as the
/// operator (as a fix when parked, or out of place), or send junk (a second start, an unknown
/// step).
pub(crate) fn run_random(plan: &Plan, behaviours: &[Behaviour], choices: &[u32]) -> Sim {
    assert_eq!(behaviours.len(), plan.steps().len());
    let mut sim = Sim::new(plan);
    sim.start();
    let mut ch = Choices { data: choices, pos: 0 };
    // The first choice sets the run's temper: whether it cancels (right after its k-th step
    // success), whether timers tend to fire before replies arrive, and which operator action
    // ends a parked saga when the choices run out.
    let first = ch.pick();
    let n = plan.steps().len() as u32;
    let cancel_after = (first % 3 == 0).then(|| ((first / 3) % n) as usize);
    let temper = Temper { slow: (first >> 8) % 3 == 0 };
    let operator = first >> 16;
    let mut cancelled = false;
    while !sim.terminal() && sim.records.len() < MAX_RANDOM_EVENTS {
        if let Some(k) = cancel_after {
            let done = sim
                .state
                .snapshot()
                .steps
                .iter()
                .filter(|s| s.status == StepStatus::Succeeded)
                .count();
            if !cancelled && done >= k {
                cancelled = true;
                sim.handle(cancel());
                continue;
            }
        }
        let Some(c) = ch.next() else { break };
        random_move(&mut sim, behaviours, temper, c, &mut ch);
        if c % 4 == 0 {
            if let Some(why) = sim.outstanding_mismatch() {
                sim.anomalies.push(why);
            }
        }
    }
    sim.drain(operator);
    sim.flush();
    sim
}

#[derive(Debug, Clone, Copy)]
struct Temper {
    slow: bool,
}

fn random_move(
    sim: &mut Sim,
    behaviours: &[Behaviour],
    temper: Temper,
    c: u32,
    ch: &mut Choices<'_>,
) {
    let n = sim.plan.steps().len() as u32;
    // Replies take a little time to arrive.
    sim.now = sim.now.after(Duration::from_millis(u64::from((c >> 8) % 40)));
    let mut category = c % 20;
    if temper.slow && category < 4 {
        category = 11;
    }
    match category {
        0..=8 | 12 | 18 => deliver_random(sim, behaviours, ch),
        13 | 19 => {
            // No responder: the command is lost and the machine is told (for an older attempt
            // still on its way, that report is stale). Now and then the report comes twice.
            if sim.inflight.is_empty() {
                deliver_random(sim, behaviours, ch);
            } else {
                let idx = ch.pick() as usize % sim.inflight.len();
                sim.undeliver(idx);
                if ch.pick() % 4 == 0 {
                    let again = sim.undelivered.last().cloned().expect("just sent");
                    if sim.handle(again.clone()).result.is_ok() {
                        sim.anomalies.push(format!("repeated report accepted: {again:?}"));
                    }
                }
            }
        }
        9 => {
            if !sim.undelivered.is_empty() && ch.pick() % 4 == 0 {
                // An old no-responder report again: stale, a duplicate, or (if that attempt
                // was sent again since) indistinguishable from a new report.
                let i = ch.pick() as usize % sim.undelivered.len();
                let old = sim.undelivered[i].clone();
                sim.handle(old);
            } else if sim.delivered.is_empty() {
                deliver_random(sim, behaviours, ch);
            } else {
                let i = ch.pick() as usize % sim.delivered.len();
                let dup = sim.delivered[i].clone();
                if sim.handle(dup.clone()).result.is_ok() {
                    sim.anomalies.push(format!("duplicate reply accepted: {dup:?}"));
                }
            }
        }
        10 => {
            let i = (ch.pick() % n) as usize;
            let snap = sim.state.snapshot();
            let s = &snap.steps[i];
            let phase = if ch.pick() % 2 == 0 { Phase::Action } else { Phase::Compensation };
            let current = match phase {
                Phase::Action => s.attempt,
                Phase::Compensation => s.comp_attempt,
            };
            let attempt = match ch.pick() % 3 {
                0 => 0,
                k => current + k + ch.pick() % 3,
            };
            let step = s.name.clone();
            let event = match (phase, ch.pick() % 4) {
                (_, 3) => Event::Undelivered { step, phase, attempt },
                (Phase::Action, 0) => {
                    Event::StepSucceeded { output: output_of(&step), step, attempt }
                }
                (Phase::Action, k) => {
                    Event::StepFailed { step, attempt, reason: "stale".into(), transient: k == 1 }
                }
                (Phase::Compensation, 0) => Event::CompensationSucceeded { step, attempt },
                (Phase::Compensation, _) => Event::CompensationFailed {
                    step,
                    attempt,
                    reason: "stale".into(),
                    transient: false,
                },
            };
            if sim.handle(event.clone()).result.is_ok() {
                sim.anomalies.push(format!("stale reply accepted: {event:?}"));
            }
        }
        11 => match sim.earliest_timer() {
            Some(step) => {
                sim.fire(&step);
            }
            None => deliver_random(sim, behaviours, ch),
        },
        14 if !sim.armed_ever.is_empty() && ch.pick() % 3 == 0 => {
            // A timer armed earlier fires (late, or after it was disarmed): taken only if it is
            // the step's armed one.
            let i = ch.pick() as usize % sim.armed_ever.len();
            let old = sim.armed_ever[i].clone();
            match sim.timers.get(&old.step) {
                Some((armed, _)) if *armed == old => {
                    sim.fire(&old.step);
                }
                _ => {
                    let event = Event::TimerFired(old);
                    if sim.handle(event.clone()).result.is_ok() {
                        sim.anomalies.push(format!("timer that is not armed accepted: {event:?}"));
                    }
                }
            }
        }
        14 => {
            if sim.timers.is_empty() {
                deliver_random(sim, behaviours, ch);
            } else {
                let i = ch.pick() as usize % sim.timers.len();
                let step = sim.timers.keys().nth(i).cloned().expect("in range");
                sim.fire(&step);
            }
        }
        15 => {
            if ch.pick() % 8 == 0 {
                sim.handle(cancel());
            }
        }
        16 => {
            let op = ch.pick();
            if sim.state.status() == SagaStatus::NeedsIntervention || op % 4 == 0 {
                sim.handle(operator_event(op / 4));
            }
        }
        _ => {
            let event = match ch.pick() % 4 {
                0 => Event::Start { input: saga_input() },
                1 => succeeded("no-such-step", 1),
                2 => timer("no-such-step", Phase::Action, 1, TimerKind::Timeout),
                _ => comp_ok("no-such-step", 1),
            };
            if sim.handle(event.clone()).result.is_ok() {
                sim.anomalies.push(format!("junk accepted: {event:?}"));
            }
        }
    }
}

fn deliver_random(sim: &mut Sim, behaviours: &[Behaviour], ch: &mut Choices<'_>) {
    if sim.inflight.is_empty() {
        if let Some(step) = sim.earliest_timer() {
            sim.fire(&step);
        }
        return;
    }
    let idx = ch.pick() as usize % sim.inflight.len();
    let d = &sim.inflight[idx];
    let i = sim.plan.step_index(&d.step).expect("dispatched step exists");
    let wish = behaviours[i].wish(d.phase, ch.pick());
    sim.deliver(idx, wish);
}

// ---------------------------------------------------------------------------------------------
// Random definitions.

/// Numbers read one by one; 0 once they run out (so shrinking towards 0 simplifies).
pub(crate) struct Src<'a> {
    data: &'a [u32],
    pos: usize,
}

impl<'a> Src<'a> {
    /// Reads from `data`.
    pub(crate) fn new(data: &'a [u32]) -> Self {
        Src { data, pos: 0 }
    }

    /// A number below `n`.
    pub(crate) fn below(&mut self, n: u32) -> u32 {
        let v = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        v % n
    }
}

/// A generated definition and how its participants behave.
#[derive(Debug, Clone)]
pub(crate) struct Generated {
    /// The definition.
    pub(crate) def: SagaDefinition,
    /// One behaviour per step.
    pub(crate) behaviours: Vec<Behaviour>,
}

/// How many numbers [`gen_definition`] may read.
pub(crate) const DEF_SEED_LEN: usize = 160;

/// Builds a random definition of 1 to 8 steps from `src`: a chain (implicit or explicit
/// `after`) or a DAG, with or without a pivot. Steps before the pivot (all of them without a
/// pivot) are compensatable, mostly with a compensation, sometimes read-only, rarely with
/// neither (which validation may refuse); the pivot runs after all of them (sometimes with a
/// compensation); the steps after it are retriable and descend from it.
pub(crate) fn gen_definition(src: &mut Src<'_>) -> Generated {
    let n = 1 + src.below(8) as usize;
    let shape = src.below(3); // 0: implicit chain, 1: explicit chain, 2: DAG
    let pivot = if src.below(2) == 1 { Some(src.below(n as u32) as usize) } else { None };
    let mut deps: Vec<Vec<usize>> = Vec::with_capacity(n);
    for i in 0..n {
        let chain = if i == 0 { vec![] } else { vec![i - 1] };
        let d = match pivot {
            _ if shape < 2 => chain,
            Some(p) if i == p => {
                // After every earlier step: its sinks.
                (0..i).filter(|&j| !deps.iter().any(|d: &Vec<usize>| d.contains(&j))).collect()
            }
            Some(p) if i > p => {
                let anchor = p + src.below((i - p) as u32) as usize;
                let mut d: Vec<usize> =
                    (0..i).filter(|&j| j != anchor && src.below(4) == 0).collect();
                d.push(anchor);
                d
            }
            _ => (0..i).filter(|_| src.below(3) == 0).collect(),
        };
        deps.push(d);
    }
    let mut builder = SagaDefinition::builder("generated").version(1 + src.below(3));
    let mut behaviours = Vec::with_capacity(n);
    for (i, d) in deps.iter().enumerate() {
        let name = format!("s{i}");
        let kind = match pivot {
            Some(p) if i == p => StepKind::Pivot,
            Some(p) if i > p => StepKind::Retriable,
            _ => StepKind::Compensatable,
        };
        let comp = match kind {
            StepKind::Compensatable => match src.below(20) {
                0..=5 => 0,
                6 => 1,
                k => k,
            },
            StepKind::Pivot => {
                if src.below(3) == 0 {
                    5
                } else {
                    1
                }
            }
            StepKind::Retriable => {
                if src.below(4) == 0 {
                    5
                } else {
                    1
                }
            }
        };
        let timeout = Duration::from_millis(100 + u64::from(src.below(900)));
        let retry = RetryPolicy {
            max_attempts: 1 + src.below(4),
            initial_backoff: Duration::from_millis(10 + u64::from(src.below(90))),
            max_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: f64::from(src.below(5)) / 10.0,
        };
        let after: Vec<String> = d.iter().map(|j| format!("s{j}")).collect();
        let after: Vec<&str> = after.iter().map(String::as_str).collect();
        builder = builder.step(&name, &format!("svc{}", i % 3), &format!("do-{name}"), |s| {
            let mut s = s.kind(kind).timeout(timeout).retry(retry);
            if shape != 0 {
                s = s.after(&after);
            }
            match comp {
                0 => s.read_only(),
                1 => s, // neither compensation nor read-only
                _ => s.compensation(&format!("undo-{name}")),
            }
        });
        let success = 1 + src.below(10);
        behaviours.push(Behaviour {
            success,
            business: if kind == StepKind::Retriable || src.below(2) == 0 {
                0
            } else {
                src.below(3)
            },
            transient: if src.below(3) == 0 { 3 + src.below(8) } else { src.below(3) },
            comp_fail: 15 * src.below(4),
            // Derived, not drawn, so the generated cases stay as they were. Not on a
            // retriable step: it would retry the refused output without end (a known rough
            // edge).
            refused: u32::from(kind != StepKind::Retriable && success % 3 == 0),
        });
    }
    Generated { def: builder.build(), behaviours }
}

/// A small deterministic generator (SplitMix64), for seeded runs without proptest.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    /// The next number.
    pub(crate) fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((x ^ (x >> 31)) >> 32) as u32
    }

    /// `len` numbers.
    pub(crate) fn vec(&mut self, len: usize) -> Vec<u32> {
        (0..len).map(|_| self.next_u32()).collect()
    }
}
