//! `notification`: the Notification service. It takes no step: it follows `place-order`'s
//! lifecycle events and notifies the customer when an order ends.

use clap::Parser;
use example_services::notification;
use saga_nats::NatsOptions;
use tracing::info;

/// The Notification service of the saga demo: follows saga events (choreography) and
/// notifies the customer when an order completes, is compensated or is cancelled.
#[derive(Debug, Parser)]
#[command(name = "notification", version, about, long_about)]
struct Args {
    #[command(flatten)]
    nats: NatsOptions,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    saga_coordinator::init_logging("info");
    saga_coordinator::init_telemetry("notification");
    let args = Args::parse();
    let nats = args.nats.connect("notification").await?;
    let following = notification::run(nats).await?;
    info!("notification ready");
    saga_coordinator::shutdown_signal().await;
    following.shutdown().await;
    saga_nats::spans::shutdown();
    info!("notification stopped");
    Ok(())
}
