//! The snapshot view: what clients and the coordinator's store read, and how the state machine
//! comes back from it.

mod common;

use common::*;
use saga_core::{
    Event, Payload, SagaId, SagaName, SagaSnapshot, SagaState, SagaStatus, SnapshotError, StepName,
    StepStatus, Timestamp, VIEW_VERSION,
};

/// A saga of `chain3` part-way: a succeeded, b waiting to be sent again.
fn midway() -> Sim {
    let mut sim = Sim::new(&chain3());
    sim.start();
    sim.at(10).ok(succeeded("a", 1));
    sim.at(20).ok(undelivered("b", 1));
    sim
}

#[test]
fn a_snapshot_shows_the_saga_and_each_step() {
    let sim = midway();
    let snap = sim.state.snapshot();
    assert_eq!(snap.v, VIEW_VERSION);
    assert_eq!((snap.id.as_str(), snap.saga.as_str()), (SAGA_ID, "chain3"));
    assert_eq!(snap.digest, sim.plan.digest());
    assert_eq!(snap.status, SagaStatus::Running);
    assert_eq!(snap.input, saga_input());
    assert_eq!((snap.started_at, snap.updated_at, snap.events), (Timestamp(0), Timestamp(20), 3));
    assert_eq!(snap.cause, None);
    let names: Vec<&str> = snap.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    let a = &snap.steps[0];
    assert_eq!(
        (a.status, a.attempt, a.output.clone()),
        (StepStatus::Succeeded, 1, Some(output_of(&"a".into())))
    );
    let b = &snap.steps[1];
    assert_eq!(
        (b.status, b.attempt, b.undelivered, b.awaiting_redelivery),
        (StepStatus::Running, 1, 1, true)
    );
    assert_eq!(b.timer_at, Some(Timestamp(520)));
    assert_eq!(sim.state.step_status(&"c".into()), Some(StepStatus::Pending));
    assert_eq!(sim.state.step_status(&"zz".into()), None);
}

#[test]
fn a_snapshot_is_plain_named_fields() {
    let json = serde_json::to_value(midway().state.snapshot()).unwrap();
    assert_eq!(json["v"], 2);
    assert_eq!(json["id"], SAGA_ID);
    assert_eq!(json["saga"], "chain3");
    assert_eq!(json["status"], "running");
    assert_eq!(json["steps"][1]["name"], "b");
    assert_eq!(json["steps"][1]["status"], "running");
    assert_eq!(json["steps"][1]["undelivered"], 1);
    assert_eq!(json["steps"][1]["timer_at"], 520);
    // A reader of an older, smaller snapshot fills in the optional fields.
    let mut lean = json.clone();
    for step in lean["steps"].as_array_mut().unwrap() {
        let step = step.as_object_mut().unwrap();
        step.retain(|k, _| matches!(k.as_str(), "name" | "status" | "attempt" | "comp_attempt"));
    }
    lean.as_object_mut().unwrap().remove("cause");
    let snap: SagaSnapshot = serde_json::from_value(lean).unwrap();
    assert_eq!(snap.steps[1].undelivered, 0);
    assert_eq!(snap.steps[0].output, None);
}

#[test]
fn from_snapshot_gives_back_the_same_machine_that_goes_on_the_same_way() {
    let mut sim = midway();
    let bytes = rmp_serde::to_vec_named(&sim.state.snapshot()).unwrap();
    let snap: SagaSnapshot = rmp_serde::from_slice(&bytes).unwrap();
    let mut loaded = SagaState::from_snapshot(&sim.plan, &snap).unwrap();
    assert_eq!(loaded, sim.state);
    assert_eq!(loaded.outstanding(&sim.plan), sim.state.outstanding(&sim.plan));
    let event = redeliver("b", 1);
    let expected = sim.at(520).handle(event.clone());
    assert_eq!(loaded.handle(&sim.plan, Timestamp(520), &event), expected);
    assert_eq!(loaded, sim.state);
}

fn refusal(plan: &saga_core::Plan, edit: impl FnOnce(&mut SagaSnapshot)) -> SnapshotError {
    let mut snap = midway().state.snapshot();
    edit(&mut snap);
    SagaState::from_snapshot(plan, &snap).expect_err("a bad snapshot was accepted")
}

#[test]
fn from_snapshot_refuses_another_version() {
    let plan = chain3();
    let e = refusal(&plan, |s| s.v = 3);
    assert_eq!(
        e,
        SnapshotError::UnsupportedVersion { id: SAGA_ID.into(), found: 3, supported: VIEW_VERSION }
    );
    assert!(e.to_string().contains("view version 3 is not supported"), "{e}");
}

#[test]
fn from_snapshot_refuses_another_definition_or_version_of_it() {
    let plan = chain3();
    let e = refusal(&plan, |s| s.digest = "0123abcd".into());
    assert_eq!(
        e,
        SnapshotError::WrongDigest {
            id: SAGA_ID.into(),
            saga: "chain3".into(),
            expected: plan.digest().to_owned(),
            found: "0123abcd".into()
        }
    );
    assert!(e.to_string().contains("0123abcd") && e.to_string().contains(plan.digest()), "{e}");

    let e = refusal(&plan, |s| s.saga = SagaName::from("other"));
    assert_eq!(
        e,
        SnapshotError::WrongSaga {
            id: SAGA_ID.into(),
            expected: "chain3".into(),
            found: "other".into()
        }
    );
    assert!(e.to_string().contains("\"other\""), "{e}");

    // The snapshot of another plan's saga.
    let e = SagaState::from_snapshot(&diamond(), &midway().state.snapshot()).unwrap_err();
    assert!(matches!(e, SnapshotError::WrongSaga { .. }), "{e}");
}

#[test]
fn from_snapshot_refuses_steps_other_than_the_plans() {
    let plan = chain3();
    let e = refusal(&plan, |s| {
        s.steps.pop();
    });
    assert_eq!(
        e,
        SnapshotError::StepCount {
            id: SAGA_ID.into(),
            saga: "chain3".into(),
            expected: 3,
            found: 2
        }
    );
    let e = refusal(&plan, |s| s.steps.swap(1, 2));
    assert_eq!(
        e,
        SnapshotError::StepName {
            id: SAGA_ID.into(),
            saga: "chain3".into(),
            index: 1,
            expected: "b".into(),
            found: "c".into()
        }
    );
    assert!(e.to_string().contains("step #1 is \"c\""), "{e}");
    let e = refusal(&plan, |s| s.steps[0].name = StepName::from("A"));
    assert!(matches!(e, SnapshotError::StepName { index: 0, .. }), "{e}");
}

#[test]
fn from_snapshot_refuses_an_invalid_id() {
    let plan = chain3();
    let e = refusal(&plan, |s| s.id = SagaId::new_unchecked("a.b"));
    assert!(
        matches!(&e, SnapshotError::InvalidId { id, source: saga_core::TokenError::BadChar { found: '.' } } if id.as_str() == "a.b"),
        "{e:?}"
    );
    assert!(e.to_string().contains("\"a.b\""), "{e}");
}

#[test]
fn a_new_saga_round_trips_too() {
    let plan = chain3();
    let state = SagaState::new(SagaId::from("fresh"), &plan);
    let snap = state.snapshot();
    assert_eq!(
        (snap.status, snap.events, snap.input.clone()),
        (SagaStatus::New, 0, Payload::default())
    );
    assert_eq!(SagaState::from_snapshot(&plan, &snap).unwrap(), state);
    let mut state = state;
    assert!(state
        .handle(&plan, Timestamp(1), &Event::Start { input: saga_input() })
        .result
        .is_ok());
    assert_eq!(SagaState::from_snapshot(&plan, &state.snapshot()).unwrap(), state);
}
