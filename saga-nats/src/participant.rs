//! The participant SDK: typed async handlers for a service's commands, with deduplication,
//! the compensation barrier, deadlines, panic isolation and dead letters.
//!
//! Commands arrive as core NATS requests on `saga.cmd.<service>.<command>` (the instances of
//! a service share a queue group). For each command the SDK:
//! 1. checks it: a reply subject that is not this service's, a body that does not decode, a
//!    wrong service or fields that disagree with the reply subject send it to the dead-letter
//!    stream with the reason; a command past its deadline is dropped (the coordinator has
//!    moved on);
//! 2. claims its effect key (`<saga>.<step>.<a|c>`) in the service's own bucket
//!    `saga_fx_<service>` until the command's deadline: if the effect is already recorded it
//!    re-sends the recorded reply instead of running the handler again, and a claim that
//!    lapsed (its holder died or ran out of time) is taken over. The first send of an action's
//!    first attempt is *exclusive* (no other delivery of it can run before its deadline): it
//!    runs without a claim, and only its outcome is written, after the reply;
//! 3. for a compensation, applies the barrier: the action can no longer run; if the action
//!    failed without effect, the compensation is a recorded no-op; if the coordinator never
//!    saw the action's output, the recorded one is handed to the compensation; if nothing is
//!    recorded, the action may have run (unclaimed, or cut short), so the compensation runs
//!    without an output;
//! 4. runs the handler until the deadline (a panic is caught and reported as a transient
//!    error), replies, and records the outcome.
//!
//! A participant never reads a saga's log or another service's records: it needs only its
//! bucket, its command subjects and its reply subjects.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use saga_core::wire::{quote, CommandMessage, EffectRecord, ReplyMessage, ReplyOutcome};
use saga_core::{Codec, CommandId, CommandName, Payload, Phase, SagaId, ServiceName, StepName};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::deliver::{dead_letter, now};
use crate::observe;
use crate::provision::{open_effects, EffectsConfig, ProvisionError};
use crate::subjects::{self, headers, ReplyTo};

/// How a handler failed.
///
/// A compensation is retried whichever it returns: a business failure counts against the
/// step's `max_attempts`, a transient one against the longer budget a timed-out attempt has
/// (docs/PROTOCOL.md §6.4), before the saga waits for an operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// A business failure: an action's step fails at once and the saga compensates.
    #[error("business failure: {0}")]
    Business(String),
    /// A transient error (another attempt may succeed: a store without a leader, a
    /// dependency down): the step is retried with backoff while attempts remain.
    #[error("transient error: {0}")]
    Transient(String),
}

impl StepError {
    /// A business failure.
    pub fn business(reason: impl Into<String>) -> Self {
        StepError::Business(reason.into())
    }

    /// A transient error.
    pub fn transient(reason: impl Into<String>) -> Self {
        StepError::Transient(reason.into())
    }
}

/// A command as a handler sees it: the saga's input decoded as `T`, and the rest of the
/// command.
#[derive(Debug, Clone)]
pub struct Command<T> {
    /// The saga's input.
    pub input: T,
    /// The saga instance.
    pub saga_id: SagaId,
    /// The step.
    pub step: StepName,
    /// The attempt, from 1.
    pub attempt: u32,
    /// The command's id.
    pub command_id: CommandId,
    /// The W3C trace context of the saga.
    pub traceparent: Option<String>,
    /// When the coordinator stops waiting for this attempt: the handler is stopped then, and
    /// its outcome is unknown to the saga (calls it makes should give up before).
    pub deadline: saga_core::Timestamp,
    deps: Arc<BTreeMap<StepName, Payload>>,
    output: Option<Payload>,
}

impl<T> Command<T> {
    /// The output of step `step` (one this step runs after), decoded as `O`.
    pub fn dep<O: DeserializeOwned>(&self, step: &str) -> Result<O, StepError> {
        let bytes = self.deps.get(&StepName::from(step)).ok_or_else(|| {
            StepError::business(format!("no output of step {step:?} in the command"))
        })?;
        saga_core::wire::decode_nested(bytes.as_bytes()).map_err(|e| {
            StepError::business(format!("output of step {step:?} does not decode: {e}"))
        })
    }

    /// For a compensation: the action's own output, decoded as `O`, if the action succeeded.
    /// `None` when its outcome is unknown (it timed out, or its participant died before
    /// recording it): the compensation must then be harmless if the action never happened.
    pub fn action_output<O: DeserializeOwned>(&self) -> Option<Result<O, StepError>> {
        self.output.as_ref().map(|bytes| {
            saga_core::wire::decode_nested(bytes.as_bytes())
                .map_err(|e| StepError::business(format!("action output does not decode: {e}")))
        })
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type RawHandler = Arc<
    dyn Fn(
            Arc<CommandMessage>,
            Option<Payload>,
            Option<String>,
        ) -> BoxFuture<Result<Vec<u8>, StepError>>
        + Send
        + Sync,
>;

/// How a participant runs.
#[derive(Debug, Clone)]
pub struct ParticipantConfig {
    /// Handlers running at once.
    pub concurrency: usize,
    /// The largest message accepted or produced.
    pub max_message_size: usize,
    /// The service's effect bucket (retention, replicas).
    pub effects: EffectsConfig,
}

impl Default for ParticipantConfig {
    fn default() -> Self {
        ParticipantConfig {
            concurrency: 64,
            max_message_size: saga_core::wire::DEFAULT_MAX_MESSAGE_SIZE,
            effects: EffectsConfig::default(),
        }
    }
}

/// Why a participant could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParticipantError {
    /// The service name is not a valid token.
    #[error("participant service name {name:?} {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// What is wrong.
        reason: saga_core::TokenError,
    },
    /// The server is not usable or the effect bucket could not be made.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// NATS failed.
    #[error("participant: NATS error: {0}")]
    Nats(async_nats::Error),
}

/// Builds a participant. See [`Participant::builder`].
#[must_use]
pub struct ParticipantBuilder {
    client: async_nats::Client,
    service: String,
    config: ParticipantConfig,
    handlers: HashMap<(Phase, CommandName), RawHandler>,
}

impl ParticipantBuilder {
    /// Registers the handler of action command `command`.
    pub fn action<T, R, F, Fut>(self, command: &str, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(Command<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, StepError>> + Send + 'static,
    {
        self.handler(Phase::Action, command, handler)
    }

    /// Registers the handler of compensation command `command`.
    pub fn compensation<T, R, F, Fut>(self, command: &str, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(Command<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, StepError>> + Send + 'static,
    {
        self.handler(Phase::Compensation, command, handler)
    }

    fn handler<T, R, F, Fut>(mut self, phase: Phase, command: &str, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(Command<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, StepError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let raw: RawHandler =
            Arc::new(move |cmd: Arc<CommandMessage>, output: Option<Payload>, traceparent| {
                let handler = handler.clone();
                Box::pin(async move {
                    let input: T =
                        saga_core::wire::decode_nested(cmd.input.as_bytes()).map_err(|e| {
                            StepError::business(format!(
                                "saga input does not decode as {}: {e}",
                                std::any::type_name::<T>()
                            ))
                        })?;
                    let command = Command {
                        input,
                        saga_id: cmd.saga_id.clone(),
                        step: cmd.step.clone(),
                        attempt: cmd.attempt,
                        command_id: cmd.command_id(),
                        traceparent,
                        deadline: cmd.deadline,
                        deps: Arc::new(cmd.deps.clone()),
                        output,
                    };
                    let out = handler(command).await?;
                    rmp_serde::to_vec_named(&out).map_err(|e| {
                        StepError::business(format!("handler output does not encode: {e}"))
                    })
                })
            });
        self.handlers.insert((phase, CommandName::from(command)), raw);
        self
    }

    /// Sets the configuration.
    pub fn config(mut self, config: ParticipantConfig) -> Self {
        self.config = config;
        self
    }

    /// Handlers running at once (default 64).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n.max(1);
        self
    }

    /// Opens the service's effect bucket (creating it if no coordinator has) and starts
    /// taking commands.
    pub async fn start(self) -> Result<Participant, ParticipantError> {
        let service = ServiceName::new(self.service.clone()).map_err(|reason| {
            ParticipantError::InvalidName { name: quote(&self.service), reason }
        })?;
        let effects = open_effects(&self.client, &service, &self.config.effects).await?;
        let js = jetstream::new(self.client.clone());
        let commands = self
            .client
            .queue_subscribe(subjects::commands_of(&service), subjects::participant_group(&service))
            .await
            .map_err(|e| ParticipantError::Nats(e.into()))?;
        // A subscription the server refuses is not an error here, only a message later: ask.
        self.client.flush().await.map_err(|e| ParticipantError::Nats(e.into()))?;
        for _ in 0..4 {
            if let Some(denial) = crate::connect::recent_denial(&subjects::commands_of(&service)) {
                return Err(ParticipantError::Nats(
                    format!("permission denied: {denial}: this user may not take the commands of service {service} (see docs/SECURITY.md)").into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let codec = Codec::with_max_size(self.config.max_message_size);
        let shared = Arc::new(Shared {
            client: self.client,
            js,
            effects,
            codec,
            service: service.clone(),
            handlers: self.handlers,
            config: self.config,
            in_flight: Arc::default(),
        });
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(run(shared, commands, rx));
        info!(%service, "participant started");
        Ok(Participant { service, shutdown, task: Arc::new(tokio::sync::Mutex::new(Some(task))) })
    }
}

/// A running participant. [`Participant::shutdown`] stops it gracefully.
#[derive(Debug, Clone)]
pub struct Participant {
    service: ServiceName,
    shutdown: watch::Sender<bool>,
    task: Arc<tokio::sync::Mutex<Option<JoinHandle<()>>>>,
}

impl Participant {
    /// Starts building the participant of service `service`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use saga_nats::{Command, Participant, StepError};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[derive(Deserialize)]
    /// struct Order { id: String, items: u32 }
    /// #[derive(Serialize, Deserialize)]
    /// struct Reservation { reservation: String }
    ///
    /// let client = async_nats::connect("nats://127.0.0.1:4222").await?;
    /// let seller = Participant::builder(client, "seller")
    ///     .action("reserve", |cmd: Command<Order>| async move {
    ///         if cmd.input.items > 10 {
    ///             return Err(StepError::business("not enough stock"));
    ///         }
    ///         Ok(Reservation { reservation: format!("r-{}", cmd.input.id) })
    ///     })
    ///     .compensation("release", |cmd: Command<Order>| async move {
    ///         // The action's output, when it ran; the barrier makes sure it ran or never will.
    ///         let _reservation: Option<Reservation> = cmd.action_output().transpose()?;
    ///         Ok(())
    ///     })
    ///     .start()
    ///     .await?;
    /// // ...
    /// seller.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(client: async_nats::Client, service: &str) -> ParticipantBuilder {
        ParticipantBuilder {
            client,
            service: service.to_owned(),
            config: ParticipantConfig::default(),
            handlers: HashMap::new(),
        }
    }

    /// The service name.
    pub fn service(&self) -> &ServiceName {
        &self.service
    }

    /// Stops taking commands and waits for the handlers in flight.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
    }
}

struct Shared {
    client: async_nats::Client,
    js: jetstream::Context,
    effects: kv::Store,
    codec: Codec,
    service: ServiceName,
    handlers: HashMap<(Phase, CommandName), RawHandler>,
    config: ParticipantConfig,
    in_flight: InFlightSet,
}

type InFlightSet = Arc<Mutex<HashSet<String>>>;

/// Marks an effect key as being handled in this process until dropped.
struct InFlight {
    set: InFlightSet,
    key: String,
}

impl InFlight {
    fn enter(set: &InFlightSet, key: &str) -> Option<InFlight> {
        let inserted = set.lock().expect("lock").insert(key.to_owned());
        inserted.then(|| InFlight { set: set.clone(), key: key.to_owned() })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set.lock().expect("lock").remove(&self.key);
    }
}

async fn run(
    shared: Arc<Shared>,
    mut commands: async_nats::Subscriber,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(shared.config.concurrency));
    loop {
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore never closes"),
        };
        tokio::select! {
            _ = shutdown.changed() => break,
            next = commands.next() => match next {
                Some(msg) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        shared.handle(msg).await;
                        drop(permit);
                    });
                }
                None => break,
            },
        }
    }
    // Stop taking new commands (the other instances get them), handle the ones already
    // received (dropping them would cost their sagas an attempt each), and wait for the
    // handlers.
    if commands.drain().await.is_ok() {
        while let Some(msg) = commands.next().await {
            let permit = permits.clone().acquire_owned().await.expect("semaphore never closes");
            let shared = shared.clone();
            tokio::spawn(async move {
                shared.handle(msg).await;
                drop(permit);
            });
        }
    }
    let _ = permits.acquire_many(shared.config.concurrency as u32).await;
    let _ = shared.client.flush().await;
    info!(service = %shared.service, "participant stopped");
}

/// What claiming an effect key found.
enum Claim {
    /// The caller holds the claim at this revision and runs the handler.
    Run(u64),
    /// The effect is recorded: re-send this reply.
    Recorded(ReplyOutcome),
    /// The compensation came first: the action must not run.
    Barrier,
}

/// What the barrier found for a compensation.
struct Barrier {
    /// The action failed without effect (and now never runs): the compensation is a no-op.
    noop: bool,
    /// The action's recorded output, when it succeeded.
    output: Option<Payload>,
}

/// A command's outcome, and the claim to settle once it is replied (none when the outcome
/// was already recorded).
struct Decided {
    outcome: ReplyOutcome,
    claim: Option<(String, u64, InFlight)>,
}

impl Decided {
    fn recorded(outcome: ReplyOutcome) -> Decided {
        Decided { outcome, claim: None }
    }
}

/// The command is not handled now: no reply (the coordinator's timer sends it again).
struct Skip(String);

impl Shared {
    async fn handle(&self, msg: async_nats::Message) {
        let reply_to = msg.reply.as_ref().and_then(|r| ReplyTo::parse(r));
        let Some(reply_to) = reply_to.filter(|r| r.service == self.service) else {
            let reason = format!(
                "command without a reply subject of service {} (saga.reply.<replica>.{}.<saga>.<step>.<a|c>.<attempt>): {}",
                self.service,
                self.service,
                msg.reply.as_deref().map_or_else(|| "none".to_owned(), quote)
            );
            return self.dead_letter(&msg, &reason).await;
        };
        if let Some(header) = subjects::headers::relayed(msg.headers.as_ref()) {
            let reason = format!(
                "command carries the JetStream header {header}: a stored message relayed by the server, not sent by the coordinator"
            );
            return self.dead_letter(&msg, &reason).await;
        }
        let cmd: CommandMessage = match self.codec.decode(&msg.payload) {
            Ok(cmd) => cmd,
            Err(e) => return self.dead_letter(&msg, &e.to_string()).await,
        };
        if let Some(why) = self.mismatch(&msg, &reply_to, &cmd) {
            return self.dead_letter(&msg, &why).await;
        }
        let traceparent = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::TRACEPARENT))
            .map(|v| v.as_str().to_owned())
            .filter(|tp| crate::telemetry::trace_id(tp).is_some());
        let trace_id =
            traceparent.as_deref().and_then(crate::telemetry::trace_id).unwrap_or("").to_owned();
        let span = info_span!(
            "saga.step",
            service = %self.service,
            saga_id = %cmd.saga_id,
            step = %cmd.step,
            phase = %cmd.phase,
            attempt = cmd.attempt,
            command = %cmd.command,
            trace_id = %trace_id,
        );
        let cmd = Arc::new(cmd);
        // This delivery's span: a child of the attempt's, the parent of the handler's spans,
        // and the trace context of the reply.
        let mine = traceparent.as_deref().map(crate::telemetry::child);
        let began = std::time::SystemTime::now();
        async {
            match self.process(&msg, cmd.clone(), mine.clone()).await {
                Ok(decided) => {
                    // Reply first, record after: the coordinator moves on one round trip
                    // sooner. A crash between the two leaves a claim that lapses at the
                    // deadline, as a crash inside the handler would.
                    let outcome = decided.outcome.clone();
                    if let Err(e) = self.reply(&reply_to, &cmd, outcome, mine.as_deref()).await {
                        warn!(error = %e, "reply failed; the coordinator will ask again");
                    }
                    if let (Some(parent), Some(this)) = (&traceparent, &mine) {
                        handled_span(&cmd, &decided.outcome, parent, this, began);
                    }
                    self.settle(decided, &cmd).await;
                }
                Err(Skip(why)) => debug!(why, "command not handled now"),
            }
        }
        .instrument(span)
        .await
    }

    /// Why the command disagrees with its subject or reply subject, if it does.
    fn mismatch(
        &self,
        msg: &async_nats::Message,
        to: &ReplyTo,
        cmd: &CommandMessage,
    ) -> Option<String> {
        if cmd.service != self.service {
            return Some(format!(
                "command for service {} delivered to service {}",
                cmd.service, self.service
            ));
        }
        if msg.subject.as_str() != subjects::command(&cmd.service, &cmd.command) {
            return Some(format!(
                "command {:?} arrived on subject {}",
                cmd.command.as_str(),
                quote(&msg.subject)
            ));
        }
        if to.saga_id != cmd.saga_id
            || to.step != cmd.step
            || to.phase != cmd.phase
            || to.attempt != cmd.attempt
        {
            return Some(format!(
                "command names saga {} step {} {} attempt {}, but its reply subject names another command",
                cmd.saga_id, cmd.step, cmd.phase, cmd.attempt
            ));
        }
        None
    }

    /// Decides and runs. `Ok`: reply with its outcome, then settle its claim; `Err`: no
    /// reply now.
    async fn process(
        &self,
        msg: &async_nats::Message,
        cmd: Arc<CommandMessage>,
        traceparent: Option<String>,
    ) -> Result<Decided, Skip> {
        if now() >= cmd.deadline {
            return Err(Skip(format!("its deadline {} has passed", cmd.deadline.0)));
        }
        let Some(handler) = self.handlers.get(&(cmd.phase, cmd.command.clone())).cloned() else {
            let reason = format!(
                "service {} has no {} handler for command {:?}",
                self.service,
                cmd.phase,
                cmd.command.as_str()
            );
            error!(%reason);
            return Ok(Decided::recorded(ReplyOutcome::Failure { reason, transient: false }));
        };
        let key = cmd.effect_key();
        // One delivery of an effect at a time in this process: a second one waits for the
        // first, then finds its record.
        let guard = loop {
            if let Some(guard) = InFlight::enter(&self.in_flight, &key) {
                break guard;
            }
            if now() >= cmd.deadline {
                return Err(Skip("another delivery of this effect is still running here".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let rev = if cmd.exclusive && cmd.phase == Phase::Action {
            // The first delivery of a first attempt: nothing else runs this effect until its
            // deadline has passed (the coordinator sends it again only after that), so no
            // claim. Its outcome is recorded after the reply, over nothing (revision 0).
            observe::by_service(observe::UNCLAIMED_RUNS, &self.service);
            0
        } else {
            match self.claim(&key, &cmd).await? {
                Claim::Recorded(outcome) => {
                    observe::by_service(observe::DEDUP_HITS, &self.service);
                    debug!("effect already recorded: re-sending its reply");
                    return Ok(Decided::recorded(outcome));
                }
                Claim::Barrier => {
                    info!("action arrived after its compensation: not executed");
                    return Ok(Decided::recorded(ReplyOutcome::Failure {
                        reason: "not executed: the step was compensated before this action arrived"
                            .into(),
                        transient: false,
                    }));
                }
                Claim::Run(rev) => rev,
            }
        };
        let barrier = match cmd.phase {
            Phase::Action => Barrier { noop: false, output: None },
            Phase::Compensation => match self.barrier(&cmd).await {
                Ok(b) => b,
                Err(e) => {
                    self.unclaim(&key, rev).await;
                    return Err(e);
                }
            },
        };
        let outcome = if barrier.noop {
            observe::by_service(observe::BARRIER_NOOPS, &self.service);
            info!("compensation of an action that failed without effect: recorded as a no-op");
            ReplyOutcome::Success { output: Payload::default() }
        } else {
            let output = cmd.output.clone().or(barrier.output);
            match self.run_handler(msg, &cmd, handler, output, traceparent).await {
                Some(outcome) => outcome,
                None => {
                    // Cut at its deadline: it may have partly run. The claim lapses now, so a
                    // retry or the compensation takes over.
                    warn!("handler still running at the command's deadline: stopped");
                    return Err(Skip("the handler ran out of time".into()));
                }
            }
        };
        Ok(Decided { outcome, claim: Some((key, rev, guard)) })
    }

    /// Records a decided outcome, or gives the claim up so that the next attempt runs the
    /// handler: after a transient failure, and after any failure of a compensation (the
    /// coordinator retries a compensation whatever its failure, so none is final).
    async fn settle(&self, decided: Decided, cmd: &CommandMessage) {
        let Some((key, rev, guard)) = decided.claim else { return };
        let last = match (&decided.outcome, cmd.phase) {
            (ReplyOutcome::Success { .. }, _) => true,
            (ReplyOutcome::Failure { transient, .. }, Phase::Action) => !transient,
            (ReplyOutcome::Failure { .. }, Phase::Compensation) => false,
        };
        if last {
            self.record_done(&key, rev, &decided.outcome, cmd.attempt).await;
        } else {
            let (reason, transient) = match &decided.outcome {
                ReplyOutcome::Failure { reason, transient } => (reason.clone(), *transient),
                ReplyOutcome::Success { .. } => (String::new(), true),
            };
            self.release(&key, rev, cmd.attempt, reason, transient).await;
        }
        drop(guard);
    }

    async fn run_handler(
        &self,
        msg: &async_nats::Message,
        cmd: &Arc<CommandMessage>,
        handler: RawHandler,
        output: Option<Payload>,
        traceparent: Option<String>,
    ) -> Option<ReplyOutcome> {
        let fut =
            std::panic::AssertUnwindSafe(handler(cmd.clone(), output, traceparent)).catch_unwind();
        let left = Duration::from_millis(cmd.deadline.0.saturating_sub(now().0));
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(left, fut).await;
        let outcome = match &result {
            Err(_) => "cut_at_deadline",
            Ok(Ok(Ok(_))) => "success",
            Ok(Ok(Err(StepError::Business(_)))) => "business_failure",
            Ok(Ok(Err(StepError::Transient(_)))) => "transient_failure",
            Ok(Err(_)) => "panic",
        };
        observe::handler_ran(&self.service, cmd, outcome, started.elapsed());
        let result = result.ok()?;
        // A reply must fit with room to spare: the output also travels in later commands.
        let limit = self.config.max_message_size / 4;
        Some(match result {
            Ok(Ok(output)) if output.len() > limit => {
                let reason = format!(
                    "handler output of {} bytes exceeds the limit of {limit} bytes (a quarter of the message size limit)",
                    output.len()
                );
                error!(%reason);
                ReplyOutcome::Failure { reason, transient: false }
            }
            Ok(Ok(output)) => ReplyOutcome::Success { output: Payload::new(output) },
            Ok(Err(StepError::Business(reason))) => {
                info!(%reason, "handler reported a business failure");
                ReplyOutcome::Failure { reason, transient: false }
            }
            Ok(Err(StepError::Transient(reason))) => {
                warn!(%reason, "handler reported a transient error");
                ReplyOutcome::Failure { reason, transient: true }
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                let reason = format!("handler panicked: {what}");
                error!(%reason, "handler panicked; reported as a transient error");
                self.dead_letter(msg, &format!("{reason} (attempt {})", cmd.attempt)).await;
                ReplyOutcome::Failure { reason, transient: true }
            }
        })
    }

    fn encode(&self, record: &EffectRecord) -> Bytes {
        Bytes::from(rmp_serde::to_vec_named(record).expect("effect records encode"))
    }

    /// Waits (until the command's own deadline) for a live claim to lapse or be recorded.
    async fn wait_for(&self, cmd: &CommandMessage, until: u64) -> Result<(), Skip> {
        let wait = until.saturating_sub(now().0).min(cmd.deadline.0.saturating_sub(now().0));
        if now().0 + wait >= cmd.deadline.0 && until > cmd.deadline.0 {
            return Err(Skip(
                "another delivery holds the effect past this command's deadline".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(wait.clamp(10, 200))).await;
        Ok(())
    }

    /// Claims the effect key until the command's deadline.
    async fn claim(&self, key: &str, cmd: &CommandMessage) -> Result<Claim, Skip> {
        let claim = self.encode(&EffectRecord::InProgress {
            until: cmd.deadline.0 + CLAIM_GRACE_MS,
            attempt: cmd.attempt,
        });
        // The common case: nothing is recorded for this effect yet. Claim it straight away
        // (an update expecting revision 0 is a create) and read only if something is there.
        match self.effects.update(key, claim.clone(), 0).await {
            Ok(rev) => return Ok(Claim::Run(rev)),
            Err(e) if crate::store::is_conflict(&e) => {}
            Err(e) => return Err(unavailable(e)),
        }
        loop {
            if now() >= cmd.deadline {
                break;
            }
            let entry = self.effects.entry(key).await.map_err(unavailable)?;
            match entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    match saga_core::wire::decode_nested::<EffectRecord>(&e.value).ok() {
                        Some(EffectRecord::Done { outcome, .. }) => {
                            return Ok(Claim::Recorded(outcome))
                        }
                        Some(EffectRecord::Barrier { .. }) => return Ok(Claim::Barrier),
                        // A copy of an attempt that already failed gets the same answer: one
                        // attempt has one outcome.
                        Some(EffectRecord::Failed { attempt, reason, transient })
                            if cmd.attempt <= attempt =>
                        {
                            return Ok(Claim::Recorded(ReplyOutcome::Failure { reason, transient }))
                        }
                        Some(EffectRecord::InProgress { until, .. }) if until > now().0 => {
                            self.wait_for(cmd, until).await?;
                        }
                        // Lapsed (its holder died or ran out of time) or unreadable: take it over.
                        _ => match self.effects.update(key, claim.clone(), e.revision).await {
                            Ok(rev) => {
                                info!(key, "took over a lapsed claim: an earlier delivery may have partly run");
                                return Ok(Claim::Run(rev));
                            }
                            Err(_) => contended().await,
                        },
                    }
                }
                _ => match self.effects.create(key, claim.clone()).await {
                    Ok(rev) => return Ok(Claim::Run(rev)),
                    Err(_) => contended().await,
                },
            }
        }
        Err(Skip(format!("effect key {key} stayed busy until the deadline")))
    }

    /// For a compensation: whether the action failed without effect (then the compensation is
    /// a no-op), blocking the action from ever running if it has not, and the action's recorded
    /// output.
    async fn barrier(&self, cmd: &CommandMessage) -> Result<Barrier, Skip> {
        let key = CommandId::effect_key(&cmd.saga_id, &cmd.step, Phase::Action);
        let first = self.encode(&EffectRecord::Barrier { lapsed: false });
        let over_lapsed = self.encode(&EffectRecord::Barrier { lapsed: true });
        loop {
            if now() >= cmd.deadline {
                break;
            }
            let entry = self.effects.entry(&key).await.map_err(unavailable)?;
            match entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    match saga_core::wire::decode_nested::<EffectRecord>(&e.value).ok() {
                        Some(EffectRecord::Done {
                            outcome: ReplyOutcome::Success { output },
                            ..
                        }) => return Ok(Barrier { noop: false, output: Some(output) }),
                        Some(EffectRecord::Done {
                            outcome: ReplyOutcome::Failure { .. }, ..
                        })
                        | Some(EffectRecord::Barrier { lapsed: false }) => {
                            return Ok(Barrier { noop: true, output: None })
                        }
                        // Its last attempt failed without effect: block it for good.
                        Some(EffectRecord::Failed { .. }) => {
                            match self.effects.update(&key, first.clone(), e.revision).await {
                                Ok(_) => return Ok(Barrier { noop: true, output: None }),
                                Err(_) => contended().await,
                            }
                        }
                        // An earlier compensation attempt found the action's claim lapsed:
                        // the action may have partly run.
                        Some(EffectRecord::Barrier { lapsed: true }) => {
                            return Ok(Barrier { noop: false, output: None })
                        }
                        Some(EffectRecord::InProgress { until, .. }) if until > now().0 => {
                            self.wait_for(cmd, until).await?;
                        }
                        // A lapsed claim: the action may have partly run. Block it and compensate.
                        _ => match self.effects.update(&key, over_lapsed.clone(), e.revision).await
                        {
                            Ok(_) => return Ok(Barrier { noop: false, output: None }),
                            Err(_) => contended().await,
                        },
                    }
                }
                // Nothing recorded: the action's first attempt runs unclaimed, so it may have
                // run (and died before recording). Block it and compensate.
                _ => match self.effects.create(&key, over_lapsed.clone()).await {
                    Ok(_) => return Ok(Barrier { noop: false, output: None }),
                    Err(_) => contended().await,
                },
            }
        }
        Err(Skip(format!("the action's effect key {key} stayed busy until the deadline")))
    }

    /// Records a finished effect. The effect has happened: keep trying (NATS may be
    /// restarting) until the record is stored or another delivery has taken the key over.
    async fn record_done(&self, key: &str, rev: u64, outcome: &ReplyOutcome, attempt: u32) {
        let record = self.encode(&EffectRecord::Done { outcome: outcome.clone(), attempt });
        let mut delay = Duration::from_millis(100);
        for _ in 0..600 {
            match self.effects.update(key, record.clone(), rev).await {
                Ok(_) => return,
                Err(e) if crate::store::is_conflict(&e) => {
                    match self.record_over(key, rev, &record).await {
                        Ok(()) => return,
                        Err(e) => warn!(key, error = %e, "recording the effect failed; retrying"),
                    }
                }
                Err(e) => warn!(key, error = %e, "recording the effect failed; retrying"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        error!(key, "gave up recording the effect; a redelivered command may run it again");
    }

    /// Records `record` (a done effect) over whatever the key holds now, unless it is done
    /// already or another delivery holds a live claim on it.
    async fn record_over(&self, key: &str, ours: u64, record: &Bytes) -> Result<(), String> {
        let entry = self.effects.entry(key).await.map_err(|e| e.to_string())?;
        let written = match entry {
            Some(e) if e.operation == kv::Operation::Put => match saga_core::wire::decode_nested::<
                EffectRecord,
            >(&e.value)
            .ok()
            {
                Some(EffectRecord::Done { .. }) => return Ok(()),
                Some(EffectRecord::Barrier { lapsed: true }) => {
                    warn!(key, "the action finished after its compensation had started: the compensation ran without the action's output");
                    return Ok(());
                }
                Some(EffectRecord::Barrier { lapsed: false }) => {
                    error!(key, "the action ran, but its compensation was already recorded as a no-op (its claim was lost): compensate it by hand");
                    return Ok(());
                }
                Some(EffectRecord::InProgress { until, .. })
                    if e.revision != ours && until > now().0 =>
                {
                    warn!(key, "could not record the effect: another delivery took the key over");
                    return Ok(());
                }
                _ => self
                    .effects
                    .update(key, record.clone(), e.revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            },
            _ => self
                .effects
                .create(key, record.clone())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        if written.is_ok() {
            warn!(key, "the effect's claim was lost (server restart?); recorded it over the current record");
        }
        written
    }

    /// Gives up a claim before the handler ran.
    async fn unclaim(&self, key: &str, rev: u64) {
        let lapsed = self.encode(&EffectRecord::InProgress { until: 0, attempt: 0 });
        if let Err(e) = self.effects.update(key, lapsed, rev).await {
            debug!(error = %e, "giving up the claim failed (it will lapse)");
        }
    }

    /// Gives up a claim after attempt `attempt` failed, so that the next attempt runs the
    /// handler (and a late copy of this one gets the same failure, transient as it was).
    async fn release(&self, key: &str, rev: u64, attempt: u32, reason: String, transient: bool) {
        let failed = self.encode(&EffectRecord::Failed { attempt, reason, transient });
        if let Err(e) = self.effects.update(key, failed, rev).await {
            debug!(error = %e, "releasing the claim failed (it will lapse)");
        }
    }

    async fn reply(
        &self,
        to: &ReplyTo,
        cmd: &CommandMessage,
        outcome: ReplyOutcome,
        traceparent: Option<&str>,
    ) -> Result<(), async_nats::Error> {
        let reply = ReplyMessage::to(cmd, outcome);
        let payload = self.codec.encode(&reply)?;
        let mut headers = HeaderMap::new();
        if let Some(tp) = traceparent {
            headers.insert(headers::TRACEPARENT, tp);
        }
        self.client.publish_with_headers(to.subject(), headers, Bytes::from(payload)).await?;
        Ok(())
    }

    async fn dead_letter(&self, msg: &async_nats::Message, reason: &str) {
        warn!(subject = %quote(&msg.subject), reason = %quote(reason), "dead-lettering command");
        if let Err(e) = dead_letter(&self.js, self.service.as_str(), msg, reason).await {
            warn!(error = %e, "dead-lettering failed");
        }
    }
}

/// How long after the command's deadline a claim still holds: the handler is stopped at the
/// deadline, and this leaves its outcome time to be recorded before another delivery may take
/// the claim over.
const CLAIM_GRACE_MS: u64 = 500;

/// A short pause before trying a contended effect key again.
async fn contended() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

fn unavailable(e: impl std::fmt::Display) -> Skip {
    Skip(format!("effects bucket unavailable: {e}"))
}

/// Exports the span of one delivery (`handle <service>.<command>`), a child of the attempt's
/// span (`parent`, the command's `traceparent`), when spans are exported.
fn handled_span(
    cmd: &CommandMessage,
    outcome: &ReplyOutcome,
    parent: &str,
    this: &str,
    began: std::time::SystemTime,
) {
    if !crate::spans::enabled() {
        return;
    }
    use opentelemetry::KeyValue;
    let (result, error) = match outcome {
        ReplyOutcome::Success { .. } => ("success", None),
        ReplyOutcome::Failure { reason, .. } => ("failure", Some(reason.clone())),
    };
    crate::spans::export(crate::spans::Finished {
        this,
        parent: Some(parent),
        name: format!("handle {}.{}", cmd.service, cmd.command),
        kind: opentelemetry::trace::SpanKind::Server,
        start: began,
        end: std::time::SystemTime::now(),
        attributes: vec![
            KeyValue::new("saga.id", cmd.saga_id.to_string()),
            KeyValue::new("saga.name", cmd.saga.to_string()),
            KeyValue::new("saga.step", cmd.step.to_string()),
            KeyValue::new("saga.phase", cmd.phase.to_string()),
            KeyValue::new("saga.attempt", i64::from(cmd.attempt)),
            KeyValue::new("saga.service", cmd.service.to_string()),
            KeyValue::new("saga.command", cmd.command.to_string()),
            KeyValue::new("saga.outcome", result),
        ],
        events: Vec::new(),
        error,
    });
}
