//! The admin service: reads a client cannot do with its own permissions, served by the
//! coordinator on subjects that name the saga definition, so NATS permissions can confine
//! who asks. A NATS micro service (`saga-admin`, discoverable with `nats micro ls`).
//!
//! | endpoint | subject | request (JSON) | answer (JSON) |
//! |---|---|---|---|
//! | `timeline` | `saga.admin.timeline.<saga>` | `{"id": "<saga id>", "after": 0, "records": 64}` | [`TimelinePage`]: `{"entries": [...], "next": <seq> or null}` |
//!
//! `$SRV.STATS` (`nats micro stats saga-admin`) carries, in each endpoint's `data`, the saga
//! counts of the replica that answers ([`crate::observe::TallyData`]: started and finished by
//! definition and status, in flight, parked), the same as its `/metrics`.
//!
//! Errors come back as the micro services convention has it: headers `Nats-Service-Error`
//! and `Nats-Service-Error-Code` (400 a bad request, 404 no such saga of that definition, 500
//! the log could not be read).

use async_nats::service::{self, ServiceExt};
use futures::StreamExt;
use saga_core::wire::quote;
use saga_core::{SagaId, SagaName};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::store::{SagaLog, TimelinePage};

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
        let mut timeline =
            service.endpoint_builder().name("timeline").add("saga.admin.timeline.*").await?;
        let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS));
        let task = tokio::spawn(async move {
            let _service = service;
            while let Some(request) = timeline.next().await {
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
                let log = log.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let answer = serve_timeline(&log, &request.message).await;
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

async fn serve_timeline(
    log: &SagaLog,
    msg: &async_nats::Message,
) -> Result<Vec<u8>, service::error::Error> {
    let saga =
        msg.subject.rsplit('.').next().and_then(|token| SagaName::new(token).ok()).ok_or_else(
            || error(400, format!("{} names no saga definition", quote(&msg.subject))),
        )?;
    let request: TimelineRequest = serde_json::from_slice(&msg.payload)
        .map_err(|e| error(400, format!("request body: {}", quote(&e.to_string()))))?;
    saga_core::check_token(request.id.as_str())
        .map_err(|e| error(400, format!("id {} {e}", quote(request.id.as_str()))))?;
    if request.records == 0 || request.records > MAX_PAGE_RECORDS {
        return Err(error(400, format!("records must be 1 to {MAX_PAGE_RECORDS}")));
    }
    let id = &request.id;
    let logged = log
        .load_in(id, Some(&saga))
        .await
        .map_err(|e| error(500, format!("cannot read saga {id}: {e}")))?;
    if logged.is_none() {
        let pending = log
            .pending_start(id, Some(&saga))
            .await
            .map_err(|e| error(500, format!("cannot read saga {id}: {e}")))?;
        if pending.is_none() {
            return Err(error(404, format!("no saga {id} of definition {saga}")));
        }
        return Ok(serde_json::to_vec(&TimelinePage::default()).expect("a page encodes"));
    }
    let page = log
        .timeline(id, request.after, request.records)
        .await
        .map_err(|e| error(500, format!("cannot read the timeline of saga {id}: {e}")))?;
    serde_json::to_vec(&page).map_err(|e| error(500, format!("cannot encode the page: {e}")))
}
