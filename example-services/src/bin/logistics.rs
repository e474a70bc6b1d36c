//! `logistics`: the Logistics service (step `schedule-shipment`: `schedule`, compensation
//! `cancel`).

use clap::Parser;
use example_services::logistics::{self, LogisticsConfig};
use saga_nats::NatsOptions;
use tracing::info;

/// The Logistics service of the saga demo: schedules shipments and cancels them when a saga
/// compensates. Its latency, failure rate and timeout rate are settable, so retries,
/// timeouts and compensations show.
#[derive(Debug, Parser)]
#[command(name = "logistics", version, about, long_about)]
struct Args {
    #[command(flatten)]
    behaviour: LogisticsConfig,
    /// Commands handled at once.
    #[arg(long, env = "LOGISTICS_CONCURRENCY", default_value_t = 64)]
    concurrency: usize,
    #[command(flatten)]
    nats: NatsOptions,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    saga_coordinator::init_logging("info");
    saga_coordinator::init_telemetry("logistics");
    let args = Args::parse();
    let nats = args.nats.connect("logistics").await?;
    let participant = logistics::run(nats, args.behaviour, args.concurrency, None).await?;
    info!("logistics ready");
    saga_coordinator::shutdown_signal().await;
    participant.shutdown().await;
    saga_nats::spans::shutdown();
    info!("logistics stopped");
    Ok(())
}
