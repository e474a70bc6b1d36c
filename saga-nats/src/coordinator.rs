//! The coordinator: starts sagas, sends each step's command, records every outcome in the
//! saga's log and decides what comes next.
//!
//! Any number of replicas share one durable consumer of starts and operator actions. The
//! replica that receives a start **holds** it, unacknowledged, for as long as the saga lives:
//! the start is the saga's durable record until its first transition is logged, and the held
//! message is how another replica takes the saga over if this one dies (the server redelivers
//! it after the ack wait; the holder confirms it is alive every third of that). The holder
//! sends commands as core NATS requests whose reply subject names the replica and the service
//! that must answer, so replies come back to the replica that keeps the saga warm in memory,
//! and keeps the steps' timers in memory too.
//!
//! Each transition is decided by the pure state machine, appended to the saga's log with a
//! compare-and-swap over all of the saga's log subjects, and only then carried out
//! (`Worker::execute` is the one place where effects happen). A replica that loses the
//! compare-and-swap reloads and decides again, so two replicas never both act on one state.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::StreamExt;
use saga_core::wire::{
    quote, CommandMessage, LifecycleNote, LogRecord, OperatorMessage, ReplyMessage, StartMessage,
    PROTOCOL_VERSION,
};
use saga_core::{
    Awaiting, Codec, CodecError, Effect, Event, Phase, Plan, SagaDefinition, SagaId, SagaState,
    StepName, TimelineEntry, Timer, Timestamp,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::admin::AdminService;
use crate::deliver::{dead_letter, now, redelivery_delay};
use crate::observe;
use crate::provision::{open_effects, provision, EffectsConfig, ProvisionConfig, ProvisionError};
use crate::store::{Registry, RegistryError, SagaLog, StoreError, Versioned};
use crate::subjects::{self, headers, InputKind, ReplyTo};

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Streams, retention and take-over time (see [`ProvisionConfig`]).
    pub provision: ProvisionConfig,
    /// Sagas are spread over this many worker tasks by id (default 32); each worker handles
    /// each of its sagas' inputs one at a time, in order.
    pub workers: usize,
    /// The largest message accepted or produced.
    pub max_message_size: usize,
    /// Definitions to register at start-up.
    pub definitions: Vec<SagaDefinition>,
    /// This replica's name in reply subjects (a token); a random one when `None`.
    pub replica: Option<String>,
    /// How many times an input that could not be handled is delivered before it is
    /// dead-lettered with its reason.
    pub max_deliveries: i64,
    /// Serve the admin service ([`crate::admin`]) from this replica.
    pub admin: bool,
    /// Key-value buckets the services keep their own state in, created at start if missing
    /// (one value per key, file storage): with least privilege no service may create
    /// streams (docs/SECURITY.md).
    pub kv_buckets: Vec<String>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            provision: ProvisionConfig::default(),
            workers: 32,
            max_message_size: saga_core::wire::DEFAULT_MAX_MESSAGE_SIZE,
            definitions: Vec::new(),
            replica: None,
            max_deliveries: 10,
            admin: true,
            kv_buckets: Vec::new(),
        }
    }
}

/// Why a coordinator could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// The server or the streams are not usable.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// A definition was refused.
    #[error(transparent)]
    Definition(#[from] RegistryError),
    /// The replica name is not a token.
    #[error("coordinator replica name {name:?} {reason}")]
    InvalidReplica {
        /// The name.
        name: String,
        /// What is wrong.
        reason: saga_core::TokenError,
    },
    /// NATS failed.
    #[error("coordinator: NATS error: {0}")]
    Nats(async_nats::Error),
}

impl CoordinatorError {
    /// Whether trying again later may succeed: NATS failed or timed out (the server may be
    /// starting or electing a leader), rather than something being refused or invalid.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CoordinatorError::Provision(ProvisionError::Create { .. })
                | CoordinatorError::Nats(_)
                | CoordinatorError::Definition(RegistryError::Nats(_))
        )
    }
}

/// A running coordinator replica. Cheap to clone; [`Coordinator::shutdown`] stops it
/// gracefully, handing the sagas it holds to the other replicas at once.
#[derive(Debug, Clone)]
pub struct Coordinator {
    shutdown: watch::Sender<bool>,
    done: Arc<tokio::sync::Mutex<Option<JoinHandle<()>>>>,
    /// The matchers of the await steps' domain events.
    matchers: Arc<crate::awaits::Matchers>,
    registry: Registry,
    replica: String,
    admin: Option<Arc<AdminService>>,
}

impl Coordinator {
    /// Provisions the streams, registers the configured definitions and starts consuming.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use saga_nats::{Coordinator, CoordinatorConfig};
    ///
    /// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    /// let def = saga_core::SagaDefinition::load("sagas/place-order.yaml")?;
    /// let coordinator = Coordinator::start(
    ///     client,
    ///     CoordinatorConfig { definitions: vec![def], ..Default::default() },
    /// )
    /// .await?;
    /// // ... until it is time to stop:
    /// coordinator.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start(
        client: async_nats::Client,
        config: CoordinatorConfig,
    ) -> Result<Coordinator, CoordinatorError> {
        let replica = match &config.replica {
            Some(name) => {
                saga_core::check_token(name).map_err(|reason| {
                    CoordinatorError::InvalidReplica { name: quote(name), reason }
                })?;
                name.clone()
            }
            None => uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
        };
        provision(&client, &config.provision).await?;
        // Each worker may hold a batch's appends unanswered while it sends one more: the
        // context must allow them all, or every worker could wait for a slot none gives back.
        let in_flight = config.workers.max(1) * MAX_BATCH + 1024;
        let js = jetstream::ContextBuilder::new().max_ack_inflight(in_flight).build(client.clone());
        let registry = Registry::open(&js).await?;
        let mut services = std::collections::BTreeSet::new();
        for def in &config.definitions {
            let plan = registry.register(def).await?;
            info!(saga = %plan.name(), digest = plan.digest(), "registered saga definition");
            // Await steps send no command: they have no service.
            services
                .extend(def.steps.iter().filter(|s| s.awaits.is_none()).map(|s| s.service.clone()));
        }
        // The participants' effect buckets, so that participants need no provisioning rights.
        let effects =
            EffectsConfig { replicas: config.provision.replicas, ..EffectsConfig::default() };
        for service in &services {
            open_effects(&client, service, &effects).await?;
        }
        for bucket in &config.kv_buckets {
            crate::provision::ensure_bucket(&client, bucket, config.provision.replicas).await?;
        }
        let codec = Codec::with_max_size(config.max_message_size);
        let log = SagaLog::open(js.clone(), codec).await.map_err(CoordinatorError::Nats)?;
        let consumer: PullConsumer = js
            .get_consumer_from_stream(subjects::COORDINATOR_CONSUMER, subjects::INPUT_STREAM)
            .await
            .map_err(|e| CoordinatorError::Nats(e.into()))?;
        let replies = client
            .subscribe(subjects::replies_of(&replica))
            .await
            .map_err(|e| CoordinatorError::Nats(e.into()))?;
        // What await steps wait for, delivered once it is stored (a subscription to the
        // subjects could hear of a message before the stream stores it, and a wait that began
        // in between would read nothing and hear nothing). Created before any wait begins, so
        // that a wait that reads nothing stored hears of what is stored after.
        let awaits = js
            .get_stream(subjects::AWAIT_STREAM)
            .await
            .map_err(|e| CoordinatorError::Nats(e.into()))?;
        let arrivals = awaits
            .create_consumer(jetstream::consumer::push::OrderedConfig {
                deliver_subject: client.new_inbox(),
                description: Some(format!("await arrivals for replica {replica}")),
                deliver_policy: jetstream::consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| CoordinatorError::Nats(e.into()))?
            .messages()
            .await
            .map_err(|e| CoordinatorError::Nats(e.into()))?;
        let matchers = Arc::new(crate::awaits::Matchers::new(
            client.clone(),
            Codec::with_max_size(config.max_message_size),
        ));
        matchers
            .ensure(&config.definitions)
            .await
            .map_err(|e| CoordinatorError::Nats(e.to_string().into()))?;
        let shared = Arc::new(Shared {
            client,
            js,
            log,
            registry: registry.clone(),
            codec,
            replica: replica.clone(),
            ack_wait: config.provision.ack_wait,
            retention: config.provision.finished_retention,
            max_deliveries: config.max_deliveries.max(1),
            held: (0..config.workers.max(1)).map(|_| Default::default()).collect(),
            tally: Arc::default(),
            awaits,
            waiting: crate::awaits::Waiting::default(),
            matchers: matchers.clone(),
        });
        let admin = if config.admin {
            let service = AdminService::start(
                shared.client.clone(),
                shared.log.clone(),
                shared.registry.clone(),
                shared.tally.clone(),
            )
            .await
            .map_err(CoordinatorError::Nats)?;
            Some(Arc::new(service))
        } else {
            None
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            shared,
            consumer,
            replies,
            arrivals,
            config.workers.max(1),
            shutdown_rx,
        ));
        info!(%replica, workers = config.workers, "coordinator started");
        Ok(Coordinator {
            shutdown,
            done: Arc::new(tokio::sync::Mutex::new(Some(task))),
            matchers,
            registry,
            replica,
            admin,
        })
    }

    /// The definition registry this coordinator uses.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// This replica's name (in its reply subjects).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Stops taking inputs, finishes the replies in hand, hands every saga it holds and
    /// every input it has not begun back to the other replicas (they take them over at
    /// once), and returns.
    pub async fn shutdown(&self) {
        if let Some(admin) = &self.admin {
            admin.stop();
        }
        let _ = self.shutdown.send(true);
        self.matchers.shutdown().await;
        if let Some(task) = self.done.lock().await.take() {
            let _ = task.await;
        }
    }
}

struct Shared {
    client: async_nats::Client,
    js: jetstream::Context,
    log: SagaLog,
    registry: Registry,
    codec: Codec,
    replica: String,
    ack_wait: Duration,
    retention: Duration,
    max_deliveries: i64,
    /// Per worker: the sagas it holds, and how many of them are parked (for the gauges).
    held: Vec<(std::sync::atomic::AtomicUsize, std::sync::atomic::AtomicUsize)>,
    /// The saga counts the admin service reports.
    tally: Arc<observe::Tally>,
    /// `SAGA_AWAIT`: what await steps wait for.
    awaits: jetstream::stream::Stream,
    /// Which sagas held here wait on which `SAGA_AWAIT` subjects.
    waiting: crate::awaits::Waiting,
    /// The matchers this replica runs.
    matchers: Arc<crate::awaits::Matchers>,
}

/// Work for one worker.
enum Work {
    /// A start or an operator action from the input stream.
    Input(jetstream::Message),
    /// A participant's reply (or the server's "no responders") on this replica's subject.
    Reply(ReplyTo, async_nats::Message),
    /// An event or a signal stored for an await step of this saga.
    Arrival(SagaId, async_nats::Message),
}

impl Work {
    fn saga_id(&self) -> &str {
        match self {
            Work::Input(msg) => msg.subject.split('.').nth(2).unwrap_or(""),
            Work::Reply(to, _) => to.saga_id.as_str(),
            Work::Arrival(id, _) => id.as_str(),
        }
    }
}

/// A transition decided and its log append sent, the answer not awaited yet, with what to
/// do once it comes ([`Worker::finish`]).
struct Sent {
    id: SagaId,
    ack: Result<crate::store::PendingAppend, StoreError>,
    span: tracing::Span,
    then: Then,
}

// Each lives for one round trip to the server, a batch's worth at a time: not worth boxing.
#[allow(clippy::large_enum_variant)]
enum Then {
    /// A saga's first record, from its start (`msg`): the saga goes in memory once logged.
    Begin { live: Box<Live>, effects: Vec<Effect>, record: LogRecord, msg: jetstream::Message },
    /// A transition decided on a reply's `event`.
    Reply { t: Box<Transition>, event: Event, fresh: bool },
}

impl Then {
    /// The record whose append was sent.
    fn record(&self) -> &LogRecord {
        match self {
            Then::Begin { record, .. } => record,
            Then::Reply { t, .. } => &t.record,
        }
    }
}

/// A transition decided in memory, to be logged before its effects are carried out.
struct Transition {
    /// The state before it, restored if the record is not logged.
    before: SagaState,
    record: LogRecord,
    /// How many of the record's timeline entries and lifecycle events were pending from
    /// earlier transitions.
    pending: (usize, usize),
    rule: saga_core::Rule,
    effects: Vec<Effect>,
    /// The log sequence it is appended over.
    expected: u64,
}

/// What deciding an event came to.
enum Decided {
    Logs(Box<Transition>),
    /// It changes nothing, for this reason.
    Nothing(String),
    /// Memory was behind: the saga was read again from its log, decide again.
    Reloaded,
}

/// What a transition came to once its append was answered.
enum Settled {
    /// Carried out (`None`), or nothing to do and why.
    Done(Option<String>),
    /// Decide again.
    Again,
}

/// The most inputs a worker takes from its queue at once.
const MAX_BATCH: usize = 64;

/// The longest a worker waits for the answers to one round's appends.
const ROUND_WAIT: Duration = Duration::from_secs(5);

fn saga_hash(id: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// The worker that handles a saga's inputs.
fn shard_of(work: &Work, workers: usize) -> usize {
    (saga_hash(work.saga_id()) % workers as u64) as usize
}

/// A worker's two queues. Replies and await arrivals (work on sagas it has begun) come in
/// one, inputs (starts, operator actions) in the other, and a round takes replies first,
/// then fills up with inputs: under more load than it can carry, a saga it has begun
/// finishes before it begins another, and the starts it cannot take yet wait in the input
/// stream (the input queue holds one round's worth, so few wait where their ack wait runs).
struct Queues {
    begun: mpsc::Receiver<Work>,
    inputs: mpsc::Receiver<Work>,
}

async fn run(
    shared: Arc<Shared>,
    consumer: PullConsumer,
    mut replies: async_nats::Subscriber,
    mut arrivals: jetstream::consumer::push::Ordered,
    workers: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut senders = Vec::with_capacity(workers);
    let mut input_senders = Vec::with_capacity(workers);
    let mut tasks = Vec::with_capacity(workers);
    for n in 0..workers {
        let (tx, begun) = mpsc::channel::<Work>(1024);
        let (input_tx, inputs) = mpsc::channel::<Work>(MAX_BATCH);
        senders.push(tx);
        input_senders.push(input_tx);
        tasks.push(tokio::spawn(Worker::new(shared.clone(), n).run(Queues { begun, inputs })));
    }
    // Inputs are pulled by a task of their own: a worker whose input queue is full makes the
    // pull wait (backpressure), and replies keep flowing meanwhile.
    let mut pull = tokio::spawn(pull_inputs(consumer, input_senders, shutdown.clone()));
    loop {
        let work = tokio::select! {
            _ = shutdown.changed() => break,
            _ = &mut pull => {
                if !*shutdown.borrow() {
                    warn!("the input pull stopped (a worker stopped): the coordinator stops");
                }
                break;
            }
            reply = replies.next() => match reply {
                Some(msg) => match ReplyTo::parse(&msg.subject) {
                    Some(to) => Work::Reply(to, msg),
                    None => {
                        warn!(subject = %quote(&msg.subject), "message on a reply subject that names no command: dropped");
                        continue;
                    }
                },
                None => break,
            },
            arrival = arrivals.next() => match arrival {
                Some(Err(e)) => {
                    warn!(error = %e, "error while reading await arrivals; the ordered consumer resumes after the last one read");
                    continue;
                }
                Some(Ok(msg)) => {
                    let msg = msg.message;
                    // A signal names its saga; an event, the sagas waiting on its subject.
                    let ids = match subjects::parse_signal(&msg.subject) {
                        Some((id, _, _)) => vec![id],
                        None => shared.waiting.on(&msg.subject),
                    };
                    if ids.is_empty() {
                        observe::await_arrival("unmatched");
                        debug!(subject = %quote(&msg.subject), "stored for await steps; no saga here waits for it");
                    }
                    let mut stopped = false;
                    for id in ids {
                        let work = Work::Arrival(id, msg.clone());
                        stopped |= senders[shard_of(&work, workers)].send(work).await.is_err();
                    }
                    if stopped {
                        break;
                    }
                    continue;
                }
                None => break,
            },
        };
        // A busy worker makes this wait, never drops.
        if senders[shard_of(&work, workers)].send(work).await.is_err() {
            break;
        }
    }
    // Stopped by shutdown, it has ended or is ending; stopped otherwise (the connection
    // closed), it must not go on: an input it drops is redelivered after the ack wait.
    if !pull.is_finished() {
        pull.abort();
        let _ = pull.await;
    }
    info!("coordinator stopping: handing held sagas over");
    drop(senders);
    for task in tasks {
        let _ = task.await;
    }
    if let Err(e) = shared.client.flush().await {
        warn!(error = %e, "flush on shutdown failed");
    }
    info!("coordinator stopped");
}

/// Gives an input not begun back to the input stream for redelivery now (a NAK), not after
/// the ack wait.
async fn hand_back(work: Work) {
    if let Work::Input(msg) = work {
        if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
            debug!(error = %e, "handing an input back failed (it is redelivered after the ack wait)");
        }
    }
}

/// Pulls the input stream (starts and operator actions) into the workers' input queues
/// until shutdown.
async fn pull_inputs(
    consumer: PullConsumer,
    senders: Vec<mpsc::Sender<Work>>,
    mut shutdown: watch::Receiver<bool>,
) {
    'outer: loop {
        let mut messages = match consumer.stream().max_messages_per_batch(256).messages().await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot pull inputs; retrying in 1s");
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let work = tokio::select! {
                _ = shutdown.changed() => break 'outer,
                next = messages.next() => match next {
                    Some(Ok(msg)) => Work::Input(msg),
                    Some(Err(e)) => {
                        warn!(error = %e, "error while pulling inputs");
                        continue;
                    }
                    None => {
                        warn!("input stream ended; pulling again");
                        continue 'outer;
                    }
                },
            };
            // A busy worker makes the pull wait (backpressure), never drops; at shutdown the
            // input in hand goes back to the stream at once.
            let worker = shard_of(&work, senders.len());
            let slot = tokio::select! {
                _ = shutdown.changed() => None,
                slot = senders[worker].reserve() => slot.ok(),
            };
            match slot {
                Some(slot) => slot.send(work),
                None => {
                    hand_back(work).await;
                    break 'outer;
                }
            }
        }
    }
}

/// Compare-and-swap conflicts tolerated for one input before it is left for redelivery.
const MAX_CAS_ATTEMPTS: usize = 16;

/// A saga this worker has in memory.
struct Live {
    state: SagaState,
    plan: Arc<Plan>,
    /// The log sequence of its newest record (0: none yet).
    seq: u64,
    trace: Option<String>,
    /// Timeline entries and lifecycle events decided but not yet logged (a saga rebuilt from
    /// its pending start, or a transition whose write failed).
    timeline: Vec<TimelineEntry>,
    events: Vec<LifecycleNote>,
    /// Inputs held unacknowledged while the saga lives: its start (twice, if it was
    /// redelivered here after a late keep-alive). Another replica takes the saga over if the
    /// start is redelivered to it.
    handles: Vec<jetstream::Message>,
    /// The pending timer of each step.
    armed: HashMap<StepName, (Timer, Timestamp)>,
    last_write: Instant,
    last_progress: Instant,
    /// When its in-flight attempts were sent (for the attempt-time histogram).
    sent: observe::Sent,
    /// The `SAGA_AWAIT` subjects its waits registered on this replica.
    waits: Vec<String>,
}

struct Worker {
    shared: Arc<Shared>,
    /// Its index among the workers.
    n: usize,
    sagas: HashMap<SagaId, Live>,
    timers: TimerHeap,
}

/// The fewest heap entries worth a compaction.
const COMPACT_TIMERS_FROM: usize = 4096;

/// A worker's timers, by when they fire. A cancelled timer stays in the heap until its time
/// (it is skipped then) or until a compaction drops it: every step's timeout is cancelled
/// when its reply comes, long before it would fire, so without compactions the heap would
/// hold every timeout of the last timeout period (throughput × steps × timeout entries,
/// millions with timeouts of minutes) instead of what is active.
#[derive(Debug)]
struct TimerHeap {
    heap: BinaryHeap<Reverse<(Timestamp, SagaId, TimerKey)>>,
    /// The heap's size that triggers the next compaction.
    compact_at: usize,
}

impl TimerHeap {
    fn new() -> TimerHeap {
        TimerHeap { heap: BinaryHeap::new(), compact_at: COMPACT_TIMERS_FROM }
    }

    fn push(&mut self, at: Timestamp, id: SagaId, key: TimerKey) {
        self.heap.push(Reverse((at, id, key)));
    }

    /// When the earliest entry fires.
    fn next_at(&self) -> Option<Timestamp> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The earliest entry, if it is due at `now`.
    fn pop_due(&mut self, now: Timestamp) -> Option<(Timestamp, SagaId, TimerKey)> {
        if self.next_at()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse(entry)| entry)
    }

    /// Once the heap has doubled since the last compaction, keeps only the entries for which
    /// `armed` holds. Linear in the heap, once per doubling.
    fn compact(&mut self, armed: impl Fn(&Timestamp, &SagaId, &TimerKey) -> bool) {
        if self.heap.len() < self.compact_at {
            return;
        }
        let entries = std::mem::take(&mut self.heap).into_vec();
        self.heap =
            entries.into_iter().filter(|Reverse((at, id, key))| armed(at, id, key)).collect();
        self.compact_at = (2 * self.heap.len()).max(COMPACT_TIMERS_FROM);
    }
}

/// A timer in the heap (ordered, so it can sit in a `BinaryHeap`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct TimerKey {
    step: StepName,
    phase: Phase,
    attempt: u32,
    kind: u8,
}

impl TimerKey {
    fn of(t: &Timer) -> TimerKey {
        let kind = match t.kind {
            saga_core::TimerKind::Timeout => 0,
            saga_core::TimerKind::Backoff => 1,
            saga_core::TimerKind::Redeliver => 2,
        };
        TimerKey { step: t.step.clone(), phase: t.phase, attempt: t.attempt, kind }
    }
}

/// Why an input was left for redelivery or dead-lettered.
#[derive(Debug, thiserror::Error)]
enum HandleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("too many concurrent writers to this saga")]
    Contention,
    #[error("{0}")]
    Refused(String),
}

impl HandleError {
    /// Errors that no redelivery can cure: the input goes to the dead-letter stream.
    fn is_permanent(&self) -> bool {
        matches!(
            self,
            HandleError::Registry(
                RegistryError::UnknownVersion { .. }
                    | RegistryError::UnknownSaga { .. }
                    | RegistryError::Tampered { .. }
                    | RegistryError::Invalid(_)
            ) | HandleError::Store(StoreError::Codec { .. })
                | HandleError::Codec(_)
                | HandleError::Refused(_)
        )
    }
}

impl Worker {
    fn new(shared: Arc<Shared>, n: usize) -> Worker {
        Worker { shared, n, sagas: HashMap::new(), timers: TimerHeap::new() }
    }

    /// Drops the timer heap's entries of timers no longer armed (see [`TimerHeap`]).
    fn compact_timers(&mut self) {
        let sagas = &self.sagas;
        self.timers
            .compact(|at, id, key| sagas.get(id).is_some_and(|live| live.armed_as(*at, key)));
    }

    async fn run(mut self, mut queues: Queues) {
        let mut tick =
            tokio::time::interval((self.shared.ack_wait / 3).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One sleep for the earliest timer, moved only when that changes: a new sleep per
        // input would register and drop a timer-wheel entry for every message.
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        let mut armed_for: Option<Timestamp> = None;
        let mut inputs_open = true;
        loop {
            let next_timer = self.timers.next_at();
            if next_timer != armed_for {
                if let Some(at) = next_timer {
                    let wait = Duration::from_millis(at.0.saturating_sub(now().0));
                    sleep.as_mut().reset(tokio::time::Instant::now() + wait);
                }
                armed_for = next_timer;
            }
            // Timers and keep-alives when due (a busy worker must still keep its sagas held),
            // then work on begun sagas, then inputs.
            tokio::select! {
                biased;
                _ = &mut sleep, if armed_for.is_some() => {
                    // Re-armed at the next turn for whatever is earliest then.
                    armed_for = None;
                    self.fire_timers().await
                }
                _ = tick.tick() => self.keep_alive().await,
                work = queues.begun.recv() => match work {
                    Some(work) => self.work(work, &mut queues).await,
                    // Stopping: inputs not begun go back to the stream at once.
                    None => {
                        queues.inputs.close();
                        while let Ok(work) = queues.inputs.try_recv() {
                            hand_back(work).await;
                        }
                        break;
                    }
                },
                work = queues.inputs.recv(), if inputs_open => match work {
                    Some(work) => self.work(work, &mut queues).await,
                    None => inputs_open = false,
                },
            }
            self.compact_timers();
        }
        // Hand held sagas to the other replicas now rather than after the ack wait.
        for (_, live) in self.sagas.drain() {
            for msg in live.handles {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
            }
        }
        debug!(worker = self.n, "worker stopped");
    }

    /// Handles `first` and what else waits in the queues (up to [`MAX_BATCH`], replies
    /// before inputs), one input per saga at a time: the log appends of starts and replies
    /// are sent one after the other and their answers awaited after, so that one saga's
    /// round trip to the server does not hold up the others'. A saga's later inputs wait for
    /// its earlier one's to be finished.
    async fn work(&mut self, first: Work, queues: &mut Queues) {
        let mut queue = vec![first];
        for rx in [&mut queues.begun, &mut queues.inputs] {
            while queue.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(work) => queue.push(work),
                    Err(_) => break,
                }
            }
        }
        while !queue.is_empty() {
            // The sagas in this round, by a hash of their id (a collision only defers an
            // input to the next round).
            let mut taken = std::collections::HashSet::with_capacity(queue.len());
            let mut later = Vec::new();
            let mut sent = Vec::with_capacity(queue.len());
            let single = queue.len() == 1;
            for work in queue {
                if !single && !taken.insert(saga_hash(work.saga_id())) {
                    later.push(work);
                    continue;
                }
                let begun = match work {
                    Work::Input(msg) => self.input_begin(msg).await,
                    Work::Reply(to, msg) => self.reply_begin(to, msg).await,
                    Work::Arrival(id, msg) => {
                        self.arrival(id, msg).await;
                        None
                    }
                };
                sent.extend(begun);
            }
            self.finish(sent).await;
            queue = later;
        }
    }

    /// Handles an input from the input stream: a start up to its first record's append,
    /// which is sent and returned to be finished ([`Worker::finish`]); anything else in full.
    async fn input_begin(&mut self, msg: jetstream::Message) -> Option<Sent> {
        let Some(subjects::Input { id, saga, kind, operator }) =
            subjects::parse_input(&msg.subject)
        else {
            let reason = format!("not a saga input subject: {}", quote(&msg.subject));
            self.dead_letter(&msg, &reason).await;
            return None;
        };
        if let Some(header) = headers::relayed(msg.headers.as_ref()) {
            let reason = format!(
                "input carries the JetStream header {header}: a stored message relayed by the server to this subject (a read whose reply subject was set to it), not published by a client"
            );
            self.dead_letter(&msg, &reason).await;
            return None;
        }
        let span = info_span!("saga.input", saga_id = %id, input = kind.token());
        let result = async {
            match kind {
                InputKind::Start => {
                    let start: StartMessage =
                        self.shared.codec.decode(&msg.payload).map_err(HandleError::Codec)?;
                    if start.saga_id != id || start.saga != saga {
                        return Err(HandleError::Refused(format!(
                            "start for saga {} ({}) arrived on the subject of saga {id} ({saga})",
                            start.saga_id, start.saga
                        )));
                    }
                    self.start(&id, start, msg.clone()).await
                }
                InputKind::Operator => {
                    let op: OperatorMessage =
                        self.shared.codec.decode(&msg.payload).map_err(HandleError::Codec)?;
                    if op.saga_id != id {
                        return Err(HandleError::Refused(format!(
                            "operator action for saga {} arrived on the subject of saga {id}",
                            op.saga_id
                        )));
                    }
                    let by = operator.as_deref().unwrap_or_default();
                    // The subject's saga name is what permissions checked: it must be the
                    // saga's own.
                    if self.sagas.contains_key(&id) || self.load(&id).await? {
                        let actual = self.sagas.get(&id).map(|live| live.state.saga().clone());
                        if actual.as_ref().is_some_and(|actual| *actual != saga) {
                            return Err(HandleError::Refused(format!(
                                "operator action by {by} names saga {id} a {saga}, but it is a {}",
                                actual.expect("checked")
                            )));
                        }
                    }
                    info!(action = op.action.as_str(), %by, reason = %quote(&op.reason), "operator action");
                    let refused =
                        self.apply(&id, bounded(op.to_event(by)), Some(msg.clone())).await?;
                    self.verdict(&msg, &id, op.action.as_str(), refused.as_deref()).await;
                    Ok(None)
                }
            }
        }
        .instrument(span.clone())
        .await;
        match result {
            Ok(sent) => sent,
            Err(e) => {
                self.input_failed(&msg, &id, kind, e).instrument(span).await;
                None
            }
        }
    }

    /// An input that could not be handled: redelivered after a delay, or dead-lettered when
    /// the error is permanent (or an operator action has been delivered too often).
    async fn input_failed(
        &mut self,
        msg: &jetstream::Message,
        id: &SagaId,
        kind: InputKind,
        e: HandleError,
    ) {
        let delivered = msg.info().map_or(1, |i| i.delivered);
        // A start is delivered again at every take-over: only a permanent error ends it.
        let bounded = kind == InputKind::Operator && delivered >= self.shared.max_deliveries;
        if e.is_permanent() || bounded {
            let reason = if e.is_permanent() {
                format!("cannot be handled: {e}")
            } else {
                format!("not handled after {delivered} deliveries: {e}")
            };
            if kind == InputKind::Operator {
                self.verdict(msg, id, "operator action", Some(&reason)).await;
            }
            self.dead_letter(msg, &reason).await;
        } else {
            let delay = redelivery_delay(delivered);
            warn!(saga_id = %id, error = %e, ?delay, "input not handled; it will be redelivered");
            let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
        }
    }

    /// A start: begin the saga, or take over one another replica held.
    async fn start(
        &mut self,
        id: &SagaId,
        start: StartMessage,
        msg: jetstream::Message,
    ) -> Result<Option<Sent>, HandleError> {
        if let Some(live) = self.sagas.get_mut(id) {
            same_saga(id, identity(&live.state), (&start.saga, &start.digest, &start.input))?;
            if !live.handles.is_empty() {
                // Redelivered while held here (a missed keep-alive): keep holding it.
                live.handles.push(msg);
                return Ok(None);
            }
            // A copy of a saga another replica held: take it over from its log, as below.
            self.sagas.remove(id);
        }
        // No read first: the first record's compare-and-swap below tells whether the saga
        // exists already (logged by another replica, or finished).
        let trace = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::TRACEPARENT))
            .map(|v| v.as_str().to_owned())
            .filter(|tp| crate::telemetry::trace_id(tp).is_some());
        if let Ok(info) = msg.info() {
            let published = crate::deliver::millis(info.published);
            observe::input_lag(now().0.saturating_sub(published.0));
        }
        let (mut live, effects) = self.begin(id, start, trace, Vec::new()).await?;
        // The first transition is logged before any command goes out, over nothing: so "no
        // log" always means "nothing sent", and the first attempt can go unclaimed even when
        // two replicas got the start (a restarted server can deliver a held start again, as
        // if it were new). The replica that loses the compare-and-swap takes over instead.
        let record = LogRecord {
            v: PROTOCOL_VERSION,
            snapshot: live.state.snapshot(),
            timeline: std::mem::take(&mut live.timeline),
            events: std::mem::take(&mut live.events),
            trace: live.trace.clone(),
        };
        let ack = self.shared.log.send(&record, 0).await;
        let then = Then::Begin { live: Box::new(live), effects, record, msg };
        Ok(Some(Sent { id: id.clone(), ack, span: tracing::Span::current(), then }))
    }

    /// A saga's first record was appended (or refused): hold its start `msg` and carry out
    /// its first transition, or take over the saga another replica logged first.
    async fn begun(
        &mut self,
        id: &SagaId,
        mut live: Box<Live>,
        effects: Vec<Effect>,
        record: LogRecord,
        msg: jetstream::Message,
        appended: Result<u64, StoreError>,
    ) {
        let result = match appended {
            Ok(seq) => {
                live.logged(id, seq, &record.timeline, &record.events, &self.shared.tally);
                live.handles.push(msg);
                self.sagas.insert(id.clone(), *live);
                return self.execute(id, &effects).await;
            }
            Err(StoreError::Conflict { .. }) => {
                observe::log_conflict();
                match self.shared.log.load(id).await {
                    Ok(Some(v)) => {
                        let asked = identity(&live.state);
                        self.take_over(id, v, asked, vec![msg.clone()]).await
                    }
                    Ok(None) => Err(HandleError::Refused(format!(
                        "saga {id}: its first record was refused as stale, yet no record is there"
                    ))),
                    Err(e) => Err(e.into()),
                }
            }
            // Not logged, so nothing was sent: the start is redelivered and begun again.
            Err(e) => Err(e.into()),
        };
        if let Err(e) = result {
            self.input_failed(&msg, id, InputKind::Start, e).await;
        }
    }

    /// Appends `record` to saga `id`'s log over the record at `expected` (0: none).
    async fn append(
        &self,
        id: &SagaId,
        record: &LogRecord,
        expected: u64,
    ) -> Result<u64, StoreError> {
        let appended = self.shared.log.append(record, expected).await;
        confirmed(&self.shared.log, id, record, appended).await
    }

    /// A start of a saga that is logged already: resume it from its log, and let the start
    /// go if the saga has ended.
    async fn take_over(
        &mut self,
        id: &SagaId,
        v: Versioned,
        asked: Identity<'_>,
        handles: Vec<jetstream::Message>,
    ) -> Result<(), HandleError> {
        let snap = &v.record.snapshot;
        same_saga(id, (&snap.saga, &snap.digest, &snap.input), asked)?;
        let live = self.resume(id, v, handles).await?;
        if live.state.status().is_terminal() {
            for msg in live.handles {
                let _ = msg.ack().await;
            }
            return Ok(());
        }
        info!(saga_id = %id, status = %live.state.status(), "taking over a saga another replica holds or held");
        let outstanding = live.state.outstanding(&live.plan);
        self.sagas.insert(id.clone(), live);
        self.execute(id, &outstanding).await;
        Ok(())
    }

    /// Makes sure the events `plan`'s await steps wait for are matched here (a definition
    /// registered after this replica started has no matcher yet). If one cannot start, the
    /// saga goes on: another replica's matcher, or the next saga's attempt here, stores them.
    async fn match_events_of(&self, plan: &Plan) {
        if let Err(e) = self.shared.matchers.ensure_for(plan).await {
            warn!(saga = %plan.name(), error = %e, "cannot start the matcher of an await step's events; trying again with the next saga");
        }
    }

    /// A saga rebuilt from its newest log record.
    async fn resume(
        &self,
        id: &SagaId,
        v: Versioned,
        handles: Vec<jetstream::Message>,
    ) -> Result<Live, HandleError> {
        let snap = &v.record.snapshot;
        let plan = self.shared.registry.version(&snap.saga, &snap.digest).await?;
        self.match_events_of(&plan).await;
        let state = SagaState::from_snapshot(&plan, snap).map_err(|e| {
            HandleError::Refused(format!("saga {id}'s log record cannot be resumed: {e}"))
        })?;
        let mut live = Live::new(state, plan, v.seq, v.record.trace, handles);
        live.last_write = written_at(v.written);
        Ok(live)
    }

    /// A saga begun from its start: the state after `Start`, with the transition's timeline
    /// entries and lifecycle events kept for its first log record, and the effects to carry out.
    async fn begin(
        &self,
        id: &SagaId,
        start: StartMessage,
        trace: Option<String>,
        handles: Vec<jetstream::Message>,
    ) -> Result<(Live, Vec<Effect>), HandleError> {
        let plan = self.shared.registry.version(&start.saga, &start.digest).await?;
        self.match_events_of(&plan).await;
        let mut state = SagaState::new(id.clone(), &plan);
        let handled = state.handle(&plan, now(), &Event::Start { input: start.input });
        let effects = handled.result.map_err(|r| HandleError::Refused(r.to_string()))?;
        let mut live = Live::new(state, plan, 0, trace, handles);
        live.timeline = handled.timeline;
        live.events = LifecycleNote::of(&effects);
        Ok((live, effects))
    }

    /// Loads a saga into memory: from its log, or from its pending start.
    async fn load(&mut self, id: &SagaId) -> Result<bool, HandleError> {
        if let Some(v) = self.shared.log.load(id).await? {
            let live = self.resume(id, v, Vec::new()).await?;
            self.install(id, live);
            return Ok(true);
        }
        let Some(start) = self.shared.log.pending_start(id, None).await? else {
            return Ok(false);
        };
        // Started, but its first transition is not logged yet: rebuild it from the start.
        let (live, _) = self.begin(id, start, None, Vec::new()).await?;
        self.install(id, live);
        Ok(true)
    }

    /// Puts a freshly read saga in memory, keeping what this replica held of it, and arms
    /// the timers its state asks for (the ones armed for an older state would be stale).
    fn install(&mut self, id: &SagaId, mut live: Live) {
        if let Some(old) = self.sagas.remove(id) {
            live.handles = old.handles;
            live.waits = old.waits;
            live.last_progress = old.last_progress;
            if live.trace.is_none() {
                live.trace = old.trace;
            }
        }
        for effect in live.state.outstanding(&live.plan) {
            if let Effect::ScheduleTimer { timer, at } = effect {
                self.timers.push(at, id.clone(), TimerKey::of(&timer));
                live.armed.insert(timer.step.clone(), (timer, at));
            }
        }
        self.sagas.insert(id.clone(), live);
    }

    /// Tells the operator who sent `msg` (if it named an inbox in `Saga-Verdict-To`) whether
    /// their action was applied: `refused` is why not.
    async fn verdict(
        &self,
        msg: &jetstream::Message,
        id: &SagaId,
        action: &str,
        refused: Option<&str>,
    ) {
        let to = msg.headers.as_ref().and_then(|h| h.get(headers::VERDICT_TO));
        // Only inboxes: the header must not make the coordinator publish anywhere else.
        let Some(to) = to.map(|v| v.as_str().to_owned()).filter(|t| t.starts_with("_INBOX."))
        else {
            return;
        };
        let status = self.sagas.get(id).map(|live| live.state.status().to_string());
        let body = serde_json::json!({
            "saga_id": id.as_str(),
            "action": action,
            "applied": refused.is_none(),
            "reason": refused,
            "status": status,
        });
        if let Err(e) = self.shared.client.publish(to, body.to_string().into()).await {
            debug!(error = %e, "sending an operator's verdict failed");
        }
    }

    /// Decides `event`, logs the transition and carries out its effects. `input` is the
    /// message the event came in (acknowledged once the transition is logged, or held if the
    /// saga has no holder here). `Ok(Some(why))`: the event changed nothing, and why.
    async fn apply(
        &mut self,
        id: &SagaId,
        event: Event,
        input: Option<jetstream::Message>,
    ) -> Result<Option<String>, HandleError> {
        let mut fresh = false;
        if !self.sagas.contains_key(id) {
            if !self.load(id).await? {
                warn!(saga_id = %id, event = event.name(), "input for a saga that does not exist (never started, or expired after finishing); dropped");
                if let Some(msg) = input {
                    let _ = msg.ack().await;
                }
                return Ok(Some(format!(
                    "saga {id} does not exist (never started, or expired after finishing)"
                )));
            }
            fresh = true;
        }
        self.apply_loaded(id, event, input, fresh).await
    }

    /// [`Worker::apply`] on a saga in memory; `fresh`: just read from its log.
    async fn apply_loaded(
        &mut self,
        id: &SagaId,
        mut event: Event,
        mut input: Option<jetstream::Message>,
        mut fresh: bool,
    ) -> Result<Option<String>, HandleError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let t = match self.decide(id, &event, &mut fresh, &mut input).await? {
                Decided::Logs(t) => t,
                Decided::Nothing(why) => return Ok(Some(why)),
                Decided::Reloaded => continue,
            };
            let appended = self.append(id, &t.record, t.expected).await;
            match self.settle(id, t, appended, &mut event, &mut input, &mut fresh).await? {
                Settled::Done(why) => return Ok(why),
                Settled::Again => {}
            }
        }
        Err(HandleError::Contention)
    }

    /// Decides `event` on the saga in memory (it must be): the transition to log, or why it
    /// changes nothing (then `input` is acknowledged). A rejection decided on memory that is
    /// not `fresh` is decided again on the logged state first.
    async fn decide(
        &mut self,
        id: &SagaId,
        event: &Event,
        fresh: &mut bool,
        input: &mut Option<jetstream::Message>,
    ) -> Result<Decided, HandleError> {
        let live = self.sagas.get_mut(id).expect("loaded before deciding");
        let before = live.state.clone();
        let handled = live.state.handle(&live.plan, now(), event);
        let effects = match handled.result {
            Ok(effects) => effects,
            Err(rejection) => {
                if !*fresh {
                    // Memory may be behind another replica: decide on the logged state.
                    if !self.load(id).await? {
                        return Ok(Decided::Nothing(format!("saga {id} no longer exists")));
                    }
                    *fresh = true;
                    return Ok(Decided::Reloaded);
                }
                debug!(saga_id = %id, event = event.name(), rule = ?handled.rule, reason = %rejection, "input changed nothing");
                // Another replica may have finished it: then let it go here too.
                self.let_go_if_finished(id).await;
                if let Some(msg) = input.take() {
                    if matches!(
                        event,
                        Event::Cancel { .. }
                            | Event::OperatorRetry { .. }
                            | Event::OperatorSkip { .. }
                            | Event::OperatorResolve { .. }
                    ) {
                        info!(saga_id = %id, event = event.name(), reason = %rejection, "operator action refused");
                    }
                    let _ = msg.ack().await;
                }
                return Ok(Decided::Nothing(rejection.to_string()));
            }
        };
        let mut timeline = std::mem::take(&mut live.timeline);
        let mut events = std::mem::take(&mut live.events);
        let pending = (timeline.len(), events.len());
        timeline.extend(handled.timeline);
        events.extend(LifecycleNote::of(&effects));
        let record = LogRecord {
            v: PROTOCOL_VERSION,
            snapshot: live.state.snapshot(),
            timeline,
            events,
            trace: live.trace.clone(),
        };
        Ok(Decided::Logs(Box::new(Transition {
            before,
            record,
            pending,
            rule: handled.rule,
            effects,
            expected: live.seq,
        })))
    }

    /// Carries out transition `t` of saga `id` once its append is answered, or undoes it.
    /// `Settled::Again`: decide `event` again (the saga was reloaded after a lost
    /// compare-and-swap, or `event` became the step's failure because its output would make
    /// the record too large).
    async fn settle(
        &mut self,
        id: &SagaId,
        t: Box<Transition>,
        appended: Result<u64, StoreError>,
        event: &mut Event,
        input: &mut Option<jetstream::Message>,
        fresh: &mut bool,
    ) -> Result<Settled, HandleError> {
        let live = self.sagas.get_mut(id).expect("in memory while its transition is logged");
        match appended {
            Ok(seq) => {
                let entries = &t.record.timeline[t.pending.0..];
                live.logged(id, seq, entries, &t.record.events, &self.shared.tally);
                debug!(saga_id = %id, rule = ?t.rule, status = %live.state.status(), "transition logged");
                // The saga's start is held until it ends; an operator action is done with
                // once logged (held, a redelivery would apply it a second time).
                if let Some(msg) = input.take() {
                    let _ = msg.ack().await;
                }
                self.execute(id, &t.effects).await;
                Ok(Settled::Done(None))
            }
            Err(StoreError::Conflict { .. }) => {
                observe::log_conflict();
                debug!(saga_id = %id, "compare-and-swap lost to another writer; reloading");
                // Not logged: undone first, so memory is right even if the reload fails.
                live.undo(*t);
                if !self.load(id).await? {
                    return Ok(Settled::Done(Some(format!("saga {id} no longer exists"))));
                }
                *fresh = true;
                Ok(Settled::Again)
            }
            Err(e) => {
                // Not logged: nothing happened.
                live.undo(*t);
                // A step's output that makes the saga's record too large to store would
                // fail every later attempt the same way: the output is refused, saying why
                // (the step is compensated if it has a compensation).
                if let (
                    StoreError::Codec { source: CodecError::TooLarge { size, limit, .. }, .. },
                    Event::StepSucceeded { step, attempt, output },
                ) = (&e, &*event)
                {
                    let reason = format!(
                        "with this step's output of {} bytes the saga's log record would be {size} bytes, over the limit of {limit} bytes",
                        output.as_bytes().len()
                    );
                    warn!(saga_id = %id, %step, %reason, "step output refused");
                    *event =
                        Event::StepOutputRefused { step: step.clone(), attempt: *attempt, reason };
                    return Ok(Settled::Again);
                }
                Err(e.into())
            }
        }
    }

    /// A reply, or the server's word that nobody listens on the command's subject, handled up
    /// to its transition's append, which is sent and returned to be finished
    /// ([`Worker::finish`]); a reply that is refused or changes nothing ends here.
    async fn reply_begin(&mut self, to: ReplyTo, msg: async_nats::Message) -> Option<Sent> {
        let span = info_span!("saga.reply", saga_id = %to.saga_id, step = %to.step, phase = %to.phase, attempt = to.attempt, service = %to.service);
        async {
            let mut command = None;
            if let Some(header) = headers::relayed(msg.headers.as_ref()) {
                let why = format!(
                    "reply carries the JetStream header {header}: a stored message relayed by the server to this subject, not published by the service"
                );
                self.refuse_reply(&msg, &why).await;
                return None;
            }
            let event = if msg.status == Some(StatusCode::NO_RESPONDERS) {
                // The server sends this status only to the connection that sent the request
                // (this one); anyone else on the reply subject is the owning service.
                debug!("no responders: the command was not delivered");
                Event::Undelivered { step: to.step.clone(), phase: to.phase, attempt: to.attempt }
            } else {
                let reply: ReplyMessage = match self.shared.codec.decode(&msg.payload) {
                    Ok(r) => r,
                    Err(e) => {
                        let why = format!("reply does not decode: {e}");
                        self.refuse_reply(&msg, &why).await;
                        return None;
                    }
                };
                if reply.saga_id != to.saga_id
                    || reply.step != to.step
                    || reply.phase != to.phase
                    || reply.attempt != to.attempt
                    || reply.service != to.service
                {
                    let why = format!(
                        "reply names saga {} step {} {} attempt {} of service {}, but arrived on the reply subject of another command",
                        reply.saga_id, reply.step, reply.phase, reply.attempt, reply.service
                    );
                    self.refuse_reply(&msg, &why).await;
                    return None;
                }
                command = Some(reply.command.clone());
                within_output_limit(bounded(reply.to_event()), self.shared.codec.max_size / 4)
            };
            let mut fresh = !self.sagas.contains_key(&to.saga_id);
            if fresh {
                match self.load(&to.saga_id).await {
                    Ok(true) => {}
                    Ok(false) => {
                        debug!("reply for a saga that no longer exists: dropped");
                        return None;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot load the saga of a reply; the step's timer will recover it");
                        return None;
                    }
                }
            }
            let live = &self.sagas[&to.saga_id];
            let step = live.plan.step_index(&to.step).map(|i| &live.plan.steps()[i]);
            if let (Some(def), Some(command)) = (step, &command) {
                let sent = match to.phase {
                    Phase::Action => Some(&def.action),
                    Phase::Compensation => def.compensation.as_ref(),
                };
                if sent != Some(command) {
                    let why = format!(
                        "reply for step {} {} of saga {} ran command {:?}, which that step does not send: refused",
                        to.step, to.phase, to.saga_id, command.as_str()
                    );
                    self.refuse_reply(&msg, &why).await;
                    return None;
                }
            }
            match step.map(|def| &def.service) {
                Some(owner) if owner.is_empty() => {
                    let why = format!(
                        "reply for step {} of saga {} from service {}, but that step is an await step: it sends no command and takes no reply",
                        to.step, to.saga_id, to.service
                    );
                    self.refuse_reply(&msg, &why).await;
                    return None;
                }
                Some(owner) if owner == &to.service => {}
                owner => {
                    let why = format!(
                        "reply for step {} of saga {} came from service {}, but {} owns that step: refused",
                        to.step,
                        to.saga_id,
                        to.service,
                        owner.map_or_else(|| "no service".to_owned(), |s| format!("service {s}"))
                    );
                    self.refuse_reply(&msg, &why).await;
                    return None;
                }
            }
            let t = match self.decide(&to.saga_id, &event, &mut fresh, &mut None).await {
                Ok(Decided::Logs(t)) => t,
                Ok(Decided::Nothing(_)) => return None,
                Ok(Decided::Reloaded) => {
                    let applied = self.apply_loaded(&to.saga_id, event, None, fresh).await;
                    if let Err(e) = applied {
                        not_applied(&e);
                    }
                    return None;
                }
                Err(e) => {
                    not_applied(&e);
                    return None;
                }
            };
            let ack = self.shared.log.send(&t.record, t.expected).await;
            let then = Then::Reply { t, event, fresh };
            Some(Sent { id: to.saga_id.clone(), ack, span: tracing::Span::current(), then })
        }
        .instrument(span)
        .await
    }

    /// Waits for the answers to sent appends in order and carries on from each: what the
    /// input or the reply that sent it would have done had it waited (a record whose answer
    /// was lost is looked for in the log). The whole round waits at most [`ROUND_WAIT`], so a
    /// stalled server holds the worker (and its keep-alives) that long, not a timeout per
    /// saga: an append still unanswered then counts as failed, which is safe, since a
    /// record that landed after all makes the saga's next append lose its compare-and-swap
    /// and reload. An answer that has come is taken even past the deadline (the timeout
    /// polls it first), so time spent carrying on earlier items costs a later item nothing
    /// unless the server has not answered it yet. (Awaiting them in order wakes the worker
    /// once per answer it needs; awaiting all at once woke it for every answer and measured
    /// about a tenth slower.)
    async fn finish(&mut self, sent: Vec<Sent>) {
        let deadline = tokio::time::Instant::now() + ROUND_WAIT;
        for Sent { id, ack, span, then } in sent {
            let appended = match ack {
                Ok(pending) => {
                    tokio::time::timeout_at(deadline, pending.acked()).await.unwrap_or_else(|_| {
                        let source = format!("no answer from the server within {ROUND_WAIT:?}");
                        Err(StoreError::Nats { id: id.clone(), source: source.into() })
                    })
                }
                Err(e) => Err(e),
            };
            let appended = match appended {
                failed @ Err(StoreError::Nats { .. }) => {
                    let looked_up = confirmed(&self.shared.log, &id, then.record(), failed);
                    tokio::time::timeout_at(deadline, looked_up).await.unwrap_or_else(|_| {
                        let source = format!(
                            "no answer from the server, and the log not read, within {ROUND_WAIT:?}"
                        );
                        Err(StoreError::Nats { id: id.clone(), source: source.into() })
                    })
                }
                other => other,
            };
            self.carry_on(&id, then, appended).instrument(span).await;
        }
    }

    /// Carries on from a sent append's answer (see [`Worker::finish`]).
    async fn carry_on(&mut self, id: &SagaId, then: Then, appended: Result<u64, StoreError>) {
        match then {
            Then::Begin { live, effects, record, msg } => {
                self.begun(id, live, effects, record, msg, appended).await;
            }
            Then::Reply { t, mut event, mut fresh } => {
                let mut input = None;
                let settled = self.settle(id, t, appended, &mut event, &mut input, &mut fresh);
                let applied = match settled.await {
                    Ok(Settled::Done(_)) => Ok(None),
                    Ok(Settled::Again) => self.apply_loaded(id, event, None, fresh).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = applied {
                    not_applied(&e);
                }
            }
        }
    }

    async fn refuse_reply(&self, msg: &async_nats::Message, why: &str) {
        warn!(subject = %quote(&msg.subject), reason = %quote(why), "reply refused");
        if let Err(e) = dead_letter(&self.shared.js, "coordinator", msg, why).await {
            warn!(error = %e, "could not dead-letter a refused reply");
        }
    }

    async fn fire_timers(&mut self) {
        let now_ms = now();
        while let Some((at, id, key)) = self.timers.pop_due(now_ms) {
            let Some(live) = self.sagas.get_mut(&id) else { continue };
            if !live.armed_as(at, &key) {
                continue;
            }
            let timer = live.armed[&key.step].0.clone();
            live.armed.remove(&key.step);
            if let Err(e) = self.apply(&id, Event::TimerFired(timer.clone()), None).await {
                warn!(saga_id = %id, error = %e, "timer not applied; trying again in a second");
                if let Some(live) = self.sagas.get_mut(&id) {
                    let again = Timestamp(now().0 + 1000);
                    live.armed.insert(timer.step.clone(), (timer.clone(), again));
                    self.timers.push(again, id.clone(), TimerKey::of(&timer));
                }
            }
        }
    }

    /// Forgets a saga that has finished (another replica may have finished it) and
    /// acknowledges what this replica held of it.
    async fn let_go_if_finished(&mut self, id: &SagaId) {
        if !self.sagas.get(id).is_some_and(|live| live.state.status().is_terminal()) {
            return;
        }
        let live = self.sagas.remove(id).expect("present");
        for msg in live.handles {
            let _ = msg.ack().await;
        }
    }

    /// Confirms to the server that the sagas held here are alive, and rewrites the newest
    /// record of a saga that has lived half the log's retention so it never expires. A saga
    /// held here with no timer armed (parked, or driven by another replica since an operator
    /// action reached this one) is read again from its log, so that it is let go when it ends
    /// and its timers are armed when it moves on.
    async fn keep_alive(&mut self) {
        self.count_held();
        let every = self.shared.ack_wait / 3;
        let refresh_after = self.shared.retention / 2;
        let mut stale = Vec::new();
        let mut idle = Vec::new();
        for (id, live) in &mut self.sagas {
            if live.last_progress.elapsed() >= every {
                live.last_progress = Instant::now();
                for msg in &live.handles {
                    let _ = msg.ack_with(AckKind::Progress).await;
                }
                if live.armed.is_empty() {
                    idle.push(id.clone());
                }
            }
            if live.seq > 0 && live.last_write.elapsed() >= refresh_after {
                stale.push(id.clone());
            }
        }
        for id in idle {
            if self.sagas.get(&id).is_some_and(|l| l.handles.is_empty()) {
                // A copy this replica does not hold and that waits for nothing here.
                self.sagas.remove(&id);
                continue;
            }
            match self.load(&id).await {
                Ok(_) => self.let_go_if_finished(&id).await,
                Err(e) => debug!(saga_id = %id, error = %e, "reading an idle saga again failed"),
            }
        }
        for id in stale {
            let Some(live) = self.sagas.get_mut(&id) else { continue };
            let record = LogRecord {
                v: PROTOCOL_VERSION,
                snapshot: live.state.snapshot(),
                timeline: Vec::new(),
                events: Vec::new(),
                trace: live.trace.clone(),
            };
            match self.shared.log.append(&record, live.seq).await {
                Ok(seq) => {
                    live.seq = seq;
                    live.last_write = Instant::now();
                }
                Err(e) => {
                    debug!(saga_id = %id, error = %e, "refreshing the newest record failed; reloading");
                    if self.load(&id).await.is_ok() {
                        self.let_go_if_finished(&id).await;
                    }
                }
            }
        }
    }

    /// Publishes how many sagas this worker holds (and how many are parked) to the gauges.
    fn count_held(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let held = self.sagas.values().filter(|l| !l.handles.is_empty());
        let (mut in_flight, mut parked) = (0, 0);
        for live in held {
            in_flight += 1;
            parked += usize::from(live.state.status() == saga_core::SagaStatus::NeedsIntervention);
        }
        let mine = &self.shared.held[self.n];
        mine.0.store(in_flight, Relaxed);
        mine.1.store(parked, Relaxed);
        let all = self.shared.held.iter();
        let (in_flight, parked) =
            all.fold((0, 0), |(i, p), (a, b)| (i + a.load(Relaxed), p + b.load(Relaxed)));
        observe::held(in_flight, parked, &self.shared.tally);
    }

    /// Carries out effects: the one place where commands are sent, timers armed and
    /// disarmed, and a finished saga let go.
    async fn execute(&mut self, id: &SagaId, effects: &[Effect]) {
        let Some(live) = self.sagas.get_mut(id) else { return };
        let mut failed: Vec<Event> = Vec::new();
        // What await steps found already stored when they began waiting.
        let mut arrived: Vec<Event> = Vec::new();
        for effect in effects {
            match effect {
                Effect::Dispatch(d) => {
                    let cmd = CommandMessage::from_dispatch(id, live.state.saga(), d);
                    let payload = match self.shared.codec.encode(&cmd) {
                        Ok(p) => p,
                        Err(e) => {
                            error!(saga_id = %id, step = %d.step, error = %e, "command cannot be sent");
                            let reason = format!("command cannot be sent: {e}");
                            failed.push(match d.phase {
                                Phase::Action => Event::StepFailed {
                                    step: d.step.clone(),
                                    attempt: d.attempt,
                                    reason,
                                    transient: false,
                                },
                                Phase::Compensation => Event::CompensationFailed {
                                    step: d.step.clone(),
                                    attempt: d.attempt,
                                    reason,
                                    transient: false,
                                },
                            });
                            continue;
                        }
                    };
                    let reply = ReplyTo {
                        replica: self.shared.replica.clone(),
                        service: d.service.clone(),
                        saga_id: id.clone(),
                        step: d.step.clone(),
                        phase: d.phase,
                        attempt: d.attempt,
                    };
                    let mut headers = HeaderMap::new();
                    // The attempt's span id, the same from every replica and on every re-send.
                    let span = crate::spans::attempt_span_id(d.command_id.as_str());
                    if let Some(tp) =
                        live.trace.as_deref().and_then(|tp| crate::spans::with_span(tp, &span))
                    {
                        headers.insert(headers::TRACEPARENT, tp.as_str());
                    }
                    debug!(saga_id = %id, command_id = %d.command_id, service = %d.service, command = %d.command, "dispatch");
                    if let Err(e) = self
                        .shared
                        .client
                        .publish_with_reply_and_headers(
                            subjects::command(&d.service, &d.command),
                            reply.subject(),
                            headers,
                            Bytes::from(payload),
                        )
                        .await
                    {
                        warn!(saga_id = %id, error = %e, "command not sent; its timer will send it again");
                    }
                }
                Effect::ScheduleTimer { timer, at } => {
                    live.armed.insert(timer.step.clone(), (timer.clone(), *at));
                    self.timers.push(*at, id.clone(), TimerKey::of(timer));
                }
                Effect::CancelTimer { timer } => {
                    if live.armed.get(&timer.step).is_some_and(|(t, _)| t == timer) {
                        live.armed.remove(&timer.step);
                    }
                }
                Effect::Await(a) => {
                    // Registered before reading: what is stored after the read reaches this
                    // replica live, and what was stored before, the read finds.
                    let on = crate::awaits::subjects_of(a, id, live.state.saga());
                    for (subject, _) in &on {
                        self.shared.waiting.add(subject, id);
                        if !live.waits.contains(subject) {
                            live.waits.push(subject.clone());
                        }
                    }
                    debug!(saga_id = %id, step = %a.step, waits_for = %a.on, "waiting");
                    for (subject, fails) in on {
                        match self.shared.awaits.get_last_raw_message_by_subject(&subject).await {
                            Ok(stored) => match crate::awaits::event_for(
                                id,
                                a,
                                fails,
                                &stored.payload,
                                &self.shared.codec,
                                now(),
                            ) {
                                Ok(event) => arrived.push(event),
                                Err(why) => {
                                    observe::await_arrival("refused");
                                    debug!(saga_id = %id, step = %a.step, reason = %quote(&why), "stored before the wait, and does not count")
                                }
                            },
                            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {}
                            // Whatever is stored later still arrives; what was stored before
                            // is read again at the next take-over.
                            Err(e) => warn!(saga_id = %id, step = %a.step, error = %e, "cannot read what the await step may already have"),
                        }
                    }
                }
                Effect::Publish { .. } => {}
                Effect::Finish { status } => {
                    info!(saga_id = %id, saga = %live.state.saga(), %status, "saga finished");
                }
            }
        }
        if live.state.status().is_terminal() {
            let live = self.sagas.remove(id).expect("present");
            for subject in &live.waits {
                self.shared.waiting.remove(subject, id);
            }
            for msg in live.handles {
                if let Err(e) = msg.ack().await {
                    warn!(saga_id = %id, error = %e, "acknowledging a finished saga's start failed; it will be seen as finished when redelivered");
                }
            }
            return;
        }
        for event in failed {
            if let Err(e) = Box::pin(self.apply(id, event, None)).await {
                warn!(saga_id = %id, error = %e, "recording an unsendable command failed");
            }
        }
        for event in arrived {
            observe::await_arrival("completed");
            if let Err(e) = Box::pin(self.apply(id, event, None)).await {
                warn!(saga_id = %id, error = %e, "completing an await step failed; it is read again at the next take-over");
            }
        }
    }

    /// Something was stored on a subject saga `id` waits on (or a signal was sent to it):
    /// complete the await step waiting for it, if one is.
    async fn arrival(&mut self, id: SagaId, msg: async_nats::Message) {
        let Some(live) = self.sagas.get(&id) else {
            // Not held here: its holder hears of it too, or reads it when it takes it over.
            self.shared.waiting.remove(&msg.subject, &id);
            return observe::await_arrival("unmatched");
        };
        if let Some(header) = headers::relayed(msg.headers.as_ref()) {
            warn!(saga_id = %id, subject = %quote(&msg.subject), %header, "arrival relayed by the server from a stored message, not stored now: ignored");
            return observe::await_arrival("refused");
        }
        let waits: Vec<Awaiting> = live
            .state
            .outstanding(&live.plan)
            .into_iter()
            .filter_map(|e| match e {
                Effect::Await(a) => Some(a),
                _ => None,
            })
            .collect();
        let found = waits.iter().find_map(|a| {
            let on = crate::awaits::subjects_of(a, &id, live.state.saga());
            on.into_iter().find(|(s, _)| s.as_str() == msg.subject.as_str()).map(|(_, f)| (a, f))
        });
        let Some((a, fails)) = found else {
            self.shared.waiting.remove(&msg.subject, &id);
            return observe::await_arrival("unmatched");
        };
        let event = match crate::awaits::event_for(
            &id,
            a,
            fails,
            &msg.payload,
            &self.shared.codec,
            now(),
        ) {
            Ok(event) => event,
            Err(why) => {
                warn!(saga_id = %id, step = %a.step, subject = %quote(&msg.subject), reason = %quote(&why), "stored for an await step, and does not count");
                return observe::await_arrival("refused");
            }
        };
        observe::await_arrival("completed");
        info!(saga_id = %id, step = %a.step, waited_for = %a.on, failed = fails, "await step's wait is over");
        if let Err(e) = self.apply(&id, event, None).await {
            warn!(saga_id = %id, error = %e, "completing an await step failed; it is read again at the next take-over");
        }
    }

    async fn dead_letter(&self, msg: &jetstream::Message, reason: &str) {
        warn!(subject = %quote(&msg.subject), reason = %quote(reason), "dead-lettering input");
        if let Err(e) = dead_letter(&self.shared.js, "coordinator", msg, reason).await {
            error!(error = %e, "dead-lettering failed; the input will be redelivered");
            return;
        }
        if let Err(e) = msg.ack_with(AckKind::Term).await {
            warn!(error = %e, "terminating a dead-lettered input failed");
        }
    }
}

/// Logs a reply that could not be applied (its saga's state is unchanged).
fn not_applied(e: &HandleError) {
    warn!(error = %e, "reply not applied; the step's timer will recover it");
}

/// The outcome of appending `record`: a write whose acknowledgement was lost may have
/// landed, and if the saga's newest record is this one, it did.
async fn confirmed(
    log: &SagaLog,
    id: &SagaId,
    record: &LogRecord,
    appended: Result<u64, StoreError>,
) -> Result<u64, StoreError> {
    if let Err(StoreError::Nats { .. }) = &appended {
        if let Ok(Some(v)) = log.load(id).await {
            if v.record.snapshot == record.snapshot && v.record.timeline == record.timeline {
                return Ok(v.seq);
            }
        }
    }
    appended
}

/// Refuses a start whose definition or input is not that of the saga it names.
fn same_saga(id: &SagaId, is: Identity<'_>, asked: Identity<'_>) -> Result<(), HandleError> {
    if is == asked {
        return Ok(());
    }
    Err(HandleError::Refused(format!(
        "saga {id} already exists with another definition or input; a start with the same id (or idempotency key) and other input is refused"
    )))
}

/// What a saga is, or what a start asks for: its definition, version and input.
type Identity<'a> = (&'a saga_core::SagaName, &'a str, &'a saga_core::Payload);

fn identity(state: &SagaState) -> Identity<'_> {
    (state.saga(), state.digest(), state.input())
}

/// The instant (on this process's clock) matching the time a record was written, so that a
/// record read back is refreshed when it is really old, however often it is read.
fn written_at(written: Timestamp) -> Instant {
    let age = Duration::from_millis(now().0.saturating_sub(written.0));
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

impl Live {
    /// Undoes transition `t`, which was not logged. Only the entries pending before it stay
    /// pending; its own would go into every later record (and keep failing it when they are
    /// what made it fail).
    fn undo(&mut self, t: Transition) {
        let Transition { before, record, pending, .. } = t;
        self.state = before;
        self.timeline = record.timeline;
        self.timeline.truncate(pending.0);
        self.events = record.events;
        self.events.truncate(pending.1);
    }

    /// Takes note that its transition was logged at `seq`, with these new timeline `entries`
    /// and lifecycle `events` (counted and traced here, once).
    fn logged(
        &mut self,
        id: &SagaId,
        seq: u64,
        entries: &[TimelineEntry],
        events: &[LifecycleNote],
        tally: &observe::Tally,
    ) {
        let saga = observe::Saga {
            name: self.state.saga(),
            id,
            trace: self.trace.as_deref(),
            started_at: self.state.started_at(),
        };
        observe::transition(&saga, entries, events, &mut self.sent, tally);
        self.seq = seq;
        self.last_write = Instant::now();
    }

    /// Whether the timer in the heap at `at` under `key` is still the step's armed one.
    fn armed_as(&self, at: Timestamp, key: &TimerKey) -> bool {
        self.armed
            .get(&key.step)
            .is_some_and(|(timer, armed_at)| *armed_at == at && TimerKey::of(timer) == *key)
    }

    fn new(
        state: SagaState,
        plan: Arc<Plan>,
        seq: u64,
        trace: Option<String>,
        handles: Vec<jetstream::Message>,
    ) -> Live {
        Live {
            state,
            plan,
            seq,
            trace,
            timeline: Vec::new(),
            events: Vec::new(),
            handles,
            armed: HashMap::new(),
            last_write: Instant::now(),
            last_progress: Instant::now(),
            sent: observe::Sent::default(),
            waits: Vec::new(),
        }
    }
}

/// The most characters of a reason (a failure's, an operator's) or an operator's name that a
/// saga keeps: longer ones are cut, so that a hostile or careless sender cannot bloat every
/// later record of the saga.
pub const MAX_REASON: usize = 1000;

fn cut(s: &mut String) {
    if let Some((i, _)) = s.char_indices().nth(MAX_REASON) {
        s.truncate(i);
        s.push('…');
    }
}

/// `event`, unless it is a success whose output is larger than `limit` (a quarter of the
/// message size limit, which the Rust participant enforces on its handlers): then the
/// output is refused, saying why (the action ran: a step with a compensation is
/// compensated). The output would travel in every later command and log record of the
/// saga, and make them too large to send.
fn within_output_limit(event: Event, limit: usize) -> Event {
    match event {
        Event::StepSucceeded { step, attempt, output } if output.as_bytes().len() > limit => {
            let reason = format!(
                "reply output of {} bytes exceeds the limit of {limit} bytes (a quarter of the message size limit)",
                output.as_bytes().len()
            );
            Event::StepOutputRefused { step, attempt, reason }
        }
        other => other,
    }
}

/// `event` with its reason and operator name cut to [`MAX_REASON`] characters.
fn bounded(mut event: Event) -> Event {
    match &mut event {
        Event::StepFailed { reason, .. }
        | Event::StepOutputRefused { reason, .. }
        | Event::CompensationFailed { reason, .. } => cut(reason),
        Event::Cancel { reason, by }
        | Event::OperatorRetry { reason, by }
        | Event::OperatorSkip { reason, by }
        | Event::OperatorResolve { reason, by } => {
            cut(reason);
            if let Some(by) = by {
                cut(by);
            }
        }
        _ => {}
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(step: &str, attempt: u32) -> TimerKey {
        TimerKey { step: StepName::from(step), phase: Phase::Action, attempt, kind: 0 }
    }

    #[test]
    fn a_reply_output_over_the_limit_is_refused() {
        let ok = |n: usize| Event::StepSucceeded {
            step: StepName::from("s"),
            attempt: 2,
            output: saga_core::Payload::new(vec![0; n]),
        };
        assert_eq!(within_output_limit(ok(100), 100), ok(100));
        match within_output_limit(ok(101), 100) {
            Event::StepOutputRefused { step, attempt: 2, reason } => {
                assert_eq!(step.as_str(), "s");
                assert_eq!(reason, "reply output of 101 bytes exceeds the limit of 100 bytes (a quarter of the message size limit)");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_timer_heap_pops_due_entries_in_order() {
        let mut heap = TimerHeap::new();
        heap.push(Timestamp(30), SagaId::from("b"), key("s", 1));
        heap.push(Timestamp(10), SagaId::from("a"), key("s", 1));
        assert_eq!(heap.next_at(), Some(Timestamp(10)));
        assert_eq!(heap.pop_due(Timestamp(5)), None);
        assert_eq!(
            heap.pop_due(Timestamp(30)).map(|(at, id, _)| (at, id)),
            Some((Timestamp(10), SagaId::from("a")))
        );
        assert_eq!(heap.pop_due(Timestamp(30)).map(|(at, _, _)| at), Some(Timestamp(30)));
        assert_eq!(heap.pop_due(Timestamp(99)), None);
    }

    #[test]
    fn compaction_keeps_only_armed_timers_and_runs_once_per_doubling() {
        let mut heap = TimerHeap::new();
        // Cancelled timeouts pile up: one saga in ten still has its timer armed.
        let n = COMPACT_TIMERS_FROM as u64 * 3;
        for i in 0..n {
            heap.push(Timestamp(1_000 + i), SagaId::from(format!("s{i}").as_str()), key("x", 1));
        }
        let armed = |_: &Timestamp, id: &SagaId, _: &TimerKey| {
            id.as_str()[1..].parse::<u64>().is_ok_and(|i| i % 10 == 0)
        };
        heap.compact(armed);
        assert_eq!(heap.heap.len() as u64, n / 10 + 1, "only the armed ones stay");
        assert_eq!(heap.next_at(), Some(Timestamp(1_000)));
        // Below the next threshold nothing is scanned, whatever `armed` says.
        let small = heap.heap.len();
        heap.compact(|_, _, _| false);
        assert_eq!(heap.heap.len(), small);
        // Past it, a compaction runs again.
        for i in 0..COMPACT_TIMERS_FROM as u64 {
            heap.push(Timestamp(i), SagaId::from("late"), key("y", 2));
        }
        heap.compact(|_, id, _| id.as_str() != "late");
        assert_eq!(heap.heap.len(), small);
    }
}
