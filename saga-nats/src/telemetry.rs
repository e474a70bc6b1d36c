//! W3C trace context carried in NATS headers.
//!
//! The client starts a trace for each saga (or continues the caller's), the coordinator keeps
//! it with the saga and sends it on every command as the parent, and participants pass it to
//! their handlers' spans and back on their replies. One saga is one trace: every span carries
//! `trace_id`, and any OpenTelemetry pipeline that reads `traceparent` joins them.

use uuid::Uuid;

/// A new `traceparent` with a random trace id and span id, sampled.
pub fn new_traceparent() -> String {
    let trace = Uuid::new_v4().simple().to_string();
    let span = &Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
}

/// The trace id of a well-formed `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(version, 2) && hex(trace, 32) && hex(span, 16) && hex(flags, 2) && parts.next().is_none())
        .then_some(trace)
}

/// A child of `traceparent`: the same trace, a new span id. A malformed parent starts a new
/// trace.
pub fn child(traceparent: &str) -> String {
    match trace_id(traceparent) {
        Some(trace) => {
            let span = &Uuid::new_v4().simple().to_string()[..16];
            let flags = &traceparent[traceparent.len() - 2..];
            format!("00-{trace}-{span}-{flags}")
        }
        None => new_traceparent(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents() {
        let tp = new_traceparent();
        let trace = trace_id(&tp).expect("well formed").to_owned();
        let c = child(&tp);
        assert_eq!(trace_id(&c), Some(trace.as_str()));
        assert_ne!(c, tp);
        assert_eq!(trace_id("garbage"), None);
        assert!(trace_id(&child("garbage")).is_some());
    }
}
