//! Saga flows end to end against a real nats-server: in-process coordinator and participants.

use std::time::Duration;

use saga_core::{Phase, SagaStatus, StepStatus, TimelineEvent as T};
use saga_nats::ErrorKind;
use saga_tests::support::*;
use saga_tests::NatsServer;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_completes_and_records_its_timeline() {
    init_logging();
    let stack = echo_stack("three", &["a", "b", "c"], Duration::from_secs(10)).await;
    let (fx, client) = (stack.effects.clone(), stack.client.clone());

    let id = client.start("three", &TestInput { n: 7, ..Default::default() }).await.unwrap();
    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    for step in ["a", "b", "c"] {
        assert_eq!(fx.count(&id, step, "a"), 1, "{step} ran once");
        assert_eq!(fx.count(&id, step, "c"), 0, "{step} not compensated");
    }
    let out: EchoOutput = view.output("b").unwrap().unwrap();
    assert_eq!(out, EchoOutput { step: "b".into(), n: 7 });
    let timeline = client.timeline(&id).await.unwrap();
    let dispatched: Vec<_> = timeline
        .iter()
        .filter_map(|e| match &e.event {
            T::Dispatched { step, .. } => Some(step.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(dispatched, ["a", "b", "c"]);
    assert!(matches!(timeline.first().unwrap().event, T::Started), "{timeline:?}");
    assert!(
        matches!(timeline.last().unwrap().event, T::Finished { status: SagaStatus::Completed }),
        "{timeline:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_at_step_two_compensates_in_reverse() {
    init_logging();
    let stack = echo_stack("three", &["a", "b", "c"], Duration::from_secs(10)).await;
    let (fx, client) = (stack.effects.clone(), stack.client.clone());

    let input = TestInput { n: 1, fail: vec!["b".into()], ..Default::default() };
    let id = client.start("three", &input).await.unwrap();
    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Compensated);
    assert_eq!(fx.count(&id, "a", "a"), 1);
    assert_eq!(fx.count(&id, "a", "c"), 1, "a compensated once");
    assert_eq!(fx.count(&id, "b", "a"), 0, "b failed: no effect");
    assert_eq!(fx.count(&id, "b", "c"), 0, "a failed step is not compensated");
    assert_eq!(fx.count(&id, "c", "a"), 0, "c never ran");
    let states: Vec<_> = view.snapshot.steps.iter().map(|s| s.status).collect();
    assert_eq!(states, [StepStatus::Compensated, StepStatus::Failed, StepStatus::Pending]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_branches_fail_and_compensate_the_sibling() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let def = saga_core::SagaDefinition::builder("diamond")
        .step("root", "svc", "root", |s| s.compensation("undo-root").retry(quick_retry(2)))
        .step("left", "svc", "left", |s| {
            s.compensation("undo-left").after(&["root"]).retry(quick_retry(2))
        })
        .step("right", "svc", "right", |s| {
            s.compensation("undo-right").after(&["root"]).retry(quick_retry(2))
        })
        .step("join", "svc", "join", |s| {
            s.compensation("undo-join").after(&["left", "right"]).retry(quick_retry(2))
        })
        .build();
    let _coord = coordinator(nats.clone(), vec![def]).await;
    let fx = Effects::default();
    let _p =
        echo_participant(nats.clone(), "svc", &["root", "left", "right", "join"], fx.clone()).await;
    let client = client(nats.clone()).await;

    let ok = client.start("diamond", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    let bad = client
        .start("diamond", &TestInput { n: 2, fail: vec!["right".into()], ..Default::default() })
        .await
        .unwrap();
    assert_eq!(client.wait(&ok, WAIT).await.unwrap().status(), SagaStatus::Completed);
    let view = client.wait(&bad, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Compensated);
    assert_eq!(fx.count(&bad, "left", "c"), 1, "the sibling that succeeded is compensated");
    assert_eq!(fx.count(&bad, "root", "c"), 1);
    assert_eq!(fx.count(&bad, "join", "a"), 0);
    // root is compensated after left.
    let comps: Vec<_> = client
        .timeline(&bad)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.event {
            T::Dispatched { step, phase: Phase::Compensation, .. } => Some(step.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(comps, ["left", "root"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_retry_then_compensation() {
    init_logging();
    let stack = echo_stack("slow", &["a", "b"], Duration::from_secs(1)).await;
    let (fx, client) = (stack.effects.clone(), stack.client.clone());

    // b hangs on its first attempt, then succeeds: the timeout leads to a retry.
    let recovered = client
        .start("slow", &TestInput { n: 1, hang: vec![("b".into(), 1)], ..Default::default() })
        .await
        .unwrap();
    // b hangs on every attempt: retries run out and the saga compensates.
    let gave_up = client
        .start("slow", &TestInput { n: 2, hang: vec![("b".into(), 99)], ..Default::default() })
        .await
        .unwrap();

    let v = client.wait(&recovered, WAIT).await.unwrap();
    assert_eq!(v.status(), SagaStatus::Completed);
    let timeline = client.timeline(&recovered).await.unwrap();
    assert!(
        timeline.iter().any(|e| matches!(e.event, T::TimedOut { .. })),
        "a timeout is recorded: {timeline:?}"
    );
    assert_eq!(fx.count(&recovered, "b", "a"), 1);

    let v = client.wait(&gave_up, WAIT).await.unwrap();
    assert_eq!(v.status(), SagaStatus::Compensated);
    let timeouts = client
        .timeline(&gave_up)
        .await
        .unwrap()
        .iter()
        .filter(|e| matches!(e.event, T::TimedOut { phase: Phase::Action, .. }))
        .count();
    assert_eq!(timeouts, 3, "three attempts of the action, each timed out");
    assert_eq!(fx.count(&gave_up, "a", "c"), 1, "a compensated");
    assert_eq!(fx.count(&gave_up, "b", "a"), 0, "b never completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pivot_then_retriable_steps_complete() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let def = with_pivot("pv", &["reserve"], "charge", &["notify"]);
    let _coord = coordinator(nats.clone(), vec![def]).await;
    let fx = Effects::default();
    let _p =
        echo_participant(nats.clone(), "svc", &["reserve", "charge", "notify"], fx.clone()).await;
    let client = client(nats.clone()).await;

    // notify fails transiently 4 times though its retry policy says 2 attempts: a retriable
    // step is retried until it succeeds.
    let input = TestInput { n: 1, transient: vec![("notify".into(), 4)], ..Default::default() };
    let id = client.start("pv", &input).await.unwrap();
    let v = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(v.status(), SagaStatus::Completed);
    assert_eq!(v.snapshot.steps[2].attempt, 5);
    assert_eq!(fx.count(&id, "reserve", "c"), 0);
    assert_eq!(fx.count(&id, "charge", "a"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_start_and_errors_callers_can_match() {
    init_logging();
    let stack = echo_stack("one", &["a"], Duration::from_secs(10)).await;
    let (fx, client) = (stack.effects.clone(), stack.client.clone());

    let input = TestInput { n: 5, ..Default::default() };
    let first = client.start_with_key("one", "order-5", &input).await.unwrap();
    let second = client.start_with_key("one", "order-5", &input).await.unwrap();
    assert_eq!(first, second, "same key, same saga");
    assert_eq!(client.wait(&first, WAIT).await.unwrap().status(), SagaStatus::Completed);
    // Long after the first one finished, the same key still starts nothing new.
    let third = client.start_with_key("one", "order-5", &input).await.unwrap();
    assert_eq!(third, first);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fx.count(&first, "a", "a"), 1, "the step ran once");
    let timeline = client.timeline(&first).await.unwrap();
    assert_eq!(timeline.iter().filter(|e| matches!(e.event, T::Started)).count(), 1);

    // The same key with another input is refused, and names the conflict.
    let other = TestInput { n: 6, ..Default::default() };
    let err = client.start_with_key("one", "order-5", &other).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert!(err.to_string().contains("another input"), "{err}");

    let err = client.start("no-such-saga", &input).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownSaga);
    assert!(err.to_string().contains("no-such-saga"), "{err}");

    let err = client.retry(&first, "why not").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotApplicable);
    let err = client.cancel(&saga_core::SagaId::from("nope"), "x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compensation_that_keeps_failing_parks_and_operators_act() {
    init_logging();
    let stack = echo_stack("park", &["a", "b"], Duration::from_secs(10)).await;
    let fx = stack.effects.clone();
    let client = stack.client.clone().with_operator("test-operator");

    // a's compensation fails 3 times (its retry budget), then would succeed.
    let input = |n| TestInput {
        n,
        fail: vec!["b".into()],
        comp_fail: vec![("a".into(), 3)],
        ..Default::default()
    };
    let retried = client.start("park", &input(1)).await.unwrap();
    let skipped = client.start("park", &input(2)).await.unwrap();
    let resolved = client.start("park", &input(3)).await.unwrap();
    for id in [&retried, &skipped, &resolved] {
        assert_eq!(client.wait(id, WAIT).await.unwrap().status(), SagaStatus::NeedsIntervention);
    }
    client.retry(&retried, "downstream fixed").await.unwrap();
    client.skip(&skipped, "released by hand").await.unwrap();
    client.resolve(&resolved, "refunded manually").await.unwrap();
    async fn until_terminal(
        client: &saga_nats::SagaClient,
        id: &saga_core::SagaId,
    ) -> saga_nats::SagaView {
        for _ in 0..200 {
            let v = client.get(id).await.unwrap().unwrap();
            if v.status().is_terminal() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("saga {id} did not finish");
    }
    let v = until_terminal(&client, &retried).await;
    assert_eq!(v.status(), SagaStatus::Compensated);
    assert_eq!(fx.count(&retried, "a", "c"), 1);
    let timeline = client.timeline(&retried).await.unwrap();
    assert!(
        timeline.iter().any(|e| matches!(&e.event,
            T::OperatorRetry { reason, by } if reason == "downstream fixed" && by.as_deref() == Some("test-operator"))),
        "the retry and its operator are recorded: {timeline:?}"
    );
    let v = until_terminal(&client, &skipped).await;
    assert_eq!(v.status(), SagaStatus::Compensated);
    assert_eq!(v.snapshot.steps[0].status, StepStatus::CompensationSkipped);
    assert_eq!(until_terminal(&client, &resolved).await.status(), SagaStatus::Resolved);
}

/// A compensation that fails transiently (its store cannot write while a cluster elects a
/// leader) is retried past its policy's `max_attempts` (3), against the longer budget a
/// timeout has: the saga ends compensated, not parked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_compensation_failures_are_retried_past_max_attempts() {
    init_logging();
    let stack = echo_stack("flaky", &["a", "b"], Duration::from_secs(10)).await;
    let input = TestInput {
        n: 1,
        fail: vec!["b".into()],
        comp_transient: vec![("a".into(), 4)],
        ..Default::default()
    };
    let id = stack.client.start("flaky", &input).await.unwrap();
    assert_eq!(stack.client.wait(&id, WAIT).await.unwrap().status(), SagaStatus::Compensated);
    assert_eq!(stack.effects.count(&id, "a", "c"), 1);
    let timeline = stack.client.timeline(&id).await.unwrap();
    let failures: Vec<bool> = timeline
        .iter()
        .filter_map(|e| match &e.event {
            T::Failed { phase: Phase::Compensation, transient, .. } => Some(*transient),
            _ => None,
        })
        .collect();
    assert_eq!(failures, [true; 4], "four transient failures, then the success: {timeline:?}");
}

/// One attempt has one outcome: a late copy of an attempt that failed transiently (a take-over
/// can send one) gets the same failure without running the handler, and the next attempt runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_an_attempt_that_failed_gets_the_same_failure() {
    let input = TestInput { n: 1, transient: vec![("a".into(), 1)], ..Default::default() };
    let view = copy_of_a_failed_attempt(Phase::Action, input, true).await;
    assert_eq!(view.status(), SagaStatus::Completed);
    assert_eq!(view.snapshot.steps[0].attempt, 2);
}

/// The same for a compensation that failed for good (a business failure): the copy's answer
/// says it was not transient, so it counts against `max_attempts`, as the first answer did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_compensation_that_failed_keeps_its_kind_of_failure() {
    let input = TestInput {
        n: 1,
        fail: vec!["b".into()],
        comp_fail: vec![("a".into(), 1)],
        ..Default::default()
    };
    let view = copy_of_a_failed_attempt(Phase::Compensation, input, false).await;
    assert_eq!(view.status(), SagaStatus::Compensated);
    assert_eq!(view.snapshot.steps[0].comp_attempt, 2);
}

/// Runs saga `one` (step `a`, then `b`) whose first attempt of `a` in `phase` fails; sends a
/// copy of that attempt's command after the participant recorded the failure, checks the copy
/// gets the same failure (`transient` as given) without running the handler, and returns the
/// saga's end.
async fn copy_of_a_failed_attempt(
    phase: Phase,
    input: TestInput,
    transient: bool,
) -> saga_nats::SagaView {
    use futures::StreamExt;
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    // Attempt 2 comes 10 s after attempt 1 failed: the test's copy of attempt 1 goes in between.
    let slow_retry = saga_core::RetryPolicy {
        initial_backoff: Duration::from_secs(10),
        max_backoff: Duration::from_secs(10),
        ..quick_retry(3)
    };
    let def = saga_core::SagaDefinition::builder("one")
        .step("a", "svc", "a", |s| s.compensation("undo-a").retry(slow_retry))
        .step("b", "svc", "b", |s| s.retry(quick_retry(1)))
        .build();
    let _coord = coordinator(nats.clone(), vec![def]).await;
    let fx = Effects::default();
    let _p = echo_participant(nats.clone(), "svc", &["a", "b"], fx.clone()).await;
    let client = client(nats.clone()).await;
    let spy = server.connect().await;
    let (subject, key) = match phase {
        Phase::Action => ("saga.cmd.svc.a", "a.a"),
        Phase::Compensation => ("saga.cmd.svc.undo-a", "a.c"),
    };
    let mut commands = spy.subscribe(subject).await.unwrap();
    spy.flush().await.unwrap();

    let id = client.start("one", &input).await.unwrap();
    let first = tokio::time::timeout(WAIT, commands.next()).await.unwrap().unwrap();
    let reply_to = first.reply.clone().unwrap();
    // Attempt 1 failed: the effect record says so.
    let key = format!("{id}.{key}");
    let deadline = tokio::time::Instant::now() + WAIT;
    let failed = loop {
        match effect_records(nats.clone(), "svc").await.remove(&key) {
            Some(r @ saga_core::wire::EffectRecord::Failed { .. }) => break r,
            other => {
                assert!(tokio::time::Instant::now() < deadline, "no failed record: {other:?}");
                tokio::time::sleep(Duration::from_millis(20)).await
            }
        }
    };
    assert!(
        matches!(failed, saga_core::wire::EffectRecord::Failed { attempt: 1, transient: t, .. } if t == transient),
        "{failed:?}"
    );
    // A copy of attempt 1, answered on a subject the test listens to as well.
    let mut answers = spy.subscribe(reply_to.clone()).await.unwrap();
    spy.flush().await.unwrap();
    spy.publish_with_reply(subject, reply_to, first.payload.clone()).await.unwrap();
    let answer = tokio::time::timeout(WAIT, answers.next()).await.unwrap().unwrap();
    let reply: saga_core::wire::ReplyMessage =
        saga_core::Codec::default().decode(&answer.payload).unwrap();
    assert!(
        matches!(&reply.outcome, saga_core::wire::ReplyOutcome::Failure { transient: t, .. } if *t == transient),
        "{reply:?}"
    );
    assert_eq!(
        effect_records(nats.clone(), "svc").await.remove(&key),
        Some(failed),
        "the copy did not run: the record is unchanged"
    );
    let view = client.wait(&id, WAIT).await.unwrap();
    let letter = if phase == Phase::Action { "a" } else { "c" };
    assert_eq!(fx.count(&id, "a", letter), 1);
    view
}

/// An operator action answers with the coordinator's verdict: a cancel the state machine
/// refuses (the pivot has succeeded) is an error naming why, not a silent `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_answer_with_the_coordinators_verdict() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let def = with_pivot("verdict", &["reserve"], "charge", &["notify"]);
    let _coord = coordinator(nats.clone(), vec![def]).await;
    let fx = Effects::default();
    let _p = echo_participant(nats.clone(), "svc", &["reserve", "charge", "notify"], fx).await;
    let client = client(nats.clone()).await;

    // notify (after the pivot) fails for a while: the saga runs on past the pivot.
    let input = TestInput { n: 1, transient: vec![("notify".into(), 30)], ..Default::default() };
    let id = client.start("verdict", &input).await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let view = client.get(&id).await.unwrap().expect("the saga exists");
        if view.snapshot.steps[1].status == saga_core::StepStatus::Succeeded {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "charge never succeeded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = client.cancel(&id, "too late").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotApplicable, "{err}");
    assert!(err.to_string().contains("pivot step succeeded"), "{err}");
    assert_eq!(client.wait(&id, WAIT).await.unwrap().status(), SagaStatus::Completed);
}

/// An action that ran but whose output the coordinator cannot keep (here: a coordinator with
/// a smaller message size limit than its participant's, so a 20 KB output passes the
/// participant and is refused by the coordinator) is compensated, not left in place, and
/// its compensation gets the output the participant recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_whose_output_is_refused_is_compensated_with_that_output() {
    use std::sync::{Arc, Mutex};
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let def = saga_core::SagaDefinition::builder("big")
        .step("a", "svc", "a", |s| s.compensation("undo-a").retry(quick_retry(3)))
        .step("b", "svc", "b", |s| s.retry(quick_retry(3)))
        .build();
    let config = saga_nats::CoordinatorConfig {
        max_message_size: 64 * 1024,
        ..coordinator_config(vec![def], Duration::from_secs(5))
    };
    let _coord = saga_nats::Coordinator::start(nats.clone(), config).await.unwrap();
    let runs = Arc::new(Mutex::new(Vec::new()));
    let (a_runs, undo_runs, b_runs) = (runs.clone(), runs.clone(), runs.clone());
    let _p = saga_nats::Participant::builder(nats.clone(), "svc")
        .action("a", move |_: saga_nats::Command<TestInput>| {
            let runs = a_runs.clone();
            async move {
                runs.lock().unwrap().push("a".to_owned());
                Ok("x".repeat(20 * 1024))
            }
        })
        .compensation("undo-a", move |cmd: saga_nats::Command<TestInput>| {
            let runs = undo_runs.clone();
            async move {
                let output = cmd.action_output::<String>().map(|o| o.unwrap().len());
                runs.lock().unwrap().push(format!("undo-a with {output:?}"));
                Ok(())
            }
        })
        .action("b", move |_: saga_nats::Command<TestInput>| {
            let runs = b_runs.clone();
            async move {
                runs.lock().unwrap().push("b".to_owned());
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    let client = client(nats.clone()).await;
    let id = client.start("big", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Compensated, "{:?}", view.snapshot);
    assert_eq!(
        *runs.lock().unwrap(),
        ["a".to_owned(), format!("undo-a with {:?}", Some(20 * 1024))],
        "a ran once, b never, and a's compensation got a's output"
    );
    let timeline = client.timeline(&id).await.unwrap();
    assert!(
        timeline.iter().any(|e| matches!(&e.event,
            T::Failed { step, phase: Phase::Action, transient: false, reason, .. }
                if step.as_str() == "a" && reason.contains("exceeds the limit"))),
        "{timeline:?}"
    );
}
