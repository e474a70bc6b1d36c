//! The `saga-coordinator` command line: flags, environment, config file, logging, signals.
//! Its [`init_logging`] and [`shutdown_signal`] serve the demo services too.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use saga_core::SagaDefinition;
use saga_nats::{Coordinator, CoordinatorConfig, NatsOptions, ProvisionConfig};
use tracing::{error, info, warn};

mod permissions;

/// Runs the saga coordinator: starts sagas, sends each step's command, records every outcome
/// in NATS JetStream and decides what comes next. Run as many replicas as you like; they
/// share the work with no leader.
///
/// Every flag can also be set by the environment variable shown, or in a TOML file given by
/// --config (keys are the long flag names with '_' for '-'; the connection settings go in a
/// [nats] table: url = "nats://...", creds = "/etc/saga/coordinator.creds").
#[derive(Debug, Parser, serde::Deserialize, Default)]
#[command(name = "saga-coordinator", version, about, long_about)]
#[serde(default, deny_unknown_fields)]
struct Args {
    #[command(subcommand)]
    #[serde(skip)]
    command: Option<Command>,

    /// A TOML file with any of these settings; flags and environment override it.
    #[arg(long, env = "SAGA_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,

    /// A directory of saga definitions (*.yaml, *.yml, *.toml, *.json) registered at start.
    #[arg(long, env = "SAGA_DEFINITIONS")]
    definitions: Option<PathBuf>,

    /// Worker tasks; a saga's inputs are handled in order by one of them [default: 32].
    #[arg(long, env = "SAGA_WORKERS")]
    workers: Option<usize>,

    /// Seconds after which another replica takes over the sagas of a replica that stopped
    /// answering (this one confirms its sagas every third of it) [default: 15].
    #[arg(long, env = "SAGA_ACK_WAIT_SECS")]
    ack_wait_secs: Option<u64>,

    /// Hours a saga's log records are kept (a live saga's newest record is kept alive)
    /// [default: 168].
    #[arg(long, env = "SAGA_RETENTION_HOURS")]
    retention_hours: Option<u64>,

    /// JetStream replicas of each stream (3 on a cluster) [default: 1].
    #[arg(long, env = "SAGA_REPLICAS")]
    replicas: Option<usize>,

    /// This replica's name in reply subjects (letters, digits, '_' and '-') [default: random].
    #[arg(long, env = "SAGA_REPLICA_NAME")]
    replica_name: Option<String>,

    /// A key-value bucket a service keeps its own state in, created at start if missing
    /// (services get no right to create streams: docs/SECURITY.md). Repeat for each, or
    /// comma-separate.
    #[arg(long = "kv-bucket", env = "SAGA_KV_BUCKETS", value_delimiter = ',', value_name = "NAME")]
    kv_buckets: Vec<String>,

    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9464); off when unset.
    /// docs/OPERATIONS.md lists the metrics.
    #[arg(long, env = "SAGA_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,

    /// Log filter (error, warn, info, debug, trace, or per-module: saga_nats=debug).
    #[arg(long, env = "RUST_LOG")]
    log: Option<String>,

    /// How to reach NATS (in the config file: a `[nats]` table with `url`, `creds`, `nkey`,
    /// `user`, `password`, `token`, `tls_ca`, `tls_cert`, `tls_key`).
    #[command(flatten)]
    nats: NatsOptions,
}

/// Tools beside running the coordinator.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Write the NATS permissions of every role (coordinator, participants, starters,
    /// followers, operators) from the saga definitions.
    ///
    /// Writes the nats-server `authorization` block (or, with --json, the same permissions for
    /// `nsc`) giving every role only what it needs: the coordinator; each participant service
    /// the definitions name; the services that start or follow sagas; the operators.
    ///
    /// With --keys DIR, each user gets an nkey seed in DIR/<user>.nk (kept if it exists), and the
    /// block names their public keys; each process then connects with `--nkey DIR/<user>.nk
    /// --inbox-prefix _INBOX.<user>`.
    ///
    /// Example, for the demo:
    ///
    ///   saga-coordinator permissions --definitions example-services/sagas \
    ///       --starts orders=place-order --follows notification=place-order \
    ///       --bucket seller=demo_stock --bucket orders=demo_orders \
    ///       --bucket notification=demo_notifications --events seller \
    ///       --operator ops --keys ./keys > auth.conf
    #[command(verbatim_doc_comment)]
    Permissions(permissions::PermissionsArgs),
}

impl Args {
    /// Fills what flags and environment left unset from the config file.
    fn merge(self, file: Args) -> Args {
        Args {
            command: self.command,
            config: self.config,
            nats: self.nats.or(file.nats),
            definitions: self.definitions.or(file.definitions),
            workers: self.workers.or(file.workers),
            ack_wait_secs: self.ack_wait_secs.or(file.ack_wait_secs),
            retention_hours: self.retention_hours.or(file.retention_hours),
            replicas: self.replicas.or(file.replicas),
            replica_name: self.replica_name.or(file.replica_name),
            kv_buckets: if self.kv_buckets.is_empty() { file.kv_buckets } else { self.kv_buckets },
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            log: self.log.or(file.log),
        }
    }
}

/// Runs the coordinator command line with the process's arguments; returns the exit code.
pub async fn main() -> ExitCode {
    let mut args = Args::parse();
    if let Some(Command::Permissions(permissions)) = args.command.take() {
        return match permissions::run(permissions) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("saga-coordinator permissions: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(path) = args.config.clone() {
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("saga-coordinator: cannot read config file {}: {e}", path.display());
                return ExitCode::from(2);
            }
        };
        match toml::from_str::<Args>(&text) {
            Ok(file) => args = args.merge(file),
            Err(e) => {
                eprintln!("saga-coordinator: config file {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    init_logging(args.log.as_deref().unwrap_or("info"));
    init_telemetry("saga-coordinator");
    let result = run(args).await;
    saga_nats::spans::shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("saga-coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let definitions = match &args.definitions {
        Some(dir) => load_definitions(dir)?,
        None => Vec::new(),
    };
    if let Some(addr) = args.metrics_listen {
        serve_metrics(addr).await?;
    }
    let client = args.nats.connect("saga-coordinator").await?;
    info!(url = %args.nats.display_urls(), auth = %args.nats.describe_auth(), "connected to NATS");
    let defaults = ProvisionConfig::default();
    let config = CoordinatorConfig {
        provision: ProvisionConfig {
            ack_wait: args.ack_wait_secs.map_or(defaults.ack_wait, Duration::from_secs),
            finished_retention: args
                .retention_hours
                .map_or(defaults.finished_retention, |h| Duration::from_secs(h * 3600)),
            replicas: args.replicas.unwrap_or(defaults.replicas),
            ..defaults
        },
        workers: args.workers.unwrap_or(32),
        replica: args.replica_name.clone(),
        definitions,
        kv_buckets: args.kv_buckets.clone(),
        ..Default::default()
    };
    // A server that is starting (or restarting) may refuse JetStream requests for a while.
    let give_up =
        tokio::time::Instant::now() + Duration::from_secs(args.nats.wait_secs.unwrap_or(0));
    let coordinator = loop {
        match Coordinator::start(client.clone(), config.clone()).await {
            Ok(coordinator) => break coordinator,
            Err(e) if e.is_transient() && tokio::time::Instant::now() < give_up => {
                warn!("cannot start yet: {e}; trying again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    shutdown_signal().await;
    info!("signal received: finishing in-flight work");
    coordinator.shutdown().await;
    Ok(())
}

/// Installs the Prometheus recorder and serves its rendering on `http://addr/metrics`.
async fn serve_metrics(addr: std::net::SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0,
        ])?
        .install_recorder()?;
    saga_nats::observe::describe();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    let render = handle.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], render.render())
            }
        }),
    );
    info!(url = %format!("http://{}/metrics", listener.local_addr()?), "serving Prometheus metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            error!(error = %e, "the metrics server stopped");
        }
    });
    // Histograms are kept in windows; this keeps them moving when nothing scrapes.
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            handle.run_upkeep();
        }
    });
    Ok(())
}

fn load_definitions(dir: &PathBuf) -> Result<Vec<SagaDefinition>, Box<dyn std::error::Error>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read definitions directory {}: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "toml" | "json"))
        })
        .collect();
    paths.sort();
    let mut defs = Vec::new();
    for path in paths {
        let def = SagaDefinition::load(&path)?;
        def.validate().map_err(|e| format!("{}: {e}", path.display()))?;
        info!(path = %path.display(), saga = %def.name, "loaded saga definition");
        defs.push(def);
    }
    Ok(defs)
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT): what a service waits for before it drains and
/// exits.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Exports saga spans over OTLP when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) variable is set; `OTEL_SERVICE_NAME` overrides
/// `service` (docs/OPERATIONS.md, "Traces"). Call [`saga_nats::spans::shutdown`] before
/// exiting to send what is buffered.
pub fn init_telemetry(service: &str) {
    match saga_nats::spans::init_otlp(service) {
        Ok(true) => info!(
            endpoint = %std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
                .unwrap_or_default(),
            "exporting saga spans over OTLP"
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "cannot export spans over OTLP; running without"),
    }
}

/// Installs a `tracing` subscriber that logs to stderr, filtered by `RUST_LOG` or `default`
/// (e.g. `info`, `saga_nats=debug`). Does nothing if one is installed already.
pub fn init_logging(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
