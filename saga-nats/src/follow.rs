//! Choreography helpers: follow saga lifecycle events, and publish and consume domain events,
//! durably. A follower is a durable consumer: one that is down catches up when it returns,
//! and instances that share a durable name share the work.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use futures::StreamExt;
use saga_core::wire::{quote, LogRecord};
use saga_core::{Codec, LifecycleKind, Payload, SagaId, SagaName, SagaStatus, StepName, Timestamp};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::provision::ensure_consumer;
use crate::subjects;

/// The stream of domain events (`domain.>`), for [`publish_domain_event`] and
/// [`follow_domain_events`].
pub use crate::subjects::DOMAIN_STREAM;

/// A saga lifecycle event, as a follower receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleEvent {
    /// The saga instance.
    pub saga_id: SagaId,
    /// The saga definition's name.
    pub saga: SagaName,
    /// What happened.
    pub kind: LifecycleKind,
    /// The saga's status after it happened.
    pub status: SagaStatus,
    /// The step concerned, if any.
    pub step: Option<StepName>,
    /// A reason, if any: a failed step's; for `compensated` and `cancelled`, why the saga
    /// was undone (`step reserve-items failed: out of stock`, `cancelled: …`).
    pub reason: Option<String>,
    /// When (ms since the epoch).
    pub at: Timestamp,
    /// The saga's input (MessagePack bytes).
    pub input: Payload,
}

impl LifecycleEvent {
    /// The saga's input, decoded.
    pub fn input<I: DeserializeOwned>(&self) -> Result<I, rmp_serde::decode::Error> {
        saga_core::wire::decode_nested(self.input.as_bytes())
    }
}

/// How often a follower's handler may fail on one message before the message is
/// dead-lettered with the handler's last error.
pub const MAX_DELIVERIES: i64 = 10;

/// How long the server waits for a follower's acknowledgement before it delivers the message
/// again (to another instance sharing the durable name): the longest a message stays stuck
/// with an instance that died. A handler that takes longer keeps its message with progress
/// acknowledgements every third of it.
pub const ACK_WAIT: Duration = Duration::from_secs(10);

/// How many messages a follower fetches ahead of its handler: each is stuck for
/// [`ACK_WAIT`] if the instance dies, so few.
const FETCH_AHEAD: usize = 16;

/// A following could not start, or an event could not be published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FollowError {
    /// A name is not a valid token.
    #[error("{what} {value:?} {reason}")]
    InvalidName {
        /// Which name.
        what: &'static str,
        /// The value.
        value: String,
        /// What is wrong.
        reason: saga_core::TokenError,
    },
    /// The event could not be encoded.
    #[error("domain event for {subject} does not encode: {detail}")]
    Encode {
        /// The subject.
        subject: String,
        /// Why.
        detail: String,
    },
    /// NATS failed.
    #[error("NATS error: {0}")]
    Nats(async_nats::Error),
}

/// A running follower; [`Following::shutdown`] stops it after the event in hand.
#[derive(Debug)]
pub struct Following {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Following {
    /// Stops following.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }
}

/// Follows saga lifecycle events with the durable consumer `durable`: every event of saga
/// `saga` (or of every saga) whose kind is in `kinds` (or any kind). Events are read from the
/// sagas' logs: one log record can carry several events (a step succeeded and the saga
/// completed), and the handler gets each one that matches. The handler's `Err` redelivers the
/// record after a growing delay; after [`MAX_DELIVERIES`] it is dead-lettered with the error.
///
/// # Examples
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use saga_core::LifecycleKind;
///
/// let nats = async_nats::connect("nats://127.0.0.1:4222").await?;
/// let following = saga_nats::follow::follow_sagas(
///     nats,
///     "notification",
///     Some("place-order"),
///     &[LifecycleKind::Completed, LifecycleKind::Compensated],
///     |event| async move {
///         println!("order saga {} ended {}", event.saga_id, event.status);
///         Ok::<(), String>(())
///     },
/// )
/// .await?;
/// # following.shutdown().await;
/// # Ok(())
/// # }
/// ```
pub async fn follow_sagas<F, Fut, E>(
    client: async_nats::Client,
    durable: &str,
    saga: Option<&str>,
    kinds: &[LifecycleKind],
    handler: F,
) -> Result<Following, FollowError>
where
    F: Fn(LifecycleEvent) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let saga = match saga {
        Some(s) => Some(SagaName::new(s).map_err(|reason| FollowError::InvalidName {
            what: "saga name",
            value: quote(s),
            reason,
        })?),
        None => None,
    };
    // A terminal event is always its record's headline, so the server can filter on it;
    // other kinds may share a record with a more significant one. One filter subject only:
    // then it is part of the consumer-create request's subject, where NATS permissions can
    // confine a follower to the sagas it may follow.
    let terminal = |k: &LifecycleKind| {
        matches!(
            k,
            LifecycleKind::Completed
                | LifecycleKind::Compensated
                | LifecycleKind::Cancelled
                | LifecycleKind::Resolved
        )
    };
    let filter = match kinds {
        [kind] if terminal(kind) => subjects::log_filter(saga.as_ref(), Some(*kind)),
        _ => subjects::log_filter(saga.as_ref(), None),
    };
    let kinds = kinds.to_vec();
    let codec = Codec::default();
    let handler = Arc::new(handler);
    consume(
        client,
        subjects::LOG_STREAM,
        durable,
        filter,
        move |msg: &jetstream::Message| {
            codec.decode::<LogRecord>(&msg.payload).map_err(|e| e.to_string())
        },
        move |record: LogRecord| {
            let handler = handler.clone();
            let kinds = kinds.clone();
            async move {
                let snap = &record.snapshot;
                let at = record.timeline.last().map_or(snap.updated_at, |e| e.at);
                for note in &record.events {
                    if !kinds.is_empty() && !kinds.contains(&note.kind) {
                        continue;
                    }
                    handler(LifecycleEvent {
                        saga_id: snap.id.clone(),
                        saga: snap.saga.clone(),
                        kind: note.kind,
                        status: snap.status,
                        step: note.step.clone(),
                        // A saga's end says why it was undone: the cause it recorded.
                        reason: note.reason.clone().or_else(|| {
                            let undone = matches!(
                                note.kind,
                                LifecycleKind::Compensated | LifecycleKind::Cancelled
                            );
                            snap.cause.as_ref().filter(|_| undone).map(ToString::to_string)
                        }),
                        at,
                        input: snap.input.clone(),
                    })
                    .await?;
                }
                Ok::<(), E>(())
            }
        },
    )
    .await
}

/// Publishes a domain event (MessagePack, named fields) on `domain.<subject>`, durably, with
/// `id` as its deduplication id.
pub async fn publish_domain_event<T: Serialize + ?Sized>(
    client: &async_nats::Client,
    subject: &str,
    id: &str,
    event: &T,
) -> Result<(), FollowError> {
    publish(client, subject, id, None, event).await
}

/// Publishes a domain event as [`publish_domain_event`] does, tagged with the saga it belongs
/// to (header `Saga-Id`): the console and the admin service show it with that saga (e.g. an
/// event a step's handler publishes, with `cmd.saga_id`).
pub async fn publish_saga_event<T: Serialize + ?Sized>(
    client: &async_nats::Client,
    saga: &SagaId,
    subject: &str,
    id: &str,
    event: &T,
) -> Result<(), FollowError> {
    publish(client, subject, id, Some(saga), event).await
}

async fn publish<T: Serialize + ?Sized>(
    client: &async_nats::Client,
    subject: &str,
    id: &str,
    saga: Option<&SagaId>,
    event: &T,
) -> Result<(), FollowError> {
    let full = format!("domain.{subject}");
    let payload = rmp_serde::to_vec_named(event)
        .map_err(|e| FollowError::Encode { subject: full.clone(), detail: e.to_string() })?;
    let js = jetstream::new(client.clone());
    let mut msg =
        jetstream::message::PublishMessage::build().message_id(id).payload(payload.into());
    if let Some(saga) = saga {
        msg = msg.header(subjects::headers::SAGA_ID, saga.as_str());
    }
    js.send_publish(full, msg)
        .await
        .map_err(|e| FollowError::Nats(e.into()))?
        .await
        .map_err(|e| FollowError::Nats(e.into()))?;
    Ok(())
}

/// Consumes domain events on `domain.<filter>` (NATS wildcards allowed) with the durable
/// consumer `durable`, decoding each as `T`. An event that does not decode is dead-lettered
/// on `saga.dlq.<durable>` with the reason.
pub async fn follow_domain_events<T, F, Fut, E>(
    client: async_nats::Client,
    durable: &str,
    filter: &str,
    handler: F,
) -> Result<Following, FollowError>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let filter = format!("domain.{filter}");
    consume(
        client,
        DOMAIN_STREAM,
        durable,
        filter,
        |msg: &jetstream::Message| {
            saga_core::wire::decode_nested::<T>(&msg.payload)
                .map_err(|e| format!("domain event does not decode: {e}"))
        },
        handler,
    )
    .await
}

/// Runs `handled`, telling the server every third of [`ACK_WAIT`] that `msg` is still in
/// hand, so that a slow handler's message is not delivered again meanwhile.
async fn keep_while<T>(msg: &jetstream::Message, handled: impl Future<Output = T>) -> T {
    tokio::pin!(handled);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + ACK_WAIT / 3, ACK_WAIT / 3);
    loop {
        tokio::select! {
            out = &mut handled => return out,
            _ = tick.tick() => {
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        }
    }
}

/// Consumes `stream` with the durable consumer `durable` on `filter`: each message decoded
/// by `decode` (an error dead-letters it) and handed to `handler` (an error redelivers it
/// after a growing delay, and dead-letters it after [`MAX_DELIVERIES`]).
pub(crate) async fn consume<T, D, F, Fut, E>(
    client: async_nats::Client,
    stream: &str,
    durable: &str,
    filter: String,
    decode: D,
    handler: F,
) -> Result<Following, FollowError>
where
    T: Send + 'static,
    D: Fn(&jetstream::Message) -> Result<T, String> + Send + Sync + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    saga_core::check_token(durable).map_err(|reason| FollowError::InvalidName {
        what: "durable name",
        value: durable.to_owned(),
        reason,
    })?;
    let js = jetstream::new(client.clone());
    let config = jetstream::consumer::pull::Config {
        durable_name: Some(durable.to_owned()),
        filter_subject: filter,
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        ..Default::default()
    };
    ensure_consumer(&js, stream, config).await.map_err(|e| {
        let what = format!("creating the durable consumer {durable} on {stream}");
        FollowError::Nats(crate::connect::explain(&what, &format!("{stream}.{durable}"), e).into())
    })?;
    let consumer: PullConsumer = js
        .get_consumer_from_stream(durable, stream)
        .await
        .map_err(|e| FollowError::Nats(e.into()))?;
    let (shutdown, mut rx) = watch::channel(false);
    let durable = durable.to_owned();
    let handler = Arc::new(handler);
    let task = tokio::spawn(async move {
        'outer: loop {
            let mut messages =
                match consumer.stream().max_messages_per_batch(FETCH_AHEAD).messages().await {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(%durable, error = %e, "cannot pull events; retrying in 1s");
                        tokio::select! {
                            _ = rx.changed() => break,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                };
            loop {
                let msg = tokio::select! {
                    _ = rx.changed() => break 'outer,
                    m = messages.next() => match m {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => { warn!(%durable, error = %e, "error while pulling events"); continue; }
                        None => continue 'outer,
                    },
                };
                match decode(&msg) {
                    Ok(event) => match keep_while(&msg, handler(event)).await {
                        Ok(()) => {
                            let _ = msg.ack().await;
                        }
                        Err(e) => {
                            let delivered = msg.info().map_or(1, |i| i.delivered);
                            if delivered >= MAX_DELIVERIES {
                                let reason = format!("event handler failed {delivered} times: {e}");
                                warn!(%durable, subject = %msg.subject, reason = %quote(&reason), "dead-lettering event");
                                if crate::deliver::dead_letter(&js, &durable, &msg.message, &reason)
                                    .await
                                    .is_ok()
                                {
                                    let _ = msg.ack_with(AckKind::Term).await;
                                }
                            } else {
                                let delay = crate::deliver::redelivery_delay(delivered);
                                warn!(%durable, error = %quote(&e.to_string()), ?delay, "event handler failed; redelivering");
                                let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
                            }
                        }
                    },
                    Err(reason) => {
                        warn!(%durable, subject = %quote(&msg.subject), reason = %quote(&reason), "dead-lettering event");
                        if crate::deliver::dead_letter(&js, &durable, &msg.message, &reason)
                            .await
                            .is_ok()
                        {
                            let _ = msg.ack_with(AckKind::Term).await;
                        }
                    }
                }
            }
        }
        info!(%durable, "follower stopped");
    });
    Ok(Following { shutdown, task })
}
