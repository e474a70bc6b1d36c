//! The `saga-coordinator` command line: flags, environment, config file, logging, signals.
//! Its [`init_logging`] and [`shutdown_signal`] serve the demo services too.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use saga_core::SagaDefinition;
use saga_nats::{Coordinator, CoordinatorConfig, ProvisionConfig};
use tracing::{error, info};

/// Runs the saga coordinator: starts sagas, sends each step's command, records every outcome
/// in NATS JetStream and decides what comes next. Run as many replicas as you like; they
/// share the work with no leader.
///
/// Every flag can also be set by the environment variable shown, or in a TOML file given by
/// --config (keys are the long flag names with '_' for '-', e.g. nats_url = "...").
#[derive(Debug, Parser, serde::Deserialize, Default)]
#[command(name = "saga-coordinator", version, about, long_about)]
#[serde(default, deny_unknown_fields)]
struct Args {
    /// A TOML file with any of these settings; flags and environment override it.
    #[arg(long, env = "SAGA_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,

    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "NATS_URL")]
    nats_url: Option<String>,

    /// NATS credentials file (JWT + nkey seed).
    #[arg(long, env = "NATS_CREDS")]
    creds: Option<PathBuf>,

    /// NATS nkey seed file.
    #[arg(long, env = "NATS_NKEY")]
    nkey: Option<PathBuf>,

    /// NATS user (with --password).
    #[arg(long, env = "NATS_USER")]
    user: Option<String>,

    /// NATS password (with --user).
    #[arg(long, env = "NATS_PASSWORD", hide_env_values = true)]
    password: Option<String>,

    /// NATS token.
    #[arg(long, env = "NATS_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// CA certificate (PEM) to verify the server's TLS certificate.
    #[arg(long, env = "NATS_TLS_CA")]
    tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS (with --tls-key).
    #[arg(long, env = "NATS_TLS_CERT")]
    tls_cert: Option<PathBuf>,

    /// Client key (PEM) for mutual TLS (with --tls-cert).
    #[arg(long, env = "NATS_TLS_KEY")]
    tls_key: Option<PathBuf>,

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

    /// Log filter (error, warn, info, debug, trace, or per-module: saga_nats=debug).
    #[arg(long, env = "RUST_LOG")]
    log: Option<String>,
}

impl Args {
    /// Fills what flags and environment left unset from the config file.
    fn merge(self, file: Args) -> Args {
        Args {
            config: self.config,
            nats_url: self.nats_url.or(file.nats_url),
            creds: self.creds.or(file.creds),
            nkey: self.nkey.or(file.nkey),
            user: self.user.or(file.user),
            password: self.password.or(file.password),
            token: self.token.or(file.token),
            tls_ca: self.tls_ca.or(file.tls_ca),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            definitions: self.definitions.or(file.definitions),
            workers: self.workers.or(file.workers),
            ack_wait_secs: self.ack_wait_secs.or(file.ack_wait_secs),
            retention_hours: self.retention_hours.or(file.retention_hours),
            replicas: self.replicas.or(file.replicas),
            replica_name: self.replica_name.or(file.replica_name),
            log: self.log.or(file.log),
        }
    }
}

/// Runs the coordinator command line with the process's arguments; returns the exit code.
pub async fn main() -> ExitCode {
    let mut args = Args::parse();
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
    match run(args).await {
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
    let url = args.nats_url.clone().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let client = connect(&args, &url).await?;
    info!(%url, "connected to NATS");
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
        ..Default::default()
    };
    let coordinator = Coordinator::start(client, config).await?;
    shutdown_signal().await;
    info!("signal received: finishing in-flight work");
    coordinator.shutdown().await;
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

async fn connect(args: &Args, url: &str) -> Result<async_nats::Client, Box<dyn std::error::Error>> {
    let mut opts = async_nats::ConnectOptions::new().name("saga-coordinator");
    if let Some(creds) = &args.creds {
        opts = opts.credentials_file(creds).await?;
    }
    if let Some(nkey) = &args.nkey {
        let seed = std::fs::read_to_string(nkey)
            .map_err(|e| format!("cannot read nkey file {}: {e}", nkey.display()))?;
        opts = opts.nkey(seed.trim().to_owned());
    }
    if let (Some(user), Some(password)) = (&args.user, &args.password) {
        opts = opts.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &args.token {
        opts = opts.token(token.clone());
    }
    if let Some(ca) = &args.tls_ca {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
    }
    opts.connect(url).await.map_err(|e| format!("cannot connect to NATS at {url}: {e}").into())
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

/// Installs a `tracing` subscriber that logs to stderr, filtered by `RUST_LOG` or `default`
/// (e.g. `info`, `saga_nats=debug`). Does nothing if one is installed already.
pub fn init_logging(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
