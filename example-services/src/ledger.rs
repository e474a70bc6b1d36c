//! A ledger of handler runs, for audits: with one, Seller and Logistics record every run of
//! a handler that finished its effect (one JetStream message per run, on
//! `demo.runs.<service>.<handler>`, in the stream [`STREAM`]). The chaos harness reads it
//! back to prove that no effect ran twice and that no compensation ran without its action's
//! output. The demo runs without one.
//!
//! A run is recorded after its effect and before the handler returns, with a message id of
//! its own, so that a publish retried across a server restart is stored once: two records of
//! one step therefore mean two runs of its handler.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use saga_nats::{Command, StepError};
use serde::{Deserialize, Serialize};

/// The stream of runs.
pub const STREAM: &str = "DEMO_RUNS";
/// Its subjects.
pub const SUBJECTS: &str = "demo.runs.>";

/// How long a run keeps trying to record itself (the server may be restarting).
const RECORD_FOR: Duration = Duration::from_secs(20);

/// One finished run of a handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// The service (`seller`, `logistics`).
    pub service: String,
    /// The handler: an action or a compensation (`reserve`, `release`, `schedule`, `cancel`).
    pub handler: String,
    /// The saga.
    pub saga_id: String,
    /// The step.
    pub step: String,
    /// The attempt the command carried.
    pub attempt: u32,
    /// The process that ran it.
    pub instance: String,
    /// For a compensation: whether it received its action's output.
    pub had_output: bool,
    /// The command's deadline, in ms since the epoch: the SDK stops the handler then.
    pub deadline_ms: u64,
    /// When the handler started and when it finished its effect, in ms since the epoch.
    pub started_ms: u64,
    /// See `started_ms`.
    pub finished_ms: u64,
    /// When the server stored the record, in ms since the epoch (filled in by
    /// [`Ledger::all`]; later than `finished_ms` when the server was unreachable meanwhile).
    #[serde(default, skip_serializing)]
    pub stored_ms: u64,
}

/// Where a service records its runs.
#[derive(Debug, Clone)]
pub struct Ledger {
    nats: async_nats::Client,
    js: jetstream::Context,
    instance: String,
}

/// A handler under way; see [`Ledger::begin`].
#[derive(Debug)]
pub struct Begun {
    ledger: Ledger,
    started_ms: u64,
}

impl Begun {
    /// Records the run of `cmd`'s `handler` at `service`, its effect done now (`had_output`:
    /// for a compensation, whether it received its action's output), retrying (with one
    /// message id) until the server stores it; a transient step error if it cannot within 20 s.
    pub async fn finished<T>(
        &self,
        service: &str,
        handler: &str,
        cmd: &Command<T>,
        had_output: bool,
    ) -> Result<(), StepError> {
        let run = Run {
            service: service.to_owned(),
            handler: handler.to_owned(),
            saga_id: cmd.saga_id.to_string(),
            step: cmd.step.to_string(),
            attempt: cmd.attempt,
            instance: self.ledger.instance.clone(),
            had_output,
            deadline_ms: cmd.deadline.0,
            started_ms: self.started_ms,
            finished_ms: now_ms(),
            stored_ms: 0,
        };
        self.ledger.record(&run).await
    }
}

impl Drop for Begun {
    fn drop(&mut self) {
        self.ledger.notice("ended");
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Ledger {
    /// Creates the stream on `replicas` replicas (the auditor does this once, before any
    /// service starts).
    pub async fn create(nats: &async_nats::Client, replicas: usize) -> anyhow::Result<()> {
        jetstream::new(nats.clone())
            .get_or_create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec![SUBJECTS.into()],
                duplicate_window: Duration::from_secs(120),
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("cannot create the {STREAM} stream: {e}"))?;
        Ok(())
    }

    /// A ledger for the process named `instance`.
    pub fn new(nats: async_nats::Client, instance: &str) -> Ledger {
        Ledger { js: jetstream::new(nats.clone()), nats, instance: instance.to_owned() }
    }

    /// Says (core NATS, not stored) that a handler started in this process, and when the
    /// returned guard is dropped that it ended, so that an auditor can tell how many were under
    /// way when the process was killed.
    pub fn begin(&self) -> Begun {
        self.notice("begun");
        Begun { ledger: self.clone(), started_ms: now_ms() }
    }

    fn notice(&self, what: &str) {
        let (nats, subject) = (self.nats.clone(), format!("demo.{what}.{}", self.instance));
        tokio::spawn(async move { nats.publish(subject, bytes::Bytes::new()).await });
    }

    /// Records `run`, retrying (with the same message id) until the server stores it; a
    /// transient step error if it cannot within 20 s.
    async fn record(&self, run: &Run) -> Result<(), StepError> {
        let subject = format!("demo.runs.{}.{}", run.service, run.handler);
        let body = serde_json::to_vec(run).map_err(|e| StepError::business(e.to_string()))?;
        let msg_id = uuid::Uuid::new_v4().to_string();
        let give_up = tokio::time::Instant::now() + RECORD_FOR;
        loop {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", msg_id.as_str());
            let sent = self.js.publish_with_headers(subject.clone(), headers, body.clone().into());
            let error = match sent.await {
                Ok(ack) => match ack.await {
                    Ok(_) => return Ok(()),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() > give_up {
                return Err(StepError::transient(format!("cannot record the run: {error}")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every run recorded so far, in the order they were stored.
    pub async fn all(nats: &async_nats::Client) -> anyhow::Result<Vec<Run>> {
        let stream = jetstream::new(nats.clone())
            .get_stream(STREAM)
            .await
            .map_err(|e| anyhow::anyhow!("no {STREAM} stream: {e}"))?;
        let total = stream.cached_info().state.messages;
        let mut out = Vec::with_capacity(total as usize);
        if total == 0 {
            return Ok(out);
        }
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig::default())
            .await
            .map_err(|e| anyhow::anyhow!("cannot read {STREAM}: {e}"))?;
        let mut messages = consumer.messages().await?;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| anyhow::anyhow!("reading {STREAM}: {e}"))?;
            let mut run: Run = serde_json::from_slice(&msg.payload)
                .map_err(|e| anyhow::anyhow!("a run in {STREAM} does not decode: {e}"))?;
            let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
            run.stored_ms = (info.published.unix_timestamp_nanos() / 1_000_000) as u64;
            let last = info.pending == 0;
            out.push(run);
            if last {
                break;
            }
        }
        Ok(out)
    }
}
