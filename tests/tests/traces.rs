//! OpenTelemetry: the coordinator binary and a participant process export saga spans over
//! OTLP to a real OTLP/HTTP receiver started here; the receiver decodes what they sent and
//! the test checks the trace's shape.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;
use saga_core::{SagaId, SagaStatus};
use saga_tests::support::*;
use saga_tests::NatsServer;

const COORDINATOR: &str = env!("CARGO_BIN_EXE_saga-coordinator");
const PARTICIPANT: &str = env!("CARGO_BIN_EXE_echo-participant");
const WAIT: Duration = Duration::from_secs(60);

/// One span as the receiver decoded it, with its service's name.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    name: String,
    start: u64,
    attributes: HashMap<String, String>,
    events: Vec<String>,
    error: Option<String>,
}

fn text(attrs: &[KeyValue]) -> HashMap<String, String> {
    attrs
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// An OTLP/HTTP receiver on a free port: `POST /v1/traces` with a protobuf body.
async fn receiver() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: bytes::Bytes| {
            let sink = sink.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut got = sink.lock().unwrap();
                for rs in request.resource_spans {
                    let resource = rs.resource.map(|r| text(&r.attributes)).unwrap_or_default();
                    let service = resource.get("service.name").cloned().unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            let status = s.status.unwrap_or_default();
                            got.push(Span {
                                service: service.clone(),
                                trace: s.trace_id,
                                id: s.span_id,
                                parent: s.parent_span_id,
                                name: s.name,
                                start: s.start_time_unix_nano,
                                attributes: text(&s.attributes),
                                events: s.events.into_iter().map(|e| e.name).collect(),
                                error: (status.code == StatusCode::Error as i32)
                                    .then_some(status.message),
                            });
                        }
                    }
                }
                ([(axum::http::header::CONTENT_TYPE, "application/x-protobuf")], Vec::<u8>::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), spans)
}

/// Starts `binary` with `args` and the OTLP settings; killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(binary: &str, args: &[&str], service: &str, endpoint: &str) -> Child {
    Command::new(binary)
        .args(args)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_SERVICE_NAME", service)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{binary} starts: {e}"))
}

/// The spans of saga `id`, once every one of `expected` names has arrived.
async fn spans_of(spans: &Arc<Mutex<Vec<Span>>>, id: &SagaId, expected: &[&str]) -> Vec<Span> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mine: Vec<Span> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.attributes.get("saga.id").map(String::as_str) == Some(id.as_str()))
            .cloned()
            .collect();
        let names: HashSet<&str> = mine.iter().map(|s| s.name.as_str()).collect();
        if expected.iter().all(|n| names.contains(n)) {
            return mine;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans of saga {id}: have {names:?}, want {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_saga_across_the_coordinator_and_a_participant() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let (endpoint, received) = receiver().await;
    let defs = definitions_dir(&[chain("traced", &["a", "b", "c"], Duration::from_secs(10))]);
    let url = server.url();
    let coordinator = Proc(spawn(
        COORDINATOR,
        &["--nats-url", &url, "--definitions", defs.to_str().unwrap()],
        "saga-coordinator",
        &endpoint,
    ));
    let mut participant = spawn(PARTICIPANT, &[&url, "p1"], "svc", &endpoint);
    let mut lines = BufReader::new(participant.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    // It prints a line per handler run: keep reading, or its prints would fail.
    std::thread::spawn(move || lines.for_each(drop));
    let participant = Proc(participant);
    let client = client_when_ready(nats.clone(), "traced").await;

    let ok = client.start("traced", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    let input = TestInput { n: 2, fail: vec!["c".into()], ..Default::default() };
    let failed = client.start("traced", &input).await.unwrap();
    assert_eq!(client.wait(&ok, WAIT).await.unwrap().status(), SagaStatus::Completed);
    assert_eq!(client.wait(&failed, WAIT).await.unwrap().status(), SagaStatus::Compensated);

    // The completed saga: a root span and a span per step from the coordinator, a span per
    // handler run from the participant, all in one trace, parented step by step.
    let spans = spans_of(
        &received,
        &ok,
        &[
            "saga traced",
            "step a",
            "step b",
            "step c",
            "handle svc.a",
            "handle svc.b",
            "handle svc.c",
        ],
    )
    .await;
    let traces: HashSet<&Vec<u8>> = spans.iter().map(|s| &s.trace).collect();
    assert_eq!(traces.len(), 1, "one trace per saga: {spans:#?}");
    let roots: Vec<&Span> = spans.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "one root: {spans:#?}");
    let root = roots[0];
    assert_eq!((root.name.as_str(), root.service.as_str()), ("saga traced", "saga-coordinator"));
    assert_eq!(root.attributes.get("saga.status").map(String::as_str), Some("completed"));
    assert!(root.events.iter().any(|e| e == "completed"), "lifecycle events: {:?}", root.events);
    for step in ["a", "b", "c"] {
        let attempt = spans.iter().find(|s| s.name == format!("step {step}")).unwrap();
        assert_eq!(attempt.parent, root.id, "step {step} is a child of the saga");
        assert_eq!(attempt.service, "saga-coordinator");
        let handled = spans.iter().find(|s| s.name == format!("handle svc.{step}")).unwrap();
        assert_eq!(handled.parent, attempt.id, "the handler's span is a child of the attempt's");
        assert_eq!(handled.service, "svc", "exported by the participant process");
        assert!(handled.error.is_none());
    }

    // The compensated saga: the failed step's span says why; the compensations follow, newest
    // step first, each with its handler's span beneath it.
    let spans = spans_of(
        &received,
        &failed,
        &[
            "saga traced",
            "step c",
            "compensate b",
            "compensate a",
            "handle svc.undo-b",
            "handle svc.undo-a",
        ],
    )
    .await;
    let traces: HashSet<&Vec<u8>> = spans.iter().map(|s| &s.trace).collect();
    assert_eq!(traces.len(), 1, "{spans:#?}");
    let root = spans.iter().find(|s| s.parent.is_empty()).unwrap();
    assert_eq!(root.attributes.get("saga.status").map(String::as_str), Some("compensated"));
    for event in ["step_failed", "compensating", "compensated"] {
        assert!(root.events.iter().any(|e| e == event), "{event} in {:?}", root.events);
    }
    let c = spans.iter().find(|s| s.name == "step c").unwrap();
    assert!(c.error.as_deref().is_some_and(|e| e.contains("refused")), "{c:?}");
    let undo_b = spans.iter().find(|s| s.name == "compensate b").unwrap();
    let undo_a = spans.iter().find(|s| s.name == "compensate a").unwrap();
    assert_eq!((&undo_b.parent, &undo_a.parent), (&root.id, &root.id));
    assert!(undo_b.start <= undo_a.start, "b is compensated before a");
    for (undo, command) in [(undo_b, "handle svc.undo-b"), (undo_a, "handle svc.undo-a")] {
        let handled = spans.iter().find(|s| s.name == command).unwrap();
        assert_eq!(handled.parent, undo.id, "{command} under its compensation");
    }
    drop((coordinator, participant));
}
