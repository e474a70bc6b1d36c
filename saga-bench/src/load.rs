//! Load generation: a closed loop (C tasks, each starting a saga when its last one ended) and
//! an open loop (sagas started on a fixed schedule, latency measured from the intended start
//! so that a slow system cannot hide its queueing: no coordinated omission).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::measure::{
    stored_between, CpuSample, Latencies, Percentiles, Processes, StoredMessages,
};
use crate::progress::Progress;

/// One saga, run to its end.
pub(crate) type SagaFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// A count that may need to ask another process.
pub(crate) type CountFuture<'a> = Pin<Box<dyn Future<Output = anyhow::Result<u64>> + Send + 'a>>;

/// A system under test: something that runs whole sagas.
pub(crate) trait System: Send + Sync + 'static {
    /// Runs one new saga to its end, and fails if it did not end as planned.
    fn saga(self: Arc<Self>) -> SagaFuture;
    /// NATS messages sent plus received so far by every connection of the system, those of
    /// its child processes included.
    fn messages(&self) -> CountFuture<'_>;
    /// The system's own child processes (coordinator replicas), whose CPU time counts.
    fn processes(&self) -> Vec<u32> {
        Vec::new()
    }
}

/// How each setting is timed and observed.
#[derive(Clone)]
pub(crate) struct Env {
    pub(crate) processes: Processes,
    /// The system's server, for the messages JetStream stored.
    pub(crate) stored: StoredMessages,
    pub(crate) progress: Progress,
    pub(crate) warmup: Duration,
    pub(crate) measure: Duration,
    /// A saga not done after this long counts as an error.
    pub(crate) saga_timeout: Duration,
}

/// The shape of the offered load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Load {
    /// This many sagas in flight at all times.
    Closed { concurrency: usize },
    /// Sagas started at this many per second, whatever happens.
    Open { rate: f64 },
}

/// What one setting measured.
#[derive(Debug, Clone)]
pub(crate) struct Measurement {
    /// `floor` or `ours`.
    pub(crate) system: &'static str,
    pub(crate) load: Load,
    /// Coordinator replicas (0 for the floor).
    pub(crate) coordinators: usize,
    /// Sagas that ended as planned within the window.
    pub(crate) completed: u64,
    /// Sagas that failed, ended otherwise than planned, or timed out.
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) window: Duration,
    pub(crate) latency: Percentiles,
    /// CPU used within the window.
    pub(crate) cpu: CpuSample,
    /// NATS messages sent and received within the window.
    pub(crate) messages: u64,
    /// Messages JetStream stored within the window (durable writes), over every stream.
    pub(crate) writes: u64,
}

impl Measurement {
    /// Completed sagas per second.
    pub(crate) fn throughput(&self) -> f64 {
        per(self.completed as f64, self.window.as_secs_f64())
    }

    /// CPU milliseconds (bench, its coordinator processes, server) per completed saga.
    pub(crate) fn cpu_ms_per_saga(&self) -> f64 {
        per(self.cpu.sagas().as_secs_f64() * 1000.0, self.completed as f64)
    }

    /// Server CPU milliseconds per completed saga.
    pub(crate) fn server_cpu_ms_per_saga(&self) -> f64 {
        per(self.cpu.server.as_secs_f64() * 1000.0, self.completed as f64)
    }

    /// CPU (in cores) used during the window by processes other than the bench, its children
    /// and the server.
    pub(crate) fn other_load(&self) -> f64 {
        per(self.cpu.others().as_secs_f64(), self.window.as_secs_f64())
    }

    /// NATS messages (sent + received by the clients) per completed saga.
    pub(crate) fn messages_per_saga(&self) -> f64 {
        per(self.messages as f64, self.completed as f64)
    }

    /// Messages stored by JetStream per completed saga.
    pub(crate) fn writes_per_saga(&self) -> f64 {
        per(self.writes as f64, self.completed as f64)
    }
}

/// `a / b`, or 0 when `b` is 0.
pub(crate) fn per(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// Whether saga number `n` is one of the planned failures, so that a fraction `rate` of any
/// run of consecutive sagas fails, spread evenly.
pub(crate) fn planned_failure(n: u64, rate: f64) -> bool {
    let rate = rate.clamp(0.0, 1.0);
    ((n + 1) as f64 * rate).floor() > (n as f64 * rate).floor()
}

/// What the tasks of one setting record.
struct Recorder {
    start: Instant,
    end: Instant,
    latencies: Latencies,
    completed: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Every saga finished, warm-up and drain included (for progress).
    done: Arc<AtomicU64>,
}

impl Recorder {
    fn new(start: Instant, end: Instant) -> Self {
        Recorder {
            start,
            end,
            latencies: Latencies::new(),
            completed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            done: Arc::default(),
        }
    }

    fn in_window(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }

    /// Records a saga that started (or was meant to start) at `from` and ended at `to`.
    /// Latency counts for sagas whose `key` instant is in the window, throughput for
    /// those that ended in it.
    fn saga_ended(&self, result: &anyhow::Result<()>, from: Instant, to: Instant, key: Instant) {
        self.done.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                if self.in_window(to) {
                    self.completed.fetch_add(1, Ordering::Relaxed);
                }
                if self.in_window(key) {
                    self.latencies.record(to - from);
                }
            }
            Err(e) => {
                if self.in_window(key) || self.in_window(to) {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                }
                let mut first = self.first_error.lock().expect("lock");
                if first.is_none() {
                    *first = Some(format!("{e:#}"));
                }
            }
        }
    }
}

async fn run_saga(system: Arc<dyn System>, timeout: Duration) -> anyhow::Result<()> {
    match tokio::time::timeout(timeout, system.saga()).await {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("saga not done within {timeout:?}")),
    }
}

/// What was counted between the window's edges.
struct Observed {
    cpu: CpuSample,
    messages: u64,
    writes: u64,
}

/// Samples CPU, messages and stored messages at the window's edges.
async fn observe_window(
    system: &dyn System,
    env: &Env,
    rec: &Recorder,
) -> anyhow::Result<Observed> {
    tokio::time::sleep_until(rec.start).await;
    // The requests that count (a stream listing, a line to each coordinator process) are made
    // before the CPU window opens and after it closes, so that they cost it nothing; they take
    // a millisecond or so, against a window of seconds.
    let stored0 = env.stored.snapshot().await?;
    let msgs0 = system.messages().await?;
    let children = system.processes();
    let cpu0 = env.processes.sample(&children)?;
    tokio::time::sleep_until(rec.end).await;
    let cpu1 = env.processes.sample(&children)?;
    let msgs1 = system.messages().await?;
    let stored1 = env.stored.snapshot().await?;
    Ok(Observed {
        cpu: cpu1.since(&cpu0),
        messages: msgs1.saturating_sub(msgs0),
        writes: stored_between(&stored0, &stored1),
    })
}

fn measurement(
    name: &'static str,
    load: Load,
    coordinators: usize,
    env: &Env,
    rec: &Recorder,
    Observed { cpu, messages, writes }: Observed,
) -> Measurement {
    Measurement {
        system: name,
        load,
        coordinators,
        completed: rec.completed.load(Ordering::Relaxed),
        errors: rec.errors.load(Ordering::Relaxed),
        first_error: rec.first_error.lock().expect("lock").clone(),
        window: env.measure,
        latency: rec.latencies.percentiles(),
        cpu,
        messages,
        writes,
    }
}

/// Runs `concurrency` sagas at a time for the warm-up and the measured window.
pub(crate) async fn closed_loop(
    name: &'static str,
    coordinators: usize,
    system: Arc<dyn System>,
    concurrency: usize,
    env: &Env,
    label: String,
) -> anyhow::Result<Measurement> {
    let start = Instant::now() + env.warmup;
    let rec = Arc::new(Recorder::new(start, start + env.measure));
    let phase = env.progress.phase(label, rec.start, rec.end, rec.done.clone());
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (system, rec, timeout) = (system.clone(), rec.clone(), env.saga_timeout);
        tasks.push(tokio::spawn(async move {
            loop {
                let from = Instant::now();
                if from >= rec.end {
                    break;
                }
                let result = run_saga(system.clone(), timeout).await;
                let to = Instant::now();
                rec.saga_ended(&result, from, to, to);
                if result.is_err() {
                    // Do not spin on a system that fails at once.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }));
    }
    let observed = observe_window(&*system, env, &rec).await?;
    for task in tasks {
        task.await?;
    }
    let m = measurement(name, Load::Closed { concurrency }, coordinators, env, &rec, observed);
    phase.finish(&crate::report::summary(&m));
    Ok(m)
}

/// Starts `rate` sagas per second on a fixed schedule; each saga's latency runs from the
/// moment it was meant to start.
pub(crate) async fn open_loop(
    name: &'static str,
    coordinators: usize,
    system: Arc<dyn System>,
    rate: f64,
    env: &Env,
    label: String,
) -> anyhow::Result<Measurement> {
    anyhow::ensure!(rate > 0.0, "open-loop rate must be positive, not {rate}");
    let origin = Instant::now();
    let start = origin + env.warmup;
    let rec = Arc::new(Recorder::new(start, start + env.measure));
    let phase = env.progress.phase(label, rec.start, rec.end, rec.done.clone());
    let outstanding = Arc::new(AtomicU64::new(0));
    let generator = {
        let (system, rec, outstanding) = (system.clone(), rec.clone(), outstanding.clone());
        let timeout = env.saga_timeout;
        tokio::spawn(async move {
            for i in 0u64.. {
                let intended = origin + Duration::from_secs_f64(i as f64 / rate);
                if intended >= rec.end {
                    break;
                }
                tokio::time::sleep_until(intended).await;
                let (system, rec, outstanding) = (system.clone(), rec.clone(), outstanding.clone());
                outstanding.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let result = run_saga(system.clone(), timeout).await;
                    rec.saga_ended(&result, intended, Instant::now(), intended);
                    outstanding.fetch_sub(1, Ordering::Relaxed);
                });
            }
        })
    };
    let observed = observe_window(&*system, env, &rec).await?;
    generator.await?;
    // Every saga ends or times out within the saga timeout.
    while outstanding.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m = measurement(name, Load::Open { rate }, coordinators, env, &rec, observed);
    phase.finish(&crate::report::summary(&m));
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planned_failures_are_the_requested_fraction() {
        for (rate, expected) in [(0.0, 0), (0.1, 100), (0.25, 250), (0.5, 500), (1.0, 1000)] {
            let failures = (0..1000).filter(|&n| planned_failure(n, rate)).count();
            assert_eq!(failures, expected, "rate {rate}");
        }
        // Spread out, not bunched at the start.
        let first: Vec<u64> = (0..20).filter(|&n| planned_failure(n, 0.25)).collect();
        assert_eq!(first, vec![3, 7, 11, 15, 19]);
    }

    #[test]
    fn per_saga_figures_guard_against_zero() {
        assert_eq!(per(5.0, 0.0), 0.0);
        assert_eq!(per(5.0, 2.0), 2.5);
    }

    #[test]
    fn per_saga_figures_divide_by_the_sagas_completed() {
        let ms = Duration::from_millis;
        let mut m = Measurement {
            system: "floor",
            load: Load::Closed { concurrency: 1 },
            coordinators: 0,
            completed: 400,
            errors: 0,
            first_error: None,
            window: Duration::from_secs(2),
            latency: Percentiles::default(),
            cpu: CpuSample {
                bench: ms(300),
                replicas: ms(500),
                server: ms(200),
                machine: ms(1400),
            },
            messages: 8_000,
            writes: 1_610,
        };
        assert_eq!(m.throughput(), 200.0);
        assert_eq!(m.cpu_ms_per_saga(), 2.5);
        assert_eq!(m.server_cpu_ms_per_saga(), 0.5);
        assert_eq!(m.messages_per_saga(), 20.0);
        assert_eq!(m.writes_per_saga(), 4.025);
        assert_eq!(m.other_load(), 0.2);
        m.completed = 0;
        assert_eq!(m.writes_per_saga(), 0.0);
    }
}
