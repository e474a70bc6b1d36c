//! The dead-letter stream, for operators: list, show, re-drive and discard.
//!
//! Every component dead-letters what it cannot handle on `saga.dlq.<component>`, with the
//! reason in `Saga-Dlq-Reason` and the subject it arrived on in `Saga-Dlq-Subject`
//! (docs/PROTOCOL.md §10). Only coordinator inputs (starts and operator actions, on
//! `saga.in.…`) can be re-driven: the coordinator re-sends commands by itself, and a reply
//! or a command dead-lettered is stale by the time anyone looks at it.

use async_nats::jetstream::{self, message::StreamMessage};
use serde::{Deserialize, Serialize};

use crate::subjects::{self, headers};

/// The most dead letters one page may hold.
pub const MAX_PAGE: usize = 200;

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its sequence in `SAGA_DLQ`: what `show`, `redrive` and `discard` take.
    pub seq: u64,
    /// The component that dead-lettered it (`coordinator`, or a participant service).
    pub component: String,
    /// The subject it arrived on.
    pub subject: String,
    /// Why it was dead-lettered.
    pub reason: String,
    /// When (ms since the epoch).
    pub at: saga_core::Timestamp,
    /// Its size in bytes.
    pub size: usize,
    /// Its body as JSON, when it is MessagePack (`show` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
}

/// A request for one page of dead letters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DlqListRequest {
    /// Only those of this component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// How many at most (default 50, at most [`MAX_PAGE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Where the previous page stopped (its `next`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<u64>,
}

/// One page of dead letters, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DlqPage {
    /// The dead letters.
    pub letters: Vec<DeadLetter>,
    /// Pass as `cursor` for the next page; none at the end.
    pub next: Option<u64>,
}

/// A request naming one dead letter.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DlqRef {
    /// Its sequence in `SAGA_DLQ`.
    pub seq: u64,
}

/// What a re-drive did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redriven {
    /// The subject the message was published to again.
    pub subject: String,
    /// Its new sequence in `SAGA_IN`.
    pub seq: u64,
}

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DlqError {
    /// No dead letter has that sequence (never, or discarded).
    #[error("no dead letter {0}")]
    NotFound(u64),
    /// The request asks for something that cannot be done, and why.
    #[error("{0}")]
    Refused(String),
    /// NATS failed.
    #[error("NATS error: {0}")]
    Nats(async_nats::Error),
}

fn nats(e: impl Into<async_nats::Error>) -> DlqError {
    DlqError::Nats(e.into())
}

/// The dead-letter stream.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    js: jetstream::Context,
    stream: jetstream::stream::Stream<()>,
}

impl DeadLetters {
    /// Opens `SAGA_DLQ` (provisioned by the coordinator).
    pub async fn open(js: jetstream::Context) -> Result<DeadLetters, async_nats::Error> {
        let stream = js.get_stream_no_info(subjects::DLQ_STREAM).await?;
        Ok(DeadLetters { js, stream })
    }

    /// One page of dead letters, oldest first.
    pub async fn list(&self, request: &DlqListRequest) -> Result<DlqPage, DlqError> {
        let limit = request.limit.unwrap_or(50).clamp(1, MAX_PAGE);
        let filter = match &request.component {
            Some(c) => {
                saga_core::check_token(c).map_err(|e| {
                    DlqError::Refused(format!("component {} {e}", saga_core::wire::quote(c)))
                })?;
                subjects::dlq(c)
            }
            None => subjects::dlq("*"),
        };
        let mut page = DlqPage::default();
        let mut after = request.cursor.unwrap_or(0);
        while page.letters.len() < limit {
            match self.stream.direct_get_next_for_subject(filter.as_str(), Some(after + 1)).await {
                Ok(msg) => {
                    after = msg.sequence;
                    page.letters.push(letter(&msg, false));
                }
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                    return Ok(page)
                }
                Err(e) => return Err(nats(e)),
            }
        }
        page.next = Some(after);
        Ok(page)
    }

    /// One dead letter, with its body.
    pub async fn show(&self, seq: u64) -> Result<DeadLetter, DlqError> {
        Ok(letter(&self.get(seq).await?, true))
    }

    async fn get(&self, seq: u64) -> Result<StreamMessage, DlqError> {
        match self.stream.direct_get(seq).await {
            Ok(msg) if msg.subject.starts_with("saga.dlq.") => Ok(msg),
            Ok(_) => Err(DlqError::NotFound(seq)),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                Err(DlqError::NotFound(seq))
            }
            Err(e) => Err(nats(e)),
        }
    }

    /// Publishes a dead-lettered coordinator input to its subject again, then discards the
    /// dead letter. Refused for anything else, and while a start of that saga is waiting.
    pub async fn redrive(&self, seq: u64) -> Result<Redriven, DlqError> {
        let msg = self.get(seq).await?;
        let original = header(&msg, headers::DLQ_SUBJECT);
        let Some(input) = subjects::parse_input(&original) else {
            return Err(DlqError::Refused(format!(
                "dead letter {seq} arrived on {}: only coordinator inputs (saga.in.…) can be re-driven; the coordinator re-sends commands by itself, and a dead-lettered reply is stale",
                saga_core::wire::quote(&original)
            )));
        };
        let mut publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(msg.payload.clone())
            .header(headers::SAGA_ID, input.id.as_str());
        if input.kind == subjects::InputKind::Start {
            publish = publish.expected_last_subject_sequence(0);
        }
        let ack = self.js.send_publish(original.clone(), publish).await.map_err(nats)?.await;
        let ack = match ack {
            Ok(ack) => ack,
            // Error 10071 (a start expects no message on its subject) or 10077 (the stream
            // holds one message per subject): an input of that saga is waiting.
            Err(e)
                if crate::store::is_conflict(&e)
                    || e.to_string().contains("maximum messages per subject") =>
            {
                return Err(DlqError::Refused(format!(
                    "saga {} already has an input waiting on {original}: re-drive it once that one is handled",
                    input.id
                )))
            }
            Err(e) => return Err(nats(e)),
        };
        self.discard(seq).await?;
        Ok(Redriven { subject: original, seq: ack.sequence })
    }

    /// Deletes a dead letter.
    pub async fn discard(&self, seq: u64) -> Result<(), DlqError> {
        self.get(seq).await?;
        self.stream.delete_message(seq).await.map_err(nats)?;
        Ok(())
    }
}

fn header(msg: &StreamMessage, name: &str) -> String {
    msg.headers.get(name).map(|v| v.as_str().to_owned()).unwrap_or_default()
}

fn letter(msg: &StreamMessage, with_body: bool) -> DeadLetter {
    DeadLetter {
        seq: msg.sequence,
        component: msg.subject.strip_prefix("saga.dlq.").unwrap_or_default().to_owned(),
        subject: header(msg, headers::DLQ_SUBJECT),
        reason: header(msg, headers::DLQ_REASON),
        at: crate::deliver::millis(msg.time),
        size: msg.payload.len(),
        body: with_body.then(|| msgpack_json(&msg.payload)).flatten(),
    }
}

/// MessagePack as JSON, for people: maps, arrays and scalars as they are; a binary value
/// (a saga's input or output inside a message) as the JSON of the MessagePack it holds, or as
/// `"<N bytes>"` when it holds something else. `None` when `bytes` is not MessagePack, or
/// nests deeper than [`saga_core::wire::MAX_NESTING`] (what is shown comes from anyone on
/// the bus: a dead letter, a saga's input).
pub fn msgpack_json(bytes: &[u8]) -> Option<serde_json::Value> {
    decode_json(bytes, MAX_BINARY_NESTING)
}

/// How many binaries within binaries are shown as the MessagePack they hold (a dead letter,
/// the saga input inside it, and one more); deeper ones read `"<N bytes>"`, so the nesting
/// limit of each decode bounds them all.
const MAX_BINARY_NESTING: u8 = 3;

fn decode_json(bytes: &[u8], binaries: u8) -> Option<serde_json::Value> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(saga_core::wire::MAX_NESTING);
    serde::de::DeserializeSeed::deserialize(Json { binaries }, &mut de).ok()
}

/// Reads one MessagePack value as JSON; binaries within it are decoded while `binaries` is
/// above 0.
#[derive(Clone, Copy)]
struct Json {
    binaries: u8,
}

impl<'de> serde::de::DeserializeSeed<'de> for Json {
    type Value = serde_json::Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Json {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any MessagePack value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Self::Value, E> {
        let inner = (self.binaries > 0 && !v.is_empty())
            .then(|| decode_json(v, self.binaries - 1))
            .flatten();
        Ok(inner.unwrap_or_else(|| format!("<{} bytes>", v.len()).into()))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self)? {
            out.push(v);
        }
        Ok(out.into())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some((k, v)) = map.next_entry_seed(self, self)? {
            let key = match k {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            out.insert(key, v);
        }
        Ok(out.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messagepack_becomes_json_with_nested_payloads_decoded() {
        #[derive(Serialize)]
        struct Msg {
            saga: &'static str,
            n: i32,
            input: serde_bytes::ByteBuf,
            junk: serde_bytes::ByteBuf,
        }
        let input = rmp_serde::to_vec_named(&serde_json::json!({"id": "o-1", "qty": 2})).unwrap();
        let msg = Msg {
            saga: "s",
            n: -3,
            input: serde_bytes::ByteBuf::from(input),
            junk: serde_bytes::ByteBuf::from(vec![0xc1]),
        };
        let json = msgpack_json(&rmp_serde::to_vec_named(&msg).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"saga": "s", "n": -3, "input": {"id": "o-1", "qty": 2}, "junk": "<1 bytes>"})
        );
        assert_eq!(msgpack_json(&[0xc1]), None, "0xc1 is never MessagePack");
    }

    /// `[[[…nil…]]]`, nested `depth` deep.
    fn nested(depth: usize) -> Vec<u8> {
        std::iter::repeat_n(0x91, depth).chain([0xc0]).collect()
    }

    #[test]
    fn hostile_nesting_is_refused_not_followed_down_the_stack() {
        assert!(msgpack_json(&nested(saga_core::wire::MAX_NESTING - 2)).is_some());
        assert_eq!(msgpack_json(&nested(100_000)), None);
        // A binary holding a binary holding a binary …, 10,000 deep: each is a fresh decode,
        // so only the first few are opened.
        let mut bytes = rmp_serde::to_vec(&"end").unwrap();
        for _ in 0..10_000 {
            bytes = rmp_serde::to_vec(&serde_bytes::ByteBuf::from(bytes)).unwrap();
        }
        let json = msgpack_json(&bytes).expect("the outer layers decode");
        let shown = json.as_str().unwrap_or_default();
        assert!(shown.starts_with('<') && shown.ends_with(" bytes>"), "{json}");
    }
}
