//! Validation rules of saga definitions: one test per rule, plus valid graphs.

use std::time::Duration;

use saga_core::{
    RetryPolicy, SagaDefinition, StepKind, StepName, TokenError, ValidationError, MAX_STEPS,
};

/// Validates `def`, expecting a refusal.
fn refuse(def: &SagaDefinition) -> ValidationError {
    match def.validate() {
        Ok(plan) => panic!("definition should be refused, but validated: {plan:?}"),
        Err(e) => e,
    }
}

/// Asserts that the error's Display text contains every one of `parts`.
fn assert_mentions(err: &ValidationError, parts: &[&str]) {
    let text = err.to_string();
    for part in parts {
        assert!(text.contains(part), "error text {text:?} should contain {part:?}");
    }
}

fn names(steps: &[StepName]) -> Vec<&str> {
    steps.iter().map(StepName::as_str).collect()
}

/// A definition with one valid step and the given saga name.
fn one_step(saga: &str) -> SagaDefinition {
    SagaDefinition::builder(saga)
        .step("reserve", "seller", "reserve", |s| s.compensation("release"))
        .build()
}

/// `reserve -> ship`, where `ship` is configured by `configure`.
fn with_ship(
    configure: impl FnOnce(saga_core::StepBuilder) -> saga_core::StepBuilder,
) -> SagaDefinition {
    SagaDefinition::builder("order")
        .step("reserve", "seller", "reserve", |s| s.compensation("release"))
        .step("ship", "logistics", "ship", |s| configure(s.compensation("unship")))
        .build()
}

/// A chain of `n` compensatable steps.
fn chain(n: usize) -> SagaDefinition {
    let mut b = SagaDefinition::builder("order");
    for i in 0..n {
        b = b.step(&format!("s{i}"), "svc", "act", |s| s.compensation("undo"));
    }
    b.build()
}

// ---------------------------------------------------------------------------------------------
// Saga-level rules
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_saga_is_refused() {
    let err = refuse(&SagaDefinition::builder("order").build());
    assert!(matches!(&err, ValidationError::EmptySaga { saga } if saga.as_str() == "order"));
    assert_mentions(&err, &[r#"definition "order": has no steps"#]);
}

#[test]
fn too_many_steps_is_refused() {
    let err = refuse(&chain(MAX_STEPS + 1));
    assert!(matches!(
        &err,
        ValidationError::TooManySteps { saga, count } if saga.as_str() == "order" && *count == MAX_STEPS + 1
    ));
    assert_mentions(
        &err,
        &[r#"definition "order": has 257 steps"#, &format!("the limit is {MAX_STEPS}")],
    );
}

#[test]
fn exactly_max_steps_is_accepted() {
    let plan = chain(MAX_STEPS).validate().expect("MAX_STEPS steps are allowed");
    assert_eq!(plan.steps().len(), MAX_STEPS);
    assert_eq!(plan.deps(MAX_STEPS - 1), &[MAX_STEPS - 2]);
}

// ---------------------------------------------------------------------------------------------
// InvalidName
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_saga_name_is_refused() {
    let err = refuse(&one_step("place.order"));
    assert!(matches!(
        &err,
        ValidationError::InvalidName { saga, step: None, field: "name", value, reason: TokenError::BadChar { found: '.' } }
            if saga.as_str() == "place.order" && value == "place.order"
    ));
    assert_mentions(&err, &[r#"definition "place.order": name "place.order" contains '.'"#]);
    assert!(!err.to_string().contains(" step "), "no step is at fault: {err}");
}

#[test]
fn empty_and_too_long_saga_names_are_refused() {
    let err = refuse(&one_step(""));
    assert!(matches!(
        &err,
        ValidationError::InvalidName { step: None, field: "name", reason: TokenError::Empty, .. }
    ));
    assert_mentions(&err, &[r#"definition "": name "" is empty"#]);

    let long = "x".repeat(65);
    let err = refuse(&one_step(&long));
    assert!(matches!(
        &err,
        ValidationError::InvalidName {
            step: None,
            field: "name",
            reason: TokenError::TooLong { len: 65 },
            ..
        }
    ));
    assert_mentions(&err, &[&format!(r#"definition "{long}": name "{long}" is 65 characters"#)]);
}

#[test]
fn invalid_step_name_is_refused() {
    let def = SagaDefinition::builder("order")
        .step("reserve items", "seller", "reserve", |s| s.compensation("release"))
        .build();
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::InvalidName { saga, step: Some(step), field: "name", value, reason: TokenError::BadChar { found: ' ' } }
            if saga.as_str() == "order" && step.as_str() == "reserve items" && value == "reserve items"
    ));
    assert_mentions(
        &err,
        &[r#"definition "order" step reserve items: name "reserve items" contains ' '"#],
    );
}

#[test]
fn invalid_service_name_is_refused() {
    let def = SagaDefinition::builder("order")
        .step("reserve", "seller.eu", "reserve", |s| s.compensation("release"))
        .build();
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::InvalidName { step: Some(step), field: "service", value, reason: TokenError::BadChar { found: '.' }, .. }
            if step.as_str() == "reserve" && value == "seller.eu"
    ));
    assert_mentions(
        &err,
        &[r#"definition "order" step reserve: service "seller.eu" contains '.'"#],
    );
}

#[test]
fn too_long_service_name_is_refused() {
    let long = "s".repeat(65);
    let def = SagaDefinition::builder("order")
        .step("reserve", &long, "reserve", |s| s.compensation("release"))
        .build();
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::InvalidName {
            field: "service",
            reason: TokenError::TooLong { len: 65 },
            ..
        }
    ));
    assert_mentions(
        &err,
        &[&format!(r#"definition "order" step reserve: service "{long}" is 65 characters long"#)],
    );
}

#[test]
fn invalid_action_name_is_refused() {
    let def = SagaDefinition::builder("order")
        .step("reserve", "seller", "reserve*", |s| s.compensation("release"))
        .build();
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::InvalidName { step: Some(step), field: "action", value, reason: TokenError::BadChar { found: '*' }, .. }
            if step.as_str() == "reserve" && value == "reserve*"
    ));
    assert_mentions(&err, &[r#"definition "order" step reserve: action "reserve*" contains '*'"#]);
}

#[test]
fn empty_action_name_is_refused() {
    let def = SagaDefinition::builder("order")
        .step("reserve", "seller", "", |s| s.compensation("release"))
        .build();
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::InvalidName { field: "action", reason: TokenError::Empty, .. }
    ));
    assert_mentions(&err, &[r#"definition "order" step reserve: action "" is empty"#]);
}

#[test]
fn invalid_compensation_name_is_refused() {
    let def = SagaDefinition::builder("order")
        .step("reserve", "seller", "reserve", |s| s.compensation("release>"))
        .build();
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::InvalidName { step: Some(step), field: "compensation", value, reason: TokenError::BadChar { found: '>' }, .. }
            if step.as_str() == "reserve" && value == "release>"
    ));
    assert_mentions(
        &err,
        &[r#"definition "order" step reserve: compensation "release>" contains '>'"#],
    );
}

// ---------------------------------------------------------------------------------------------
// Graph rules
// ---------------------------------------------------------------------------------------------

#[test]
fn duplicate_step_is_refused() {
    let def = SagaDefinition::builder("order")
        .step("ship", "logistics", "ship", |s| s.compensation("unship"))
        .step("ship", "logistics", "ship-again", |s| s.compensation("unship"))
        .build();
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::DuplicateStep { saga, step } if saga.as_str() == "order" && step.as_str() == "ship"
    ));
    assert_mentions(&err, &[r#"definition "order" step ship: name is used by more than one step"#]);
}

#[test]
fn unknown_dependency_is_refused() {
    let def = with_ship(|s| s.after(&["reserve", "pack"]));
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::UnknownDependency { saga, step, dependency }
            if saga.as_str() == "order" && step.as_str() == "ship" && dependency == "pack"
    ));
    assert_mentions(
        &err,
        &[r#"definition "order" step ship: after refers to unknown step "pack""#],
    );
}

#[test]
fn self_dependency_is_a_cycle() {
    let def = SagaDefinition::builder("order")
        .step("reserve", "seller", "reserve", |s| s.compensation("release"))
        .step("ship", "logistics", "ship", |s| s.compensation("unship").after(&["ship"]))
        .build();
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::Cycle { saga, step, cycle }
            if saga.as_str() == "order" && step.as_str() == "ship" && names(cycle) == ["ship", "ship"]
    ));
    assert_mentions(&err, &[r#"definition "order" step ship: after forms a cycle (ship -> ship)"#]);
}

#[test]
fn three_cycle_is_refused() {
    let def = SagaDefinition::builder("order")
        .step("start", "svc", "start", |s| s.compensation("undo").after(&[]))
        .step("a", "svc", "a", |s| s.compensation("undo").after(&["start", "c"]))
        .step("b", "svc", "b", |s| s.compensation("undo").after(&["a"]))
        .step("c", "svc", "c", |s| s.compensation("undo").after(&["b"]))
        .build();
    let err = refuse(&def);
    let ValidationError::Cycle { saga, step, cycle } = &err else {
        panic!("expected a cycle, got {err:?}");
    };
    assert_eq!(saga.as_str(), "order");
    // The cycle lists its steps once each, the first repeated at the end ...
    assert_eq!(cycle.len(), 4, "{cycle:?}");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(step, &cycle[0]);
    let mut members = names(&cycle[..3]);
    members.sort_unstable();
    assert_eq!(members, ["a", "b", "c"]);
    // ... in execution order: each step runs after the one before it.
    for pair in cycle.windows(2) {
        let later = def.steps.iter().find(|s| s.name == pair[1]).unwrap();
        assert!(
            later.after.as_ref().unwrap().contains(&pair[0]),
            "{} should run after {} in {cycle:?}",
            pair[1],
            pair[0]
        );
    }
    let shown = names(cycle).join(" -> ");
    assert_mentions(
        &err,
        &[&format!(r#"definition "order" step {step}: after forms a cycle ({shown})"#)],
    );
}

// ---------------------------------------------------------------------------------------------
// Step kinds
// ---------------------------------------------------------------------------------------------

#[test]
fn multiple_pivots_are_refused() {
    let def = SagaDefinition::builder("order")
        .step("reserve", "seller", "reserve", |s| s.compensation("release"))
        .step("charge", "payments", "charge", |s| s.kind(StepKind::Pivot))
        .step("confirm", "orders", "confirm", |s| s.kind(StepKind::Pivot))
        .build();
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::MultiplePivots { saga, step, first }
            if saga.as_str() == "order" && step.as_str() == "confirm" && first.as_str() == "charge"
    ));
    assert_mentions(
        &err,
        &[r#"definition "order" step confirm: kind pivot, but step "charge" is already the pivot"#],
    );
}

#[test]
fn compensatable_after_pivot_is_refused() {
    let def = SagaDefinition::builder("order")
        .step("reserve", "seller", "reserve", |s| s.compensation("release"))
        .step("charge", "payments", "charge", |s| s.kind(StepKind::Pivot))
        .step("ship", "logistics", "ship", |s| s.compensation("unship"))
        .build();
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::CompensatableAfterPivot { saga, step, pivot }
            if saga.as_str() == "order" && step.as_str() == "ship" && pivot.as_str() == "charge"
    ));
    assert_mentions(
        &err,
        &[
            r#"definition "order" step ship: kind compensatable, but it can run after the pivot "charge""#,
        ],
    );
}

#[test]
fn compensatable_alongside_pivot_is_refused() {
    // `audit` is not an ancestor of the pivot, so it can run while (or after) the pivot runs.
    let def = SagaDefinition::builder("order")
        .step("reserve", "seller", "reserve", |s| s.compensation("release"))
        .step("charge", "payments", "charge", |s| s.kind(StepKind::Pivot))
        .step("audit", "audit", "record", |s| s.compensation("erase").after(&["reserve"]))
        .build();
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::CompensatableAfterPivot { step, pivot, .. }
            if step.as_str() == "audit" && pivot.as_str() == "charge"
    ));
    assert_mentions(&err, &[r#"definition "order" step audit:"#, r#"the pivot "charge""#]);
}

#[test]
fn read_only_step_after_pivot_is_not_retriable() {
    let def = SagaDefinition::builder("order")
        .step("reserve", "seller", "reserve", |s| s.compensation("release"))
        .step("charge", "payments", "charge", |s| s.kind(StepKind::Pivot))
        .step("lookup", "orders", "lookup", |s| s.read_only())
        .build();
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::NotRetriableAfterPivot { saga, step, kind: "compensatable", pivot }
            if saga.as_str() == "order" && step.as_str() == "lookup" && pivot.as_str() == "charge"
    ));
    assert_mentions(
        &err,
        &[
            r#"definition "order" step lookup: kind compensatable, but it can run after the pivot "charge""#,
            "steps after the pivot must be retriable",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// MissingCompensation
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_compensation_before_fallible_step_is_refused() {
    let def = SagaDefinition::builder("order")
        .step("reserve", "seller", "reserve", |s| s) // no compensation
        .step("ship", "logistics", "ship", |s| s.compensation("unship"))
        .build();
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::MissingCompensation { saga, step, later }
            if saga.as_str() == "order" && step.as_str() == "reserve" && later.as_str() == "ship"
    ));
    assert_mentions(
        &err,
        &[
            r#"definition "order" step reserve: compensation is missing, but step "ship" can fail after it"#,
        ],
    );
}

#[test]
fn missing_compensation_on_last_step_of_chain_is_accepted() {
    let def = SagaDefinition::builder("order")
        .step("reserve", "seller", "reserve", |s| s.compensation("release"))
        .step("ship", "logistics", "ship", |s| s.compensation("unship"))
        .step("notify", "mail", "send", |s| s) // last: nothing can fail after it
        .build();
    let plan = def.validate().expect("the last step needs no compensation");
    assert_eq!(plan.pivot(), None);
}

#[test]
fn missing_compensation_before_retriable_only_is_accepted() {
    // A retriable step never fails the saga, so nothing is left undone.
    let def = SagaDefinition::builder("order")
        .step("reserve", "seller", "reserve", |s| s.compensation("release"))
        .step("charge", "payments", "charge", |s| s)
        .step("notify", "mail", "send", |s| s.kind(StepKind::Retriable))
        .build();
    def.validate().expect("only a retriable step follows");
}

#[test]
fn read_only_step_needs_no_compensation() {
    let def = SagaDefinition::builder("order")
        .step("check-stock", "seller", "check", |s| s.read_only())
        .step("reserve", "seller", "reserve", |s| s.compensation("release"))
        .step("ship", "logistics", "ship", |s| s.compensation("unship"))
        .build();
    def.validate().expect("a read_only step needs no compensation");
}

#[test]
fn missing_compensation_parallel_to_fallible_sibling_is_refused() {
    // `check-stock` and `reserve` both start at once; if `reserve` fails, `check-stock` may
    // already have run and cannot be undone.
    let def = SagaDefinition::builder("order")
        .step("check-stock", "seller", "check", |s| s.after(&[]))
        .step("reserve", "seller", "reserve", |s| s.compensation("release").after(&[]))
        .step("charge", "payments", "charge", |s| {
            s.kind(StepKind::Pivot).after(&["check-stock", "reserve"])
        })
        .build();
    let err = refuse(&def);
    assert!(matches!(
        &err,
        ValidationError::MissingCompensation { saga, step, later }
            if saga.as_str() == "order" && step.as_str() == "check-stock" && later.as_str() == "reserve"
    ));
    assert_mentions(
        &err,
        &[
            r#"definition "order" step check-stock: compensation is missing, but step "reserve" can fail"#,
        ],
    );
}

#[test]
fn pivot_needs_no_compensation() {
    let def = SagaDefinition::builder("order")
        .step("reserve", "seller", "reserve", |s| s.compensation("release"))
        .step("charge", "payments", "charge", |s| s.kind(StepKind::Pivot))
        .step("ship", "logistics", "ship", |s| s.kind(StepKind::Retriable))
        .step("notify", "mail", "send", |s| s.kind(StepKind::Retriable))
        .build();
    let plan = def.validate().expect("the pivot and retriable steps need no compensation");
    assert_eq!(plan.pivot(), Some(1));
}

// ---------------------------------------------------------------------------------------------
// Timeouts and retries
// ---------------------------------------------------------------------------------------------

#[test]
fn zero_timeout_is_refused() {
    let err = refuse(&with_ship(|s| s.timeout(Duration::ZERO)));
    assert!(matches!(
        &err,
        ValidationError::ZeroTimeout { saga, step } if saga.as_str() == "order" && step.as_str() == "ship"
    ));
    assert_mentions(&err, &[r#"definition "order" step ship: timeout 0s"#]);
}

fn bad_retry(retry: RetryPolicy) -> ValidationError {
    refuse(&with_ship(|s| s.retry(retry)))
}

fn assert_invalid_retry(err: &ValidationError, want_field: &str, want_value: &str) {
    assert!(
        matches!(
            err,
            ValidationError::InvalidRetry { saga, step, field, value, .. }
                if saga.as_str() == "order" && step.as_str() == "ship"
                    && *field == want_field && value == want_value
        ),
        "{err:?}"
    );
    assert_mentions(
        err,
        &[&format!(r#"definition "order" step ship: retry.{want_field} {want_value}: "#)],
    );
}

#[test]
fn zero_max_attempts_is_refused() {
    let err = bad_retry(RetryPolicy { max_attempts: 0, ..RetryPolicy::default() });
    assert_invalid_retry(&err, "max_attempts", "0");
    assert_mentions(&err, &["must be at least 1"]);
}

#[test]
fn multiplier_below_one_is_refused() {
    let err = bad_retry(RetryPolicy { multiplier: 0.5, ..RetryPolicy::default() });
    assert_invalid_retry(&err, "multiplier", "0.5");
    assert_mentions(&err, &["must be a number of at least 1.0"]);
}

#[test]
fn non_finite_multiplier_is_refused() {
    let err = bad_retry(RetryPolicy { multiplier: f64::NAN, ..RetryPolicy::default() });
    assert_invalid_retry(&err, "multiplier", "NaN");
    let err = bad_retry(RetryPolicy { multiplier: f64::INFINITY, ..RetryPolicy::default() });
    assert_invalid_retry(&err, "multiplier", "inf");
}

#[test]
fn jitter_above_one_is_refused() {
    let err = bad_retry(RetryPolicy { jitter: 1.5, ..RetryPolicy::default() });
    assert_invalid_retry(&err, "jitter", "1.5");
    assert_mentions(&err, &["must be between 0.0 and 1.0"]);
}

#[test]
fn negative_jitter_is_refused() {
    let err = bad_retry(RetryPolicy { jitter: -0.1, ..RetryPolicy::default() });
    assert_invalid_retry(&err, "jitter", "-0.1");
}

#[test]
fn initial_backoff_above_max_backoff_is_refused() {
    let err = bad_retry(RetryPolicy {
        initial_backoff: Duration::from_secs(60),
        max_backoff: Duration::from_secs(30),
        ..RetryPolicy::default()
    });
    assert_invalid_retry(&err, "initial_backoff", "1m");
    assert_mentions(&err, &["must not exceed max_backoff"]);
}

#[test]
fn max_backoff_above_a_day_is_refused() {
    let err = bad_retry(RetryPolicy {
        max_backoff: Duration::from_secs(25 * 3600),
        ..RetryPolicy::default()
    });
    assert_invalid_retry(&err, "max_backoff", "1day 1h");
    assert_mentions(&err, &["must be at most 24h"]);
}

#[test]
fn retry_edges_are_accepted() {
    let edge = RetryPolicy {
        max_attempts: 1,
        initial_backoff: Duration::from_secs(24 * 3600),
        max_backoff: Duration::from_secs(24 * 3600),
        multiplier: 1.0,
        jitter: 1.0,
    };
    with_ship(|s| s.retry(edge).timeout(Duration::from_millis(1)))
        .validate()
        .expect("boundary values are allowed");
    let no_jitter = RetryPolicy { jitter: 0.0, ..RetryPolicy::default() };
    with_ship(|s| s.retry(no_jitter)).validate().expect("no jitter is allowed");
}

// ---------------------------------------------------------------------------------------------
// Valid graphs
// ---------------------------------------------------------------------------------------------

#[test]
fn diamond_validates() {
    // a -> {b, c} -> d (pivot) -> e (retriable)
    let def = SagaDefinition::builder("order")
        .step("a", "svc", "a", |s| s.compensation("undo-a"))
        .step("b", "svc", "b", |s| s.compensation("undo-b").after(&["a"]))
        .step("c", "svc", "c", |s| s.compensation("undo-c").after(&["a"]))
        .step("d", "svc", "d", |s| s.kind(StepKind::Pivot).after(&["b", "c"]))
        .step("e", "svc", "e", |s| s.kind(StepKind::Retriable))
        .build();
    let plan = def.validate().expect("the diamond is valid");

    assert_eq!(plan.name().as_str(), "order");
    assert_eq!(plan.pivot(), Some(3));
    assert_eq!(plan.steps().len(), 5);
    assert_eq!(plan.definition(), &def.canonical());
    assert_eq!(plan.digest(), def.digest());
    for (i, name) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
        assert_eq!(plan.step_index(&StepName::from(name)), Some(i));
    }
    assert_eq!(plan.step_index(&StepName::from("f")), None);

    assert_eq!(plan.deps(0), &[] as &[usize]);
    assert_eq!(plan.deps(1), &[0]);
    assert_eq!(plan.deps(2), &[0]);
    assert_eq!(plan.deps(3), &[1, 2]);
    assert_eq!(plan.deps(4), &[3], "e, with after omitted, runs after d");

    assert_eq!(plan.dependents(0), &[1, 2]);
    assert_eq!(plan.dependents(1), &[3]);
    assert_eq!(plan.dependents(2), &[3]);
    assert_eq!(plan.dependents(3), &[4]);
    assert_eq!(plan.dependents(4), &[] as &[usize]);
}

#[test]
fn after_omitted_means_chain() {
    let def = SagaDefinition::builder("order")
        .step("a", "svc", "a", |s| s.compensation("undo"))
        .step("b", "svc", "b", |s| s.compensation("undo"))
        .step("c", "svc", "c", |s| s.compensation("undo"))
        .build();
    assert!(def.steps.iter().all(|s| s.after.is_none()));
    let plan = def.validate().unwrap();
    assert_eq!(plan.deps(0), &[] as &[usize]);
    assert_eq!(plan.deps(1), &[0]);
    assert_eq!(plan.deps(2), &[1]);
    assert_eq!(plan.dependents(0), &[1]);
    assert_eq!(plan.dependents(1), &[2]);

    let canonical = def.canonical();
    let afters: Vec<Vec<&str>> =
        canonical.steps.iter().map(|s| names(s.after.as_ref().unwrap())).collect();
    assert_eq!(afters, [vec![], vec!["a"], vec!["b"]]);

    // Writing the chain out explicitly means the same thing.
    let explicit = SagaDefinition::builder("order")
        .step("a", "svc", "a", |s| s.compensation("undo").after(&[]))
        .step("b", "svc", "b", |s| s.compensation("undo").after(&["a"]))
        .step("c", "svc", "c", |s| s.compensation("undo").after(&["b"]))
        .build();
    assert_eq!(explicit.canonical(), canonical);
    assert_eq!(explicit.digest(), def.digest());
}

#[test]
fn empty_after_means_root() {
    let def = SagaDefinition::builder("order")
        .step("a", "svc", "a", |s| s.compensation("undo"))
        .step("b", "svc", "b", |s| s.compensation("undo").after(&[]))
        .step("c", "svc", "c", |s| s.compensation("undo").after(&[]))
        .build();
    let plan = def.validate().unwrap();
    for i in 0..3 {
        assert_eq!(plan.deps(i), &[] as &[usize], "step {i} is a root");
        assert_eq!(plan.dependents(i), &[] as &[usize]);
    }
}

#[test]
fn after_in_yaml_omitted_vs_empty() {
    let yaml = r#"
name: order
steps:
  - { name: a, service: svc, action: a, compensation: undo }
  - { name: b, service: svc, action: b, compensation: undo }
  - { name: c, service: svc, action: c, compensation: undo, after: [] }
"#;
    let def = SagaDefinition::from_yaml(yaml).unwrap();
    assert_eq!(def.steps[1].after, None);
    assert_eq!(def.steps[2].after, Some(vec![]));
    let plan = def.validate().unwrap();
    assert_eq!(plan.deps(1), &[0], "after omitted: runs after the step before");
    assert_eq!(plan.deps(2), &[] as &[usize], "after: [] starts at once");
}
