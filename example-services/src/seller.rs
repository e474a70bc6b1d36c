//! Seller: the `reserve-items` step. Stock lives in the NATS key-value bucket
//! [`STOCK_BUCKET`], one key per SKU holding what is available and what each order holds.
//! Every change is one compare-and-swap write, so a reservation and its stock change are
//! never apart, and reserving or releasing the same order twice changes nothing.

use std::collections::BTreeMap;

use async_nats::jetstream::kv;
use futures::TryStreamExt;
use saga_nats::{Command, Participant, StepError};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::ledger::Ledger;
use crate::model::{Order, Reservation};

/// The key-value bucket of stock.
pub const STOCK_BUCKET: &str = "demo_stock";

/// One SKU's stock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    /// Items free to reserve.
    pub available: u32,
    /// Items held, by order id.
    pub held: BTreeMap<String, u32>,
}

/// The seller's durable stock.
#[derive(Clone)]
pub struct StockStore {
    kv: kv::Store,
}

impl std::fmt::Debug for StockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StockStore").field("bucket", &STOCK_BUCKET).finish()
    }
}

/// How a reservation ended, when it did not fail on NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// Reserved (or already reserved for this order).
    Yes(Reservation),
    /// Not enough stock, in words.
    Refused(String),
}

impl StockStore {
    /// Opens the bucket, creating it on first use.
    pub async fn open(nats: async_nats::Client) -> anyhow::Result<StockStore> {
        let kv = crate::open_bucket(&nats, STOCK_BUCKET).await?;
        Ok(StockStore { kv })
    }

    /// Sets `sku`'s available stock to `available` unless the SKU is stocked already (a
    /// restarted seller keeps its stock). Returns whether it set it.
    pub async fn seed(&self, sku: &str, available: u32) -> anyhow::Result<bool> {
        let stock = Stock { available, held: BTreeMap::new() };
        match self.kv.create(key(sku), serde_json::to_vec(&stock)?.into()).await {
            Ok(_) => Ok(true),
            Err(e)
                if e.kind() == kv::CreateErrorKind::AlreadyExists
                    || saga_nats::store::is_conflict(&e) =>
            {
                Ok(false)
            }
            Err(e) => Err(anyhow::anyhow!("cannot seed stock of {sku}: {e}")),
        }
    }

    /// Every SKU's stock.
    pub async fn all(&self) -> anyhow::Result<BTreeMap<String, Stock>> {
        let keys: Vec<String> = self.kv.keys().await?.try_collect().await?;
        let mut out = BTreeMap::new();
        for k in keys {
            if let Some((stock, _)) = self.load(&k).await? {
                out.insert(k.trim_start_matches("sku.").to_owned(), stock);
            }
        }
        Ok(out)
    }

    /// Reserves `order`'s items; reserving an order twice returns the first reservation.
    pub async fn reserve(&self, order: &Order) -> anyhow::Result<Reserved> {
        self.change(&order.sku, |stock| {
            if let Some(&quantity) = stock.held.get(&order.id) {
                let reservation =
                    Reservation { sku: order.sku.clone(), quantity, remaining: stock.available };
                return (false, Reserved::Yes(reservation));
            }
            if stock.available < order.quantity {
                let why = format!(
                    "out of stock: {} {} wanted, {} available",
                    order.quantity, order.sku, stock.available
                );
                return (false, Reserved::Refused(why));
            }
            stock.available -= order.quantity;
            stock.held.insert(order.id.clone(), order.quantity);
            let reservation = Reservation {
                sku: order.sku.clone(),
                quantity: order.quantity,
                remaining: stock.available,
            };
            (true, Reserved::Yes(reservation))
        })
        .await
    }

    /// Releases what `order` holds; returns how many items went back (0 if it held none).
    pub async fn release(&self, order: &Order) -> anyhow::Result<u32> {
        self.change(&order.sku, |stock| match stock.held.remove(&order.id) {
            Some(quantity) => {
                stock.available += quantity;
                (true, quantity)
            }
            None => (false, 0),
        })
        .await
    }

    async fn load(&self, key: &str) -> anyhow::Result<Option<(Stock, u64)>> {
        match self.kv.entry(key).await? {
            Some(entry) if entry.operation == kv::Operation::Put => {
                Ok(Some((serde_json::from_slice(&entry.value)?, entry.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Applies `f` to `sku`'s stock with compare-and-swap, retrying when another writer got
    /// there first. `f` says whether it changed anything.
    async fn change<T>(&self, sku: &str, f: impl Fn(&mut Stock) -> (bool, T)) -> anyhow::Result<T> {
        let key = key(sku);
        let mut tries = 0u32;
        loop {
            tries = tries.saturating_add(1);
            if tries > 1 {
                // Another writer got there first: back off (growing, jittered) so that many
                // handlers on one SKU take turns instead of all retrying at once.
                let ms = 5u64 << tries.min(6);
                let jitter = crate::draw(&format!("{key}/{tries}/{:?}", std::time::Instant::now()));
                tokio::time::sleep(std::time::Duration::from_millis(
                    (ms as f64 * (0.5 + jitter)) as u64,
                ))
                .await;
            }
            let (mut stock, revision) = self.load(&key).await?.unwrap_or_default();
            let (changed, out) = f(&mut stock);
            if !changed {
                return Ok(out);
            }
            let bytes = serde_json::to_vec(&stock)?;
            let written = if revision == 0 {
                self.kv.create(&key, bytes.into()).await.map(|_| ()).map_err(|e| e.to_string())
            } else {
                match self.kv.update(&key, bytes.into(), revision).await {
                    Ok(_) => Ok(()),
                    Err(e) if saga_nats::store::is_conflict(&e) => {
                        continue;
                    }
                    Err(e) => Err(e.to_string()),
                }
            };
            match written {
                Ok(()) => return Ok(out),
                // Created by someone else meanwhile: read it and try again.
                Err(_) if revision == 0 && self.load(&key).await?.is_some() => continue,
                Err(e) => anyhow::bail!("cannot write stock of {sku}: {e}"),
            }
        }
    }
}

fn key(sku: &str) -> String {
    format!("sku.{sku}")
}

/// Parses a stock list such as `apple=100,pear=50`.
pub fn parse_stock(text: &str) -> Result<Vec<(String, u32)>, String> {
    text.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| {
            let (sku, n) = part
                .split_once('=')
                .ok_or_else(|| format!("stock entry {part:?} is not SKU=COUNT"))?;
            let n = n
                .trim()
                .parse::<u32>()
                .map_err(|e| format!("stock entry {part:?}: count {n:?} is not a number: {e}"))?;
            Ok((sku.trim().to_owned(), n))
        })
        .collect()
}

/// Starts Seller: seeds the stock (what is not stocked yet) and serves `reserve` and
/// `release`, recording each run in `ledger` if there is one.
pub async fn run(
    nats: async_nats::Client,
    stock: &[(String, u32)],
    concurrency: usize,
    ledger: Option<Ledger>,
) -> anyhow::Result<Participant> {
    let store = StockStore::open(nats.clone()).await?;
    for (sku, n) in stock {
        if store.seed(sku, *n).await? {
            info!(sku, available = n, "stocked");
        }
    }
    let reserve_store = store.clone();
    let events = nats.clone();
    let release_ledger = ledger.clone();
    let participant = Participant::builder(nats, "seller")
        .action("reserve", move |cmd: Command<Order>| {
            let (store, events, ledger) = (reserve_store.clone(), events.clone(), ledger.clone());
            async move {
                let begun = ledger.as_ref().map(Ledger::begin);
                match store.reserve(&cmd.input).await.map_err(|e| StepError::transient(e.to_string()))? {
                    Reserved::Yes(r) => {
                        info!(order = %cmd.input.id, sku = %r.sku, quantity = r.quantity, remaining = r.remaining, "reserved");
                        // Seller's own event, tagged with the saga: whoever follows
                        // `domain.seller.>` learns of it, and the console shows it with the saga.
                        let id = format!("seller.reserved.{}", cmd.saga_id);
                        let event = saga_nats::follow::publish_saga_event(&events, &cmd.saga_id, "seller.reserved", &id, &r);
                        if let Err(e) = event.await {
                            warn!(order = %cmd.input.id, error = %e, "the reserved event was not published");
                        }
                        if let Some(begun) = &begun {
                            begun.finished("seller", "reserve", &cmd, false).await?;
                        }
                        Ok(r)
                    }
                    Reserved::Refused(why) => {
                        info!(order = %cmd.input.id, "refused: {why}");
                        Err(StepError::business(why))
                    }
                }
            }
        })
        .compensation("release", move |cmd: Command<Order>| {
            let (store, ledger) = (store.clone(), release_ledger.clone());
            async move {
                let begun = ledger.as_ref().map(Ledger::begin);
                let n = store.release(&cmd.input).await.map_err(|e| StepError::transient(e.to_string()))?;
                info!(order = %cmd.input.id, sku = %cmd.input.sku, quantity = n, "released");
                if let Some(begun) = &begun {
                    let had_output = cmd.action_output::<Reservation>().is_some();
                    begun.finished("seller", "release", &cmd, had_output).await?;
                }
                Ok(())
            }
        })
        .concurrency(concurrency)
        .start()
        .await?;
    Ok(participant)
}

#[cfg(test)]
mod tests {
    use super::parse_stock;

    #[test]
    fn stock_lists_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_stock("apple=3, pear=0").unwrap(),
            vec![("apple".to_owned(), 3), ("pear".to_owned(), 0)]
        );
        assert_eq!(parse_stock("").unwrap(), vec![]);
        assert!(parse_stock("apple").unwrap_err().contains("not SKU=COUNT"));
        assert!(parse_stock("apple=x").unwrap_err().contains("not a number"));
    }
}
