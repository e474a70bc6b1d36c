//! Ours: saga-nats as a user runs it. Coordinator replicas ([`Coordinator`], each on its own
//! connection, default settings; in this process, or each in a child process of its own with
//! `--coordinator-processes`, see [`crate::replica`]), one echo [`Participant`] per step
//! service (each on its own connection), and one [`SagaClient`] that starts sagas.
//!
//! A saga is done when its terminal lifecycle event arrives. Rather than one
//! [`SagaClient::wait`] per saga (a subscription and a state read each, and a read per event),
//! one core NATS subscription to the terminal events dispatches them to the waiting sagas.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use futures::StreamExt;
use saga_core::SagaDefinition;
use saga_nats::{Command, Coordinator, CoordinatorConfig, Participant, SagaClient, StepError};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::conn::{Conn, CLIENT_USER, COORDINATOR_USER};
use crate::load::{planned_failure, CountFuture, SagaFuture, System};
use crate::measure::MessageCounter;
use crate::replica::CoordinatorProcess;

/// The benchmark saga's definition name.
const SAGA: &str = "bench";
/// Handlers a participant runs at once: enough for the largest closed loop.
const PARTICIPANT_CONCURRENCY: usize = 256;
/// Each step's timeout: long enough for the in-flight run, which holds every saga at its
/// first step until the gate opens (no timer fires in the other runs either way).
const STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Holds the first step's handler until opened (`--in-flight`): a participant that is slow
/// until it speeds up.
#[derive(Clone)]
pub(crate) struct Gate {
    /// `true` once the handlers may go on.
    pub(crate) open: tokio::sync::watch::Receiver<bool>,
    /// Handlers of the first step waiting at the gate now.
    pub(crate) waiting: Arc<AtomicU64>,
    /// Handlers the first participant runs at once.
    pub(crate) concurrency: usize,
}

/// The saga's input: what the participants need, and the payload.
#[derive(Debug, Serialize)]
struct BenchInput<'a> {
    n: u64,
    fail: bool,
    pad: &'a str,
}

/// What a participant reads of the input (the payload is skipped).
#[derive(Debug, Deserialize)]
struct StepInput {
    n: u64,
    fail: bool,
}

/// How a saga ended, from its terminal lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    Completed,
    Compensated,
    Other(String),
}

impl Ended {
    fn from_kind(kind: &str) -> Ended {
        match kind {
            "completed" => Ended::Completed,
            "compensated" => Ended::Compensated,
            other => Ended::Other(other.to_owned()),
        }
    }
}

/// Sagas waiting for their end, and ends that arrived before anyone waited.
#[derive(Default)]
struct Waiters {
    inner: Mutex<WaitMap>,
}

#[derive(Default)]
struct WaitMap {
    waiting: HashMap<String, oneshot::Sender<Ended>>,
    early: HashMap<String, Ended>,
}

impl Waiters {
    fn ended(&self, id: &str, how: Ended) {
        let mut map = self.inner.lock().expect("lock");
        match map.waiting.remove(id) {
            Some(tx) => {
                let _ = tx.send(how);
            }
            None => {
                map.early.insert(id.to_owned(), how);
            }
        }
    }

    async fn wait(&self, id: &str) -> anyhow::Result<Ended> {
        let rx = {
            let mut map = self.inner.lock().expect("lock");
            if let Some(how) = map.early.remove(id) {
                return Ok(how);
            }
            let (tx, rx) = oneshot::channel();
            map.waiting.insert(id.to_owned(), tx);
            rx
        };
        let _forget = Forget { waiters: self, id };
        rx.await.context("event dispatcher stopped")
    }
}

/// Removes a waiter that gave up (timed out) so that the map does not grow.
struct Forget<'a> {
    waiters: &'a Waiters,
    id: &'a str,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.waiters.inner.lock().expect("lock").waiting.remove(self.id);
    }
}

/// The id and event of a saga log subject `saga.log.<id>.<saga>.<event>`.
fn parse_event_subject(subject: &str) -> Option<(&str, &str)> {
    let mut parts = subject.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("saga"), Some("log"), Some(id), Some(_), Some(kind), None) => Some((id, kind)),
        _ => None,
    }
}

/// The benchmark saga: `steps` compensatable steps `s0..`, step `i` on service `p<i>`.
pub(crate) fn definition(steps: usize) -> SagaDefinition {
    shaped_definition(steps, false)
}

/// The benchmark saga; with `await_step`, its second step (`s1`) is an await step that
/// waits for the domain event `p0.paid` whose `n` is the saga's, which the first step's
/// handler publishes.
pub(crate) fn shaped_definition(steps: usize, await_step: bool) -> SagaDefinition {
    let mut b = SagaDefinition::builder(SAGA);
    for i in 0..steps {
        if await_step && i == AWAITED {
            b = b.await_step(&format!("s{i}"), |a| {
                a.event(PAID_EVENT).matching("n", "input.n").timeout(STEP_TIMEOUT)
            });
            continue;
        }
        b = b.step(&format!("s{i}"), &format!("p{i}"), "do", |s| {
            s.compensation("undo").timeout(STEP_TIMEOUT)
        });
    }
    b.build()
}

/// Which step is the await step with `--await-step`.
const AWAITED: usize = 1;
/// The domain event (after `domain.`) the await step waits for: the first step's service
/// publishes it.
const PAID_EVENT: &str = "p0.paid";

/// The event the first step's handler publishes with `--await-step`.
#[derive(Serialize)]
struct Paid {
    n: u64,
}

/// One coordinator replica.
enum Replica {
    /// In this process, on a connection of its own (counted by [`Ours::counter`]).
    InProcess(Box<Coordinator>),
    /// In a child process, killed when the last clone is dropped.
    Process(Arc<CoordinatorProcess>),
}

/// The coordinators, participants and client of one run.
pub(crate) struct Ours {
    conn: Conn,
    steps: usize,
    def: SagaDefinition,
    client: SagaClient,
    waiters: Arc<Waiters>,
    coordinators: Mutex<Vec<Replica>>,
    /// Whether new replicas run as child processes.
    replica_processes: bool,
    participants: Vec<Participant>,
    counter: Mutex<MessageCounter>,
    dispatcher: tokio::task::JoinHandle<()>,
    failure_rate: f64,
    pad: String,
    next: AtomicU64,
}

impl Ours {
    /// Starts `coordinators` replicas (each in a child process if `replica_processes`), the
    /// participants and the client.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn start(
        conn: &Conn,
        steps: usize,
        payload: usize,
        failure_rate: f64,
        coordinators: usize,
        replica_processes: bool,
        gate: Option<Gate>,
        await_step: bool,
    ) -> anyhow::Result<Arc<Ours>> {
        anyhow::ensure!(
            !await_step || (steps > AWAITED && !replica_processes),
            "--await-step needs at least 2 steps and coordinators in this process"
        );
        let def = shaped_definition(steps, await_step);
        let mut counter = MessageCounter::default();
        let mut replicas = Vec::new();
        for _ in 0..coordinators {
            replicas.push(start_replica(conn, steps, &def, replica_processes, &mut counter).await?);
        }
        let mut participants = Vec::new();
        for i in 0..steps {
            if await_step && i == AWAITED {
                continue;
            }
            let service = format!("p{i}");
            let nats = conn.connect(&service).await.context("connecting a participant")?;
            counter.watch(&nats);
            let last = i + 1 == steps;
            let publisher = (await_step && i + 1 == AWAITED).then(|| nats.clone());
            let gate = gate.clone().filter(|_| i == 0);
            let concurrency = gate.as_ref().map_or(PARTICIPANT_CONCURRENCY, |g| g.concurrency);
            let participant = Participant::builder(nats, &service)
                .action("do", move |cmd: Command<StepInput>| {
                    let gate = gate.clone();
                    let publisher = publisher.clone();
                    async move {
                        if let Some(nats) = publisher {
                            let id = format!("paid-{}", cmd.saga_id);
                            let paid = Paid { n: cmd.input.n };
                            saga_nats::follow::publish_domain_event(&nats, PAID_EVENT, &id, &paid)
                                .await
                                .map_err(|e| StepError::transient(e.to_string()))?;
                        }
                        if let Some(mut gate) = gate {
                            gate.waiting.fetch_add(1, Ordering::Relaxed);
                            let _ = gate.open.wait_for(|open| *open).await;
                            gate.waiting.fetch_sub(1, Ordering::Relaxed);
                        }
                        if last && cmd.input.fail {
                            return Err(StepError::business("planned failure"));
                        }
                        Ok(cmd.input.n)
                    }
                })
                .compensation("undo", |cmd: Command<StepInput>| async move { Ok(cmd.input.n) })
                .concurrency(concurrency)
                .start()
                .await
                .with_context(|| format!("starting participant p{i}"))?;
            participants.push(participant);
        }
        let nats = conn.connect(CLIENT_USER).await.context("connecting the saga client")?;
        counter.watch(&nats);
        let client = SagaClient::new(nats.clone())
            .await
            .context("starting the saga client")?
            .only([SAGA])
            .context("scoping the saga client")?;
        let waiters = Arc::new(Waiters::default());
        let mut subs = Vec::new();
        for kind in ["completed", "compensated", "needs_intervention"] {
            subs.push(nats.subscribe(format!("saga.log.*.{SAGA}.{kind}")).await?);
        }
        nats.flush().await?;
        let dispatcher = {
            let waiters = waiters.clone();
            let mut events = futures::stream::select_all(subs);
            tokio::spawn(async move {
                while let Some(msg) = events.next().await {
                    if let Some((id, kind)) = parse_event_subject(&msg.subject) {
                        waiters.ended(id, Ended::from_kind(kind));
                    }
                }
            })
        };
        Ok(Arc::new(Ours {
            conn: conn.clone(),
            steps,
            def,
            client,
            waiters,
            coordinators: Mutex::new(replicas),
            replica_processes,
            participants,
            counter: Mutex::new(counter),
            dispatcher,
            failure_rate,
            pad: "x".repeat(payload),
            next: AtomicU64::new(0),
        }))
    }

    /// Starts one more coordinator replica, in a child process if the others are.
    pub(crate) async fn add_coordinator(&self) -> anyhow::Result<()> {
        let mut counter = self.counter.lock().expect("lock").clone();
        let replica =
            start_replica(&self.conn, self.steps, &self.def, self.replica_processes, &mut counter)
                .await?;
        *self.counter.lock().expect("lock") = counter;
        self.coordinators.lock().expect("lock").push(replica);
        Ok(())
    }

    /// The replicas running as child processes.
    fn replica_processes(&self) -> Vec<Arc<CoordinatorProcess>> {
        let replicas = self.coordinators.lock().expect("lock");
        replicas
            .iter()
            .filter_map(|r| match r {
                Replica::Process(p) => Some(p.clone()),
                Replica::InProcess(_) => None,
            })
            .collect()
    }

    /// Messages of this process's connections and of every coordinator process.
    async fn count_messages(&self) -> anyhow::Result<u64> {
        let mut total = self.counter.lock().expect("lock").total();
        for replica in self.replica_processes() {
            total += replica.messages().await?;
        }
        Ok(total)
    }

    /// Coordinator replicas running.
    pub(crate) fn coordinators(&self) -> usize {
        self.coordinators.lock().expect("lock").len()
    }

    /// Stops everything: gracefully in this process; coordinator processes are killed.
    pub(crate) async fn stop(&self) {
        for p in &self.participants {
            p.shutdown().await;
        }
        let replicas = std::mem::take(&mut *self.coordinators.lock().expect("lock"));
        for replica in replicas {
            match replica {
                Replica::InProcess(c) => c.shutdown().await,
                Replica::Process(p) => drop(p),
            }
        }
        self.dispatcher.abort();
    }

    async fn run(self: Arc<Self>, n: u64) -> anyhow::Result<()> {
        let id = self.begin(n).await?;
        self.end(&id, n).await
    }

    /// Starts saga number `n`; returns its id once the start is accepted.
    pub(crate) async fn begin(&self, n: u64) -> anyhow::Result<saga_core::SagaId> {
        let fail = planned_failure(n, self.failure_rate);
        let input = BenchInput { n, fail, pad: &self.pad };
        self.client.start(SAGA, &input).await.context("starting a saga")
    }

    /// Waits for saga number `n`, started as `id`, to end, and fails if it did not end as
    /// planned.
    pub(crate) async fn end(&self, id: &saga_core::SagaId, n: u64) -> anyhow::Result<()> {
        let how = self.waiters.wait(id.as_str()).await?;
        let planned = if planned_failure(n, self.failure_rate) {
            Ended::Compensated
        } else {
            Ended::Completed
        };
        if how != planned {
            bail!("saga {id} (n = {n}) ended {how:?}, planned {planned:?}");
        }
        Ok(())
    }
}

/// Starts a replica in this process (its connection watched by `counter`) or in a child
/// process.
async fn start_replica(
    conn: &Conn,
    steps: usize,
    def: &SagaDefinition,
    in_child_process: bool,
    counter: &mut MessageCounter,
) -> anyhow::Result<Replica> {
    if in_child_process {
        return Ok(Replica::Process(Arc::new(CoordinatorProcess::start(conn, steps).await?)));
    }
    let nats = conn.connect(COORDINATOR_USER).await.context("connecting a coordinator")?;
    counter.watch(&nats);
    Ok(Replica::InProcess(Box::new(start_coordinator(nats, def).await?)))
}

/// `--coordinator-workers`, set once at start-up.
static COORDINATOR_WORKERS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Sets every coordinator replica's worker count (`--coordinator-workers`), in this process
/// and in the coordinator processes it starts.
pub(crate) fn set_coordinator_workers(workers: usize) {
    let _ = COORDINATOR_WORKERS.set(workers);
}

/// The worker count set by [`set_coordinator_workers`], if any.
pub(crate) fn coordinator_workers() -> Option<usize> {
    COORDINATOR_WORKERS.get().copied()
}

/// A coordinator of the benchmark saga with default settings (but for
/// `--coordinator-workers`), in this process or in a coordinator process.
pub(crate) async fn start_coordinator(
    conn: async_nats::Client,
    def: &SagaDefinition,
) -> anyhow::Result<Coordinator> {
    let mut config = CoordinatorConfig { definitions: vec![def.clone()], ..Default::default() };
    if let Some(workers) = coordinator_workers() {
        config.workers = workers;
    }
    Coordinator::start(conn, config).await.context("starting a coordinator")
}

impl System for Ours {
    fn saga(self: Arc<Self>) -> SagaFuture {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Box::pin(self.run(n))
    }

    fn messages(&self) -> CountFuture<'_> {
        Box::pin(self.count_messages())
    }

    fn processes(&self) -> Vec<u32> {
        self.replica_processes().iter().map(|p| p.pid()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_subjects_parse_into_id_and_kind() {
        assert_eq!(
            parse_event_subject("saga.log.0191abc.bench.completed"),
            Some(("0191abc", "completed"))
        );
        assert_eq!(parse_event_subject("saga.log.x.bench"), None);
        assert_eq!(parse_event_subject("saga.in.x.reply"), None);
        assert_eq!(parse_event_subject("saga.log.a.bench.completed.b"), None);
    }

    #[tokio::test]
    async fn an_end_that_arrives_before_its_waiter_is_kept() {
        let w = Waiters::default();
        w.ended("a", Ended::Compensated);
        assert_eq!(w.wait("a").await.unwrap(), Ended::Compensated);
        assert!(w.inner.lock().unwrap().early.is_empty());
    }

    #[tokio::test]
    async fn a_waiter_gets_its_own_end() {
        let w = Arc::new(Waiters::default());
        let waiting = tokio::spawn({
            let w = w.clone();
            async move { w.wait("b").await.unwrap() }
        });
        while !w.inner.lock().unwrap().waiting.contains_key("b") {
            tokio::task::yield_now().await;
        }
        w.ended("other", Ended::Completed);
        w.ended("b", Ended::Other("needs_intervention".into()));
        assert_eq!(waiting.await.unwrap(), Ended::Other("needs_intervention".into()));
        assert!(w.inner.lock().unwrap().waiting.is_empty());
    }

    #[test]
    fn the_definition_is_valid() {
        let plan = definition(3).validate().expect("valid");
        assert_eq!(plan.steps().len(), 3);
    }
}
