//! OpenTelemetry spans of sagas: one trace per saga, exported over OTLP when configured.
//!
//! - The coordinator exports, for each saga, a root span `saga <name>` (its trace id and span
//!   id are those of the saga's `traceparent`, which the client made at the start) covering
//!   the saga from its start to its end, with its lifecycle events as span events; and a span
//!   per step attempt (`step <step>`, `compensate <step>`), child of the root, from the
//!   command's dispatch to its outcome. An attempt's span id is derived from its command id,
//!   so every replica (after a take-over too) and every re-send of the attempt names the same
//!   span, and the command's `traceparent` carries it.
//! - The participant SDK exports a span per handler run (`handle <service>.<command>`), child
//!   of the attempt's span, and passes its own `traceparent` to the handler and on the reply.
//!
//! Nothing is exported until a span processor is installed: [`init_otlp`] (feature `otlp`)
//! installs the OTLP exporter when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) variable is set, or [`set_processor`] installs any
//! [`SpanProcessor`]. The spans are built from what the coordinator and the SDK already
//! measure, with their real start and end times, so nothing waits on tracing.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks, SpanProcessor};
use saga_core::Timestamp;
use sha2::Digest;

static PROCESSOR: OnceLock<Box<dyn SpanProcessor>> = OnceLock::new();

/// Installs the processor every saga span goes to (once per process; `false` if one was
/// installed already).
pub fn set_processor(processor: impl SpanProcessor + 'static) -> bool {
    PROCESSOR.set(Box::new(processor)).is_ok()
}

/// Whether spans are exported.
pub fn enabled() -> bool {
    PROCESSOR.get().is_some()
}

/// Exports what is buffered and stops exporting: call before the process exits.
pub fn shutdown() {
    if let Some(p) = PROCESSOR.get() {
        let _ = p.force_flush();
        let _ = p.shutdown();
    }
}

/// Installs the OTLP exporter (HTTP, protobuf) if the environment asks for it: when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set and
/// `OTEL_TRACES_EXPORTER` is not `none`. The service name is `OTEL_SERVICE_NAME`, else
/// `service`; `OTEL_RESOURCE_ATTRIBUTES` and the batch settings (`OTEL_BSP_*`) apply as usual.
/// Returns whether it exports.
#[cfg(feature = "otlp")]
pub fn init_otlp(service: &str) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    let configured = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    let off = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none");
    if !configured || off || enabled() {
        return Ok(enabled());
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()?;
    let mut processor = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter).build();
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    processor.set_resource(&opentelemetry_sdk::Resource::builder().with_service_name(name).build());
    Ok(set_processor(processor))
}

/// The span id of the attempt whose command id is `command_id`.
pub fn attempt_span_id(command_id: &str) -> String {
    let hash = sha2::Sha256::digest(command_id.as_bytes());
    let mut id = [0u8; 8];
    id.copy_from_slice(&hash[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    hex(&id)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The trace id and span id of a well-formed `traceparent`.
fn ids(traceparent: &str) -> Option<(TraceId, SpanId)> {
    let trace = crate::telemetry::trace_id(traceparent)?;
    let span = traceparent.split('-').nth(2)?;
    Some((TraceId::from_hex(trace).ok()?, SpanId::from_hex(span).ok()?))
}

/// One finished span, in saga terms.
pub(crate) struct Finished<'a> {
    /// The trace and the span's own id, as a `traceparent`.
    pub(crate) this: &'a str,
    /// The parent's `traceparent` (none: a root span).
    pub(crate) parent: Option<&'a str>,
    pub(crate) name: String,
    pub(crate) kind: SpanKind,
    pub(crate) start: SystemTime,
    pub(crate) end: SystemTime,
    pub(crate) attributes: Vec<KeyValue>,
    pub(crate) events: Vec<(SystemTime, &'static str, Vec<KeyValue>)>,
    /// Why it failed, if it did.
    pub(crate) error: Option<String>,
}

/// A time on the wire (ms since the epoch) as a `SystemTime`.
pub(crate) fn time(t: Timestamp) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(t.0)
}

/// Exports `span` if a processor is installed and its ids are well formed.
pub(crate) fn export(span: Finished<'_>) {
    let Some(processor) = PROCESSOR.get() else { return };
    let Some((trace, id)) = ids(span.this) else { return };
    let parent = span.parent.and_then(ids).filter(|(t, _)| *t == trace).map(|(_, s)| s);
    let mut events = SpanEvents::default();
    events.events = span
        .events
        .into_iter()
        .map(|(at, name, attrs)| opentelemetry::trace::Event::new(name, at, attrs, 0))
        .collect();
    let status = match span.error {
        Some(why) => Status::error(why),
        None => Status::Ok,
    };
    processor.on_end(SpanData {
        span_context: SpanContext::new(
            trace,
            id,
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: parent.unwrap_or(SpanId::INVALID),
        parent_span_is_remote: parent.is_some(),
        span_kind: span.kind,
        name: Cow::Owned(span.name),
        start_time: span.start,
        end_time: span.end.max(span.start),
        attributes: span.attributes,
        dropped_attributes_count: 0,
        events,
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope(),
    });
}

fn scope() -> InstrumentationScope {
    static SCOPE: OnceLock<InstrumentationScope> = OnceLock::new();
    SCOPE
        .get_or_init(|| {
            InstrumentationScope::builder("saga-nats")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build()
        })
        .clone()
}

/// A `traceparent` in `trace`'s trace with span id `span` (16 hex digits).
pub(crate) fn with_span(traceparent: &str, span: &str) -> Option<String> {
    let trace = crate::telemetry::trace_id(traceparent)?;
    let flags = &traceparent[traceparent.len() - 2..];
    Some(format!("00-{trace}-{span}-{flags}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_span_ids_are_stable_and_distinct() {
        let a = attempt_span_id("s1.step.a.1");
        assert_eq!(a.len(), 16);
        assert_eq!(a, attempt_span_id("s1.step.a.1"));
        assert_ne!(a, attempt_span_id("s1.step.a.2"));
        let tp = crate::telemetry::new_traceparent();
        let child = with_span(&tp, &a).unwrap();
        assert_eq!(crate::telemetry::trace_id(&child), crate::telemetry::trace_id(&tp));
        assert_eq!(ids(&child).unwrap().1, SpanId::from_hex(&a).unwrap());
    }
}
