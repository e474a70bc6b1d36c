//! Durable saga logs (compare-and-swap fenced over each saga's log subjects) and the
//! definition registry.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use saga_core::wire::{quote, LogRecord, StartMessage};
use saga_core::{Codec, CodecError, Plan, SagaDefinition, SagaId, SagaName, TimelineEntry};

use crate::subjects::{self, headers};

/// Whether `err` (or an error it wraps) is a compare-and-swap conflict: JetStream refused a
/// write because the stream or subject has moved past the sequence the write expected, so the
/// writer should read again and decide again. A single server answers error 10071 (`wrong last
/// sequence: N`), which async-nats reports as `PublishErrorKind::WrongLastSequence` (and a
/// key-value update as `UpdateErrorKind::WrongLastRevision`); a clustered stream answers 10164
/// (`wrong last sequence`), which async-nats reports as an "other" error. Both are conflicts,
/// not NATS failures.
pub fn is_conflict(err: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::ErrorCode;
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(js) = e.downcast_ref::<jetstream::Error>() {
            return matches!(
                js.error_code(),
                ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                    | ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
            );
        }
        next = e.source();
    }
    false
}

/// A log record and the stream sequence it was read at (the compare-and-swap token).
#[derive(Debug, Clone)]
pub struct Versioned {
    /// The record.
    pub record: LogRecord,
    /// Its sequence in the log stream.
    pub seq: u64,
    /// When the stream stored it.
    pub written: saga_core::Timestamp,
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

/// One page of a saga's timeline.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TimelinePage {
    /// The entries, oldest first.
    pub entries: Vec<TimelineEntry>,
    /// Pass this as `after` to read the next page; `None` when this page reached the end.
    pub next: Option<u64>,
    /// The log records the page spans, oldest first: where each is, and the lifecycle events
    /// it published (followers consume those records).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<RecordMeta>,
}

/// Where a log record is, and the lifecycle events it published.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecordMeta {
    /// Its sequence in `SAGA_LOG`.
    pub seq: u64,
    /// Its subject (`saga.log.<id>.<saga>.<event>`).
    pub subject: String,
    /// When it was stored (ms since the epoch).
    pub at: saga_core::Timestamp,
    /// The lifecycle events it carries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<saga_core::wire::LifecycleNote>,
}

/// A durable consumer of the saga logs: a follower of lifecycle events.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Follower {
    /// Its durable name.
    pub name: String,
    /// The log subjects it consumes.
    pub filters: Vec<String>,
    /// Every record up to this `SAGA_LOG` sequence is acknowledged (consumed).
    pub acked_to: u64,
    /// Records up to this sequence were delivered to it.
    pub delivered_to: u64,
}

impl Follower {
    /// Whether it consumes the record on `subject`.
    pub fn follows(&self, subject: &str) -> bool {
        self.filters.iter().any(|f| subjects::matches(f, subject))
    }
}

/// A log append sent to the server and not acknowledged yet ([`SagaLog::send`]).
pub struct PendingAppend {
    ack: async_nats::jetstream::context::PublishAckFuture,
    id: SagaId,
    expected: u64,
}

impl PendingAppend {
    /// The new sequence once the server has stored the record; [`StoreError::Conflict`] if
    /// the saga's newest record was no longer the expected one.
    pub async fn acked(self) -> Result<u64, StoreError> {
        let PendingAppend { ack, id, expected } = self;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if is_conflict(&e) => Err(StoreError::Conflict { id, expected }),
            Err(e) => Err(StoreError::Nats { id, source: e.into() }),
        }
    }
}

/// Reads and appends saga log records, and reads pending starts.
#[derive(Debug, Clone)]
pub struct SagaLog {
    js: jetstream::Context,
    pub(crate) log: jetstream::stream::Stream<()>,
    pub(crate) inputs: jetstream::stream::Stream<()>,
    codec: Codec,
}

impl SagaLog {
    /// Opens the log (the streams must exist: see [`crate::provision()`]).
    pub async fn open(js: jetstream::Context, codec: Codec) -> Result<SagaLog, async_nats::Error> {
        let log = js.get_stream_no_info(subjects::LOG_STREAM).await?;
        let inputs = js.get_stream_no_info(subjects::INPUT_STREAM).await?;
        Ok(SagaLog { js, log, inputs, codec })
    }

    /// The saga's newest record, if it has one.
    pub async fn load(&self, id: &SagaId) -> Result<Option<Versioned>, StoreError> {
        self.load_in(id, None).await
    }

    /// The saga's newest record if it has one and is of definition `saga` (`None`: any).
    pub async fn load_in(
        &self,
        id: &SagaId,
        saga: Option<&SagaName>,
    ) -> Result<Option<Versioned>, StoreError> {
        let msg = match self.log.direct_get_last_for_subject(subjects::log_in(id, saga)).await {
            Ok(msg) => msg,
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(StoreError::Nats { id: id.clone(), source: e.into() }),
        };
        let record = self.decode(id, &msg.payload)?;
        let written = crate::deliver::millis(msg.time);
        Ok(Some(Versioned { record, seq: msg.sequence, written }))
    }

    /// The codec records are read with.
    pub(crate) fn codec(&self) -> &Codec {
        &self.codec
    }

    /// The JetStream context.
    pub(crate) fn js(&self) -> &jetstream::Context {
        &self.js
    }

    pub(crate) fn decode(&self, id: &SagaId, bytes: &[u8]) -> Result<LogRecord, StoreError> {
        let record: LogRecord = self
            .codec
            .decode(bytes)
            .map_err(|source| StoreError::Codec { id: id.clone(), source })?;
        if &record.snapshot.id != id {
            let source = CodecError::BadField {
                what: "saga log record",
                field: "snapshot.id",
                value: quote(record.snapshot.id.as_str()),
                problem: format!("is not the saga whose log holds it ({id})"),
            };
            return Err(StoreError::Codec { id: id.clone(), source });
        }
        Ok(record)
    }

    /// Appends a record if the saga's newest log sequence is still `expected` (0: the saga
    /// has no record yet). Returns the new sequence.
    pub async fn append(&self, record: &LogRecord, expected: u64) -> Result<u64, StoreError> {
        self.send(record, expected).await?.acked().await
    }

    /// Sends the append of [`SagaLog::append`] without waiting for the server's answer, so
    /// that a caller can send other sagas' records meanwhile; [`PendingAppend::acked`] waits.
    pub async fn send(
        &self,
        record: &LogRecord,
        expected: u64,
    ) -> Result<PendingAppend, StoreError> {
        let snap = &record.snapshot;
        let id = &snap.id;
        let payload = self
            .codec
            .encode(record)
            .map_err(|source| StoreError::Codec { id: id.clone(), source })?;
        let msg = PublishMessage::build()
            .expected_last_subject_sequence(expected)
            .header(headers::EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT, subjects::log_of(id).as_str())
            .payload(Bytes::from(payload));
        let subject = subjects::log(id, &snap.saga, record.headline());
        let ack = self
            .js
            .send_publish(subject, msg)
            .await
            .map_err(|e| StoreError::Nats { id: id.clone(), source: e.into() })?;
        Ok(PendingAppend { ack, id: id.clone(), expected })
    }

    /// The durable consumers of the saga logs whose subjects overlap those of definition
    /// `saga`'s sagas (`saga.log.*.<saga>.*`), with how far each has consumed.
    pub async fn followers(&self, saga: &SagaName) -> Result<Vec<Follower>, StoreError> {
        use futures::TryStreamExt;
        let err =
            |e: async_nats::Error| StoreError::Nats { id: SagaId::from(saga.as_str()), source: e };
        let sagas = format!("saga.log.*.{saga}.*");
        let mut consumers = self.log.consumers();
        let mut out = Vec::new();
        while let Some(info) = consumers.try_next().await.map_err(|e| err(e.into()))? {
            let Some(name) = info.config.durable_name.clone() else { continue };
            let mut filters = info.config.filter_subjects.clone();
            if !info.config.filter_subject.is_empty() {
                filters.push(info.config.filter_subject.clone());
            }
            if filters.is_empty() {
                filters.push("saga.log.>".into());
            }
            if filters.iter().any(|f| subjects::overlap(f, &sagas)) {
                out.push(Follower {
                    name,
                    filters,
                    acked_to: info.ack_floor.stream_sequence,
                    delivered_to: info.delivered.stream_sequence,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The saga's start, while it is waiting in the input stream (from the moment it is
    /// accepted until the saga ends). Only a start of definition `saga` counts, unless
    /// `saga` is `None`.
    pub async fn pending_start(
        &self,
        id: &SagaId,
        saga: Option<&SagaName>,
    ) -> Result<Option<StartMessage>, StoreError> {
        let subject = subjects::starts_of(id, saga);
        let msg = match self.inputs.direct_get_last_for_subject(subject).await {
            Ok(msg) => msg,
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(StoreError::Nats { id: id.clone(), source: e.into() }),
        };
        let start: StartMessage = self
            .codec
            .decode(&msg.payload)
            .map_err(|source| StoreError::Codec { id: id.clone(), source })?;
        Ok((&start.saga_id == id).then_some(start))
    }

    /// Up to `max` records of the saga's log after sequence `after` (0: from the start), as
    /// one page of its timeline.
    pub async fn timeline(
        &self,
        id: &SagaId,
        after: u64,
        max: usize,
    ) -> Result<TimelinePage, StoreError> {
        let mut page = TimelinePage::default();
        let mut seq = after;
        for _ in 0..max.max(1) {
            let msg = match self
                .log
                .direct_get_next_for_subject(subjects::log_of(id), Some(seq + 1))
                .await
            {
                Ok(msg) => msg,
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                    return Ok(page)
                }
                Err(e) => return Err(StoreError::Nats { id: id.clone(), source: e.into() }),
            };
            seq = msg.sequence;
            let record = self.decode(id, &msg.payload)?;
            page.entries.extend(record.timeline);
            page.records.push(RecordMeta {
                seq,
                subject: msg.subject.to_string(),
                at: crate::deliver::millis(msg.time),
                events: record.events,
            });
        }
        page.next = Some(seq);
        Ok(page)
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
    /// The stored definition does not match the digest it is stored under.
    #[error("saga definition {name:?} stored under version {digest} does not match it (its digest is {actual}): refused; register the definition again")]
    Tampered {
        /// The saga name.
        name: String,
        /// The digest it is stored under.
        digest: String,
        /// The digest of what is stored.
        actual: String,
    },
    /// The definition is invalid.
    #[error(transparent)]
    Invalid(#[from] saga_core::ValidationError),
    /// NATS failed.
    #[error("definition registry: {0}")]
    Nats(async_nats::Error),
}

/// Saga definitions, stored in a key-value bucket under `<name>` (the latest digest) and
/// `<name>.<digest>` (the canonical definition, as JSON), with a local cache of validated
/// plans. A definition read back is refused unless its digest is the one it is stored under.
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
        let kv = js.get_key_value(subjects::DEFINITIONS_BUCKET).await.map_err(|e| {
            let bucket = subjects::DEFINITIONS_BUCKET;
            let what = format!("opening the bucket {bucket}");
            RegistryError::Nats(crate::connect::explain(&what, bucket, e).into())
        })?;
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

    /// Every registered definition name, sorted (from the bucket's subject index: no entry is
    /// read).
    pub async fn names(&self) -> Result<Vec<SagaName>, RegistryError> {
        let mut names: Vec<SagaName> = self
            .keys(&format!("$KV.{}.*", subjects::DEFINITIONS_BUCKET))
            .await?
            .into_iter()
            .filter_map(|key| SagaName::new(&key).ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// The digests of every registered version of the saga named `name`, sorted.
    pub async fn digests(&self, name: &SagaName) -> Result<Vec<String>, RegistryError> {
        let prefix = format!("{name}.");
        let mut digests: Vec<String> = self
            .keys(&format!("$KV.{}.{name}.*", subjects::DEFINITIONS_BUCKET))
            .await?
            .into_iter()
            .filter_map(|key| key.strip_prefix(&prefix).map(str::to_owned))
            .collect();
        digests.sort();
        Ok(digests)
    }

    /// The keys of the bucket whose subjects match `filter`.
    async fn keys(&self, filter: &str) -> Result<Vec<String>, RegistryError> {
        use futures::TryStreamExt;
        let bucket_prefix = format!("$KV.{}.", subjects::DEFINITIONS_BUCKET);
        let mut info = self
            .kv
            .stream
            .clone()
            .info_with_subjects(filter)
            .await
            .map_err(|e| RegistryError::Nats(e.into()))?;
        let mut keys = Vec::new();
        while let Some((subject, _)) =
            info.try_next().await.map_err(|e| RegistryError::Nats(e.into()))?
        {
            if let Some(key) = subject.strip_prefix(&bucket_prefix) {
                keys.push(key.to_owned());
            }
        }
        Ok(keys)
    }

    /// The latest version of the saga named `name`.
    pub async fn latest(&self, name: &str) -> Result<Arc<Plan>, RegistryError> {
        if let Some((plan, read)) = self.latest.read().expect("lock").get(name) {
            if read.elapsed() < LATEST_TTL {
                return Ok(plan.clone());
            }
        }
        let unknown = || RegistryError::UnknownSaga { name: quote(name) };
        let saga = SagaName::new(name).map_err(|_| unknown())?;
        let digest = self
            .kv
            .get(name)
            .await
            .map_err(|e| RegistryError::Nats(e.into()))?
            .ok_or_else(unknown)?;
        let digest = String::from_utf8_lossy(&digest).into_owned();
        let plan = self.version(&saga, &digest).await?;
        self.latest
            .write()
            .expect("lock")
            .insert(name.to_owned(), (plan.clone(), std::time::Instant::now()));
        Ok(plan)
    }

    /// The version `digest` of the saga named `name`, checked against its digest.
    pub async fn version(&self, name: &SagaName, digest: &str) -> Result<Arc<Plan>, RegistryError> {
        if let Some(plan) = self.plans.read().expect("lock").get(digest) {
            if plan.name() == name {
                return Ok(plan.clone());
            }
        }
        let unknown =
            || RegistryError::UnknownVersion { name: quote(name.as_str()), digest: quote(digest) };
        if name.check().is_err() || saga_core::check_token(digest).is_err() {
            return Err(unknown());
        }
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
        if plan.digest() != digest {
            return Err(RegistryError::Tampered {
                name: name.to_string(),
                digest: digest.to_owned(),
                actual: plan.digest().to_owned(),
            });
        }
        self.plans.write().expect("lock").insert(digest.to_owned(), plan.clone());
        Ok(plan)
    }
}
