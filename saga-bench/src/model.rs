//! `--model`: a protocol design's NATS operations, written by hand, measured in place of
//! saga-nats.
//!
//! Each model does per saga exactly the NATS operations of one protocol design (the same
//! subjects' shapes, headers, stream and bucket settings, and roughly the same message sizes)
//! and nothing else: no state machine, no encoding beyond filling bytes, no checks. Its
//! throughput is the most any implementation of that design can reach on this server and
//! machine, so that:
//!
//! - `v2` against saga-nats says how much of saga-nats' cost is its implementation (code)
//!   and how much the protocol's operations;
//! - the other models say what a protocol change can gain before anyone builds it.
//!
//! A model's sagas are all 3-step (or `--steps`) successes: a model of a design's happy path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use async_nats::jetstream::{self, consumer, kv, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use clap::ValueEnum;
use futures::StreamExt;
use tokio::sync::oneshot;

use crate::conn::{Conn, FLOOR_USER};
use crate::load::{CountFuture, SagaFuture, System};
use crate::measure::MessageCounter;

/// The protocol designs a model can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Model {
    /// Protocol v2 as built: the start is a JetStream publish to a work queue that the
    /// coordinator holds (pull consumer) and acknowledges when the saga ends; the first record
    /// is logged (compare-and-swap over nothing) before the first command; each step is a core
    /// request, the participant replies, then records its outcome (KV create); the coordinator
    /// logs every step's outcome (compare-and-swap) before the next command. 8 writes.
    V2,
    /// v2, but the participant records its outcome before it replies, and the coordinator
    /// logs only the first and the terminal record (the one-writer design: a step's success
    /// is durable in the participant's record, not in the log). 6 writes.
    Deferred,
    /// v2, but the start is a core request to the coordinators (queue group), answered once
    /// the first record is logged: no start stream, no consumer, no acknowledgement. 7 writes.
    DirectStart,
    /// Both: a direct start and deferred records. 5 writes.
    DirectDeferred,
    /// v2 with the trace context in the bodies of starts, commands and replies instead of
    /// their headers (`traceparent`, and `Saga-Id` on starts): the same operations with no
    /// headers but those of the compare-and-swap.
    BodyTrace,
    /// v2 with 12-character saga ids (and so shorter subjects, effect keys and compare-and-swap
    /// filters) instead of 36-character UUIDs.
    ShortIds,
}

impl Model {
    fn direct_start(self) -> bool {
        matches!(self, Model::DirectStart | Model::DirectDeferred)
    }

    fn deferred(self) -> bool {
        matches!(self, Model::Deferred | Model::DirectDeferred)
    }

    /// Whether the trace context travels in headers, as in saga-nats today.
    fn trace_headers(self) -> bool {
        self != Model::BodyTrace
    }

    /// What the model is, for the report's header.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Model::V2 => "protocol v2's operations as built",
            Model::Deferred => {
                "v2 with records before replies and only the first and terminal log records"
            }
            Model::DirectStart => {
                "v2 with starts as core requests answered once the first record is logged"
            }
            Model::DirectDeferred => "direct starts and deferred log records together",
            Model::BodyTrace => "v2 with the trace context in message bodies, not headers",
            Model::ShortIds => "v2 with 12-character saga ids instead of UUIDs",
        }
    }
}

const IN_STREAM: &str = "MODEL_IN";
const LOG_STREAM: &str = "MODEL_LOG";
const CONSUMER: &str = "model-coordinator";
/// A log record of saga-nats is about 1 KB with a 256-byte input (its snapshot holds the input
/// and every step); a command carries the input and about 200 bytes more.
const RECORD_OVERHEAD: usize = 750;
const COMMAND_OVERHEAD: usize = 200;
const REPLY_BYTES: usize = 90;
const EFFECT_BYTES: usize = 80;
const START_OVERHEAD: usize = 150;

/// The saga id of saga `n`: shaped like saga-nats' (a UUID), or 12 characters.
fn saga_id(model: Model, n: u64) -> String {
    if model == Model::ShortIds {
        format!("{n:012x}")
    } else {
        format!("0191d3a2-7c4e-7b1a-{:04x}-{:012x}", (n >> 48) & 0xffff, n & 0xffff_ffff_ffff)
    }
}

/// A `traceparent` of the size saga-nats sends (55 bytes).
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;
/// The coordinator's commands in flight, by reply subject.
type InFlight = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;

/// The headers saga-nats puts on a command or reply: the trace context, when the model keeps
/// it in headers, else none.
fn trace_headers(model: Model) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if model.trace_headers() {
        headers.insert("traceparent", TRACEPARENT);
    }
    headers
}

/// A body of `len` bytes, with room for the trace context when it travels in bodies.
fn body(model: Model, fill: u8, len: usize) -> Vec<u8> {
    let extra = if model.trace_headers() { 0 } else { TRACEPARENT.len() + 8 };
    vec![fill; len + extra]
}

/// A running model: client, coordinator and participants, each on its own connection.
pub(crate) struct ModelSystem {
    model: Model,
    client: async_nats::Client,
    client_js: jetstream::Context,
    payload: usize,
    next: AtomicU64,
    waiting: Waiting,
    counter: MessageCounter,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ModelSystem {
    /// Creates the model's streams and buckets and starts its coordinator and participants.
    pub(crate) async fn start(
        conn: &Conn,
        model: Model,
        steps: usize,
        payload: usize,
    ) -> anyhow::Result<Arc<ModelSystem>> {
        let mut counter = MessageCounter::default();
        let mut tasks = Vec::new();
        let coord = conn.connect(FLOOR_USER).await.context("connecting the model coordinator")?;
        counter.watch(&coord);
        let js = jetstream::new(coord.clone());
        js.create_stream(stream::Config {
            name: LOG_STREAM.into(),
            subjects: vec!["model.log.>".into()],
            storage: stream::StorageType::File,
            allow_direct: true,
            // saga-nats' default retention of finished sagas.
            max_age: Duration::from_secs(7 * 24 * 3600),
            ..Default::default()
        })
        .await
        .context("creating the model's log stream")?;
        // Participants: one connection and one effect bucket per step service.
        for step in 0..steps {
            let p = conn.connect(FLOOR_USER).await.context("connecting a model participant")?;
            counter.watch(&p);
            let pjs = jetstream::new(p.clone());
            let effects = pjs
                .create_key_value(kv::Config {
                    bucket: format!("model_fx_{step}"),
                    history: 1,
                    max_age: Duration::from_secs(14 * 24 * 3600),
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .context("creating a model effect bucket")?;
            let sub = p.queue_subscribe(format!("model.cmd.p{step}.do"), "p".into()).await?;
            tasks.push(tokio::spawn(participant(p.clone(), effects, sub, model)));
            p.flush().await?;
        }
        let in_flight: InFlight = Arc::default();
        let replies = coord.subscribe(format!("{REPLIES}.>")).await?;
        tasks.push(tokio::spawn(Coordinator::replies(in_flight.clone(), replies)));
        let coordinator = Arc::new(Coordinator {
            model,
            js: js.clone(),
            client: coord.clone(),
            steps,
            payload,
            in_flight,
        });
        if model.direct_start() {
            let sub = coord.queue_subscribe("model.start.*.*", "coordinators".into()).await?;
            tasks.push(tokio::spawn(coordinator.clone().direct_starts(sub)));
        } else {
            let stream = js
                .create_stream(stream::Config {
                    name: IN_STREAM.into(),
                    subjects: vec!["model.in.>".into()],
                    storage: stream::StorageType::File,
                    retention: stream::RetentionPolicy::WorkQueue,
                    max_messages_per_subject: 1,
                    discard: stream::DiscardPolicy::New,
                    discard_new_per_subject: true,
                    allow_direct: true,
                    duplicate_window: Duration::from_secs(120),
                    ..Default::default()
                })
                .await
                .context("creating the model's start stream")?;
            let consumer: consumer::PullConsumer = stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(CONSUMER.into()),
                    filter_subject: "model.in.>".into(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(15),
                    max_ack_pending: 100_000,
                    ..Default::default()
                })
                .await
                .context("creating the model's start consumer")?;
            tasks.push(tokio::spawn(coordinator.clone().held_starts(consumer)));
        }
        coord.flush().await?;
        // The client: starts sagas and hears their terminal records.
        let client = conn.connect(FLOOR_USER).await.context("connecting the model client")?;
        counter.watch(&client);
        let waiting: Waiting = Arc::default();
        let ends = client.subscribe("model.log.*.bench.completed").await?;
        tasks.push(tokio::spawn(hear_ends(ends, waiting.clone())));
        client.flush().await?;
        Ok(Arc::new(ModelSystem {
            model,
            client_js: jetstream::new(client.clone()),
            client,
            payload,
            next: AtomicU64::new(0),
            waiting,
            counter,
            tasks,
        }))
    }

    /// The version of the server the model runs on.
    pub(crate) fn server_version(&self) -> String {
        self.client.server_info().version
    }

    /// Stops the coordinator, the participants and the client's listener.
    pub(crate) fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }

    async fn run(self: Arc<Self>, n: u64) -> anyhow::Result<()> {
        let id = saga_id(self.model, n);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("waiting map").insert(id.clone(), tx);
        let start = Bytes::from(body(self.model, b's', START_OVERHEAD + self.payload));
        let mut headers = trace_headers(self.model);
        if self.model.trace_headers() {
            headers.insert("Saga-Id", id.as_str());
        }
        if self.model.direct_start() {
            // Answered once the first record is durable.
            let subject = format!("model.start.{id}.bench");
            self.client.request_with_headers(subject, headers, start).await?;
        } else {
            headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
            self.client_js
                .publish_with_headers(format!("model.in.{id}.bench.start"), headers, start)
                .await?
                .await?;
        }
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                self.waiting.lock().expect("waiting map").remove(&id);
                bail!("model saga {id}: no terminal record within 30 s")
            }
        }
    }
}

async fn hear_ends(mut ends: async_nats::Subscriber, waiting: Waiting) {
    while let Some(msg) = ends.next().await {
        let Some(id) = msg.subject.split('.').nth(2) else { continue };
        if let Some(tx) = waiting.lock().expect("waiting map").remove(id) {
            let _ = tx.send(());
        }
    }
}

/// The echo participant: for each command, an effect record (KV create) and a reply, in the
/// model's order.
async fn participant(
    conn: async_nats::Client,
    effects: kv::Store,
    mut sub: async_nats::Subscriber,
    model: Model,
) {
    while let Some(msg) = sub.next().await {
        let (conn, effects) = (conn.clone(), effects.clone());
        // One task per command, as the SDK runs handlers concurrently.
        tokio::spawn(async move {
            let Some(reply) = msg.reply else { return };
            // The command starts with its effect key.
            let key_len = usize::from(msg.payload.first().copied().unwrap_or(0));
            let key = msg.payload.get(1..1 + key_len).unwrap_or(b"0");
            let key = String::from_utf8_lossy(key).into_owned();
            let record = Bytes::from(vec![b'd'; EFFECT_BYTES]);
            let answer = Bytes::from(body(model, b'r', REPLY_BYTES));
            let headers = trace_headers(model);
            if model.deferred() {
                if effects.update(&key, record, 0).await.is_ok() {
                    let _ = conn.publish_with_headers(reply, headers, answer).await;
                }
            } else if conn.publish_with_headers(reply, headers, answer).await.is_ok() {
                let _ = effects.update(&key, record, 0).await;
            }
        });
    }
}

struct Coordinator {
    model: Model,
    js: jetstream::Context,
    client: async_nats::Client,
    steps: usize,
    payload: usize,
    in_flight: InFlight,
}

/// The replica's reply subjects: `model.reply.<replica>.<service>.<saga>.<step>.<a|c>.<attempt>`,
/// as saga-nats' `saga.reply.…`.
const REPLIES: &str = "model.reply.r0123456789abcdef";

impl Coordinator {
    async fn held_starts(self: Arc<Self>, consumer: consumer::PullConsumer) {
        let Ok(mut messages) = consumer.stream().max_messages_per_batch(256).messages().await
        else {
            return;
        };
        while let Some(Ok(msg)) = messages.next().await {
            let this = self.clone();
            tokio::spawn(async move {
                let Some(id) = msg.subject.split('.').nth(2).map(str::to_owned) else { return };
                if this.saga(&id, None).await.is_ok() {
                    let _ = msg.ack().await;
                }
            });
        }
    }

    async fn direct_starts(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let this = self.clone();
            tokio::spawn(async move {
                let id = msg.subject.split('.').nth(2).map(str::to_owned);
                if let (Some(id), Some(reply)) = (id, msg.reply) {
                    let _ = this.saga(&id, Some(reply)).await;
                }
            });
        }
    }

    /// Routes each reply to the saga waiting for it.
    async fn replies(in_flight: InFlight, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            let waiting = in_flight.lock().expect("in-flight map").remove(msg.subject.as_str());
            if let Some(tx) = waiting {
                let _ = tx.send(());
            }
        }
    }

    /// Appends a record with the compare-and-swap over the saga's log subjects.
    async fn append(&self, id: &str, headline: &str, last: u64) -> anyhow::Result<u64> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Last-Subject-Sequence", last.to_string().as_str());
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence-Subject",
            format!("model.log.{id}.>").as_str(),
        );
        let body = Bytes::from(vec![b'l'; RECORD_OVERHEAD + self.payload]);
        let ack = self
            .js
            .publish_with_headers(format!("model.log.{id}.bench.{headline}"), headers, body)
            .await?
            .await?;
        Ok(ack.sequence)
    }

    /// Sends step `step`'s command and waits for its reply.
    async fn command(&self, id: &str, step: usize) -> anyhow::Result<()> {
        let key = format!("{id}.s{step}.a");
        let mut command = vec![u8::try_from(key.len())?];
        command.extend(key.as_bytes());
        command.extend(body(self.model, b'c', COMMAND_OVERHEAD + self.payload));
        let reply = format!("{REPLIES}.p{step}.{id}.s{step}.a.1");
        let (tx, rx) = oneshot::channel();
        self.in_flight.lock().expect("in-flight map").insert(reply.clone(), tx);
        let headers = trace_headers(self.model);
        let subject = format!("model.cmd.p{step}.do");
        self.client
            .publish_with_reply_and_headers(subject, reply.clone(), headers, command.into())
            .await?;
        if tokio::time::timeout(Duration::from_secs(10), rx).await.is_err() {
            self.in_flight.lock().expect("in-flight map").remove(&reply);
            bail!("model saga {id}: no reply from step {step}");
        }
        Ok(())
    }

    /// One saga: the first record, then each step's command and (unless deferred) its record.
    async fn saga(&self, id: &str, started: Option<async_nats::Subject>) -> anyhow::Result<()> {
        let mut last = self.append(id, "started", 0).await?;
        if let Some(reply) = started {
            self.client.publish(reply, Bytes::from_static(b"ok")).await?;
        }
        for step in 0..self.steps {
            self.command(id, step).await?;
            let end = step + 1 == self.steps;
            if end {
                self.append(id, "completed", last).await?;
            } else if !self.model.deferred() {
                last = self.append(id, "step_succeeded", last).await?;
            }
        }
        Ok(())
    }
}

impl System for ModelSystem {
    fn saga(self: Arc<Self>) -> SagaFuture {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Box::pin(self.run(n))
    }

    fn messages(&self) -> CountFuture<'_> {
        Box::pin(std::future::ready(Ok(self.counter.total())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saga_ids_are_shaped_like_saga_nats_ones_unless_short() {
        let id = saga_id(Model::V2, 0x0001_0000_0000_002a);
        assert_eq!(id, "0191d3a2-7c4e-7b1a-0001-00000000002a");
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert_eq!(saga_id(Model::ShortIds, 42), "00000000002a");
        // Distinct sagas, distinct ids.
        assert_ne!(saga_id(Model::V2, 1), saga_id(Model::V2, 2));
    }

    #[test]
    fn the_trace_context_travels_in_headers_or_in_the_body() {
        assert_eq!(
            trace_headers(Model::V2).get("traceparent").map(|v| v.as_str()),
            Some(TRACEPARENT)
        );
        assert_eq!(body(Model::V2, b'c', 10).len(), 10);
        assert!(trace_headers(Model::BodyTrace).is_empty());
        assert_eq!(body(Model::BodyTrace, b'c', 10).len(), 10 + TRACEPARENT.len() + 8);
    }

    #[test]
    fn designs_combine_as_named() {
        let direct: Vec<_> =
            Model::value_variants().iter().filter(|m| m.direct_start()).copied().collect();
        assert_eq!(direct, [Model::DirectStart, Model::DirectDeferred]);
        let deferred: Vec<_> =
            Model::value_variants().iter().filter(|m| m.deferred()).copied().collect();
        assert_eq!(deferred, [Model::Deferred, Model::DirectDeferred]);
    }
}
