//! Choreography helpers: follow saga lifecycle events, and publish and consume domain events,
//! durably. A follower is a durable consumer: one that is down catches up when it returns,
//! and instances that share a durable name share the work.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, AckKind};
use futures::StreamExt;
use saga_core::envelope::LifecycleMessage;
use saga_core::{Codec, LifecycleKind, SagaName};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::provision::ensure_consumer;
use crate::subjects;

/// The stream of domain events (`domain.>`), for [`publish_domain_event`] and
/// [`follow_domain_events`].
pub const DOMAIN_STREAM: &str = "DOMAIN_EVENTS";

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
/// `saga` (or of every saga) whose kind is in `kinds` (or any kind). The handler's `Err`
/// redelivers the event after a second.
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
    F: Fn(LifecycleMessage) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let saga = match saga {
        Some(s) => Some(SagaName::new(s).map_err(|reason| FollowError::InvalidName {
            what: "saga name",
            value: s.to_owned(),
            reason,
        })?),
        None => None,
    };
    let filters: Vec<String> = if kinds.is_empty() {
        vec![subjects::events_filter(saga.as_ref(), None)]
    } else {
        kinds.iter().map(|k| subjects::events_filter(saga.as_ref(), Some(*k))).collect()
    };
    let codec = Codec::default();
    consume(
        client,
        subjects::EVENT_STREAM,
        durable,
        filters,
        move |bytes: &[u8]| codec.decode::<LifecycleMessage>(bytes).map_err(|e| e.to_string()),
        handler,
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
    let full = format!("domain.{subject}");
    let payload = rmp_serde::to_vec_named(event)
        .map_err(|e| FollowError::Encode { subject: full.clone(), detail: e.to_string() })?;
    let js = jetstream::new(client.clone());
    let msg = jetstream::message::PublishMessage::build().message_id(id).payload(payload.into());
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
    let filters = vec![format!("domain.{filter}")];
    consume(
        client,
        DOMAIN_STREAM,
        durable,
        filters,
        |bytes: &[u8]| {
            rmp_serde::from_slice::<T>(bytes)
                .map_err(|e| format!("domain event does not decode: {e}"))
        },
        handler,
    )
    .await
}

async fn consume<T, D, F, Fut, E>(
    client: async_nats::Client,
    stream: &str,
    durable: &str,
    filters: Vec<String>,
    decode: D,
    handler: F,
) -> Result<Following, FollowError>
where
    T: Send + 'static,
    D: Fn(&[u8]) -> Result<T, String> + Send + Sync + 'static,
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
        filter_subjects: filters,
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        ..Default::default()
    };
    ensure_consumer(&js, stream, config).await.map_err(FollowError::Nats)?;
    let consumer: PullConsumer = js
        .get_consumer_from_stream(durable, stream)
        .await
        .map_err(|e| FollowError::Nats(e.into()))?;
    let (shutdown, mut rx) = watch::channel(false);
    let durable = durable.to_owned();
    let handler = Arc::new(handler);
    let task = tokio::spawn(async move {
        'outer: loop {
            let mut messages = match consumer.messages().await {
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
                match decode(&msg.payload) {
                    Ok(event) => match handler(event).await {
                        Ok(()) => {
                            let _ = msg.ack().await;
                        }
                        Err(e) => {
                            warn!(%durable, error = %e, "event handler failed; redelivering in 1s");
                            let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                        }
                    },
                    Err(reason) => {
                        warn!(%durable, subject = %msg.subject, %reason, "dead-lettering event");
                        if crate::coordinator::dead_letter(&js, &durable, &msg.message, &reason)
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
