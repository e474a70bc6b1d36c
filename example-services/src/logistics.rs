//! Logistics: the `schedule-shipment` step. Scheduling takes a while, sometimes fails for
//! good (no courier: the saga compensates) and sometimes hangs past the step's timeout on
//! the first attempt (the coordinator times the attempt out and retries it). Each order draws
//! its fate deterministically from its id, so a run can be repeated.

use std::time::Duration;

use saga_nats::{Command, Participant, StepError};
use tracing::info;

use crate::draw;
use crate::ledger::Ledger;
use crate::model::{Order, Shipment};

/// How Logistics behaves.
#[derive(Debug, Clone, clap::Args)]
pub struct LogisticsConfig {
    /// Typical time to schedule a shipment, in milliseconds (each takes 0.5x to 1.5x).
    #[arg(long, env = "LOGISTICS_LATENCY_MS", default_value_t = 20)]
    pub latency_ms: u64,
    /// Fraction of orders no courier can take (the saga compensates).
    #[arg(long, env = "LOGISTICS_FAILURE_RATE", default_value_t = 0.1)]
    pub failure_rate: f64,
    /// Fraction of orders whose first attempt hangs past the step's timeout (and is retried).
    #[arg(long, env = "LOGISTICS_TIMEOUT_RATE", default_value_t = 0.05)]
    pub timeout_rate: f64,
    /// How long a hanging attempt hangs, in milliseconds (longer than the step's timeout).
    #[arg(long, env = "LOGISTICS_HANG_MS", default_value_t = 1100)]
    pub hang_ms: u64,
}

impl Default for LogisticsConfig {
    fn default() -> Self {
        LogisticsConfig { latency_ms: 20, failure_rate: 0.1, timeout_rate: 0.05, hang_ms: 1100 }
    }
}

impl LogisticsConfig {
    /// Checks the rates, naming the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in
            [("failure rate", self.failure_rate), ("timeout rate", self.timeout_rate)]
        {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} {rate} must be between 0 and 1"));
            }
        }
        Ok(())
    }

    /// Whether no courier can take `order` (the same answer every time).
    pub fn fails(&self, order: &Order) -> bool {
        draw(&format!("{}/courier", order.id)) < self.failure_rate
    }

    /// Whether `order`'s first scheduling attempt hangs.
    pub fn hangs(&self, order: &Order) -> bool {
        draw(&format!("{}/hang", order.id)) < self.timeout_rate
    }
}

const COURIERS: [&str; 3] = ["swift", "steady", "cargo-bike"];

/// Starts Logistics, serving `schedule` and `cancel`, recording each run in `ledger` if there
/// is one.
pub async fn run(
    nats: async_nats::Client,
    config: LogisticsConfig,
    concurrency: usize,
    ledger: Option<Ledger>,
) -> anyhow::Result<Participant> {
    config.validate().map_err(|e| anyhow::anyhow!("logistics: {e}"))?;
    let cancel_ledger = ledger.clone();
    let participant = Participant::builder(nats, "logistics")
        .action("schedule", move |cmd: Command<Order>| {
            let (config, ledger) = (config.clone(), ledger.clone());
            async move {
                let begun = ledger.as_ref().map(Ledger::begin);
                let order = &cmd.input;
                let spread = 0.5 + draw(&format!("{}/latency/{}", order.id, cmd.attempt));
                tokio::time::sleep(Duration::from_millis(config.latency_ms).mul_f64(spread)).await;
                if cmd.attempt == 1 && config.hangs(order) {
                    info!(order = %order.id, "scheduling hangs (the coordinator will time it out)");
                    tokio::time::sleep(Duration::from_millis(config.hang_ms)).await;
                }
                if config.fails(order) {
                    info!(order = %order.id, "no courier available");
                    return Err(StepError::business(format!(
                        "no courier available: order {} ({} x {})",
                        order.id, order.quantity, order.sku
                    )));
                }
                let courier = COURIERS[(draw(&format!("{}/courier-pick", order.id)) * 3.0) as usize];
                let shipment = Shipment { shipment: format!("ship-{}", order.id), courier: courier.to_owned() };
                info!(order = %order.id, shipment = %shipment.shipment, courier, attempt = cmd.attempt, "shipment scheduled");
                if let Some(begun) = &begun {
                    begun.finished("logistics", "schedule", &cmd, false).await?;
                }
                Ok(shipment)
            }
        })
        .compensation("cancel", move |cmd: Command<Order>| {
            let ledger = cancel_ledger.clone();
            async move {
                let begun = ledger.as_ref().map(Ledger::begin);
                let output = cmd.action_output::<Shipment>().transpose()?;
                if let Some(begun) = &begun {
                    begun.finished("logistics", "cancel", &cmd, output.is_some()).await?;
                }
                match output {
                    Some(s) => info!(order = %cmd.input.id, shipment = %s.shipment, "shipment cancelled"),
                    // The schedule's outcome is unknown (it timed out, or this service died
                    // before recording it): its shipment id follows from the order's.
                    None => info!(order = %cmd.input.id, shipment = %format!("ship-{}", cmd.input.id), "shipment cancelled, if it was scheduled"),
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
    use super::*;

    #[test]
    fn rates_are_checked_and_fates_follow_them() {
        let bad = LogisticsConfig { failure_rate: 1.5, ..Default::default() };
        assert_eq!(bad.validate().unwrap_err(), "failure rate 1.5 must be between 0 and 1");
        let never = LogisticsConfig { failure_rate: 0.0, timeout_rate: 0.0, ..Default::default() };
        let always = LogisticsConfig { failure_rate: 1.0, timeout_rate: 1.0, ..Default::default() };
        let order = |i: u32| Order {
            id: format!("o-{i}"),
            customer: "ada".into(),
            sku: "apple".into(),
            quantity: 1,
        };
        assert!((0..100).all(|i| !never.fails(&order(i)) && !never.hangs(&order(i))));
        assert!((0..100).all(|i| always.fails(&order(i)) && always.hangs(&order(i))));
        let some = LogisticsConfig::default();
        let failing = (0..1000).filter(|i| some.fails(&order(*i))).count();
        assert!((50..150).contains(&failing), "{failing} of 1000 fail at rate 0.1");
    }
}
