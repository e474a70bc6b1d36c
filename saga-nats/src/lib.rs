//! # saga-nats: sagas over NATS JetStream
//!
//! Orchestration decides, choreography carries. A [`Coordinator`] (any number of replicas)
//! starts sagas, sends each step's command, records every outcome durably in JetStream and
//! decides what comes next, driving the pure state machine of [`saga_core`]. Participant
//! services ([`Participant`]) consume commands and publish replies through NATS subjects
//! only; services that take no step follow saga lifecycle events. A [`SagaClient`] starts,
//! waits for, inspects and manages sagas.
//!
//! ## Durable layout
//!
//! | stream / bucket | subjects | what |
//! |---|---|---|
//! | `SAGA_STATE` | `saga.state.<id>` | each saga's latest record (state + history), one per saga, written with compare-and-swap; a finished saga's record expires after the retention |
//! | `SAGA_IN` | `saga.in.<id>.{start,reply,timer,op}`, `saga.timer.<id>.<step>` | inputs to sagas (work queue), and pending timers as scheduled messages |
//! | `SAGA_CMD` | `saga.cmd.<service>.<command>` | commands to participants (work queue, one durable consumer per service) |
//! | `SAGA_EVENTS` | `saga.event.<saga>.<kind>.<id>` | lifecycle events |
//! | `SAGA_DLQ` | `saga.dlq.<component>` | dead letters, with the reason in a header |
//! | `saga_definitions` | | definitions by name and digest |
//! | `saga_effects` | | participants' effect records (dedup and barrier) |
//!
//! `docs/PROTOCOL.md` documents every subject, header and field; `docs/ARCHITECTURE.md` why
//! it is built this way.

pub mod cli;
pub mod client;
pub mod coordinator;
pub mod follow;
pub mod participant;
pub mod provision;
pub mod store;
pub mod subjects;
pub mod telemetry;

pub use client::{ErrorKind, ListFilter, SagaClient, SagaClientError, SagaView};
pub use coordinator::{Coordinator, CoordinatorConfig, CoordinatorError};
pub use participant::{
    Command, Participant, ParticipantBuilder, ParticipantConfig, ParticipantError, StepError,
};
pub use provision::{provision, ProvisionConfig, ProvisionError};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
mod readme {}
