//! `saga-chaos`: the demo stack under load while random processes are killed with SIGKILL,
//! then an audit from NATS state. See `saga_tests::chaos` and RELIABILITY.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use example_services::ledger::Ledger;
use example_services::logistics::LogisticsConfig;
use example_services::payments::PaymentsConfig;
use example_services::{logistics, notification, payments, seller};
use saga_tests::chaos::{self, ChaosConfig};

/// Runs the demo stack (coordinator replicas, two instances of each service, a nats-server)
/// under a steady load of orders while killing a random process with SIGKILL at random
/// instants and starting it again; then audits from NATS state alone: every saga ended, no
/// effect ran twice, no compensation lacked its action's recorded output, the stock balances,
/// one notification per order, the payments balance, work queues empty, no dead letters.
/// Prints the figures and exits 1 when anything is wrong (2 when the run itself could not be
/// made).
///
/// Example: `saga-chaos --sagas 10000 --rate 40 --kills 200` (RELIABILITY.md).
#[derive(Debug, Parser)]
#[command(name = "saga-chaos", version, about, long_about)]
struct Args {
    #[command(subcommand)]
    serve: Option<Serve>,
    /// Orders placed.
    #[arg(long, default_value_t = 1000)]
    sagas: usize,
    /// Orders placed per second.
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// Processes killed while the orders are placed.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Coordinator replicas.
    #[arg(long, default_value_t = 3)]
    coordinators: usize,
    /// Instances of each service.
    #[arg(long, default_value_t = 2)]
    instances: usize,
    /// Never kill the nats-server (or a node of the cluster).
    #[arg(long)]
    spare_server: bool,
    /// Run a JetStream cluster of this many nats-server nodes (3) instead of one server,
    /// every stream and bucket on 3 replicas; server kills alternate between the saga log's
    /// stream leader and a follower, one node down at a time.
    #[arg(long, default_value_t = 1, value_name = "NODES")]
    cluster: usize,
    /// Longest pause between a kill and the restart, in ms.
    #[arg(long, default_value_t = 2000)]
    max_down_ms: u64,
    /// Seconds the sagas may take to end once every order is placed.
    #[arg(long, default_value_t = 180)]
    settle_secs: u64,
    /// Logistics' typical handler time, in ms.
    #[arg(long, default_value_t = 150)]
    logistics_latency_ms: u64,
    /// Seed of the random victims and instants [default: the time].
    #[arg(long)]
    seed: Option<u64>,
    /// Directory for the processes' logs [default: target/chaos/<seed>].
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Serve {
    /// Runs one service of the stack (the harness starts these).
    #[command(hide = true)]
    Serve {
        /// Which.
        role: Role,
        /// The server.
        #[arg(long)]
        nats_url: String,
        /// This process's instance name, recorded with each handler run.
        #[arg(long)]
        instance: String,
        /// Logistics' typical handler time, in ms.
        #[arg(long, default_value_t = 150)]
        logistics_latency_ms: u64,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Role {
    Seller,
    Logistics,
    Notification,
    Payments,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Serve::Serve { role, nats_url, instance, logistics_latency_ms }) = args.serve {
        saga_coordinator::init_logging("warn");
        return match serve(role, &nats_url, &instance, logistics_latency_ms).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{instance}: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    saga_coordinator::init_logging("warn");
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("saga-chaos: cannot find this program: {e}");
            return ExitCode::from(2);
        }
    };
    let coordinator = chaos::sibling(&exe, "saga-coordinator");
    if !coordinator.is_file() {
        eprintln!(
            "saga-chaos: no saga-coordinator next to this program ({}): build both with `cargo build --release -p saga-tests --bins` (./scripts/chaos does)",
            coordinator.display()
        );
        return ExitCode::from(2);
    }
    let seed = args.seed.unwrap_or_else(example_services::ledger::now_ms);
    let config = ChaosConfig {
        sagas: args.sagas,
        rate: args.rate,
        kills: args.kills,
        coordinators: args.coordinators,
        instances: args.instances,
        kill_server: !args.spare_server,
        servers: args.cluster,
        max_down: Duration::from_millis(args.max_down_ms),
        settle: Duration::from_secs(args.settle_secs),
        logistics_latency_ms: args.logistics_latency_ms,
        seed,
        dir: args.dir.unwrap_or_else(|| PathBuf::from(format!("target/chaos/{seed}"))),
        coordinator_exe: coordinator,
        services_exe: exe,
        progress: true,
    };
    eprintln!(
        "saga-chaos: {} orders at {}/s, {} kills, {} coordinators, {} instances of each service, {} nats-server node(s), seed {seed}; logs in {}",
        config.sagas,
        config.rate,
        config.kills,
        config.coordinators,
        config.instances,
        config.servers,
        config.dir.display()
    );
    match chaos::run(config).await {
        Ok(report) => {
            println!("{}", report.render());
            println!(
                "reproduce: saga-chaos --sagas {} --rate {} --kills {} --cluster {} --seed {seed}",
                args.sagas, args.rate, args.kills, args.cluster
            );
            if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("saga-chaos: the run failed: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn serve(role: Role, url: &str, instance: &str, latency_ms: u64) -> anyhow::Result<()> {
    let nats = async_nats::ConnectOptions::new()
        .name(instance)
        .retry_on_initial_connect()
        .connect(url.split(',').collect::<Vec<_>>())
        .await?;
    // A server that just restarted may answer JetStream requests only after a while: keep
    // trying to start for a minute, as a supervisor restarting the service would.
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    let _running = loop {
        match start(role, nats.clone(), instance, latency_ms).await {
            Ok(running) => break running,
            Err(e) if tokio::time::Instant::now() < give_up => {
                eprintln!("{instance}: cannot start yet: {e:#}; trying again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    };
    std::future::pending::<()>().await;
    Ok(())
}

/// Starts the service; what it returns keeps it running.
async fn start(
    role: Role,
    nats: async_nats::Client,
    instance: &str,
    latency_ms: u64,
) -> anyhow::Result<Box<dyn std::any::Any>> {
    let ledger = Some(Ledger::new(nats.clone(), instance));
    Ok(match role {
        Role::Seller => Box::new(seller::run(nats, &[], 32, ledger).await?),
        Role::Logistics => {
            let behaviour = LogisticsConfig {
                latency_ms,
                failure_rate: 0.1,
                timeout_rate: 0.0,
                ..Default::default()
            };
            Box::new(logistics::run(nats, behaviour, 64, ledger).await?)
        }
        Role::Notification => Box::new(notification::run(nats).await?),
        Role::Payments => {
            let behaviour = PaymentsConfig { latency_ms: 100, decline_rate: 0.1 };
            Box::new(payments::run(nats, behaviour).await?)
        }
    })
}
