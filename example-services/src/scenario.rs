//! The demo scenario: place a batch of orders, wait for every saga to end, and report what
//! happened — outcomes, latency, the stock before and after, two sagas' timelines, and what
//! Notification sent. `orders batch` (and so `./scripts/demo`) runs it against running
//! services; the integration test runs the same code in-process.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use futures::StreamExt;
use saga_core::{SagaId, SagaStatus};

use crate::draw;
use crate::model::Order;
use crate::notification::{self, Notice};
use crate::orders::{OrderView, Orders};
use crate::payments::{self, Payment, PaymentStore};
use crate::seller::{Stock, StockStore};

/// What to run.
#[derive(Debug, Clone)]
pub struct ScenarioConfig {
    /// How many orders.
    pub orders: usize,
    /// Orders placed at once.
    pub concurrency: usize,
    /// How long every saga together may take to end.
    pub timeout: Duration,
    /// Prefix of this run's order ids (so runs against one server do not collide).
    pub run_id: String,
    /// The SKUs ordered.
    pub skus: Vec<String>,
    /// The most items in one order.
    pub max_quantity: u32,
    /// Show progress on stderr.
    pub progress: bool,
}

impl Default for ScenarioConfig {
    fn default() -> Self {
        ScenarioConfig {
            orders: 200,
            concurrency: 32,
            timeout: Duration::from_secs(120),
            run_id: format!("o{}", unix_secs() % 100_000_000),
            skus: vec!["apple".into(), "pear".into(), "plum".into()],
            max_quantity: 5,
            progress: true,
        }
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

const CUSTOMERS: [&str; 6] = ["ada", "alan", "grace", "edsger", "barbara", "donald"];

impl ScenarioConfig {
    /// The run's orders: customer, SKU and quantity drawn deterministically from the id.
    pub fn make_orders(&self) -> Vec<Order> {
        (0..self.orders)
            .map(|n| {
                let id = format!("{}-{n:04}", self.run_id);
                let pick = |what: &str, len: usize| {
                    ((draw(&format!("{id}/{what}")) * len as f64) as usize).min(len - 1)
                };
                Order {
                    customer: CUSTOMERS[pick("customer", CUSTOMERS.len())].to_owned(),
                    sku: self.skus[pick("sku", self.skus.len())].clone(),
                    quantity: pick("quantity", self.max_quantity as usize) as u32 + 1,
                    id,
                }
            })
            .collect()
    }
}

/// One order's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The order.
    pub order: Order,
    /// Its saga.
    pub saga_id: SagaId,
    /// Its saga at the end (`None`: it did not end in time, or could not be read).
    pub view: Option<OrderView>,
    /// Why it could not be placed or followed, if so.
    pub error: Option<String>,
}

impl Outcome {
    /// The saga's final status, if it has one.
    pub fn status(&self) -> Option<SagaStatus> {
        self.view.as_ref().map(|v| v.status)
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// Every order's outcome.
    pub outcomes: Vec<Outcome>,
    /// Stock before the run, by SKU.
    pub stock_before: BTreeMap<String, Stock>,
    /// Stock after the run, by SKU.
    pub stock_after: BTreeMap<String, Stock>,
    /// The notifications sent for this run's orders.
    pub notifications: Vec<Notice>,
    /// This run's orders' payments, by order id.
    pub payments: BTreeMap<String, Payment>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// Runs the scenario against the running services.
pub async fn run(
    nats: async_nats::Client,
    orders: &Orders,
    config: &ScenarioConfig,
) -> anyhow::Result<ScenarioReport> {
    let stock = StockStore::open(nats.clone()).await?;
    let stock_before = stock.all().await?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + config.timeout;
    let batch = config.make_orders();

    let mut progress = Progress::new("placing", batch.len(), config.progress);
    let placed: Vec<(Order, Result<SagaId, String>)> = futures::stream::iter(batch)
        .map(|order| async move {
            let id = orders.place(&order).await.map_err(|e| e.to_string());
            (order, id)
        })
        .buffer_unordered(config.concurrency.max(1))
        .inspect(|_| progress.advance())
        .collect()
        .await;
    progress.finish();

    let mut progress = Progress::new("sagas ended", placed.len(), config.progress);
    let outcomes: Vec<Outcome> = futures::stream::iter(placed)
        .map(|(order, placed)| async move {
            let saga_id = saga_nats::SagaClient::id_for_key(crate::PLACE_ORDER, &order.id);
            let (view, error) = match placed {
                Err(e) => (None, Some(format!("not placed: {e}"))),
                Ok(_) => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match orders.client().wait(&saga_id, left).await {
                        Ok(saga) => match orders.client().timeline(&saga_id).await {
                            Ok(entries) => {
                                (Some(OrderView::of(&order.id, &saga.snapshot, &entries)), None)
                            }
                            Err(e) => (None, Some(e.to_string())),
                        },
                        Err(e) => (None, Some(e.to_string())),
                    }
                }
            };
            Outcome { order, saga_id, view, error }
        })
        .buffer_unordered(256)
        .inspect(|_| progress.advance())
        .collect()
        .await;
    progress.finish();

    let notifications = await_notifications(nats.clone(), &outcomes).await?;
    let payments = await_payments(&nats, &outcomes).await?;
    Ok(ScenarioReport {
        outcomes,
        stock_before,
        stock_after: stock.all().await?,
        notifications,
        payments,
        elapsed: started.elapsed(),
    })
}

/// Payments refunds compensated orders asynchronously, too: give it a few seconds to settle
/// this run's orders (until no order's payment contradicts how its saga ended).
async fn await_payments(
    nats: &async_nats::Client,
    outcomes: &[Outcome],
) -> anyhow::Result<BTreeMap<String, Payment>> {
    let store = PaymentStore::open(nats).await?;
    let give_up = Instant::now() + Duration::from_secs(15);
    loop {
        let mut all = store.all().await?;
        let mine: BTreeMap<String, Payment> = outcomes
            .iter()
            .filter_map(|o| all.remove(&o.order.id).map(|p| (o.order.id.clone(), p)))
            .collect();
        if payment_problems(outcomes, &mine).is_empty() || Instant::now() > give_up {
            return Ok(mine);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What is wrong with the payments, if anything: every completed order is charged (once: one
/// record per order), and no order whose saga did not complete keeps a charge.
fn payment_problems(outcomes: &[Outcome], payments: &BTreeMap<String, Payment>) -> Vec<String> {
    outcomes
        .iter()
        .filter_map(|o| {
            let status = o.status().filter(|s| s.is_terminal())?;
            payments::mismatch(&o.order.id, status, payments.get(&o.order.id).map(|p| p.status))
        })
        .collect()
}

/// Notification follows events asynchronously: give it a few seconds to catch up with the
/// sagas that ended.
async fn await_notifications(
    nats: async_nats::Client,
    outcomes: &[Outcome],
) -> anyhow::Result<Vec<Notice>> {
    let ours: BTreeSet<String> = outcomes.iter().map(|o| o.saga_id.to_string()).collect();
    let ended = outcomes.iter().filter(|o| o.status().is_some_and(|s| s.is_terminal())).count();
    let give_up = Instant::now() + Duration::from_secs(15);
    loop {
        let mine: Vec<Notice> = notification::sent(nats.clone())
            .await?
            .into_iter()
            .filter(|n| ours.contains(&n.saga_id))
            .collect();
        if mine.len() >= ended || Instant::now() > give_up {
            return Ok(mine);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl ScenarioReport {
    /// Orders whose saga ended with `status`.
    pub fn count(&self, status: SagaStatus) -> usize {
        self.outcomes.iter().filter(|o| o.status() == Some(status)).count()
    }

    /// Orders whose saga did not end (or could not be followed).
    pub fn unfinished(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| !o.status().is_some_and(|s| s.is_terminal())).collect()
    }

    /// Start-to-end latencies of the ended sagas, in milliseconds, sorted.
    pub fn latencies_ms(&self) -> Vec<u64> {
        let mut l: Vec<u64> = self
            .outcomes
            .iter()
            .filter_map(|o| o.view.as_ref().filter(|v| v.status.is_terminal()))
            .map(|v| v.elapsed_ms)
            .collect();
        l.sort_unstable();
        l
    }

    /// How long the sagas that got a payment event waited for it, in milliseconds, sorted
    /// (from their timelines: `awaiting payment` to the step's success or failure).
    pub fn payment_waits_ms(&self) -> Option<Vec<u64>> {
        let mut waits: Vec<u64> = self
            .outcomes
            .iter()
            .filter_map(|o| o.view.as_ref())
            .filter_map(|v| {
                let began = v.timeline.iter().find(|e| e.what.starts_with("awaiting payment"))?;
                let ended = v.timeline.iter().find(|e| {
                    e.what.starts_with("succeeded payment") || e.what.starts_with("failed payment")
                })?;
                Some(ended.offset_ms.saturating_sub(began.offset_ms))
            })
            .collect();
        waits.sort_unstable();
        (!waits.is_empty()).then_some(waits)
    }

    /// Items the completed orders hold, by SKU.
    pub fn held_by_completed(&self) -> BTreeMap<String, u32> {
        let mut held = BTreeMap::new();
        for o in self.outcomes.iter().filter(|o| o.status() == Some(SagaStatus::Completed)) {
            *held.entry(o.order.sku.clone()).or_insert(0) += o.order.quantity;
        }
        held
    }

    /// What is wrong with the stock, if anything: for every SKU, available stock after the
    /// run must be what it was before minus what this run's completed orders hold.
    pub fn stock_problems(&self) -> Vec<String> {
        let held = self.held_by_completed();
        let skus: BTreeSet<&String> =
            self.stock_before.keys().chain(self.stock_after.keys()).chain(held.keys()).collect();
        let mut problems = Vec::new();
        for sku in skus {
            let before = self.stock_before.get(sku).map_or(0, |s| s.available);
            let after = self.stock_after.get(sku).map_or(0, |s| s.available);
            let held = held.get(sku).copied().unwrap_or(0);
            if u64::from(before) != u64::from(after) + u64::from(held) {
                problems.push(format!(
                    "{sku}: {before} available before, {after} after, but completed orders hold {held}"
                ));
            }
        }
        problems
    }

    /// What is wrong with the notifications, if anything: exactly one per ended order.
    pub fn notification_problems(&self) -> Vec<String> {
        let mut per_saga: BTreeMap<&str, usize> = BTreeMap::new();
        for n in &self.notifications {
            *per_saga.entry(n.saga_id.as_str()).or_insert(0) += 1;
        }
        let mut problems = Vec::new();
        for o in &self.outcomes {
            let ended = o.status().is_some_and(|s| s.is_terminal());
            let sent = per_saga.get(o.saga_id.as_str()).copied().unwrap_or(0);
            if ended && sent != 1 {
                problems.push(format!("order {}: {sent} notifications, expected 1", o.order.id));
            }
        }
        problems
    }

    /// What is wrong with the payments, if anything: every completed order is charged, and
    /// every other ended order is not (declined, refunded, or never charged).
    pub fn payment_problems(&self) -> Vec<String> {
        payment_problems(&self.outcomes, &self.payments)
    }

    /// This run's payments, counted by status.
    pub fn payment_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for p in self.payments.values() {
            *counts.entry(p.status.as_str()).or_insert(0) += 1;
        }
        counts
    }

    /// Whether every saga ended and the books balance.
    pub fn is_ok(&self) -> bool {
        self.unfinished().is_empty()
            && self.stock_problems().is_empty()
            && self.payment_problems().is_empty()
            && self.notification_problems().is_empty()
    }

    /// Writes the summary, two timelines and the notifications.
    pub fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        let completed = self.count(SagaStatus::Completed);
        let compensated = self.count(SagaStatus::Compensated);
        let other = self.outcomes.len() - completed - compensated;
        writeln!(out, "\n== summary: {} orders in {:.1?}", self.outcomes.len(), self.elapsed)?;
        writeln!(out, "  completed    {completed:>6}")?;
        writeln!(out, "  compensated  {compensated:>6}")?;
        for (why, n) in self.compensation_reasons() {
            writeln!(out, "      {n:>5} × {why}")?;
        }
        writeln!(out, "  other        {other:>6}")?;
        for o in self.unfinished().iter().take(10) {
            let state = o.status().map_or("unknown".to_owned(), |s| s.to_string());
            let why = o.error.as_deref().unwrap_or("");
            writeln!(out, "      {} ({}): {state} {why}", o.order.id, o.saga_id)?;
        }
        let l = self.latencies_ms();
        if !l.is_empty() {
            writeln!(
                out,
                "  latency, start to end: p50 {} ms, p99 {} ms, max {} ms",
                percentile(&l, 50.0),
                percentile(&l, 99.0),
                l[l.len() - 1]
            )?;
        }
        let held = self.held_by_completed();
        writeln!(out, "\n== stock (seller)")?;
        for (sku, after) in &self.stock_after {
            let before = self.stock_before.get(sku).map_or(0, |s| s.available);
            let h = held.get(sku).copied().unwrap_or(0);
            writeln!(
                out,
                "  {sku:<8} {before:>5} before → {:>5} after; this run's completed orders hold {h}",
                after.available
            )?;
        }
        match self.stock_problems().as_slice() {
            [] => {
                writeln!(out, "  check: before − after = held by completed orders, for every SKU")?
            }
            problems => {
                for p in problems {
                    writeln!(out, "  MISMATCH {p}")?;
                }
            }
        }
        writeln!(out, "\n== payments (the saga's await step `payment` waits for their events)")?;
        let counts = self.payment_counts();
        let line: Vec<String> = counts.iter().map(|(s, n)| format!("{s} {n}")).collect();
        writeln!(out, "  {}", if line.is_empty() { "none".to_owned() } else { line.join(", ") })?;
        if let Some(waits) = self.payment_waits_ms() {
            writeln!(
                out,
                "  waited for the payment event: p50 {} ms, p99 {} ms",
                percentile(&waits, 50.0),
                percentile(&waits, 99.0)
            )?;
        }
        match self.payment_problems().as_slice() {
            [] => writeln!(
                out,
                "  check: every completed order is charged, every other ended order is not"
            )?,
            problems => {
                for p in problems.iter().take(10) {
                    writeln!(out, "  MISMATCH {p}")?;
                }
            }
        }
        for (title, status) in [
            ("a completed order", SagaStatus::Completed),
            ("a compensated order", SagaStatus::Compensated),
        ] {
            // The most eventful one shows the most (retries, timeouts).
            let pick = self
                .outcomes
                .iter()
                .filter_map(|o| o.view.as_ref())
                .filter(|v| v.status == status)
                .max_by_key(|v| v.timeline.len());
            if let Some(view) = pick {
                write_timeline(out, title, view)?;
            }
        }
        writeln!(
            out,
            "\n== notification sent {} messages (one per ended order)",
            self.notifications.len()
        )?;
        for n in self.notifications.iter().take(5) {
            writeln!(out, "  [{}] {}", n.outcome, n.message)?;
        }
        if self.notifications.len() > 5 {
            writeln!(out, "  … and {} more", self.notifications.len() - 5)?;
        }
        for p in self.notification_problems().iter().take(10) {
            writeln!(out, "  MISSING {p}")?;
        }
        Ok(())
    }

    fn compensation_reasons(&self) -> Vec<(String, usize)> {
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for v in self.outcomes.iter().filter_map(|o| o.view.as_ref()) {
            if v.status == SagaStatus::Compensated {
                // "step reserve-items failed: out of stock: 3 apple wanted, 1 available"
                // → "step reserve-items failed: out of stock"
                let mut reason = v.reason.clone().unwrap_or_default();
                // "… event domain.payments.declined (sequence 812): card declined": one line
                // for them all.
                if let Some(at) = reason.find(" (sequence ") {
                    let end = reason[at..].find(')').map_or(reason.len(), |n| at + n + 1);
                    reason.replace_range(at..end, "");
                }
                let short = match reason.match_indices(": ").nth(1) {
                    Some((at, _)) => reason[..at].to_owned(),
                    None => reason,
                };
                *reasons.entry(short).or_insert(0) += 1;
            }
        }
        reasons.into_iter().collect()
    }
}

fn write_timeline(out: &mut impl Write, title: &str, view: &OrderView) -> std::io::Result<()> {
    writeln!(out, "\n== timeline of {title}: {} (saga {})", view.order_id, view.saga_id)?;
    if let Some(o) = &view.order {
        writeln!(out, "  {} orders {} × {}", o.customer, o.quantity, o.sku)?;
    }
    for e in &view.timeline {
        writeln!(out, "  {:>+7} ms  {}", e.offset_ms, e.what)?;
    }
    Ok(())
}

/// The `p`th percentile of sorted `values` (nearest rank).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A progress indication on stderr: a bar redrawn in place on a terminal, a line per
/// quarter otherwise (logs, CI).
struct Progress {
    label: &'static str,
    total: usize,
    done: usize,
    enabled: bool,
    tty: bool,
    started: Instant,
}

impl Progress {
    fn new(label: &'static str, total: usize, enabled: bool) -> Progress {
        let tty = std::io::stderr().is_terminal();
        Progress { label, total, done: 0, enabled, tty, started: Instant::now() }
    }

    fn advance(&mut self) {
        self.done += 1;
        if !self.enabled || self.total == 0 {
            return;
        }
        if self.tty {
            let width = 30;
            let filled = self.done * width / self.total;
            eprint!(
                "\r  {:<12} [{}{}] {}/{} {:.1?}",
                self.label,
                "#".repeat(filled),
                ".".repeat(width - filled),
                self.done,
                self.total,
                self.started.elapsed()
            );
        } else if self.done == self.total
            || (self.done * 4 / self.total) > ((self.done - 1) * 4 / self.total)
        {
            eprintln!(
                "  {:<12} {}/{} ({:.1?})",
                self.label,
                self.done,
                self.total,
                self.started.elapsed()
            );
        }
    }

    fn finish(&self) {
        if self.enabled && self.tty {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn orders_are_deterministic_and_valid() {
        let config = ScenarioConfig { orders: 50, run_id: "r1".into(), ..Default::default() };
        let a = config.make_orders();
        assert_eq!(a, config.make_orders());
        assert_eq!(a.len(), 50);
        assert_eq!(a[7].id, "r1-0007");
        assert!(a.iter().all(|o| o.validate().is_ok() && (1..=5).contains(&o.quantity)));
        let skus: BTreeSet<&str> = a.iter().map(|o| o.sku.as_str()).collect();
        assert_eq!(skus.len(), 3, "all SKUs are ordered: {skus:?}");
    }
}
