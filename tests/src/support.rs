//! Saga-level test support: echo participants whose behaviour the saga input drives, effect
//! counters, and a coordinator with test-friendly settings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::{RetryPolicy, SagaDefinition, SagaId, SagaStatus, StepKind};
use saga_nats::{
    Command, Coordinator, CoordinatorConfig, Participant, ParticipantConfig, ProvisionConfig,
    SagaClient, StepError,
};
use serde::{Deserialize, Serialize};

/// The input of test sagas: it tells the echo participants how to behave.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TestInput {
    /// A number identifying the saga in the test.
    pub n: u64,
    /// Steps whose action fails with a business failure.
    #[serde(default)]
    pub fail: Vec<String>,
    /// Steps whose action fails transiently on its first `k` attempts.
    #[serde(default)]
    pub transient: Vec<(String, u32)>,
    /// Steps whose action hangs (no reply) on its first `k` attempts.
    #[serde(default)]
    pub hang: Vec<(String, u32)>,
    /// Steps whose compensation fails (not transiently) on its first `k` attempts.
    #[serde(default)]
    pub comp_fail: Vec<(String, u32)>,
    /// Steps whose compensation fails transiently on its first `k` attempts.
    #[serde(default)]
    pub comp_transient: Vec<(String, u32)>,
    /// Every handler takes this long (milliseconds).
    #[serde(default)]
    pub delay_ms: u64,
}

/// What an echo step returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EchoOutput {
    /// The step.
    pub step: String,
    /// The saga's `n`.
    pub n: u64,
}

/// Counts the effects participants carried out, by `saga/step/a|c`.
#[derive(Debug, Clone, Default)]
pub struct Effects(Arc<Mutex<HashMap<String, u32>>>);

impl Effects {
    fn bump(&self, saga: &SagaId, step: &str, phase: &str) {
        *self.0.lock().expect("lock").entry(format!("{saga}/{step}/{phase}")).or_default() += 1;
    }

    /// How many times `phase` (`a` or `c`) of `step` of `saga` ran.
    pub fn count(&self, saga: &SagaId, step: &str, phase: &str) -> u32 {
        self.0.lock().expect("lock").get(&format!("{saga}/{step}/{phase}")).copied().unwrap_or(0)
    }

    /// Every effect that ran more than once.
    pub fn duplicates(&self) -> Vec<(String, u32)> {
        let mut d: Vec<_> = self
            .0
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        d.sort();
        d
    }

    /// The total number of effects.
    pub fn total(&self) -> u32 {
        self.0.lock().expect("lock").values().sum()
    }
}

fn attempts_for(list: &[(String, u32)], step: &str) -> u32 {
    list.iter().find(|(s, _)| s == step).map_or(0, |(_, k)| *k)
}

/// Starts an echo participant for `service` handling `steps` (each step `s` has action `s`
/// and compensation `undo-s`). A hung handler is stopped at its command's deadline.
pub async fn echo_participant(
    client: async_nats::Client,
    service: &str,
    steps: &[&str],
    effects: Effects,
) -> Participant {
    echo_participant_with(client, service, steps, effects, ParticipantConfig::default()).await
}

/// [`echo_participant`] with a given configuration.
pub async fn echo_participant_with(
    client: async_nats::Client,
    service: &str,
    steps: &[&str],
    effects: Effects,
    config: ParticipantConfig,
) -> Participant {
    let mut builder = Participant::builder(client, service).config(config);
    for step in steps {
        let name = step.to_string();
        let fx = effects.clone();
        builder = builder.action(step, move |cmd: Command<TestInput>| {
            let name = name.clone();
            let fx = fx.clone();
            async move {
                let input = &cmd.input;
                tokio::time::sleep(Duration::from_millis(input.delay_ms)).await;
                if cmd.attempt <= attempts_for(&input.hang, &name) {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                if cmd.attempt <= attempts_for(&input.transient, &name) {
                    return Err(StepError::transient(format!(
                        "{name} is busy (attempt {})",
                        cmd.attempt
                    )));
                }
                if input.fail.contains(&name) {
                    return Err(StepError::business(format!("{name} refused order {}", input.n)));
                }
                fx.bump(&cmd.saga_id, &name, "a");
                Ok(EchoOutput { step: name, n: input.n })
            }
        });
        let name = step.to_string();
        let fx = effects.clone();
        builder = builder.compensation(&format!("undo-{step}"), move |cmd: Command<TestInput>| {
            let name = name.clone();
            let fx = fx.clone();
            async move {
                if cmd.attempt <= attempts_for(&cmd.input.comp_fail, &name) {
                    return Err(StepError::business(format!(
                        "undo-{name} failed (attempt {})",
                        cmd.attempt
                    )));
                }
                if cmd.attempt <= attempts_for(&cmd.input.comp_transient, &name) {
                    return Err(StepError::transient(format!(
                        "undo-{name} cannot write now (attempt {})",
                        cmd.attempt
                    )));
                }
                fx.bump(&cmd.saga_id, &name, "c");
                Ok(())
            }
        });
    }
    builder.start().await.expect("participant starts")
}

/// A retry policy with short backoffs for tests.
pub fn quick_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        multiplier: 2.0,
        jitter: 0.1,
    }
}

/// A chain of compensatable steps, one per service `svc-<step>`... all on service `svc`.
pub fn chain(name: &str, steps: &[&str], timeout: Duration) -> SagaDefinition {
    let mut b = SagaDefinition::builder(name);
    for step in steps {
        let undo = format!("undo-{step}");
        b = b.step(step, "svc", step, |s| {
            s.compensation(&undo).timeout(timeout).retry(quick_retry(3))
        });
    }
    b.build()
}

/// A chain ending in a pivot and then retriable steps.
pub fn with_pivot(name: &str, before: &[&str], pivot: &str, after: &[&str]) -> SagaDefinition {
    let mut b = SagaDefinition::builder(name);
    for step in before {
        let undo = format!("undo-{step}");
        b = b.step(step, "svc", step, |s| s.compensation(&undo).retry(quick_retry(3)));
    }
    b = b.step(pivot, "svc", pivot, |s| s.kind(StepKind::Pivot).retry(quick_retry(3)));
    for step in after {
        b = b.step(step, "svc", step, |s| s.kind(StepKind::Retriable).retry(quick_retry(2)));
    }
    b.build()
}

/// Coordinator settings for tests: a replica that stops answering has its sagas taken over
/// after `ack_wait`.
pub fn coordinator_config(defs: Vec<SagaDefinition>, ack_wait: Duration) -> CoordinatorConfig {
    CoordinatorConfig {
        provision: ProvisionConfig { ack_wait, ..Default::default() },
        workers: 16,
        definitions: defs,
        ..Default::default()
    }
}

/// Starts an in-process coordinator.
pub async fn coordinator(client: async_nats::Client, defs: Vec<SagaDefinition>) -> Coordinator {
    Coordinator::start(client, coordinator_config(defs, Duration::from_secs(5)))
        .await
        .expect("coordinator starts")
}

/// The usual set-up of a test: a fresh server, a coordinator running the chain `name` of
/// `steps` (each with `timeout`), an echo participant (service `svc`) for those steps, and a
/// client. Keep it alive for the test: dropping it stops them and the server.
pub struct EchoStack {
    /// The server.
    pub server: crate::NatsServer,
    /// A connection to it.
    pub nats: async_nats::Client,
    /// The coordinator.
    pub coordinator: Coordinator,
    /// The echo participant.
    pub participant: Participant,
    /// What the participant's handlers ran.
    pub effects: Effects,
    /// A client.
    pub client: SagaClient,
}

/// Starts an [`EchoStack`].
pub async fn echo_stack(name: &str, steps: &[&str], timeout: Duration) -> EchoStack {
    let server = crate::NatsServer::start();
    let nats = server.connect().await;
    let coordinator = coordinator(nats.clone(), vec![chain(name, steps, timeout)]).await;
    let effects = Effects::default();
    let participant = echo_participant(nats.clone(), "svc", steps, effects.clone()).await;
    let client = client(nats.clone()).await;
    EchoStack { server, nats, coordinator, participant, effects, client }
}

/// A client.
pub async fn client(nats: async_nats::Client) -> SagaClient {
    SagaClient::new(nats).await.expect("client connects")
}

/// Waits for every saga and returns their final statuses.
pub async fn wait_all(client: &SagaClient, ids: &[SagaId], timeout: Duration) -> Vec<SagaStatus> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        match client.wait(id, timeout).await {
            Ok(view) => out.push(view.status()),
            Err(e) => panic!(
                "saga {id}: {e}; state: {:?}",
                client.get(id).await.ok().flatten().map(|v| v.snapshot)
            ),
        }
    }
    out
}

/// Logs to stderr for tests when `RUST_LOG` is set.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
}

/// The key-value bucket where [`recording_participant`] records each run of a handler.
pub const RUNS_BUCKET: &str = "test_runs";

/// Opens (creating it if needed) the [`RUNS_BUCKET`].
pub async fn runs_bucket(nats: async_nats::Client) -> async_nats::jetstream::kv::Store {
    async_nats::jetstream::new(nats)
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: RUNS_BUCKET.into(),
            ..Default::default()
        })
        .await
        .expect("the runs bucket opens")
}

/// Starts an echo participant for `service` handling `steps` (action `s`, compensation
/// `undo-s`) that records every run of a handler durably, so that runs survive the process:
/// each handler sleeps the input's `delay_ms`, then creates key
/// `<saga>.<step>.<a|c>.<instance>.<n>` in [`RUNS_BUCKET`]. It prints `start <effect>` and
/// `end <effect>` lines on stdout around each handler, for a test watching the process.
pub async fn recording_participant(
    client: async_nats::Client,
    service: &str,
    steps: &[&str],
    instance: &str,
) -> Participant {
    let runs = runs_bucket(client.clone()).await;
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut builder = Participant::builder(client, service);
    for step in steps {
        for (phase, command) in [("a", step.to_string()), ("c", format!("undo-{step}"))] {
            let name = step.to_string();
            let runs = runs.clone();
            let counter = counter.clone();
            let instance = instance.to_owned();
            let handler = move |cmd: Command<TestInput>| {
                let (name, runs, counter, instance) =
                    (name.clone(), runs.clone(), counter.clone(), instance.clone());
                async move {
                    let effect = format!("{}.{name}.{phase}", cmd.saga_id);
                    if phase == "a" && cmd.input.fail.contains(&name) {
                        return Err(StepError::business(format!(
                            "{name} refused order {}",
                            cmd.input.n
                        )));
                    }
                    println!("start {effect}");
                    tokio::time::sleep(Duration::from_millis(cmd.input.delay_ms)).await;
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    runs.create(format!("{effect}.{instance}.{n}"), bytes::Bytes::new())
                        .await
                        .map_err(|e| StepError::transient(format!("run not recorded: {e}")))?;
                    println!("end {effect}");
                    Ok(EchoOutput { step: name, n: cmd.input.n })
                }
            };
            builder = match phase {
                "a" => builder.action(&command, handler),
                _ => builder.compensation(&command, handler),
            };
        }
    }
    builder.start().await.expect("participant starts")
}

/// The runs [`recording_participant`]s recorded, by effect (`<saga>.<step>.<a|c>`): the
/// instance of each run.
pub async fn recorded_runs(nats: async_nats::Client) -> HashMap<String, Vec<String>> {
    use futures::TryStreamExt;
    let keys: Vec<String> =
        runs_bucket(nats).await.keys().await.expect("keys").try_collect().await.expect("keys");
    let mut runs: HashMap<String, Vec<String>> = HashMap::new();
    for key in keys {
        let parts: Vec<&str> = key.split('.').collect();
        assert_eq!(parts.len(), 5, "run key {key}");
        runs.entry(parts[..3].join(".")).or_default().push(parts[3].to_owned());
    }
    runs
}

/// The effect records in service `service`'s bucket, by effect key (`<saga>.<step>.<a|c>`).
pub async fn effect_records(
    nats: async_nats::Client,
    service: &str,
) -> HashMap<String, saga_core::wire::EffectRecord> {
    use futures::TryStreamExt;
    let js = async_nats::jetstream::new(nats);
    let bucket = saga_nats::subjects::effects_bucket(&saga_core::ServiceName::from(service));
    let store = js.get_key_value(bucket).await.expect("the effects bucket exists");
    let keys: Vec<String> = store.keys().await.expect("keys").try_collect().await.expect("keys");
    let mut records = HashMap::new();
    for key in keys {
        if let Some(value) = store.get(&key).await.expect("get") {
            let record = saga_core::Codec::default()
                .decode_value("effect record", &value)
                .unwrap_or_else(|e| panic!("effect record {key}: {e}"));
            records.insert(key, record);
        }
    }
    records
}

/// A coordinator running as its own process (the real command line), killed on drop.
pub struct CoordinatorProcess {
    child: Child,
}

impl CoordinatorProcess {
    /// Starts `binary` (an integration test's `env!("CARGO_BIN_EXE_saga-coordinator")`)
    /// against `url` with the definitions in `definitions`, a 2 s ack wait and 16 workers.
    pub fn start(binary: &str, url: &str, definitions: &Path) -> Self {
        Self::start_with(binary, &["--nats-url", url], definitions)
    }

    /// Like [`CoordinatorProcess::start`], with `args` (connection flags included) instead
    /// of `--nats-url`.
    pub fn start_with(binary: &str, args: &[&str], definitions: &Path) -> Self {
        let child = Process::new(binary)
            .args(args)
            .args(["--ack-wait-secs", "2", "--workers", "16"])
            .arg("--definitions")
            .arg(definitions)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .expect("coordinator process starts");
        CoordinatorProcess { child }
    }

    /// Kills it with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
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

/// A fresh directory holding `defs` as JSON files, for `saga-coordinator --definitions`.
pub fn definitions_dir(defs: &[SagaDefinition]) -> PathBuf {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("saga-defs-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for def in defs {
        let json = serde_json::to_string_pretty(def).unwrap();
        std::fs::write(dir.join(format!("{}.json", def.name)), json).unwrap();
    }
    dir
}

/// Waits until a client can start sagas of `name` (a coordinator process provisioned and
/// registered it), probing with a start of a throwaway saga keyed `probe`.
pub async fn client_when_ready(nats: async_nats::Client, name: &str) -> SagaClient {
    for _ in 0..300 {
        if let Ok(client) = SagaClient::new(nats.clone()).await {
            if client.definition(name).await.is_ok() {
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

/// JetStream-publishes `payload` on `subject` and returns the stream sequence. `SAGA_IN` holds
/// one message per subject: while an earlier one waits on the same subject (not yet handled
/// or dead-lettered), the stream refuses the next, so this tries again for up to `wait`.
///
/// # Panics
///
/// If the publish fails otherwise, or the subject stays taken for `wait`.
pub async fn publish_when_free(
    js: &async_nats::jetstream::Context,
    subject: &str,
    payload: Vec<u8>,
    wait: Duration,
) -> u64 {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let ack = js
            .publish(subject.to_owned(), bytes::Bytes::from(payload.clone()))
            .await
            .unwrap_or_else(|e| panic!("publish to {subject}: {e}"))
            .await;
        match ack {
            Ok(ack) => return ack.sequence,
            Err(e)
                if e.to_string().contains("maximum messages per subject")
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("publish ack from {subject}: {e}"),
        }
    }
}
