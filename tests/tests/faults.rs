//! Fault tests: kill -9 of the coordinator process, two replicas at once, nats-server
//! restarts and participants that are down, all against real nats-server processes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use saga_core::{SagaDefinition, SagaId, SagaStatus};
use saga_nats::SagaClient;
use saga_tests::support::*;
use saga_tests::NatsServer;

const WAIT: Duration = Duration::from_secs(120);

/// A coordinator running as its own process (the real command line), killed on drop.
struct CoordinatorProcess {
    child: Child,
}

impl CoordinatorProcess {
    fn start(url: &str, definitions: &PathBuf) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_saga-coordinator"))
            .args(["--nats-url", url, "--ack-wait-secs", "2", "--workers", "16"])
            .arg("--definitions")
            .arg(definitions)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .expect("coordinator process starts");
        CoordinatorProcess { child }
    }

    fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn definitions_dir(defs: &[SagaDefinition]) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("saga-defs-{}-{}", std::process::id(), uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    for def in defs {
        let json = serde_json::to_string_pretty(def).unwrap();
        std::fs::write(dir.join(format!("{}.json", def.name)), json).unwrap();
    }
    dir
}

fn uuid_like() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// Waits until a client can start sagas of `name` (the coordinator process provisioned and
/// registered it).
async fn client_when_ready(nats: async_nats::Client, name: &str) -> SagaClient {
    for _ in 0..300 {
        if let Ok(client) = SagaClient::new(nats.clone()).await {
            if client.list(&Default::default()).await.is_ok() {
                // `register` would overwrite; probe with a start of a throwaway saga instead.
                let probe = client.start_with_key(name, "probe", &TestInput::default()).await;
                if probe.is_ok() {
                    return client;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("coordinator did not become ready");
}

/// Checks what every saga's effects must be: completed sagas ran each action once and no
/// compensation; compensated ones ran a and b once, compensated each once, never ran c.
fn check_effects(
    fx: &Effects,
    ids: &[SagaId],
    statuses: &[SagaStatus],
    failing: impl Fn(usize) -> bool,
) {
    for (i, (id, status)) in ids.iter().zip(statuses).enumerate() {
        if failing(i) {
            assert_eq!(*status, SagaStatus::Compensated, "saga {i} ({id})");
            for step in ["a", "b"] {
                assert_eq!(fx.count(id, step, "a"), 1, "saga {i} step {step} action");
                assert_eq!(fx.count(id, step, "c"), 1, "saga {i} step {step} compensation");
            }
            assert_eq!(fx.count(id, "c", "a"), 0, "saga {i}: c failed");
        } else {
            assert_eq!(*status, SagaStatus::Completed, "saga {i} ({id})");
            for step in ["a", "b", "c"] {
                assert_eq!(fx.count(id, step, "a"), 1, "saga {i} step {step} action");
                assert_eq!(fx.count(id, step, "c"), 0, "saga {i} step {step} compensation");
            }
        }
    }
    assert!(fx.duplicates().is_empty(), "effects ran twice: {:?}", fx.duplicates());
}

fn input(i: usize, failing: bool) -> TestInput {
    TestInput {
        n: i as u64,
        fail: if failing { vec!["c".into()] } else { vec![] },
        delay_ms: 50,
        ..Default::default()
    }
}

/// Counts lifecycle events of one kind as they are published.
async fn count_events(nats: &async_nats::Client, filter: &str) -> Arc<Mutex<usize>> {
    let count = Arc::new(Mutex::new(0));
    let mut sub = nats.subscribe(filter.to_owned()).await.unwrap();
    let c = count.clone();
    tokio::spawn(async move {
        while sub.next().await.is_some() {
            *c.lock().unwrap() += 1;
        }
    });
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_coordinator_with_sagas_in_flight_loses_nothing() {
    init_logging();
    const SAGAS: usize = 240;
    let server = NatsServer::start();
    let nats = server.connect().await;
    let def = chain("k9", &["a", "b", "c"], Duration::from_secs(30));
    let dir = definitions_dir(&[def]);
    let mut coord = CoordinatorProcess::start(&server.url(), &dir);
    let client = client_when_ready(nats.clone(), "k9").await;
    let fx = Effects::default();
    let _p = echo_participant(nats.clone(), "svc", &["a", "b", "c"], fx.clone()).await;
    let finished = count_events(&nats, "saga.event.k9.completed.*").await;

    let failing = |i: usize| i % 5 == 0;
    let starts = (0..SAGAS).map(|i| {
        let client = client.clone();
        async move { client.start("k9", &input(i, failing(i))).await.unwrap() }
    });
    let ids: Vec<SagaId> = futures::future::join_all(starts).await;
    // Kill the coordinator once some sagas have completed and most are still in flight.
    for _ in 0..600 {
        if *finished.lock().unwrap() >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done_at_kill = *finished.lock().unwrap();
    coord.kill9();
    eprintln!("killed the coordinator with {done_at_kill} of {SAGAS} sagas completed");
    assert!(
        done_at_kill < SAGAS / 2,
        "the kill came while most sagas were in flight ({done_at_kill} done)"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _coord2 = CoordinatorProcess::start(&server.url(), &dir);

    let statuses = wait_all(&client, &ids, WAIT).await;
    check_effects(&fx, &ids, &statuses, failing);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_dispatch_a_step_twice() {
    init_logging();
    const SAGAS: usize = 200;
    let server = NatsServer::start();
    let def = chain("two", &["a", "b", "c"], Duration::from_secs(30));
    let _c1 = coordinator(server.connect().await, vec![def.clone()]).await;
    let _c2 = coordinator(server.connect().await, vec![def]).await;
    let nats = server.connect().await;
    let fx = Effects::default();
    let _p = echo_participant(server.connect().await, "svc", &["a", "b", "c"], fx.clone()).await;
    let client = client(nats.clone()).await;

    // Every command published, by command id (a core subscription sees each publish, even one
    // JetStream would deduplicate).
    let sent: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut sub = nats.subscribe("saga.cmd.>").await.unwrap();
    let s = sent.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let id = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string())
                .unwrap_or_default();
            *s.lock().unwrap().entry(id).or_default() += 1;
        }
    });
    nats.flush().await.unwrap();

    let failing = |i: usize| i % 4 == 0;
    let mut ids = Vec::new();
    for i in 0..SAGAS {
        ids.push(client.start("two", &input(i, failing(i))).await.unwrap());
    }
    let statuses = wait_all(&client, &ids, WAIT).await;
    check_effects(&fx, &ids, &statuses, failing);
    let sent = sent.lock().unwrap();
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "commands published more than once: {twice:?}");
    let expected: usize = (0..SAGAS).map(|i| if failing(i) { 5 } else { 3 }).sum();
    assert_eq!(sent.len(), expected, "one command per action and compensation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restart_mid_run_loses_nothing() {
    init_logging();
    const SAGAS: usize = 100;
    let mut server = NatsServer::start();
    let def = chain("rs", &["a", "b", "c"], Duration::from_secs(20));
    let nats = server.connect().await;
    let _coord = saga_nats::Coordinator::start(
        server.connect().await,
        coordinator_config(vec![def], Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let fx = Effects::default();
    // The server is down for about 2 s (kill, 1 s, restart, reconnect): a lease well beyond
    // that keeps every effect exactly-once (see `echo_participant_with_lease`).
    let lease = Duration::from_secs(30);
    let _p = echo_participant_with_lease(
        server.connect().await,
        "svc",
        &["a", "b", "c"],
        fx.clone(),
        lease,
    )
    .await;
    let client = client(nats.clone()).await;
    let finished = count_events(&nats, "saga.event.rs.*.*").await;

    let failing = |i: usize| i % 5 == 1;
    let mut ids = Vec::new();
    for i in 0..SAGAS {
        ids.push(client.start("rs", &input(i, failing(i))).await.unwrap());
    }
    for _ in 0..600 {
        if *finished.lock().unwrap() >= 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart();

    let statuses = wait_all(&client, &ids, WAIT).await;
    check_effects(&fx, &ids, &statuses, failing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_down_while_sagas_start_then_up() {
    init_logging();
    const SAGAS: usize = 100;
    let server = NatsServer::start();
    let nats = server.connect().await;
    let def = chain("down", &["a", "b", "c"], Duration::from_secs(30));
    let _coord = coordinator(nats.clone(), vec![def]).await;
    let fx = Effects::default();
    // The participant registers its durable consumer, then goes away.
    let p = echo_participant(server.connect().await, "svc", &["a", "b", "c"], fx.clone()).await;
    p.shutdown().await;
    let client = client(nats.clone()).await;

    let failing = |i: usize| i % 10 == 3;
    let mut ids = Vec::new();
    for i in 0..SAGAS {
        ids.push(client.start("down", &input(i, failing(i))).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for id in &ids {
        let status = client.get(id).await.unwrap().map(|v| v.status());
        assert_eq!(
            status,
            Some(SagaStatus::Running),
            "nothing can finish while the participant is down"
        );
    }
    let _p = echo_participant(server.connect().await, "svc", &["a", "b", "c"], fx.clone()).await;
    let statuses = wait_all(&client, &ids, WAIT).await;
    check_effects(&fx, &ids, &statuses, failing);
}
