//! Property tests of the saga state machine over random valid definitions and random
//! interleavings of replies, duplicates, stale replies, lost commands (undelivered reports and
//! redeliveries), timers, cancels and operator actions. After every accepted event the
//! simulator checks that the state comes back from its snapshot (`Sim::snapshot_mismatch`).
//!
//! Each case generates a definition (1-8 steps; chain or DAG; with or without a pivot, the
//! steps after it retriable; 1-4 attempts per step), participant behaviours, and the choices
//! that drive one run of the simulator in `common` to its end. The number of cases follows
//! `PROPTEST_CASES`.
//!
//! Properties named `bug_*` check guarantees the state machine currently breaks (see the
//! `bug_*` scenarios in `scenarios.rs`); they fail until it is fixed. The pivot, ordering and
//! leak properties caught BUG-1 to BUG-3 (see the `regression_*` scenarios), fixed since.

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError};
use saga_core::{
    CommandId, Effect, Event, Phase, Plan, SagaId, SagaSnapshot, SagaState, SagaStatus, StepKind,
    StepName, StepStatus, TimelineEvent,
};

fn config() -> Config {
    // `Config::default()` reads PROPTEST_CASES. Failures are not persisted to files.
    Config { failure_persistence: None, max_shrink_iters: 2048, ..Config::default() }
}

/// A valid generated definition, its plan and the run's choices.
fn case() -> impl Strategy<Value = (Generated, Plan, Vec<u32>)> {
    let def = prop::collection::vec(any::<u32>(), DEF_SEED_LEN).prop_filter_map(
        "definition refused by validation",
        |seed| {
            let g = gen_definition(&mut Src::new(&seed));
            let plan = g.def.validate().ok()?;
            Some((g, plan))
        },
    );
    (def, prop::collection::vec(any::<u32>(), 0..300)).prop_map(|((g, p), c)| (g, p, c))
}

/// A readable account of a run, for failure messages.
fn describe(plan: &Plan, sim: &Sim) -> String {
    let mut out = String::from("definition:\n");
    for (i, st) in plan.steps().iter().enumerate() {
        let after: Vec<&str> =
            plan.deps(i).iter().map(|&d| plan.steps()[d].name.as_str()).collect();
        out += &format!(
            "  {} {:?} after {:?} compensation {:?} read_only {} max_attempts {}\n",
            st.name,
            st.kind,
            after,
            st.compensation.as_ref().map(|c| c.as_str()),
            st.read_only,
            st.retry.max_attempts
        );
    }
    out += "run:\n";
    for r in &sim.records {
        let outcome = match &r.handled.result {
            Ok(fx) => format!("{:?}", summary(fx)),
            Err(e) => format!("refused: {e}"),
        };
        out += &format!("  @{} {:?} [{:?}] -> {outcome}\n", r.at.0, r.event, r.handled.rule);
    }
    out += &format!("final: {} {:?}\n", sim.state.status(), sim.statuses());
    out
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// Runs `check` and turns its error into a test failure that shows the run.
fn verdict(plan: &Plan, sim: &Sim, check: Result<(), String>) -> Result<(), TestCaseError> {
    check.map_err(|e| TestCaseError::fail(format!("{e}\n{}", describe(plan, sim))))
}

/// How many accepted events of `step` match `pred`.
fn accepted_count(sim: &Sim, pred: impl Fn(&Event) -> bool) -> usize {
    sim.records.iter().filter(|r| r.accepted() && pred(&r.event)).count()
}

fn succeeded_count(sim: &Sim, step: &StepName) -> usize {
    accepted_count(sim, |e| matches!(e, Event::StepSucceeded { step: s, .. } if s == step))
}

fn compensated_count(sim: &Sim, step: &StepName) -> usize {
    accepted_count(sim, |e| matches!(e, Event::CompensationSucceeded { step: s, .. } if s == step))
}

/// Whether step `i`'s action ran: it succeeded (its output kept or refused), or it ended
/// unknown (an attempt timed out and no attempt succeeded; the machine keeps `timed_out` set
/// then). Statuses after events are not enough: a step that succeeds or turns unknown while
/// compensating is at once `compensating`.
fn ran(sim: &Sim, i: usize) -> bool {
    let snap = sim.state.snapshot();
    let name = &snap.steps[i].name;
    succeeded_count(sim, name) > 0
        || accepted_count(
            sim,
            |e| matches!(e, Event::StepOutputRefused { step, .. } if step == name),
        ) > 0
        || snap.steps[i].timed_out
}

/// Whether step `i` ever reached one of `statuses` after an accepted event.
fn ever(sim: &Sim, i: usize, statuses: &[StepStatus]) -> bool {
    sim.records.iter().any(|r| r.accepted() && statuses.contains(&r.steps_after[i]))
}

fn has_compensation(plan: &Plan, i: usize) -> bool {
    plan.steps()[i].compensation.is_some()
}

/// Whether step `i`, in `status`, needs nothing more while compensating (the machine's rule).
fn settled(plan: &Plan, i: usize, status: StepStatus) -> bool {
    match status {
        StepStatus::Pending
        | StepStatus::Failed
        | StepStatus::Compensated
        | StepStatus::CompensationSkipped => true,
        StepStatus::Succeeded | StepStatus::Unknown => !has_compensation(plan, i),
        _ => false,
    }
}

/// The steps that depend on step `i`, directly or not.
fn descendants(plan: &Plan, i: usize) -> Vec<usize> {
    let mut seen = vec![false; plan.steps().len()];
    let mut stack: Vec<usize> = plan.dependents(i).to_vec();
    while let Some(d) = stack.pop() {
        if !seen[d] {
            seen[d] = true;
            stack.extend_from_slice(plan.dependents(d));
        }
    }
    (0..seen.len()).filter(|&d| seen[d]).collect()
}

/// The compensation dispatches of the run, with the statuses right after the event that sent
/// them.
fn compensation_dispatches(sim: &Sim) -> Vec<(usize, &[StepStatus], &saga_core::Dispatch)> {
    let mut out = Vec::new();
    for r in &sim.records {
        for d in dispatches(r.effects()) {
            if d.phase == Phase::Compensation {
                let i = sim.plan.step_index(&d.step).expect("known step");
                out.push((i, r.steps_after.as_slice(), d));
            }
        }
    }
    out
}

/// Terminal, consistent, replayable, serializable; rejections change nothing; stale,
/// duplicate and post-terminal events are refused; timers are tidy; effects run at most once.
fn check_run(plan: &Plan, sim: &Sim) -> Result<(), String> {
    ensure!(sim.terminal(), "the run did not end: {}", sim.state.status());
    ensure!(sim.anomalies.is_empty(), "anomalies: {:#?}", sim.anomalies);
    let replayed = SagaState::replay(SagaId::from(SAGA_ID), plan, &sim.log)
        .map_err(|(n, e)| format!("replay refused event {n}: {e}"))?;
    ensure!(replayed == sim.state, "replay differs:\n{replayed:?}\n!=\n{:?}", sim.state);
    let bytes = rmp_serde::to_vec_named(&sim.state.snapshot()).map_err(|e| e.to_string())?;
    let snap: SagaSnapshot = rmp_serde::from_slice(&bytes).map_err(|e| e.to_string())?;
    let back = SagaState::from_snapshot(plan, &snap).map_err(|e| e.to_string())?;
    ensure!(back == sim.state, "snapshot round trip through MessagePack differs");
    ensure!(sim.state.events() == sim.log.len() as u64, "events counter {}", sim.state.events());
    for ((step, phase), n) in &sim.participant.executed {
        ensure!(*n <= 1, "the participant ran {step} {phase} {n} times");
    }
    for st in &sim.state.snapshot().steps {
        ensure!(
            succeeded_count(sim, &st.name) <= 1,
            "step {} succeeded {} times",
            st.name,
            succeeded_count(sim, &st.name)
        );
        ensure!(compensated_count(sim, &st.name) <= 1, "step {} compensated twice", st.name);
    }
    check_timeline(sim)?;
    // Every command carries the right id, input and data.
    for d in &sim.sent {
        let i = plan.step_index(&d.step).expect("known step");
        let id = CommandId::new(&SagaId::from(SAGA_ID), &d.step, d.phase, d.attempt);
        ensure!(d.command_id == id, "command id {} for {id}", d.command_id);
        ensure!(d.input == saga_input(), "input of {}", d.command_id);
        let deps: BTreeMap<StepName, saga_core::Payload> = plan
            .deps(i)
            .iter()
            .map(|&j| (plan.steps()[j].name.clone(), output_of(&plan.steps()[j].name)))
            .collect();
        ensure!(d.deps == deps, "deps of {}: {:?}, expected {deps:?}", d.command_id, d.deps);
        let expected_output = match d.phase {
            Phase::Action => None,
            Phase::Compensation => (succeeded_count(sim, &d.step) > 0).then(|| output_of(&d.step)),
        };
        ensure!(d.output == expected_output, "output of {}: {:?}", d.command_id, d.output);
    }
    Ok(())
}

/// The timeline tells the run: it starts, ends once with the final status, has one
/// `dispatched` entry per command sent (with its service, command and deadline), one
/// `not_delivered` entry per accepted undelivered report, and goes forward in time.
fn check_timeline(sim: &Sim) -> Result<(), String> {
    let events: Vec<&TimelineEvent> = sim.timeline.iter().map(|e| &e.event).collect();
    ensure!(
        events.first() == Some(&&TimelineEvent::Started),
        "timeline starts {:?}",
        events.first()
    );
    let finished: Vec<usize> = (0..events.len())
        .filter(|&n| matches!(events[n], TimelineEvent::Finished { .. }))
        .collect();
    ensure!(
        finished == [events.len() - 1]
            && events.last() == Some(&&TimelineEvent::Finished { status: sim.state.status() }),
        "timeline does not end once with finished {}: {:?}",
        sim.state.status(),
        events.last()
    );
    let dispatched: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TimelineEvent::Dispatched { step, phase, attempt, service, command, deadline } => {
                Some((step, *phase, *attempt, service, command, *deadline))
            }
            _ => None,
        })
        .collect();
    let sent: Vec<_> = sim
        .sent
        .iter()
        .map(|d| (&d.step, d.phase, d.attempt, &d.service, &d.command, d.deadline))
        .collect();
    ensure!(dispatched == sent, "dispatched entries {dispatched:?} != sent {sent:?}");
    let not_delivered =
        events.iter().filter(|e| matches!(e, TimelineEvent::NotDelivered { .. })).count();
    let undelivered = accepted_count(sim, |e| matches!(e, Event::Undelivered { .. }));
    ensure!(not_delivered == undelivered, "{not_delivered} not_delivered, {undelivered} reports");
    ensure!(sim.timeline.windows(2).all(|w| w[0].at <= w[1].at), "the timeline goes back in time");
    Ok(())
}

/// Completed ⇒ each step succeeded exactly once, ran once, and nothing was compensated.
fn check_completed(plan: &Plan, sim: &Sim) -> Result<(), String> {
    if sim.state.status() != SagaStatus::Completed {
        return Ok(());
    }
    for (i, st) in plan.steps().iter().enumerate() {
        ensure!(succeeded_count(sim, &st.name) == 1, "step {} did not succeed once", st.name);
        ensure!(
            sim.state.snapshot().steps[i].status == StepStatus::Succeeded,
            "step {} not succeeded",
            st.name
        );
        ensure!(
            sim.participant.executions(&st.name, Phase::Action) == 1,
            "the participant did not run {} once",
            st.name
        );
    }
    ensure!(
        !sim.sent.iter().any(|d| d.phase == Phase::Compensation),
        "a completed saga dispatched a compensation"
    );
    Ok(())
}

/// Compensated/Cancelled ⇒ exactly the steps that succeeded or ended unknown (and have a
/// compensation) were compensated (or skipped by the operator), each once, each after its
/// direct dependents settled, and no action was dispatched once compensation began.
fn check_compensated(plan: &Plan, sim: &Sim) -> Result<(), String> {
    if !matches!(sim.state.status(), SagaStatus::Compensated | SagaStatus::Cancelled) {
        return Ok(());
    }
    match (sim.state.cause(), sim.state.status()) {
        (Some(saga_core::Cause::Cancelled { .. }), SagaStatus::Cancelled)
        | (Some(saga_core::Cause::StepFailed { .. }), SagaStatus::Compensated) => {}
        (cause, status) => return Err(format!("status {status} with cause {cause:?}")),
    }
    for (i, st) in plan.steps().iter().enumerate() {
        let ran = ran(sim, i);
        let status = sim.state.snapshot().steps[i].status;
        let comp_sent =
            sim.sent.iter().any(|d| d.step == st.name && d.phase == Phase::Compensation);
        if ran && has_compensation(plan, i) {
            ensure!(
                matches!(status, StepStatus::Compensated | StepStatus::CompensationSkipped),
                "step {} ran but ended {status:?}",
                st.name
            );
            if status == StepStatus::Compensated {
                ensure!(compensated_count(sim, &st.name) == 1, "step {} compensated", st.name);
            }
        } else {
            ensure!(
                !comp_sent,
                "step {} was compensated though it {}",
                st.name,
                if ran { "has no compensation" } else { "never ran" }
            );
            ensure!(
                matches!(
                    status,
                    StepStatus::Pending
                        | StepStatus::Failed
                        | StepStatus::Succeeded
                        | StepStatus::Unknown
                ),
                "step {} ended {status:?}",
                st.name
            );
        }
        if ever(sim, i, &[StepStatus::Failed]) {
            ensure!(!comp_sent, "failed step {} was compensated", st.name);
        }
    }
    for (i, after, d) in compensation_dispatches(sim) {
        for &dep in plan.dependents(i) {
            ensure!(
                settled(plan, dep, after[dep]),
                "{} dispatched while dependent {} is {:?}",
                d.command_id,
                plan.steps()[dep].name,
                after[dep]
            );
        }
    }
    let began = sim
        .records
        .iter()
        .position(|r| r.accepted() && r.status_after != SagaStatus::Running)
        .ok_or("compensated without ever compensating")?;
    // An action attempt sent before may be sent again (it found no responder); no new one.
    let before: Vec<&CommandId> = sim.records[..began]
        .iter()
        .flat_map(|r| dispatches(r.effects()))
        .map(|d| &d.command_id)
        .collect();
    for r in &sim.records[began..] {
        for d in dispatches(r.effects()) {
            ensure!(
                d.phase == Phase::Compensation || before.contains(&&d.command_id),
                "{} dispatched after compensation began",
                d.command_id
            );
        }
    }
    Ok(())
}

/// Retriable steps (all after the pivot here) never end failed or unknown.
fn check_retriable(plan: &Plan, sim: &Sim) -> Result<(), String> {
    for (i, st) in plan.steps().iter().enumerate() {
        if st.kind == StepKind::Retriable {
            ensure!(
                !ever(sim, i, &[StepStatus::Failed, StepStatus::Unknown]),
                "retriable step {} failed",
                st.name
            );
        }
    }
    Ok(())
}

/// A pivot that succeeded is never compensated, and the saga then completes.
fn check_pivot(plan: &Plan, sim: &Sim) -> Result<(), String> {
    let Some(p) = plan.pivot() else { return Ok(()) };
    if succeeded_count(sim, &plan.steps()[p].name) == 0 {
        return Ok(());
    }
    let name = &plan.steps()[p].name;
    ensure!(
        !sim.sent.iter().any(|d| &d.step == name && d.phase == Phase::Compensation),
        "the pivot {name} succeeded and was compensated"
    );
    ensure!(
        sim.state.status() == SagaStatus::Completed,
        "the pivot {name} succeeded but the saga ended {}",
        sim.state.status()
    );
    Ok(())
}

/// A compensation is dispatched only once every step that depends on its step, directly or
/// through other steps, is settled.
fn check_transitive_order(plan: &Plan, sim: &Sim) -> Result<(), String> {
    for (i, after, d) in compensation_dispatches(sim) {
        for dep in descendants(plan, i) {
            ensure!(
                settled(plan, dep, after[dep]),
                "{} dispatched while {} (which depends on it) is {:?}",
                d.command_id,
                plan.steps()[dep].name,
                after[dep]
            );
        }
    }
    Ok(())
}

/// Once everything in flight reached the participant: in a compensated or cancelled saga,
/// every action effect of a step with a compensation was undone (or skipped by the operator).
fn check_no_leak(plan: &Plan, sim: &Sim) -> Result<(), String> {
    if !matches!(sim.state.status(), SagaStatus::Compensated | SagaStatus::Cancelled) {
        return Ok(());
    }
    for (i, st) in plan.steps().iter().enumerate() {
        if !has_compensation(plan, i)
            || sim.state.snapshot().steps[i].status == StepStatus::CompensationSkipped
        {
            continue;
        }
        ensure!(
            !sim.participant.action_executed(&st.name)
                || sim.participant.compensation_recorded(&st.name),
            "step {}'s action ran and was never compensated (ended {:?})",
            st.name,
            sim.state.snapshot().steps[i].status
        );
    }
    Ok(())
}

/// The saga is parked (`needs_intervention`) only while some compensation is stuck.
fn check_parked(plan: &Plan, sim: &Sim) -> Result<(), String> {
    let _ = plan;
    for (n, r) in sim.records.iter().enumerate() {
        if r.accepted() && r.status_after == SagaStatus::NeedsIntervention {
            ensure!(
                r.steps_after.contains(&StepStatus::CompensationStuck),
                "event #{n} ({:?}) left the saga parked with no stuck compensation: {:?}",
                r.event,
                r.steps_after
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_run_ends_terminal_and_is_consistent((g, plan, choices) in case()) {
        let sim = run_random(&plan, &g.behaviours, &choices);
        verdict(&plan, &sim, check_run(&plan, &sim))?;
    }

    #[test]
    fn outcomes_match_what_ran((g, plan, choices) in case()) {
        let sim = run_random(&plan, &g.behaviours, &choices);
        verdict(&plan, &sim, check_completed(&plan, &sim))?;
        verdict(&plan, &sim, check_compensated(&plan, &sim))?;
        verdict(&plan, &sim, check_retriable(&plan, &sim))?;
    }

    /// Caught BUG-2 (`scenarios::regression_a_pivot_that_succeeds_after_a_cancel_still_completes_the_saga`).
    #[test]
    fn a_succeeded_pivot_is_final((g, plan, choices) in case()) {
        let sim = run_random(&plan, &g.behaviours, &choices);
        verdict(&plan, &sim, check_pivot(&plan, &sim))?;
    }

    /// Caught BUG-1 (`scenarios::regression_compensation_waits_for_dependents_behind_a_read_only_step`).
    #[test]
    fn compensation_waits_for_all_dependents((g, plan, choices) in case()) {
        let sim = run_random(&plan, &g.behaviours, &choices);
        verdict(&plan, &sim, check_transitive_order(&plan, &sim))?;
    }

    /// Caught BUG-3 (`scenarios::regression_an_earlier_timed_out_attempt_keeps_the_outcome_unknown`).
    #[test]
    fn no_effect_is_left_undone((g, plan, choices) in case()) {
        let sim = run_random(&plan, &g.behaviours, &choices);
        verdict(&plan, &sim, check_no_leak(&plan, &sim))?;
    }

    /// BUG-4 (see `scenarios::bug_a_late_success_of_the_stuck_compensation_unparks_the_saga`).
    #[test]
    fn bug_parked_only_while_a_compensation_is_stuck((g, plan, choices) in case()) {
        let sim = run_random(&plan, &g.behaviours, &choices);
        verdict(&plan, &sim, check_parked(&plan, &sim))?;
    }
}

/// The generator yields mostly valid definitions, of every shape.
#[test]
fn generated_definitions_are_mostly_valid_and_varied() {
    let mut rng = SplitMix(7);
    let (mut valid, mut pivots, mut dags, mut read_only, mut retriable) = (0, 0, 0, 0, 0);
    let total = 2000;
    for _ in 0..total {
        let seed = rng.vec(DEF_SEED_LEN);
        let g = gen_definition(&mut Src::new(&seed));
        let Ok(plan) = g.def.validate() else { continue };
        valid += 1;
        pivots += usize::from(plan.pivot().is_some());
        dags += usize::from((0..plan.steps().len()).any(|i| {
            plan.deps(i).len() != usize::from(i > 0) || (i > 0 && plan.deps(i)[0] != i - 1)
        }));
        read_only += usize::from(plan.steps().iter().any(|s| s.read_only));
        retriable += usize::from(plan.steps().iter().any(|s| s.kind == StepKind::Retriable));
    }
    assert!(valid * 100 >= total * 70, "only {valid} of {total} generated definitions validate");
    for (what, n) in
        [("pivot", pivots), ("DAG", dags), ("read-only", read_only), ("retriable", retriable)]
    {
        assert!(n * 10 >= valid, "only {n} of {valid} valid definitions have a {what} step/shape");
    }
}

/// Random runs reach every terminal status and exercise the interesting paths.
#[test]
fn random_runs_reach_every_outcome() {
    let mut rng = SplitMix(11);
    let mut statuses = BTreeMap::new();
    let mut parked = 0;
    let (mut undelivered, mut redelivered, mut completed_after_undelivery) = (0, 0, 0);
    for _ in 0..300 {
        let seed = rng.vec(DEF_SEED_LEN);
        let g = gen_definition(&mut Src::new(&seed));
        let Ok(plan) = g.def.validate() else { continue };
        let choices = rng.vec(200);
        let sim = run_random(&plan, &g.behaviours, &choices);
        *statuses.entry(sim.state.status().as_str()).or_insert(0) += 1;
        parked += usize::from(
            sim.records.iter().any(|r| r.status_after == SagaStatus::NeedsIntervention),
        );
        assert!(sim
            .records
            .iter()
            .any(|r| matches!(r.effects().last(), Some(Effect::Finish { .. }))));
        let lost = sim
            .records
            .iter()
            .any(|r| r.accepted() && matches!(r.event, Event::Undelivered { .. }));
        undelivered += usize::from(lost);
        redelivered += usize::from(sim.records.iter().any(|r| {
            r.accepted()
                && matches!(&r.event, Event::TimerFired(t) if t.kind == saga_core::TimerKind::Redeliver)
        }));
        completed_after_undelivery +=
            usize::from(lost && sim.state.status() == SagaStatus::Completed);
    }
    for status in ["completed", "compensated", "cancelled", "resolved"] {
        assert!(
            statuses.get(status).copied().unwrap_or(0) > 0,
            "no run ended {status}: {statuses:?}"
        );
    }
    assert!(parked > 0, "no run needed intervention");
    assert!(
        undelivered > 30 && redelivered > 30 && completed_after_undelivery > 0,
        "too few runs lost commands: {undelivered} undelivered, {redelivered} redelivered, \
         {completed_after_undelivery} completed after a loss"
    );
}
