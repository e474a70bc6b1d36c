//! Durable saga state (one record per saga, compare-and-swap fenced) and the definition
//! registry.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use bytes::Bytes;
use saga_core::envelope::LifecycleMessage;
use saga_core::{Codec, CodecError, Plan, SagaDefinition, SagaId, SagaName, SagaState};
use serde::{Deserialize, Serialize};

use crate::subjects::{self, headers};

/// What is stored for each saga: its state and the lifecycle events of its latest transition
/// (re-published, deduplicated, if a crash may have cut their publication short).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRecord {
    /// Protocol version.
    pub v: u16,
    /// The saga.
    pub state: SagaState,
    /// The latest transition's lifecycle events.
    pub events: Vec<LifecycleMessage>,
    /// The saga's W3C trace context (`traceparent`), from the request that started it.
    #[serde(default)]
    pub trace: Option<String>,
}

/// A state record and the stream sequence it was read at (the compare-and-swap token).
#[derive(Debug, Clone)]
pub struct Versioned {
    /// The record.
    pub record: StateRecord,
    /// Its sequence in the state stream.
    pub seq: u64,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another writer changed the saga since it was read.
    #[error("saga {id} was changed by another writer (expected sequence {expected})")]
    Conflict {
        /// The saga.
        id: SagaId,
        /// The sequence the write expected.
        expected: u64,
    },
    /// The stored record could not be decoded or the new one encoded.
    #[error("saga {id}: {source}")]
    Codec {
        /// The saga.
        id: SagaId,
        /// What was wrong.
        source: CodecError,
    },
    /// NATS failed.
    #[error("saga {id}: NATS error: {source}")]
    Nats {
        /// The saga.
        id: SagaId,
        /// The error.
        source: async_nats::Error,
    },
}

/// Reads and writes saga state records.
#[derive(Debug, Clone)]
pub struct StateStore {
    js: jetstream::Context,
    stream: jetstream::stream::Stream<()>,
    codec: Codec,
    finished_retention: Duration,
}

impl StateStore {
    /// Opens the store (the stream must exist: see [`crate::provision()`]).
    pub async fn open(
        js: jetstream::Context,
        codec: Codec,
        finished_retention: Duration,
    ) -> Result<StateStore, async_nats::Error> {
        let stream = js.get_stream_no_info(subjects::STATE_STREAM).await?;
        Ok(StateStore { js, stream, codec, finished_retention })
    }

    /// The saga's latest record, if it exists.
    pub async fn load(&self, id: &SagaId) -> Result<Option<Versioned>, StoreError> {
        let msg = match self.stream.direct_get_last_for_subject(subjects::state(id)).await {
            Ok(msg) => msg,
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(StoreError::Nats { id: id.clone(), source: e.into() }),
        };
        if msg.payload.is_empty() {
            // A deletion marker.
            return Ok(None);
        }
        let record: StateRecord = self
            .codec
            .decode_value("saga state", &msg.payload)
            .map_err(|source| StoreError::Codec { id: id.clone(), source })?;
        Ok(Some(Versioned { record, seq: msg.sequence }))
    }

    /// Writes the saga's record if its latest sequence is still `expected` (0: the saga must
    /// not exist). A finished saga's record gets the retention as its time to live; a live
    /// saga's record never expires. Returns the new sequence.
    pub async fn save(&self, record: &StateRecord, expected: u64) -> Result<u64, StoreError> {
        let id = &record.state.id;
        let payload = self
            .codec
            .encode_value("saga state", record)
            .map_err(|source| StoreError::Codec { id: id.clone(), source })?;
        let mut msg = PublishMessage::build()
            .expected_last_subject_sequence(expected)
            .header(headers::SAGA_ID, id.as_str())
            .payload(Bytes::from(payload));
        if record.state.status.is_terminal() {
            msg = msg.ttl(self.finished_retention);
        }
        let ack = self
            .js
            .send_publish(subjects::state(id), msg)
            .await
            .map_err(|e| StoreError::Nats { id: id.clone(), source: e.into() })?
            .await;
        match ack {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                Err(StoreError::Conflict { id: id.clone(), expected })
            }
            Err(e) => Err(StoreError::Nats { id: id.clone(), source: e.into() }),
        }
    }

    /// The ids of every stored saga (live, and finished within the retention).
    pub async fn ids(&self) -> Result<Vec<SagaId>, async_nats::Error> {
        use futures::TryStreamExt;
        let stream = self.stream.clone();
        let mut info = stream.info_with_subjects("saga.state.>").await?;
        let mut ids = Vec::new();
        while let Some((subject, _count)) = info.try_next().await? {
            if let Some(id) = subject.strip_prefix("saga.state.") {
                ids.push(SagaId::new_unchecked(id));
            }
        }
        ids.sort();
        Ok(ids)
    }
}

/// A registry error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// No definition has that name.
    #[error("no saga definition named {name:?} is registered")]
    UnknownSaga {
        /// The name.
        name: String,
    },
    /// No definition has that digest.
    #[error("saga definition {name:?} version {digest} is not registered")]
    UnknownVersion {
        /// The saga name.
        name: String,
        /// The digest.
        digest: String,
    },
    /// The definition is invalid.
    #[error(transparent)]
    Invalid(#[from] saga_core::ValidationError),
    /// NATS failed.
    #[error("definition registry: {0}")]
    Nats(async_nats::Error),
}

/// Saga definitions, stored in a key-value bucket under `<name>` (the latest digest) and
/// `<name>.<digest>` (the definition, as JSON), with a local cache of validated plans.
///
/// Which digest is the latest is cached for [`LATEST_TTL`]: a version registered elsewhere is
/// started by this process at most that long after it was registered (sagas keep the version
/// they started with either way).
#[derive(Debug, Clone)]
pub struct Registry {
    kv: jetstream::kv::Store,
    plans: Arc<RwLock<HashMap<String, Arc<Plan>>>>,
    latest: Arc<RwLock<HashMap<String, LatestRead>>>,
}

/// A latest plan, and when it was read.
type LatestRead = (Arc<Plan>, std::time::Instant);

/// How long [`Registry::latest`] trusts the latest digest it last read.
pub const LATEST_TTL: std::time::Duration = std::time::Duration::from_secs(2);

impl Registry {
    /// Opens the registry (the bucket must exist: see [`crate::provision()`]).
    pub async fn open(js: &jetstream::Context) -> Result<Registry, RegistryError> {
        let kv = js
            .get_key_value(subjects::DEFINITIONS_BUCKET)
            .await
            .map_err(|e| RegistryError::Nats(e.into()))?;
        Ok(Registry { kv, plans: Arc::default(), latest: Arc::default() })
    }

    /// Validates and stores a definition, making it the latest version of its name. Returns
    /// its plan.
    pub async fn register(&self, def: &SagaDefinition) -> Result<Arc<Plan>, RegistryError> {
        let plan = Arc::new(def.validate()?);
        let name = plan.name().to_string();
        let json = serde_json::to_vec(plan.definition()).expect("definitions serialize");
        self.kv
            .put(format!("{name}.{}", plan.digest()), json.into())
            .await
            .map_err(|e| RegistryError::Nats(e.into()))?;
        self.kv
            .put(name, plan.digest().to_owned().into())
            .await
            .map_err(|e| RegistryError::Nats(e.into()))?;
        self.plans.write().expect("lock").insert(plan.digest().to_owned(), plan.clone());
        self.latest
            .write()
            .expect("lock")
            .insert(plan.name().to_string(), (plan.clone(), std::time::Instant::now()));
        Ok(plan)
    }

    /// The latest version of the saga named `name`.
    pub async fn latest(&self, name: &str) -> Result<Arc<Plan>, RegistryError> {
        if let Some((plan, read)) = self.latest.read().expect("lock").get(name) {
            if read.elapsed() < LATEST_TTL {
                return Ok(plan.clone());
            }
        }
        let digest = self
            .kv
            .get(name)
            .await
            .map_err(|e| RegistryError::Nats(e.into()))?
            .ok_or_else(|| RegistryError::UnknownSaga { name: name.to_owned() })?;
        let digest = String::from_utf8_lossy(&digest).into_owned();
        let plan = self.version(&SagaName::new_unchecked(name), &digest).await?;
        self.latest
            .write()
            .expect("lock")
            .insert(name.to_owned(), (plan.clone(), std::time::Instant::now()));
        Ok(plan)
    }

    /// The version `digest` of the saga named `name`.
    pub async fn version(&self, name: &SagaName, digest: &str) -> Result<Arc<Plan>, RegistryError> {
        if let Some(plan) = self.plans.read().expect("lock").get(digest) {
            if plan.name() == name {
                return Ok(plan.clone());
            }
        }
        let unknown =
            || RegistryError::UnknownVersion { name: name.to_string(), digest: digest.to_owned() };
        let json = self
            .kv
            .get(format!("{name}.{digest}"))
            .await
            .map_err(|e| RegistryError::Nats(e.into()))?
            .ok_or_else(unknown)?;
        let def: SagaDefinition = serde_json::from_slice(&json).map_err(|_| unknown())?;
        if &def.name != name {
            return Err(unknown());
        }
        let plan = Arc::new(def.validate()?);
        self.plans.write().expect("lock").insert(digest.to_owned(), plan.clone());
        Ok(plan)
    }
}
