//! Listing and counting sagas without reading every saga: the streams are the index.
//!
//! - A **live** saga (running, compensating, needing intervention) is exactly a start waiting
//!   in `SAGA_IN` (`saga.in.<id>.<saga>.start`), in the order the starts were accepted: the
//!   coordinator holds each start until its saga ends.
//! - A **finished** saga has a terminal record in `SAGA_LOG`
//!   (`saga.log.<id>.<saga>.<completed|compensated|cancelled|resolved>`) holding its final
//!   snapshot, in the order the sagas ended.
//! - A saga that **needs intervention** has a `saga.log.<id>.<saga>.needs_intervention`
//!   record; it is listed at its newest one, if it is still parked.
//!
//! The server keeps a subject index of every stream, so a page walks those subjects from a
//! cursor (a stream sequence) with direct gets (`next_by_subj`), and reads only the newest
//! record of the live sagas it looks at. Nothing is written to keep this index: listing
//! costs the hot path nothing. A page looks at no more than [`MAX_SCAN`] subjects; when a
//! narrow filter leaves it short, its `next` cursor says where to go on.

use async_nats::jetstream::{self, message::StreamMessage};
use futures::TryStreamExt;
use saga_core::{SagaId, SagaName, SagaSnapshot, SagaStatus, StepName, StepStatus, Timestamp};
use serde::{Deserialize, Serialize};

use crate::store::{SagaLog, StoreError};
use crate::subjects;

/// The most sagas one page may hold.
pub const MAX_PAGE: usize = 500;

/// The most subjects one page looks at.
pub const MAX_SCAN: usize = 2_000;

/// Which sagas a listing is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Which {
    /// Every live saga: running, compensating or needing intervention (the default).
    #[default]
    Live,
    /// Every finished saga, within the retention.
    Finished,
    /// One status.
    #[serde(untagged)]
    Status(SagaStatus),
}

impl Which {
    /// Parses `live`, `finished` or a status (`needs_intervention`, also `parked`).
    pub fn parse(s: &str) -> Option<Which> {
        match s {
            "live" => Some(Which::Live),
            "finished" => Some(Which::Finished),
            "parked" => Some(Which::Status(SagaStatus::NeedsIntervention)),
            _ => SagaStatus::ALL
                .into_iter()
                .find(|st| st.as_str() == s && *st != SagaStatus::New)
                .map(Which::Status),
        }
    }

    fn admits(self, status: SagaStatus) -> bool {
        match self {
            Which::Live => !status.is_terminal() && status != SagaStatus::New,
            Which::Finished => status.is_terminal(),
            Which::Status(s) => s == status,
        }
    }
}

/// A request for one page of sagas of one definition.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListRequest {
    /// Which sagas (default: live).
    #[serde(default)]
    pub status: Which,
    /// Only sagas whose current step (live) or failed step (compensated) is this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepName>,
    /// Only sagas started at or after this time (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// Only sagas started before this time (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
    /// How many sagas at most (default 50, at most [`MAX_PAGE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Where the previous page stopped (its `next`); none: from the beginning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<u64>,
}

/// One saga in a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaSummary {
    /// The saga id.
    pub id: SagaId,
    /// Its definition.
    pub saga: SagaName,
    /// The definition version it runs.
    pub digest: String,
    /// Where it is (`running` too for a saga whose first step is under way and nothing is
    /// logged yet).
    pub status: SagaStatus,
    /// The step in progress (live), or the step whose failure made it compensate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepName>,
    /// Why it compensates, was cancelled, or is parked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it started (ms since the epoch).
    pub started_at: Timestamp,
    /// When it last changed (ms since the epoch).
    pub updated_at: Timestamp,
}

impl SagaSummary {
    /// The summary of a snapshot.
    pub fn of(snap: &SagaSnapshot) -> SagaSummary {
        let current = snap.steps.iter().find(|s| {
            matches!(
                s.status,
                StepStatus::Running
                    | StepStatus::RetryWait
                    | StepStatus::Compensating
                    | StepStatus::CompensationRetryWait
                    | StepStatus::CompensationStuck
            )
        });
        let (cause_step, cause_reason) = match &snap.cause {
            Some(saga_core::Cause::StepFailed { step, reason }) => {
                (Some(step.clone()), Some(reason.clone()))
            }
            Some(saga_core::Cause::Cancelled { reason }) => (None, Some(reason.clone())),
            None => (None, None),
        };
        let stuck = snap.steps.iter().find(|s| s.status == StepStatus::CompensationStuck);
        let reason = match stuck {
            Some(s) if snap.status == SagaStatus::NeedsIntervention => {
                s.last_error.clone().or(cause_reason)
            }
            _ => cause_reason,
        };
        SagaSummary {
            id: snap.id.clone(),
            saga: snap.saga.clone(),
            digest: snap.digest.clone(),
            status: snap.status,
            step: if snap.status.is_terminal() {
                cause_step
            } else {
                current.map(|s| s.name.clone()).or(cause_step)
            },
            reason,
            started_at: snap.started_at,
            updated_at: snap.updated_at,
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListPage {
    /// The sagas, in the order their subjects were written (starts accepted, sagas ended).
    pub sagas: Vec<SagaSummary>,
    /// Pass as `cursor` for the next page; none when the listing reached the end.
    pub next: Option<u64>,
}

/// Counts of one definition's sagas, from the streams.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SagaCounts {
    /// The definition.
    pub saga: String,
    /// Live sagas (their starts waiting in `SAGA_IN`).
    pub in_flight: u64,
    /// When the oldest live saga was accepted (ms since the epoch), if any is live.
    pub oldest_in_flight_at: Option<Timestamp>,
    /// Sagas needing intervention now.
    pub parked: u64,
    /// Finished sagas within the retention, by terminal status.
    pub finished: std::collections::BTreeMap<String, u64>,
    /// Messages in the dead-letter stream (every component's).
    pub dead_letters: u64,
}

fn nats(id: &str, e: impl Into<async_nats::Error>) -> StoreError {
    StoreError::Nats { id: SagaId::from(id), source: e.into() }
}

impl SagaLog {
    /// One page of the sagas of definition `saga` that `request` asks for.
    pub async fn list(
        &self,
        saga: &SagaName,
        request: &ListRequest,
    ) -> Result<ListPage, StoreError> {
        let limit = request.limit.unwrap_or(50).clamp(1, MAX_PAGE);
        let mut page = ListPage::default();
        let keep = |s: &SagaSummary| {
            request.status.admits(s.status)
                && request.step.as_ref().is_none_or(|step| s.step.as_ref() == Some(step))
                && request.since.is_none_or(|t| s.started_at >= t)
                && request.until.is_none_or(|t| s.started_at < t)
        };
        let filters: Vec<String> = match request.status {
            Which::Live | Which::Status(SagaStatus::Running | SagaStatus::Compensating) => {
                vec![format!("saga.in.*.{saga}.start")]
            }
            Which::Status(SagaStatus::NeedsIntervention) => {
                vec![format!("saga.log.*.{saga}.needs_intervention")]
            }
            Which::Finished => SagaStatus::ALL
                .into_iter()
                .filter(|s| s.is_terminal())
                .map(|s| format!("saga.log.*.{saga}.{s}"))
                .collect(),
            Which::Status(s) if s.is_terminal() => vec![format!("saga.log.*.{saga}.{s}")],
            Which::Status(_) => return Ok(page),
        };
        let live = filters[0].starts_with("saga.in.");
        let stream = if live { &self.inputs } else { &self.log };
        let mut scan = Merged::new(stream, filters, request.cursor.unwrap_or(0));
        for _ in 0..MAX_SCAN {
            let Some(msg) = scan.next().await.map_err(|e| nats(saga.as_str(), e))? else {
                return Ok(page);
            };
            let summary = if live {
                self.live_summary(&msg).await?
            } else if request.status == Which::Status(SagaStatus::NeedsIntervention) {
                self.parked_summary(&msg).await?
            } else {
                self.finished_summary(&msg)
            };
            if let Some(summary) = summary.filter(keep) {
                page.sagas.push(summary);
            }
            page.next = Some(msg.sequence);
            if page.sagas.len() >= limit {
                return Ok(page);
            }
        }
        Ok(page)
    }

    /// A live saga, from its waiting start and its newest record.
    async fn live_summary(&self, msg: &StreamMessage) -> Result<Option<SagaSummary>, StoreError> {
        let Some(input) = subjects::parse_input(&msg.subject) else { return Ok(None) };
        if let Some(v) = self.load_in(&input.id, Some(&input.saga)).await? {
            return Ok(Some(SagaSummary::of(&v.record.snapshot)));
        }
        // Accepted, nothing logged yet: its first steps are under way.
        let Ok(start) = self.codec().decode::<saga_core::wire::StartMessage>(&msg.payload) else {
            return Ok(None);
        };
        let at = millis(msg);
        Ok(Some(SagaSummary {
            id: input.id,
            saga: input.saga,
            digest: start.digest,
            status: SagaStatus::Running,
            step: None,
            reason: None,
            started_at: at,
            updated_at: at,
        }))
    }

    /// A saga at a `needs_intervention` record: listed if that record is its newest parking
    /// and it is still parked.
    async fn parked_summary(&self, msg: &StreamMessage) -> Result<Option<SagaSummary>, StoreError> {
        let Some((id, saga, _)) = subjects::parse_log(&msg.subject) else { return Ok(None) };
        let newest_parking = match self.log.direct_get_last_for_subject(msg.subject.as_str()).await
        {
            Ok(m) => m.sequence,
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(nats(id.as_str(), e)),
        };
        if newest_parking != msg.sequence {
            return Ok(None);
        }
        Ok(self.load_in(&id, Some(&saga)).await?.map(|v| SagaSummary::of(&v.record.snapshot)))
    }

    /// A finished saga, from its terminal record.
    fn finished_summary(&self, msg: &StreamMessage) -> Option<SagaSummary> {
        let (id, _, _) = subjects::parse_log(&msg.subject)?;
        let record = self.decode(&id, &msg.payload).ok()?;
        Some(SagaSummary::of(&record.snapshot))
    }

    /// How many of the first `max` live sagas of definition `saga` run each version (by
    /// digest), from their waiting starts.
    pub async fn live_by_digest(
        &self,
        saga: &SagaName,
        max: usize,
    ) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        let mut counts = std::collections::BTreeMap::new();
        let mut scan = Merged::new(&self.inputs, vec![format!("saga.in.*.{saga}.start")], 0);
        for _ in 0..max {
            let Some(msg) = scan.next().await.map_err(|e| nats(saga.as_str(), e))? else { break };
            if let Ok(start) = self.codec().decode::<saga_core::wire::StartMessage>(&msg.payload) {
                *counts.entry(start.digest).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// Counts of definition `saga`'s sagas. Reads subject counts, not sagas, except the newest
    /// record of each saga that was ever parked.
    pub async fn counts(&self, saga: &SagaName) -> Result<SagaCounts, StoreError> {
        let err = |e: async_nats::Error| nats(saga.as_str(), e);
        let mut counts = SagaCounts { saga: saga.to_string(), ..SagaCounts::default() };
        let live = format!("saga.in.*.{saga}.start");
        counts.in_flight = subject_count(&self.inputs, &live).await.map_err(err)?;
        if counts.in_flight > 0 {
            match self.inputs.direct_get_next_for_subject(live.as_str(), None).await {
                Ok(m) => counts.oldest_in_flight_at = Some(millis(&m)),
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {}
                Err(e) => return Err(err(e.into())),
            }
        }
        for status in SagaStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            let filter = format!("saga.log.*.{saga}.{status}");
            let n = subject_count(&self.log, &filter).await.map_err(err)?;
            counts.finished.insert(status.to_string(), n);
        }
        let mut parked = self
            .log
            .clone()
            .info_with_subjects(format!("saga.log.*.{saga}.needs_intervention"))
            .await
            .map_err(|e| err(e.into()))?;
        let mut ids = Vec::new();
        while let Some((subject, _)) = parked.try_next().await.map_err(|e| err(e.into()))? {
            if let Some((id, _, _)) = subjects::parse_log(&subject) {
                ids.push(id);
            }
        }
        for id in ids {
            if let Some(v) = self.load_in(&id, Some(saga)).await? {
                counts.parked +=
                    u64::from(v.record.snapshot.status == SagaStatus::NeedsIntervention);
            }
        }
        let mut dlq =
            self.js().get_stream(subjects::DLQ_STREAM).await.map_err(|e| err(e.into()))?;
        counts.dead_letters = dlq.info().await.map_err(|e| err(e.into()))?.state.messages;
        Ok(counts)
    }
}

/// How many distinct subjects of `stream` match `filter`.
async fn subject_count(
    stream: &jetstream::stream::Stream<()>,
    filter: &str,
) -> Result<u64, async_nats::Error> {
    let mut info = stream.clone().info_with_subjects(filter).await?;
    let mut n = 0;
    while info.try_next().await?.is_some() {
        n += 1;
    }
    Ok(n)
}

/// When the stream stored `msg`.
fn millis(msg: &StreamMessage) -> Timestamp {
    crate::deliver::millis(msg.time)
}

/// The messages of a stream matching any of several filters, in stream order, from a
/// sequence on: one direct get per filter ahead, then one per message.
struct Merged<'a> {
    stream: &'a jetstream::stream::Stream<()>,
    heads: Vec<(String, Option<StreamMessage>, bool)>,
    after: u64,
}

impl<'a> Merged<'a> {
    fn new(stream: &'a jetstream::stream::Stream<()>, filters: Vec<String>, after: u64) -> Self {
        Merged { stream, heads: filters.into_iter().map(|f| (f, None, false)).collect(), after }
    }

    async fn next(&mut self) -> Result<Option<StreamMessage>, async_nats::Error> {
        for (filter, head, done) in &mut self.heads {
            if head.is_none() && !*done {
                match self
                    .stream
                    .direct_get_next_for_subject(filter.as_str(), Some(self.after + 1))
                    .await
                {
                    Ok(m) => *head = Some(m),
                    Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                        *done = true
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let first = self
            .heads
            .iter_mut()
            .filter(|(_, head, _)| head.is_some())
            .min_by_key(|(_, head, _)| head.as_ref().map(|m| m.sequence));
        let Some((_, head, _)) = first else { return Ok(None) };
        let msg = head.take().expect("filtered on some");
        self.after = msg.sequence;
        Ok(Some(msg))
    }
}

/// A domain event that carries a saga's id (header `Saga-Id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaDomainEvent {
    /// Its sequence in `DOMAIN_EVENTS`.
    pub seq: u64,
    /// Its subject (`domain.…`).
    pub subject: String,
    /// When it was stored (ms since the epoch).
    pub at: Timestamp,
    /// Its body as JSON, when it is MessagePack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
}

/// The domain events found for one saga.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SagaDomainEvents {
    /// The events tagged with the saga's id, oldest first.
    pub events: Vec<SagaDomainEvent>,
    /// How many domain events were looked at (those stored from the saga's start on).
    pub scanned: u64,
    /// Whether every domain event up to the saga's end (or now) was looked at.
    pub complete: bool,
}

/// The most domain events one request looks at.
pub const MAX_DOMAIN_SCAN: u64 = 10_000;

impl SagaLog {
    /// The domain events tagged with saga `id`, among those stored between `from` and `to`
    /// (ms since the epoch): the saga's life. Reads `DOMAIN_EVENTS` from `from` on with an
    /// ordered consumer, at most [`MAX_DOMAIN_SCAN`] events.
    pub async fn domain_events(
        &self,
        id: &SagaId,
        from: Timestamp,
        to: Timestamp,
    ) -> Result<SagaDomainEvents, StoreError> {
        use futures::StreamExt;
        let err = |e: async_nats::Error| StoreError::Nats { id: id.clone(), source: e };
        let mut out = SagaDomainEvents::default();
        // Provisioned with the other saga streams.
        let stream =
            self.js().get_stream(subjects::DOMAIN_STREAM).await.map_err(|e| err(e.into()))?;
        let start = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(from.0) * 1_000_000)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartTime {
                    start_time: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| err(e.into()))?;
        let mut consumer = consumer;
        let pending = consumer.info().await.map_err(|e| err(e.into()))?.num_pending;
        if pending == 0 {
            out.complete = true;
            return Ok(out);
        }
        let mut messages = consumer.messages().await.map_err(|e| err(e.into()))?;
        while out.scanned < pending.min(MAX_DOMAIN_SCAN) {
            let next =
                tokio::time::timeout(std::time::Duration::from_secs(5), messages.next()).await;
            let Ok(Some(Ok(msg))) = next else { break };
            out.scanned += 1;
            let Ok(info) = msg.info() else { continue };
            let at = crate::deliver::millis(info.published);
            if at > to {
                out.complete = true;
                break;
            }
            let tagged = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(subjects::headers::SAGA_ID))
                .is_some_and(|v| v.as_str() == id.as_str());
            if tagged {
                out.events.push(SagaDomainEvent {
                    seq: info.stream_sequence,
                    subject: msg.subject.to_string(),
                    at,
                    body: crate::dlq::msgpack_json(&msg.payload),
                });
            }
        }
        out.complete |= out.scanned >= pending;
        Ok(out)
    }
}
