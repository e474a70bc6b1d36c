//! Saga definitions: what a saga is made of, built in Rust or loaded from YAML, TOML or JSON.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::ids::{CommandName, SagaName, ServiceName, StepName};
use crate::retry::RetryPolicy;

/// The default per-attempt timeout of a step.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// How a step relates to the saga's point of no return (Garcia-Molina & Salem; Richardson).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// Has a compensation and is undone if a later step fails. The default.
    #[default]
    Compensatable,
    /// The point of no return: once it succeeds, the saga must complete.
    Pivot,
    /// Runs after the pivot; retried until it succeeds and never fails the saga.
    Retriable,
}

/// How long an event that arrives before its saga waits for it is kept, by default.
pub const DEFAULT_AWAIT_WINDOW: Duration = Duration::from_secs(3600);

/// What an await step waits for: a domain event that carries a value of the saga, or a
/// signal sent to the saga. Exactly one of `event` and `signal`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwaitSpec {
    /// The subject of the domain event that completes the step, after `domain.`
    /// (`payments.confirmed`); `*` matches one token, a last `>` the rest. Its payload
    /// becomes the step's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// The subject of a domain event that fails the step instead (the saga compensates),
    /// matched the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_event: Option<String>,
    /// Which events are this saga's: required with `event`.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matching: Option<Correlation>,
    /// The name of the signal that completes the step; its payload becomes the step's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// How long an event that arrives before the saga reaches this step is kept for it
    /// (`"1h"`, the default). A signal is kept until the saga ends.
    #[serde(default = "default_window", with = "humantime_serde")]
    pub window: Duration,
    /// What the step's `timeout` means: `fail` (the default; the saga compensates) or
    /// `continue` (the step succeeds with no output).
    #[serde(default)]
    pub on_timeout: OnTimeout,
}

fn default_window() -> Duration {
    DEFAULT_AWAIT_WINDOW
}

impl Default for AwaitSpec {
    /// Waits for nothing yet: set `event` (with `matching`) or `signal`.
    fn default() -> Self {
        AwaitSpec {
            event: None,
            fail_event: None,
            matching: None,
            signal: None,
            window: DEFAULT_AWAIT_WINDOW,
            on_timeout: OnTimeout::Fail,
        }
    }
}

impl AwaitSpec {
    /// What the step waits for, in words: `event payments.confirmed where order_id =
    /// input.id` or `signal approve`.
    pub fn describe(&self) -> String {
        match (&self.signal, &self.event, &self.matching) {
            (Some(signal), _, _) => format!("signal {signal}"),
            (None, Some(event), Some(m)) => {
                format!("event {event} where {} = {}", m.field, m.equals)
            }
            (None, Some(event), None) => format!("event {event}"),
            (None, None, _) => "nothing".to_owned(),
        }
    }
}

/// How an event is matched to a saga: its field `field` equals the saga's value `equals`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Correlation {
    /// A field of the event's payload, dotted for nested maps (`order_id`, `order.id`).
    pub field: String,
    /// Where the saga's value comes from: `input.<field>` (the saga's input) or
    /// `steps.<step>.<field>` (the output of a step this one runs after), dotted likewise;
    /// `input` alone is the whole input.
    pub equals: String,
}

/// What an await step's timeout means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// The step fails and the saga compensates.
    #[default]
    Fail,
    /// The step succeeds with no output and the saga goes on.
    Continue,
}

/// One step of a saga: a command sent to one participant service, or (with `await`) a wait
/// for a domain event or a signal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDefinition {
    /// The step's name, unique in its saga; it becomes a NATS subject token.
    pub name: StepName,
    /// The participant service that handles the step's commands (empty for an await step).
    #[serde(default, skip_serializing_if = "ServiceName::is_empty")]
    pub service: ServiceName,
    /// The command that performs the step (empty for an await step).
    #[serde(default, skip_serializing_if = "CommandName::is_empty")]
    pub action: CommandName,
    /// What the step waits for instead of sending a command.
    #[serde(default, rename = "await", skip_serializing_if = "Option::is_none")]
    pub awaits: Option<AwaitSpec>,
    /// The command that undoes the step, if it can be undone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<CommandName>,
    /// The step's kind.
    #[serde(default)]
    pub kind: StepKind,
    /// The steps that must succeed before this one starts. `None` (the field left out) means
    /// "after the step listed before this one" (the first step starts at once), so a plain list
    /// of steps is a chain; `Some(vec![])` means "at once", and several names make a DAG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Vec<StepName>>,
    /// How long one attempt may take before it counts as timed out (`"5s"`, `"250ms"`).
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How often, and how far apart, failed or timed-out attempts are retried.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// The step changes nothing, so it needs no compensation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

fn default_timeout() -> Duration {
    DEFAULT_STEP_TIMEOUT
}

/// A saga definition: a name, a version and its steps.
///
/// Build one with [`SagaDefinition::builder`] or load one with [`SagaDefinition::from_yaml`],
/// [`from_toml`](SagaDefinition::from_toml), [`from_json`](SagaDefinition::from_json) or
/// [`load`](SagaDefinition::load); both give the same type. Call
/// [`validate`](SagaDefinition::validate) to get the [`Plan`](crate::Plan) that runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SagaDefinition {
    /// The saga's name; clients start sagas by this name.
    pub name: SagaName,
    /// A version number chosen by the author. The definition's
    /// [`digest`](SagaDefinition::digest) tells versions apart exactly.
    #[serde(default = "default_version")]
    pub version: u32,
    /// The steps, in the order they are written.
    pub steps: Vec<StepDefinition>,
}

fn default_version() -> u32 {
    1
}

/// A definition file could not be read or parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read saga definition {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file's extension is not one of `yaml`, `yml`, `toml`, `json`.
    #[error(
        "saga definition {path}: unknown format; name the file *.yaml, *.yml, *.toml or *.json"
    )]
    UnknownFormat {
        /// The file.
        path: String,
    },
    /// The text is not a well-formed definition in its format.
    #[error("saga definition {origin}: {format} error: {message}")]
    Parse {
        /// Where the text came from (a path, or `<string>`).
        origin: String,
        /// `YAML`, `TOML` or `JSON`.
        format: &'static str,
        /// The parser's message, with the line and column where it has them.
        message: String,
    },
}

impl SagaDefinition {
    /// Starts a builder for a saga named `name`.
    ///
    /// # Examples
    ///
    /// ```
    /// use saga_core::{SagaDefinition, StepKind};
    /// use std::time::Duration;
    ///
    /// let def = SagaDefinition::builder("place-order")
    ///     .step("reserve-items", "seller", "reserve", |s| s.compensation("release"))
    ///     .step("schedule-shipment", "logistics", "schedule", |s| {
    ///         s.compensation("cancel").timeout(Duration::from_secs(5))
    ///     })
    ///     .step("confirm", "orders", "confirm", |s| s.kind(StepKind::Pivot))
    ///     .build();
    /// let plan = def.validate().unwrap();
    /// assert_eq!(plan.steps().len(), 3);
    /// ```
    pub fn builder(name: impl Into<String>) -> SagaBuilder {
        SagaBuilder {
            def: SagaDefinition {
                name: SagaName::new_unchecked(name),
                version: default_version(),
                steps: Vec::new(),
            },
        }
    }

    /// Parses a YAML definition.
    pub fn from_yaml(text: &str) -> Result<Self, LoadError> {
        serde_yaml_ng::from_str(text).map_err(|e| parse_error("<string>", "YAML", e))
    }

    /// Parses a TOML definition.
    pub fn from_toml(text: &str) -> Result<Self, LoadError> {
        toml::from_str(text).map_err(|e| parse_error("<string>", "TOML", e))
    }

    /// Parses a JSON definition.
    pub fn from_json(text: &str) -> Result<Self, LoadError> {
        serde_json::from_str(text).map_err(|e| parse_error("<string>", "JSON", e))
    }

    /// Reads a definition file, choosing the format by extension (`.yaml`/`.yml`, `.toml`,
    /// `.json`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        if !matches!(ext.as_str(), "yaml" | "yml" | "toml" | "json") {
            return Err(LoadError::UnknownFormat { path: shown });
        }
        let text = std::fs::read_to_string(path)
            .map_err(|source| LoadError::Io { path: shown.clone(), source })?;
        let parsed = match ext.as_str() {
            "toml" => Self::from_toml(&text),
            "json" => Self::from_json(&text),
            _ => Self::from_yaml(&text),
        };
        parsed.map_err(|e| match e {
            LoadError::Parse { format, message, .. } => {
                LoadError::Parse { origin: shown, format, message }
            }
            other => other,
        })
    }

    /// The canonical form: every default filled in and every `after` resolved, so two
    /// definitions that mean the same have the same canonical form.
    pub fn canonical(&self) -> SagaDefinition {
        let mut def = self.clone();
        let names: Vec<StepName> = def.steps.iter().map(|s| s.name.clone()).collect();
        for (i, step) in def.steps.iter_mut().enumerate() {
            let after = step.after.get_or_insert_with(|| {
                if i == 0 {
                    vec![]
                } else {
                    vec![names[i - 1].clone()]
                }
            });
            after.sort();
            after.dedup();
        }
        def
    }

    /// A stable digest of the canonical form (hex SHA-256, first 16 bytes). It identifies a
    /// definition version exactly: a saga instance records the digest it started with.
    pub fn digest(&self) -> String {
        let canonical =
            serde_json::to_vec(&self.canonical()).expect("a definition always serializes to JSON");
        let hash = Sha256::digest(&canonical);
        hash[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn parse_error(origin: &str, format: &'static str, e: impl std::fmt::Display) -> LoadError {
    LoadError::Parse { origin: origin.to_owned(), format, message: e.to_string() }
}

/// Builds a [`SagaDefinition`] in Rust. See [`SagaDefinition::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct SagaBuilder {
    def: SagaDefinition,
}

impl SagaBuilder {
    /// Sets the version number (default 1).
    pub fn version(mut self, version: u32) -> Self {
        self.def.version = version;
        self
    }

    /// Adds a step named `name` that sends `action` to `service`; `configure` sets the rest.
    pub fn step(
        mut self,
        name: &str,
        service: &str,
        action: &str,
        configure: impl FnOnce(StepBuilder) -> StepBuilder,
    ) -> Self {
        let step = StepDefinition {
            name: name.into(),
            service: service.into(),
            action: action.into(),
            awaits: None,
            compensation: None,
            kind: StepKind::default(),
            after: None,
            timeout: DEFAULT_STEP_TIMEOUT,
            retry: RetryPolicy::default(),
            read_only: false,
        };
        self.def.steps.push(configure(StepBuilder { step }).step);
        self
    }

    /// Adds an await step named `name`: it sends no command and completes when what
    /// `configure` names arrives (see [`AwaitBuilder`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use saga_core::SagaDefinition;
    /// use std::time::Duration;
    ///
    /// let def = SagaDefinition::builder("place-order")
    ///     .step("reserve-items", "seller", "reserve", |s| s.compensation("release"))
    ///     .await_step("payment", |a| {
    ///         a.event("payments.confirmed")
    ///             .fail_event("payments.declined")
    ///             .matching("order_id", "input.id")
    ///             .timeout(Duration::from_secs(60))
    ///     })
    ///     .step("schedule-shipment", "logistics", "schedule", |s| s.compensation("cancel"))
    ///     .build();
    /// assert!(def.validate().is_ok());
    /// ```
    pub fn await_step(
        mut self,
        name: &str,
        configure: impl FnOnce(AwaitBuilder) -> AwaitBuilder,
    ) -> Self {
        let step = StepDefinition {
            name: name.into(),
            service: ServiceName::default(),
            action: CommandName::default(),
            awaits: Some(AwaitSpec::default()),
            compensation: None,
            kind: StepKind::default(),
            after: None,
            timeout: DEFAULT_STEP_TIMEOUT,
            retry: RetryPolicy::default(),
            read_only: false,
        };
        self.def.steps.push(configure(AwaitBuilder { step }).step);
        self
    }

    /// The definition (not yet validated).
    pub fn build(self) -> SagaDefinition {
        self.def
    }
}

/// Configures one step in [`SagaBuilder::step`].
#[derive(Debug, Clone)]
#[must_use]
pub struct StepBuilder {
    step: StepDefinition,
}

impl StepBuilder {
    /// The command that undoes this step.
    pub fn compensation(mut self, command: &str) -> Self {
        self.step.compensation = Some(command.into());
        self
    }

    /// The step's kind (default [`StepKind::Compensatable`]).
    pub fn kind(mut self, kind: StepKind) -> Self {
        self.step.kind = kind;
        self
    }

    /// The steps this one runs after (default: the step added before it).
    pub fn after(mut self, steps: &[&str]) -> Self {
        self.step.after = Some(steps.iter().map(|s| StepName::from(*s)).collect());
        self
    }

    /// The per-attempt timeout (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.step.timeout = timeout;
        self
    }

    /// The retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.step.retry = retry;
        self
    }

    /// Marks the step as changing nothing, so it needs no compensation.
    pub fn read_only(mut self) -> Self {
        self.step.read_only = true;
        self
    }
}

/// Configures an await step in [`SagaBuilder::await_step`].
#[derive(Debug, Clone)]
#[must_use]
pub struct AwaitBuilder {
    step: StepDefinition,
}

impl AwaitBuilder {
    fn spec(&mut self) -> &mut AwaitSpec {
        self.step.awaits.get_or_insert_with(AwaitSpec::default)
    }

    /// The domain event (subject after `domain.`) that completes the step.
    pub fn event(mut self, subject: &str) -> Self {
        self.spec().event = Some(subject.to_owned());
        self
    }

    /// A domain event that fails the step.
    pub fn fail_event(mut self, subject: &str) -> Self {
        self.spec().fail_event = Some(subject.to_owned());
        self
    }

    /// The event's `field` must equal the saga's value at `equals` (`input.<field>` or
    /// `steps.<step>.<field>`).
    pub fn matching(mut self, field: &str, equals: &str) -> Self {
        self.spec().matching =
            Some(Correlation { field: field.to_owned(), equals: equals.to_owned() });
        self
    }

    /// The signal that completes the step.
    pub fn signal(mut self, name: &str) -> Self {
        self.spec().signal = Some(name.to_owned());
        self
    }

    /// How long an early event is kept for the saga (default 1 h).
    pub fn window(mut self, window: Duration) -> Self {
        self.spec().window = window;
        self
    }

    /// What the timeout means (default [`OnTimeout::Fail`]).
    pub fn on_timeout(mut self, on_timeout: OnTimeout) -> Self {
        self.spec().on_timeout = on_timeout;
        self
    }

    /// How long the step waits (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.step.timeout = timeout;
        self
    }

    /// The step's kind (default [`StepKind::Compensatable`]; an await step may be the pivot).
    pub fn kind(mut self, kind: StepKind) -> Self {
        self.step.kind = kind;
        self
    }

    /// The steps this one waits after (default: the step added before it).
    pub fn after(mut self, steps: &[&str]) -> Self {
        self.step.after = Some(steps.iter().map(|s| StepName::from(*s)).collect());
        self
    }
}
