//! The floor: the least any durable saga orchestrator must do, written by hand on async-nats.
//!
//! Per saga: a durable record of the start (a JetStream publish, acknowledged), then for each
//! step a command as a core NATS request to an echo responder and a durable record of its
//! outcome. Three steps: 3 commands, 3 replies, 4 durable writes. A planned failure at the last
//! step records it, then compensates the steps done, newest first, each with a command and a
//! durable record. No framework: no dedup, no fencing, no timers, no events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use async_nats::jetstream::{self, stream};
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;

use crate::conn::{Conn, FLOOR_USER};
use crate::load::{planned_failure, CountFuture, SagaFuture, System};
use crate::measure::MessageCounter;

const STREAM: &str = "FLOOR_STATE";
const FAIL: u8 = 1;

/// The hand-written orchestrator and its echo responders.
pub(crate) struct Floor {
    client: async_nats::Client,
    js: jetstream::Context,
    steps: usize,
    failure_rate: f64,
    payload: Bytes,
    next: AtomicU64,
    counter: MessageCounter,
    responders: Vec<tokio::task::JoinHandle<()>>,
}

impl Floor {
    /// Creates the state stream and starts one echo responder connection per step.
    pub(crate) async fn start(
        conn: &Conn,
        steps: usize,
        payload: usize,
        failure_rate: f64,
    ) -> anyhow::Result<Arc<Floor>> {
        let client = conn.connect(FLOOR_USER).await.context("connecting the floor")?;
        let js = jetstream::new(client.clone());
        js.create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["floor.state.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the floor's stream")?;
        let mut counter = MessageCounter::default();
        counter.watch(&client);
        let mut responders = Vec::new();
        for step in 0..steps {
            let conn = conn.connect(FLOOR_USER).await.context("connecting a floor responder")?;
            counter.watch(&conn);
            for subject in [format!("floor.cmd.s{step}"), format!("floor.undo.s{step}")] {
                let sub = conn.queue_subscribe(subject, "floor".into()).await?;
                responders.push(tokio::spawn(respond(conn.clone(), sub)));
            }
            conn.flush().await?;
        }
        Ok(Arc::new(Floor {
            client,
            js,
            steps,
            failure_rate,
            payload: Bytes::from(vec![b'x'; payload]),
            next: AtomicU64::new(0),
            counter,
            responders,
        }))
    }

    /// Stops the responders.
    pub(crate) fn stop(&self) {
        for r in &self.responders {
            r.abort();
        }
    }
}

/// The echo responder: replies with the saga number, and a failure when the command asks.
async fn respond(conn: async_nats::Client, mut sub: async_nats::Subscriber) {
    while let Some(msg) = sub.next().await {
        let Some(reply) = msg.reply else { continue };
        // The command is [flags, n (8 bytes), payload]; the reply [ok, n].
        let ok = msg.payload.first().is_some_and(|f| f & FAIL == 0);
        let mut out = BytesMut::with_capacity(9);
        out.put_u8(u8::from(ok));
        out.put_slice(msg.payload.get(1..9).unwrap_or(&[0; 8]));
        if conn.publish(reply, out.freeze()).await.is_err() {
            return;
        }
    }
}

fn command(n: u64, fail: bool, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(9 + payload.len());
    b.put_u8(if fail { FAIL } else { 0 });
    b.put_u64(n);
    b.put_slice(payload);
    b.freeze()
}

fn record(kind: &[u8], step: usize, n: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(kind.len() + 16);
    b.put_slice(kind);
    b.put_u64(step as u64);
    b.put_u64(n);
    b.freeze()
}

impl Floor {
    async fn request(&self, subject: String, body: Bytes) -> anyhow::Result<bool> {
        let reply = self.client.request(subject, body).await?;
        match reply.payload.first() {
            Some(&ok) => Ok(ok == 1),
            None => bail!("empty reply"),
        }
    }

    async fn write(&self, subject: &str, body: Bytes) -> anyhow::Result<()> {
        self.js.publish(subject.to_owned(), body).await?.await?;
        Ok(())
    }

    async fn run(self: Arc<Self>, n: u64) -> anyhow::Result<()> {
        let fail = planned_failure(n, self.failure_rate);
        let subject = format!("floor.state.{n}");
        // The start record carries the saga's input, as any orchestrator's must.
        let mut start = BytesMut::with_capacity(17 + self.payload.len());
        start.put_slice(&record(b"start", 0, n));
        start.put_slice(&self.payload);
        self.write(&subject, start.freeze()).await?;
        let last = self.steps - 1;
        for step in 0..self.steps {
            let body = command(n, fail && step == last, &self.payload);
            let ok = self.request(format!("floor.cmd.s{step}"), body).await?;
            self.write(&subject, record(if ok { b"done" } else { b"failed" }, step, n)).await?;
            if !ok {
                if !fail {
                    bail!("saga {n}: step {step} failed unplanned");
                }
                for done in (0..step).rev() {
                    let body = command(n, false, &self.payload);
                    if !self.request(format!("floor.undo.s{done}"), body).await? {
                        bail!("saga {n}: compensation of step {done} failed");
                    }
                    self.write(&subject, record(b"undone", done, n)).await?;
                }
                return Ok(());
            }
        }
        if fail {
            bail!("saga {n}: planned failure did not happen");
        }
        Ok(())
    }
}

impl System for Floor {
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
    fn command_layout_is_flags_then_number_then_payload() {
        let c = command(0x0102, true, b"abc");
        assert_eq!(&c[..], &[FAIL, 0, 0, 0, 0, 0, 0, 1, 2, b'a', b'b', b'c']);
        assert_eq!(command(7, false, b"")[0], 0);
    }
}
