//! The coordinator: consumes saga inputs, drives each saga's state machine, records every
//! transition durably (compare-and-swap fenced) and carries out its effects.
//!
//! Any number of replicas share one durable consumer. Each input is handled as:
//! load the saga's record → `handle(now, event)` → write the new record with
//! `Nats-Expected-Last-Subject-Sequence` → publish the commands, timers and lifecycle events →
//! acknowledge the input. A replica that loses the compare-and-swap reloads and tries again;
//! a replica that dies before the acknowledgement leaves the input to be redelivered, and the
//! redelivery re-publishes the saga's outstanding effects (idempotent: same message ids, same
//! command ids, same timer subjects).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer::PullConsumer, message::PublishMessage, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use saga_core::envelope::{
    CommandMessage, LifecycleMessage, OperatorMessage, ReplyMessage, StartMessage, TimerMessage,
    PROTOCOL_VERSION,
};
use saga_core::{
    Codec, CodecError, Effect, Event, LifecycleKind, Plan, SagaDefinition, SagaId, SagaState,
    Timestamp,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::provision::{provision, ProvisionConfig, ProvisionError};
use crate::store::{Registry, RegistryError, StateRecord, StateStore, StoreError, Versioned};
use crate::subjects::{self, headers, InputKind};

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Streams, retention and redelivery (see [`ProvisionConfig`]).
    pub provision: ProvisionConfig,
    /// Sagas are spread over this many worker tasks by id; each worker handles its sagas'
    /// inputs one at a time, in order.
    pub workers: usize,
    /// The largest message accepted or produced.
    pub max_message_size: usize,
    /// Definitions to register at start-up.
    pub definitions: Vec<SagaDefinition>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            provision: ProvisionConfig::default(),
            workers: 32,
            max_message_size: saga_core::envelope::DEFAULT_MAX_MESSAGE_SIZE,
            definitions: Vec::new(),
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
    /// NATS failed.
    #[error("coordinator: NATS error: {0}")]
    Nats(async_nats::Error),
}

/// A running coordinator replica. Cheap to clone; [`Coordinator::shutdown`] stops it
/// gracefully.
#[derive(Debug, Clone)]
pub struct Coordinator {
    shutdown: watch::Sender<bool>,
    done: Arc<tokio::sync::Mutex<Option<JoinHandle<()>>>>,
    registry: Registry,
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
        provision(&client, &config.provision).await?;
        let js = jetstream::new(client.clone());
        let registry = Registry::open(&js).await?;
        for def in &config.definitions {
            let plan = registry.register(def).await?;
            info!(saga = %plan.name(), digest = plan.digest(), "registered saga definition");
        }
        let codec = Codec::with_max_size(config.max_message_size);
        let store = StateStore::open(js.clone(), codec, config.provision.finished_retention)
            .await
            .map_err(CoordinatorError::Nats)?;
        let input_stream = js
            .get_stream_no_info(subjects::INPUT_STREAM)
            .await
            .map_err(|e| CoordinatorError::Nats(e.into()))?;
        let consumer: PullConsumer = js
            .get_consumer_from_stream(subjects::COORDINATOR_CONSUMER, subjects::INPUT_STREAM)
            .await
            .map_err(|e| CoordinatorError::Nats(e.into()))?;
        let shared =
            Arc::new(Shared { js, store, registry: registry.clone(), codec, input_stream });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(run(shared, consumer, config.workers.max(1), shutdown_rx));
        info!(workers = config.workers, "coordinator started");
        Ok(Coordinator { shutdown, done: Arc::new(tokio::sync::Mutex::new(Some(task))), registry })
    }

    /// The definition registry this coordinator uses.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Stops taking inputs, finishes the ones in hand (their writes and effects), and returns.
    /// Inputs fetched but not handled are redelivered to another replica.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.done.lock().await.take() {
            let _ = task.await;
        }
    }
}

struct Shared {
    js: jetstream::Context,
    store: StateStore,
    registry: Registry,
    codec: Codec,
    input_stream: jetstream::stream::Stream<()>,
}

async fn run(
    shared: Arc<Shared>,
    consumer: PullConsumer,
    workers: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut senders = Vec::with_capacity(workers);
    let mut tasks = Vec::with_capacity(workers);
    for n in 0..workers {
        let (tx, rx) = mpsc::channel::<jetstream::Message>(64);
        senders.push(tx);
        tasks.push(tokio::spawn(
            Worker { shared: shared.clone(), cache: HashMap::new() }.run(rx, n),
        ));
    }
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
            tokio::select! {
                _ = shutdown.changed() => break 'outer,
                next = messages.next() => match next {
                    Some(Ok(msg)) => {
                        let shard = shard_of(&msg.subject, workers);
                        if senders[shard].send(msg).await.is_err() {
                            break 'outer;
                        }
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "error while pulling inputs");
                    }
                    None => {
                        warn!("input stream ended; pulling again");
                        continue 'outer;
                    }
                },
            }
        }
    }
    info!("coordinator stopping: finishing inputs in hand");
    drop(senders);
    for task in tasks {
        let _ = task.await;
    }
    if let Err(e) = shared.js.client().flush().await {
        warn!(error = %e, "flush on shutdown failed");
    }
    info!("coordinator stopped");
}

fn shard_of(subject: &str, workers: usize) -> usize {
    let id = subject.split('.').nth(2).unwrap_or("");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    (h.finish() % workers as u64) as usize
}

/// The time now, for the state machine.
pub(crate) fn now() -> Timestamp {
    Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

/// Compare-and-swap conflicts tolerated for one input before it is left for redelivery.
const MAX_CAS_ATTEMPTS: usize = 16;
/// Cached sagas per worker before the cache is cleared.
const MAX_CACHED: usize = 10_000;

struct Worker {
    shared: Arc<Shared>,
    /// Sagas this worker touched lately, with the sequence they were written at. Another
    /// replica may have written since: a failed compare-and-swap or a rejection reloads.
    cache: HashMap<SagaId, Versioned>,
}

/// An input decoded into an event.
struct Input {
    event: Event,
    start: Option<StartMessage>,
    trace: Option<String>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<jetstream::Message>, n: usize) {
        while let Some(msg) = rx.recv().await {
            self.handle(msg).await;
        }
        debug!(worker = n, "worker stopped");
    }

    async fn handle(&mut self, msg: jetstream::Message) {
        let Some((id, kind)) = subjects::parse_input(&msg.subject) else {
            let reason = format!("not a saga input subject: {}", msg.subject);
            self.dead_letter(&msg, &reason).await;
            return;
        };
        let delivered = msg.info().map_or(1, |i| i.delivered);
        let input = match self.decode(&id, kind, &msg) {
            Ok(input) => input,
            Err(reason) => {
                self.dead_letter(&msg, &reason).await;
                return;
            }
        };
        let span = info_span!("saga.input", saga_id = %id, input = kind.token(), event = input.event.name());
        async {
            match self.apply(&id, &input, delivered).await {
                Ok(()) => {
                    if let Err(e) = msg.ack().await {
                        warn!(error = %e, "ack failed; the input will be redelivered");
                    }
                }
                Err(e) if e.is_permanent() => {
                    let reason = format!("cannot be handled: {e}");
                    self.dead_letter(&msg, &reason).await;
                }
                Err(e) => {
                    error!(error = %e, "input not handled; it will be redelivered");
                    let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            }
        }
        .instrument(span)
        .await
    }

    fn decode(
        &self,
        id: &SagaId,
        kind: InputKind,
        msg: &jetstream::Message,
    ) -> Result<Input, String> {
        let codec = &self.shared.codec;
        let trace = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::TRACEPARENT))
            .map(|v| v.as_str().to_owned());
        let wrong_saga = |found: &SagaId| {
            format!("message for saga {found} arrived on the subject of saga {id}")
        };
        let (event, start) = match kind {
            InputKind::Start => {
                let m: StartMessage = codec.decode(&msg.payload).map_err(describe)?;
                if &m.saga_id != id {
                    return Err(wrong_saga(&m.saga_id));
                }
                (Event::Start { input: m.input.clone() }, Some(m))
            }
            InputKind::Reply => {
                let m: ReplyMessage = codec.decode(&msg.payload).map_err(describe)?;
                if &m.saga_id != id {
                    return Err(wrong_saga(&m.saga_id));
                }
                (m.to_event(), None)
            }
            InputKind::Timer => {
                let m: TimerMessage = codec.decode(&msg.payload).map_err(describe)?;
                if &m.saga_id != id {
                    return Err(wrong_saga(&m.saga_id));
                }
                (Event::TimerFired(m.timer), None)
            }
            InputKind::Operator => {
                let m: OperatorMessage = codec.decode(&msg.payload).map_err(describe)?;
                if &m.saga_id != id {
                    return Err(wrong_saga(&m.saga_id));
                }
                (m.to_event(), None)
            }
        };
        Ok(Input { event, start, trace })
    }

    /// Handles one input: load, transition, write, effects. `Err` leaves it for redelivery.
    async fn apply(
        &mut self,
        id: &SagaId,
        input: &Input,
        delivered: i64,
    ) -> Result<(), HandleError> {
        let mut fresh = false;
        // A start delivered for the first time is almost always for a new saga: write it
        // without reading first (the write is fenced on "no record yet"; a conflict reloads).
        let mut assume_new = input.start.is_some() && delivered <= 1;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let current = match self.cache.get(id) {
                Some(v) => Some(v.clone()),
                None if assume_new => {
                    assume_new = false;
                    None
                }
                None => {
                    fresh = true;
                    self.shared.store.load(id).await?
                }
            };
            let (mut state, seq, plan, trace) = match &current {
                Some(v) => {
                    let state = &v.record.state;
                    let plan = self.shared.registry.version(&state.saga, &state.digest).await?;
                    (state.clone(), v.seq, plan, v.record.trace.clone())
                }
                None => match &input.start {
                    Some(start) => {
                        let plan = self.shared.registry.version(&start.saga, &start.digest).await?;
                        (SagaState::new(id.clone(), &plan), 0, plan, input.trace.clone())
                    }
                    None => {
                        warn!(event = input.event.name(), "input for a saga that does not exist (never started, or expired after finishing); dropped");
                        return Ok(());
                    }
                },
            };
            let handled = state.handle(&plan, now(), &input.event);
            match handled.result {
                Ok(effects) => {
                    let events = lifecycle_messages(&state, &effects, current.is_none());
                    let record = StateRecord { v: PROTOCOL_VERSION, state, events, trace };
                    match self.shared.store.save(&record, seq).await {
                        Ok(new_seq) => {
                            debug!(rule = ?handled.rule, status = %record.state.status, "transition recorded");
                            self.execute(&record, &plan, &effects).await?;
                            if record.state.status.is_terminal() {
                                self.cache.remove(id);
                            } else {
                                if self.cache.len() >= MAX_CACHED {
                                    self.cache.clear();
                                }
                                self.cache.insert(id.clone(), Versioned { record, seq: new_seq });
                            }
                            return Ok(());
                        }
                        Err(StoreError::Conflict { .. }) => {
                            debug!("compare-and-swap lost to another writer; reloading");
                            self.cache.remove(id);
                            continue;
                        }
                        Err(e) => {
                            self.cache.remove(id);
                            return Err(e.into());
                        }
                    }
                }
                Err(rejection) => {
                    if !fresh {
                        // The cache may be behind another replica: decide on the stored state.
                        self.cache.remove(id);
                        continue;
                    }
                    debug!(reason = %rejection, rule = ?handled.rule, delivered, "input changed nothing");
                    if let Some(v) = &current {
                        // The input may have been handled before by a process (or a NATS
                        // server) that died before the transition's effects were all stored;
                        // a server restart can even reset the delivery count. Carrying out
                        // what must exist again is idempotent, and rejections are rare.
                        self.redo(&v.record, &plan).await?;
                    }
                    return Ok(());
                }
            }
        }
        Err(HandleError::Contention)
    }

    /// Carries out a transition's effects and publishes its lifecycle events; waits for every
    /// acknowledgement.
    async fn execute(
        &self,
        record: &StateRecord,
        plan: &Plan,
        effects: &[Effect],
    ) -> Result<(), HandleError> {
        let state = &record.state;
        let js = &self.shared.js;
        let codec = &self.shared.codec;
        let mut acks = Vec::new();
        let mut finished = false;
        for effect in effects {
            match effect {
                Effect::Dispatch(d) => {
                    let cmd = CommandMessage::from_dispatch(&state.id, &state.saga, d);
                    let payload = codec.encode(&cmd)?;
                    let mut msg = PublishMessage::build()
                        .message_id(d.command_id.as_str())
                        .header(headers::SAGA_ID, state.id.as_str())
                        .payload(Bytes::from(payload));
                    if let Some(tp) = &record.trace {
                        msg =
                            msg.header(headers::TRACEPARENT, crate::telemetry::child(tp).as_str());
                    }
                    debug!(command_id = %d.command_id, service = %d.service, command = %d.command, "dispatch");
                    acks.push(
                        js.send_publish(subjects::command(&d.service, &d.command), msg).await?,
                    );
                }
                Effect::ScheduleTimer { timer, at } => {
                    let payload = codec.encode(&TimerMessage {
                        v: PROTOCOL_VERSION,
                        saga_id: state.id.clone(),
                        timer: timer.clone(),
                    })?;
                    let msg = PublishMessage::build()
                        .header(headers::SCHEDULE, format!("@at {}", rfc3339(*at)).as_str())
                        .header(
                            headers::SCHEDULE_TARGET,
                            subjects::input(&state.id, InputKind::Timer).as_str(),
                        )
                        .header(headers::SAGA_ID, state.id.as_str())
                        .payload(Bytes::from(payload));
                    acks.push(js.send_publish(subjects::timer(&state.id, &timer.step), msg).await?);
                }
                // A step's timer is replaced by its next one, all of a saga's timers are purged
                // when it ends, and a timer that fires late is rejected as stale: cancelling
                // each one would cost a round trip for nothing.
                Effect::CancelTimer { .. } => {}
                Effect::Publish { .. } => {}
                Effect::Finish { status } => {
                    finished = true;
                    info!(saga = %state.saga, %status, "saga finished");
                }
            }
        }
        let _ = plan;
        for ev in &record.events {
            acks.push(self.publish_event(state, ev).await?);
        }
        for ack in acks {
            ack.await?;
        }
        if finished {
            self.shared
                .input_stream
                .purge()
                .filter(subjects::timers(&state.id))
                .await
                .map_err(|e| HandleError::Nats(e.into()))?;
        }
        Ok(())
    }

    async fn publish_event(
        &self,
        state: &SagaState,
        ev: &LifecycleMessage,
    ) -> Result<jetstream::context::PublishAckFuture, HandleError> {
        let with_input = matches!(
            ev.kind,
            LifecycleKind::Started
                | LifecycleKind::Completed
                | LifecycleKind::Compensated
                | LifecycleKind::Cancelled
                | LifecycleKind::Resolved
        );
        let payload = if with_input {
            let mut ev = ev.clone();
            ev.input = Some(state.input.clone());
            self.shared.codec.encode(&ev)?
        } else {
            self.shared.codec.encode(ev)?
        };
        let msg_id = format!(
            "ev.{}.{}.{}.{}",
            state.id,
            state.events,
            ev.kind.as_str(),
            ev.step.as_ref().map_or("", |s| s.as_str())
        );
        let msg = PublishMessage::build()
            .message_id(msg_id.as_str())
            .header(headers::SAGA_ID, state.id.as_str())
            .payload(Bytes::from(payload));
        Ok(self
            .shared
            .js
            .send_publish(subjects::event(&state.saga, ev.kind, &state.id), msg)
            .await?)
    }

    /// Re-does what must exist for a saga to go on: its in-flight commands, its pending timers
    /// and its latest lifecycle events (all deduplicated downstream).
    async fn redo(&self, record: &StateRecord, plan: &Plan) -> Result<(), HandleError> {
        let mut effects = record.state.outstanding(plan);
        if record.state.status.is_terminal() {
            effects.push(Effect::Finish { status: record.state.status });
        }
        self.execute(record, plan, &effects).await
    }

    async fn dead_letter(&self, msg: &jetstream::Message, reason: &str) {
        warn!(subject = %msg.subject, %reason, "dead-lettering input");
        if let Err(e) = dead_letter(&self.shared.js, "coordinator", msg, reason).await {
            error!(error = %e, "dead-lettering failed; the input will be redelivered");
            return;
        }
        if let Err(e) = msg.ack_with(AckKind::Term).await {
            warn!(error = %e, "terminating a dead-lettered input failed");
        }
    }
}

/// Publishes `msg` to the dead-letter stream with its reason and original subject.
pub(crate) async fn dead_letter(
    js: &jetstream::Context,
    component: &str,
    msg: &async_nats::Message,
    reason: &str,
) -> Result<(), async_nats::Error> {
    let mut headers = HeaderMap::new();
    headers.insert(headers::DLQ_REASON, sanitize_header(reason).as_str());
    headers.insert(headers::DLQ_SUBJECT, msg.subject.as_str());
    js.publish_with_headers(subjects::dlq(component), headers, msg.payload.clone()).await?.await?;
    Ok(())
}

/// A header value: control characters replaced, at most 1,000 characters.
fn sanitize_header(s: &str) -> String {
    s.chars().take(1000).map(|c| if c.is_control() { ' ' } else { c }).collect()
}

fn describe(e: CodecError) -> String {
    e.to_string()
}

/// The lifecycle messages for a transition's publish effects.
fn lifecycle_messages(state: &SagaState, effects: &[Effect], first: bool) -> Vec<LifecycleMessage> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Publish { kind, step, reason } => {
                let _ = first;
                Some(LifecycleMessage {
                    v: PROTOCOL_VERSION,
                    saga_id: state.id.clone(),
                    saga: state.saga.clone(),
                    kind: *kind,
                    status: state.status,
                    step: step.clone(),
                    reason: reason.clone(),
                    at: state.updated_at,
                    // Added when published (started and terminal events), not stored twice.
                    input: None,
                })
            }
            _ => None,
        })
        .collect()
}

fn rfc3339(at: Timestamp) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at.0) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Why an input was left for redelivery.
#[derive(Debug, thiserror::Error)]
enum HandleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("publish failed: {0}")]
    Publish(#[from] jetstream::context::PublishError),
    #[error("NATS error: {0}")]
    Nats(async_nats::Error),
    #[error("too many concurrent writers to this saga")]
    Contention,
}

impl HandleError {
    /// Errors that no redelivery can cure: the input goes to the dead-letter stream.
    fn is_permanent(&self) -> bool {
        matches!(
            self,
            HandleError::Registry(
                RegistryError::UnknownVersion { .. }
                    | RegistryError::UnknownSaga { .. }
                    | RegistryError::Invalid(_)
            ) | HandleError::Store(StoreError::Codec { .. })
                | HandleError::Codec(_)
        )
    }
}
