//! Metrics, through the [`metrics`] facade: the coordinator and the participant SDK record
//! them, and whoever runs them exports them with the recorder of their choice (the
//! `saga-coordinator` binary serves them to Prometheus on `/metrics`). Without a recorder
//! installed every call is a no-op.
//!
//! Every metric is per process (per coordinator replica, per participant instance); labels
//! are definition, step, command and service names, never saga ids. [`describe`] lists them
//! all; docs/OPERATIONS.md explains each.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use saga_core::wire::{CommandMessage, LifecycleNote};
use saga_core::{
    CommandId, CommandName, Phase, SagaId, SagaName, SagaStatus, ServiceName, StepName,
    TimelineEntry, TimelineEvent, Timestamp,
};

use crate::spans;

/// Sagas begun by this replica, by definition.
pub const STARTED: &str = "saga_started_total";
/// Sagas that ended on this replica, by definition and terminal status.
pub const FINISHED: &str = "saga_finished_total";
/// Live sagas this replica holds.
pub const IN_FLIGHT: &str = "saga_in_flight";
/// Held sagas waiting for an operator (`needs_intervention`).
pub const PARKED: &str = "saga_parked";
/// Step attempts that ended, by definition, step, phase and outcome.
pub const ATTEMPTS: &str = "saga_step_attempts_total";
/// How long a step attempt took, from its command to its outcome, in seconds.
pub const ATTEMPT_SECONDS: &str = "saga_step_attempt_seconds";
/// Attempts that timed out.
pub const TIMEOUTS: &str = "saga_step_timeouts_total";
/// Retries scheduled after a failed or timed-out attempt.
pub const RETRIES: &str = "saga_step_retries_total";
/// Steps whose compensation began.
pub const COMPENSATIONS: &str = "saga_compensations_total";
/// Commands that found no responder (sent again later; not an attempt).
pub const UNDELIVERED: &str = "saga_commands_undelivered_total";
/// Sagas parked because a compensation exhausted its retries.
pub const PARKINGS: &str = "saga_parkings_total";
/// Operator actions accepted, by definition and action.
pub const OPERATOR_ACTIONS: &str = "saga_operator_actions_total";
/// Log appends that lost the compare-and-swap to another writer.
pub const LOG_CONFLICTS: &str = "saga_log_conflicts_total";
/// Messages sent to the dead-letter stream, by component.
pub const DEAD_LETTERS: &str = "saga_dead_letters_total";
/// Time from a start's publication to the coordinator taking it, in seconds.
pub const INPUT_LAG_SECONDS: &str = "saga_input_lag_seconds";
/// Participant handler runs, by service, command, phase and outcome, in seconds.
pub const HANDLER_SECONDS: &str = "saga_participant_handler_seconds";
/// Commands answered from the effect record without running the handler.
pub const DEDUP_HITS: &str = "saga_participant_dedup_hits_total";
/// Compensations recorded as no-ops by the barrier.
pub const BARRIER_NOOPS: &str = "saga_participant_barrier_noops_total";
/// Actions run without a claim (exclusive first attempts).
pub const UNCLAIMED_RUNS: &str = "saga_participant_unclaimed_runs_total";
/// Domain events read for await steps, by outcome: `kept` (stored under its value) or
/// `no_field` (the event lacks the field; ignored).
pub const AWAIT_EVENTS: &str = "saga_await_events_total";
/// What reached a replica for its waiting sagas, by outcome: `completed` (it completed or
/// failed an await step), `unmatched` (no saga here waits for it), `refused` (too old, or it
/// does not decode).
pub const AWAIT_ARRIVALS: &str = "saga_await_arrivals_total";

/// What kind of metric a name is.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    /// A histogram of seconds.
    Seconds,
}

/// Every metric: its name, kind and help text.
const ALL: &[(&str, Kind, &str)] = &[
    (STARTED, Kind::Counter, "Sagas begun by this replica, by definition"),
    (FINISHED, Kind::Counter, "Sagas that ended on this replica, by definition and status"),
    (IN_FLIGHT, Kind::Gauge, "Live sagas this replica holds"),
    (PARKED, Kind::Gauge, "Held sagas waiting for an operator (needs_intervention)"),
    (ATTEMPTS, Kind::Counter, "Step attempts that ended, by step, phase and outcome"),
    (ATTEMPT_SECONDS, Kind::Seconds, "Time from a step attempt's command to its outcome"),
    (TIMEOUTS, Kind::Counter, "Step attempts that timed out"),
    (RETRIES, Kind::Counter, "Retries scheduled after a failed or timed-out attempt"),
    (COMPENSATIONS, Kind::Counter, "Steps whose compensation began"),
    (UNDELIVERED, Kind::Counter, "Commands that found no responder (not an attempt)"),
    (PARKINGS, Kind::Counter, "Sagas parked because a compensation exhausted its retries"),
    (OPERATOR_ACTIONS, Kind::Counter, "Operator actions accepted, by action"),
    (LOG_CONFLICTS, Kind::Counter, "Log appends that lost the compare-and-swap"),
    (DEAD_LETTERS, Kind::Counter, "Messages sent to the dead-letter stream, by component"),
    (INPUT_LAG_SECONDS, Kind::Seconds, "Time from a start's publication to a replica taking it"),
    (HANDLER_SECONDS, Kind::Seconds, "Participant handler runs, by command, phase and outcome"),
    (DEDUP_HITS, Kind::Counter, "Commands answered from the effect record, handler not run"),
    (BARRIER_NOOPS, Kind::Counter, "Compensations recorded as no-ops by the barrier"),
    (UNCLAIMED_RUNS, Kind::Counter, "Actions run without a claim (exclusive first attempts)"),
    (AWAIT_EVENTS, Kind::Counter, "Domain events read for await steps, by outcome"),
    (AWAIT_ARRIVALS, Kind::Counter, "Events and signals reaching waiting sagas, by outcome"),
];

/// Describes every metric to the installed recorder (units and help texts). Call once after
/// installing a recorder.
pub fn describe() {
    for &(name, kind, help) in ALL {
        match kind {
            Kind::Counter => describe_counter!(name, help),
            Kind::Gauge => describe_gauge!(name, help),
            Kind::Seconds => describe_histogram!(name, metrics::Unit::Seconds, help),
        }
    }
}

/// The same saga counts as the metrics, kept by the coordinator for its admin service's
/// `$SRV.STATS` answer (so `nats micro stats saga-admin` and `/metrics` agree).
#[derive(Debug, Default)]
pub struct Tally(Mutex<TallyData>);

/// What a [`Tally`] holds: `saga_started_total`, `saga_finished_total`, `saga_in_flight` and
/// `saga_parked`.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TallyData {
    /// Sagas begun, by definition.
    pub started: BTreeMap<String, u64>,
    /// Sagas ended, by definition, then status.
    pub finished: BTreeMap<String, BTreeMap<String, u64>>,
    /// Live sagas held.
    pub in_flight: usize,
    /// Of those, the parked ones.
    pub parked: usize,
}

impl Tally {
    /// A copy of the counts now.
    pub fn snapshot(&self) -> TallyData {
        self.0.lock().expect("tally lock").clone()
    }

    fn update(&self, f: impl FnOnce(&mut TallyData)) {
        f(&mut self.0.lock().expect("tally lock"));
    }
}

/// What this replica saw of one saga for its metrics and spans: when each in-flight attempt
/// was sent (from its `dispatched` entries), so that its outcome can be timed, and the
/// lifecycle events logged so far (the saga span's events).
#[derive(Debug, Default)]
pub(crate) struct Sent {
    attempts: HashMap<(StepName, Phase), Dispatch>,
    notes: Vec<(Timestamp, LifecycleNote)>,
}

/// One attempt's dispatch, as its `dispatched` entry says.
#[derive(Debug)]
struct Dispatch {
    attempt: u32,
    at: Timestamp,
    service: ServiceName,
    command: CommandName,
}

/// The saga a transition belongs to.
pub(crate) struct Saga<'a> {
    pub(crate) name: &'a SagaName,
    pub(crate) id: &'a SagaId,
    /// Its `traceparent` (the root span's ids), if it has one.
    pub(crate) trace: Option<&'a str>,
    pub(crate) started_at: Timestamp,
}

/// Records what one transition of `saga` did, from its timeline entries and the lifecycle
/// events it logged (`notes`): the single place where the coordinator's metrics and spans are
/// taken.
pub(crate) fn transition(
    saga: &Saga<'_>,
    entries: &[TimelineEntry],
    notes: &[LifecycleNote],
    sent: &mut Sent,
    tally: &Tally,
) {
    if spans::enabled() {
        let at = entries.last().map_or_else(crate::deliver::now, |e| e.at);
        sent.notes.extend(notes.iter().map(|n| (at, n.clone())));
    }
    let name = saga.name.to_string();
    let saga_ref = saga;
    let saga = name;
    for entry in entries {
        match &entry.event {
            TimelineEvent::Started => {
                counter!(STARTED, "saga" => saga.clone()).increment(1);
                tally.update(|t| *t.started.entry(saga.clone()).or_default() += 1);
            }
            TimelineEvent::Finished { status } => {
                saga_span(saga_ref, *status, entry.at, sent);
                counter!(FINISHED, "saga" => saga.clone(), "status" => status.to_string())
                    .increment(1);
                tally.update(|t| {
                    let by_status = t.finished.entry(saga.clone()).or_default();
                    *by_status.entry(status.to_string()).or_default() += 1;
                });
            }
            TimelineEvent::Dispatched { step, phase, attempt, service, command, .. } => {
                let d = Dispatch {
                    attempt: *attempt,
                    at: entry.at,
                    service: service.clone(),
                    command: command.clone(),
                };
                sent.attempts.insert((step.clone(), *phase), d);
                if *phase == Phase::Compensation && *attempt == 1 {
                    counter!(COMPENSATIONS, "saga" => saga.clone(), "step" => step.to_string())
                        .increment(1);
                }
            }
            TimelineEvent::Succeeded { step, phase, attempt } => {
                let ended = Ended {
                    step,
                    phase: *phase,
                    attempt: *attempt,
                    outcome: "succeeded",
                    at: entry.at,
                    reason: None,
                };
                attempt_ended(saga_ref, &ended, sent);
            }
            TimelineEvent::Failed { step, phase, attempt, reason, .. } => {
                let ended = Ended {
                    step,
                    phase: *phase,
                    attempt: *attempt,
                    outcome: "failed",
                    at: entry.at,
                    reason: Some(reason),
                };
                attempt_ended(saga_ref, &ended, sent);
            }
            TimelineEvent::TimedOut { step, phase, attempt } => {
                let ended = Ended {
                    step,
                    phase: *phase,
                    attempt: *attempt,
                    outcome: "timed_out",
                    at: entry.at,
                    reason: Some("timed out"),
                };
                attempt_ended(saga_ref, &ended, sent);
                counter!(TIMEOUTS, "saga" => saga.clone(), "step" => step.to_string(), "phase" => phase.to_string())
                    .increment(1);
            }
            TimelineEvent::RetryScheduled { step, phase, .. } => {
                counter!(RETRIES, "saga" => saga.clone(), "step" => step.to_string(), "phase" => phase.to_string())
                    .increment(1);
            }
            TimelineEvent::NotDelivered { step, .. } => {
                counter!(UNDELIVERED, "saga" => saga.clone(), "step" => step.to_string())
                    .increment(1);
            }
            TimelineEvent::Parked { .. } => {
                counter!(PARKINGS, "saga" => saga.clone()).increment(1);
            }
            TimelineEvent::CancelRequested { .. } => operator(&saga, "cancel"),
            TimelineEvent::OperatorRetry { .. } => operator(&saga, "retry"),
            TimelineEvent::OperatorSkip { .. } => operator(&saga, "skip"),
            TimelineEvent::OperatorResolve { .. } => operator(&saga, "resolve"),
            // `TimelineEvent` is non-exhaustive: entries added later are not counted here.
            _ => {}
        }
    }
}

fn operator(saga: &str, action: &'static str) {
    counter!(OPERATOR_ACTIONS, "saga" => saga.to_owned(), "action" => action).increment(1);
}

/// How an attempt ended, from its timeline entry.
struct Ended<'a> {
    step: &'a StepName,
    phase: Phase,
    attempt: u32,
    outcome: &'static str,
    at: Timestamp,
    reason: Option<&'a str>,
}

fn attempt_ended(saga: &Saga<'_>, e: &Ended<'_>, sent: &mut Sent) {
    let labels = [
        ("saga", saga.name.to_string()),
        ("step", e.step.to_string()),
        ("phase", e.phase.to_string()),
        ("outcome", e.outcome.to_owned()),
    ];
    counter!(ATTEMPTS, &labels).increment(1);
    let dispatch =
        sent.attempts.remove(&(e.step.clone(), e.phase)).filter(|d| d.attempt == e.attempt);
    if let Some(d) = &dispatch {
        let seconds = e.at.0.saturating_sub(d.at.0) as f64 / 1000.0;
        histogram!(ATTEMPT_SECONDS, &labels).record(seconds);
    }
    attempt_span(saga, e, dispatch.as_ref());
}

/// The span of one attempt: from its dispatch (if this replica saw it) to its outcome, with
/// the span id its command's `traceparent` carried.
fn attempt_span(saga: &Saga<'_>, e: &Ended<'_>, dispatch: Option<&Dispatch>) {
    let Some(trace) = saga.trace.filter(|_| spans::enabled()) else { return };
    let command_id = CommandId::new(saga.id, e.step, e.phase, e.attempt);
    let Some(this) = spans::with_span(trace, &spans::attempt_span_id(command_id.as_str())) else {
        return;
    };
    let mut attributes = vec![
        KeyValue::new("saga.id", saga.id.to_string()),
        KeyValue::new("saga.name", saga.name.to_string()),
        KeyValue::new("saga.step", e.step.to_string()),
        KeyValue::new("saga.phase", e.phase.to_string()),
        KeyValue::new("saga.attempt", i64::from(e.attempt)),
        KeyValue::new("saga.outcome", e.outcome),
    ];
    if let Some(d) = dispatch {
        attributes.push(KeyValue::new("saga.service", d.service.to_string()));
        attributes.push(KeyValue::new("saga.command", d.command.to_string()));
    }
    let verb = if e.phase == Phase::Compensation { "compensate" } else { "step" };
    spans::export(spans::Finished {
        this: &this,
        parent: Some(trace),
        name: format!("{verb} {}", e.step),
        kind: SpanKind::Client,
        start: spans::time(dispatch.map_or(e.at, |d| d.at)),
        end: spans::time(e.at),
        attributes,
        events: Vec::new(),
        error: (e.outcome != "succeeded").then(|| e.reason.unwrap_or(e.outcome).to_owned()),
    });
}

/// The saga's root span, from its start to its end, with the lifecycle events this replica
/// logged as span events.
fn saga_span(saga: &Saga<'_>, status: SagaStatus, at: Timestamp, sent: &mut Sent) {
    let Some(trace) = saga.trace.filter(|_| spans::enabled()) else { return };
    let events = std::mem::take(&mut sent.notes)
        .into_iter()
        .map(|(t, n)| {
            let mut attrs = Vec::new();
            if let Some(step) = &n.step {
                attrs.push(KeyValue::new("saga.step", step.to_string()));
            }
            if let Some(reason) = &n.reason {
                attrs.push(KeyValue::new("saga.reason", reason.clone()));
            }
            (spans::time(t), n.kind.as_str(), attrs)
        })
        .collect();
    spans::export(spans::Finished {
        this: trace,
        parent: None,
        name: format!("saga {}", saga.name),
        kind: SpanKind::Internal,
        start: spans::time(if saga.started_at.0 > 0 { saga.started_at } else { at }),
        end: spans::time(at),
        attributes: vec![
            KeyValue::new("saga.id", saga.id.to_string()),
            KeyValue::new("saga.name", saga.name.to_string()),
            KeyValue::new("saga.status", status.to_string()),
        ],
        events,
        error: None,
    });
}

/// The sagas this replica holds and how many of them are parked, summed over its workers.
pub(crate) fn held(in_flight: usize, parked: usize, tally: &Tally) {
    gauge!(IN_FLIGHT).set(in_flight as f64);
    gauge!(PARKED).set(parked as f64);
    tally.update(|t| (t.in_flight, t.parked) = (in_flight, parked));
}

/// A message went to the dead-letter stream.
pub(crate) fn dead_lettered(component: &str) {
    counter!(DEAD_LETTERS, "component" => component.to_owned()).increment(1);
}

/// One more of participant counter `metric` (a `*_total` of this module) for `service`.
pub(crate) fn by_service(metric: &'static str, service: &ServiceName) {
    counter!(metric, "service" => service.to_string()).increment(1);
}

/// A participant handler ran for `took`, ending with `outcome`.
pub(crate) fn handler_ran(
    service: &ServiceName,
    cmd: &CommandMessage,
    outcome: &'static str,
    took: Duration,
) {
    let labels = [
        ("service", service.to_string()),
        ("command", cmd.command.to_string()),
        ("phase", cmd.phase.to_string()),
        ("outcome", outcome.to_owned()),
    ];
    histogram!(HANDLER_SECONDS, &labels).record(took.as_secs_f64());
}

/// A matcher read a domain event: `kept` or `no_field`.
pub(crate) fn await_event(outcome: &'static str) {
    counter!(AWAIT_EVENTS, "outcome" => outcome).increment(1);
}

/// Something stored for waiting sagas reached this replica: `completed`, `unmatched` or
/// `refused`.
pub(crate) fn await_arrival(outcome: &'static str) {
    counter!(AWAIT_ARRIVALS, "outcome" => outcome).increment(1);
}

/// A log append lost the compare-and-swap to another writer.
pub(crate) fn log_conflict() {
    counter!(LOG_CONFLICTS).increment(1);
}

/// A start was taken `lag_ms` after it was published.
pub(crate) fn input_lag(lag_ms: u64) {
    histogram!(INPUT_LAG_SECONDS).record(lag_ms as f64 / 1000.0);
}
