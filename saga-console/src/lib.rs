//! The web console: sagas and their timelines, the choreography around them (lifecycle events
//! and the followers that consumed them), the operator's queue (parked sagas and dead
//! letters) and the definitions, in a browser.
//!
//! It reads only through the coordinator's admin service and the lifecycle events, as
//! `sagactl` does, and acts only through operator actions, under the operator name its NATS
//! user may publish as. The page is plain HTML, CSS and JavaScript compiled into the binary:
//! nothing is fetched from anywhere else.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use futures::{Stream, StreamExt};
use saga_core::wire::LogRecord;
use saga_core::{Codec, SagaId};
use saga_nats::index::{ListRequest, Which};
use saga_nats::{ErrorKind, NatsOptions, SagaClient, SagaClientError};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{info, warn};

/// Serves the saga web console over HTTP.
///
/// The console reads through the coordinator's admin service and acts through operator
/// actions, so its NATS user needs an operator's permissions (docs/SECURITY.md); actions are
/// recorded under --operator, the name that user may publish as.
///
/// Example, against the demo (`./scripts/demo --keep-running` prints the real values):
///
///   NATS_URL=nats://127.0.0.1:4222 NATS_NKEY=keys/demo.nk NATS_INBOX_PREFIX=_INBOX.demo \
///       saga-console --listen 127.0.0.1:8090 --operator demo
#[derive(Debug, Parser)]
#[command(name = "saga-console", version, about, long_about, verbatim_doc_comment)]
pub struct Args {
    /// Where to serve the console (HTTP).
    #[arg(long, env = "SAGA_CONSOLE_LISTEN", default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,

    /// The operator name the console's actions are recorded under (its NATS user may publish
    /// operator actions only under this name) [default: $USER].
    #[arg(long, env = "SAGA_OPERATOR")]
    pub operator: Option<String>,

    /// How to reach NATS.
    #[command(flatten)]
    pub nats: NatsOptions,
}

/// Runs the console with the process's arguments; returns the exit code.
pub async fn main() -> ExitCode {
    let args = Args::parse();
    saga_coordinator::init_logging("info");
    let nats = match args.nats.connect("saga-console").await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("saga-console: cannot connect to NATS: {e}");
            return ExitCode::from(4);
        }
    };
    let mut client = match SagaClient::new(nats.clone()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("saga-console: {e}");
            return ExitCode::from(4);
        }
    };
    if let Some(op) = &args.operator {
        client = client.with_operator(op.clone());
    }
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("saga-console: cannot listen on {}: {e}", args.listen);
            return ExitCode::from(2);
        }
    };
    let addr = listener.local_addr().map_or(args.listen, |a| a);
    info!(url = %format!("http://{addr}/"), "saga console listening");
    let app = router(Console { client, nats, operator: args.operator.clone() });
    let serve =
        axum::serve(listener, app).with_graceful_shutdown(saga_coordinator::shutdown_signal());
    match serve.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saga-console: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What the console's handlers share.
#[derive(Clone)]
pub struct Console {
    /// Reads and operator actions.
    pub client: SagaClient,
    /// Lifecycle events, for live updates.
    pub nats: async_nats::Client,
    /// The operator name shown on the page.
    pub operator: Option<String>,
}

/// The console's routes: the page and its JSON API.
pub fn router(console: Console) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async {
                asset("text/html; charset=utf-8", include_str!("../assets/index.html"))
            }),
        )
        .route(
            "/app.js",
            get(|| async {
                asset("text/javascript; charset=utf-8", include_str!("../assets/app.js"))
            }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", include_str!("../assets/style.css")) }),
        )
        .route("/api/overview", get(overview))
        .route("/api/sagas/{saga}", get(list))
        .route("/api/saga/{id}", get(saga))
        .route("/api/saga/{id}/{action}", post(act))
        .route("/api/defs/{saga}", get(defs))
        .route("/api/dlq", get(dead_letters))
        .route("/api/dlq/{seq}/{op}", post(dead_letter_op))
        .route("/api/events", get(events))
        .with_state(console)
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// A client error as an HTTP answer: the status its kind means and `{"error": ...}`.
struct Failed(SagaClientError);

impl From<SagaClientError> for Failed {
    fn from(e: SagaClientError) -> Self {
        Failed(e)
    }
}

impl IntoResponse for Failed {
    fn into_response(self) -> Response {
        let status = match self.0.kind() {
            ErrorKind::NotFound | ErrorKind::UnknownSaga => StatusCode::NOT_FOUND,
            ErrorKind::NotApplicable | ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::BadRequest | ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
            ErrorKind::TimedOut => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        (status, Json(json!({ "error": self.0.to_string() }))).into_response()
    }
}

fn bad(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}

/// Every definition with its counts.
async fn overview(State(c): State<Console>) -> Result<Json<Value>, Failed> {
    let mut definitions = Vec::new();
    for name in c.client.definition_names().await? {
        let stats = c.client.stats(name.as_str()).await?;
        definitions.push(json!({ "name": name, "stats": stats }));
    }
    Ok(Json(json!({ "operator": c.operator, "definitions": definitions })))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    status: Option<String>,
    step: Option<String>,
    since: Option<u64>,
    cursor: Option<u64>,
    limit: Option<usize>,
}

async fn list(
    State(c): State<Console>,
    Path(saga): Path<String>,
    Query(q): Query<ListQuery>,
) -> Response {
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        None => Which::Live,
        Some(s) => match Which::parse(s) {
            Some(w) => w,
            None => return bad(format!("status {s:?}: not a status")),
        },
    };
    let request = ListRequest {
        status,
        step: q.step.as_deref().filter(|s| !s.is_empty()).map(saga_core::StepName::from),
        since: q.since.map(saga_core::Timestamp),
        until: None,
        limit: q.limit,
        cursor: q.cursor,
    };
    match c.client.list(&saga, &request).await {
        Ok(page) => Json(page).into_response(),
        Err(e) => Failed(e).into_response(),
    }
}

/// One saga: snapshot, input and outputs as JSON, the timeline, its log records (with their
/// lifecycle events) and the followers of those events.
async fn saga(State(c): State<Console>, Path(id): Path<String>) -> Response {
    let Ok(id) = SagaId::new(&id) else { return bad(format!("{id:?} is not a saga id")) };
    let view = match c.client.get(&id).await {
        Ok(Some(v)) => v,
        Ok(None) => {
            return (StatusCode::NOT_FOUND, Json(json!({ "error": format!("no saga {id}") })))
                .into_response()
        }
        Err(e) => return Failed(e).into_response(),
    };
    let page = match view.logged {
        true => match c.client.whole_timeline(&id).await {
            Ok(page) => page,
            Err(e) => return Failed(e).into_response(),
        },
        false => Default::default(),
    };
    let (timeline, records) = (page.entries, page.records);
    let followers = c.client.followers(view.saga().as_str()).await.unwrap_or_default();
    let domain = c.client.domain_events(view.saga().as_str(), &id).await.ok();
    let outputs: serde_json::Map<String, Value> = view
        .snapshot
        .steps
        .iter()
        .filter_map(|s| {
            let o = s.output.as_ref()?;
            Some((s.name.to_string(), json_of(o.as_bytes())))
        })
        .collect();
    Json(json!({
        "snapshot": view.snapshot,
        "logged": view.logged,
        "input": json_of(view.snapshot.input.as_bytes()),
        "outputs": outputs,
        "timeline": timeline,
        "records": records,
        "followers": followers,
        "domain": domain,
    }))
    .into_response()
}

fn json_of(bytes: &[u8]) -> Value {
    saga_nats::dlq::msgpack_json(bytes).unwrap_or_else(|| json!(format!("<{} bytes>", bytes.len())))
}

#[derive(Debug, Deserialize)]
struct ActionBody {
    reason: String,
}

/// An operator action; answers with the coordinator's verdict.
async fn act(
    State(c): State<Console>,
    Path((id, action)): Path<(String, String)>,
    Json(body): Json<ActionBody>,
) -> Response {
    let Ok(id) = SagaId::new(&id) else { return bad(format!("{id:?} is not a saga id")) };
    if body.reason.trim().is_empty() {
        return bad("a reason is required".into());
    }
    let Some(operator_action) = saga_core::wire::OperatorAction::parse(&action) else {
        return bad(format!("{action:?}: not an action (cancel, retry, skip, resolve)"));
    };
    match c.client.act(&id, operator_action, &body.reason).await {
        Ok(()) => {
            info!(saga_id = %id, action, operator = ?c.operator, "operator action applied");
            Json(json!({ "applied": true, "action": action, "id": id })).into_response()
        }
        Err(e) => Failed(e).into_response(),
    }
}

async fn defs(State(c): State<Console>, Path(saga): Path<String>) -> Response {
    match c.client.definitions(&saga).await {
        Ok(d) => Json(d).into_response(),
        Err(e) => Failed(e).into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct DlqQuery {
    cursor: Option<u64>,
}

async fn dead_letters(State(c): State<Console>, Query(q): Query<DlqQuery>) -> Response {
    let request =
        saga_nats::dlq::DlqListRequest { component: None, limit: Some(100), cursor: q.cursor };
    match c.client.dead_letters(&request).await {
        Ok(page) => Json(page).into_response(),
        Err(e) => Failed(e).into_response(),
    }
}

async fn dead_letter_op(
    State(c): State<Console>,
    Path((seq, op)): Path<(u64, String)>,
) -> Response {
    let result = match op.as_str() {
        "redrive" => c.client.redrive(seq).await.map(|r| json!({ "redriven": r })),
        "discard" => c.client.discard(seq).await.map(|()| json!({ "discarded": seq })),
        "show" => c.client.dead_letter(seq).await.map(|l| json!(l)),
        other => return bad(format!("{other:?}: not an operation (show, redrive, discard)")),
    };
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => Failed(e).into_response(),
    }
}

/// Lifecycle events as server-sent events, one per log record that published any:
/// `{"id", "saga", "status", "events": [...]}`. The page refreshes what they concern.
async fn events(State(c): State<Console>) -> Response {
    match c.nats.subscribe("saga.log.*.*.*").await {
        Ok(sub) => Sse::new(lifecycle(sub))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response(),
        Err(e) => {
            warn!(error = %e, "cannot follow lifecycle events");
            (StatusCode::BAD_GATEWAY, Json(json!({ "error": e.to_string() }))).into_response()
        }
    }
}

fn lifecycle(sub: async_nats::Subscriber) -> impl Stream<Item = Result<Event, Infallible>> {
    let codec = Codec::default();
    sub.filter_map(move |msg| {
        let record = codec.decode::<LogRecord>(&msg.payload).ok().filter(|r| !r.events.is_empty());
        async move {
            let r = record?;
            let kinds: Vec<&str> = r.events.iter().map(|e| e.kind.as_str()).collect();
            let data = json!({
                "id": r.snapshot.id, "saga": r.snapshot.saga, "status": r.snapshot.status,
                "events": kinds, "at": r.snapshot.updated_at,
            });
            Some(Ok(Event::default().data(data.to_string())))
        }
    })
}
