//! The participant SDK: typed async handlers for a service's commands, with durable
//! consumption, deduplication, the compensation barrier, panic isolation and dead letters.
//!
//! For each command the SDK:
//! 1. decodes it (an undecodable or oversized message goes to the dead-letter stream with the
//!    reason, and is never retried);
//! 2. checks it against the saga's recorded state (a command for a saga that does not exist is
//!    dead-lettered as forged; one for an attempt no longer in flight is dropped as stale);
//! 3. claims its effect key (`<saga>.<step>.<a|c>`) in the effects bucket: if the effect is
//!    already recorded it re-sends the recorded reply instead of running the handler again;
//! 4. for a compensation, applies the barrier: if the action never ran, the compensation is a
//!    recorded no-op and the action can no longer run;
//! 5. runs the handler (a panic is caught and reported as a transient error), records the
//!    outcome and publishes the reply.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, kv, message::PublishMessage, AckKind};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use saga_core::envelope::{CommandMessage, ReplyMessage, ReplyOutcome};
use saga_core::{
    Codec, CommandId, CommandName, Payload, Phase, SagaId, ServiceName, StepName, StepStatus,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::coordinator::{dead_letter, now};
use crate::provision::{ensure_consumer, provision, ProvisionConfig, ProvisionError};
use crate::store::StateStore;
use crate::subjects::{self, headers, InputKind};

/// How a handler failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// A business failure: the step fails at once and the saga compensates.
    #[error("business failure: {0}")]
    Business(String),
    /// A transient error: the step is retried with backoff while attempts remain.
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
    deps: Arc<std::collections::BTreeMap<StepName, Payload>>,
    output: Option<Payload>,
}

impl<T> Command<T> {
    /// The output of step `step` (one this step runs after), decoded as `O`.
    pub fn dep<O: DeserializeOwned>(&self, step: &str) -> Result<O, StepError> {
        let bytes = self.deps.get(&StepName::from(step)).ok_or_else(|| {
            StepError::business(format!("no output of step {step:?} in the command"))
        })?;
        rmp_serde::from_slice(bytes.as_bytes()).map_err(|e| {
            StepError::business(format!("output of step {step:?} does not decode: {e}"))
        })
    }

    /// For a compensation: the action's own output, decoded as `O`, if the action succeeded.
    pub fn action_output<O: DeserializeOwned>(&self) -> Option<Result<O, StepError>> {
        self.output.as_ref().map(|bytes| {
            rmp_serde::from_slice(bytes.as_bytes())
                .map_err(|e| StepError::business(format!("action output does not decode: {e}")))
        })
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type RawHandler = Arc<
    dyn Fn(Arc<CommandMessage>, Option<String>) -> BoxFuture<Result<Vec<u8>, StepError>>
        + Send
        + Sync,
>;

/// How a participant runs.
#[derive(Debug, Clone)]
pub struct ParticipantConfig {
    /// Handlers running at once.
    pub concurrency: usize,
    /// How long a handler may run before its claim on the effect lapses and another delivery
    /// may run it (the SDK extends the message's ack deadline while it runs).
    pub lease: Duration,
    /// Check each command against the saga's recorded state before running it (drops forged
    /// and stale commands at the cost of one read per command).
    pub verify_commands: bool,
    /// The largest message accepted or produced.
    pub max_message_size: usize,
    /// Provision the streams and buckets at start (harmless if the coordinator did).
    pub provision: Option<ProvisionConfig>,
}

impl Default for ParticipantConfig {
    fn default() -> Self {
        ParticipantConfig {
            concurrency: 64,
            lease: Duration::from_secs(60),
            verify_commands: true,
            max_message_size: saga_core::envelope::DEFAULT_MAX_MESSAGE_SIZE,
            provision: Some(ProvisionConfig::default()),
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
    /// The server or the streams are not usable.
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
        let raw: RawHandler = Arc::new(move |cmd: Arc<CommandMessage>, traceparent| {
            let handler = handler.clone();
            Box::pin(async move {
                let input: T = rmp_serde::from_slice(cmd.input.as_bytes()).map_err(|e| {
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
                    command_id: cmd.command_id.clone(),
                    traceparent,
                    deps: Arc::new(cmd.deps.clone()),
                    output: cmd.output.clone(),
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

    /// Starts consuming commands.
    pub async fn start(self) -> Result<Participant, ParticipantError> {
        let service = ServiceName::new(self.service.clone()).map_err(|reason| {
            ParticipantError::InvalidName { name: self.service.clone(), reason }
        })?;
        if let Some(p) = &self.config.provision {
            provision(&self.client, p).await?;
        }
        let js = jetstream::new(self.client.clone());
        let nats = |e: async_nats::Error| ParticipantError::Nats(e);
        let consumer_config = jetstream::consumer::pull::Config {
            durable_name: Some(subjects::participant_consumer(&service)),
            description: Some(format!("Commands to participant service {service}")),
            filter_subject: subjects::commands_of(&service),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: (self.config.concurrency * 4) as i64,
            ..Default::default()
        };
        ensure_consumer(&js, subjects::COMMAND_STREAM, consumer_config).await.map_err(nats)?;
        let consumer: PullConsumer = js
            .get_consumer_from_stream(
                subjects::participant_consumer(&service),
                subjects::COMMAND_STREAM,
            )
            .await
            .map_err(|e| nats(e.into()))?;
        let effects =
            js.get_key_value(subjects::EFFECTS_BUCKET).await.map_err(|e| nats(e.into()))?;
        let codec = Codec::with_max_size(self.config.max_message_size);
        let store = StateStore::open(js.clone(), codec, Duration::ZERO).await.map_err(nats)?;
        let shared = Arc::new(Shared {
            js,
            effects,
            store,
            codec,
            service: service.clone(),
            handlers: self.handlers,
            config: self.config,
            in_flight: Arc::default(),
        });
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(run(shared, consumer, rx));
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
    ///         // The barrier guarantees the action ran before this is called.
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
    js: jetstream::Context,
    effects: kv::Store,
    store: StateStore,
    codec: Codec,
    service: ServiceName,
    handlers: HashMap<(Phase, CommandName), RawHandler>,
    config: ParticipantConfig,
    in_flight: InFlightSet,
}

type InFlightSet = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

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

async fn run(shared: Arc<Shared>, consumer: PullConsumer, mut shutdown: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(shared.config.concurrency));
    'outer: loop {
        let batch = shared.config.concurrency.min(256);
        let mut messages = match consumer.stream().max_messages_per_batch(batch).messages().await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot pull commands; retrying in 1s");
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let permit = tokio::select! {
                _ = shutdown.changed() => break 'outer,
                p = permits.clone().acquire_owned() => p.expect("semaphore never closes"),
            };
            tokio::select! {
                _ = shutdown.changed() => break 'outer,
                next = messages.next() => match next {
                    Some(Ok(msg)) => {
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            shared.handle(msg).await;
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => warn!(error = %e, "error while pulling commands"),
                    None => continue 'outer,
                },
            }
        }
    }
    // Wait for the handlers in flight.
    let _ = permits.acquire_many(shared.config.concurrency as u32).await;
    let _ = shared.js.client().flush().await;
    info!(service = %shared.service, "participant stopped");
}

/// What the effects bucket records for an effect key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum EffectRecord {
    /// A handler is running it until `until` (ms since the epoch).
    InProgress { until: u64 },
    /// It ran; this is its reply.
    Done { outcome: ReplyOutcome },
    /// The compensation came first: the action must never run.
    Barrier,
}

/// What claiming an effect key found.
enum Claim {
    /// The caller holds the claim at this revision and runs the handler.
    Run(u64),
    /// The effect is recorded: re-send this reply.
    Recorded(ReplyOutcome),
    /// Another delivery is running it: try again after this long.
    Busy(Duration),
    /// The compensation came first: the action must not run.
    Barrier,
}

impl Shared {
    async fn handle(&self, msg: jetstream::Message) {
        let cmd: CommandMessage = match self.codec.decode(&msg.payload) {
            Ok(cmd) => cmd,
            Err(e) => return self.dead_letter(&msg, &e.to_string()).await,
        };
        if cmd.service != self.service {
            let reason = format!(
                "command for service {} delivered to service {}",
                cmd.service, self.service
            );
            return self.dead_letter(&msg, &reason).await;
        }
        let traceparent = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::TRACEPARENT))
            .map(|v| v.as_str().to_owned());
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
        async {
            match self.process(&msg, cmd.clone(), traceparent.clone()).await {
                Ok(Some(outcome)) => {
                    if let Err(e) = self.reply(&cmd, outcome, traceparent.as_deref()).await {
                        warn!(error = %e, "reply failed; the command will be redelivered");
                        let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                        return;
                    }
                    let _ = msg.ack().await;
                }
                Ok(None) => {
                    let _ = msg.ack().await;
                }
                Err(Retry(delay, why)) => {
                    debug!(why, "command deferred");
                    let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Decides and runs. `Ok(Some(outcome))`: reply with it; `Ok(None)`: drop the command;
    /// `Err`: redeliver later.
    async fn process(
        &self,
        msg: &jetstream::Message,
        cmd: Arc<CommandMessage>,
        traceparent: Option<String>,
    ) -> Result<Option<ReplyOutcome>, Retry> {
        let key = CommandId::effect_key(&cmd.saga_id, &cmd.step, cmd.phase);
        // An effect that ran here and is still being recorded must not run again.
        if self.in_flight.lock().expect("lock").contains(&key) {
            return Err(Retry(Duration::from_secs(1), "its effect is still being recorded".into()));
        }
        // Verify before claiming: a command that fails verification must leave no trace in
        // the effects bucket (a released claim would read as "the action may have run" to the
        // barrier of a later compensation).
        if self.config.verify_commands {
            match self.verify(&cmd).await {
                Ok(()) => {}
                Err(Verdict::Forged(reason)) => {
                    self.dead_letter_no_ack(msg, &reason).await?;
                    return Ok(None);
                }
                Err(Verdict::Stale(reason)) => {
                    info!(%reason, "stale command dropped");
                    return Ok(None);
                }
                Err(Verdict::Unavailable(reason)) => {
                    return Err(Retry(Duration::from_secs(1), reason))
                }
            }
        }
        let Some(handler) = self.handlers.get(&(cmd.phase, cmd.command.clone())).cloned() else {
            let reason = format!(
                "service {} has no {} handler for command {:?}",
                self.service,
                cmd.phase,
                cmd.command.as_str()
            );
            error!(%reason);
            return Ok(Some(ReplyOutcome::Failure { reason, transient: false }));
        };
        let rev = match self.claim(&key).await? {
            Claim::Recorded(outcome) => {
                debug!("effect already recorded: re-sending its reply");
                return Ok(Some(outcome));
            }
            Claim::Busy(delay) => {
                return Err(Retry(delay, "another delivery is running it".into()))
            }
            Claim::Barrier => {
                info!("action arrived after its compensation: not executed");
                return Ok(Some(ReplyOutcome::Failure {
                    reason: "not executed: the step was compensated before this action arrived"
                        .into(),
                    transient: false,
                }));
            }
            Claim::Run(rev) => rev,
        };
        // The barrier: a compensation whose action never ran is a recorded no-op.
        let noop = match cmd.phase {
            Phase::Action => false,
            Phase::Compensation => match self.barrier(&cmd).await {
                Ok(noop) => noop,
                Err(e) => {
                    self.release(&key, rev).await;
                    return Err(e);
                }
            },
        };
        let outcome = if noop {
            info!("compensation of an action that never ran: recorded as a no-op");
            ReplyOutcome::Success { output: Payload::default() }
        } else {
            self.run_handler(msg, &cmd, handler, traceparent).await
        };
        match &outcome {
            ReplyOutcome::Success { .. } | ReplyOutcome::Failure { transient: false, .. } => {
                let _recording = InFlight::enter(&self.in_flight, &key);
                self.record_done(&key, rev, &outcome).await;
            }
            ReplyOutcome::Failure { transient: true, .. } => self.release(&key, rev).await,
        }
        Ok(Some(outcome))
    }

    async fn run_handler(
        &self,
        msg: &jetstream::Message,
        cmd: &Arc<CommandMessage>,
        handler: RawHandler,
        traceparent: Option<String>,
    ) -> ReplyOutcome {
        let fut = std::panic::AssertUnwindSafe(handler(cmd.clone(), traceparent)).catch_unwind();
        tokio::pin!(fut);
        // Keep the message from being redelivered while the handler runs.
        let mut progress = tokio::time::interval(Duration::from_secs(10));
        progress.tick().await;
        let result = loop {
            tokio::select! {
                r = &mut fut => break r,
                _ = progress.tick() => { let _ = msg.ack_with(AckKind::Progress).await; }
            }
        };
        // A reply must fit with room to spare: the output also travels in later commands.
        let limit = self.config.max_message_size / 4;
        match result {
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
                let mut dlq_msg: async_nats::Message = msg.message.clone();
                dlq_msg.payload = msg.payload.clone();
                if let Err(e) = dead_letter(
                    &self.js,
                    self.service.as_str(),
                    &dlq_msg,
                    &format!("{reason} (attempt {})", cmd.attempt),
                )
                .await
                {
                    warn!(error = %e, "could not dead-letter the panicking command");
                }
                ReplyOutcome::Failure { reason, transient: true }
            }
        }
    }

    /// Checks the command against the saga's recorded state.
    async fn verify(&self, cmd: &CommandMessage) -> Result<(), Verdict> {
        let record = match self.store.load(&cmd.saga_id).await {
            Ok(Some(v)) => v.record,
            Ok(None) => {
                return Err(Verdict::Forged(format!(
                    "command {} names saga {}, which does not exist (forged, or expired)",
                    cmd.command_id, cmd.saga_id
                )))
            }
            Err(e) => return Err(Verdict::Unavailable(e.to_string())),
        };
        let state = &record.state;
        let Some(step) = state.steps.iter().find(|s| s.name == cmd.step) else {
            return Err(Verdict::Forged(format!(
                "command {} names step {}, which saga {} ({}) does not have",
                cmd.command_id, cmd.step, cmd.saga_id, state.saga
            )));
        };
        let (current, in_flight) = match cmd.phase {
            Phase::Action => (step.attempt, step.status == StepStatus::Running),
            Phase::Compensation => (step.comp_attempt, step.status == StepStatus::Compensating),
        };
        if cmd.attempt > current {
            return Err(Verdict::Forged(format!(
                "command {} is attempt {} but saga {} sent at most attempt {current}",
                cmd.command_id, cmd.attempt, cmd.saga_id
            )));
        }
        let sent = state.history.iter().rev().find(|h| {
            h.kind == saga_core::HistoryKind::Dispatched
                && h.step.as_ref() == Some(&cmd.step)
                && h.phase == Some(cmd.phase)
                && h.attempt == cmd.attempt
        });
        if let Some(sent) = sent {
            if sent.command.as_ref() != Some(&cmd.command) {
                return Err(Verdict::Forged(format!(
                    "command {} names command {:?}, but saga {} sent {:?} for step {} {}",
                    cmd.command_id,
                    cmd.command.as_str(),
                    cmd.saga_id,
                    sent.command.as_ref().map_or("", |c| c.as_str()),
                    cmd.step,
                    cmd.phase
                )));
            }
        }
        if cmd.attempt < current || !in_flight {
            return Err(Verdict::Stale(format!(
                "command {} is not in flight (step {} is {:?}, attempt {current})",
                cmd.command_id, cmd.step, step.status
            )));
        }
        Ok(())
    }

    async fn claim(&self, key: &str) -> Result<Claim, Retry> {
        let lease = self.config.lease;
        let until = now().after(lease).0;
        // The common case: nothing is recorded for this effect yet. Claim it straight away
        // and read the record only if one exists.
        // (An update expecting revision 0 is a create that does not read back on failure.)
        match self.effects.update(key, self.encode(&EffectRecord::InProgress { until }), 0).await {
            Ok(rev) => return Ok(Claim::Run(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
            Err(e) => return Err(unavailable(e)),
        }
        for _ in 0..8 {
            let entry = self.effects.entry(key).await.map_err(unavailable)?;
            match entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    let record: Option<EffectRecord> = rmp_serde::from_slice(&e.value).ok();
                    match record {
                        Some(EffectRecord::Done { outcome }) => {
                            return Ok(Claim::Recorded(outcome))
                        }
                        Some(EffectRecord::Barrier) => return Ok(Claim::Barrier),
                        Some(EffectRecord::InProgress { until: held }) if held > now().0 => {
                            return Ok(Claim::Busy(Duration::from_millis(
                                (held - now().0).min(5_000),
                            )));
                        }
                        // Lapsed or unreadable: take it over.
                        _ => {
                            let claim = self.encode(&EffectRecord::InProgress { until });
                            match self.effects.update(key, claim, e.revision).await {
                                Ok(rev) => return Ok(Claim::Run(rev)),
                                Err(_) => continue,
                            }
                        }
                    }
                }
                _ => {
                    let claim = self.encode(&EffectRecord::InProgress { until });
                    match self.effects.create(key, claim).await {
                        Ok(rev) => return Ok(Claim::Run(rev)),
                        Err(_) => continue,
                    }
                }
            }
        }
        Err(Retry(Duration::from_millis(200), format!("effect key {key} is contended")))
    }

    /// For a compensation: whether the action never ran (then the compensation is a no-op),
    /// blocking the action from ever running if it has not.
    async fn barrier(&self, cmd: &CommandMessage) -> Result<bool, Retry> {
        let key = CommandId::effect_key(&cmd.saga_id, &cmd.step, Phase::Action);
        let barrier = self.encode(&EffectRecord::Barrier);
        for _ in 0..8 {
            let entry = self.effects.entry(&key).await.map_err(unavailable)?;
            match entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    match rmp_serde::from_slice::<EffectRecord>(&e.value).ok() {
                        Some(EffectRecord::Done { outcome: ReplyOutcome::Success { .. } }) => {
                            return Ok(false)
                        }
                        Some(EffectRecord::Done { outcome: ReplyOutcome::Failure { .. } }) => {
                            return Ok(true)
                        }
                        Some(EffectRecord::Barrier) => return Ok(true),
                        Some(EffectRecord::InProgress { until }) if until > now().0 => {
                            return Err(Retry(
                                Duration::from_millis(until.saturating_sub(now().0).min(5_000)),
                                "the action is still running".into(),
                            ));
                        }
                        // A lapsed claim: the action may have partly run. Block it and compensate.
                        _ => match self.effects.update(&key, barrier.clone(), e.revision).await {
                            Ok(_) => return Ok(false),
                            Err(_) => continue,
                        },
                    }
                }
                _ => match self.effects.create(&key, barrier.clone()).await {
                    Ok(_) => return Ok(true),
                    Err(_) => continue,
                },
            }
        }
        Err(Retry(Duration::from_millis(200), format!("effect key {key} is contended")))
    }

    /// Records a finished effect. The effect has happened: keep trying (NATS may be
    /// restarting) until the record is stored or another delivery has taken the key over.
    async fn record_done(&self, key: &str, rev: u64, outcome: &ReplyOutcome) {
        let record = self.encode(&EffectRecord::Done { outcome: outcome.clone() });
        let mut delay = Duration::from_millis(100);
        for _ in 0..600 {
            match self.effects.update(key, record.clone(), rev).await {
                Ok(_) => return,
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // Our claim is no longer the latest record: an earlier try of this write
                    // landed (its answer was lost), or the server lost the claim in a crash,
                    // or another delivery took the key over. The effect has run here either
                    // way: make sure it is recorded, unless another delivery holds it now.
                    match self.record_over(key, rev, &record).await {
                        Ok(()) => return,
                        Err(e) => {
                            warn!(key, error = %e, "recording the effect failed; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(2));
                        }
                    }
                }
                Err(e) => {
                    warn!(key, error = %e, "recording the effect failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        error!(key, "gave up recording the effect; a redelivered command may run it again");
    }

    /// Records `record` (a done effect) over whatever the key holds now, unless it is done
    /// already or another delivery holds a live claim on it.
    async fn record_over(&self, key: &str, ours: u64, record: &Bytes) -> Result<(), String> {
        let entry = self.effects.entry(key).await.map_err(|e| e.to_string())?;
        let written = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                match rmp_serde::from_slice::<EffectRecord>(&e.value).ok() {
                    Some(EffectRecord::Done { .. }) => return Ok(()),
                    Some(EffectRecord::Barrier) => {
                        // The claim was lost and a compensation has since found no record: it
                        // was recorded as a no-op, yet this action ran. An operator must look.
                        error!(key, "the action ran, but its compensation was already recorded as a no-op (its claim was lost): compensate it by hand");
                        return Ok(());
                    }
                    Some(EffectRecord::InProgress { until })
                        if e.revision != ours && until > now().0 =>
                    {
                        warn!(
                            key,
                            "could not record the effect: another delivery took the key over"
                        );
                        return Ok(());
                    }
                    _ => self
                        .effects
                        .update(key, record.clone(), e.revision)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                }
            }
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

    /// Gives up a claim so that the next attempt runs the handler.
    async fn release(&self, key: &str, rev: u64) {
        let lapsed = self.encode(&EffectRecord::InProgress { until: 0 });
        if let Err(e) = self.effects.update(key, lapsed, rev).await {
            debug!(error = %e, "releasing the claim failed (it will lapse)");
        }
    }

    fn encode(&self, record: &EffectRecord) -> Bytes {
        Bytes::from(rmp_serde::to_vec_named(record).expect("effect records encode"))
    }

    async fn reply(
        &self,
        cmd: &CommandMessage,
        outcome: ReplyOutcome,
        traceparent: Option<&str>,
    ) -> Result<(), async_nats::Error> {
        let reply = ReplyMessage::to(cmd, outcome);
        let payload = self.codec.encode(&reply)?;
        let mut msg = PublishMessage::build()
            .message_id(format!("r.{}", cmd.command_id).as_str())
            .header(headers::SAGA_ID, cmd.saga_id.as_str())
            .payload(Bytes::from(payload));
        if let Some(tp) = traceparent {
            msg = msg.header(headers::TRACEPARENT, crate::telemetry::child(tp).as_str());
        }
        self.js.send_publish(subjects::input(&cmd.saga_id, InputKind::Reply), msg).await?.await?;
        Ok(())
    }

    async fn dead_letter(&self, msg: &jetstream::Message, reason: &str) {
        if self.dead_letter_no_ack(msg, reason).await.is_ok() {
            let _ = msg.ack_with(AckKind::Term).await;
        } else {
            let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
        }
    }

    async fn dead_letter_no_ack(
        &self,
        msg: &jetstream::Message,
        reason: &str,
    ) -> Result<(), Retry> {
        warn!(subject = %msg.subject, %reason, "dead-lettering command");
        dead_letter(&self.js, self.service.as_str(), &msg.message, reason)
            .await
            .map_err(|e| Retry(Duration::from_secs(1), format!("dead-lettering failed: {e}")))
    }
}

enum Verdict {
    Forged(String),
    Stale(String),
    Unavailable(String),
}

/// Leave the command for redelivery after a delay.
struct Retry(Duration, String);

fn unavailable(e: impl std::fmt::Display) -> Retry {
    Retry(Duration::from_secs(1), format!("effects bucket unavailable: {e}"))
}
