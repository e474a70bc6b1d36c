//! Orders: places orders, each one starting the `place-order` saga with the order id as its
//! idempotency key (placing the same order twice starts one saga), and shows an order's saga:
//! its status and its history as a timeline. Served over HTTP by [`router`]:
//!
//! | request | answer |
//! |---|---|
//! | `POST /orders` with `{"customer": "ada", "sku": "apple", "quantity": 2}` (and optionally `"id"`) | `202` `{"order_id": …, "saga_id": …, "status_url": "/orders/…"}` |
//! | `GET /orders/{id}` | `200` the order, its saga's status, and the timeline; `404` if there is no such order |
//!
//! Placing an order again with the same contents is accepted (one saga); reusing an order id for
//! other contents is refused with 409. Errors are `{"error": "…"}` naming what was wrong, with
//! status 400, 404, 409, 413 or 503.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use saga_core::{SagaSnapshot, SagaStatus, TimelineEvent};
use saga_nats::{ErrorKind, SagaClient, SagaClientError};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::model::Order;
use crate::open_bucket;
use crate::PLACE_ORDER;
use async_nats::jetstream::kv;

/// The Orders service.
#[derive(Clone)]
pub struct Orders {
    client: SagaClient,
    placed: kv::Store,
}

impl std::fmt::Debug for Orders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orders").field("bucket", &ORDER_BUCKET).finish_non_exhaustive()
    }
}

/// The key-value bucket of placed orders, by order id.
pub const ORDER_BUCKET: &str = "demo_orders";

/// Why an order could not be placed or shown.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// The request is wrong; the text says how.
    #[error("{0}")]
    Invalid(String),
    /// The order id is taken by another order.
    #[error("{0}")]
    Conflict(String),
    /// No such order.
    #[error("no order {0:?}")]
    NotFound(String),
    /// The saga system failed.
    #[error(transparent)]
    Saga(#[from] SagaClientError),
    /// NATS failed; the text says what could not be done.
    #[error("{0}")]
    Unavailable(String),
}

/// An order and its saga, as `GET /orders/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderView {
    /// The order's id.
    pub order_id: String,
    /// Its saga's id.
    pub saga_id: String,
    /// The saga's status: `new` (accepted, not started yet), `running`, `compensating`,
    /// `completed`, `compensated`, …
    pub status: SagaStatus,
    /// The order, as placed.
    pub order: Option<Order>,
    /// Why it did not complete, if it did not.
    pub reason: Option<String>,
    /// Milliseconds from the saga's start to its end (or to now, while it runs).
    pub elapsed_ms: u64,
    /// What happened, in order.
    pub timeline: Vec<TimelineEntry>,
}

/// One line of a saga's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// Milliseconds since the saga started.
    pub offset_ms: u64,
    /// What happened, in words.
    pub what: String,
}

impl Orders {
    /// Connects the service to the saga system.
    pub async fn new(nats: async_nats::Client) -> anyhow::Result<Orders> {
        let placed = open_bucket(&nats, ORDER_BUCKET).await?;
        // Orders starts and reads place-order sagas only: what its NATS permissions allow.
        let client = SagaClient::new(nats).await?.only([PLACE_ORDER])?;
        Ok(Orders { client, placed })
    }

    /// The saga client underneath.
    pub fn client(&self) -> &SagaClient {
        &self.client
    }

    /// Places `order`: starts its `place-order` saga (once, however often it is placed).
    pub async fn place(&self, order: &Order) -> Result<saga_core::SagaId, OrderError> {
        order.validate().map_err(OrderError::Invalid)?;
        // Recorded first, so the order can be shown from the moment it is accepted. Placing
        // the same order again is fine; reusing its id for another order is not.
        let record = serde_json::to_vec(order).map_err(|e| OrderError::Invalid(e.to_string()))?;
        let unavailable =
            |e: String| OrderError::Unavailable(format!("cannot record order {}: {e}", order.id));
        match self.placed.create(&order.id, record.into()).await {
            Ok(_) => {}
            Err(e)
                if e.kind() == kv::CreateErrorKind::AlreadyExists
                    || saga_nats::store::is_conflict(&e) =>
            {
                let existing =
                    self.placed.get(&order.id).await.map_err(|e| unavailable(e.to_string()))?;
                let existing: Option<Order> =
                    existing.and_then(|bytes| serde_json::from_slice(&bytes).ok());
                if existing.as_ref() != Some(order) {
                    return Err(OrderError::Conflict(format!(
                        "order {} exists with other contents: {existing:?}",
                        order.id
                    )));
                }
            }
            Err(e) => return Err(unavailable(e.to_string())),
        }
        let id = self.client.start_with_key(PLACE_ORDER, &order.id, order).await?;
        info!(order = %order.id, saga = %id, "order placed");
        Ok(id)
    }

    /// The order `order_id` and its saga.
    pub async fn view(&self, order_id: &str) -> Result<OrderView, OrderError> {
        let saga_id = SagaClient::id_for_key(PLACE_ORDER, order_id);
        if let Some(saga) = self.client.get(&saga_id).await? {
            let entries = self.client.timeline(&saga_id).await?;
            return Ok(OrderView::of(order_id, &saga.snapshot, &entries));
        }
        // Accepted, but the coordinator has not started its saga yet.
        let placed = match self.placed.get(order_id).await {
            Ok(Some(bytes)) => serde_json::from_slice::<Order>(&bytes).ok(),
            Ok(None) => None,
            // Not a valid key: no such order.
            Err(e) if e.kind() == kv::EntryErrorKind::InvalidKey => None,
            Err(e) => {
                return Err(OrderError::Unavailable(format!("cannot read order {order_id}: {e}")))
            }
        };
        match placed {
            Some(order) => Ok(OrderView {
                order_id: order_id.to_owned(),
                saga_id: saga_id.to_string(),
                status: SagaStatus::New,
                order: Some(order),
                reason: None,
                elapsed_ms: 0,
                timeline: Vec::new(),
            }),
            None => Err(OrderError::NotFound(order_id.to_owned())),
        }
    }
}

impl OrderView {
    /// The view of order `order_id` whose saga is `snap`, with its timeline `entries`.
    pub fn of(
        order_id: &str,
        snap: &SagaSnapshot,
        entries: &[saga_core::TimelineEntry],
    ) -> OrderView {
        let reason = snap.cause.as_ref().map(ToString::to_string);
        OrderView {
            order_id: order_id.to_owned(),
            saga_id: snap.id.to_string(),
            status: snap.status,
            order: saga_core::Codec::default()
                .decode_value("saga input", snap.input.as_bytes())
                .ok(),
            reason,
            elapsed_ms: snap.updated_at.0.saturating_sub(snap.started_at.0),
            timeline: timeline(snap, entries),
        }
    }
}

/// A saga's typed timeline as readable lines, timed from the saga's start.
pub fn timeline(snap: &SagaSnapshot, entries: &[saga_core::TimelineEntry]) -> Vec<TimelineEntry> {
    let since = |ms: u64| ms.saturating_sub(snap.started_at.0);
    entries
        .iter()
        .map(|e| {
            let what = match &e.event {
                TimelineEvent::Started => "started".to_owned(),
                TimelineEvent::Dispatched { step, phase, attempt, service, command, .. } => {
                    format!("dispatched {step} ({phase}, attempt {attempt}) → {service}.{command}")
                }
                TimelineEvent::Succeeded { step, phase, attempt } => {
                    format!("succeeded {step} ({phase}, attempt {attempt})")
                }
                TimelineEvent::Failed { step, phase, attempt, reason, transient } => {
                    let what = if *transient { "transient error" } else { "business failure" };
                    format!("failed {step} ({phase}, attempt {attempt}): {what}: {reason}")
                }
                TimelineEvent::TimedOut { step, phase, attempt } => {
                    format!("timed out {step} ({phase}, attempt {attempt})")
                }
                TimelineEvent::NotDelivered { step, phase, attempt, retry_at } => format!(
                    "not delivered {step} ({phase}, attempt {attempt}): no responders, again at +{} ms",
                    since(retry_at.0)
                ),
                TimelineEvent::RetryScheduled { step, phase, next_attempt, at } => format!(
                    "retry scheduled {step} ({phase}, attempt {next_attempt}) at +{} ms",
                    since(at.0)
                ),
                TimelineEvent::CompensationStarted { cause } => {
                    format!("compensation started: {cause}")
                }
                TimelineEvent::CancelRequested { reason, by } => with_by("cancel requested", reason, by),
                TimelineEvent::Parked { step, reason } => format!("parked at {step}: {reason}"),
                TimelineEvent::OperatorRetry { reason, by } => with_by("operator retry", reason, by),
                TimelineEvent::OperatorSkip { reason, by } => with_by("operator skip", reason, by),
                TimelineEvent::OperatorResolve { reason, by } => {
                    with_by("operator resolve", reason, by)
                }
                TimelineEvent::Awaiting { step, waits_for, deadline } => format!(
                    "awaiting {step}: {waits_for} (until +{} ms)",
                    since(deadline.0)
                ),
                TimelineEvent::StoppedWaiting { step } => format!("stopped waiting: {step}"),
                TimelineEvent::Finished { status } => format!("finished: {status}"),
                other => other.name().replace('_', " "),
            };
            TimelineEntry { offset_ms: since(e.at.0), what }
        })
        .collect()
}

fn with_by(what: &str, reason: &str, by: &Option<String>) -> String {
    match by {
        Some(by) => format!("{what}: {reason} (by {by})"),
        None => format!("{what}: {reason}"),
    }
}

/// What `POST /orders` takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    /// The order's id; one is made up when absent.
    pub id: Option<String>,
    /// Who orders.
    pub customer: String,
    /// What.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

#[derive(Serialize)]
struct Placed {
    order_id: String,
    saga_id: String,
    status_url: String,
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(ErrorBody { error: message.into() })).into_response()
}

impl IntoResponse for OrderError {
    fn into_response(self) -> Response {
        let status = match &self {
            OrderError::Invalid(_) => StatusCode::BAD_REQUEST,
            OrderError::NotFound(_) => StatusCode::NOT_FOUND,
            OrderError::Conflict(_) => StatusCode::CONFLICT,
            OrderError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            OrderError::Saga(e) => match e.kind() {
                ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
                ErrorKind::NotFound => StatusCode::NOT_FOUND,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            },
        };
        error(status, self.to_string())
    }
}

/// The largest request body accepted.
pub const MAX_BODY: usize = 16 * 1024;

/// The HTTP API of [`Orders`].
pub fn router(orders: Arc<Orders>) -> Router {
    Router::new()
        .route("/orders", post(post_order))
        .route("/orders/{id}", get(get_order))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(orders)
}

async fn post_order(
    State(orders): State<Arc<Orders>>,
    body: Result<Json<NewOrder>, JsonRejection>,
) -> Response {
    let Json(new) = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            return error(status, rejection.body_text());
        }
    };
    let order = Order {
        id: new.id.unwrap_or_else(|| format!("o-{}", uuid::Uuid::now_v7().simple())),
        customer: new.customer,
        sku: new.sku,
        quantity: new.quantity,
    };
    match orders.place(&order).await {
        Ok(saga) => (
            StatusCode::ACCEPTED,
            Json(Placed {
                status_url: format!("/orders/{}", order.id),
                order_id: order.id,
                saga_id: saga.to_string(),
            }),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn get_order(State(orders): State<Arc<Orders>>, Path(id): Path<String>) -> Response {
    match orders.view(&id).await {
        Ok(view) => Json(view).into_response(),
        Err(e) => e.into_response(),
    }
}
