//! Transition-table coverage: scenario drives plus seeded random simulations must exercise
//! every row of the state machine's `(status, event)` table, `Rule::ALL`.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use saga_core::{Event, Phase, Rule, TimerKind};

/// Random simulations run on top of the scenario drives.
const RANDOM_RUNS: u64 = 400;

/// Scenario-like drives, one per family of paths; returns their simulators.
fn drives() -> Vec<Sim> {
    let mut sims = Vec::new();

    // Before the start, the start, a second start, the happy path, after the end.
    let mut sim = Sim::new(&chain3());
    sim.handle(succeeded("a", 1));
    sim.start();
    sim.handle(Event::Start { input: saga_input() });
    for (t, step) in [(10, "a"), (20, "b"), (30, "c")] {
        sim.at(t).handle(succeeded(step, 1));
    }
    sim.handle(cancel());
    sims.push(sim);

    // Timeouts, retries, transient failures, a compensation reply and operator actions while
    // running, then a business failure and a cancel while compensating.
    let mut sim = Sim::new(&chain3());
    sim.start();
    sim.at(1000).handle(timeout("a", 1));
    sim.at(1100).handle(backoff("a", 1));
    sim.at(1200).handle(failed("a", 2, true));
    sim.handle(comp_ok("a", 1));
    sim.handle(Event::OperatorRetry { reason: "x".into(), by: None });
    sim.at(1400).handle(backoff("a", 2));
    sim.at(1500).handle(succeeded("a", 3));
    sim.at(1600).handle(failed("b", 1, false));
    sim.handle(cancel());
    sim.handle(Event::OperatorSkip { reason: "x".into(), by: None });
    sim.drain(0);
    sims.push(sim);

    // Parallel branches: late success, late failure, late timeout while compensating.
    for late in 0..3 {
        let mut sim = Sim::new(&diamond());
        sim.start();
        sim.at(10).handle(succeeded("a", 1));
        sim.at(20).handle(failed("b", 1, false));
        match late {
            0 => sim.at(30).handle(succeeded("c", 1)),
            1 => sim.at(30).handle(failed("c", 1, true)),
            _ => sim.at(1010).handle(timeout("c", 1)),
        };
        sim.drain(0);
        sims.push(sim);
    }

    // Cancel while running, then compensation failures, a parked saga and each operator
    // action (and the late replies they meet).
    for op in 0..3 {
        let mut sim = Sim::new(&pivot_plan());
        sim.start();
        sim.at(10).handle(succeeded("a", 1));
        sim.at(15).handle(cancel());
        sim.at(20).handle(failed("p", 1, false));
        for attempt in 1..=3 {
            sim.handle(comp_failed("a", attempt));
            if attempt < 3 {
                sim.handle(timer("a", Phase::Compensation, attempt, TimerKind::Backoff));
            }
        }
        sim.handle(succeeded("p", 1));
        sim.handle(failed("p", 1, false));
        sim.handle(cancel());
        sim.handle(operator_event(op));
        sim.drain(op);
        sim.handle(succeeded("a", 1));
        sims.push(sim);
    }
    // Undelivered commands: before the start, while running and while compensating (each sent
    // again by its redelivery timer), and after the end.
    let mut sim = Sim::new(&chain3());
    sim.handle(undelivered("a", 1));
    sim.start();
    sim.at(10).handle(undelivered("a", 1));
    sim.fire(&"a".into());
    sim.at(600).handle(succeeded("a", 1));
    sim.at(700).handle(failed("b", 1, false));
    sim.at(710).handle(Event::Undelivered {
        step: "a".into(),
        phase: Phase::Compensation,
        attempt: 1,
    });
    sim.fire(&"a".into());
    sim.drain(0);
    sim.handle(undelivered("a", 1));
    sims.push(sim);
    sims
}

#[test]
fn every_rule_is_exercised() {
    let mut seen: BTreeMap<Rule, usize> = BTreeMap::new();
    let mut count = |sim: &Sim| {
        for r in &sim.records {
            *seen.entry(r.handled.rule).or_default() += 1;
        }
    };
    let mut by_drives = BTreeSet::new();
    for sim in drives() {
        count(&sim);
        by_drives.extend(sim.records.iter().map(|r| r.handled.rule));
    }
    let mut rng = SplitMix(2024);
    let mut runs = 0;
    while runs < RANDOM_RUNS {
        let seed = rng.vec(DEF_SEED_LEN);
        let g = gen_definition(&mut Src::new(&seed));
        let Ok(plan) = g.def.validate() else { continue };
        let choices = rng.vec(300);
        let sim = run_random(&plan, &g.behaviours, &choices);
        assert!(sim.terminal());
        assert!(sim.anomalies.is_empty(), "{:?}", sim.anomalies);
        count(&sim);
        runs += 1;
    }
    let all: BTreeSet<Rule> = Rule::ALL.into_iter().collect();
    let missing: Vec<&Rule> = all.iter().filter(|r| !seen.contains_key(r)).collect();
    let missing_from_drives: Vec<&Rule> = all.difference(&by_drives).collect();
    println!("rule counts: {seen:#?}");
    println!("rules not reached by the scenario drives alone: {missing_from_drives:?}");
    assert!(missing.is_empty(), "rules never exercised: {missing:?}");
    assert_eq!(seen.keys().copied().collect::<BTreeSet<_>>(), all);
}
