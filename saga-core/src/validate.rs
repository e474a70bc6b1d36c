//! Validation: turns a [`SagaDefinition`] into a [`Plan`], or says exactly what is wrong.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::definition::{SagaDefinition, StepDefinition, StepKind};
use crate::ids::{check_token, SagaName, StepName, TokenError};

/// The most steps a saga may have.
pub const MAX_STEPS: usize = 256;

/// The longest per-attempt step timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// A rule a saga definition breaks. Every message names the saga, the step and the offending
/// value, and says what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The saga has no steps.
    #[error("definition {saga:?}: has no steps; add at least one")]
    EmptySaga {
        /// The saga.
        saga: SagaName,
    },
    /// The saga has more than [`MAX_STEPS`] steps.
    #[error("definition {saga:?}: has {count} steps; the limit is {MAX_STEPS}")]
    TooManySteps {
        /// The saga.
        saga: SagaName,
        /// How many steps it has.
        count: usize,
    },
    /// A name is not a valid subject token.
    #[error("definition {saga:?}{}: {field} {value:?} {reason}", step_ctx(.step))]
    InvalidName {
        /// The saga.
        saga: SagaName,
        /// The step, unless the saga's own name is at fault.
        step: Option<StepName>,
        /// Which field holds the name.
        field: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: TokenError,
    },
    /// Two steps share a name.
    #[error("definition {saga:?} step {step}: name is used by more than one step; step names must be unique")]
    DuplicateStep {
        /// The saga.
        saga: SagaName,
        /// The repeated name.
        step: StepName,
    },
    /// A step runs after a step that does not exist.
    #[error("definition {saga:?} step {step}: after refers to unknown step {dependency:?}")]
    UnknownDependency {
        /// The saga.
        saga: SagaName,
        /// The step.
        step: StepName,
        /// The unknown name.
        dependency: String,
    },
    /// The `after` relation has a cycle.
    #[error("definition {saga:?} step {step}: after forms a cycle ({}); steps must form a DAG", join(.cycle))]
    Cycle {
        /// The saga.
        saga: SagaName,
        /// A step on the cycle.
        step: StepName,
        /// The steps of the cycle, in order, the first repeated at the end.
        cycle: Vec<StepName>,
    },
    /// More than one step is a pivot.
    #[error("definition {saga:?} step {step}: kind pivot, but step {first:?} is already the pivot; a saga has at most one")]
    MultiplePivots {
        /// The saga.
        saga: SagaName,
        /// The second pivot.
        step: StepName,
        /// The first pivot.
        first: StepName,
    },
    /// A compensatable step can run after (or alongside) the pivot.
    #[error("definition {saga:?} step {step}: kind compensatable, but it can run after the pivot {pivot:?}; make it run before the pivot (pivot after: [{step}, ...]) or make it retriable")]
    CompensatableAfterPivot {
        /// The saga.
        saga: SagaName,
        /// The step.
        step: StepName,
        /// The pivot.
        pivot: StepName,
    },
    /// A step that can run after the pivot is not retriable.
    #[error("definition {saga:?} step {step}: kind {kind}, but it can run after the pivot {pivot:?}; steps after the pivot must be retriable")]
    NotRetriableAfterPivot {
        /// The saga.
        saga: SagaName,
        /// The step.
        step: StepName,
        /// Its kind.
        kind: &'static str,
        /// The pivot.
        pivot: StepName,
    },
    /// A step that a later failure could leave undone has no compensation.
    #[error("definition {saga:?} step {step}: compensation is missing, but step {later:?} can fail after it and leave it undone; add a compensation, mark it read_only, or make it the pivot")]
    MissingCompensation {
        /// The saga.
        saga: SagaName,
        /// The step without compensation.
        step: StepName,
        /// A step that can fail after it.
        later: StepName,
    },
    /// A step's timeout is zero.
    #[error("definition {saga:?} step {step}: timeout 0s; a step needs a timeout above zero")]
    ZeroTimeout {
        /// The saga.
        saga: SagaName,
        /// The step.
        step: StepName,
    },
    /// A step's timeout is longer than [`MAX_TIMEOUT`].
    #[error("definition {saga:?} step {step}: timeout {value} exceeds the limit of 7 days")]
    TimeoutTooLong {
        /// The saga.
        saga: SagaName,
        /// The step.
        step: StepName,
        /// The timeout.
        value: String,
    },
    /// A step's retry policy is out of range.
    #[error("definition {saga:?} step {step}: retry.{field} {value}: {rule}")]
    InvalidRetry {
        /// The saga.
        saga: SagaName,
        /// The step.
        step: StepName,
        /// The field.
        field: &'static str,
        /// The offending value.
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A step both sends a command and awaits, or does neither.
    #[error("definition {saga:?} step {step}: {problem}")]
    StepShape {
        /// The saga.
        saga: SagaName,
        /// The step.
        step: StepName,
        /// What is wrong and what to do.
        problem: &'static str,
    },
    /// An await step's settings cannot work.
    #[error("definition {saga:?} step {step}: await.{field} {value:?}: {rule}")]
    InvalidAwait {
        /// The saga.
        saga: SagaName,
        /// The step.
        step: StepName,
        /// The field.
        field: &'static str,
        /// The offending value.
        value: String,
        /// The rule it breaks.
        rule: String,
    },
    /// No step sends a command.
    #[error("definition {saga:?}: every step is an await step; a saga needs at least one step with an action")]
    OnlyAwaits {
        /// The saga.
        saga: SagaName,
    },
}

fn step_ctx(step: &Option<StepName>) -> String {
    step.as_ref().map(|s| format!(" step {s}")).unwrap_or_default()
}

fn join(steps: &[StepName]) -> String {
    steps.iter().map(StepName::as_str).collect::<Vec<_>>().join(" -> ")
}

/// A validated definition, ready to run: the canonical definition, its digest, and the step
/// graph resolved to indices.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    def: SagaDefinition,
    digest: String,
    index: BTreeMap<StepName, usize>,
    deps: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
    pivot: Option<usize>,
}

impl Plan {
    /// The canonical definition.
    pub fn definition(&self) -> &SagaDefinition {
        &self.def
    }

    /// The saga's name.
    pub fn name(&self) -> &SagaName {
        &self.def.name
    }

    /// The definition's digest (see [`SagaDefinition::digest`]).
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The steps, in definition order.
    pub fn steps(&self) -> &[StepDefinition] {
        &self.def.steps
    }

    /// The index of the step named `name`.
    pub fn step_index(&self, name: &StepName) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The indices of the steps step `i` runs after.
    pub fn deps(&self, i: usize) -> &[usize] {
        &self.deps[i]
    }

    /// The indices of the steps that run after step `i`.
    pub fn dependents(&self, i: usize) -> &[usize] {
        &self.dependents[i]
    }

    /// The index of the pivot step, if there is one.
    pub fn pivot(&self) -> Option<usize> {
        self.pivot
    }
}

impl SagaDefinition {
    /// Checks every rule and returns the runnable [`Plan`], or the first rule broken (in the
    /// order: names, graph, step kinds, timeouts and retries, compensations).
    ///
    /// # Examples
    ///
    /// ```
    /// use saga_core::SagaDefinition;
    ///
    /// let def = SagaDefinition::builder("order")
    ///     .step("reserve", "seller", "reserve", |s| s) // no compensation...
    ///     .step("ship", "logistics", "ship", |s| s.compensation("unship"))
    ///     .build();
    /// let err = def.validate().unwrap_err();
    /// assert!(err.to_string().starts_with(r#"definition "order" step reserve: compensation is missing"#));
    /// ```
    pub fn validate(&self) -> Result<Plan, ValidationError> {
        let def = self.canonical();
        let saga = def.name.clone();
        if let Err(reason) = saga.check() {
            return Err(ValidationError::InvalidName {
                saga: saga.clone(),
                step: None,
                field: "name",
                value: saga.to_string(),
                reason,
            });
        }
        if def.steps.is_empty() {
            return Err(ValidationError::EmptySaga { saga });
        }
        if def.steps.len() > MAX_STEPS {
            return Err(ValidationError::TooManySteps { saga, count: def.steps.len() });
        }

        let mut index = BTreeMap::new();
        for (i, step) in def.steps.iter().enumerate() {
            check_names(&saga, step)?;
            if index.insert(step.name.clone(), i).is_some() {
                return Err(ValidationError::DuplicateStep { saga, step: step.name.clone() });
            }
        }

        let n = def.steps.len();
        let mut deps = vec![Vec::new(); n];
        let mut dependents = vec![Vec::new(); n];
        for (i, step) in def.steps.iter().enumerate() {
            for dep in step.after.as_deref().unwrap_or_default() {
                let Some(&j) = index.get(dep) else {
                    return Err(ValidationError::UnknownDependency {
                        saga,
                        step: step.name.clone(),
                        dependency: dep.to_string(),
                    });
                };
                if !deps[i].contains(&j) {
                    deps[i].push(j);
                    dependents[j].push(i);
                }
            }
        }
        if let Some(cycle) = find_cycle(&deps) {
            let cycle: Vec<StepName> = cycle.iter().map(|&i| def.steps[i].name.clone()).collect();
            return Err(ValidationError::Cycle { saga, step: cycle[0].clone(), cycle });
        }

        // ancestors[i][j]: step j must succeed before step i starts.
        let ancestors = ancestors(&deps);

        let mut pivot: Option<usize> = None;
        for (i, step) in def.steps.iter().enumerate() {
            if step.kind == StepKind::Pivot {
                if let Some(first) = pivot {
                    return Err(ValidationError::MultiplePivots {
                        saga,
                        step: step.name.clone(),
                        first: def.steps[first].name.clone(),
                    });
                }
                pivot = Some(i);
            }
        }
        if let Some(p) = pivot {
            let pivot_name = def.steps[p].name.clone();
            for (i, step) in def.steps.iter().enumerate() {
                if i == p || ancestors[p][i] {
                    continue;
                }
                match step.kind {
                    StepKind::Retriable => {}
                    StepKind::Compensatable if step.compensation.is_some() => {
                        return Err(ValidationError::CompensatableAfterPivot {
                            saga,
                            step: step.name.clone(),
                            pivot: pivot_name,
                        })
                    }
                    StepKind::Compensatable => {
                        return Err(ValidationError::NotRetriableAfterPivot {
                            saga,
                            step: step.name.clone(),
                            kind: "compensatable",
                            pivot: pivot_name,
                        })
                    }
                    StepKind::Pivot => unreachable!("only one pivot"),
                }
            }
        }

        for step in &def.steps {
            check_timing(&saga, step)?;
        }
        for (i, step) in def.steps.iter().enumerate() {
            if let Some(spec) = &step.awaits {
                let upstream =
                    |name: &str| index.get(&StepName::from(name)).is_some_and(|&j| ancestors[i][j]);
                check_await(&saga, step, spec, &upstream)?;
            }
        }
        if def.steps.iter().all(|s| s.awaits.is_some()) {
            return Err(ValidationError::OnlyAwaits { saga });
        }

        // A step without compensation is fine only if no step that can fail may finish after it.
        for (i, step) in def.steps.iter().enumerate() {
            // An await step changes nothing, like a read-only one.
            if step.compensation.is_some() || step.read_only || step.awaits.is_some() {
                continue;
            }
            let later = def.steps.iter().enumerate().find(|&(j, other)| {
                j != i && other.kind != StepKind::Retriable && !ancestors[i][j]
            });
            if let Some((_, later)) = later {
                return Err(ValidationError::MissingCompensation {
                    saga,
                    step: step.name.clone(),
                    later: later.name.clone(),
                });
            }
        }

        Ok(Plan { digest: def.digest(), def, index, deps, dependents, pivot })
    }
}

fn check_names(saga: &SagaName, step: &StepDefinition) -> Result<(), ValidationError> {
    let shape = |problem| ValidationError::StepShape {
        saga: saga.clone(),
        step: step.name.clone(),
        problem,
    };
    if step.awaits.is_some() {
        if !step.service.is_empty() || !step.action.is_empty() {
            return Err(shape("has both await and service/action; a step either sends a command (service and action) or awaits"));
        }
        if step.compensation.is_some() {
            return Err(shape(
                "an await step has no action, so it has no compensation; remove compensation",
            ));
        }
        if step.read_only {
            return Err(shape("an await step changes nothing already; remove read_only"));
        }
        if step.retry != crate::RetryPolicy::default() {
            return Err(shape("an await step makes one attempt: its timeout; remove retry (await.on_timeout says what a timeout means)"));
        }
        if step.kind == StepKind::Retriable {
            return Err(shape("an await step cannot be retriable: it is never retried; use await.on_timeout: continue for a wait that must not fail the saga"));
        }
        return match step.name.check() {
            Ok(()) => Ok(()),
            Err(reason) => Err(ValidationError::InvalidName {
                saga: saga.clone(),
                step: Some(step.name.clone()),
                field: "name",
                value: step.name.to_string(),
                reason,
            }),
        };
    }
    let fields: [(&'static str, Result<(), TokenError>, &str); 4] = [
        ("name", step.name.check(), step.name.as_str()),
        ("service", step.service.check(), step.service.as_str()),
        ("action", step.action.check(), step.action.as_str()),
        (
            "compensation",
            step.compensation.as_ref().map_or(Ok(()), |c| c.check()),
            step.compensation.as_ref().map_or("", |c| c.as_str()),
        ),
    ];
    for (field, result, value) in fields {
        if let Err(reason) = result {
            return Err(ValidationError::InvalidName {
                saga: saga.clone(),
                step: Some(step.name.clone()),
                field,
                value: value.to_owned(),
                reason,
            });
        }
    }
    Ok(())
}

/// The checks of an await step's settings; `upstream(step)` says whether that step must
/// succeed before this one starts.
fn check_await(
    saga: &SagaName,
    step: &StepDefinition,
    spec: &crate::AwaitSpec,
    upstream: &dyn Fn(&str) -> bool,
) -> Result<(), ValidationError> {
    let bad = |field, value: &str, rule: String| ValidationError::InvalidAwait {
        saga: saga.clone(),
        step: step.name.clone(),
        field,
        value: value.to_owned(),
        rule,
    };
    match (&spec.event, &spec.signal) {
        (Some(_), Some(signal)) => {
            return Err(bad(
                "signal",
                signal,
                "an await step waits for an event or a signal, not both".into(),
            ))
        }
        (None, None) => {
            return Err(bad(
                "event",
                "",
                "an await step needs an event (with match) or a signal".into(),
            ))
        }
        (None, Some(signal)) => {
            if let Err(e) = check_token(signal) {
                return Err(bad("signal", signal, format!("a signal name {e}")));
            }
            for (field, set) in
                [("fail_event", spec.fail_event.is_some()), ("match", spec.matching.is_some())]
            {
                if set {
                    return Err(bad(field, "", "applies to an event, not a signal".into()));
                }
            }
        }
        (Some(event), None) => {
            for (field, subject) in std::iter::once(("event", event))
                .chain(spec.fail_event.iter().map(|f| ("fail_event", f)))
            {
                if let Err(rule) = check_subject(subject) {
                    return Err(bad(field, subject, rule));
                }
            }
            let Some(m) = &spec.matching else {
                return Err(bad("match", "", "an event needs match: {field: <event field>, equals: input.<field> or steps.<step>.<field>}, so that the saga knows which events are its own".into()));
            };
            if let Err(rule) = check_path(&m.field) {
                return Err(bad("match.field", &m.field, rule));
            }
            match m.equals.split_once('.') {
                _ if m.equals == "input" => {}
                Some(("input", path)) => {
                    if let Err(rule) = check_path(path) {
                        return Err(bad("match.equals", &m.equals, rule));
                    }
                }
                Some(("steps", rest)) => {
                    let (from, path) = rest.split_once('.').unwrap_or((rest, ""));
                    if !upstream(from) {
                        return Err(bad("match.equals", &m.equals, format!("step {from:?} is not a step this one runs after, so its output is not there yet; name an earlier step (after: [...]) or the input")));
                    }
                    if !path.is_empty() {
                        if let Err(rule) = check_path(path) {
                            return Err(bad("match.equals", &m.equals, rule));
                        }
                    }
                }
                _ => {
                    return Err(bad(
                        "match.equals",
                        &m.equals,
                        "must be input, input.<field> or steps.<step>.<field>".into(),
                    ))
                }
            }
        }
    }
    if spec.window.is_zero() || spec.window > MAX_TIMEOUT {
        let value = humantime_serde::re::humantime::format_duration(spec.window).to_string();
        return Err(bad("window", &value, "must be above zero and at most 7 days".into()));
    }
    Ok(())
}

/// Checks a domain event subject (after `domain.`): tokens of letters, digits, `_` and `-`,
/// or `*`, and a last `>`.
fn check_subject(subject: &str) -> Result<(), String> {
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        match *token {
            "*" => {}
            ">" if i == tokens.len() - 1 => {}
            ">" => return Err("'>' may only be the last token".into()),
            t => check_token(t).map_err(|e| format!("token {t:?} {e}"))?,
        }
    }
    Ok(())
}

/// Checks a dotted field path: non-empty names without spaces.
fn check_path(path: &str) -> Result<(), String> {
    if path.split('.').any(|p| p.is_empty() || p.chars().any(char::is_whitespace)) {
        return Err("must be a dotted field path such as order_id or order.id".into());
    }
    Ok(())
}

fn check_timing(saga: &SagaName, step: &StepDefinition) -> Result<(), ValidationError> {
    if step.timeout.is_zero() {
        return Err(ValidationError::ZeroTimeout { saga: saga.clone(), step: step.name.clone() });
    }
    if step.timeout > MAX_TIMEOUT {
        return Err(ValidationError::TimeoutTooLong {
            saga: saga.clone(),
            step: step.name.clone(),
            value: humantime_serde::re::humantime::format_duration(step.timeout).to_string(),
        });
    }
    let r = &step.retry;
    let bad = |field, value: String, rule| ValidationError::InvalidRetry {
        saga: saga.clone(),
        step: step.name.clone(),
        field,
        value,
        rule,
    };
    if r.max_attempts == 0 {
        return Err(bad("max_attempts", "0".into(), "must be at least 1 (the first attempt)"));
    }
    if !(r.multiplier >= 1.0 && r.multiplier.is_finite()) {
        return Err(bad(
            "multiplier",
            r.multiplier.to_string(),
            "must be a number of at least 1.0",
        ));
    }
    if !(0.0..=1.0).contains(&r.jitter) {
        return Err(bad("jitter", r.jitter.to_string(), "must be between 0.0 and 1.0"));
    }
    if r.initial_backoff > r.max_backoff {
        return Err(bad(
            "initial_backoff",
            humantime_serde::re::humantime::format_duration(r.initial_backoff).to_string(),
            "must not exceed max_backoff",
        ));
    }
    if r.max_backoff > Duration::from_secs(24 * 3600) {
        return Err(bad(
            "max_backoff",
            humantime_serde::re::humantime::format_duration(r.max_backoff).to_string(),
            "must be at most 24h",
        ));
    }
    Ok(())
}

/// A cycle in the dependency graph, as step indices with the first repeated at the end.
fn find_cycle(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let n = deps.len();
    let mut mark = vec![Mark::New; n];
    for root in 0..n {
        if mark[root] != Mark::New {
            continue;
        }
        // Iterative DFS: (node, next dependency to visit).
        let mut path: Vec<(usize, usize)> = vec![(root, 0)];
        mark[root] = Mark::OnPath;
        while let Some(&mut (node, ref mut next)) = path.last_mut() {
            if let Some(&dep) = deps[node].get(*next) {
                *next += 1;
                match mark[dep] {
                    Mark::New => {
                        mark[dep] = Mark::OnPath;
                        path.push((dep, 0));
                    }
                    Mark::OnPath => {
                        let start = path.iter().position(|&(n, _)| n == dep).unwrap_or(0);
                        let mut cycle: Vec<usize> = path[start..].iter().map(|&(n, _)| n).collect();
                        // Show the cycle in execution order: each step runs after the next.
                        cycle.reverse();
                        cycle.push(cycle[0]);
                        return Some(cycle);
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                path.pop();
            }
        }
    }
    None
}

/// `result[i][j]` is true when step `j` is a (transitive) dependency of step `i`.
fn ancestors(deps: &[Vec<usize>]) -> Vec<Vec<bool>> {
    let n = deps.len();
    let mut result = vec![vec![false; n]; n];
    for (i, row) in result.iter_mut().enumerate() {
        let mut stack: Vec<usize> = deps[i].clone();
        while let Some(j) = stack.pop() {
            if !row[j] {
                row[j] = true;
                stack.extend_from_slice(&deps[j]);
            }
        }
    }
    result
}
