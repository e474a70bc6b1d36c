//! Metrics: the `saga-coordinator` binary serves Prometheus metrics on `--metrics-listen`, and
//! what they count agrees with the sagas that ran, against a real nats-server.

use std::time::{Duration, Instant};

use bytes::Bytes;
use saga_core::SagaStatus;
use saga_nats::subjects;
use saga_tests::support::*;
use saga_tests::NatsServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(60);
const COORDINATOR: &str = env!("CARGO_BIN_EXE_saga-coordinator");

/// `GET /metrics` on `addr`, the body.
async fn scrape(addr: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("the metrics port");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

/// The value of the sample of `name` whose labels include `labels`, if there is one.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        if metric != name {
            return None;
        }
        let all = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        all.then(|| value.parse().ok()).flatten()
    })
}

/// Scrapes until `check` holds (metrics and gauges follow the sagas with a short delay).
async fn until(addr: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = scrape(addr).await;
        if check(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what} never held; metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_serves_prometheus_metrics_that_count_what_ran() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let dir = definitions_dir(&[chain("metered", &["a", "b"], Duration::from_secs(10))]);
    let addr = format!("127.0.0.1:{}", saga_tests::free_port());
    let url = server.url();
    let _coordinator = CoordinatorProcess::start_with(
        COORDINATOR,
        &["--nats-url", &url, "--metrics-listen", &addr],
        &dir,
    );
    let effects = Effects::default();
    let _participant = echo_participant(nats.clone(), "svc", &["a", "b"], effects).await;
    // Starts (and runs) one probe saga.
    let client = client_when_ready(nats.clone(), "metered").await;

    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(client.start("metered", &TestInput { n, ..Default::default() }).await.unwrap());
    }
    for n in 3..5 {
        let input = TestInput { n, fail: vec!["b".into()], ..Default::default() };
        ids.push(client.start("metered", &input).await.unwrap());
    }
    for (i, id) in ids.iter().enumerate() {
        let expected = if i < 3 { SagaStatus::Completed } else { SagaStatus::Compensated };
        assert_eq!(client.wait(id, WAIT).await.unwrap().status(), expected);
    }
    // A start that does not decode is dead-lettered.
    let garbage =
        subjects::start(&saga_core::SagaId::for_key(&"metered".into(), "x"), &"metered".into());
    let js = async_nats::jetstream::new(nats.clone());
    js.publish(garbage, Bytes::from_static(b"garbage")).await.unwrap().await.unwrap();

    let saga = [("saga", "metered")];
    let text = until(&addr, "every saga counted, the garbage dead-lettered, none in flight", |t| {
        sample(t, "saga_finished_total", &[("saga", "metered"), ("status", "completed")])
            == Some(4.0)
            && sample(t, "saga_finished_total", &[("saga", "metered"), ("status", "compensated")])
                == Some(2.0)
            && sample(t, "saga_dead_letters_total", &[("component", "coordinator")]) == Some(1.0)
            && sample(t, "saga_in_flight", &[]) == Some(0.0)
    })
    .await;
    // The probe and the five sagas.
    assert_eq!(sample(&text, "saga_started_total", &saga), Some(6.0), "{text}");
    let attempts = |step: &str, phase: &str, outcome: &str| {
        let labels = [("saga", "metered"), ("step", step), ("phase", phase), ("outcome", outcome)];
        sample(&text, "saga_step_attempts_total", &labels)
    };
    assert_eq!(attempts("a", "action", "succeeded"), Some(6.0), "{text}");
    assert_eq!(attempts("b", "action", "succeeded"), Some(4.0), "{text}");
    assert_eq!(attempts("b", "action", "failed"), Some(2.0), "{text}");
    assert_eq!(attempts("a", "compensation", "succeeded"), Some(2.0), "{text}");
    let compensations = [("saga", "metered"), ("step", "a")];
    assert_eq!(sample(&text, "saga_compensations_total", &compensations), Some(2.0), "{text}");
    // Every attempt that ended was timed: the histogram counts them all.
    let timed = [("saga", "metered"), ("step", "a"), ("phase", "action"), ("outcome", "succeeded")];
    assert_eq!(sample(&text, "saga_step_attempt_seconds_count", &timed), Some(6.0), "{text}");
    assert_eq!(sample(&text, "saga_input_lag_seconds_count", &[]), Some(6.0), "{text}");
    assert_eq!(sample(&text, "saga_parked", &[]), Some(0.0), "{text}");
    assert!(text.contains("# HELP saga_step_attempt_seconds"), "described: {text}");
    assert_eq!(sample(&text, "saga_log_conflicts_total", &[]).unwrap_or(0.0), 0.0, "{text}");

    // `nats micro stats saga-admin` says the same.
    let stats = nats.request("$SRV.STATS.saga-admin", Bytes::new()).await.unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    let sagas = &stats["endpoints"][0]["data"]["sagas"];
    let tally: saga_nats::observe::TallyData =
        serde_json::from_value(sagas.clone()).unwrap_or_else(|e| panic!("{e}: {stats}"));
    assert_eq!(
        tally.started["metered"] as f64,
        sample(&text, "saga_started_total", &saga).unwrap()
    );
    for status in ["completed", "compensated"] {
        let labels = [("saga", "metered"), ("status", status)];
        let metric = sample(&text, "saga_finished_total", &labels).unwrap();
        assert_eq!(tally.finished["metered"][status] as f64, metric, "{stats}");
    }
    assert_eq!((tally.in_flight, tally.parked), (0, 0), "{stats}");
    let _ = std::fs::remove_dir_all(&dir);
}
