//! Await steps: a step that sends no command and completes when a correlated domain event or
//! a signal arrives. Scenarios of each path, then a property test over random definitions
//! with await steps and random interleavings of arrivals, duplicates, replies, timers and
//! cancels.

mod common;

use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::Config;
use saga_core::{
    AwaitOn, Effect, Event, OnTimeout, Payload, Phase, Plan, SagaDefinition, SagaId, SagaState,
    SagaStatus, StepName, StepStatus, TimelineEvent, TimerKind, ValidationError,
};
use serde_json::json;

fn msgpack(v: serde_json::Value) -> Payload {
    Payload::new(rmp_serde::to_vec_named(&v).expect("encodes"))
}

/// reserve (command) -> payment (await payments.confirmed, or payments.declined, where
/// order_id = input.id) -> ship (command).
fn order(on_timeout: OnTimeout) -> Plan {
    plan(
        SagaDefinition::builder("order")
            .step("reserve", "seller", "reserve", |s| s.compensation("release"))
            .await_step("payment", |a| {
                a.event("payments.confirmed")
                    .fail_event("payments.declined")
                    .matching("order_id", "input.id")
                    .on_timeout(on_timeout)
                    .timeout(Duration::from_secs(60))
            })
            .step("ship", "logistics", "ship", |s| s.compensation("unship"))
            .build(),
    )
}

/// A saga of `plan` started with input `{"id": "o-1"}`, its first step succeeded.
fn waiting(plan: &Plan) -> Sim {
    let mut sim = Sim::new(plan);
    sim.ok(Event::Start { input: msgpack(json!({"id": "o-1"})) });
    sim.deliver(0, Wish::Success);
    sim
}

fn awaits(effects: &[Effect]) -> Vec<&saga_core::Awaiting> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Await(a) => Some(a),
            _ => None,
        })
        .collect()
}

fn arrival(step: &str, payload: Payload) -> Event {
    Event::StepSucceeded { step: step.into(), attempt: 1, output: payload }
}

#[test]
fn an_await_step_waits_for_the_correlated_event_and_sends_no_command() {
    let plan = order(OnTimeout::Fail);
    let sim = waiting(&plan);
    let fx = sim.records.last().expect("handled").effects().to_vec();
    let waits = awaits(&fx);
    assert_eq!(waits.len(), 1, "{:?}", summary(&fx));
    assert_eq!(
        waits[0].on,
        AwaitOn::Event {
            event: "payments.confirmed".into(),
            fail_event: Some("payments.declined".into()),
            field: "order_id".into(),
            value: "\"o-1\"".into(),
            window: saga_core::DEFAULT_AWAIT_WINDOW,
        }
    );
    assert_eq!(waits[0].deadline.0, sim.now.0 + 60_000);
    assert!(summary(&fx).contains(&format!("arm payment.a.1.timeout @{}", sim.now.0 + 60_000)));
    assert!(dispatches(&fx).is_empty(), "an await step sends no command: {:?}", summary(&fx));
    assert_eq!(sim.step("payment"), StepStatus::Running);
    assert!(matches!(
        &sim.timeline.last().expect("entries").event,
        TimelineEvent::Awaiting { step, waits_for, .. }
            if step.as_str() == "payment"
                && waits_for == "event payments.confirmed where order_id = \"o-1\""
    ));
}

#[test]
fn the_event_completes_the_step_and_its_payload_reaches_the_next_step() {
    let plan = order(OnTimeout::Fail);
    let mut sim = waiting(&plan);
    let paid = msgpack(json!({"order_id": "o-1", "amount": 12}));
    let fx = sim.ok(arrival("payment", paid.clone()));
    assert!(summary(&fx).contains(&"disarm payment.a.1.timeout".to_owned()));
    let sent = dispatches(&fx);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].step.as_str(), "ship");
    assert_eq!(sent[0].deps.get(&StepName::from("payment")), Some(&paid));
    sim.deliver(0, Wish::Success);
    assert_eq!(sim.state.status(), SagaStatus::Completed);
}

#[test]
fn a_duplicate_event_completes_the_step_once() {
    let plan = order(OnTimeout::Fail);
    let mut sim = waiting(&plan);
    let paid = msgpack(json!({"order_id": "o-1"}));
    sim.ok(arrival("payment", paid.clone()));
    let rejection = sim.err(arrival("payment", paid));
    assert!(rejection.to_string().starts_with("duplicate"), "{rejection}");
    // The fail event after the success is stale too.
    sim.err(Event::StepFailed {
        step: "payment".into(),
        attempt: 1,
        reason: "declined".into(),
        transient: false,
    });
}

#[test]
fn a_fail_event_fails_the_step_and_the_saga_compensates_the_steps_before_it() {
    let plan = order(OnTimeout::Fail);
    let mut sim = waiting(&plan);
    let fx = sim.ok(Event::StepFailed {
        step: "payment".into(),
        attempt: 1,
        reason: "event payments.declined: card refused".into(),
        transient: false,
    });
    assert_eq!(sim.state.status(), SagaStatus::Compensating);
    assert_eq!(sim.step("payment"), StepStatus::Failed);
    let sent = dispatches(&fx);
    assert_eq!(sent.len(), 1);
    assert_eq!((sent[0].step.as_str(), sent[0].phase), ("reserve", Phase::Compensation));
    sim.deliver(0, Wish::Success);
    assert_eq!(sim.state.status(), SagaStatus::Compensated);
    assert!(sim.sent.iter().all(|d| d.step.as_str() != "payment"));
}

#[test]
fn a_timeout_fails_the_step_and_compensates_by_default() {
    let plan = order(OnTimeout::Fail);
    let mut sim = waiting(&plan);
    let h = sim.fire(&"payment".into());
    assert!(h.result.is_ok());
    assert_eq!(sim.step("payment"), StepStatus::Failed, "nothing ran, so nothing is unknown");
    let snap = sim.state.snapshot();
    let payment = snap.steps.iter().find(|s| s.name.as_str() == "payment").expect("step");
    assert_eq!(
        payment.last_error.as_deref(),
        Some("no event payments.confirmed where order_id = input.id within 1m")
    );
    sim.drain(0);
    assert_eq!(sim.state.status(), SagaStatus::Compensated);
    assert_eq!(sim.participant.executions(&"reserve".into(), Phase::Compensation), 1);
}

#[test]
fn on_timeout_continue_succeeds_the_step_with_no_output() {
    let plan = order(OnTimeout::Continue);
    let mut sim = waiting(&plan);
    sim.fire(&"payment".into());
    assert_eq!(sim.step("payment"), StepStatus::Succeeded);
    let ship = sim.inflight.first().expect("ship dispatched");
    assert_eq!(ship.step.as_str(), "ship");
    assert!(!ship.deps.contains_key(&StepName::from("payment")));
    sim.drain(0);
    assert_eq!(sim.state.status(), SagaStatus::Completed);
    // A late event is stale.
    sim.err(arrival("payment", msgpack(json!({"order_id": "o-1"}))));
}

#[test]
fn a_cancel_stops_the_wait_and_a_late_event_is_refused() {
    let plan = order(OnTimeout::Fail);
    let mut sim = waiting(&plan);
    let fx = sim.ok(cancel());
    assert!(summary(&fx).contains(&"disarm payment.a.1.timeout".to_owned()), "{:?}", summary(&fx));
    assert_eq!(sim.step("payment"), StepStatus::Failed);
    assert!(sim.timeline.iter().any(
        |e| matches!(&e.event, TimelineEvent::StoppedWaiting { step } if step.as_str() == "payment")
    ));
    sim.err(arrival("payment", msgpack(json!({"order_id": "o-1"}))));
    sim.drain(0);
    assert_eq!(sim.state.status(), SagaStatus::Cancelled);
}

#[test]
fn a_saga_without_the_value_to_match_fails_the_step_at_once() {
    let plan = order(OnTimeout::Fail);
    let mut sim = Sim::new(&plan);
    sim.ok(Event::Start { input: msgpack(json!({"customer": "ann"})) });
    sim.deliver(0, Wish::Success);
    assert_eq!(sim.step("payment"), StepStatus::Failed);
    assert_eq!(sim.state.status(), SagaStatus::Compensating);
    let snap = sim.state.snapshot();
    let payment = snap.steps.iter().find(|s| s.name.as_str() == "payment").expect("step");
    assert_eq!(
        payment.last_error.as_deref(),
        Some("await: input.id is missing from the saga's input, so no event can match")
    );
    assert!(sim.waits.is_empty());
}

#[test]
fn the_value_can_come_from_an_earlier_steps_output() {
    let plan = plan(
        SagaDefinition::builder("refund")
            .step("open", "desk", "open", |s| s.compensation("close"))
            .await_step("approved", |a| {
                a.event("desk.approved").matching("ticket.number", "steps.open.ticket")
            })
            .build(),
    );
    let mut sim = Sim::new(&plan);
    sim.ok(Event::Start { input: msgpack(json!({})) });
    let open = sim.inflight.remove(0);
    let fx = sim.ok(Event::StepSucceeded {
        step: open.step,
        attempt: 1,
        output: msgpack(json!({"ticket": 4711})),
    });
    let waits = awaits(&fx);
    assert!(
        matches!(&waits[0].on, AwaitOn::Event { field, value, .. } if field == "ticket.number" && value == "4711")
    );
}

#[test]
fn a_signal_step_waits_for_its_signal() {
    let plan = plan(
        SagaDefinition::builder("approve")
            .step("draft", "docs", "draft", |s| s.compensation("discard"))
            .await_step("review", |a| a.signal("approve"))
            .build(),
    );
    let mut sim = Sim::new(&plan);
    sim.start();
    let fx = {
        sim.deliver(0, Wish::Success);
        sim.records.last().expect("handled").effects().to_vec()
    };
    assert_eq!(awaits(&fx)[0].on, AwaitOn::Signal { name: "approve".into() });
    sim.ok(arrival("review", msgpack(json!({"by": "ann"}))));
    assert_eq!(sim.state.status(), SagaStatus::Completed);
}

#[test]
fn a_saga_taken_over_while_waiting_waits_again() {
    let plan = order(OnTimeout::Fail);
    let sim = waiting(&plan);
    assert_eq!(sim.outstanding_mismatch(), None);
    let back = SagaState::from_snapshot(&plan, &sim.state.snapshot()).expect("restores");
    let again = back.outstanding(&plan);
    assert_eq!(awaits(&again), awaits(sim.records.last().expect("handled").effects()));
    assert!(again.iter().any(|e| matches!(e, Effect::ScheduleTimer { timer, .. }
        if timer.step.as_str() == "payment" && timer.kind == TimerKind::Timeout)));
}

#[test]
fn await_steps_load_from_yaml_as_built() {
    let yaml = r#"
name: order
steps:
  - name: reserve
    service: seller
    action: reserve
    compensation: release
  - name: payment
    await:
      event: payments.confirmed
      fail_event: payments.declined
      match: { field: order_id, equals: input.id }
      window: 2h
      on_timeout: continue
    timeout: 10m
  - name: ship
    service: logistics
    action: ship
    compensation: unship
"#;
    let loaded = SagaDefinition::from_yaml(yaml).expect("parses");
    let built = SagaDefinition::builder("order")
        .step("reserve", "seller", "reserve", |s| s.compensation("release"))
        .await_step("payment", |a| {
            a.event("payments.confirmed")
                .fail_event("payments.declined")
                .matching("order_id", "input.id")
                .window(Duration::from_secs(7200))
                .on_timeout(OnTimeout::Continue)
                .timeout(Duration::from_secs(600))
        })
        .step("ship", "logistics", "ship", |s| s.compensation("unship"))
        .build();
    assert_eq!(loaded, built);
    assert_eq!(loaded.digest(), built.digest());
    loaded.validate().expect("valid");
    // A definition without await steps keeps its digest: the new fields are left out.
    let json = serde_json::to_string(&loaded.canonical().steps[0]).expect("json");
    assert!(!json.contains("await"), "{json}");
}

fn refusal(def: SagaDefinition) -> String {
    match def.validate() {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    }
}

fn base() -> saga_core::SagaBuilder {
    SagaDefinition::builder("o").step("reserve", "seller", "reserve", |s| s.compensation("release"))
}

#[test]
fn validation_refuses_await_steps_that_cannot_work() {
    let cases: Vec<(SagaDefinition, &str)> = vec![
        (
            SagaDefinition::builder("o").await_step("pay", |a| a.signal("go")).build(),
            "definition \"o\": every step is an await step; a saga needs at least one step with an action",
        ),
        (
            base().await_step("pay", |a| a).build(),
            "definition \"o\" step pay: await.event \"\": an await step needs an event (with match) or a signal",
        ),
        (
            base().await_step("pay", |a| a.event("payments.confirmed")).build(),
            "definition \"o\" step pay: await.match \"\": an event needs match",
        ),
        (
            base().await_step("pay", |a| a.event("payments.confirmed").signal("go")).build(),
            "definition \"o\" step pay: await.signal \"go\": an await step waits for an event or a signal, not both",
        ),
        (
            base().await_step("pay", |a| a.signal("go").fail_event("payments.declined")).build(),
            "definition \"o\" step pay: await.fail_event \"\": applies to an event, not a signal",
        ),
        (
            base()
                .await_step("pay", |a| a.event("payments.confirmed").matching("order_id", "steps.ship.id"))
                .step("ship", "logistics", "ship", |s| s.compensation("unship"))
                .build(),
            "definition \"o\" step pay: await.match.equals \"steps.ship.id\": step \"ship\" is not a step this one runs after",
        ),
        (
            base().await_step("pay", |a| a.event("payments.confirmed").matching("order_id", "id")).build(),
            "definition \"o\" step pay: await.match.equals \"id\": must be input, input.<field> or steps.<step>.<field>",
        ),
        (
            base().await_step("pay", |a| a.event("payments..confirmed").matching("order_id", "input.id")).build(),
            "definition \"o\" step pay: await.event \"payments..confirmed\": token \"\" is empty",
        ),
        (
            base().await_step("pay", |a| a.event("payments.>.x").matching("order_id", "input.id")).build(),
            "definition \"o\" step pay: await.event \"payments.>.x\": '>' may only be the last token",
        ),
        (
            base().await_step("pay", |a| a.signal("go now")).build(),
            "definition \"o\" step pay: await.signal \"go now\": a signal name contains ' '",
        ),
        (
            base().await_step("pay", |a| a.signal("go").window(Duration::ZERO)).build(),
            "definition \"o\" step pay: await.window \"0s\": must be above zero and at most 7 days",
        ),
    ];
    for (def, expected) in cases {
        let got = refusal(def);
        assert!(got.starts_with(expected), "got:      {got}\nexpected: {expected}");
    }
}

#[test]
fn validation_refuses_an_await_step_with_command_settings() {
    let mut with_action = base().await_step("pay", |a| a.signal("go")).build();
    with_action.steps[1].service = "payments".into();
    with_action.steps[1].action = "charge".into();
    assert!(refusal(with_action).contains("has both await and service/action"));
    let mut with_compensation = base().await_step("pay", |a| a.signal("go")).build();
    with_compensation.steps[1].compensation = Some("refund".into());
    assert!(refusal(with_compensation)
        .contains("an await step has no action, so it has no compensation"));
    let mut retried = base().await_step("pay", |a| a.signal("go")).build();
    retried.steps[1].retry.max_attempts = 5;
    assert!(refusal(retried).contains("an await step makes one attempt"));
    let retriable = base()
        .step("confirm", "orders", "confirm", |s| s.kind(saga_core::StepKind::Pivot))
        .await_step("pay", |a| a.signal("go").kind(saga_core::StepKind::Retriable))
        .build();
    assert!(refusal(retriable).contains("an await step cannot be retriable"));
    // An await step needs no compensation, and the step before it needs one as usual.
    let fine = SagaDefinition::builder("o")
        .await_step("pay", |a| a.signal("go"))
        .step("ship", "logistics", "ship", |s| s)
        .build();
    assert!(fine.validate().is_ok(), "{:?}", fine.validate().err());
    assert!(matches!(
        SagaDefinition::builder("o")
            .step("ship", "logistics", "ship", |s| s)
            .await_step("pay", |a| a.signal("go"))
            .build()
            .validate(),
        Err(ValidationError::MissingCompensation { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Random runs.

/// A chain of 2 to 6 steps from `seed`: each step an await (signal, or event matching the
/// input's id, either timeout meaning) one time in three, else a command with a
/// compensation; at least one command.
fn gen_plan(seed: &[u32]) -> (Plan, Vec<bool>) {
    let mut src = Src::new(seed);
    let n = 2 + src.below(5) as usize;
    let mut is_await: Vec<bool> = (0..n).map(|_| src.below(3) == 0).collect();
    if is_await.iter().all(|a| *a) {
        is_await[0] = false;
    }
    let mut b = SagaDefinition::builder("random");
    for (i, &a) in is_await.iter().enumerate() {
        let name = format!("s{i}");
        let timeout = Duration::from_millis(100 + u64::from(src.below(900)));
        if a {
            let signal = src.below(2) == 0;
            let on_timeout = if src.below(2) == 0 { OnTimeout::Fail } else { OnTimeout::Continue };
            b = b.await_step(&name, |w| {
                let w = if signal {
                    w.signal(&format!("go-{i}"))
                } else {
                    w.event("things.happened").matching("id", "input.id")
                };
                w.on_timeout(on_timeout).timeout(timeout)
            });
        } else {
            let attempts = 1 + src.below(3);
            b = b.step(&name, "svc", &format!("do-{i}"), |s| {
                s.compensation(&format!("undo-{i}")).timeout(timeout).retry(exact_retry(attempts))
            });
        }
    }
    (plan(b.build()), is_await)
}

/// One run: random moves (deliver a command with a random outcome, an arrival that
/// completes or fails a wait, a repeated arrival, a timer, a cancel), then driven to its end.
fn run(plan: &Plan, choices: &[u32]) -> (Sim, Vec<Event>) {
    let mut sim = Sim::new(plan);
    sim.ok(Event::Start { input: msgpack(json!({"id": 7})) });
    let mut arrivals: Vec<Event> = Vec::new();
    let arrive = |sim: &mut Sim, arrivals: &mut Vec<Event>, i: usize, fail: bool| {
        let w = sim.waits[i].clone();
        let event = if fail {
            Event::StepFailed {
                step: w.step,
                attempt: w.attempt,
                reason: "declined".into(),
                transient: false,
            }
        } else {
            Event::StepSucceeded {
                output: msgpack(json!({"id": 7, "for": w.step.as_str()})),
                step: w.step,
                attempt: w.attempt,
            }
        };
        if sim.handle(event.clone()).result.is_ok() {
            arrivals.push(event);
        }
    };
    for &c in choices {
        if sim.terminal() {
            break;
        }
        sim.now = sim.now.after(Duration::from_millis(u64::from((c >> 8) % 50)));
        match c % 10 {
            0..=3 if !sim.inflight.is_empty() => {
                let idx = (c >> 4) as usize % sim.inflight.len();
                let wish = match (c >> 12) % 6 {
                    0 => Wish::Business,
                    1 => Wish::Transient,
                    _ => Wish::Success,
                };
                sim.deliver(idx, wish);
            }
            4..=6 if !sim.waits.is_empty() => {
                let i = (c >> 4) as usize % sim.waits.len();
                arrive(&mut sim, &mut arrivals, i, (c >> 12) % 4 == 0);
            }
            7 if !arrivals.is_empty() => {
                let again = arrivals[(c >> 4) as usize % arrivals.len()].clone();
                if sim.handle(again.clone()).result.is_ok() {
                    sim.anomalies.push(format!("repeated arrival accepted: {again:?}"));
                }
            }
            8 if (c >> 4) % 6 == 0 => {
                sim.handle(cancel());
            }
            _ => {
                if let Some(step) = sim.earliest_timer() {
                    sim.fire(&step);
                }
            }
        }
        if c % 3 == 0 {
            if let Some(why) = sim.outstanding_mismatch() {
                sim.anomalies.push(why);
            }
        }
    }
    // To the end: commands succeed, waits get their event, then timers fire.
    for _ in 0..10_000 {
        if sim.terminal() {
            break;
        }
        let running_wait = (0..sim.waits.len()).find(|&i| {
            let w = &sim.waits[i];
            sim.state.step_status(&w.step) == Some(StepStatus::Running)
        });
        if !sim.inflight.is_empty() {
            sim.deliver(0, Wish::Success);
        } else if let Some(i) = running_wait {
            arrive(&mut sim, &mut arrivals, i, false);
        } else if let Some(step) = sim.earliest_timer() {
            sim.fire(&step);
        } else {
            sim.handle(operator_event(0));
        }
    }
    sim.flush();
    (sim, arrivals)
}

fn check(plan: &Plan, is_await: &[bool], sim: &Sim, arrivals: &[Event]) -> Result<(), String> {
    if !sim.terminal() {
        return Err(format!("did not end: {}", sim.state.status()));
    }
    if !sim.anomalies.is_empty() {
        return Err(format!("anomalies: {:#?}", sim.anomalies));
    }
    let replayed = SagaState::replay(SagaId::from(SAGA_ID), plan, &sim.log)
        .map_err(|(n, e)| format!("replay refused event {n}: {e}"))?;
    if replayed != sim.state {
        return Err("replay differs".into());
    }
    let snap = sim.state.snapshot();
    for (i, step) in plan.steps().iter().enumerate() {
        if !is_await[i] {
            continue;
        }
        if let Some(d) = sim.sent.iter().find(|d| d.step == step.name) {
            return Err(format!("await step {} was sent a command: {d:?}", step.name));
        }
        let completions = arrivals.iter().filter(|e| match e {
            Event::StepSucceeded { step: s, .. } | Event::StepFailed { step: s, .. } => {
                *s == step.name
            }
            _ => false,
        });
        if completions.count() > 1 {
            return Err(format!("await step {} completed more than once", step.name));
        }
        let st = &snap.steps[i];
        if matches!(st.status, StepStatus::Running) {
            return Err(format!("await step {} still waiting at the end", step.name));
        }
        // What a later command saw as this step's output is what arrived.
        let arrived = arrivals.iter().find_map(|e| match e {
            Event::StepSucceeded { step: s, output, .. } if *s == step.name => Some(output),
            _ => None,
        });
        if st.status == StepStatus::Succeeded && st.output.as_ref() != arrived {
            return Err(format!(
                "await step {} output {:?}, arrived {arrived:?}",
                step.name, st.output
            ));
        }
        for d in &sim.sent {
            let j = plan.step_index(&d.step).expect("known");
            if plan.deps(j).contains(&i) && d.deps.get(&step.name) != arrived {
                return Err(format!(
                    "{} got {:?} for {}",
                    d.command_id,
                    d.deps.get(&step.name),
                    step.name
                ));
            }
        }
    }
    if sim.state.status() == SagaStatus::Completed
        && snap.steps.iter().any(|s| s.status != StepStatus::Succeeded)
    {
        return Err("completed with a step not succeeded".into());
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config { failure_persistence: None, ..Config::default() })]

    #[test]
    fn await_steps_complete_once_send_nothing_and_never_outlive_the_saga(
        seed in prop::collection::vec(any::<u32>(), 20),
        choices in prop::collection::vec(any::<u32>(), 0..200),
    ) {
        let (plan, is_await) = gen_plan(&seed);
        let (sim, arrivals) = run(&plan, &choices);
        if let Err(why) = check(&plan, &is_await, &sim, &arrivals) {
            return Err(TestCaseError::fail(format!("{why}\nsteps: {:?}\nlog: {:#?}", is_await, sim.log)));
        }
    }
}

#[test]
fn random_runs_reach_each_outcome() {
    let mut outcomes = std::collections::BTreeSet::new();
    let mut rng = SplitMix(17);
    for _ in 0..400 {
        let (plan, is_await) = gen_plan(&rng.vec(20));
        let choices = rng.vec(150);
        let (sim, arrivals) = run(&plan, &choices);
        check(&plan, &is_await, &sim, &arrivals).expect("a valid run");
        outcomes.insert(sim.state.status().to_string());
    }
    for expected in ["completed", "compensated", "cancelled"] {
        assert!(outcomes.contains(expected), "no run ended {expected}: {outcomes:?}");
    }
}
