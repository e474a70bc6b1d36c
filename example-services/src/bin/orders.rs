//! `orders`: the Orders service. `orders serve` runs the HTTP API; `orders batch` places a
//! batch of orders, waits for every saga to end and prints a report (the demo).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use example_services::orders::{router, Orders};
use example_services::scenario::{self, ScenarioConfig};
use saga_nats::ErrorKind;
use saga_nats::NatsOptions;
use tracing::info;

/// The Orders service of the saga demo: places orders, each starting a `place-order` saga.
#[derive(Debug, Parser)]
#[command(name = "orders", version, about, long_about)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    nats: NatsOptions,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the HTTP API: POST /orders, GET /orders/{id}.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "ORDERS_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Place a batch of orders, wait for every saga to end, and report what happened. Exits
    /// 1 if a saga did not end, the stock does not balance, or a notification is missing.
    Batch {
        /// How many orders.
        #[arg(long, default_value_t = 200)]
        count: usize,
        /// Orders placed at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Seconds every saga together may take to end.
        #[arg(long, default_value_t = 120)]
        timeout_secs: u64,
        /// SKUs ordered, comma-separated.
        #[arg(long, default_value = "apple,pear,plum", value_delimiter = ',')]
        skus: Vec<String>,
        /// Prefix of the order ids [default: derived from the time].
        #[arg(long)]
        run_id: Option<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    saga_coordinator::init_logging(match args.command {
        Cmd::Serve { .. } => "info",
        Cmd::Batch { .. } => "warn",
    });
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("orders: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let nats = args.nats.connect("orders").await?;
    let orders = Orders::new(nats.clone()).await?;
    match args.command {
        Cmd::Serve { listen } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
            info!(%listen, "orders API listening: POST /orders, GET /orders/{{id}}");
            axum::serve(listener, router(Arc::new(orders)))
                .with_graceful_shutdown(saga_coordinator::shutdown_signal())
                .await?;
            info!("orders stopped");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Batch { count, concurrency, timeout_secs, skus, run_id } => {
            let defaults = ScenarioConfig::default();
            let config = ScenarioConfig {
                orders: count,
                concurrency,
                timeout: Duration::from_secs(timeout_secs),
                run_id: run_id.unwrap_or(defaults.run_id.clone()),
                skus,
                ..defaults
            };
            wait_for_definition(&orders).await?;
            wait_for_stock(nats.clone()).await?;
            eprintln!("placing {count} orders ({concurrency} at a time), run {}", config.run_id);
            let report = scenario::run(nats, &orders, &config).await?;
            report.print(&mut std::io::stdout().lock())?;
            if report.is_ok() {
                println!("\nevery saga ended; stock, payments and notifications balance");
                Ok(ExitCode::SUCCESS)
            } else {
                println!(
                    "\nFAILED: {} sagas did not end, {} stock mismatches, {} payment mismatches, {} notification problems",
                    report.unfinished().len(),
                    report.stock_problems().len(),
                    report.payment_problems().len(),
                    report.notification_problems().len()
                );
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

/// The coordinator registers `place-order` when it starts; a batch started alongside it (as
/// under docker compose) waits for that rather than failing.
async fn wait_for_definition(orders: &Orders) -> anyhow::Result<()> {
    let what = format!("a coordinator to register {}", example_services::PLACE_ORDER);
    wait_for(&what, "is the coordinator running with --definitions?", || async {
        match orders.client().definition(example_services::PLACE_ORDER).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::UnknownSaga => Ok(false),
            Err(e) => Err(e.into()),
        }
    })
    .await
}

/// The scenario checks the stock before and after: wait until the seller has stocked it.
async fn wait_for_stock(nats: async_nats::Client) -> anyhow::Result<()> {
    let store = example_services::seller::StockStore::open(nats).await?;
    wait_for("the seller to stock its shelves", "is the seller running?", || async {
        Ok(!store.all().await?.is_empty())
    })
    .await
}

/// Polls `ready` every half second for up to a minute, saying once what it waits for; `hint`
/// says what to check if it never comes.
async fn wait_for<F, Fut>(what: &str, hint: &str, mut ready: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut said = false;
    while !ready().await? {
        if tokio::time::Instant::now() > give_up {
            anyhow::bail!("waited 60 s for {what}; {hint}");
        }
        if !said {
            eprintln!("waiting for {what}");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}
