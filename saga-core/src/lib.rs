//! # saga-core: the saga model and its pure state machine
//!
//! A **saga** is a business transaction across services, made of **steps**. Each step sends a
//! command (its *action*) to one participant service; a step that can be undone names a
//! *compensation* command. When a step fails, the steps already done are compensated in the
//! reverse order of what actually completed.
//!
//! This crate holds the model and the decisions, and does no I/O: no sockets, no clock, no
//! runtime. `saga-nats` drives it over NATS JetStream.
//!
//! ## Definitions
//!
//! A [`SagaDefinition`] has a name, a version and steps. Each [`StepDefinition`] names its
//! participant service, its action, an optional compensation, its [`StepKind`], the steps it
//! runs `after` (a DAG: independent steps run in parallel), a per-attempt timeout and a
//! [`RetryPolicy`]. Step kinds follow Garcia-Molina & Salem and Richardson:
//!
//! - **compensatable** (the default): has a compensation, undone if a later step fails;
//! - **pivot**: the point of no return; once it succeeds the saga must complete;
//! - **retriable**: after the pivot; retried until it succeeds, never fails the saga.
//!
//! Build a definition in Rust:
//!
//! ```
//! use saga_core::{SagaDefinition, StepKind};
//! use std::time::Duration;
//!
//! let def = SagaDefinition::builder("place-order")
//!     .step("reserve-items", "seller", "reserve", |s| s.compensation("release"))
//!     .step("schedule-shipment", "logistics", "schedule", |s| {
//!         s.compensation("cancel").timeout(Duration::from_secs(5))
//!     })
//!     .step("charge", "payments", "charge", |s| s.kind(StepKind::Pivot))
//!     .step("notify-warehouse", "logistics", "notify", |s| s.kind(StepKind::Retriable))
//!     .build();
//! let plan = def.validate()?;
//! assert_eq!(plan.pivot(), Some(2));
//! # Ok::<(), saga_core::ValidationError>(())
//! ```
//!
//! or load the same thing from YAML (or TOML, or JSON):
//!
//! ```
//! # use saga_core::SagaDefinition;
//! let yaml = r#"
//! name: place-order
//! version: 1
//! steps:
//!   - name: reserve-items
//!     service: seller
//!     action: reserve
//!     compensation: release
//!   - name: schedule-shipment
//!     service: logistics
//!     action: schedule
//!     compensation: cancel
//!     timeout: 5s
//!     retry: { max_attempts: 5, initial_backoff: 100ms }
//!   - name: charge
//!     service: payments
//!     action: charge
//!     kind: pivot
//!   - name: notify-warehouse
//!     service: logistics
//!     action: notify
//!     kind: retriable
//! "#;
//! let def = SagaDefinition::from_yaml(yaml)?;
//! let plan = def.validate()?;
//! println!("{} runs definition {}", plan.name(), plan.digest());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A step without `after` runs after the step written before it, so a plain list is a chain;
//! `after: []` starts a step at once, and `after: [a, b]` joins branches.
//! [`SagaDefinition::validate`] refuses a definition that breaks a rule, naming the saga, the
//! step, the field and the value ([`ValidationError`]); [`SagaDefinition::digest`] identifies a
//! version exactly.
//!
//! ## The instance state machine
//!
//! A [`SagaState`] is a plain value. [`SagaState::handle`] takes `(now, event)` and returns the
//! [`Effect`]s to carry out — dispatch a command with a deterministic [`CommandId`], arm or
//! disarm a [`Timer`], publish a lifecycle event, finish — or a [`Rejection`] saying why the
//! event changes nothing (duplicate, stale attempt, unknown step, wrong status). Every row of
//! the `(status, event)` table is a [`Rule`]. The state equals the fold of its accepted
//! events ([`SagaState::replay`]), so a driver that crashed rebuilds it, and
//! [`SagaState::outstanding`] lists the commands and timers that must exist for it to go on.
//!
//! Statuses: `running` → `completed`; or `running` → `compensating` → `compensated` (a step
//! failed) or `cancelled` (on request); a compensation that exhausts its retries parks the saga
//! in `needs_intervention`, from where an operator retries, skips or resolves it.
//!
//! A command that finds no responder is reported with [`Event::Undelivered`]. That is not an
//! attempt: the same attempt (same command id) is sent again after 500 ms, doubling up to 30 s
//! ([`TimerKind::Redeliver`]), and the step's retry budget is untouched.
//!
//! ## Snapshots and the timeline
//!
//! The machine's fields are private, so that it can change without breaking its readers.
//! What clients, tools and other languages read — and what the coordinator stores — is a
//! [`SagaSnapshot`]: named fields, a view version ([`VIEW_VERSION`]), the saga's status and
//! each step's ([`StepSnapshot`]). [`SagaState::from_snapshot`] turns a stored snapshot back
//! into the machine, refusing one of another view version, definition or definition version
//! ([`SnapshotError`]).
//!
//! What happened is not kept in the state: each transition returns the typed
//! [`TimelineEntry`]s it wrote in [`Handled::timeline`] — a command dispatched (to which
//! service, which command, until when), an attempt that succeeded, failed (why, transient or
//! not), timed out or found no responder, a retry scheduled, compensation started (and why), a
//! cancel or operator action (and who asked), the saga parked or finished. The driver appends
//! them to the saga's timeline.
//!
//! ```
//! use saga_core::{Event, Payload, SagaDefinition, SagaId, SagaState, TimelineEvent, Timestamp};
//!
//! let plan = SagaDefinition::builder("s")
//!     .step("only", "svc", "do-it", |s| s)
//!     .build()
//!     .validate()?;
//! let mut saga = SagaState::new(SagaId::new("id1")?, &plan);
//! let handled = saga.handle(&plan, Timestamp(0), &Event::Start { input: Payload::new(vec![1]) });
//! let kinds: Vec<&str> = handled.timeline.iter().map(|e| e.event.name()).collect();
//! assert_eq!(kinds, ["started", "dispatched"]);
//! assert!(matches!(
//!     &handled.timeline[1].event,
//!     TimelineEvent::Dispatched { service, attempt: 1, .. } if service.as_str() == "svc"
//! ));
//!
//! let stored = saga.snapshot();
//! assert_eq!(stored.steps[0].attempt, 1);
//! assert_eq!(SagaState::from_snapshot(&plan, &stored)?, saga);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Data flow
//!
//! Every command carries the saga's input and the outputs of the steps it runs `after`, keyed
//! by step name ([`Dispatch::deps`]); a compensation also carries its own action's output. All
//! are opaque MessagePack bytes ([`Payload`]): the participant SDK turns them into the
//! handler's types.
//!
//! ## Wire messages
//!
//! [`wire`] defines protocol v2: commands, replies, starts, operator actions, the saga log
//! record and the participant's effect record, as named-field MessagePack with a protocol
//! version, and a [`Codec`] with a size limit, typed errors and checked identifiers.

mod definition;
mod ids;
mod machine;
mod retry;
mod validate;
pub mod view;
pub mod wire;

pub use definition::{
    AwaitBuilder, AwaitSpec, Correlation, LoadError, OnTimeout, SagaBuilder, SagaDefinition,
    StepBuilder, StepDefinition, StepKind, DEFAULT_AWAIT_WINDOW, DEFAULT_STEP_TIMEOUT,
};
pub use ids::{
    check_token, CommandId, CommandName, Phase, SagaId, SagaName, ServiceName, StepName, Timestamp,
    TokenError, MAX_TOKEN_LEN,
};
pub use machine::{
    correlation_value, AwaitOn, Awaiting, Cause, Dispatch, Effect, Event, Handled, LifecycleKind,
    Payload, Rejection, Rule, SagaState, SagaStatus, SnapshotError, StepStatus, Timer, TimerKind,
    COMPENSATION_TIMEOUT_ATTEMPTS, UNCLAIMED_GRACE,
};
pub use retry::RetryPolicy;
pub use validate::{Plan, ValidationError, MAX_STEPS, MAX_TIMEOUT};
pub use view::{SagaSnapshot, StepSnapshot, TimelineEntry, TimelineEvent, VIEW_VERSION};
pub use wire::{Codec, CodecError};
