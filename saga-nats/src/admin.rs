//! The admin service: listings, reads, counts and dead letters for operators and tools,
//! served by the coordinator on subjects that name the saga definition, so NATS permissions
//! can confine who asks. A NATS micro service (`saga-admin`, discoverable with `nats micro
//! ls`); `sagactl` is its command line.
//!
//! | endpoint | subject | request (JSON) | answer (JSON) |
//! |---|---|---|---|
//! | `list` | `saga.admin.list.<saga>` | [`ListRequest`](crate::index::ListRequest) | [`ListPage`](crate::index::ListPage) |
//! | `get` | `saga.admin.get.<saga>` | [`GetRequest`] | [`GetAnswer`] |
//! | `timeline` | `saga.admin.timeline.<saga>` | [`TimelineRequest`] | [`TimelinePage`]: `{"entries": [...], "next": <seq> or null}` |
//! | `stats` | `saga.admin.stats.<saga>` | `{}` | [`SagaCounts`](crate::index::SagaCounts) |
//! | `defs` | `saga.admin.defs.<saga>` | `{}` | [`Definitions`] |
//! | `domain` | `saga.admin.domain.<saga>` | [`GetRequest`] | [`SagaDomainEvents`](crate::index::SagaDomainEvents): the domain events tagged with the saga's id (published with [`crate::follow::publish_saga_event`]) during its life |
//! | `followers` | `saga.admin.followers.<saga>` | `{}` | [`Follower`](crate::store::Follower)s: the durable consumers of those sagas' logs, and how far each consumed |
//! | `dlq` | `saga.admin.dlq.<list\|show\|redrive\|discard>` | [`DlqListRequest`] or [`DlqRef`] | [`DlqPage`](crate::dlq::DlqPage), [`DeadLetter`](crate::dlq::DeadLetter), [`Redriven`](crate::dlq::Redriven) |
//!
//! `$SRV.STATS` (`nats micro stats saga-admin`) carries, in each endpoint's `data`, the saga
//! counts of the replica that answers ([`crate::observe::TallyData`]: started and finished by
//! definition and status, in flight, parked), the same as its `/metrics`.
//!
//! Errors come back as the micro services convention has it: headers `Nats-Service-Error`
//! and `Nats-Service-Error-Code` (400 a bad request, 404 nothing of that name, 409 a re-drive
//! that cannot be done, 500 the streams could not be read, 503 busy).

use async_nats::service::{self, ServiceExt};
use futures::StreamExt;
use saga_core::wire::quote;
use saga_core::{SagaId, SagaName};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::dlq::{DeadLetters, DlqError, DlqListRequest, DlqRef};
use crate::store::{Registry, SagaLog, TimelinePage};
use saga_core::wire::StartMessage;

/// The admin service's name in `$SRV` discovery.
pub const SERVICE_NAME: &str = "saga-admin";

/// The most log records one timeline page may span.
pub const MAX_PAGE_RECORDS: usize = 256;

/// Requests served at once by one replica; beyond it a request is answered 503 at once, so a
/// flood of reads cannot take the coordinator's time from its sagas.
pub const MAX_CONCURRENT_REQUESTS: usize = 64;

/// The subject of endpoint `endpoint` for sagas of definition `saga`.
pub fn subject(endpoint: &str, saga: &SagaName) -> String {
    format!("saga.admin.{endpoint}.{saga}")
}

/// A request for one page of a saga's timeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimelineRequest {
    /// The saga.
    pub id: SagaId,
    /// The log sequence to read after (0: from the beginning).
    #[serde(default)]
    pub after: u64,
    /// How many log records the page may span (default 64, at most [`MAX_PAGE_RECORDS`]).
    #[serde(default = "default_records")]
    pub records: usize,
}

fn default_records() -> usize {
    64
}

/// The running admin service; stops when dropped or shut down.
#[derive(Debug)]
pub struct AdminService {
    task: JoinHandle<()>,
}

impl AdminService {
    /// Starts serving on `client`, reading sagas from `log`.
    pub async fn start(
        client: async_nats::Client,
        log: SagaLog,
        registry: Registry,
        tally: Arc<crate::observe::Tally>,
    ) -> Result<Self, async_nats::Error> {
        let service = client
            .service_builder()
            .description("Saga admin: reads confined by saga definition")
            .stats_handler(
                move |_endpoint, _stats| serde_json::json!({ "sagas": tally.snapshot() }),
            )
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await?;
        let mut endpoints = Vec::new();
        for endpoint in ENDPOINTS {
            let requests = service
                .endpoint_builder()
                .name(endpoint)
                .add(format!("saga.admin.{endpoint}.*"))
                .await?;
            endpoints.push(requests.map(move |r| (endpoint, r)));
        }
        let mut requests = futures::stream::select_all(endpoints);
        let dlq = DeadLetters::open(async_nats::jetstream::new(client.clone())).await?;
        let stores = Stores { log, registry, dlq };
        let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS));
        let task = tokio::spawn(async move {
            let _service = service;
            while let Some((endpoint, request)) = requests.next().await {
                // Answers go to inboxes only: a reply subject that names anything else would
                // make this service publish there.
                let reply = request.message.reply.as_deref().unwrap_or_default();
                if !reply.starts_with("_INBOX.") || reply.contains(['*', '>']) {
                    warn!(reply = %quote(reply), "admin request whose reply subject is not an inbox: not answered");
                    continue;
                }
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    let busy = error(503, "busy: too many admin requests at once; retry".into());
                    let _ = request.respond(Err(busy)).await;
                    continue;
                };
                let stores = stores.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let answer = serve(endpoint, &stores, &request.message).await;
                    if let Err(e) = &answer {
                        debug!(subject = %request.message.subject, error = %e, "admin request refused");
                    }
                    if let Err(e) = request.respond(answer.map(Into::into)).await {
                        warn!(error = %e, "cannot answer an admin request");
                    }
                });
            }
        });
        Ok(AdminService { task })
    }

    /// Stops serving.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for AdminService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn error(code: usize, status: String) -> service::error::Error {
    service::error::Error { status, code }
}

/// The endpoints, each on `saga.admin.<endpoint>.<saga>`.
pub const ENDPOINTS: [&str; 8] =
    ["list", "get", "timeline", "stats", "defs", "followers", "domain", "dlq"];

/// The registered versions of a definition, as `defs` answers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Definitions {
    /// The definition's name.
    pub saga: String,
    /// The latest version's digest (new sagas start it).
    pub latest: String,
    /// Every registered version.
    pub versions: Vec<DefinitionVersion>,
}

/// One registered version of a definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DefinitionVersion {
    /// Its digest.
    pub digest: String,
    /// The definition, canonical.
    pub definition: saga_core::SagaDefinition,
    /// Live sagas running it, among the first [`DEFS_LIVE_SCAN`] live sagas of the name.
    pub live: u64,
}

/// How many live sagas `defs` looks at to count them by version.
pub const DEFS_LIVE_SCAN: usize = 10_000;

/// What the admin service reads and changes.
#[derive(Debug, Clone)]
struct Stores {
    log: SagaLog,
    registry: Registry,
    dlq: DeadLetters,
}

/// A request for one saga.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetRequest {
    /// The saga.
    pub id: SagaId,
}

/// A saga's snapshot, as `get` answers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetAnswer {
    /// The saga's state (for a saga accepted and not logged yet: its start, as the state
    /// machine begins it).
    pub snapshot: saga_core::SagaSnapshot,
    /// Whether any transition of it is logged yet.
    pub logged: bool,
}

async fn serve(
    endpoint: &str,
    stores: &Stores,
    msg: &async_nats::Message,
) -> Result<Vec<u8>, service::error::Error> {
    if endpoint == "dlq" {
        return serve_dlq(&stores.dlq, msg).await;
    }
    let (log, registry) = (&stores.log, &stores.registry);
    let saga =
        msg.subject.rsplit('.').next().and_then(|token| SagaName::new(token).ok()).ok_or_else(
            || error(400, format!("{} names no saga definition", quote(&msg.subject))),
        )?;
    let read =
        |e: crate::store::StoreError| error(500, format!("cannot read sagas of {saga}: {e}"));
    let answer = match endpoint {
        "timeline" => {
            let request: TimelineRequest = parse(msg)?;
            serde_json::to_vec(&serve_timeline(log, &saga, request).await?)
        }
        "get" => {
            let request: GetRequest = parse(msg)?;
            checked_id(&request.id)?;
            let answer = serve_get(log, registry, &saga, &request.id).await?;
            serde_json::to_vec(&answer)
        }
        "list" => {
            let request: crate::index::ListRequest = parse(msg)?;
            if request.limit.is_some_and(|l| l == 0 || l > crate::index::MAX_PAGE) {
                return Err(error(400, format!("limit must be 1 to {}", crate::index::MAX_PAGE)));
            }
            serde_json::to_vec(&log.list(&saga, &request).await.map_err(read)?)
        }
        "stats" => serde_json::to_vec(&log.counts(&saga).await.map_err(read)?),
        "defs" => serde_json::to_vec(&serve_defs(log, registry, &saga).await?),
        "followers" => serde_json::to_vec(&log.followers(&saga).await.map_err(read)?),
        "domain" => {
            let request: GetRequest = parse(msg)?;
            checked_id(&request.id)?;
            let saga_now = serve_get(log, registry, &saga, &request.id).await?;
            let snap = &saga_now.snapshot;
            // The saga's life, with a minute's slack each side for clocks and late events.
            let from = saga_core::Timestamp(snap.started_at.0.saturating_sub(60_000));
            let to = if snap.status.is_terminal() {
                saga_core::Timestamp(snap.updated_at.0 + 60_000)
            } else {
                saga_core::Timestamp(u64::MAX)
            };
            serde_json::to_vec(&log.domain_events(&request.id, from, to).await.map_err(read)?)
        }
        _ => return Err(error(404, format!("no endpoint {}", quote(endpoint)))),
    };
    answer.map_err(|e| error(500, format!("cannot encode the answer: {e}")))
}

/// A request's JSON body (an empty body is `{}`).
fn parse<T: serde::de::DeserializeOwned>(
    msg: &async_nats::Message,
) -> Result<T, service::error::Error> {
    let payload: &[u8] = if msg.payload.is_empty() { b"{}" } else { &msg.payload };
    serde_json::from_slice(payload)
        .map_err(|e| error(400, format!("request body: {}", quote(&e.to_string()))))
}

fn checked_id(id: &SagaId) -> Result<(), service::error::Error> {
    saga_core::check_token(id.as_str())
        .map_err(|e| error(400, format!("id {} {e}", quote(id.as_str()))))
}

async fn serve_get(
    log: &SagaLog,
    registry: &Registry,
    saga: &SagaName,
    id: &SagaId,
) -> Result<GetAnswer, service::error::Error> {
    let read = |e: crate::store::StoreError| error(500, format!("cannot read saga {id}: {e}"));
    if let Some(v) = log.load_in(id, Some(saga)).await.map_err(read)? {
        return Ok(GetAnswer { snapshot: v.record.snapshot, logged: true });
    }
    match log.pending_start(id, Some(saga)).await.map_err(read)? {
        Some(start) => {
            let plan = registry.version(&start.saga, &start.digest).await.map_err(|e| {
                error(500, format!("cannot read the definition saga {id} runs: {e}"))
            })?;
            Ok(GetAnswer { snapshot: begun(id, &plan, start), logged: false })
        }
        None => Err(error(404, format!("no saga {id} of definition {saga}"))),
    }
}

/// The snapshot of a saga accepted and not logged yet: its start, as the state machine
/// begins it (its first steps are under way).
pub fn begun(id: &SagaId, plan: &saga_core::Plan, start: StartMessage) -> saga_core::SagaSnapshot {
    let mut state = saga_core::SagaState::new(id.clone(), plan);
    let _ =
        state.handle(plan, crate::deliver::now(), &saga_core::Event::Start { input: start.input });
    state.snapshot()
}

async fn serve_timeline(
    log: &SagaLog,
    saga: &SagaName,
    request: TimelineRequest,
) -> Result<TimelinePage, service::error::Error> {
    checked_id(&request.id)?;
    if request.records == 0 || request.records > MAX_PAGE_RECORDS {
        return Err(error(400, format!("records must be 1 to {MAX_PAGE_RECORDS}")));
    }
    let id = &request.id;
    let read = |e: crate::store::StoreError| error(500, format!("cannot read saga {id}: {e}"));
    if log.load_in(id, Some(saga)).await.map_err(read)?.is_none() {
        if log.pending_start(id, Some(saga)).await.map_err(read)?.is_none() {
            return Err(error(404, format!("no saga {id} of definition {saga}")));
        }
        return Ok(TimelinePage::default());
    }
    log.timeline(id, request.after, request.records)
        .await
        .map_err(|e| error(500, format!("cannot read the timeline of saga {id}: {e}")))
}

/// `saga.admin.dlq.<list|show|redrive|discard>`.
async fn serve_dlq(
    dlq: &DeadLetters,
    msg: &async_nats::Message,
) -> Result<Vec<u8>, service::error::Error> {
    let failed = |e: DlqError| match e {
        DlqError::NotFound(_) => error(404, e.to_string()),
        DlqError::Refused(_) => error(409, e.to_string()),
        DlqError::Nats(_) => error(500, e.to_string()),
    };
    let op = msg.subject.rsplit('.').next().unwrap_or_default();
    let answer = match op {
        "list" => {
            let request: DlqListRequest = parse(msg)?;
            if request.limit.is_some_and(|l| l == 0 || l > crate::dlq::MAX_PAGE) {
                return Err(error(400, format!("limit must be 1 to {}", crate::dlq::MAX_PAGE)));
            }
            serde_json::to_vec(&dlq.list(&request).await.map_err(failed)?)
        }
        "show" | "redrive" | "discard" => {
            let DlqRef { seq } = parse(msg)?;
            match op {
                "show" => serde_json::to_vec(&dlq.show(seq).await.map_err(failed)?),
                "redrive" => {
                    let done = dlq.redrive(seq).await.map_err(failed)?;
                    tracing::info!(seq, subject = %done.subject, "dead letter re-driven");
                    serde_json::to_vec(&done)
                }
                _ => {
                    dlq.discard(seq).await.map_err(failed)?;
                    tracing::info!(seq, "dead letter discarded");
                    serde_json::to_vec(&serde_json::json!({ "discarded": seq }))
                }
            }
        }
        _ => {
            return Err(error(
                404,
                format!("{}: no such operation (list, show, redrive, discard)", quote(op)),
            ))
        }
    };
    answer.map_err(|e| error(500, format!("cannot encode the answer: {e}")))
}

async fn serve_defs(
    log: &SagaLog,
    registry: &Registry,
    saga: &SagaName,
) -> Result<Definitions, service::error::Error> {
    let failed =
        |e: crate::store::RegistryError| error(500, format!("cannot read definitions: {e}"));
    let names = registry.names().await.map_err(failed)?;
    if !names.contains(saga) {
        return Err(error(404, format!("no saga definition named {saga} is registered")));
    }
    let latest = registry.latest(saga.as_str()).await.map_err(failed)?.digest().to_owned();
    let live = log
        .live_by_digest(saga, DEFS_LIVE_SCAN)
        .await
        .map_err(|e| error(500, format!("cannot count live sagas of {saga}: {e}")))?;
    let mut versions = Vec::new();
    for digest in registry.digests(saga).await.map_err(failed)? {
        let plan = registry.version(saga, &digest).await.map_err(failed)?;
        let n = live.get(&digest).copied().unwrap_or(0);
        versions.push(DefinitionVersion { digest, definition: plan.definition().clone(), live: n });
    }
    Ok(Definitions { saga: saga.to_string(), latest, versions })
}
