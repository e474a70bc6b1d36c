//! The chaos harness: the demo stack (several coordinator replicas, two instances of each
//! service, a nats-server or a 3-node JetStream cluster) under a steady load of orders, while
//! a random process is killed with SIGKILL at random instants and started again. On a cluster
//! the server kills alternate between the saga log's stream leader and a follower, one node
//! down at a time, and the harness measures how long leadership takes to move. Afterwards it
//! audits from NATS state alone and lists every problem:
//!
//! - every started saga ended (one left running, compensating or parked is stuck);
//! - no handler ran its effect twice, unless the earlier run's outcome could not have been
//!   recorded (its process or the server was killed after it, or it outlived its timeout);
//! - no compensation ran without its action's output when that output was recorded;
//! - every action of a compensated saga was compensated, and no completed saga compensated;
//! - the stock balances: what each SKU lost is what this run's completed orders hold, and
//!   exactly those orders hold items;
//! - exactly one notification per ended order;
//! - the payments balance: every completed order is charged, and no other ended order keeps a
//!   charge (declined, refunded, or never charged);
//! - nothing left in a work queue, and no dead letters;
//! - on a cluster, every node's replica of the log (read through a connection to that node
//!   alone) gives every saga the status the audit saw.
//!
//! `saga-chaos` (the binary) runs it; `tests/tests/chaos.rs` runs a short version.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, stream};
use example_services::ledger::{now_ms, Ledger, Run};
use example_services::model::Order;
use example_services::notification::NOTIFICATION_BUCKET;
use example_services::orders::Orders;
use example_services::orders::ORDER_BUCKET;
use example_services::payments::{self, PaymentStore};
use example_services::scenario::{percentile, ScenarioConfig};
use example_services::seller::{StockStore, STOCK_BUCKET};
use example_services::{notification, PLACE_ORDER};
use futures::StreamExt;
use saga_core::{SagaId, SagaStatus};
use saga_nats::{subjects, SagaClient};

use crate::NatsCluster;

/// The demo's saga definition.
pub const PLACE_ORDER_YAML: &str = include_str!("../../example-services/sagas/place-order.yaml");

/// A run that recorded itself this close to its command's deadline may have been stopped
/// before its outcome was recorded.
const DEADLINE_MARGIN_MS: u64 = 100;

/// The demo saga's steps: (step, action, compensation).
const STEPS: [(&str, &str, &str); 2] =
    [("reserve-items", "reserve", "release"), ("schedule-shipment", "schedule", "cancel")];

/// Something the harness kills: a process of the stack (by index) or a server node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Victim {
    Proc(usize),
    Node(usize),
}

/// How many sagas' views the follower-read check reads through each node.
const FOLLOWER_READS: usize = 300;

/// The SKUs ordered.
const SKUS: [&str; 3] = ["apple", "pear", "plum"];

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Orders placed.
    pub sagas: usize,
    /// Orders placed per second.
    pub rate: f64,
    /// Processes killed while the orders are placed (spread evenly, at random instants).
    pub kills: usize,
    /// Coordinator replicas.
    pub coordinators: usize,
    /// Instances of each service (seller, logistics, notification, payments).
    pub instances: usize,
    /// Whether the nats-server (a node, on a cluster) is among the victims.
    pub kill_server: bool,
    /// NATS servers: 1, or 3 for a JetStream cluster with every stream and bucket on 3
    /// replicas.
    pub servers: usize,
    /// Longest pause between a kill and the restart.
    pub max_down: Duration,
    /// How long the sagas may take to end after the last order is placed.
    pub settle: Duration,
    /// Logistics' typical handler time (so that kills land in the middle of handlers).
    pub logistics_latency_ms: u64,
    /// Seed of the random choices (victims and instants).
    pub seed: u64,
    /// Where the processes' logs go.
    pub dir: PathBuf,
    /// This program (it runs the services: `serve <role>`).
    pub services_exe: PathBuf,
    /// The `saga-coordinator` program.
    pub coordinator_exe: PathBuf,
    /// Progress lines on stderr.
    pub progress: bool,
}

/// One kill.
#[derive(Debug, Clone)]
pub struct Kill {
    /// The process (its instance name: `seller-1.3` is the third start of `seller-1`).
    pub instance: String,
    /// What it is.
    pub kind: Kind,
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// Handlers that had started and not finished at that moment (services only; from the
    /// runs the harness saw begin and end).
    pub cut_handlers: usize,
}

/// The kinds of processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A coordinator replica.
    Coordinator,
    /// Seller.
    Seller,
    /// Logistics.
    Logistics,
    /// Notification.
    Notification,
    /// Payments.
    Payments,
    /// The nats-server (a node of the cluster).
    Server,
}

/// A node of the cluster killed, and how the cluster took it.
#[derive(Debug, Clone)]
pub struct Failover {
    /// The node's name.
    pub node: String,
    /// Whether it led the saga log's stream when it was killed (`None`: the cluster did not
    /// say).
    pub was_leader: Option<bool>,
    /// The streams (and key-value buckets) it led then, and how many there were.
    pub led: (Vec<String>, usize),
    /// How long until the log's stream had a leader on another node (leader kills).
    pub new_leader_after: Option<Duration>,
    /// How long until the next saga ended after the kill.
    pub next_end_after: Option<Duration>,
}

impl Kind {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Coordinator => "coordinator",
            Kind::Seller => "seller",
            Kind::Logistics => "logistics",
            Kind::Notification => "notification",
            Kind::Payments => "payments",
            Kind::Server => "nats-server",
        }
    }
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct ChaosReport {
    /// Orders placed.
    pub sagas: usize,
    /// Final statuses, by name.
    pub statuses: BTreeMap<String, usize>,
    /// The kills.
    pub kills: Vec<Kill>,
    /// Processes that exited without being killed (and were started again), with why.
    pub exits: Vec<String>,
    /// The server kills, on a cluster.
    pub failovers: Vec<Failover>,
    /// Handler runs recorded in the ledger.
    pub runs: usize,
    /// Effects that ran again after an earlier run whose outcome could not be recorded, by
    /// why it could not.
    pub reruns_explained: BTreeMap<Why, usize>,
    /// Compensations that ran without their action's output, where the output could not
    /// have been recorded, by why.
    pub blind_compensations_explained: BTreeMap<Why, usize>,
    /// Start-to-end latencies, ms, sorted.
    pub latencies_ms: Vec<u64>,
    /// Wall time of the load and of the whole run.
    pub load_time: Duration,
    /// See `load_time`.
    pub total_time: Duration,
    /// Everything that is wrong.
    pub problems: Vec<String>,
}

impl ChaosReport {
    /// Whether nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The figures, as text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "== chaos run: {} orders, {} kills", self.sagas, self.kills.len());
        let mut by_kind: BTreeMap<Kind, usize> = BTreeMap::new();
        for k in &self.kills {
            *by_kind.entry(k.kind).or_insert(0) += 1;
        }
        for (kind, n) in &by_kind {
            let _ = write!(out, "  killed {:<13} {n:>4}", kind.as_str());
            if matches!(kind, Kind::Seller | Kind::Logistics) {
                let cut: usize =
                    self.kills.iter().filter(|k| k.kind == *kind).map(|k| k.cut_handlers).sum();
                let mid =
                    self.kills.iter().filter(|k| k.kind == *kind && k.cut_handlers > 0).count();
                let _ = write!(out, "  ({mid} in the middle of a handler, {cut} handlers cut)");
            }
            let _ = writeln!(out);
        }
        let _ =
            writeln!(out, "  processes that exited by themselves (crashed): {}", self.exits.len());
        for e in self.exits.iter().take(10) {
            let _ = writeln!(out, "    {e}");
        }
        let _ = writeln!(out, "  load {:.1?}, whole run {:.1?}", self.load_time, self.total_time);
        if !self.failovers.is_empty() {
            let _ = writeln!(
                out,
                "== cluster node kills: leader or follower of the saga log; streams led; pause"
            );
            let ms =
                |d: Option<Duration>| d.map_or("-".into(), |d| format!("{} ms", d.as_millis()));
            for f in &self.failovers {
                let _ = writeln!(
                    out,
                    "  {:<3} {:<9} led {:>2} of {:>2} streams   log's new leader after {:>8}   next saga ended after {:>8}",
                    f.node,
                    match f.was_leader {
                        Some(true) => "leader",
                        Some(false) => "follower",
                        None => "unknown",
                    },
                    f.led.0.len(),
                    f.led.1,
                    ms(f.new_leader_after),
                    ms(f.next_end_after)
                );
            }
        }
        let _ = writeln!(out, "== outcomes");
        for (status, n) in &self.statuses {
            let _ = writeln!(out, "  {status:<20} {n:>6}");
        }
        if !self.latencies_ms.is_empty() {
            let l = &self.latencies_ms;
            let _ = writeln!(
                out,
                "  latency start to end: p50 {} ms, p99 {} ms, max {} ms",
                percentile(l, 50.0),
                percentile(l, 99.0),
                l[l.len() - 1]
            );
        }
        let _ = writeln!(out, "== effects");
        let _ = writeln!(out, "  handler runs recorded        {:>6}", self.runs);
        for (what, counts) in [
            ("runs again after a run whose outcome could not be recorded", &self.reruns_explained),
            (
                "compensations without the output of an action whose outcome could not be recorded",
                &self.blind_compensations_explained,
            ),
        ] {
            let _ = writeln!(out, "  {what}: {}", counts.values().sum::<usize>());
            for (why, n) in counts {
                let _ = writeln!(out, "    {n:>5}  {}", why.as_str());
            }
        }
        let _ = writeln!(out, "== audit");
        if self.problems.is_empty() {
            let _ = writeln!(
                out,
                "  OK: every saga ended, no effect ran twice, no compensation lacked a recorded output, the stock balances, one notification per order, the payments balance, work queues empty, no dead letters"
            );
        } else {
            let _ = writeln!(out, "  {} PROBLEMS", self.problems.len());
            for p in self.problems.iter().take(50) {
                let _ = writeln!(out, "  - {p}");
            }
        }
        out
    }
}

/// A small deterministic random source (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n.saturating_sub(1))
    }
}

/// One process of the stack other than the server.
struct Proc {
    name: String,
    kind: Kind,
    starts: u32,
    child: Option<Child>,
}

impl Proc {
    fn instance(&self) -> String {
        format!("{}.{}", self.name, self.starts)
    }
}

/// The stack's processes, and how to start them.
struct Stack {
    config: ChaosConfig,
    url: String,
    defs: PathBuf,
    procs: Vec<Proc>,
    /// Replicas of each stream the coordinators provision.
    replicas: usize,
}

impl Stack {
    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let (name, kind) = (self.procs[i].name.clone(), self.procs[i].kind);
        self.procs[i].starts += 1;
        let instance = self.procs[i].instance();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.config.dir.join(format!("{name}.log")))
            .with_context(|| format!("opening {name}'s log"))?;
        let mut cmd = match kind {
            Kind::Coordinator => {
                let mut c = Command::new(&self.config.coordinator_exe);
                // Keeps trying while JetStream is unavailable, as a supervisor restarting it
                // would: on a busy 2-core machine a fresh 3-node cluster once took more than
                // 60 s to create the streams (each request timing out after 10 s).
                c.args(["--nats-url", &self.url, "--nats-wait-secs", "180"])
                    .args(["--ack-wait-secs", "2", "--workers", "16"])
                    .args(["--replicas", &self.replicas.to_string()])
                    .arg("--definitions")
                    .arg(&self.defs)
                    .args(["--replica-name", &instance.replace('.', "-")]);
                c
            }
            _ => {
                let mut c = Command::new(&self.config.services_exe);
                c.args(["serve", kind.as_str(), "--nats-url", &self.url, "--instance", &instance])
                    .args([
                        "--logistics-latency-ms",
                        &self.config.logistics_latency_ms.to_string(),
                    ]);
                c
            }
        };
        let child = cmd
            .env("RUST_LOG", std::env::var("CHAOS_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {instance}"))?;
        self.procs[i].child = Some(child);
        Ok(())
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.procs[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again every process that exited by itself; returns what exited.
    fn revive(&mut self) -> anyhow::Result<Vec<String>> {
        let mut exited = Vec::new();
        for i in 0..self.procs.len() {
            let status = match self.procs[i].child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => status,
                _ => continue,
            };
            exited.push(format!(
                "{} exited ({status}); see {}.log",
                self.procs[i].instance(),
                self.procs[i].name
            ));
            self.procs[i].child = None;
            self.spawn(i)?;
        }
        Ok(exited)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.kill(i);
        }
    }
}

/// Handlers under way, per instance, from the notices of their begin and end
/// (`demo.begun.<instance>`, `demo.ended.<instance>`).
#[derive(Default)]
struct UnderWay {
    running: Mutex<HashMap<String, i64>>,
}

impl UnderWay {
    fn now(&self, instance: &str) -> usize {
        self.running.lock().expect("lock").get(instance).copied().unwrap_or(0).max(0) as usize
    }
}

async fn watch_handlers(nats: async_nats::Client, under_way: Arc<UnderWay>) -> anyhow::Result<()> {
    let mut begun = nats.subscribe("demo.begun.>").await?;
    let mut ended = nats.subscribe("demo.ended.>").await?;
    tokio::spawn(async move {
        loop {
            let (msg, delta) = tokio::select! {
                Some(m) = begun.next() => (m, 1),
                Some(m) = ended.next() => (m, -1),
                else => return,
            };
            let instance = msg.subject.splitn(3, '.').nth(2).unwrap_or_default().to_owned();
            *under_way.running.lock().expect("lock").entry(instance).or_insert(0) += delta;
        }
    });
    Ok(())
}

fn log(config: &ChaosConfig, line: impl AsRef<str>) {
    if config.progress {
        eprintln!("  {}", line.as_ref());
    }
}

/// Runs the chaos: starts the stack, places the orders while killing processes, waits for
/// the sagas to end, and audits.
pub async fn run(config: ChaosConfig) -> anyhow::Result<ChaosReport> {
    let started = Instant::now();
    std::fs::create_dir_all(&config.dir)
        .with_context(|| format!("creating {}", config.dir.display()))?;
    let defs = config.dir.join("definitions");
    std::fs::create_dir_all(&defs)?;
    std::fs::write(defs.join("place-order.yaml"), PLACE_ORDER_YAML)?;

    let servers = config.servers.max(1);
    let cluster = tokio::task::spawn_blocking(move || NatsCluster::start(servers)).await?;
    let url = cluster.urls();
    for i in 0..cluster.len() {
        let node = cluster.node(i);
        log(
            &config,
            format!(
                "nats-server {} at {}, store {}",
                cluster.name(i),
                node.url(),
                node.store_dir().display()
            ),
        );
    }
    let nats = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url.split(',').collect::<Vec<_>>())
        .await
        .context("connecting the harness")?;
    NatsCluster::wait_for_jetstream(&nats).await.map_err(anyhow::Error::msg)?;
    // Every stream and bucket on as many replicas as there are nodes (at most 3), the demo's
    // own included: the harness creates those before the services open them.
    let replicas = servers.min(3);
    Ledger::create(&nats, replicas).await?;
    // The effect buckets of the demo's two step services.
    let effects = ["seller", "logistics"].map(|s| subjects::effects_bucket(&s.into()));
    for bucket in [STOCK_BUCKET, NOTIFICATION_BUCKET, ORDER_BUCKET]
        .into_iter()
        .map(String::from)
        .chain(effects)
    {
        saga_nats::provision::ensure_bucket(&nats, &bucket, replicas).await?;
    }
    let ends_seen = watch_ends(&nats).await?;
    let stock = StockStore::open(nats.clone()).await?;
    let per_sku = (config.sagas as u32).max(10);
    for sku in SKUS {
        stock.seed(sku, per_sku).await?;
    }
    let stock_before = stock.all().await?;

    let mut procs = Vec::new();
    for i in 1..=config.coordinators {
        procs.push(Proc {
            name: format!("coordinator-{i}"),
            kind: Kind::Coordinator,
            starts: 0,
            child: None,
        });
    }
    for kind in [Kind::Seller, Kind::Logistics, Kind::Notification, Kind::Payments] {
        for i in 1..=config.instances {
            procs.push(Proc {
                name: format!("{}-{i}", kind.as_str()),
                kind,
                starts: 0,
                child: None,
            });
        }
    }
    let mut stack = Stack { config: config.clone(), url: url.clone(), defs, procs, replicas };
    // The coordinators first: they create the streams and buckets the services use.
    for i in 0..config.coordinators {
        stack.spawn(i)?;
    }
    let orders = Arc::new(orders_when_ready(&nats).await?);
    for i in config.coordinators..stack.procs.len() {
        stack.spawn(i)?;
    }
    let under_way = Arc::new(UnderWay::default());
    watch_handlers(nats.clone(), under_way.clone()).await?;
    log(
        &config,
        format!(
            "stack up: {} processes; placing {} orders at {}/s",
            stack.procs.len(),
            config.sagas,
            config.rate
        ),
    );

    let batch = ScenarioConfig {
        orders: config.sagas,
        run_id: format!("c{}", config.seed % 100_000),
        skus: SKUS.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
    .make_orders();
    let placed = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn(place_all(orders.clone(), batch.clone(), config.rate, placed.clone()));

    // The kills, spread over the load's expected duration; each victim starts again after
    // a random pause while the next kills go on.
    let load_secs = config.sagas as f64 / config.rate;
    let gap = Duration::from_secs_f64(load_secs / (config.kills.max(1) as f64 + 1.0));
    let mut rng = Rng::new(config.seed);
    let mut report = ChaosReport { sagas: config.sagas, ..Default::default() };
    let mut kinds =
        vec![Kind::Coordinator, Kind::Seller, Kind::Logistics, Kind::Notification, Kind::Payments];
    if config.kill_server {
        kinds.push(Kind::Server);
    }
    let stack = Arc::new(Mutex::new(stack));
    let cluster = Arc::new(Mutex::new(cluster));
    let down: Arc<Mutex<BTreeSet<Victim>>> = Arc::default();
    // Each restart task ends with the failover it timed, if it killed the log's leader.
    let mut restarts = Vec::new();
    let mut round: Vec<Kind> = Vec::new();
    for k in 0..config.kills {
        tokio::time::sleep(gap.mul_f64(0.5 + rng.unit())).await;
        report.exits.extend(stack.lock().expect("lock").revive()?);
        let (kind, candidates) = loop {
            let picked = {
                let (stack, down) = (stack.lock().expect("lock"), down.lock().expect("lock"));
                next_kind(&mut rng, &mut round, &kinds, |k| victims(k, &stack, servers, &down))
            };
            match picked {
                Some(picked) => break picked,
                // Nothing up to kill: wait for a restart.
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let pause = config.max_down.mul_f64(rng.unit());
        let mut v = candidates[rng.below(candidates.len())];
        if kind == Kind::Server && servers > 1 {
            // On a cluster, the log stream's leader and a follower in turn.
            let want_leader = report.failovers.len() % 2 == 0;
            let mut leaders = NatsCluster::stream_leaders(&nats).await;
            for _ in 0..5 {
                if leaders.contains_key(subjects::LOG_STREAM) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                leaders = NatsCluster::stream_leaders(&nats).await;
            }
            let c = cluster.lock().expect("lock");
            let leader = leaders.get(subjects::LOG_STREAM).and_then(|l| c.index_of(l));
            v = match (want_leader, leader) {
                (true, Some(l)) => Victim::Node(l),
                (false, Some(l)) => {
                    let followers: Vec<usize> = (0..c.len()).filter(|i| *i != l).collect();
                    Victim::Node(followers[rng.below(followers.len())])
                }
                (_, None) => v,
            };
            let Victim::Node(n) = v else { unreachable!("a server kill picks a node") };
            let led = leaders.iter().filter(|(_, l)| *l == c.name(n)).map(|(s, _)| s.clone());
            report.failovers.push(Failover {
                node: c.name(n).to_owned(),
                was_leader: leader.map(|l| l == n),
                led: (led.collect(), leaders.len()),
                new_leader_after: None,
                next_end_after: None,
            });
        }
        down.lock().expect("lock").insert(v);
        if let Victim::Node(n) = v {
            let name = {
                let mut c = cluster.lock().expect("lock");
                c.node_mut(n).kill();
                c.name(n).to_owned()
            };
            let at_ms = now_ms();
            report.kills.push(Kill {
                instance: format!("nats-server {name}"),
                kind,
                at_ms,
                cut_handlers: 0,
            });
            let was_leader = report
                .failovers
                .last()
                .is_some_and(|f| f.was_leader == Some(true) && f.node == name);
            // A killed leader stays down until another node leads the log (at most
            // `new_leader`'s 60 s), which times the failover: back sooner, it can win the
            // election again while the others are still holding theirs (seconds on a slow
            // disk), and no failover happens.
            let failover = was_leader.then(|| (report.failovers.len() - 1, nats.clone(), name));
            let (cluster, down) = (cluster.clone(), down.clone());
            restarts.push(tokio::spawn(async move {
                let timed = match failover {
                    Some((i, nats, name)) => Some((i, new_leader(nats, name).await)),
                    None => None,
                };
                tokio::time::sleep(pause).await;
                tokio::task::spawn_blocking(move || {
                    cluster.lock().expect("lock").node_mut(n).restart()
                })
                .await?;
                down.lock().expect("lock").remove(&v);
                anyhow::Ok(timed)
            }));
        } else if let Victim::Proc(v) = v {
            let mut s = stack.lock().expect("lock");
            let instance = s.procs[v].instance();
            let cut = under_way.now(&instance);
            s.kill(v);
            report.kills.push(Kill { instance, kind, at_ms: now_ms(), cut_handlers: cut });
            let (stack, down) = (stack.clone(), down.clone());
            restarts.push(tokio::spawn(async move {
                tokio::time::sleep(pause).await;
                stack.lock().expect("lock").spawn(v)?;
                down.lock().expect("lock").remove(&Victim::Proc(v));
                anyhow::Ok(None)
            }));
        }
        if (k + 1) % 10 == 0 || k + 1 == config.kills {
            log(
                &config,
                format!(
                    "{} kills, {} of {} orders placed",
                    k + 1,
                    placed.load(Ordering::Relaxed),
                    config.sagas
                ),
            );
        }
    }
    for r in restarts {
        if let Some((i, after)) = r.await?? {
            report.failovers[i].new_leader_after = after;
        }
    }
    let placed_ids = load.await??;
    report.load_time = started.elapsed();
    report.exits.extend(stack.lock().expect("lock").revive()?);
    log(&config, format!("all {} orders placed; waiting for the sagas to end", placed_ids.len()));

    // Every saga's end.
    let deadline = tokio::time::Instant::now() + config.settle;
    let ends: Vec<(Order, SagaId, Result<saga_nats::SagaView, String>)> =
        futures::stream::iter(batch.iter().cloned().zip(placed_ids))
            .map(|(order, id)| {
                let client = orders.client().clone();
                async move {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let end = client.wait(&id, left).await.map_err(|e| e.to_string());
                    (order, id, end)
                }
            })
            .buffer_unordered(256)
            .collect()
            .await;
    report.exits.extend(stack.lock().expect("lock").revive()?);

    let mut status_of: HashMap<String, SagaStatus> = HashMap::new();
    for (order, id, end) in &ends {
        match end {
            Ok(view) => {
                let s = view.snapshot.status;
                *report.statuses.entry(s.to_string()).or_insert(0) += 1;
                status_of.insert(id.to_string(), s);
                if !s.is_terminal() {
                    report.problems.push(format!("order {} (saga {id}) is stuck: {s}", order.id));
                } else {
                    let (a, b) = (view.snapshot.started_at, view.snapshot.updated_at);
                    report.latencies_ms.push(b.0.saturating_sub(a.0));
                }
            }
            Err(e) => {
                *report.statuses.entry("not ended".into()).or_insert(0) += 1;
                report.problems.push(format!("order {} (saga {id}) did not end: {e}", order.id));
            }
        }
    }
    report.latencies_ms.sort_unstable();
    log(&config, "sagas ended; auditing");
    if servers > 1 {
        // A node restarted last may still be catching up, or a stream electing its leader.
        NatsCluster::wait_for_streams(&nats, Duration::from_secs(60))
            .await
            .map_err(anyhow::Error::msg)?;
    }

    let runs = Ledger::all(&nats).await?;
    report.runs = runs.len();
    let kills = std::mem::take(&mut report.kills);
    audit_effects(&runs, &status_of, &kills, &mut report);
    report.kills = kills;
    let order_ends: Vec<(&Order, Option<SagaStatus>)> = ends
        .iter()
        .map(|(order, _, end)| (order, end.as_ref().ok().map(|v| v.snapshot.status)))
        .collect();
    audit_stock(&stock_before, &stock.all().await?, &order_ends, &mut report);
    audit_notifications(&nats, &status_of, &mut report).await?;
    audit_payments(&nats, &order_ends, &mut report).await?;
    audit_queues(&nats, orders.client(), &mut report).await?;
    // Nothing here stops a process but the harness: one that exited crashed.
    for e in &report.exits {
        report.problems.push(format!("a process crashed: {e}"));
    }
    if servers > 1 {
        let urls: Vec<String> = {
            let c = cluster.lock().expect("lock");
            (0..c.len()).map(|i| c.node(i).url()).collect()
        };
        audit_follower_reads(&urls, &status_of, &mut report).await?;
    }
    let ends_seen = ends_seen.lock().expect("lock").clone();
    for (f, k) in
        report.failovers.iter_mut().zip(report.kills.iter().filter(|k| k.kind == Kind::Server))
    {
        f.next_end_after =
            ends_seen.iter().find(|t| **t >= k.at_ms).map(|t| Duration::from_millis(t - k.at_ms));
    }
    report.total_time = started.elapsed();
    drop(stack);
    drop(cluster);
    Ok(report)
}

/// When each saga ended (ms since the epoch, in the order seen), from the log's terminal
/// records.
async fn watch_ends(nats: &async_nats::Client) -> anyhow::Result<Arc<Mutex<Vec<u64>>>> {
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut subs = Vec::new();
    for event in ["completed", "compensated"] {
        subs.push(nats.subscribe(format!("saga.log.*.*.{event}")).await?);
    }
    let mut ends = futures::stream::select_all(subs);
    let out = seen.clone();
    tokio::spawn(async move {
        while ends.next().await.is_some() {
            out.lock().expect("lock").push(now_ms());
        }
    });
    Ok(seen)
}

/// How long until stream `SAGA_LOG` reports a leader other than `killed` (`None` after 60 s).
async fn new_leader(nats: async_nats::Client, killed: String) -> Option<Duration> {
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(60) {
        if let Some(leader) = NatsCluster::stream_leader(&nats, subjects::LOG_STREAM).await {
            if leader != killed {
                return Some(began.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Reads up to [`FOLLOWER_READS`] sagas' views through a connection to each node alone (a
/// direct get is answered by the replica of the node it reaches, leader or follower), and
/// flags any that differs from the status the audit saw.
async fn audit_follower_reads(
    urls: &[String],
    status_of: &HashMap<String, SagaStatus>,
    report: &mut ChaosReport,
) -> anyhow::Result<()> {
    for url in urls {
        let node = async_nats::ConnectOptions::new()
            .ignore_discovered_servers()
            .connect(url)
            .await
            .with_context(|| format!("connecting to {url} alone"))?;
        let client = SagaClient::new(node).await?;
        for (id, status) in status_of.iter().take(FOLLOWER_READS) {
            let read = client.get(&SagaId::from(id.as_str())).await;
            match read {
                Ok(Some(view)) if view.snapshot.status == *status => {}
                Ok(Some(view)) => report.problems.push(format!(
                    "saga {id} read through {url}: {}, but {status} through the cluster",
                    view.snapshot.status
                )),
                Ok(None) => {
                    report.problems.push(format!("saga {id} read through {url}: not found"))
                }
                Err(e) => report.problems.push(format!("saga {id} read through {url}: {e}")),
            }
        }
    }
    Ok(())
}

/// The next kind of `round` with a process up, and those processes (or server nodes);
/// `None` when no kind has one. The kinds come in rounds, each in a random order, so
/// that every kind is hit once the kills are as many as the kinds. A kind whose processes
/// are all down keeps its place in the round for a later kill (dropping it would leave it
/// one kill short: with one instance of each service, its only process is often still down
/// when its turn comes).
fn next_kind(
    rng: &mut Rng,
    round: &mut Vec<Kind>,
    kinds: &[Kind],
    candidates_of: impl Fn(Kind) -> Vec<Victim>,
) -> Option<(Kind, Vec<Victim>)> {
    if round.is_empty() {
        *round = kinds.to_vec();
        for i in (1..round.len()).rev() {
            round.swap(i, rng.below(i + 1));
        }
    }
    for i in (0..round.len()).rev() {
        let kind = round[i];
        let candidates = candidates_of(kind);
        if !candidates.is_empty() {
            round.remove(i);
            return Some((kind, candidates));
        }
    }
    None
}

/// What can be killed of `kind` now: its processes that are up, or any server node while
/// none is down (one node down at a time, so that a cluster keeps its quorum).
fn victims(kind: Kind, stack: &Stack, servers: usize, down: &BTreeSet<Victim>) -> Vec<Victim> {
    match kind {
        Kind::Server if down.iter().any(|v| matches!(v, Victim::Node(_))) => Vec::new(),
        Kind::Server => (0..servers).map(Victim::Node).collect(),
        _ => (0..stack.procs.len())
            .map(Victim::Proc)
            .filter(|v| !down.contains(v))
            .filter(|v| matches!(v, Victim::Proc(i) if stack.procs[*i].kind == kind))
            .collect(),
    }
}

/// Orders, once a coordinator has provisioned the streams and registered the definition.
async fn orders_when_ready(nats: &async_nats::Client) -> anyhow::Result<Orders> {
    let mut last = String::new();
    // A new cluster places its first replicated streams slowly (its nodes report their
    // resources to the meta leader first): wait up to two minutes.
    for _ in 0..1200 {
        match Orders::new(nats.clone()).await {
            Ok(orders) => {
                let names = orders.client().definition_names().await;
                if names.is_ok_and(|n| n.iter().any(|n| n.as_str() == PLACE_ORDER)) {
                    return Ok(orders);
                }
                last = format!("{PLACE_ORDER} is not registered");
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the stack was not ready within 2 min: {last}")
}

/// Places every order at `rate` per second; an order whose start fails (the server is down, a
/// reply was lost) is placed again with the same id until it is accepted.
async fn place_all(
    orders: Arc<Orders>,
    batch: Vec<Order>,
    rate: f64,
    placed: Arc<AtomicUsize>,
) -> anyhow::Result<Vec<SagaId>> {
    let begin = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(batch.len());
    for (n, order) in batch.into_iter().enumerate() {
        tokio::time::sleep_until(begin + Duration::from_secs_f64(n as f64 / rate)).await;
        let (orders, placed) = (orders.clone(), placed.clone());
        tasks.push(tokio::spawn(async move {
            let give_up = Instant::now() + Duration::from_secs(120);
            loop {
                match orders.place(&order).await {
                    Ok(id) => {
                        placed.fetch_add(1, Ordering::Relaxed);
                        return Ok(id);
                    }
                    Err(e) if Instant::now() < give_up => {
                        tracing::debug!(order = %order.id, "placing again: {e}");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => {
                        return Err(anyhow::anyhow!("order {} not placed in 2 min: {e}", order.id))
                    }
                }
            }
        }));
    }
    let mut ids = Vec::with_capacity(tasks.len());
    for t in tasks {
        ids.push(t.await??);
    }
    Ok(ids)
}

/// Why an outcome of `earlier` might not have been recorded by the time `later_ms`, if it
/// might not: its process was killed after it finished, the server was killed meanwhile, or
/// it ran up to its command's deadline (the SDK stopped it, the coordinator tried again).
fn unrecorded(earlier: &Run, later_ms: u64, kills: &[Kill]) -> Option<Why> {
    let killed = |server: bool| {
        kills.iter().any(|k| {
            (if server { k.kind == Kind::Server } else { k.instance == earlier.instance })
                && k.at_ms + 1000 >= earlier.started_ms
                && k.at_ms <= later_ms + 1000
        })
    };
    if killed(false) {
        Some(Why::ItsProcessKilled)
    } else if killed(true) {
        Some(Why::ServerKilled)
    } else if earlier.finished_ms.max(earlier.stored_ms) + DEADLINE_MARGIN_MS >= earlier.deadline_ms
    {
        Some(Why::TimedOut)
    } else {
        None
    }
}

/// The kills within 10 s of `at_ms`, with their time relative to it.
fn kills_near(kills: &[Kill], at_ms: u64) -> String {
    let near: Vec<String> = kills
        .iter()
        .filter(|k| k.at_ms.abs_diff(at_ms) <= 10_000)
        .map(|k| format!("{} at {:+} ms", k.instance, k.at_ms as i64 - at_ms as i64))
        .collect();
    if near.is_empty() {
        "none".into()
    } else {
        near.join(", ")
    }
}

/// Why an outcome may have gone unrecorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Why {
    /// The process that ran it was killed afterwards.
    ItsProcessKilled,
    /// The nats-server was killed in between.
    ServerKilled,
    /// It ran until its command's deadline.
    TimedOut,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Why::ItsProcessKilled => "its process was killed after the run",
            Why::ServerKilled => "the nats-server was killed in between",
            Why::TimedOut => "the run reached its command's deadline",
        }
    }
}

fn audit_effects(
    runs: &[Run],
    status_of: &HashMap<String, SagaStatus>,
    kills: &[Kill],
    report: &mut ChaosReport,
) {
    let mut by_effect: BTreeMap<(&str, &str, &str), Vec<&Run>> = BTreeMap::new();
    for r in runs {
        by_effect.entry((&r.saga_id, &r.step, &r.handler)).or_default().push(r);
    }
    // In the order the runs began (a run that began first may have been stored last).
    for rs in by_effect.values_mut() {
        rs.sort_by_key(|r| r.started_ms);
    }
    for ((saga, step, handler), rs) in &by_effect {
        for pair in rs.windows(2) {
            if let Some(why) = unrecorded(pair[0], pair[1].started_ms, kills) {
                *report.reruns_explained.entry(why).or_insert(0) += 1;
            } else {
                let (a, b) = (pair[0], pair[1]);
                report.problems.push(format!(
                    "saga {saga}: {step}'s {handler} ran twice with nothing to explain it: attempt {} on {} (ran {}..{} ms, stored at {} ms), then attempt {} on {} (from {} ms); kills nearby: {}",
                    a.attempt, a.instance,
                    0, a.finished_ms.saturating_sub(a.started_ms), a.stored_ms.saturating_sub(a.started_ms),
                    b.attempt, b.instance, b.started_ms.saturating_sub(a.started_ms),
                    kills_near(kills, a.started_ms)
                ));
            }
        }
    }
    for ((saga, step, handler), rs) in &by_effect {
        let status = status_of.get(*saga).copied();
        let Some(&(_, action, undo)) = STEPS.iter().find(|s| s.1 == *handler || s.2 == *handler)
        else {
            report.problems.push(format!("saga {saga}: a run of an unknown handler {handler}"));
            continue;
        };
        if *handler == undo {
            // A compensation: did it get its action's output?
            for c in rs.iter().filter(|c| !c.had_output) {
                let before: Vec<&&Run> = by_effect
                    .get(&(*saga, *step, action))
                    .map(|a| a.iter().filter(|a| a.finished_ms <= c.started_ms).collect())
                    .unwrap_or_default();
                if before.is_empty() {
                    continue;
                }
                // Explained only if none of the action's runs could have been recorded.
                let whys: Option<Vec<Why>> =
                    before.iter().map(|a| unrecorded(a, c.started_ms, kills)).collect();
                if let Some(why) = whys.and_then(|w| w.first().copied()) {
                    *report.blind_compensations_explained.entry(why).or_insert(0) += 1;
                } else {
                    report.problems.push(format!(
                        "saga {saga}: {step}'s {handler} ran without the output of the {action} that finished before it"
                    ));
                }
            }
            continue;
        }
        let undone = by_effect.contains_key(&(*saga, *step, undo));
        match status {
            Some(SagaStatus::Completed) if undone => report
                .problems
                .push(format!("saga {saga} completed, yet {step} was compensated ({undo})")),
            Some(SagaStatus::Compensated) if !undone => report.problems.push(format!(
                "saga {saga} compensated, yet {step}'s {handler} was never undone ({undo})"
            )),
            None => report
                .problems
                .push(format!("a run of {handler} for saga {saga}, which this run did not start")),
            _ => {}
        }
    }
    // Every completed saga ran each action.
    for (saga, status) in status_of {
        if *status == SagaStatus::Completed {
            for (step, action, _) in STEPS {
                if !by_effect.contains_key(&(saga.as_str(), step, action)) {
                    report
                        .problems
                        .push(format!("saga {saga} completed without a run of {action}"));
                }
            }
        }
    }
}

/// Checks the stock against the orders and how their sagas ended (`None`: did not end).
fn audit_stock(
    before: &BTreeMap<String, example_services::seller::Stock>,
    after: &BTreeMap<String, example_services::seller::Stock>,
    ends: &[(&Order, Option<SagaStatus>)],
    report: &mut ChaosReport,
) {
    let mut expected: BTreeMap<&str, BTreeMap<&str, u32>> = BTreeMap::new();
    for (order, status) in ends {
        if *status == Some(SagaStatus::Completed) {
            expected.entry(&order.sku).or_default().insert(&order.id, order.quantity);
        }
    }
    let ours: BTreeSet<&str> = ends.iter().map(|(o, _)| o.id.as_str()).collect();
    for sku in SKUS {
        let b = before.get(sku).map_or(0, |s| s.available);
        let a = after.get(sku).cloned().unwrap_or_default();
        let held: BTreeMap<&str, u32> = a
            .held
            .iter()
            .filter(|(id, _)| ours.contains(id.as_str()))
            .map(|(id, q)| (id.as_str(), *q))
            .collect();
        let want = expected.get(sku).cloned().unwrap_or_default();
        let want_total: u32 = want.values().sum();
        if u64::from(b) != u64::from(a.available) + u64::from(want_total) {
            report.problems.push(format!(
                "stock of {sku}: {b} available before, {} after, but completed orders hold {want_total}",
                a.available
            ));
        }
        if held != want {
            let extra: Vec<&&str> =
                held.keys().filter(|k| !want.contains_key(*k)).take(5).collect();
            let missing: Vec<&&str> =
                want.keys().filter(|k| !held.contains_key(*k)).take(5).collect();
            report.problems.push(format!(
                "stock of {sku}: {} orders hold items, {} completed orders should; held by others: {extra:?}; completed but holding nothing: {missing:?}",
                held.len(),
                want.len()
            ));
        }
    }
}

async fn audit_notifications(
    nats: &async_nats::Client,
    status_of: &HashMap<String, SagaStatus>,
    report: &mut ChaosReport,
) -> anyhow::Result<()> {
    let ended: BTreeSet<&str> =
        status_of.iter().filter(|(_, s)| s.is_terminal()).map(|(id, _)| id.as_str()).collect();
    // Notification follows events asynchronously: give it time to catch up.
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let sent = notification::sent(nats.clone()).await?;
        let mut per_saga: BTreeMap<&str, usize> = BTreeMap::new();
        for n in &sent {
            *per_saga.entry(n.saga_id.as_str()).or_insert(0) += 1;
        }
        let wrong: Vec<String> = ended
            .iter()
            .filter(|id| per_saga.get(*id).copied().unwrap_or(0) != 1)
            .map(|id| {
                format!(
                    "saga {id}: {} notifications, expected 1",
                    per_saga.get(id).copied().unwrap_or(0)
                )
            })
            .collect();
        let strays = per_saga.keys().filter(|id| !status_of.contains_key(**id)).count();
        if (wrong.is_empty() && strays == 0) || Instant::now() > give_up {
            report.problems.extend(wrong);
            if strays > 0 {
                report
                    .problems
                    .push(format!("{strays} notifications for sagas this run did not start"));
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every completed order is charged; no other ended order keeps a charge. Payments refunds
/// asynchronously: give it time to catch up.
async fn audit_payments(
    nats: &async_nats::Client,
    ends: &[(&Order, Option<SagaStatus>)],
    report: &mut ChaosReport,
) -> anyhow::Result<()> {
    let store = PaymentStore::open(nats).await?;
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let payments = store.all().await?;
        let wrong: Vec<String> = ends
            .iter()
            .filter_map(|(order, status)| {
                let status = status.filter(|s| s.is_terminal())?;
                payments::mismatch(&order.id, status, payments.get(&order.id).map(|p| p.status))
            })
            .collect();
        if wrong.is_empty() || Instant::now() > give_up {
            report.problems.extend(wrong);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn audit_queues(
    nats: &async_nats::Client,
    client: &SagaClient,
    report: &mut ChaosReport,
) -> anyhow::Result<()> {
    let js = jetstream::new(nats.clone());
    // A saga's start leaves its work queue when the saga ends: allow a moment.
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let mut left = Vec::new();
        let mut names = js.stream_names();
        while let Some(name) = names.next().await {
            let name = name?;
            let mut s = js.get_stream(&name).await?;
            let info = s.info().await?;
            if info.config.retention == stream::RetentionPolicy::WorkQueue
                && info.state.messages > 0
            {
                left.push(format!(
                    "work queue {name} still holds {} messages",
                    info.state.messages
                ));
            }
        }
        if left.is_empty() || Instant::now() > give_up {
            report.problems.extend(left);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let letters = client
        .dead_letters(&saga_nats::dlq::DlqListRequest::default())
        .await
        .context("listing dead letters")?;
    for l in letters.letters {
        report.problems.push(format!(
            "dead letter {} from {} on {}: {}",
            l.seq, l.component, l.subject, l.reason
        ));
    }
    Ok(())
}

/// Where a binary built next to this one is (`saga-coordinator` next to `saga-chaos`).
pub fn sibling(exe: &Path, name: &str) -> PathBuf {
    exe.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_that_is_down_at_its_turn_is_killed_later_in_the_round() {
        let kinds = [Kind::Coordinator, Kind::Seller, Kind::Server];
        let mut rng = Rng::new(7);
        let mut round = Vec::new();
        let seller_down = std::cell::Cell::new(true);
        let up = |k: Kind| {
            if k == Kind::Seller && seller_down.get() {
                Vec::new()
            } else {
                vec![Victim::Node(0)]
            }
        };
        // While the seller is down, the round's other kinds are picked, and it waits.
        let mut picked = Vec::new();
        for _ in 0..10 {
            match next_kind(&mut rng, &mut round, &kinds, up) {
                Some((kind, _)) => picked.push(kind),
                None => break,
            }
        }
        picked.sort();
        assert_eq!(picked, [Kind::Coordinator, Kind::Server]);
        assert_eq!(round, [Kind::Seller]);
        // Once it is up again, it is next, before a new round begins.
        seller_down.set(false);
        assert_eq!(next_kind(&mut rng, &mut round, &kinds, up).map(|(k, _)| k), Some(Kind::Seller));
        assert!(round.is_empty());
        // Over six kills, every kind twice.
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..6 {
            let (kind, _) = next_kind(&mut rng, &mut round, &kinds, up).expect("all up");
            *counts.entry(kind).or_insert(0) += 1;
        }
        assert!(counts.values().all(|&n| n == 2), "{counts:?}");
    }

    fn run(
        saga: &str,
        step: &str,
        handler: &str,
        instance: &str,
        started: u64,
        finished: u64,
    ) -> Run {
        Run {
            service: "svc".into(),
            handler: handler.into(),
            saga_id: saga.into(),
            step: step.into(),
            attempt: 1,
            instance: instance.into(),
            had_output: false,
            deadline_ms: started + 5_000,
            started_ms: started,
            finished_ms: finished,
            stored_ms: finished,
        }
    }

    fn kill(instance: &str, kind: Kind, at_ms: u64) -> Kill {
        Kill { instance: instance.into(), kind, at_ms, cut_handlers: 0 }
    }

    fn audit(runs: &[Run], statuses: &[(&str, SagaStatus)], kills: &[Kill]) -> ChaosReport {
        let status_of = statuses.iter().map(|(id, s)| ((*id).to_owned(), *s)).collect();
        let mut report = ChaosReport::default();
        audit_effects(runs, &status_of, kills, &mut report);
        report
    }

    fn completed_runs(saga: &str) -> Vec<Run> {
        vec![
            run(saga, "reserve-items", "reserve", "seller-1.1", 1_000, 1_010),
            run(saga, "schedule-shipment", "schedule", "logistics-1.1", 1_020, 1_100),
        ]
    }

    #[test]
    fn a_clean_completed_saga_passes() {
        let r = audit(&completed_runs("s1"), &[("s1", SagaStatus::Completed)], &[]);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }

    #[test]
    fn a_second_run_is_a_problem_unless_a_kill_or_a_timeout_explains_it() {
        let mut runs = completed_runs("s1");
        runs.push(run("s1", "reserve-items", "reserve", "seller-2.1", 3_000, 3_010));
        let done = [("s1", SagaStatus::Completed)];
        let r = audit(&runs, &done, &[]);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(r.problems[0].contains("reserve ran twice"), "{}", r.problems[0]);
        // Its process was killed after the first run: its outcome may not have been recorded.
        let r = audit(&runs, &done, &[kill("seller-1.1", Kind::Seller, 1_500)]);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.reruns_explained, BTreeMap::from([(Why::ItsProcessKilled, 1)]));
        // Another instance's kill explains nothing; a server kill between the runs does.
        let r = audit(&runs, &done, &[kill("seller-2.1", Kind::Seller, 1_500)]);
        assert_eq!(r.problems.len(), 1);
        let r = audit(&runs, &done, &[kill("nats-server", Kind::Server, 2_000)]);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        // A first run that recorded itself at its command's deadline may have been stopped.
        runs[0].stored_ms = 7_000;
        runs[2].started_ms = 7_500;
        let r = audit(&runs, &done, &[]);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        // Runs pair in the order they began, whatever the order they were stored in.
        runs.swap(0, 2);
        let r = audit(&runs, &done, &[]);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }

    #[test]
    fn a_compensation_without_the_recorded_output_is_a_problem() {
        let mut runs = completed_runs("s1");
        runs.push(run("s1", "schedule-shipment", "cancel", "logistics-2.1", 2_000, 2_010));
        runs.push(run("s1", "reserve-items", "release", "seller-1.1", 2_100, 2_110));
        runs[3].had_output = true;
        let r = audit(&runs, &[("s1", SagaStatus::Compensated)], &[]);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(r.problems[0].contains("cancel ran without the output"), "{}", r.problems[0]);
        let r = audit(
            &runs,
            &[("s1", SagaStatus::Compensated)],
            &[kill("logistics-1.1", Kind::Logistics, 1_200)],
        );
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(r.blind_compensations_explained, BTreeMap::from([(Why::ItsProcessKilled, 1)]));
    }

    #[test]
    fn effects_left_behind_or_undone_on_success_are_problems() {
        // Compensated, but the shipment was never cancelled.
        let mut runs = completed_runs("s1");
        runs.push(run("s1", "reserve-items", "release", "seller-1.1", 2_100, 2_110));
        runs[2].had_output = true;
        let r = audit(&runs, &[("s1", SagaStatus::Compensated)], &[]);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(r.problems[0].contains("never undone (cancel)"), "{}", r.problems[0]);
        // Completed, but released; and a completed saga with no schedule.
        let r = audit(
            &runs[..1].iter().cloned().chain([runs[2].clone()]).collect::<Vec<_>>(),
            &[("s1", SagaStatus::Completed)],
            &[],
        );
        assert!(
            r.problems.iter().any(|p| p.contains("was compensated (release)")),
            "{:?}",
            r.problems
        );
        assert!(
            r.problems.iter().any(|p| p.contains("without a run of schedule")),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn the_stock_must_be_held_by_exactly_the_completed_orders() {
        let order = |id: &str, q: u32| Order {
            id: id.into(),
            customer: "ada".into(),
            sku: "apple".into(),
            quantity: q,
        };
        let stock = |available: u32, held: &[(&str, u32)]| {
            let mut m = BTreeMap::new();
            m.insert(
                "apple".to_owned(),
                example_services::seller::Stock {
                    available,
                    held: held.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
                },
            );
            m
        };
        let (o1, o2) = (order("o1", 2), order("o2", 3));
        let ends = [(&o1, Some(SagaStatus::Completed)), (&o2, Some(SagaStatus::Compensated))];
        let mut r = ChaosReport::default();
        audit_stock(&stock(10, &[]), &stock(8, &[("o1", 2)]), &ends, &mut r);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        // The compensated order still holds its items.
        let mut r = ChaosReport::default();
        audit_stock(&stock(10, &[]), &stock(5, &[("o1", 2), ("o2", 3)]), &ends, &mut r);
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
    }
}
