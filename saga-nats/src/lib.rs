//! # saga-nats: sagas over NATS JetStream
//!
//! Orchestration decides, choreography carries. A [`Coordinator`] (any number of replicas)
//! starts sagas, sends each step's command, records every outcome durably in JetStream and
//! decides what comes next, driving the pure state machine of [`saga_core`]. Participant
//! services ([`Participant`]) consume commands and publish replies through NATS subjects
//! only; services that take no step follow saga lifecycle events. A [`SagaClient`] starts,
//! waits for, inspects and manages sagas.
//!
//! ## Durable layout (protocol v2)
//!
//! | stream / bucket | subjects | what |
//! |---|---|---|
//! | `SAGA_IN` | `saga.in.<id>.<saga>.start`, `saga.in.<id>.<saga>.op.<operator>` | starts and operator actions (work queue); a live saga's start is held by the coordinator replica driving it until the saga ends |
//! | `SAGA_LOG` | `saga.log.<id>.<saga>.<event>` | each saga's log: one record per transition (snapshot + typed timeline entries + lifecycle events), compare-and-swap fenced; followers read lifecycle events here |
//! | `SAGA_DLQ` | `saga.dlq.<component>` | dead letters, with the reason in a header |
//! | `DOMAIN_EVENTS` | `domain.>` | services' own events |
//! | `saga_definitions` | | definitions by name and digest |
//! | `saga_fx_<service>` | | one participant service's effect records (dedup and barrier) |
//!
//! Commands are core NATS requests on `saga.cmd.<service>.<command>`; replies go to
//! `saga.reply.<replica>.<service>.<saga-id>.<step>.<a|c>.<attempt>`, so the coordinator can
//! tell (and NATS permissions can confine) which service answered.
//!
//! `docs/PROTOCOL.md` documents every subject, header and field; `docs/ARCHITECTURE.md` why
//! it is built this way.

pub mod admin;
mod awaits;
pub mod client;
pub mod connect;
pub mod coordinator;
mod deliver;
pub mod dlq;
pub mod follow;
pub mod index;
pub mod observe;
pub mod participant;
pub mod permissions;
pub mod provision;
pub mod spans;
pub mod store;
pub mod subjects;
pub mod telemetry;

pub use client::{ErrorKind, SagaClient, SagaClientError, SagaView};
pub use connect::{ConnectError, NatsOptions};
pub use coordinator::{Coordinator, CoordinatorConfig, CoordinatorError};
pub use follow::LifecycleEvent;
pub use participant::{
    Command, Participant, ParticipantBuilder, ParticipantConfig, ParticipantError, StepError,
};
pub use provision::{
    provision, provision_participant, EffectsConfig, ProvisionConfig, ProvisionError,
};
pub use store::{Follower, RecordMeta, TimelinePage};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
mod readme {}
