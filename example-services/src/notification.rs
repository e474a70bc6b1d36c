//! Notification: takes no step. It follows the `place-order` saga's lifecycle events with a
//! durable consumer (pure choreography) and, when an order ends, "notifies the customer": a
//! log line and a durable record in the key-value bucket [`NOTIFICATION_BUCKET`], keyed by
//! saga, so a redelivered event never notifies twice.

use async_nats::jetstream::kv;
use futures::TryStreamExt;
use saga_core::LifecycleKind;
use saga_nats::follow::{follow_sagas, Following, LifecycleEvent};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::model::Order;
use crate::open_bucket;
use crate::PLACE_ORDER;

/// The key-value bucket of notifications sent, one per saga.
pub const NOTIFICATION_BUCKET: &str = "demo_notifications";

/// A notification sent to a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The saga that ended.
    pub saga_id: String,
    /// The order.
    pub order_id: String,
    /// The customer notified.
    pub customer: String,
    /// How the order ended: `completed`, `compensated` or `cancelled`.
    pub outcome: String,
    /// What the customer was told.
    pub message: String,
    /// When the saga ended (ms since the epoch).
    pub at: u64,
}

impl Notice {
    /// The notice for a terminal lifecycle event of `place-order`.
    pub fn for_event(event: &LifecycleEvent) -> Result<Notice, String> {
        let order: Order = saga_core::Codec::default()
            .decode_value("saga input", event.input.as_bytes())
            .map_err(|e| format!("saga {}: input is not an order: {e}", event.saga_id))?;
        let message = match event.kind {
            LifecycleKind::Completed => format!(
                "Dear {}, your order {} ({} x {}) is confirmed and on its way.",
                order.customer, order.id, order.quantity, order.sku
            ),
            LifecycleKind::Cancelled => {
                format!(
                    "Dear {}, your order {} was cancelled as you asked.",
                    order.customer, order.id
                )
            }
            _ => format!(
                "Dear {}, sorry: we could not complete your order {} ({}). Any payment taken is refunded.",
                order.customer,
                order.id,
                event.reason.as_deref().unwrap_or("no reason given")
            ),
        };
        Ok(Notice {
            saga_id: event.saga_id.to_string(),
            order_id: order.id,
            customer: order.customer,
            outcome: event.kind.as_str().to_owned(),
            message,
            at: event.at.0,
        })
    }
}

/// Starts Notification: follows `place-order`'s ends with the durable consumer
/// `notification`.
pub async fn run(nats: async_nats::Client) -> anyhow::Result<Following> {
    let sent = open_bucket(&nats, NOTIFICATION_BUCKET).await?;
    let following = follow_sagas(
        nats,
        "notification",
        Some(PLACE_ORDER),
        &[LifecycleKind::Completed, LifecycleKind::Compensated, LifecycleKind::Cancelled],
        move |event| {
            let sent = sent.clone();
            async move {
                let notice = match Notice::for_event(&event) {
                    Ok(notice) => notice,
                    // Redelivering will not fix it: say so once and move on.
                    Err(e) => {
                        tracing::error!("cannot notify: {e}");
                        return Ok(());
                    }
                };
                let record = serde_json::to_vec(&notice).map_err(|e| e.to_string())?;
                match sent.create(&notice.saga_id, record.into()).await {
                    Ok(_) => {
                        info!(order = %notice.order_id, customer = %notice.customer, outcome = %notice.outcome, "notified: {}", notice.message);
                        Ok(())
                    }
                    // A redelivered event: the customer was told already.
                    // (On a cluster, a follower's stale read can make it a conflict instead.)
                    Err(e)
                        if e.kind() == kv::CreateErrorKind::AlreadyExists
                            || saga_nats::store::is_conflict(&e) =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(format!("cannot record notification for {}: {e}", notice.order_id)),
                }
            }
        },
    )
    .await?;
    Ok(following)
}

/// Every notification sent so far.
pub async fn sent(nats: async_nats::Client) -> anyhow::Result<Vec<Notice>> {
    let store = open_bucket(&nats, NOTIFICATION_BUCKET).await?;
    let keys: Vec<String> = store.keys().await?.try_collect().await?;
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        if let Some(bytes) = store.get(&k).await? {
            out.push(serde_json::from_slice(&bytes)?);
        }
    }
    out.sort_by_key(|n: &Notice| n.at);
    Ok(out)
}
