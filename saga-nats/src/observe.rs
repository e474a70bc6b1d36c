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
use saga_core::wire::CommandMessage;
use saga_core::{Phase, SagaName, ServiceName, StepName, TimelineEntry, TimelineEvent, Timestamp};

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

/// When each in-flight attempt of one saga was sent (from its `dispatched` entries), so that
/// its outcome can be timed.
#[derive(Debug, Default)]
pub(crate) struct Sent(HashMap<(StepName, Phase), (u32, Timestamp)>);

/// Records what one transition of a saga of definition `saga` did, from its timeline entries:
/// the single place where the coordinator's metrics are taken.
pub(crate) fn transition(
    saga: &SagaName,
    entries: &[TimelineEntry],
    sent: &mut Sent,
    tally: &Tally,
) {
    let saga = saga.to_string();
    for entry in entries {
        match &entry.event {
            TimelineEvent::Started => {
                counter!(STARTED, "saga" => saga.clone()).increment(1);
                tally.update(|t| *t.started.entry(saga.clone()).or_default() += 1);
            }
            TimelineEvent::Finished { status } => {
                counter!(FINISHED, "saga" => saga.clone(), "status" => status.to_string())
                    .increment(1);
                tally.update(|t| {
                    let by_status = t.finished.entry(saga.clone()).or_default();
                    *by_status.entry(status.to_string()).or_default() += 1;
                });
            }
            TimelineEvent::Dispatched { step, phase, attempt, .. } => {
                sent.0.insert((step.clone(), *phase), (*attempt, entry.at));
                if *phase == Phase::Compensation && *attempt == 1 {
                    counter!(COMPENSATIONS, "saga" => saga.clone(), "step" => step.to_string())
                        .increment(1);
                }
            }
            TimelineEvent::Succeeded { step, phase, attempt } => {
                attempt_ended(&saga, step, *phase, *attempt, "succeeded", entry.at, sent);
            }
            TimelineEvent::Failed { step, phase, attempt, .. } => {
                attempt_ended(&saga, step, *phase, *attempt, "failed", entry.at, sent);
            }
            TimelineEvent::TimedOut { step, phase, attempt } => {
                attempt_ended(&saga, step, *phase, *attempt, "timed_out", entry.at, sent);
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

fn attempt_ended(
    saga: &str,
    step: &StepName,
    phase: Phase,
    attempt: u32,
    outcome: &'static str,
    at: Timestamp,
    sent: &mut Sent,
) {
    let labels = [
        ("saga", saga.to_owned()),
        ("step", step.to_string()),
        ("phase", phase.to_string()),
        ("outcome", outcome.to_owned()),
    ];
    counter!(ATTEMPTS, &labels).increment(1);
    if let Some((sent_attempt, sent_at)) = sent.0.remove(&(step.clone(), phase)) {
        if sent_attempt == attempt {
            let seconds = at.0.saturating_sub(sent_at.0) as f64 / 1000.0;
            histogram!(ATTEMPT_SECONDS, &labels).record(seconds);
        }
    }
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

/// A log append lost the compare-and-swap to another writer.
pub(crate) fn log_conflict() {
    counter!(LOG_CONFLICTS).increment(1);
}

/// A start was taken `lag_ms` after it was published.
pub(crate) fn input_lag(lag_ms: u64) {
    histogram!(INPUT_LAG_SECONDS).record(lag_ms as f64 / 1000.0);
}
