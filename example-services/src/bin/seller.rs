//! `seller`: the Seller service (step `reserve-items`: `reserve`, compensation `release`).

use clap::Parser;
use example_services::seller;
use saga_nats::NatsOptions;
use tracing::info;

/// The Seller service of the saga demo: reserves items from a durable stock and releases
/// them when a saga compensates; refuses when stock runs out.
#[derive(Debug, Parser)]
#[command(name = "seller", version, about, long_about)]
struct Args {
    /// Initial stock, SKU=COUNT comma-separated; SKUs already stocked keep their stock.
    #[arg(long, env = "SELLER_STOCK", default_value = "apple=200,pear=200,plum=200")]
    stock: String,
    /// Commands handled at once.
    #[arg(long, env = "SELLER_CONCURRENCY", default_value_t = 32)]
    concurrency: usize,
    #[command(flatten)]
    nats: NatsOptions,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    saga_coordinator::init_logging("info");
    saga_coordinator::init_telemetry("seller");
    let args = Args::parse();
    let stock = seller::parse_stock(&args.stock).map_err(|e| anyhow::anyhow!("--stock: {e}"))?;
    let nats = args.nats.connect("seller").await?;
    let participant = seller::run(nats, &stock, args.concurrency, None).await?;
    info!("seller ready");
    saga_coordinator::shutdown_signal().await;
    participant.shutdown().await;
    saga_nats::spans::shutdown();
    info!("seller stopped");
    Ok(())
}
