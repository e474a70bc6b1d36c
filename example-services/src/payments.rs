//! Payments: takes no step, and the saga waits for it. It follows `place-order`'s lifecycle
//! events with a durable consumer: once the items of an order are reserved it charges the
//! customer, as a payment provider would, after a while, and publishes the outcome as its own
//! domain event, `payments.confirmed` or (for some orders) `payments.declined`, with the
//! order's id. The saga's `payment` step is an await step completed by that event. When an
//! order's saga is compensated, a payment taken is refunded (`payments.refunded`).
//!
//! Every decision is recorded in the key-value bucket [`PAYMENTS_BUCKET`], keyed by order,
//! before its event is published, so a redelivered event (after a crash) publishes the same
//! outcome again (the event's message id makes the stream drop the copy) and never charges
//! twice; a refund that comes before the charge (a redelivery can overtake) voids the order's
//! payment instead.

use std::time::Duration;

use async_nats::jetstream::kv;
use futures::TryStreamExt;
use saga_core::{LifecycleKind, SagaId};
use saga_nats::follow::{follow_sagas, publish_saga_event, Following, LifecycleEvent};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::draw;
use crate::model::Order;
use crate::open_bucket;
use crate::PLACE_ORDER;

/// The key-value bucket of payments, one per order.
pub const PAYMENTS_BUCKET: &str = "demo_payments";

/// The step after which an order is charged.
pub const CHARGE_AFTER: &str = "reserve-items";

/// What an item costs, in cents (every SKU costs the same in the demo).
pub const PRICE_CENTS: u64 = 499;

/// How Payments behaves.
#[derive(Debug, Clone, clap::Args)]
pub struct PaymentsConfig {
    /// Typical time the provider takes to answer, in milliseconds (each takes 0.5x to 1.5x),
    /// counted from when the items were reserved.
    #[arg(long, env = "PAYMENTS_LATENCY_MS", default_value_t = 200)]
    pub latency_ms: u64,
    /// Fraction of orders whose payment is declined (the saga compensates).
    #[arg(long, env = "PAYMENTS_DECLINE_RATE", default_value_t = 0.1)]
    pub decline_rate: f64,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        PaymentsConfig { latency_ms: 200, decline_rate: 0.1 }
    }
}

impl PaymentsConfig {
    /// Checks the rate.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.decline_rate) {
            return Err(format!("decline rate {} must be between 0 and 1", self.decline_rate));
        }
        Ok(())
    }

    /// Whether `order`'s payment is declined (the same answer every time).
    pub fn declines(&self, order: &Order) -> bool {
        draw(&format!("{}/payment", order.id)) < self.decline_rate
    }

    fn latency(&self, order: &Order) -> Duration {
        let spread = 0.5 + draw(&format!("{}/payment-latency", order.id));
        Duration::from_millis(self.latency_ms).mul_f64(spread)
    }
}

/// Where an order's payment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Charged: `payments.confirmed` was published.
    Charged,
    /// Declined: `payments.declined` was published.
    Declined,
    /// Charged, then refunded because the saga was compensated: `payments.refunded`.
    Refunded,
    /// The saga was compensated before the order was charged: it never will be.
    Void,
}

impl PaymentStatus {
    /// The status as a word.
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentStatus::Charged => "charged",
            PaymentStatus::Declined => "declined",
            PaymentStatus::Refunded => "refunded",
            PaymentStatus::Void => "void",
        }
    }

    /// The domain event announcing it (after `domain.`), if there is one.
    fn event(self) -> Option<&'static str> {
        match self {
            PaymentStatus::Charged => Some("payments.confirmed"),
            PaymentStatus::Declined => Some("payments.declined"),
            PaymentStatus::Refunded => Some("payments.refunded"),
            PaymentStatus::Void => None,
        }
    }
}

/// What is wrong with order `order`'s payment, `paid`, for a saga that ended `status`, if
/// anything: a completed order is charged; any other is not (declined, refunded, void, or
/// never charged).
pub fn mismatch(
    order: &str,
    status: saga_core::SagaStatus,
    paid: Option<PaymentStatus>,
) -> Option<String> {
    let completed = status == saga_core::SagaStatus::Completed;
    (completed != (paid == Some(PaymentStatus::Charged))).then(|| {
        let paid = paid.map_or("no payment", PaymentStatus::as_str);
        format!("order {order}: saga {status}, payment {paid}")
    })
}

/// One order's payment: the record in [`PAYMENTS_BUCKET`] and the body of its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// The order (the await step matches on it).
    pub order_id: String,
    /// The saga that placed it.
    pub saga_id: String,
    /// Where it stands.
    pub status: PaymentStatus,
    /// How much, in cents.
    pub amount_cents: u64,
    /// Why it was declined, if it was.
    pub reason: Option<String>,
}

/// The payments bucket.
#[derive(Clone)]
pub struct PaymentStore {
    kv: kv::Store,
}

impl PaymentStore {
    /// Opens (or creates) the bucket.
    pub async fn open(nats: &async_nats::Client) -> anyhow::Result<PaymentStore> {
        Ok(PaymentStore { kv: open_bucket(nats, PAYMENTS_BUCKET).await? })
    }

    /// Every order's payment, by order id.
    pub async fn all(&self) -> anyhow::Result<std::collections::BTreeMap<String, Payment>> {
        let keys: Vec<String> = self.kv.keys().await?.try_collect().await?;
        let mut out = std::collections::BTreeMap::new();
        for k in keys {
            if let Some((payment, _)) = self.get(&k).await? {
                out.insert(k, payment);
            }
        }
        Ok(out)
    }

    async fn get(&self, order: &str) -> anyhow::Result<Option<(Payment, u64)>> {
        match self.kv.entry(order).await? {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some((serde_json::from_slice(&e.value)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Records `payment` unless the order has one: the recorded one either way.
    async fn decide(&self, payment: Payment) -> anyhow::Result<Payment> {
        loop {
            match self.kv.create(&payment.order_id, serde_json::to_vec(&payment)?.into()).await {
                Ok(_) => return Ok(payment),
                Err(e)
                    if e.kind() == kv::CreateErrorKind::AlreadyExists
                        || saga_nats::store::is_conflict(&e) =>
                {
                    if let Some((recorded, _)) = self.get(&payment.order_id).await? {
                        return Ok(recorded);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Refunds the order's payment if it was charged, voids it if it was not decided yet:
    /// the recorded one afterwards.
    async fn refund(&self, void: Payment) -> anyhow::Result<Payment> {
        loop {
            match self.get(&void.order_id).await? {
                None => {
                    let recorded = self.decide(void.clone()).await?;
                    if recorded.status != PaymentStatus::Charged {
                        return Ok(recorded);
                    }
                }
                Some((charged, revision)) if charged.status == PaymentStatus::Charged => {
                    let refunded = Payment { status: PaymentStatus::Refunded, ..charged };
                    let body = serde_json::to_vec(&refunded)?.into();
                    match self.kv.update(&refunded.order_id, body, revision).await {
                        Ok(_) => return Ok(refunded),
                        Err(e) if saga_nats::store::is_conflict(&e) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Some((other, _)) => return Ok(other),
            }
        }
    }
}

/// Publishes `payment`'s event (again, after a crash: its message id makes the stream keep
/// one).
async fn announce(nats: &async_nats::Client, payment: &Payment) -> anyhow::Result<()> {
    let Some(event) = payment.status.event() else { return Ok(()) };
    let saga = SagaId::new(&payment.saga_id)?;
    let id = format!("{event}.{}", payment.order_id);
    publish_saga_event(nats, &saga, event, &id, payment).await?;
    Ok(())
}

/// Starts Payments: follows `place-order` with the durable consumer `payments`.
pub async fn run(nats: async_nats::Client, config: PaymentsConfig) -> anyhow::Result<Following> {
    config.validate().map_err(|e| anyhow::anyhow!("payments: {e}"))?;
    let store = PaymentStore::open(&nats).await?;
    let following = follow_sagas(
        nats.clone(),
        "payments",
        Some(PLACE_ORDER),
        &[LifecycleKind::StepSucceeded, LifecycleKind::Compensated, LifecycleKind::Cancelled],
        move |event: LifecycleEvent| {
            let (nats, store, config) = (nats.clone(), store.clone(), config.clone());
            async move { handle(&nats, &store, &config, event).await.map_err(|e| format!("{e:#}")) }
        },
    )
    .await?;
    Ok(following)
}

async fn handle(
    nats: &async_nats::Client,
    store: &PaymentStore,
    config: &PaymentsConfig,
    event: LifecycleEvent,
) -> anyhow::Result<()> {
    let order: Order = saga_core::Codec::default()
        .decode_value("saga input", event.input.as_bytes())
        .map_err(|e| anyhow::anyhow!("saga {}: input is not an order: {e}", event.saga_id))?;
    let amount_cents = u64::from(order.quantity) * PRICE_CENTS;
    let payment = |status, reason: Option<&str>| Payment {
        order_id: order.id.clone(),
        saga_id: event.saga_id.to_string(),
        status,
        amount_cents,
        reason: reason.map(str::to_owned),
    };
    match event.kind {
        LifecycleKind::StepSucceeded
            if event.step.as_ref().is_some_and(|s| s.as_str() == CHARGE_AFTER) =>
        {
            // The provider answers a while after the items were reserved. Events are handled
            // in order, so each waits only for what is left of its own delay.
            let due =
                std::time::UNIX_EPOCH + Duration::from_millis(event.at.0) + config.latency(&order);
            if let Ok(left) = due.duration_since(std::time::SystemTime::now()) {
                tokio::time::sleep(left).await;
            }
            let decided = if config.declines(&order) {
                payment(PaymentStatus::Declined, Some("card declined by the issuer"))
            } else {
                payment(PaymentStatus::Charged, None)
            };
            let recorded = store.decide(decided).await?;
            announce(nats, &recorded).await?;
            info!(order = %order.id, status = recorded.status.as_str(), amount_cents, "payment");
        }
        LifecycleKind::Compensated | LifecycleKind::Cancelled => {
            let recorded = store.refund(payment(PaymentStatus::Void, None)).await?;
            if recorded.status == PaymentStatus::Refunded {
                announce(nats, &recorded).await?;
                info!(order = %order.id, amount_cents, "refunded");
            }
        }
        _ => {}
    }
    Ok(())
}
