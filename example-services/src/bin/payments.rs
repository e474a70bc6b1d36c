//! `payments`: the Payments service. It takes no step: it follows `place-order`'s lifecycle
//! events, charges each order once its items are reserved, and publishes
//! `payments.confirmed` or `payments.declined`, which the saga's `payment` step waits for.

use clap::Parser;
use example_services::payments::{self, PaymentsConfig};
use saga_nats::NatsOptions;
use tracing::info;

/// The Payments service of the saga demo: charges an order a while after its items are
/// reserved (as a payment provider would) and publishes the outcome as a domain event, which
/// completes the saga's await step `payment`; declines some orders (the saga compensates)
/// and refunds the orders whose saga was compensated after they were charged.
#[derive(Debug, Parser)]
#[command(name = "payments", version, about, long_about)]
struct Args {
    #[command(flatten)]
    behaviour: PaymentsConfig,
    #[command(flatten)]
    nats: NatsOptions,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    saga_coordinator::init_logging("info");
    saga_coordinator::init_telemetry("payments");
    let args = Args::parse();
    let nats = args.nats.connect("payments").await?;
    let following = payments::run(nats, args.behaviour).await?;
    info!("payments ready");
    saga_coordinator::shutdown_signal().await;
    following.shutdown().await;
    saga_nats::spans::shutdown();
    info!("payments stopped");
    Ok(())
}
