//! # The demo services
//!
//! Five small services around the `place-order` saga (`sagas/place-order.yaml`), written
//! against the public `saga-nats` SDK and client only:
//!
//! | service | role | what it does |
//! |---|---|---|
//! | [`orders`] | starts sagas | an HTTP API (`POST /orders`, `GET /orders/{id}`) and a batch command; each order starts `place-order` with the order id as idempotency key |
//! | [`seller`] | step `reserve-items` | reserves items from a durable stock (`reserve`), releases them (`release`); refuses when stock runs out, so the saga compensates |
//! | [`logistics`] | step `schedule-shipment` | schedules a shipment (`schedule`), cancels it (`cancel`); configurable latency, failure and hang rates, so retries and timeouts show |
//! | [`payments`] | follows events; step `payment` waits for its events | charges an order a while after its items are reserved and publishes `payments.confirmed` or `payments.declined` (the saga's await step `payment` waits for one); refunds compensated orders |
//! | [`notification`] | follows events | takes no step: it follows the saga's lifecycle events and notifies the customer when an order ends |
//!
//! [`scenario`] is the demo itself: it places a batch of orders, waits for every saga to end
//! and reports what happened. `./scripts/demo` runs it against real processes; the
//! integration test runs the same code in-process.

pub mod ledger;
pub mod logistics;
pub mod model;
pub mod notification;
pub mod orders;
pub mod payments;
pub mod scenario;
pub mod seller;

/// The saga every order starts.
pub const PLACE_ORDER: &str = "place-order";

/// Opens a key-value bucket of the demo, creating it (one value per key) if it does not exist
/// (with least privilege the coordinator has created it: `--kv-bucket`).
pub(crate) async fn open_bucket(
    nats: &async_nats::Client,
    bucket: &str,
) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    Ok(saga_nats::provision::ensure_bucket(nats, bucket, 1).await?)
}

/// A deterministic fraction in `[0, 1)` for `key`: the same order always draws the same
/// value, so a run can be repeated and a redelivered command decides the same way.
pub fn draw(key: &str) -> f64 {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(key.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&hash[..8]);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::draw;

    #[test]
    fn draws_are_deterministic_fractions_spread_over_the_unit_interval() {
        assert_eq!(draw("a"), draw("a"));
        assert_ne!(draw("a"), draw("b"));
        let values: Vec<f64> = (0..1000).map(|i| draw(&format!("k{i}"))).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let below_tenth = values.iter().filter(|v| **v < 0.1).count();
        assert!((50..150).contains(&below_tenth), "{below_tenth} of 1000 below 0.1");
    }
}
