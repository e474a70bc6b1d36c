//! The saga client: register definitions, start sagas, wait for them, inspect and list them,
//! cancel them, and act on sagas that need intervention.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::StreamExt;
use saga_core::wire::{quote, OperatorAction, OperatorMessage, StartMessage, PROTOCOL_VERSION};
use saga_core::{
    Codec, Payload, Plan, SagaDefinition, SagaId, SagaName, SagaSnapshot, SagaStatus, StepStatus,
    TimelineEntry,
};
use serde::Serialize;

use crate::store::{Registry, RegistryError, SagaLog, TimelinePage};
use crate::subjects::{self, headers};

/// The kinds of [`SagaClientError`], for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// No definition has that name.
    UnknownSaga,
    /// The definition is invalid, or the stored one does not match its digest.
    InvalidDefinition,
    /// The input could not be encoded, or is too large.
    InvalidInput,
    /// No saga has that id.
    NotFound,
    /// A saga with that id (or idempotency key) exists with another definition or input.
    Conflict,
    /// The saga is not in a status where the action applies.
    NotApplicable,
    /// The wait ran out of time.
    TimedOut,
    /// The request was malformed (the admin service answered 400).
    BadRequest,
    /// NATS failed.
    Nats,
}

/// A client operation failed. [`SagaClientError::kind`] tells which way.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SagaClientError {
    kind: ErrorKind,
    message: String,
}

impl SagaClientError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        SagaClientError { kind, message: message.into() }
    }

    fn nats(e: impl std::fmt::Display) -> Self {
        SagaClientError::new(ErrorKind::Nats, format!("NATS error: {e}"))
    }

    /// Which way it failed.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl From<RegistryError> for SagaClientError {
    fn from(e: RegistryError) -> Self {
        let kind = match &e {
            RegistryError::UnknownSaga { .. } | RegistryError::UnknownVersion { .. } => {
                ErrorKind::UnknownSaga
            }
            RegistryError::Invalid(_) | RegistryError::Tampered { .. } => {
                ErrorKind::InvalidDefinition
            }
            _ => ErrorKind::Nats,
        };
        SagaClientError::new(kind, e.to_string())
    }
}

/// A saga as the client shows it: its snapshot (status, steps, outputs).
#[derive(Debug, Clone, PartialEq)]
pub struct SagaView {
    /// The saga's state.
    pub snapshot: SagaSnapshot,
    /// Whether any transition of it is logged yet (`false`: accepted, and its first step is
    /// under way).
    pub logged: bool,
}

impl SagaView {
    /// The saga's id.
    pub fn id(&self) -> &SagaId {
        &self.snapshot.id
    }

    /// Its definition's name.
    pub fn saga(&self) -> &SagaName {
        &self.snapshot.saga
    }

    /// Its status.
    pub fn status(&self) -> SagaStatus {
        self.snapshot.status
    }

    /// The status of step `step`, if the saga has it.
    pub fn step_status(&self, step: &str) -> Option<StepStatus> {
        self.snapshot.steps.iter().find(|s| s.name.as_str() == step).map(|s| s.status)
    }

    /// The output of step `step`, decoded, if it succeeded.
    pub fn output<O: serde::de::DeserializeOwned>(
        &self,
        step: &str,
    ) -> Option<Result<O, rmp_serde::decode::Error>> {
        self.snapshot
            .steps
            .iter()
            .find(|s| s.name.as_str() == step)
            .and_then(|s| s.output.as_ref())
            .map(|o| saga_core::wire::decode_nested(o.as_bytes()))
    }

    /// The saga's input, decoded.
    pub fn input<I: serde::de::DeserializeOwned>(&self) -> Result<I, rmp_serde::decode::Error> {
        saga_core::wire::decode_nested(self.snapshot.input.as_bytes())
    }
}

/// The value of header `name` of `msg`, if it has one.
fn header(msg: &async_nats::Message, name: &str) -> Option<String> {
    msg.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned())
}

/// Starts, follows and manages sagas. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SagaClient {
    client: async_nats::Client,
    js: jetstream::Context,
    registry: Registry,
    log: SagaLog,
    codec: Codec,
    operator: String,
    scope: Arc<[SagaName]>,
}

/// How long an operator action waits for the coordinator's verdict.
const VERDICT_WAIT: Duration = Duration::from_secs(10);

/// A coordinator's answer to an operator action (docs/PROTOCOL.md §11).
#[derive(serde::Deserialize)]
struct Verdict {
    applied: bool,
    #[serde(default)]
    reason: Option<String>,
}

impl SagaClient {
    /// Connects to the saga streams (a coordinator, or [`crate::provision()`], must have created
    /// them).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use saga_nats::SagaClient;
    /// use std::time::Duration;
    ///
    /// let nats = async_nats::connect("nats://127.0.0.1:4222").await?;
    /// let client = SagaClient::new(nats).await?;
    /// let id = client.start_with_key("place-order", "order-42", &serde_json::json!({"order": 42})).await?;
    /// let saga = client.wait(&id, Duration::from_secs(30)).await?;
    /// println!("{} ended {}", id, saga.status());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn new(client: async_nats::Client) -> Result<SagaClient, SagaClientError> {
        let js = jetstream::new(client.clone());
        let registry = Registry::open(&js).await?;
        let codec = Codec::default();
        let log = SagaLog::open(js.clone(), codec).await.map_err(SagaClientError::nats)?;
        let operator = std::env::var("USER")
            .ok()
            .filter(|u| saga_core::check_token(u).is_ok())
            .unwrap_or_else(|| "anonymous".into());
        Ok(SagaClient { client, js, registry, log, codec, operator, scope: Arc::new([]) })
    }

    /// Names the operator of this client's cancellations and operator actions (a token:
    /// letters, digits, `_` and `-`; default: the `USER` environment variable, or
    /// `anonymous`). The name travels in the subject (`saga.in.<id>.<saga>.op.<operator>`):
    /// with the permissions `saga-coordinator permissions` writes, an operator's NATS user
    /// may publish only under its own name, and that is the name the history records.
    pub fn with_operator(mut self, name: impl Into<String>) -> Self {
        self.operator = name.into();
        self
    }

    /// Reads only sagas of these definitions, on the subjects that name them
    /// (`saga.log.<id>.<saga>.*`): what a starter's NATS permissions allow. Without it the
    /// client reads any saga (`saga.log.<id>.>`), as an operator's permissions allow.
    ///
    /// Timelines are then read through the coordinator's admin service, on subjects that
    /// name the definition (`saga.admin.timeline.<saga>`); [`SagaClient::list`] reads every
    /// saga: it is for operators.
    pub fn only<I, S>(mut self, sagas: I) -> Result<Self, SagaClientError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut names = Vec::new();
        for saga in sagas {
            let saga = saga.as_ref();
            names.push(SagaName::new(saga).map_err(|e| {
                SagaClientError::new(
                    ErrorKind::UnknownSaga,
                    format!("{} is not a saga name: it {e}", quote(saga)),
                )
            })?);
        }
        self.scope = names.into();
        Ok(self)
    }

    /// The definitions whose sagas this client reads: the scope, or every one (`None`).
    fn scope(&self) -> Vec<Option<&SagaName>> {
        if self.scope.is_empty() {
            vec![None]
        } else {
            self.scope.iter().map(Some).collect()
        }
    }

    /// Registers a definition (validated first), making it the latest version of its name.
    /// Returns its digest. Sagas already running keep the version they started with.
    pub async fn register(&self, def: &SagaDefinition) -> Result<String, SagaClientError> {
        Ok(self.registry.register(def).await?.digest().to_owned())
    }

    /// The latest registered version of definition `saga`; an error of kind
    /// [`ErrorKind::UnknownSaga`] if none is registered (yet).
    pub async fn definition(&self, saga: &str) -> Result<Arc<Plan>, SagaClientError> {
        Ok(self.registry.latest(saga).await?)
    }

    /// Starts a saga of the latest version of definition `saga` with `input`. Returns once
    /// the start is durably recorded.
    pub async fn start<T: Serialize + ?Sized>(
        &self,
        saga: &str,
        input: &T,
    ) -> Result<SagaId, SagaClientError> {
        let key = uuid::Uuid::now_v7().simple().to_string();
        self.start_as(saga, key, false, input).await
    }

    /// Starts a saga with an idempotency key: the same definition name and key always give
    /// the same saga id, and a second start with them starts nothing new (within the
    /// retention of finished sagas).
    pub async fn start_with_key<T: Serialize + ?Sized>(
        &self,
        saga: &str,
        key: &str,
        input: &T,
    ) -> Result<SagaId, SagaClientError> {
        self.start_as(saga, key.to_owned(), true, input).await
    }

    /// The id [`SagaClient::start_with_key`] gives the saga of definition `saga` started with
    /// `key`: a service can find its saga again from its own key (an order id, say).
    ///
    /// ```
    /// use saga_nats::SagaClient;
    ///
    /// let id = SagaClient::id_for_key("place-order", "order-42");
    /// assert_eq!(id, SagaClient::id_for_key("place-order", "order-42"));
    /// assert_ne!(id, SagaClient::id_for_key("place-order", "order-43"));
    /// ```
    pub fn id_for_key(saga: &str, key: &str) -> SagaId {
        SagaId::for_key(&SagaName::from(saga), key)
    }

    async fn start_as<T: Serialize + ?Sized>(
        &self,
        saga: &str,
        key: String,
        keyed: bool,
        input: &T,
    ) -> Result<SagaId, SagaClientError> {
        if key.is_empty() || key.len() > saga_core::wire::MAX_KEY_LEN {
            return Err(SagaClientError::new(
                ErrorKind::InvalidInput,
                format!(
                    "saga {saga:?}: an idempotency key must be 1 to {} bytes long",
                    saga_core::wire::MAX_KEY_LEN
                ),
            ));
        }
        let plan = self.registry.latest(saga).await?;
        let id = SagaId::for_key(plan.name(), &key);
        let input = rmp_serde::to_vec_named(input).map_err(|e| {
            SagaClientError::new(
                ErrorKind::InvalidInput,
                format!("saga {saga:?}: input does not encode: {e}"),
            )
        })?;
        // The input travels in the saga's record and in every command: keep room for them.
        let limit = self.codec.max_size / 4;
        if input.len() > limit {
            return Err(SagaClientError::new(
                ErrorKind::InvalidInput,
                format!(
                    "saga {saga:?}: input of {} bytes exceeds the limit of {limit} bytes (a quarter of the message size limit)",
                    input.len()
                ),
            ));
        }
        let input = Payload::new(input);
        if keyed {
            if let Some(existing) = self.existing(&id, &plan, &input).await? {
                return existing;
            }
        }
        let msg = StartMessage {
            v: PROTOCOL_VERSION,
            saga_id: id.clone(),
            saga: plan.name().clone(),
            digest: plan.digest().to_owned(),
            input: input.clone(),
            key,
        };
        let payload = self.codec.encode(&msg).map_err(|e| {
            SagaClientError::new(ErrorKind::InvalidInput, format!("saga {saga:?}: {e}"))
        })?;
        let traceparent = crate::telemetry::new_traceparent();
        let mut publish = PublishMessage::build();
        // A fresh id cannot be a duplicate: only a keyed start pays for deduplication.
        if keyed {
            publish = publish.message_id(format!("start.{id}").as_str());
        }
        let publish = publish
            .expected_last_subject_sequence(0)
            .header(headers::SAGA_ID, id.as_str())
            .header(headers::TRACEPARENT, traceparent.as_str())
            .payload(Bytes::from(payload));
        let ack = self
            .js
            .send_publish(subjects::start(&id, plan.name()), publish)
            .await
            .map_err(SagaClientError::nats)?
            .await;
        match ack {
            Ok(ack) if !ack.duplicate => Ok(id),
            // A start with this id is already waiting (or was just accepted): it is the same
            // saga only if it has the same input.
            Ok(_) => self.existing(&id, &plan, &input).await?.unwrap_or(Ok(id)),
            Err(e) if crate::store::is_conflict(&e) => {
                self.existing(&id, &plan, &input).await?.unwrap_or(Ok(id))
            }
            Err(e) => Err(SagaClientError::nats(e)),
        }
    }

    /// If saga `id` exists: `Ok(id)` when it has this definition and input, a
    /// [`ErrorKind::Conflict`] error when not.
    async fn existing(
        &self,
        id: &SagaId,
        plan: &Plan,
        input: &Payload,
    ) -> Result<Option<Result<SagaId, SagaClientError>>, SagaClientError> {
        let Some(view) = self.get(id).await? else { return Ok(None) };
        let snap = &view.snapshot;
        if snap.saga == *plan.name() && snap.input == *input {
            return Ok(Some(Ok(id.clone())));
        }
        Ok(Some(Err(SagaClientError::new(
            ErrorKind::Conflict,
            format!(
                "saga {id} ({}) already exists with {}: a start with the same idempotency key and other input is refused",
                snap.saga,
                if snap.saga != *plan.name() { "another definition" } else { "another input" }
            ),
        ))))
    }

    /// The saga's snapshot, or `None` if no saga has that id (or it finished and expired).
    pub async fn get(&self, id: &SagaId) -> Result<Option<SagaView>, SagaClientError> {
        for saga in self.scope() {
            if let Some(v) = self.log.load_in(id, saga).await.map_err(SagaClientError::nats)? {
                return Ok(Some(SagaView { snapshot: v.record.snapshot, logged: true }));
            }
        }
        // Accepted but not logged yet: its first step is under way.
        let mut pending = None;
        for saga in self.scope() {
            pending = self.log.pending_start(id, saga).await.map_err(SagaClientError::nats)?;
            if pending.is_some() {
                break;
            }
        }
        let Some(start) = pending else {
            return Ok(None);
        };
        let plan = self.registry.version(&start.saga, &start.digest).await?;
        Ok(Some(SagaView { snapshot: crate::admin::begun(id, &plan, start), logged: false }))
    }

    /// The saga's whole timeline, oldest first.
    pub async fn timeline(&self, id: &SagaId) -> Result<Vec<TimelineEntry>, SagaClientError> {
        Ok(self.whole_timeline(id).await?.entries)
    }

    /// The saga's whole timeline and the log records it spans (where each is, and which
    /// lifecycle events it published), every page read.
    pub async fn whole_timeline(&self, id: &SagaId) -> Result<TimelinePage, SagaClientError> {
        let mut whole = TimelinePage::default();
        let mut after = 0;
        loop {
            let page = self.timeline_page(id, after, 64).await?;
            whole.entries.extend(page.entries);
            whole.records.extend(page.records);
            match page.next {
                Some(next) => after = next,
                None => return Ok(whole),
            }
        }
    }

    /// One page of the saga's timeline: the entries of up to `records` log records after log
    /// sequence `after` (0: from the beginning).
    pub async fn timeline_page(
        &self,
        id: &SagaId,
        after: u64,
        records: usize,
    ) -> Result<TimelinePage, SagaClientError> {
        if self.scope.is_empty() {
            return self.log.timeline(id, after, records).await.map_err(SagaClientError::nats);
        }
        // Confined to some definitions: ask the admin service, on subjects that name them.
        let request = crate::admin::TimelineRequest {
            id: id.clone(),
            after,
            records: records.clamp(1, crate::admin::MAX_PAGE_RECORDS),
        };
        for saga in self.scope.iter() {
            if let Some(page) = self.admin("timeline", saga, &request).await? {
                return Ok(page);
            }
        }
        Err(SagaClientError::new(ErrorKind::NotFound, format!("no saga with id {id}")))
    }

    /// Asks the coordinator's admin service (`saga.admin.<endpoint>.<saga>`); `None` when it
    /// answers 404. A busy service (503) is asked again, after a growing pause, for up to
    /// 30 s.
    async fn admin<Q: Serialize, A: serde::de::DeserializeOwned>(
        &self,
        endpoint: &str,
        saga: &SagaName,
        request: &Q,
    ) -> Result<Option<A>, SagaClientError> {
        self.admin_at(crate::admin::subject(endpoint, saga), request).await
    }

    /// Asks the admin service on `subject`; as [`SagaClient::admin`].
    async fn admin_at<Q: Serialize, A: serde::de::DeserializeOwned>(
        &self,
        subject: String,
        request: &Q,
    ) -> Result<Option<A>, SagaClientError> {
        let body = bytes::Bytes::from(serde_json::to_vec(request).expect("a request encodes"));
        let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut pause = Duration::from_millis(10);
        loop {
            let answer = self.client.request(subject.clone(), body.clone()).await.map_err(|e| {
                SagaClientError::nats(format!("the admin service ({subject}): {e}"))
            })?;
            let code = header(&answer, "Nats-Service-Error-Code");
            match code.as_deref() {
                None => {
                    return serde_json::from_slice(&answer.payload).map(Some).map_err(|e| {
                        SagaClientError::nats(format!("the admin service's answer: {e}"))
                    })
                }
                Some("404") => return Ok(None),
                Some("503") if tokio::time::Instant::now() + pause < give_up => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Some(code) => {
                    let why = header(&answer, "Nats-Service-Error").unwrap_or_default();
                    let kind = match code {
                        "400" => ErrorKind::BadRequest,
                        "409" => ErrorKind::NotApplicable,
                        _ => ErrorKind::Nats,
                    };
                    return Err(SagaClientError::new(
                        kind,
                        format!("the admin service refused ({code}): {why}"),
                    ));
                }
            }
        }
    }

    /// Waits until the saga ends (or needs intervention), up to `timeout`.
    pub async fn wait(&self, id: &SagaId, timeout: Duration) -> Result<SagaView, SagaClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut subscriptions = Vec::new();
        for saga in self.scope() {
            let filter = subjects::log_in(id, saga);
            subscriptions.push(self.client.subscribe(filter).await.map_err(SagaClientError::nats)?);
        }
        let mut events = futures::stream::select_all(subscriptions);
        loop {
            if let Some(view) = self.get(id).await? {
                if view.status().is_terminal() || view.status() == SagaStatus::NeedsIntervention {
                    return Ok(view);
                }
            }
            // Woken by the saga's next lifecycle event, or look again after a while.
            let nap = tokio::time::Instant::now() + Duration::from_millis(500);
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(SagaClientError::new(ErrorKind::TimedOut, format!("saga {id} did not finish within {timeout:?}")));
                }
                _ = tokio::time::sleep_until(nap) => {}
                _ = events.next() => {}
            }
        }
    }

    /// One page of the sagas of definition `saga` that `request` asks for (live ones by
    /// default), from the coordinator's admin service: pass the page's `next` as the next
    /// request's `cursor`. The listing reads the streams' subject index, not every saga
    /// (`saga_nats::index`).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: saga_nats::SagaClient) -> Result<(), saga_nats::SagaClientError> {
    /// use saga_nats::index::{ListRequest, Which};
    /// use saga_core::SagaStatus;
    ///
    /// let mut request = ListRequest { status: Which::Status(SagaStatus::NeedsIntervention), ..Default::default() };
    /// loop {
    ///     let page = client.list("place-order", &request).await?;
    ///     for saga in &page.sagas {
    ///         println!("{} parked at {:?}: {:?}", saga.id, saga.step, saga.reason);
    ///     }
    ///     match page.next {
    ///         Some(next) => request.cursor = Some(next),
    ///         None => break,
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn list(
        &self,
        saga: &str,
        request: &crate::index::ListRequest,
    ) -> Result<crate::index::ListPage, SagaClientError> {
        let name = self.named(saga)?;
        Ok(self.admin("list", &name, request).await?.unwrap_or_default())
    }

    /// Counts of definition `saga`'s sagas (in flight, oldest in flight, parked, finished by
    /// status, dead letters), from the coordinator's admin service.
    pub async fn stats(&self, saga: &str) -> Result<crate::index::SagaCounts, SagaClientError> {
        let name = self.named(saga)?;
        Ok(self.admin("stats", &name, &serde_json::json!({})).await?.unwrap_or_default())
    }

    /// Every registered definition name, sorted.
    pub async fn definition_names(&self) -> Result<Vec<SagaName>, SagaClientError> {
        Ok(self.registry.names().await?)
    }

    /// Every registered version of definition `saga`, its latest digest, and how many live
    /// sagas run each version, from the coordinator's admin service.
    pub async fn definitions(
        &self,
        saga: &str,
    ) -> Result<crate::admin::Definitions, SagaClientError> {
        let name = self.named(saga)?;
        self.admin("defs", &name, &serde_json::json!({})).await?.ok_or_else(|| {
            SagaClientError::new(
                ErrorKind::UnknownSaga,
                format!("no saga definition named {saga} is registered"),
            )
        })
    }

    /// The followers of definition `saga`'s lifecycle events (durable consumers of its sagas'
    /// logs) and how far each has consumed: a log record at sequence `seq` (see
    /// [`TimelinePage::records`]) is consumed by a follower whose `acked_to >= seq`.
    pub async fn followers(
        &self,
        saga: &str,
    ) -> Result<Vec<crate::store::Follower>, SagaClientError> {
        let name = self.named(saga)?;
        Ok(self.admin("followers", &name, &serde_json::json!({})).await?.unwrap_or_default())
    }

    /// The domain events tagged with saga `id` (published with
    /// [`crate::follow::publish_saga_event`]) during its life, from the admin service.
    pub async fn domain_events(
        &self,
        saga: &str,
        id: &SagaId,
    ) -> Result<crate::index::SagaDomainEvents, SagaClientError> {
        let name = self.named(saga)?;
        let request = crate::admin::GetRequest { id: id.clone() };
        self.admin("domain", &name, &request).await?.ok_or_else(|| {
            SagaClientError::new(ErrorKind::NotFound, format!("no saga {id} of definition {saga}"))
        })
    }

    /// One page of dead letters (every component's, or one's), oldest first.
    pub async fn dead_letters(
        &self,
        request: &crate::dlq::DlqListRequest,
    ) -> Result<crate::dlq::DlqPage, SagaClientError> {
        Ok(self.admin_at("saga.admin.dlq.list".into(), request).await?.unwrap_or_default())
    }

    /// One dead letter, with its body.
    pub async fn dead_letter(&self, seq: u64) -> Result<crate::dlq::DeadLetter, SagaClientError> {
        self.dlq_op("show", seq).await
    }

    /// Publishes a dead-lettered start or operator action again (then discards the dead
    /// letter). Refused, with the reason, for anything else.
    pub async fn redrive(&self, seq: u64) -> Result<crate::dlq::Redriven, SagaClientError> {
        self.dlq_op("redrive", seq).await
    }

    /// Deletes a dead letter.
    pub async fn discard(&self, seq: u64) -> Result<(), SagaClientError> {
        self.dlq_op::<serde_json::Value>("discard", seq).await.map(drop)
    }

    async fn dlq_op<A: serde::de::DeserializeOwned>(
        &self,
        op: &str,
        seq: u64,
    ) -> Result<A, SagaClientError> {
        let subject = format!("saga.admin.dlq.{op}");
        self.admin_at(subject, &crate::dlq::DlqRef { seq }).await?.ok_or_else(|| {
            SagaClientError::new(ErrorKind::NotFound, format!("no dead letter {seq}"))
        })
    }

    fn named(&self, saga: &str) -> Result<SagaName, SagaClientError> {
        SagaName::new(saga).map_err(|e| {
            SagaClientError::new(
                ErrorKind::UnknownSaga,
                format!("{} is not a saga name: it {e}", quote(saga)),
            )
        })
    }

    /// Cancels a running saga: what is done is compensated, and it ends `cancelled`. Refused
    /// once its pivot succeeded (the coordinator logs the refusal with its reason; the saga is
    /// unchanged).
    pub async fn cancel(&self, id: &SagaId, reason: &str) -> Result<(), SagaClientError> {
        self.act(id, OperatorAction::Cancel, reason).await
    }

    /// Any operator action: [`cancel`](SagaClient::cancel) a running saga, or
    /// [`retry`](SagaClient::retry), [`skip`](SagaClient::skip) or
    /// [`resolve`](SagaClient::resolve) one in `needs_intervention`.
    pub async fn act(
        &self,
        id: &SagaId,
        action: OperatorAction,
        reason: &str,
    ) -> Result<(), SagaClientError> {
        let allowed = match action {
            OperatorAction::Cancel => SagaStatus::Running,
            OperatorAction::Retry | OperatorAction::Skip | OperatorAction::Resolve => {
                SagaStatus::NeedsIntervention
            }
        };
        self.operate(id, action, reason, &[allowed]).await
    }

    /// Operator: retries the stuck compensations of a saga in `needs_intervention`.
    pub async fn retry(&self, id: &SagaId, reason: &str) -> Result<(), SagaClientError> {
        self.act(id, OperatorAction::Retry, reason).await
    }

    /// Operator: skips the stuck compensations of a saga in `needs_intervention`.
    pub async fn skip(&self, id: &SagaId, reason: &str) -> Result<(), SagaClientError> {
        self.act(id, OperatorAction::Skip, reason).await
    }

    /// Operator: marks a saga in `needs_intervention` resolved (it ends `resolved`).
    pub async fn resolve(&self, id: &SagaId, reason: &str) -> Result<(), SagaClientError> {
        self.act(id, OperatorAction::Resolve, reason).await
    }

    /// Sends signal `name` with `payload` to saga `id`: an await step waiting for `name`
    /// completes with `payload` as its output, now or when the saga gets there (a signal is
    /// kept until the saga's log expires; a second one of the same name replaces it). Refused
    /// for an unknown saga ([`ErrorKind::NotFound`]) and a finished one
    /// ([`ErrorKind::NotApplicable`]).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run(client: saga_nats::SagaClient, id: saga_core::SagaId) -> Result<(), saga_nats::client::SagaClientError> {
    /// #[derive(serde::Serialize)]
    /// struct Approval { by: String }
    /// client.signal(&id, "approve", &Approval { by: "ann".into() }).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn signal<T: Serialize + ?Sized>(
        &self,
        id: &SagaId,
        name: &str,
        payload: &T,
    ) -> Result<(), SagaClientError> {
        saga_core::check_token(name).map_err(|e| {
            SagaClientError::new(
                ErrorKind::InvalidInput,
                format!("signal name {} {e}", quote(name)),
            )
        })?;
        let view = self.get(id).await?.ok_or_else(|| {
            SagaClientError::new(
                ErrorKind::NotFound,
                format!("no saga with id {}: signal {name} refused", quote(id.as_str())),
            )
        })?;
        if view.status().is_terminal() {
            return Err(SagaClientError::new(
                ErrorKind::NotApplicable,
                format!("saga {id} already finished as {}: signal {name} refused", view.status()),
            ));
        }
        let payload = rmp_serde::to_vec_named(payload).map_err(|e| {
            SagaClientError::new(
                ErrorKind::InvalidInput,
                format!("signal {name}: payload does not encode: {e}"),
            )
        })?;
        let msg = saga_core::wire::SignalMessage {
            v: PROTOCOL_VERSION,
            saga_id: id.clone(),
            name: name.to_owned(),
            payload: Payload::new(payload),
        };
        let body = self.codec.encode(&msg).map_err(|e| {
            SagaClientError::new(ErrorKind::InvalidInput, format!("signal {name}: {e}"))
        })?;
        self.js
            .publish(subjects::signal(id, view.saga(), name), Bytes::from(body))
            .await
            .map_err(SagaClientError::nats)?
            .await
            .map_err(SagaClientError::nats)?;
        Ok(())
    }

    async fn operate(
        &self,
        id: &SagaId,
        action: OperatorAction,
        reason: &str,
        allowed: &[SagaStatus],
    ) -> Result<(), SagaClientError> {
        let view = self.get(id).await?.ok_or_else(|| {
            SagaClientError::new(
                ErrorKind::NotFound,
                format!("no saga with id {}", quote(id.as_str())),
            )
        })?;
        if !allowed.contains(&view.status()) {
            return Err(SagaClientError::new(
                ErrorKind::NotApplicable,
                format!("cannot {} saga {id}: it is {}", action.as_str(), view.status()),
            ));
        }
        saga_core::check_token(&self.operator).map_err(|e| {
            SagaClientError::new(
                ErrorKind::InvalidInput,
                format!("operator name {} {e}", quote(&self.operator)),
            )
        })?;
        let msg = OperatorMessage {
            v: PROTOCOL_VERSION,
            saga_id: id.clone(),
            action,
            reason: reason.to_owned(),
        };
        let payload = self
            .codec
            .encode(&msg)
            .map_err(|e| SagaClientError::new(ErrorKind::InvalidInput, e.to_string()))?;
        // The coordinator that handles the action says on this inbox whether it applied.
        let inbox = self.client.new_inbox();
        let mut verdicts =
            self.client.subscribe(inbox.clone()).await.map_err(SagaClientError::nats)?;
        let publish = PublishMessage::build()
            .message_id(format!("op.{id}.{}.{}", view.snapshot.events, action.as_str()).as_str())
            .header(headers::SAGA_ID, id.as_str())
            .header(headers::VERDICT_TO, inbox.as_str())
            .payload(Bytes::from(payload));
        let accepted = self
            .js
            .send_publish(subjects::operator(id, view.saga(), &self.operator), publish)
            .await
            .map_err(SagaClientError::nats)?
            .await;
        match accepted {
            Ok(_) => {}
            Err(e) if e.to_string().contains("maximum messages per subject") => {
                return Err(SagaClientError::new(
                    ErrorKind::Conflict,
                    format!(
                        "an earlier action by {} on saga {id} is still waiting to be handled: try again once it is",
                        self.operator
                    ),
                ))
            }
            Err(e) => return Err(SagaClientError::nats(e)),
        }
        let verdict = tokio::time::timeout(VERDICT_WAIT, verdicts.next()).await;
        let Ok(Some(verdict)) = verdict else {
            return Err(SagaClientError::new(
                ErrorKind::TimedOut,
                format!(
                    "the {} of saga {id} is recorded, but no coordinator said within {} s whether it applies: it will be handled when one runs",
                    action.as_str(),
                    VERDICT_WAIT.as_secs()
                ),
            ));
        };
        let verdict: Verdict = serde_json::from_slice(&verdict.payload).map_err(|e| {
            SagaClientError::new(
                ErrorKind::Nats,
                format!("the coordinator's verdict does not decode: {e}"),
            )
        })?;
        if verdict.applied {
            return Ok(());
        }
        Err(SagaClientError::new(
            ErrorKind::NotApplicable,
            format!(
                "cannot {} saga {id}: {}",
                action.as_str(),
                verdict.reason.unwrap_or_else(|| "refused".into())
            ),
        ))
    }
}
