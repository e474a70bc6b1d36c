//! Scenario tests of the saga state machine, asserting on the exact effects it emits.
//!
//! Effects are compared as one-line summaries (see `common::summary`): `dispatch <command id>
//! <command> @<deadline>`, `arm <step>.<a|c>.<attempt>.<kind> @<at>`, `disarm ...`,
//! `publish <kind> [<step>]`, `finish <status>`. Times are milliseconds; every step in these
//! plans has a 1 s timeout and an exact (jitter-free) backoff of 100 ms, 200 ms, 400 ms...
//!
//! Tests named `regression_*` reproduce defects found while writing these tests (fixed since);
//! tests named `bug_*` reproduce defects still open: they fail until the machine is fixed (see
//! the comment on each).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use saga_core::{
    Cause, CommandId, Dispatch, Effect, Event, Payload, Phase, Rejection, Rule, SagaDefinition,
    SagaId, SagaSnapshot, SagaState, SagaStatus, StepKind, StepName, StepStatus, TimelineEvent,
    Timer, TimerKind, Timestamp, VIEW_VERSION,
};

fn s(lines: &[&str]) -> Vec<String> {
    lines.iter().map(|l| (*l).to_owned()).collect()
}

/// The steps whose compensation is dispatched (first attempts), in order.
fn compensation_order(sim: &Sim) -> Vec<String> {
    sim.sent
        .iter()
        .filter(|d| d.phase == Phase::Compensation && d.attempt == 1)
        .map(|d| d.step.to_string())
        .collect()
}

#[test]
fn happy_path_chain() {
    let mut sim = Sim::new(&chain3());
    let h = sim.handle(Event::Start { input: saga_input() });
    assert_eq!(h.rule, Rule::Start);
    assert_eq!(
        summary(&h.result.unwrap()),
        s(&["publish started", "dispatch id.a.a.1 do-a @1000", "arm a.a.1.timeout @2000"])
    );
    assert_eq!(sim.state.status(), SagaStatus::Running);
    assert_eq!(sim.inflight[0].command_id.as_str(), "id.a.a.1");
    assert_eq!(sim.inflight[0].service.as_str(), "svc-a");

    let h = sim.at(10).handle(succeeded("a", 1));
    assert_eq!(h.rule, Rule::ActionSucceeded);
    assert_eq!(
        summary(&h.result.unwrap()),
        s(&[
            "disarm a.a.1.timeout",
            "publish step_succeeded a",
            "dispatch id.b.a.1 do-b @1010",
            "arm b.a.1.timeout @2010",
        ])
    );
    assert_eq!(
        summary(&sim.at(20).ok(succeeded("b", 1))),
        s(&[
            "disarm b.a.1.timeout",
            "publish step_succeeded b",
            "dispatch id.c.a.1 do-c @1020",
            "arm c.a.1.timeout @2020",
        ])
    );
    assert_eq!(
        summary(&sim.at(30).ok(succeeded("c", 1))),
        s(&[
            "disarm c.a.1.timeout",
            "publish step_succeeded c",
            "publish completed",
            "finish completed",
        ])
    );
    assert_eq!(sim.state.status(), SagaStatus::Completed);
    assert!(sim
        .state
        .snapshot()
        .steps
        .iter()
        .all(|st| st.status == StepStatus::Succeeded && st.attempt == 1));
    assert!(sim.timers.is_empty(), "every timer was disarmed: {:?}", sim.timers);
    assert!(sim.state.outstanding(&sim.plan).is_empty());
    assert_eq!(sim.state.events(), 4);
    assert_eq!((sim.state.started_at().0, sim.state.updated_at().0), (0, 30));

    // Anything after the end is refused.
    let h = sim.handle(succeeded("c", 1));
    assert_eq!(h.rule, Rule::Finished);
    assert!(matches!(
        h.result,
        Err(Rejection::Finished { status: SagaStatus::Completed, event: "step_succeeded" })
    ));
    assert_eq!(sim.handle(Event::Start { input: saga_input() }).rule, Rule::AlreadyStarted);
    assert!(sim.anomalies.is_empty(), "{:?}", sim.anomalies);
}

#[test]
fn events_before_start_are_refused() {
    let mut sim = Sim::new(&chain3());
    let h = sim.handle(succeeded("a", 1));
    assert_eq!(h.rule, Rule::NotStarted);
    assert_eq!(h.result, Err(Rejection::NotStarted { event: "step_succeeded" }));
    assert_eq!(sim.err(cancel()), Rejection::NotStarted { event: "cancel" });
    assert_eq!(sim.state.status(), SagaStatus::New);
    assert_eq!(sim.state.events(), 0);
}

#[test]
fn business_failure_at_each_position_compensates_in_reverse() {
    let names = ["a", "b", "c"];
    for pos in 0..3 {
        let mut sim = Sim::new(&chain3());
        sim.start();
        for (j, name) in names.iter().enumerate().take(pos) {
            sim.at(10 * (j as u64 + 1)).ok(succeeded(name, 1));
        }
        let failing = names[pos];
        let h = sim.at(100).handle(failed(failing, 1, false));
        assert_eq!(h.rule, Rule::ActionFailed);
        let mut expected = vec![
            format!("disarm {failing}.a.1.timeout"),
            format!("publish step_failed {failing}"),
            "publish compensating".to_owned(),
        ];
        if pos == 0 {
            expected.extend(["publish compensated".to_owned(), "finish compensated".to_owned()]);
        } else {
            let prev = names[pos - 1];
            expected.extend([
                format!("dispatch id.{prev}.c.1 undo-{prev} @1100"),
                format!("arm {prev}.c.1.timeout @1100"),
            ]);
        }
        assert_eq!(summary(&h.result.unwrap()), expected, "failure at {failing}");
        assert_eq!(sim.step(failing), StepStatus::Failed);

        let mut t = 200;
        for j in (0..pos).rev() {
            let name = names[j];
            let h = sim.at(t).handle(comp_ok(name, 1));
            assert_eq!(h.rule, Rule::CompensationSucceeded);
            let mut expected = vec![
                format!("disarm {name}.c.1.timeout"),
                format!("publish step_compensated {name}"),
            ];
            if j == 0 {
                expected
                    .extend(["publish compensated".to_owned(), "finish compensated".to_owned()]);
            } else {
                let prev = names[j - 1];
                expected.extend([
                    format!("dispatch id.{prev}.c.1 undo-{prev} @{}", t + 1000),
                    format!("arm {prev}.c.1.timeout @{}", t + 1000),
                ]);
            }
            assert_eq!(summary(&h.result.unwrap()), expected, "failure at {failing}");
            t += 100;
        }
        let reversed: Vec<String> = names[..pos].iter().rev().map(|n| (*n).to_owned()).collect();
        assert_eq!(compensation_order(&sim), reversed, "failure at {failing}");
        assert_eq!(sim.state.status(), SagaStatus::Compensated);
        assert_eq!(
            sim.state.cause(),
            Some(&saga_core::Cause::StepFailed { step: failing.into(), reason: "declined".into() })
        );
        for name in &names[..pos] {
            assert_eq!(sim.step(name), StepStatus::Compensated);
        }
        for name in &names[pos + 1..] {
            assert_eq!(sim.step(name), StepStatus::Pending, "never dispatched");
        }
        assert!(sim.timers.is_empty());
        assert!(sim.anomalies.is_empty(), "{:?}", sim.anomalies);
    }
}

#[test]
fn parallel_branch_waits_for_in_flight_sibling_then_compensates_it() {
    let mut sim = Sim::new(&diamond());
    sim.start();
    assert_eq!(
        summary(&sim.at(10).ok(succeeded("a", 1))),
        s(&[
            "disarm a.a.1.timeout",
            "publish step_succeeded a",
            "dispatch id.b.a.1 do-b @1010",
            "arm b.a.1.timeout @2010",
            "dispatch id.c.a.1 do-c @1010",
            "arm c.a.1.timeout @2010",
        ])
    );
    // b fails while c is in flight: nothing to compensate yet (a waits for c).
    assert_eq!(
        summary(&sim.at(20).ok(failed("b", 1, false))),
        s(&["disarm b.a.1.timeout", "publish step_failed b", "publish compensating"])
    );
    assert_eq!(sim.state.status(), SagaStatus::Compensating);
    assert_eq!(sim.step("c"), StepStatus::Running);
    // Cancel is refused now: the saga is already compensating.
    let h = sim.handle(cancel());
    assert_eq!(h.rule, Rule::AlreadyCompensating);
    assert!(matches!(h.result, Err(Rejection::NotApplicable { event: "cancel", .. })));

    // c then succeeds: it is compensated first, then a.
    let h = sim.at(30).handle(succeeded("c", 1));
    assert_eq!(h.rule, Rule::LateActionSucceeded);
    assert_eq!(
        summary(&h.result.unwrap()),
        s(&[
            "disarm c.a.1.timeout",
            "publish step_succeeded c",
            "dispatch id.c.c.1 undo-c @1030",
            "arm c.c.1.timeout @1030",
        ])
    );
    assert_eq!(
        summary(&sim.at(40).ok(comp_ok("c", 1))),
        s(&[
            "disarm c.c.1.timeout",
            "publish step_compensated c",
            "dispatch id.a.c.1 undo-a @1040",
            "arm a.c.1.timeout @1040",
        ])
    );
    assert_eq!(
        summary(&sim.at(50).ok(comp_ok("a", 1))),
        s(&[
            "disarm a.c.1.timeout",
            "publish step_compensated a",
            "publish compensated",
            "finish compensated",
        ])
    );
    assert_eq!(compensation_order(&sim), ["c", "a"]);
    assert_eq!(sim.step("b"), StepStatus::Failed);
    assert_eq!(sim.step("d"), StepStatus::Pending);
}

#[test]
fn parallel_sibling_that_fails_late_is_not_compensated() {
    let mut sim = Sim::new(&diamond());
    sim.start();
    sim.at(10).ok(succeeded("a", 1));
    sim.at(20).ok(failed("b", 1, false));
    // A transient failure while compensating is not retried: c failed, a is compensated now.
    let h = sim.at(30).handle(failed("c", 1, true));
    assert_eq!(h.rule, Rule::LateActionFailed);
    assert_eq!(
        summary(&h.result.unwrap()),
        s(&[
            "disarm c.a.1.timeout",
            "publish step_failed c",
            "dispatch id.a.c.1 undo-a @1030",
            "arm a.c.1.timeout @1030",
        ])
    );
    assert_eq!(sim.step("c"), StepStatus::Failed);
    assert_eq!(compensation_order(&sim), ["a"]);
}

#[test]
fn parallel_sibling_that_times_out_while_compensating_is_compensated() {
    let mut sim = Sim::new(&diamond());
    sim.start();
    sim.at(10).ok(succeeded("a", 1));
    sim.at(20).ok(failed("b", 1, false));
    // c's attempt times out: no retry while compensating; its outcome is unknown.
    let h = sim.at(1010).handle(timeout("c", 1));
    assert_eq!(h.rule, Rule::CompensatingTimer);
    assert_eq!(
        summary(&h.result.unwrap()),
        s(&["publish step_failed c", "dispatch id.c.c.1 undo-c @2010", "arm c.c.1.timeout @2010"])
    );
    // Unknown, and at once compensating.
    assert_eq!(sim.step("c"), StepStatus::Compensating);
    assert!(sim.state.snapshot().steps[2].timed_out);
    let comp = dispatches(&sim.records.last().unwrap().handled.result.clone().unwrap())[0].clone();
    assert_eq!(comp.output, None, "c never reported an output");
    // A late success of the timed-out attempt is stale.
    assert!(matches!(sim.err(succeeded("c", 1)), Rejection::Stale { current: 1, .. }));
    sim.at(2000).ok(comp_ok("c", 1));
    sim.at(2100).ok(comp_ok("a", 1));
    assert_eq!(compensation_order(&sim), ["c", "a"]);
    assert_eq!(sim.state.status(), SagaStatus::Compensated);
}

#[test]
fn timeouts_are_retried_then_the_step_is_unknown_and_compensated() {
    let mut sim = Sim::new(&chain3());
    sim.start();
    sim.at(10).ok(succeeded("a", 1));
    // Attempt 1 times out: back off 100 ms.
    let h = sim.at(1010).handle(timeout("b", 1));
    assert_eq!(h.rule, Rule::RunningTimer);
    assert_eq!(summary(&h.result.unwrap()), s(&["arm b.a.1.backoff @1110"]));
    assert_eq!(sim.step("b"), StepStatus::RetryWait);
    assert_eq!(
        summary(&sim.at(1110).ok(backoff("b", 1))),
        s(&["dispatch id.b.a.2 do-b @2110", "arm b.a.2.timeout @2110"])
    );
    // Attempt 2 times out: back off 200 ms.
    assert_eq!(summary(&sim.at(2110).ok(timeout("b", 2))), s(&["arm b.a.2.backoff @2310"]));
    assert_eq!(
        summary(&sim.at(2310).ok(backoff("b", 2))),
        s(&["dispatch id.b.a.3 do-b @3310", "arm b.a.3.timeout @3310"])
    );
    // Attempt 3 (the last) times out: b is unknown and compensated first.
    assert_eq!(
        summary(&sim.at(3310).ok(timeout("b", 3))),
        s(&[
            "publish step_failed b",
            "publish compensating",
            "dispatch id.b.c.1 undo-b @4310",
            "arm b.c.1.timeout @4310",
        ])
    );
    // Unknown, and at once compensating.
    assert_eq!(sim.step("b"), StepStatus::Compensating);
    assert!(sim.state.snapshot().steps[1].timed_out);
    assert_eq!(sim.step("c"), StepStatus::Pending);
    // Late replies of earlier attempts are stale.
    assert!(matches!(
        sim.err(succeeded("b", 1)),
        Rejection::Stale { attempt: 1, current: 3, status: StepStatus::Compensating, .. }
    ));
    assert_eq!(
        summary(&sim.at(3400).ok(comp_ok("b", 1))),
        s(&[
            "disarm b.c.1.timeout",
            "publish step_compensated b",
            "dispatch id.a.c.1 undo-a @4400",
            "arm a.c.1.timeout @4400",
        ])
    );
    sim.at(3500).ok(comp_ok("a", 1));
    assert_eq!(sim.state.status(), SagaStatus::Compensated);
    assert_eq!(compensation_order(&sim), ["b", "a"]);
    let b_comp = sim.sent.iter().find(|d| d.command_id.as_str() == "id.b.c.1").unwrap();
    assert_eq!(b_comp.output, None);
}

#[test]
fn a_late_success_during_backoff_is_taken() {
    let mut sim = Sim::new(&chain3());
    sim.start();
    sim.at(1000).ok(timeout("a", 1));
    assert_eq!(
        summary(&sim.at(1050).ok(succeeded("a", 1))),
        s(&[
            "disarm a.a.1.backoff",
            "publish step_succeeded a",
            "dispatch id.b.a.1 do-b @2050",
            "arm b.a.1.timeout @3050",
        ])
    );
    // The backoff timer, had it fired anyway, is stale.
    assert!(matches!(sim.err(backoff("a", 1)), Rejection::Duplicate { .. }));
}

#[test]
fn transient_failures_are_retried_up_to_max_attempts() {
    let mut sim = Sim::new(&chain3());
    sim.start();
    assert_eq!(
        summary(&sim.at(10).ok(failed("a", 1, true))),
        s(&["disarm a.a.1.timeout", "arm a.a.1.backoff @110"])
    );
    sim.at(110).ok(backoff("a", 1));
    assert_eq!(
        summary(&sim.at(120).ok(failed("a", 2, true))),
        s(&["disarm a.a.2.timeout", "arm a.a.2.backoff @320"])
    );
    sim.at(320).ok(backoff("a", 2));
    assert_eq!(
        summary(&sim.at(330).ok(failed("a", 3, true))),
        s(&[
            "disarm a.a.3.timeout",
            "publish step_failed a",
            "publish compensating",
            "publish compensated",
            "finish compensated",
        ])
    );
    assert_eq!(sim.step("a"), StepStatus::Failed);
    assert_eq!(sim.state.snapshot().steps[0].last_error.as_deref(), Some("unavailable"));
}

fn output_refused(step: &str, attempt: u32) -> Event {
    Event::StepOutputRefused {
        step: StepName::from(step),
        attempt,
        reason: "output too large".into(),
    }
}

/// A success whose output cannot be kept: the action ran, so its step is compensated at
/// once (not retried), with no output in the command: the participant has the one it
/// recorded.
#[test]
fn a_refused_output_compensates_its_step() {
    let mut sim = Sim::new(&chain3());
    sim.start();
    sim.at(10).ok(succeeded("a", 1));
    let h = sim.at(20).handle(output_refused("b", 1));
    assert_eq!(h.rule, Rule::ActionFailed);
    assert_eq!(
        summary(&h.result.unwrap()),
        s(&[
            "disarm b.a.1.timeout",
            "publish step_failed b",
            "publish compensating",
            "dispatch id.b.c.1 undo-b @1020",
            "arm b.c.1.timeout @1020",
        ])
    );
    assert_eq!(sim.step("b"), StepStatus::Compensating);
    assert!(!sim.state.snapshot().steps[1].timed_out, "it did not time out");
    let b_comp = sim.sent.iter().find(|d| d.command_id.as_str() == "id.b.c.1").unwrap();
    assert_eq!(b_comp.output, None);
    // A copy of the refused reply is stale.
    assert!(matches!(sim.err(output_refused("b", 1)), Rejection::Stale { attempt: 1, .. }));
    sim.at(30).ok(comp_ok("b", 1));
    sim.at(40).ok(comp_ok("a", 1));
    assert_eq!(sim.state.status(), SagaStatus::Compensated);
    assert_eq!(compensation_order(&sim), ["b", "a"]);
    assert_eq!(
        sim.state.cause(),
        Some(&Cause::StepFailed { step: "b".into(), reason: "output too large".into() })
    );
    assert!(sim.anomalies.is_empty(), "{:?}", sim.anomalies);
}

/// A step without a compensation whose output is refused fails as on a business failure:
/// nothing could undo it.
#[test]
fn a_refused_output_of_a_step_without_compensation_fails_it() {
    let mut sim = Sim::new(&pivot_plan());
    sim.start();
    sim.at(10).ok(succeeded("a", 1));
    let h = sim.at(20).handle(output_refused("p", 1));
    assert_eq!(h.rule, Rule::ActionFailed);
    assert_eq!(sim.step("p"), StepStatus::Failed);
    assert_eq!(compensation_order(&sim), ["a"]);
}

#[test]
fn pivot_then_retriable_steps() {
    let mut sim = Sim::new(&pivot_plan());
    sim.start();
    sim.at(10).ok(succeeded("a", 1));
    assert_eq!(
        summary(&sim.at(20).ok(succeeded("p", 1))),
        s(&[
            "disarm p.a.1.timeout",
            "publish step_succeeded p",
            "dispatch id.r.a.1 do-r @1020",
            "arm r.a.1.timeout @2020",
        ])
    );
    // After the pivot the saga cannot be cancelled.
    let h = sim.at(30).handle(cancel());
    assert_eq!(h.rule, Rule::CancelRunning);
    assert!(matches!(
        h.result,
        Err(Rejection::NotApplicable { event: "cancel", status: SagaStatus::Running, .. })
    ));
    // The retriable step is retried beyond max_attempts (2), whatever the failure.
    assert_eq!(
        summary(&sim.at(40).ok(failed("r", 1, true))),
        s(&["disarm r.a.1.timeout", "arm r.a.1.backoff @140"])
    );
    sim.at(140).ok(backoff("r", 1));
    assert_eq!(
        summary(&sim.at(150).ok(failed("r", 2, true))),
        s(&["disarm r.a.2.timeout", "arm r.a.2.backoff @350"])
    );
    assert_eq!(
        summary(&sim.at(350).ok(backoff("r", 2))),
        s(&["dispatch id.r.a.3 do-r @1350", "arm r.a.3.timeout @1350"])
    );
    assert_eq!(summary(&sim.at(1350).ok(timeout("r", 3))), s(&["arm r.a.3.backoff @1750"]));
    sim.at(1750).ok(backoff("r", 3));
    assert_eq!(
        summary(&sim.at(1800).ok(failed("r", 4, false))),
        s(&["disarm r.a.4.timeout", "arm r.a.4.backoff @2600"])
    );
    sim.at(2600).ok(backoff("r", 4));
    assert_eq!(
        summary(&sim.at(2700).ok(succeeded("r", 5))),
        s(&[
            "disarm r.a.5.timeout",
            "publish step_succeeded r",
            "publish completed",
            "finish completed",
        ])
    );
    assert_eq!(sim.state.snapshot().steps[2].attempt, 5);
    assert!(!sim.sent.iter().any(|d| d.phase == Phase::Compensation));
}

#[test]
fn cancel_before_the_pivot_compensates_what_is_done() {
    let mut sim = Sim::new(&pivot_plan());
    sim.start();
    // a is in flight: nothing to compensate yet.
    let h = sim.at(5).handle(cancel());
    assert_eq!(h.rule, Rule::CancelRunning);
    assert_eq!(summary(&h.result.unwrap()), s(&["publish compensating"]));
    assert_eq!(sim.state.status(), SagaStatus::Compensating);
    // It succeeds after all: it is compensated.
    assert_eq!(
        summary(&sim.at(6).ok(succeeded("a", 1))),
        s(&[
            "disarm a.a.1.timeout",
            "publish step_succeeded a",
            "dispatch id.a.c.1 undo-a @1006",
            "arm a.c.1.timeout @1006",
        ])
    );
    assert_eq!(
        summary(&sim.at(7).ok(comp_ok("a", 1))),
        s(&[
            "disarm a.c.1.timeout",
            "publish step_compensated a",
            "publish cancelled",
            "finish cancelled",
        ])
    );
    assert_eq!(sim.state.status(), SagaStatus::Cancelled);
    assert!(matches!(sim.state.cause(), Some(saga_core::Cause::Cancelled { .. })));
    assert!(!sim.sent.iter().any(|d| d.step.as_str() != "a"), "p and r never ran");
}

/// A compensation failure the participant calls transient (its store had no leader)
/// counts against the longer budget a timed-out attempt has: with `max_attempts: 3`, the
/// third such failure schedules a fourth attempt, and only the tenth parks the saga.
#[test]
fn transient_compensation_failures_get_the_longer_budget() {
    let transient = |attempt| Event::CompensationFailed {
        step: "b".into(),
        attempt,
        reason: "cannot write stock: no leader".into(),
        transient: true,
    };
    let last = saga_core::COMPENSATION_TIMEOUT_ATTEMPTS;
    assert!(last > 3, "longer than the policy's budget");
    let (mut sim, t) = compensation_failing(last, Rule::CompensationFailed, transient);
    assert_eq!(
        summary(&sim.at(t).ok(transient(last))),
        s(&[&format!("disarm b.c.{last}.timeout"), "publish needs_intervention b"])
    );
    assert_eq!(sim.state.status(), SagaStatus::NeedsIntervention);
    assert_eq!(sim.step("b"), StepStatus::CompensationStuck);
}

/// chain3 with c failing, and b's compensation attempts 1 to `last - 1` each ending with
/// `failure(attempt)` (handled by `rule`) and retried after their backoff: the saga, and the
/// time attempt `last` is in flight.
fn compensation_failing(last: u32, rule: Rule, failure: impl Fn(u32) -> Event) -> (Sim, u64) {
    let mut sim = Sim::new(&chain3());
    sim.start();
    sim.at(10).ok(succeeded("a", 1));
    sim.at(20).ok(succeeded("b", 1));
    sim.at(30).ok(failed("c", 1, false));
    let mut t = 40;
    for n in 1..last {
        let h = sim.at(t).handle(failure(n));
        assert_eq!(h.rule, rule, "attempt {n}");
        assert!(h.result.is_ok(), "attempt {n}");
        assert_eq!(sim.step("b"), StepStatus::CompensationRetryWait, "attempt {n}");
        t += 100;
        sim.at(t).ok(timer("b", Phase::Compensation, n, TimerKind::Backoff));
        t += 100;
    }
    (sim, t)
}

/// chain3 with c failing, and b's compensation failing three times (the second by a
/// timeout): the third failure reply spends the budget and the saga needs intervention.
fn parked() -> Sim {
    let mut sim = Sim::new(&chain3());
    sim.start();
    sim.at(10).ok(succeeded("a", 1));
    sim.at(20).ok(succeeded("b", 1));
    sim.at(30).ok(failed("c", 1, false));
    assert_eq!(
        summary(&sim.at(40).ok(comp_failed("b", 1))),
        s(&["disarm b.c.1.timeout", "arm b.c.1.backoff @140"])
    );
    assert_eq!(sim.step("b"), StepStatus::CompensationRetryWait);
    assert_eq!(
        summary(&sim.at(140).ok(timer("b", Phase::Compensation, 1, TimerKind::Backoff))),
        s(&["dispatch id.b.c.2 undo-b @1140", "arm b.c.2.timeout @1140"])
    );
    assert_eq!(
        summary(&sim.at(1140).ok(timer("b", Phase::Compensation, 2, TimerKind::Timeout))),
        s(&["arm b.c.2.backoff @1340"])
    );
    sim.at(1340).ok(timer("b", Phase::Compensation, 2, TimerKind::Backoff));
    let h = sim.at(1400).handle(comp_failed("b", 3));
    assert_eq!(h.rule, Rule::CompensationFailed);
    assert_eq!(
        summary(&h.result.unwrap()),
        s(&["disarm b.c.3.timeout", "publish needs_intervention b"])
    );
    assert_eq!(sim.state.status(), SagaStatus::NeedsIntervention);
    assert_eq!(sim.step("b"), StepStatus::CompensationStuck);
    assert_eq!(sim.step("a"), StepStatus::Succeeded, "a waits for b");
    assert!(sim.state.outstanding(&sim.plan).is_empty());
    // Cancel does not apply; operator actions do.
    assert_eq!(sim.handle(cancel()).rule, Rule::AlreadyCompensating);
    sim
}

#[test]
fn operator_retry_dispatches_a_new_compensation_attempt() {
    let mut sim = parked();
    let h = sim.at(5000).handle(Event::OperatorRetry { reason: "fixed".into(), by: None });
    assert_eq!(h.rule, Rule::OperatorRetry);
    assert_eq!(
        summary(&h.result.unwrap()),
        s(&["dispatch id.b.c.4 undo-b @6000", "arm b.c.4.timeout @6000"])
    );
    assert_eq!(sim.state.status(), SagaStatus::Compensating);
    assert_eq!(
        summary(&sim.at(5100).ok(comp_ok("b", 4))),
        s(&[
            "disarm b.c.4.timeout",
            "publish step_compensated b",
            "dispatch id.a.c.1 undo-a @6100",
            "arm a.c.1.timeout @6100",
        ])
    );
    sim.at(5200).ok(comp_ok("a", 1));
    assert_eq!(sim.state.status(), SagaStatus::Compensated);
    assert_eq!(sim.step("b"), StepStatus::Compensated);
}

#[test]
fn operator_retry_gives_a_fresh_retry_budget() {
    let mut sim = parked();
    sim.at(5000).ok(Event::OperatorRetry { reason: "fixed".into(), by: None });
    // Attempt 4 is the first of a new budget of 3: a failure backs off (800 ms after attempt 4).
    assert_eq!(
        summary(&sim.at(5100).ok(comp_failed("b", 4))),
        s(&["disarm b.c.4.timeout", "arm b.c.4.backoff @5900"])
    );
    sim.at(5900).ok(timer("b", Phase::Compensation, 4, TimerKind::Backoff));
    sim.at(6000).ok(comp_failed("b", 5));
    sim.at(10_000).ok(timer("b", Phase::Compensation, 5, TimerKind::Backoff));
    assert_eq!(
        summary(&sim.at(10_100).ok(comp_failed("b", 6))),
        s(&["disarm b.c.6.timeout", "publish needs_intervention b"])
    );
    assert_eq!(sim.state.status(), SagaStatus::NeedsIntervention);
}

#[test]
fn operator_skip_marks_the_step_skipped_and_goes_on() {
    let mut sim = parked();
    let h = sim.at(5000).handle(Event::OperatorSkip { reason: "undone by hand".into(), by: None });
    assert_eq!(h.rule, Rule::OperatorSkip);
    assert_eq!(
        summary(&h.result.unwrap()),
        s(&["dispatch id.a.c.1 undo-a @6000", "arm a.c.1.timeout @6000"])
    );
    assert_eq!(sim.step("b"), StepStatus::CompensationSkipped);
    assert_eq!(
        summary(&sim.at(5100).ok(comp_ok("a", 1))),
        s(&[
            "disarm a.c.1.timeout",
            "publish step_compensated a",
            "publish compensated",
            "finish compensated",
        ])
    );
    assert_eq!(sim.state.status(), SagaStatus::Compensated);
    assert_eq!(sim.step("b"), StepStatus::CompensationSkipped);
}

#[test]
fn operator_resolve_ends_the_saga() {
    let mut sim = parked();
    let h = sim.at(5000).handle(Event::OperatorResolve { reason: "written off".into(), by: None });
    assert_eq!(h.rule, Rule::OperatorResolve);
    assert_eq!(summary(&h.result.unwrap()), s(&["publish resolved", "finish resolved"]));
    assert_eq!(sim.state.status(), SagaStatus::Resolved);
    assert_eq!(sim.step("a"), StepStatus::Succeeded, "left to the operator");
    assert_eq!(sim.handle(comp_ok("b", 3)).rule, Rule::Finished);
}

#[test]
fn operator_actions_need_a_parked_saga() {
    let mut sim = Sim::new(&chain3());
    sim.start();
    for event in [
        Event::OperatorRetry { reason: "x".into(), by: None },
        Event::OperatorSkip { reason: "x".into(), by: None },
        Event::OperatorResolve { reason: "x".into(), by: None },
    ] {
        let h = sim.handle(event);
        assert_eq!(h.rule, Rule::NotParked);
        assert!(matches!(
            h.result,
            Err(Rejection::NotApplicable { status: SagaStatus::Running, .. })
        ));
    }
    sim.ok(failed("a", 1, false));
    assert_eq!(sim.state.status(), SagaStatus::Compensated);
    assert_eq!(
        sim.handle(Event::OperatorResolve { reason: "x".into(), by: None }).rule,
        Rule::Finished
    );
}

#[test]
fn duplicate_replies_are_refused_and_change_nothing() {
    let mut sim = Sim::new(&chain3());
    sim.start();
    sim.at(10).ok(succeeded("a", 1));
    let before = sim.state.clone();
    let h = sim.handle(succeeded("a", 1));
    assert_eq!(h.rule, Rule::ActionSucceeded);
    assert_eq!(
        h.result,
        Err(Rejection::Duplicate {
            step: "a".into(),
            phase: Phase::Action,
            attempt: 1,
            already: "succeeded"
        })
    );
    assert_eq!(sim.state, before);

    sim.at(20).ok(succeeded("b", 1));
    sim.at(30).ok(failed("c", 1, false));
    assert_eq!(
        sim.err(failed("c", 1, false)),
        Rejection::Duplicate {
            step: "c".into(),
            phase: Phase::Action,
            attempt: 1,
            already: "failed"
        }
    );
    sim.at(40).ok(comp_ok("b", 1));
    let h = sim.handle(comp_ok("b", 1));
    assert_eq!(h.rule, Rule::CompensationSucceeded);
    assert_eq!(
        h.result,
        Err(Rejection::Duplicate {
            step: "b".into(),
            phase: Phase::Compensation,
            attempt: 1,
            already: "compensated"
        })
    );
    // A late success of a step that is being compensated is a duplicate too.
    assert!(matches!(sim.err(succeeded("a", 1)), Rejection::Stale { .. }));
    assert!(sim.anomalies.is_empty(), "{:?}", sim.anomalies);
}

#[test]
fn stale_attempts_are_refused() {
    let mut sim = Sim::new(&chain3());
    sim.start();
    // An attempt that was never sent.
    assert_eq!(
        sim.err(succeeded("a", 2)),
        Rejection::Stale {
            step: "a".into(),
            phase: Phase::Action,
            attempt: 2,
            current: 1,
            status: StepStatus::Running
        }
    );
    sim.at(1000).ok(timeout("a", 1));
    sim.at(1100).ok(backoff("a", 1));
    // Replies and timers of attempt 1 are stale once attempt 2 runs.
    for event in [failed("a", 1, true), succeeded("a", 1), timeout("a", 1), backoff("a", 1)] {
        assert!(
            matches!(
                sim.err(event),
                Rejection::Stale { attempt: 1, current: 2, status: StepStatus::Running, .. }
            ),
            "{:?}",
            sim.records.last()
        );
    }
    // No compensation runs while the saga runs forward.
    let h = sim.handle(comp_ok("a", 1));
    assert_eq!(h.rule, Rule::NoCompensationRunning);
    assert_eq!(
        h.result,
        Err(Rejection::Stale {
            step: "a".into(),
            phase: Phase::Compensation,
            attempt: 1,
            current: 0,
            status: StepStatus::Running
        })
    );
    // The same reply for the current attempt is taken.
    sim.at(1200).ok(succeeded("a", 2));
    assert_eq!(sim.state.snapshot().steps[0].attempt, 2);
}

#[test]
fn unknown_steps_are_refused() {
    let mut sim = Sim::new(&chain3());
    sim.start();
    let unknown = Rejection::UnknownStep { step: "zz".into() };
    for (event, rule) in [
        (succeeded("zz", 1), Rule::ActionSucceeded),
        (failed("zz", 1, false), Rule::ActionFailed),
        (timeout("zz", 1), Rule::RunningTimer),
        (comp_ok("zz", 1), Rule::NoCompensationRunning),
    ] {
        let h = sim.handle(event);
        assert_eq!((h.rule, h.result), (rule, Err(unknown.clone())));
    }
    sim.ok(failed("a", 1, false));
    assert!(sim.anomalies.is_empty(), "{:?}", sim.anomalies);
}

/// `a` and `b` at once, `c` after both, `d` after `c`.
fn flow_plan() -> saga_core::Plan {
    let step = |s: saga_core::StepBuilder, name: &str, after: &[&str]| {
        s.compensation(&format!("undo-{name}"))
            .after(after)
            .timeout(Duration::from_secs(1))
            .retry(exact_retry(3))
    };
    plan(
        SagaDefinition::builder("flow")
            .step("a", "svc-a", "do-a", |s| step(s, "a", &[]))
            .step("b", "svc-b", "do-b", |s| step(s, "b", &[]))
            .step("c", "svc-c", "do-c", |s| step(s, "c", &["a", "b"]))
            .step("d", "svc-d", "do-d", |s| step(s, "d", &["c"]))
            .build(),
    )
}

#[test]
fn data_flow_carries_input_dependency_outputs_and_own_output() {
    let input = Payload::new(vec![1, 2, 3]);
    let out = |name: &str| Payload::new(format!("output of {name}").into_bytes());
    let ok = |name: &str| Event::StepSucceeded { step: name.into(), attempt: 1, output: out(name) };
    let deps = |names: &[&str]| -> BTreeMap<StepName, Payload> {
        names.iter().map(|n| (StepName::from(*n), out(n))).collect()
    };

    let mut sim = Sim::new(&flow_plan());
    let fx = sim.ok(Event::Start { input: input.clone() });
    let first = dispatches(&fx);
    assert_eq!(first.len(), 2, "a and b start at once");
    for d in &first {
        assert_eq!(d.input, input);
        assert!(d.deps.is_empty());
        assert_eq!(d.output, None);
    }
    assert!(dispatches(&sim.at(10).ok(ok("a"))).is_empty(), "c waits for b");
    let fx = sim.at(20).ok(ok("b"));
    let c = dispatches(&fx)[0];
    assert_eq!((c.step.as_str(), c.phase, c.command.as_str()), ("c", Phase::Action, "do-c"));
    assert_eq!(c.deps, deps(&["a", "b"]));
    assert_eq!(c.input, input);
    let fx = sim.at(30).ok(ok("c"));
    let d = dispatches(&fx)[0];
    assert_eq!(d.deps, deps(&["c"]), "only the steps it runs after");
    assert_eq!(d.deadline.0, 1030);

    let fx = sim.at(40).ok(failed("d", 1, false));
    let comp = dispatches(&fx)[0];
    assert_eq!(
        (comp.step.as_str(), comp.phase, comp.command.as_str()),
        ("c", Phase::Compensation, "undo-c")
    );
    assert_eq!(comp.command_id.as_str(), "id.c.c.1");
    assert_eq!(comp.output, Some(out("c")), "a compensation carries its own action's output");
    assert_eq!(comp.deps, deps(&["a", "b"]));
    assert_eq!(comp.input, input);
    assert_eq!(comp.service.as_str(), "svc-c");

    let fx = sim.at(50).ok(comp_ok("c", 1));
    let comps = dispatches(&fx);
    assert_eq!(comps.len(), 2, "a and b are compensated in parallel");
    for (d, name) in comps.iter().zip(["a", "b"]) {
        assert_eq!(d.step.as_str(), name);
        assert_eq!(d.output, Some(out(name)));
        assert!(d.deps.is_empty());
    }
}

/// Checks that `outstanding()` re-emits exactly the current in-flight dispatches (identical to
/// the ones sent, same command ids) and the armed timers.
fn assert_outstanding(sim: &Sim, expected_ids: &[&str]) {
    let fx = sim.state.outstanding(&sim.plan);
    let mut ids = Vec::new();
    for e in &fx {
        match e {
            Effect::Dispatch(d) => {
                let sent = sim.sent.iter().rev().find(|s| s.command_id == d.command_id);
                assert_eq!(Some(d), sent, "re-emitted dispatch differs from the one sent");
                ids.push(d.command_id.to_string());
            }
            Effect::ScheduleTimer { .. } => {}
            other => panic!("outstanding() emitted {other:?}"),
        }
    }
    assert_eq!(ids, expected_ids);
    // The armed timers, except that an unclaimed attempt's is a later redelivery.
    assert_eq!(sim.outstanding_mismatch(), None);
}

#[test]
fn outstanding_after_a_crash_re_emits_in_flight_work() {
    let mut sim = Sim::new(&flow_plan());
    sim.start();
    // First attempts are sent unclaimed: they are not re-sent before their deadline.
    assert_outstanding(&sim, &[]);
    // a times out and waits to retry; b is still in flight.
    sim.at(1000).ok(timeout("a", 1));
    assert_outstanding(&sim, &[]);
    sim.at(1100).ok(backoff("a", 1));
    sim.at(1150).ok(succeeded("b", 1));
    assert_outstanding(&sim, &["id.a.a.2"]);
    sim.at(1200).ok(succeeded("a", 2));
    sim.at(1300).ok(succeeded("c", 1));
    sim.at(1400).ok(failed("d", 1, false));
    assert_outstanding(&sim, &["id.c.c.1"]);
    sim.at(1500).ok(comp_failed("c", 1));
    assert_outstanding(&sim, &[]);
    sim.at(1600).ok(timer("c", Phase::Compensation, 1, TimerKind::Backoff));
    assert_outstanding(&sim, &["id.c.c.2"]);

    // The driver crashes: the state is rebuilt from the accepted events.
    let rebuilt = SagaState::replay(SagaId::from(SAGA_ID), &sim.plan, &sim.log).unwrap();
    assert_eq!(rebuilt, sim.state);
    assert_eq!(rebuilt.outstanding(&sim.plan), sim.state.outstanding(&sim.plan));
    assert_eq!(
        CommandId::new(&SagaId::from(SAGA_ID), &"c".into(), Phase::Compensation, 2).as_str(),
        "id.c.c.2"
    );

    // And goes on from there.
    sim.state = rebuilt;
    sim.at(1700).ok(comp_ok("c", 2));
    assert_outstanding(&sim, &["id.a.c.1", "id.b.c.1"]);
    sim.at(1800).ok(comp_ok("a", 1));
    sim.at(1900).ok(comp_ok("b", 1));
    assert_eq!(sim.state.status(), SagaStatus::Compensated);
    assert_outstanding(&sim, &[]);
}

#[test]
fn state_round_trips_through_its_snapshot() {
    let mut sim = parked();
    let round_trip = |sim: &Sim| {
        let bytes = rmp_serde::to_vec_named(&sim.state.snapshot()).unwrap();
        let snap: SagaSnapshot = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(snap.v, VIEW_VERSION);
        SagaState::from_snapshot(&sim.plan, &snap).unwrap()
    };
    assert_eq!(round_trip(&sim), sim.state);
    sim.ok(Event::OperatorSkip { reason: "x".into(), by: None });
    assert_eq!(round_trip(&sim), sim.state);
}

// ---------------------------------------------------------------------------------------------
// The timeline.

fn events(h: &saga_core::Handled) -> Vec<TimelineEvent> {
    h.timeline.iter().map(|e| e.event.clone()).collect()
}

fn dispatched(step: &str, phase: Phase, attempt: u32, deadline: u64) -> TimelineEvent {
    let (service, command) = match phase {
        Phase::Action => (format!("svc-{step}"), format!("do-{step}")),
        Phase::Compensation => (format!("svc-{step}"), format!("undo-{step}")),
    };
    TimelineEvent::Dispatched {
        step: step.into(),
        phase,
        attempt,
        service: service.as_str().into(),
        command: command.as_str().into(),
        deadline: Timestamp(deadline),
    }
}

#[test]
fn the_timeline_records_each_transition_with_its_facts() {
    let mut sim = Sim::new(&chain3());
    let h = sim.handle(Event::Start { input: saga_input() });
    assert_eq!(events(&h), [TimelineEvent::Started, dispatched("a", Phase::Action, 1, 1000)]);
    assert!(h.timeline.iter().all(|e| e.at == Timestamp(0)));

    let h = sim.at(10).handle(failed("a", 1, true));
    assert_eq!(
        events(&h),
        [
            TimelineEvent::Failed {
                step: "a".into(),
                phase: Phase::Action,
                attempt: 1,
                reason: "unavailable".into(),
                transient: true
            },
            TimelineEvent::RetryScheduled {
                step: "a".into(),
                phase: Phase::Action,
                next_attempt: 2,
                at: Timestamp(110)
            },
        ]
    );
    assert_eq!(
        events(&sim.at(110).handle(backoff("a", 1))),
        [dispatched("a", Phase::Action, 2, 1110)]
    );
    assert_eq!(
        events(&sim.at(120).handle(succeeded("a", 2))),
        [
            TimelineEvent::Succeeded { step: "a".into(), phase: Phase::Action, attempt: 2 },
            dispatched("b", Phase::Action, 1, 1120),
        ]
    );
    let reason = "customer changed their mind".to_owned();
    let h = sim.at(130).handle(Event::Cancel { reason: reason.clone(), by: Some("ann".into()) });
    assert_eq!(
        events(&h),
        [
            TimelineEvent::CancelRequested { reason: reason.clone(), by: Some("ann".into()) },
            TimelineEvent::CompensationStarted { cause: Cause::Cancelled { reason } },
        ]
    );
    assert_eq!(
        events(&sim.at(140).handle(failed("b", 1, false))),
        [
            TimelineEvent::Failed {
                step: "b".into(),
                phase: Phase::Action,
                attempt: 1,
                reason: "declined".into(),
                transient: false
            },
            dispatched("a", Phase::Compensation, 1, 1140),
        ]
    );
    let h = sim.at(150).handle(comp_ok("a", 1));
    assert_eq!(
        events(&h),
        [
            TimelineEvent::Succeeded { step: "a".into(), phase: Phase::Compensation, attempt: 1 },
            TimelineEvent::Finished { status: SagaStatus::Cancelled },
        ]
    );
    assert!(h.timeline.iter().all(|e| e.at == Timestamp(150)));
    // A rejected event writes nothing.
    let h = sim.handle(comp_ok("a", 1));
    assert!(h.result.is_err() && h.timeline.is_empty());
    assert_eq!(sim.timeline.len(), 13);
}

#[test]
fn the_timeline_records_timeouts_parking_and_who_acted() {
    let mut sim = parked();
    let parked_at = sim.records.iter().rposition(|r| r.accepted()).unwrap();
    assert_eq!(
        events(&sim.records[parked_at].handled),
        [
            TimelineEvent::Failed {
                step: "b".into(),
                phase: Phase::Compensation,
                attempt: 3,
                reason: "comp unavailable".into(),
                // As the reply said: a transient one would not have parked it yet.
                transient: false
            },
            TimelineEvent::Parked {
                step: "b".into(),
                reason: "compensation of step b failed 3 times: comp unavailable".into()
            },
        ]
    );
    assert!(sim.timeline.iter().any(|e| e.event
        == TimelineEvent::TimedOut { step: "b".into(), phase: Phase::Compensation, attempt: 2 }));
    assert!(sim.timeline.iter().any(|e| e.event
        == TimelineEvent::CompensationStarted {
            cause: Cause::StepFailed { step: "c".into(), reason: "declined".into() }
        }));
    let h = sim
        .at(5000)
        .handle(Event::OperatorResolve { reason: "written off".into(), by: Some("bob".into()) });
    assert_eq!(
        events(&h),
        [
            TimelineEvent::OperatorResolve { reason: "written off".into(), by: Some("bob".into()) },
            TimelineEvent::Finished { status: SagaStatus::Resolved },
        ]
    );
}

#[test]
fn an_operator_message_passes_who_asked_to_the_timeline() {
    use saga_core::wire::{OperatorAction, OperatorMessage, PROTOCOL_VERSION};
    let msg = OperatorMessage {
        v: PROTOCOL_VERSION,
        saga_id: SagaId::from(SAGA_ID),
        action: OperatorAction::Cancel,
        reason: "duplicate order".into(),
    };
    // Who asked comes from the subject the message arrived on (its operator token).
    let event = msg.to_event("support");
    assert_eq!(
        event,
        Event::Cancel { reason: "duplicate order".into(), by: Some("support".into()) }
    );
    let mut sim = Sim::new(&chain3());
    sim.start();
    let h = sim.at(5).handle(event);
    assert_eq!(
        events(&h)[0],
        TimelineEvent::CancelRequested {
            reason: "duplicate order".into(),
            by: Some("support".into())
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Commands that found no responder.

/// One step `a` with a single attempt and a 1 s timeout.
fn single_attempt() -> saga_core::Plan {
    plan(
        SagaDefinition::builder("once")
            .step("a", "svc-a", "do-a", |s| {
                s.compensation("undo-a").timeout(Duration::from_secs(1)).retry(exact_retry(1))
            })
            .build(),
    )
}

#[test]
fn undelivered_is_not_an_attempt() {
    let mut sim = Sim::new(&single_attempt());
    sim.start();
    let mut t = 0;
    for (k, delay) in [500, 1000, 2000, 4000, 8000].into_iter().enumerate() {
        t += 10;
        let h = sim.at(t).handle(undelivered("a", 1));
        assert_eq!(h.rule, Rule::Undelivered);
        assert_eq!(
            summary(&h.result.unwrap()),
            ["disarm a.a.1.timeout".to_owned(), format!("arm a.a.1.redeliver @{}", t + delay)]
        );
        assert_eq!(
            events(&sim.records.last().unwrap().handled),
            [TimelineEvent::NotDelivered {
                step: "a".into(),
                phase: Phase::Action,
                attempt: 1,
                retry_at: Timestamp(t + delay)
            }]
        );
        let snap = sim.state.snapshot();
        assert_eq!(
            (snap.steps[0].status, snap.steps[0].attempt, snap.steps[0].undelivered),
            (StepStatus::Running, 1, k as u32 + 1)
        );
        assert_eq!(snap.steps[0].timer_at, Some(Timestamp(t + delay)));
        // The same report again changes nothing: the command was not sent since.
        assert_eq!(
            sim.err(undelivered("a", 1)),
            Rejection::Duplicate {
                step: "a".into(),
                phase: Phase::Action,
                attempt: 1,
                already: "reported undelivered"
            }
        );
        // Waiting to send again, the attempt cannot time out.
        assert!(matches!(sim.err(timeout("a", 1)), Rejection::Stale { attempt: 1, .. }));
        let h = sim.fire(&"a".into());
        t = sim.now.0;
        assert_eq!(h.rule, Rule::RunningTimer);
        let fx = h.result.unwrap();
        assert_eq!(
            summary(&fx),
            [
                format!("dispatch id.a.a.1 do-a @{}", t + 1000),
                format!("arm a.a.1.timeout @{}", t + 1000)
            ]
        );
        assert_eq!(
            events(&sim.records.last().unwrap().handled),
            [dispatched("a", Phase::Action, 1, t + 1000)]
        );
        // Sent again: the counter stays until an answer comes.
        assert_eq!(sim.state.snapshot().steps[0].undelivered, k as u32 + 1);
        assert!(!sim.state.snapshot().steps[0].awaiting_redelivery);
        // A stale redelivery timer is refused.
        assert!(matches!(sim.err(redeliver("a", 1)), Rejection::Stale { .. }));
    }
    assert!(sim.sent.iter().all(|d| d.command_id.as_str() == "id.a.a.1"));
    assert_eq!(sim.sent.len(), 6);
    assert_eq!(sim.state.step_attempt(&"a".into(), Phase::Action), Some(1));
    t += 10;
    assert_eq!(
        summary(&sim.at(t).ok(succeeded("a", 1))),
        s(&[
            "disarm a.a.1.timeout",
            "publish step_succeeded a",
            "publish completed",
            "finish completed"
        ])
    );
    assert_eq!(sim.state.status(), SagaStatus::Completed);
    assert_eq!(sim.state.snapshot().steps[0].undelivered, 0);
    assert!(sim.timers.is_empty() && sim.unarmed_cancels.is_empty());
    assert!(sim.anomalies.is_empty(), "{:?}", sim.anomalies);
}

#[test]
fn redelivery_waits_double_each_time_up_to_30_seconds() {
    let mut sim = Sim::new(&single_attempt());
    sim.start();
    let mut delays = Vec::new();
    for _ in 0..9 {
        let at = sim.now;
        sim.ok(undelivered("a", 1));
        let (_, fires) = sim.timers[&StepName::from("a")];
        delays.push(fires.0 - at.0);
        sim.fire(&"a".into());
    }
    assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]);
}

#[test]
fn a_redelivered_attempt_can_still_time_out() {
    let mut sim = Sim::new(&chain3());
    sim.start();
    sim.at(10).ok(undelivered("a", 1));
    assert_eq!(
        summary(&sim.fire(&"a".into()).result.unwrap()),
        s(&["dispatch id.a.a.1 do-a @1510", "arm a.a.1.timeout @1510"])
    );
    // Sent, but never answered: the attempt times out as usual and the next one is a new
    // attempt with a fresh redelivery count.
    assert_eq!(summary(&sim.at(1510).ok(timeout("a", 1))), s(&["arm a.a.1.backoff @1610"]));
    assert_eq!(sim.state.snapshot().steps[0].undelivered, 0);
    assert_eq!(
        summary(&sim.at(1610).ok(backoff("a", 1))),
        s(&["dispatch id.a.a.2 do-a @2610", "arm a.a.2.timeout @2610"])
    );
    assert_eq!(
        summary(&sim.at(1620).ok(undelivered("a", 2))),
        s(&["disarm a.a.2.timeout", "arm a.a.2.redeliver @2120"])
    );
}

#[test]
fn a_reply_while_waiting_for_redelivery_is_taken() {
    // An earlier send did arrive after all (a driver re-sent the command after a crash).
    let mut sim = Sim::new(&chain3());
    sim.start();
    sim.at(10).ok(undelivered("a", 1));
    assert_eq!(
        summary(&sim.at(20).ok(succeeded("a", 1))),
        s(&[
            "disarm a.a.1.redeliver",
            "publish step_succeeded a",
            "dispatch id.b.a.1 do-b @1020",
            "arm b.a.1.timeout @2020",
        ])
    );
    assert!(matches!(sim.err(redeliver("a", 1)), Rejection::Duplicate { .. }));
    // And a failure: retried as usual, and the redelivery count starts over.
    sim.at(30).ok(undelivered("b", 1));
    assert_eq!(sim.state.snapshot().steps[1].undelivered, 1);
    assert_eq!(
        summary(&sim.at(40).ok(failed("b", 1, true))),
        s(&["disarm b.a.1.redeliver", "arm b.a.1.backoff @140"])
    );
    assert_eq!(sim.state.snapshot().steps[1].undelivered, 0);
    assert!(sim.unarmed_cancels.is_empty(), "{:?}", sim.unarmed_cancels);
}

#[test]
fn undelivered_reports_for_other_attempts_are_refused() {
    let mut sim = Sim::new(&chain3());
    assert_eq!(sim.handle(undelivered("a", 1)).rule, Rule::NotStarted);
    sim.start();
    sim.fire(&"a".into()); // attempt 1 times out at 1000
                           // Waiting for the backoff: nothing in flight.
    assert!(matches!(
        sim.err(undelivered("a", 1)),
        Rejection::Stale { attempt: 1, current: 1, status: StepStatus::RetryWait, .. }
    ));
    sim.fire(&"a".into()); // attempt 2 at 1100
    for (event, attempt) in [(undelivered("a", 1), 1), (undelivered("a", 3), 3)] {
        assert_eq!(
            sim.err(event),
            Rejection::Stale {
                step: "a".into(),
                phase: Phase::Action,
                attempt,
                current: 2,
                status: StepStatus::Running
            }
        );
    }
    let comp = Event::Undelivered { step: "a".into(), phase: Phase::Compensation, attempt: 1 };
    assert!(matches!(sim.err(comp), Rejection::Stale { phase: Phase::Compensation, .. }));
    assert_eq!(sim.err(undelivered("zz", 1)), Rejection::UnknownStep { step: "zz".into() });
    sim.at(1200).ok(succeeded("a", 2));
    assert!(matches!(
        sim.err(undelivered("a", 2)),
        Rejection::Duplicate { already: "succeeded", .. }
    ));
    sim.at(1300).ok(failed("b", 1, false));
    sim.at(1400).ok(comp_ok("a", 1));
    let h = sim.handle(undelivered("a", 2));
    assert_eq!(h.rule, Rule::Finished);
    assert!(matches!(h.result, Err(Rejection::Finished { event: "undelivered", .. })));
    assert!(sim.anomalies.is_empty(), "{:?}", sim.anomalies);
}

#[test]
fn an_undelivered_compensation_is_sent_again_with_the_same_id() {
    let mut sim = Sim::new(&chain3());
    sim.start();
    sim.at(10).ok(succeeded("a", 1));
    sim.at(20).ok(failed("b", 1, false));
    let h = sim.at(30).handle(Event::Undelivered {
        step: "a".into(),
        phase: Phase::Compensation,
        attempt: 1,
    });
    assert_eq!(h.rule, Rule::Undelivered);
    assert_eq!(
        summary(&h.result.unwrap()),
        s(&["disarm a.c.1.timeout", "arm a.c.1.redeliver @530"])
    );
    assert_outstanding(&sim, &[]);
    let h = sim.fire(&"a".into());
    assert_eq!(h.rule, Rule::CompensatingTimer);
    assert_eq!(
        summary(&h.result.unwrap()),
        s(&["dispatch id.a.c.1 undo-a @1530", "arm a.c.1.timeout @1530"])
    );
    assert_outstanding(&sim, &["id.a.c.1"]);
    let first = &sim.sent[sim.sent.len() - 2];
    let again = sim.sent.last().unwrap();
    assert_eq!((&first.command_id, &first.output), (&again.command_id, &again.output));
    sim.at(1600).ok(comp_ok("a", 1));
    assert_eq!(sim.state.status(), SagaStatus::Compensated);
}

#[test]
fn outstanding_re_arms_the_redelivery_without_sending() {
    let mut sim = Sim::new(&flow_plan());
    sim.start();
    sim.at(10).ok(undelivered("a", 1));
    assert_outstanding(&sim, &[]);
    let rebuilt = SagaState::replay(SagaId::from(SAGA_ID), &sim.plan, &sim.log).unwrap();
    assert_eq!(rebuilt, sim.state);
    // Sent again, maybe delivered before: claimed, so re-sent at once after a crash.
    sim.fire(&"a".into());
    assert_outstanding(&sim, &["id.a.a.1"]);
}

/// A first attempt goes out unclaimed (exclusive). A driver taking the saga over does not
/// send it again while that delivery may still run: it arms a redelivery for the deadline plus
/// the grace period, which sends the same attempt claimed, with a fresh deadline.
#[test]
fn a_first_attempt_is_sent_unclaimed_and_re_sent_claimed_only_after_its_deadline() {
    let mut sim = Sim::new(&flow_plan());
    let fx = sim.start();
    let sent: Vec<&Dispatch> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch(d) => Some(d),
            _ => None,
        })
        .collect();
    assert!(!sent.is_empty() && sent.iter().all(|d| d.exclusive), "{sent:?}");
    let deadline = sent.iter().find(|d| d.step.as_str() == "a").unwrap().deadline;
    let timers: Vec<(Timer, Timestamp)> = sim
        .state
        .outstanding(&sim.plan)
        .into_iter()
        .filter_map(|e| match e {
            Effect::ScheduleTimer { timer, at } => Some((timer, at)),
            _ => None,
        })
        .collect();
    let (timer, at) = timers.iter().find(|(t, _)| t.step.as_str() == "a").unwrap().clone();
    assert_eq!(timer.kind, TimerKind::Redeliver);
    assert_eq!(at, deadline.after(saga_core::UNCLAIMED_GRACE));
    // The redelivery sends attempt 1 again, claimed, with a fresh deadline.
    let fx = sim.at(at.0).ok(Event::TimerFired(timer));
    let again = fx
        .iter()
        .find_map(|e| match e {
            Effect::Dispatch(d) => Some(d.clone()),
            _ => None,
        })
        .expect("sent again");
    assert_eq!((again.step.as_str(), again.attempt, again.exclusive), ("a", 1, false));
    assert!(again.deadline > at);
    // Its success is taken as the attempt's.
    sim.at(at.0 + 10).ok(succeeded("a", 1));
    assert_eq!(sim.step("a"), StepStatus::Succeeded);
    // A compensation, a retry or a later attempt is never exclusive.
    sim.at(at.0 + 20).ok(failed("b", 1, true));
    sim.at(at.0 + 30).ok(backoff("b", 1));
    assert_outstanding(&sim, &["id.b.a.2"]);
}

// ---------------------------------------------------------------------------------------------
// Reproductions of defects found in the state machine: `regression_*` ones are fixed,
// `bug_*` ones fail until the machine is fixed.

/// `a` (compensatable) `-> b` (read-only) `-> c` (compensatable).
fn read_only_in_the_middle() -> saga_core::Plan {
    let t = Duration::from_secs(1);
    plan(
        SagaDefinition::builder("ro")
            .step("a", "svc-a", "do-a", |s| s.compensation("undo-a").timeout(t))
            .step("b", "svc-b", "check", |s| s.read_only().timeout(t))
            .step("c", "svc-c", "do-c", |s| s.compensation("undo-c").timeout(t))
            .build(),
    )
}

/// Regression (BUG-1, fixed): compensation order ignored steps that depend on a step *through*
/// a read-only (or any compensation-less) step. With `a -> b(read_only) -> c`, a cancel while `c` is in flight
/// dispatched `a`'s compensation at once, because `settled(b)` is true (b needs no
/// compensation) even though `c`, which depends on `b` and so on `a`, is still running. When
/// `c` then succeeded it was compensated *after* `a`: not reverse order.
#[test]
fn regression_compensation_waits_for_dependents_behind_a_read_only_step() {
    let mut sim = Sim::new(&read_only_in_the_middle());
    sim.start();
    sim.at(10).ok(succeeded("a", 1));
    sim.at(20).ok(succeeded("b", 1));
    assert_eq!(sim.step("c"), StepStatus::Running);
    let fx = sim.at(30).ok(cancel());
    assert_eq!(
        summary(&fx),
        s(&["publish compensating"]),
        "BUG-1: a is compensated while c (after b, after a) is still in flight"
    );
    sim.at(40).ok(succeeded("c", 1));
    sim.drain(0);
    assert_eq!(compensation_order(&sim), ["c", "a"], "BUG-1: reverse dependency order");
}

/// Regression (BUG-2, fixed): a cancel was accepted while the pivot was in flight. If the pivot
/// then succeeded, the saga still compensated the steps before it and ended `cancelled`: the
/// point of no return was passed, yet the saga neither completed nor ran its retriable steps.
#[test]
fn regression_a_pivot_that_succeeds_after_a_cancel_still_completes_the_saga() {
    let mut sim = Sim::new(&pivot_plan());
    sim.start();
    sim.at(10).ok(succeeded("a", 1));
    assert_eq!(sim.step("p"), StepStatus::Running);
    let _ = sim.at(20).handle(cancel());
    sim.at(30).handle(succeeded("p", 1));
    sim.drain(0);
    assert_eq!(sim.step("p"), StepStatus::Succeeded);
    assert_eq!(
        (sim.state.status(), compensation_order(&sim)),
        (SagaStatus::Completed, vec![]),
        "BUG-2: the pivot succeeded, so the saga must complete (r must run, a must not be undone)"
    );
    assert_eq!(sim.step("r"), StepStatus::Succeeded);
}

/// Regression (BUG-3, fixed): a step whose earlier attempt timed out (outcome unknown) and
/// whose last attempt then failed transiently ended `failed` and was not compensated
/// (`dispatch` reset `timed_out` for each new attempt). The timed-out command may still be
/// delivered; as no compensation (and so no barrier) was ever recorded, the participant then
/// ran the action, and its effect was never undone.
#[test]
fn regression_an_earlier_timed_out_attempt_keeps_the_outcome_unknown() {
    let t = Duration::from_secs(1);
    let plan = plan(
        SagaDefinition::builder("leak")
            .step("a", "svc-a", "do-a", |s| {
                s.compensation("undo-a").timeout(t).retry(exact_retry(2))
            })
            .step("b", "svc-b", "do-b", |s| s.compensation("undo-b").timeout(t))
            .build(),
    );
    let mut sim = Sim::new(&plan);
    sim.start();
    sim.fire(&"a".into()); // attempt 1 times out; its command is still on its way
    sim.fire(&"a".into()); // backoff over: attempt 2
    assert_eq!(sim.inflight.len(), 2);
    sim.deliver(1, Wish::Transient); // attempt 2 fails transiently: no attempt left
    sim.drain(0);
    sim.flush(); // attempt 1 finally reaches the participant
    assert!(sim.terminal());
    let a = StepName::from("a");
    let leaked = sim.participant.action_executed(&a) && !sim.participant.compensation_recorded(&a);
    assert!(
        !leaked,
        "BUG-3: a's action ran and was never compensated (a ended {:?}, saga {})",
        sim.step("a"),
        sim.state.status()
    );
}

#[test]
fn cancel_is_refused_while_the_pivot_is_in_flight() {
    let mut sim = Sim::new(&pivot_plan());
    sim.start();
    sim.at(10).ok(succeeded("a", 1));
    let refused = |sim: &mut Sim| {
        let h = sim.handle(cancel());
        assert_eq!(h.rule, Rule::CancelRunning);
        assert!(
            matches!(h.result, Err(Rejection::NotApplicable { event: "cancel", .. })),
            "{:?}",
            h.result
        );
    };
    refused(&mut sim); // running
    sim.at(20).ok(failed("p", 1, true));
    assert_eq!(sim.step("p"), StepStatus::RetryWait);
    refused(&mut sim); // waiting to retry
    sim.at(120).ok(backoff("p", 1));
    sim.at(130).ok(failed("p", 2, false));
    assert_eq!(sim.state.status(), SagaStatus::Compensating, "the pivot failed: undo a");
    assert_eq!(compensation_order(&sim), ["a"]);
}

/// BUG-4: a parked saga stays parked after its stuck compensation succeeds late. Here b's
/// last compensation attempt times out, so the saga needs intervention; then that attempt's
/// success arrives. The machine accepts it (b is compensated) but leaves the saga in
/// `needs_intervention` with no stuck step, and does not dispatch a's compensation (now
/// ready): the saga waits for an operator for nothing. It also disarms a backoff timer that
/// was never armed (`disarm b.c.3.backoff`).
#[test]
fn bug_a_late_success_of_the_stuck_compensation_unparks_the_saga() {
    // Every attempt times out: the budget for timeouts is COMPENSATION_TIMEOUT_ATTEMPTS.
    let last = saga_core::COMPENSATION_TIMEOUT_ATTEMPTS;
    let timed_out = |n| timer("b", Phase::Compensation, n, TimerKind::Timeout);
    let (mut sim, t) = compensation_failing(last, Rule::CompensatingTimer, timed_out);
    assert_eq!(
        summary(&sim.at(t).ok(timer("b", Phase::Compensation, last, TimerKind::Timeout))),
        s(&["publish needs_intervention b"])
    );
    assert_eq!(sim.state.status(), SagaStatus::NeedsIntervention);
    // The timed-out attempt did its work after all.
    let h = sim.at(1400).handle(comp_ok("b", last));
    assert_eq!(h.rule, Rule::CompensationSucceeded);
    assert_eq!(sim.step("b"), StepStatus::Compensated);
    assert_eq!(
        (sim.state.status(), summary(&h.result.unwrap())),
        (
            SagaStatus::Compensating,
            s(&[
                "publish step_compensated b",
                "dispatch id.a.c.1 undo-a @2400",
                "arm a.c.1.timeout @2400",
            ])
        ),
        "BUG-4: nothing is stuck any more: the saga should go on compensating"
    );
}

#[test]
fn kinds_used_by_the_scenarios_validate() {
    assert_eq!(pivot_plan().pivot(), Some(1));
    assert_eq!(pivot_plan().steps()[2].kind, StepKind::Retriable);
    assert_eq!(read_only_in_the_middle().steps()[1].compensation, None);
}
