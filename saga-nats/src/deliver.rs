//! What every consumer shares: dead letters, redelivery delays and the clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use async_nats::HeaderMap;
use saga_core::Timestamp;

use crate::subjects::{self, headers};

/// The time now, for the state machine.
pub(crate) fn now() -> Timestamp {
    Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64))
}

/// A time the server stamped (a stored message's, a delivery's publish time) in ms since the
/// epoch; 0 for one before the epoch.
pub(crate) fn millis(t: time::OffsetDateTime) -> Timestamp {
    Timestamp(u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
}

/// The delay before an input that could not be handled is delivered again: 250 ms doubling
/// per delivery, at most 30 s.
pub(crate) fn redelivery_delay(delivered: i64) -> Duration {
    let exp = delivered.clamp(1, 8) as u32 - 1;
    (Duration::from_millis(250) * 2u32.pow(exp)).min(Duration::from_secs(30))
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
    headers.insert(headers::DLQ_SUBJECT, sanitize_header(&msg.subject).as_str());
    js.publish_with_headers(subjects::dlq(component), headers, msg.payload.clone()).await?.await?;
    crate::observe::dead_lettered(component);
    Ok(())
}

/// A header value: control characters replaced, at most 1,000 characters.
fn sanitize_header(s: &str) -> String {
    s.chars().take(1000).map(|c| if c.is_control() { ' ' } else { c }).collect()
}
