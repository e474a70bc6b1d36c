//! Bad input against real nats-server processes: garbage, truncated, empty, oversized,
//! wrong-version, mis-addressed, forged and stale messages on the subjects the coordinator and
//! participants consume, and a server without JetStream.

use std::io::Read;
use std::process::{Command as Process, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use saga_core::envelope::{
    CommandMessage, OperatorAction, OperatorMessage, ReplyMessage, ReplyOutcome, StartMessage,
    TimerMessage, DEFAULT_MAX_MESSAGE_SIZE, PROTOCOL_VERSION,
};
use saga_core::{
    Codec, CodecError, CommandId, Payload, Phase, SagaId, SagaStatus, Timer, TimerKind, Timestamp,
};
use saga_nats::subjects::{self, headers, InputKind};
use saga_nats::{
    Command, Coordinator, CoordinatorConfig, CoordinatorError, ErrorKind, Participant,
    ParticipantConfig, ParticipantError, ProvisionConfig, ProvisionError,
};
use saga_tests::support::*;
use saga_tests::{NatsServer, NatsServerOptions};

const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64).
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The first half of `bytes`.
fn truncated(bytes: &[u8]) -> Vec<u8> {
    bytes[..bytes.len() / 2].to_vec()
}

/// A saga input as MessagePack (a map with `n`: the other fields of [`TestInput`] default).
fn input_bytes(n: u8) -> Payload {
    assert!(n < 128, "positive fixint");
    Payload::new(vec![0x81, 0xa1, b'n', n])
}

/// A well-formed reply.
fn reply(saga: &SagaId, step: &str, attempt: u32, outcome: ReplyOutcome) -> ReplyMessage {
    ReplyMessage {
        v: PROTOCOL_VERSION,
        saga_id: saga.clone(),
        command_id: CommandId::new(saga, &step.into(), Phase::Action, attempt),
        step: step.into(),
        phase: Phase::Action,
        attempt,
        outcome,
    }
}

/// A well-formed command to service `svc`.
fn command(
    saga: &SagaId,
    step: &str,
    phase: Phase,
    attempt: u32,
    input: Payload,
) -> CommandMessage {
    let command = match phase {
        Phase::Action => step.to_owned(),
        Phase::Compensation => format!("undo-{step}"),
    };
    CommandMessage {
        v: PROTOCOL_VERSION,
        saga_id: saga.clone(),
        saga: "three".into(),
        command_id: CommandId::new(saga, &step.into(), phase, attempt),
        step: step.into(),
        phase,
        attempt,
        service: "svc".into(),
        command: command.as_str().into(),
        deadline: Timestamp(u64::MAX / 2),
        input,
        deps: Default::default(),
        output: None,
    }
}

/// Publishes through JetStream and waits for the stream's acknowledgement; returns the
/// stream sequence.
async fn publish(js: &jetstream::Context, subject: &str, payload: Vec<u8>) -> u64 {
    js.publish(subject.to_owned(), Bytes::from(payload))
        .await
        .unwrap_or_else(|e| panic!("publish to {subject}: {e}"))
        .await
        .unwrap_or_else(|e| panic!("publish ack from {subject}: {e}"))
        .sequence
}

/// One message of the dead-letter stream.
#[derive(Debug, Clone)]
struct DeadLetter {
    /// The subject it was dead-lettered on (`saga.dlq.<component>`).
    subject: String,
    /// `Saga-Dlq-Subject`.
    original: Option<String>,
    /// `Saga-Dlq-Reason`.
    reason: Option<String>,
    payload: Bytes,
}

/// Every message in the dead-letter stream, in order.
async fn dead_letters(js: &jetstream::Context) -> Vec<DeadLetter> {
    let mut stream = js.get_stream(subjects::DLQ_STREAM).await.expect("dead-letter stream");
    let state = stream.info().await.expect("dead-letter stream info").state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(m) = stream.get_raw_message(seq).await else { continue };
        let header = |name: &str| m.headers.get(name).map(|v| v.as_str().to_owned());
        out.push(DeadLetter {
            subject: m.subject.to_string(),
            original: header(headers::DLQ_SUBJECT),
            reason: header(headers::DLQ_REASON),
            payload: m.payload.clone(),
        });
    }
    out
}

/// A message expected in the dead-letter stream.
struct Expected {
    /// What it is, for failure messages.
    what: &'static str,
    /// The component expected to dead-letter it (`coordinator` or a service).
    component: &'static str,
    /// The subject it was published on.
    subject: String,
    payload: Vec<u8>,
    /// Each of these must appear in the reason.
    reason: Vec<String>,
}

impl Expected {
    fn new(
        what: &'static str,
        component: &'static str,
        subject: impl Into<String>,
        payload: Vec<u8>,
        reason: &[&str],
    ) -> Self {
        Expected {
            what,
            component,
            subject: subject.into(),
            payload,
            reason: reason.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn matches(&self, d: &DeadLetter) -> bool {
        d.original.as_deref() == Some(self.subject.as_str()) && d.payload[..] == self.payload[..]
    }
}

/// Waits (bounded) until every expected message is in the dead-letter stream, then checks
/// each one is there exactly once, on its component's subject, with a reason that says what
/// was wrong.
async fn expect_dead_lettered(js: &jetstream::Context, expected: &[Expected]) -> Vec<DeadLetter> {
    expect_dead_lettered_within(js, expected, WAIT).await
}

/// [`expect_dead_lettered`], waiting at most `limit`.
async fn expect_dead_lettered_within(
    js: &jetstream::Context,
    expected: &[Expected],
    limit: Duration,
) -> Vec<DeadLetter> {
    let deadline = Instant::now() + limit;
    let all = loop {
        let all = dead_letters(js).await;
        let missing: Vec<_> =
            expected.iter().filter(|e| !all.iter().any(|d| e.matches(d))).map(|e| e.what).collect();
        if missing.is_empty() {
            break all;
        }
        if Instant::now() > deadline {
            panic!(
                "not dead-lettered within {limit:?}: {missing:?}; dead letters: {:#?}",
                all.iter().map(|d| (&d.subject, &d.original, &d.reason)).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for e in expected {
        let found: Vec<_> = all.iter().filter(|d| e.matches(d)).collect();
        assert_eq!(found.len(), 1, "{}: dead-lettered {} times: {found:#?}", e.what, found.len());
        let d = found[0];
        assert_eq!(d.subject, subjects::dlq(e.component), "{}: dead-letter subject", e.what);
        let reason = d.reason.as_deref().unwrap_or_else(|| panic!("{}: no reason header", e.what));
        for part in &e.reason {
            assert!(reason.contains(part.as_str()), "{}: reason {reason:?} lacks {part:?}", e.what);
        }
    }
    all
}

/// Waits (bounded) until the consumer `consumer` of `stream` has acknowledged (or
/// terminated) everything up to stream sequence `seq`.
async fn wait_consumed(js: &jetstream::Context, stream: &str, consumer: &str, seq: u64) {
    let stream_handle = js.get_stream(stream).await.expect("stream");
    let deadline = Instant::now() + WAIT;
    loop {
        let info = stream_handle.consumer_info(consumer).await.expect("consumer info");
        if info.ack_floor.stream_sequence >= seq && info.num_ack_pending == 0 {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{consumer} did not consume sequence {seq} of {stream} within {WAIT:?}: {info:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A participant for service `svc` with one action `a` (and compensation `undo-a`) that counts
/// its runs.
async fn counting_participant(
    nats: async_nats::Client,
    config: ParticipantConfig,
    runs: Arc<AtomicU32>,
) -> Participant {
    let comp_runs = runs.clone();
    Participant::builder(nats, "svc")
        .config(config)
        .action("a", move |_cmd: Command<TestInput>| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .compensation("undo-a", move |_cmd: Command<TestInput>| {
            let runs = comp_runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .start()
        .await
        .expect("participant starts")
}

/// Runs a process to its end with a bounded wait (killed if it hangs); returns its status,
/// stdout and stderr.
fn run_bounded(cmd: &mut Process, limit: Duration) -> (ExitStatus, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("process starts");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "process did not exit within {limit:?}; stderr so far: {}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, out.join().unwrap_or_default(), err.join().unwrap_or_default())
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_reply_subjects_is_dead_lettered() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let def = chain("three", &["a", "b", "c"], Duration::from_secs(10));
    let coord = coordinator(nats.clone(), vec![def]).await;
    let digest = coord.registry().latest("three").await.unwrap().digest().to_owned();
    let fx = Effects::default();
    let _p = echo_participant(nats.clone(), "svc", &["a", "b", "c"], fx.clone()).await;
    let client = client(nats.clone()).await;

    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(client.start("three", &TestInput { n, ..Default::default() }).await.unwrap());
    }
    let target = ids[0].clone();
    let other = ids[1].clone();
    let never_started = SagaId::from("never-started");
    let codec = Codec::default();
    let on = |id: &SagaId, kind: InputKind| subjects::input(id, kind);

    // Replies. Were the forged ones accepted, the target would fail and compensate.
    let failure = ReplyOutcome::Failure { reason: "forged".into(), transient: false };
    let real = codec.encode(&reply(&target, "a", 1, failure.clone())).unwrap();
    let v99 = codec.encode(&ReplyMessage { v: 99, ..reply(&target, "a", 1, failure.clone()) });
    let misaddressed = codec.encode(&reply(&other, "a", 1, failure.clone())).unwrap();
    let reply_subject = on(&target, InputKind::Reply);
    let mut expected = vec![
        Expected::new(
            "random bytes as a reply",
            "coordinator",
            &reply_subject,
            random_bytes(1, 64),
            &["reply", "malformed"],
        ),
        Expected::new(
            "truncated reply",
            "coordinator",
            &reply_subject,
            truncated(&real),
            &["reply", "malformed"],
        ),
        Expected::new(
            "empty reply",
            "coordinator",
            &reply_subject,
            Vec::new(),
            &["reply", "empty"],
        ),
        Expected::new(
            "reply of protocol version 99",
            "coordinator",
            &reply_subject,
            v99.unwrap(),
            &["reply", "protocol version 99"],
        ),
        Expected::new(
            "reply for another saga",
            "coordinator",
            &reply_subject,
            misaddressed,
            &[&format!("message for saga {other} arrived on the subject of saga {target}")],
        ),
    ];

    // Starts. Were the version-99 one accepted, `never-started` would exist.
    let start = StartMessage {
        v: PROTOCOL_VERSION,
        saga_id: never_started.clone(),
        saga: "three".into(),
        digest: digest.clone(),
        input: input_bytes(99),
        idempotency_key: None,
    };
    let start_subject = on(&never_started, InputKind::Start);
    expected.extend([
        Expected::new(
            "random bytes as a start",
            "coordinator",
            &start_subject,
            random_bytes(2, 40),
            &["start", "malformed"],
        ),
        Expected::new(
            "truncated start",
            "coordinator",
            &start_subject,
            truncated(&codec.encode(&start).unwrap()),
            &["start", "malformed"],
        ),
        Expected::new(
            "start of protocol version 99",
            "coordinator",
            &start_subject,
            codec.encode(&StartMessage { v: 99, ..start.clone() }).unwrap(),
            &["start", "protocol version 99"],
        ),
        Expected::new(
            "start for another saga",
            "coordinator",
            on(&SagaId::from("elsewhere"), InputKind::Start),
            codec.encode(&start).unwrap(),
            &["message for saga never-started arrived on the subject of saga elsewhere"],
        ),
    ]);

    // Timers and operator actions. Were the version-99 cancel accepted, the target would be
    // cancelled.
    let timer = TimerMessage {
        v: PROTOCOL_VERSION,
        saga_id: target.clone(),
        timer: Timer {
            step: "a".into(),
            phase: Phase::Action,
            attempt: 1,
            kind: TimerKind::Timeout,
        },
    };
    let cancel = OperatorMessage {
        v: 99,
        saga_id: target.clone(),
        action: OperatorAction::Cancel,
        reason: "forged".into(),
        by: None,
    };
    let timer_subject = on(&target, InputKind::Timer);
    let op_subject = on(&target, InputKind::Operator);
    expected.extend([
        Expected::new(
            "random bytes as a timer",
            "coordinator",
            &timer_subject,
            random_bytes(3, 33),
            &["timer", "malformed"],
        ),
        Expected::new(
            "truncated timer",
            "coordinator",
            &timer_subject,
            truncated(&codec.encode(&timer).unwrap()),
            &["timer", "malformed"],
        ),
        Expected::new(
            "empty timer",
            "coordinator",
            &timer_subject,
            Vec::new(),
            &["timer", "empty"],
        ),
        Expected::new(
            "random bytes as an operator action",
            "coordinator",
            &op_subject,
            random_bytes(4, 50),
            &["operator action", "malformed"],
        ),
        Expected::new(
            "cancel of protocol version 99",
            "coordinator",
            &op_subject,
            codec.encode(&cancel).unwrap(),
            &["operator action", "protocol version 99"],
        ),
        Expected::new(
            "input of an unknown kind",
            "coordinator",
            format!("saga.in.{target}.bogus"),
            random_bytes(5, 10),
            &["not a saga input subject"],
        ),
    ]);

    for e in &expected {
        publish(&js, &e.subject, e.payload.clone()).await;
    }
    expect_dead_lettered(&js, &expected).await;

    // The coordinator keeps going: a saga started after the garbage completes, and so do the
    // ones that were running, with each effect exactly once.
    ids.push(client.start("three", &TestInput { n: 5, ..Default::default() }).await.unwrap());
    let statuses = wait_all(&client, &ids, WAIT).await;
    assert!(statuses.iter().all(|s| *s == SagaStatus::Completed), "{statuses:?}");
    for id in &ids {
        for step in ["a", "b", "c"] {
            assert_eq!(fx.count(id, step, "a"), 1, "saga {id} step {step} ran once");
            assert_eq!(fx.count(id, step, "c"), 0, "saga {id} step {step} not compensated");
        }
    }
    assert!(fx.duplicates().is_empty(), "{:?}", fx.duplicates());
    assert!(
        client.get(&never_started).await.unwrap().is_none(),
        "the forged start started nothing"
    );
    assert!(client.get(&SagaId::from("elsewhere")).await.unwrap().is_none());
    // Nothing but the garbage was dead-lettered.
    let all = dead_letters(&js).await;
    assert_eq!(all.len(), expected.len(), "{all:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_command_subjects_is_dead_lettered() {
    init_logging();
    let stack = echo_stack("three", &["a", "b", "c"], Duration::from_secs(10)).await;
    let (nats, fx, client) = (stack.nats.clone(), stack.effects.clone(), stack.client.clone());
    let js = jetstream::new(nats.clone());

    let codec = Codec::default();
    let ghost = SagaId::from("ghost");
    let cmd = command(&ghost, "a", Phase::Action, 1, input_bytes(1));
    let subject = subjects::command(&"svc".into(), &"a".into());
    let expected = vec![
        Expected::new(
            "random bytes as a command",
            "svc",
            &subject,
            random_bytes(11, 64),
            &["command", "malformed"],
        ),
        Expected::new(
            "truncated command",
            "svc",
            &subject,
            truncated(&codec.encode(&cmd).unwrap()),
            &["command", "malformed"],
        ),
        Expected::new("empty command", "svc", &subject, Vec::new(), &["command", "empty"]),
        Expected::new(
            "command of protocol version 99",
            "svc",
            &subject,
            codec.encode(&CommandMessage { v: 99, ..cmd.clone() }).unwrap(),
            &["command", "protocol version 99"],
        ),
        Expected::new(
            "command for another service",
            "svc",
            &subject,
            codec.encode(&CommandMessage { service: "other".into(), ..cmd.clone() }).unwrap(),
            &["command for service other delivered to service svc"],
        ),
    ];
    for e in &expected {
        publish(&js, &e.subject, e.payload.clone()).await;
    }
    expect_dead_lettered(&js, &expected).await;
    assert_eq!(fx.total(), 0, "no handler ran for garbage");

    // The participant keeps going.
    let id = client.start("three", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    assert_eq!(client.wait(&id, WAIT).await.unwrap().status(), SagaStatus::Completed);
    assert_eq!(fx.total(), 3, "the saga's three actions ran, nothing else");
    assert!(fx.duplicates().is_empty(), "{:?}", fx.duplicates());
    assert_eq!(dead_letters(&js).await.len(), expected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_dead_lettered() {
    init_logging();
    const LIMIT: usize = 4096;
    let server = NatsServer::start();
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let def = chain("one", &["a"], Duration::from_secs(10));
    let _coord = Coordinator::start(
        nats.clone(),
        CoordinatorConfig {
            max_message_size: LIMIT,
            ..coordinator_config(vec![def], Duration::from_secs(5))
        },
    )
    .await
    .expect("coordinator starts");
    let runs = Arc::new(AtomicU32::new(0));
    let config = ParticipantConfig {
        max_message_size: LIMIT,
        lease: Duration::from_secs(2),
        ..Default::default()
    };
    let _p = counting_participant(nats.clone(), config, runs.clone()).await;
    let client = client(nats.clone()).await;

    // Messages that would be fine but for their size.
    let ghost = SagaId::from("ghost");
    let big = Payload::new(random_bytes(21, 10 * 1024));
    let codec = Codec::default();
    let big_reply = codec
        .encode(&reply(&ghost, "a", 1, ReplyOutcome::Success { output: big.clone() }))
        .unwrap();
    let big_command = codec.encode(&command(&ghost, "a", Phase::Action, 1, big.clone())).unwrap();
    let expected = vec![
        Expected::new(
            "10 KiB reply",
            "coordinator",
            subjects::input(&ghost, InputKind::Reply),
            big_reply.clone(),
            &[&format!("reply: {} bytes exceeds the limit of {LIMIT} bytes", big_reply.len())],
        ),
        Expected::new(
            "10 KiB command",
            "svc",
            subjects::command(&"svc".into(), &"a".into()),
            big_command.clone(),
            &[&format!("command: {} bytes exceeds the limit of {LIMIT} bytes", big_command.len())],
        ),
    ];
    for e in &expected {
        publish(&js, &e.subject, e.payload.clone()).await;
    }
    expect_dead_lettered(&js, &expected).await;
    assert_eq!(runs.load(Ordering::SeqCst), 0, "no handler ran for the oversized command");

    // Both keep going under the small limit.
    let id = client.start("one", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    assert_eq!(client.wait(&id, WAIT).await.unwrap().status(), SagaStatus::Completed);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // The client refuses an input over a quarter of the default limit (1 MiB, nats-server's
    // max_payload) before anything is sent, naming the sizes.
    let huge = "x".repeat(2 * 1024 * 1024);
    let err = client.start("one", &huge).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let text = err.to_string();
    assert!(text.contains("exceeds the limit of 262144 bytes"), "{text}");
    assert!(text.contains("one"), "names the saga: {text}");
}

#[test]
fn codec_too_large_names_the_sizes() {
    let ghost = SagaId::from("ghost");
    let msg = reply(&ghost, "a", 1, ReplyOutcome::Success { output: Payload::new(vec![7; 500]) });
    let bytes = Codec::default().encode(&msg).unwrap();
    let size = bytes.len();
    let small = Codec::with_max_size(100);

    let err = small.encode(&msg).unwrap_err();
    assert_eq!(err, CodecError::TooLarge { what: "reply", size, limit: 100 });
    assert_eq!(err.to_string(), format!("reply: {size} bytes exceeds the limit of 100 bytes"));

    let err = small.decode::<ReplyMessage>(&bytes).unwrap_err();
    assert_eq!(err, CodecError::TooLarge { what: "reply", size, limit: 100 });

    // Exactly at the limit is fine; one byte over is not.
    assert_eq!(Codec::with_max_size(size).decode::<ReplyMessage>(&bytes).unwrap(), msg);
    assert!(matches!(
        Codec::with_max_size(size - 1).encode(&msg),
        Err(CodecError::TooLarge { limit, .. }) if limit == size - 1
    ));
    assert_eq!(DEFAULT_MAX_MESSAGE_SIZE, Codec::default().max_size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_stale_commands() {
    init_logging();
    let stack = echo_stack("three", &["a", "b", "c"], Duration::from_secs(10)).await;
    let (nats, fx, client) = (stack.nats.clone(), stack.effects.clone(), stack.client.clone());
    let js = jetstream::new(nats.clone());

    let id = client.start("three", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    assert_eq!(fx.total(), 3);
    let input = view.state.input.clone();
    let codec = Codec::default();
    let subject_a = subjects::command(&"svc".into(), &"a".into());
    let subject_undo = subjects::command(&"svc".into(), &"undo-a".into());

    // Forged: well-formed commands the saga never sent.
    let ghost = SagaId::from("ghost");
    let no_saga = command(&ghost, "a", Phase::Action, 1, input.clone());
    let no_step = CommandMessage {
        step: "zzz".into(),
        command_id: CommandId::new(&id, &"zzz".into(), Phase::Action, 1),
        ..command(&id, "a", Phase::Action, 1, input.clone())
    };
    let future_attempt = command(&id, "a", Phase::Action, 7, input.clone());
    let undo_completed = command(&id, "a", Phase::Compensation, 1, input.clone());
    let expected = vec![
        Expected::new(
            "command for a saga that does not exist",
            "svc",
            &subject_a,
            codec.encode(&no_saga).unwrap(),
            &["ghost", "does not exist"],
        ),
        Expected::new(
            "command for a step the saga does not have",
            "svc",
            &subject_a,
            codec.encode(&no_step).unwrap(),
            &["zzz", "does not have"],
        ),
        Expected::new(
            "attempt the saga never sent",
            "svc",
            &subject_a,
            codec.encode(&future_attempt).unwrap(),
            &["is attempt 7", "at most attempt 1"],
        ),
        Expected::new(
            "compensation of a completed saga",
            "svc",
            &subject_undo,
            codec.encode(&undo_completed).unwrap(),
            &["at most attempt 0"],
        ),
    ];
    for e in &expected {
        publish(&js, &e.subject, e.payload.clone()).await;
    }
    expect_dead_lettered(&js, &expected).await;
    assert_eq!(fx.total(), 3, "no handler ran for a forged command");
    assert_eq!(fx.count(&id, "a", "c"), 0, "the completed saga was not compensated");
    assert_eq!(fx.count(&ghost, "a", "a"), 0);

    // Stale: attempt 1 of step a again, long after it succeeded. Dropped: no handler, no
    // reply, no dead letter.
    let mut replies = nats.subscribe(subjects::input(&id, InputKind::Reply)).await.unwrap();
    nats.flush().await.unwrap();
    let stale = codec.encode(&command(&id, "a", Phase::Action, 1, input.clone())).unwrap();
    let seq = publish(&js, &subject_a, stale.clone()).await;
    wait_consumed(
        &js,
        subjects::COMMAND_STREAM,
        &subjects::participant_consumer(&"svc".into()),
        seq,
    )
    .await;
    nats.flush().await.unwrap();
    let late = tokio::time::timeout(Duration::from_millis(500), replies.next()).await;
    assert!(late.is_err(), "a stale command was answered: {late:?}");
    assert_eq!(fx.count(&id, "a", "a"), 1, "the stale command did not run the handler again");
    assert_eq!(fx.total(), 3);
    let all = dead_letters(&js).await;
    assert!(!all.iter().any(|d| d.payload[..] == stale[..]), "stale is not forged: {all:#?}");
    assert_eq!(all.len(), expected.len());
    // The saga is untouched.
    assert_eq!(client.get(&id).await.unwrap().unwrap().state, view.state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_without_jetstream_exits_nonzero() {
    let server =
        NatsServer::start_with(NatsServerOptions { jetstream: false, ..Default::default() });
    let bin = env!("CARGO_BIN_EXE_saga-coordinator");

    let (status, stdout, stderr) = run_bounded(
        Process::new(bin)
            .args(["--nats-url", &server.url()])
            .env_remove("SAGA_CONFIG")
            .env("RUST_LOG", "warn"),
        Duration::from_secs(30),
    );
    assert!(!status.success(), "exit status {status}; stdout {stdout}; stderr {stderr}");
    assert!(stderr.contains("JetStream is not enabled"), "stderr: {stderr}");

    let (status, stdout, stderr) = run_bounded(
        Process::new(bin).arg("--help").env_remove("NATS_URL").env_remove("SAGA_CONFIG"),
        Duration::from_secs(30),
    );
    assert!(status.success(), "exit status {status}; stderr {stderr}");
    for needle in ["--nats-url", "--definitions", "NATS_URL"] {
        assert!(stdout.contains(needle), "--help lacks {needle}: {stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_without_jetstream_is_refused() {
    let server =
        NatsServer::start_with(NatsServerOptions { jetstream: false, ..Default::default() });
    let nats = server.connect().await;

    let err = saga_nats::provision(&nats, &ProvisionConfig::default()).await.unwrap_err();
    assert!(matches!(err, ProvisionError::JetStreamDisabled { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("JetStream is not enabled"), "{text}");
    assert!(text.contains(&server.port().to_string()), "names the server: {text}");

    let err = Coordinator::start(nats.clone(), CoordinatorConfig::default()).await.unwrap_err();
    assert!(
        matches!(err, CoordinatorError::Provision(ProvisionError::JetStreamDisabled { .. })),
        "{err:?}"
    );
    let err = Participant::builder(nats.clone(), "svc").start().await.unwrap_err();
    assert!(
        matches!(err, ParticipantError::Provision(ProvisionError::JetStreamDisabled { .. })),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Unregistered definitions, large inputs and outputs, forged commands: each was a bug in
// saga-nats when these tests were written (the doc comment of each says what it was).
// ---------------------------------------------------------------------------------------------

/// How long something the coordinator or a participant should do at once may take here.
const PROMPT: Duration = Duration::from_secs(20);

/// A start naming a definition (or version) that is not registered is dead-lettered, naming
/// it. (Found as a bug: it was naked and redelivered every second forever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_of_an_unregistered_definition_is_dead_lettered() {
    init_logging();
    let stack = echo_stack("one", &["a"], Duration::from_secs(10)).await;
    let (nats, client) = (stack.nats.clone(), stack.client.clone());
    let js = jetstream::new(nats.clone());

    let codec = Codec::default();
    let start = |id: &str, saga: &str, digest: &str| StartMessage {
        v: PROTOCOL_VERSION,
        saga_id: SagaId::from(id),
        saga: saga.into(),
        digest: digest.into(),
        input: input_bytes(1),
        idempotency_key: None,
    };
    let expected = vec![
        Expected::new(
            "start of an unknown version",
            "coordinator",
            "saga.in.unknown-version.start",
            codec.encode(&start("unknown-version", "one", "0000")).unwrap(),
            &["0000", "not registered"],
        ),
        Expected::new(
            "start of an unknown saga",
            "coordinator",
            "saga.in.unknown-saga.start",
            codec.encode(&start("unknown-saga", "no-such-saga", "0000")).unwrap(),
            &["no-such-saga", "not registered"],
        ),
    ];
    for e in &expected {
        publish(&js, &e.subject, e.payload.clone()).await;
    }
    // The coordinator itself keeps going.
    let id = client.start("one", &TestInput::default()).await.unwrap();
    assert_eq!(client.wait(&id, WAIT).await.unwrap().status(), SagaStatus::Completed);
    expect_dead_lettered_within(&js, &expected, PROMPT).await;
}

/// An input of 200 KiB (just under a quarter of the limit) runs, and one of 600 KiB is refused
/// by the client. (Found as a bug: the state record held the input twice, over the limit, and
/// the start was redelivered forever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_under_a_quarter_of_the_limit_runs() {
    init_logging();
    let stack = echo_stack("one", &["a"], Duration::from_secs(10)).await;
    let (fx, client) = (stack.effects.clone(), stack.client.clone());

    let too_big = TestInput { n: 1, fail: vec!["x".repeat(600 * 1024)], ..Default::default() };
    let err = client.start("one", &too_big).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    let input = TestInput { n: 1, fail: vec!["x".repeat(200 * 1024)], ..Default::default() };
    let id = client.start("one", &input).await.unwrap();
    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    assert_eq!(fx.count(&id, "a", "a"), 1);
}

/// The size of the start message of a saga of definition `one` (version `digest`) whose
/// input encodes to `input_len` bytes.
fn start_size(digest: &str, input_len: usize) -> usize {
    let start = StartMessage {
        v: PROTOCOL_VERSION,
        saga_id: SagaId::from("0123456789abcdef0123456789abcdef"),
        saga: "one".into(),
        digest: digest.to_owned(),
        input: Payload::new(vec![0; input_len]),
        idempotency_key: None,
    };
    Codec::with_max_size(usize::MAX).encode(&start).unwrap().len()
}

/// A saga input whose start message (see [`start_size`]) is exactly `size` bytes.
fn input_of_start_size(digest: &str, size: usize) -> TestInput {
    let with = |len: usize| TestInput { n: 1, fail: vec!["x".repeat(len)], ..Default::default() };
    let encoded = |input: &TestInput| {
        Codec::with_max_size(usize::MAX).encode_value("input", input).unwrap().len()
    };
    let probe = 100_000;
    let overhead = start_size(digest, encoded(&with(probe))) - probe;
    let input = with(size - overhead);
    assert_eq!(start_size(digest, encoded(&input)), size, "sizing the input");
    input
}

/// An input whose start message fits the limit and nats-server's `max_payload`, but would leave
/// no room for the rest of the saga's state record, is refused by the client (or runs to an
/// end). (Found as a bug: `start` returned the id, then the coordinator could not save the
/// state and dead-lettered the start; the saga never existed and the caller was not told.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_near_the_limit_is_refused_or_runs() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let def = chain("one", &["a"], Duration::from_secs(10));
    let coord = coordinator(nats.clone(), vec![def]).await;
    let digest = coord.registry().latest("one").await.unwrap().digest().to_owned();
    let fx = Effects::default();
    let _p = echo_participant(nats.clone(), "svc", &["a"], fx.clone()).await;
    let client = client(nats.clone()).await;

    let input = input_of_start_size(&digest, DEFAULT_MAX_MESSAGE_SIZE - 300);
    match client.start("one", &input).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}"),
        Ok(id) => match client.wait(&id, WAIT).await {
            Ok(view) => assert!(view.status().is_terminal(), "{:?}", view.status()),
            Err(e) => panic!(
                "the client accepted the start but the saga never ran: {e}; {}",
                match client.get(&id).await.unwrap() {
                    Some(v) => format!("it is {:?}, steps {:?}", v.status(), v.state.steps),
                    None => "it was never recorded".into(),
                }
            ),
        },
    }
}

/// An input whose start message fits the codec limit (1 MiB) but not nats-server's
/// `max_payload` once its headers are added is `InvalidInput`. (Found as a bug: it was
/// `ErrorKind::Nats`, "max payload size exceeded", which reads as worth retrying.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_just_under_the_codec_limit_is_invalid_input() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let def = chain("one", &["a"], Duration::from_secs(10));
    let coord = coordinator(nats.clone(), vec![def]).await;
    let digest = coord.registry().latest("one").await.unwrap().digest().to_owned();
    let client = client(nats.clone()).await;

    let input = input_of_start_size(&digest, DEFAULT_MAX_MESSAGE_SIZE - 20);
    let err = client.start("one", &input).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
}

/// A handler whose output is over the limit (here 2 MiB) fails the step at once, with a reason
/// naming the size, and runs once. (Found as a bug: neither its effect record nor its reply
/// could be sent; the participant kept retrying and naking, and the step only ended when every
/// attempt had timed out, with nothing in the history saying why.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_output_over_the_limit_fails_the_step() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let def = chain("one", &["a"], Duration::from_secs(5));
    let _coord = coordinator(nats.clone(), vec![def]).await;
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let _p = Participant::builder(nats.clone(), "svc")
        .config(ParticipantConfig { lease: Duration::from_secs(2), ..Default::default() })
        .action("a", move |_cmd: Command<TestInput>| {
            let runs = r.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok("y".repeat(2 * 1024 * 1024))
            }
        })
        .compensation("undo-a", |_cmd: Command<TestInput>| async { Ok(()) })
        .start()
        .await
        .expect("participant starts");
    let client = client(nats.clone()).await;

    let id = client.start("one", &TestInput::default()).await.unwrap();
    let view = client.wait(&id, WAIT).await.unwrap();
    let history: Vec<_> = view.history().iter().map(|h| (h.kind, h.detail.clone())).collect();
    assert!(view.status().is_terminal(), "{:?}", view.status());
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once; history {history:?}");
    assert!(
        !view.history().iter().any(|h| h.kind == saga_core::HistoryKind::TimedOut),
        "the step failed at once, not by timing out: {history:?}"
    );
    assert!(
        view.history().iter().any(|h| h.detail.as_deref().unwrap_or("").contains("exceeds")),
        "the history says the output was too large: {history:?}"
    );
}

/// A forged command in flight's shape (step a, attempt 1, in flight) that names another
/// command (b) is dead-lettered, and b's handler does not run for step a. (Found as a bug:
/// `verify` did not compare the command with the one the saga sent, so b ran under step a's
/// effect key and its reply completed step a.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_command_naming_another_command_is_dead_lettered() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let def = chain("two", &["a", "b"], Duration::from_secs(30));
    let _coord = coordinator(nats.clone(), vec![def]).await;
    let client = client(nats.clone()).await;

    // No participant yet: step a's command waits in the stream. Take it away, so that the
    // only command in flight is a forged one: step a, attempt 1, but command b.
    let id = client.start("two", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    let deadline = Instant::now() + WAIT;
    let view = loop {
        match client.get(&id).await.unwrap() {
            Some(v) if v.state.steps[0].attempt == 1 => break v,
            _ => {}
        }
        assert!(Instant::now() < deadline, "step a was never dispatched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stream = js.get_stream(subjects::COMMAND_STREAM).await.unwrap();
    stream.purge().filter("saga.cmd.svc.>").await.unwrap();
    let forged = CommandMessage {
        command: "b".into(),
        ..command(&id, "a", Phase::Action, 1, view.state.input.clone())
    };
    let expected = vec![Expected::new(
        "command b for step a",
        "svc",
        "saga.cmd.svc.b",
        Codec::default().encode(&forged).unwrap(),
        &["\"b\"", "step a"],
    )];
    let seq = publish(&js, &expected[0].subject, expected[0].payload.clone()).await;
    let fx = Effects::default();
    let _p = echo_participant(nats.clone(), "svc", &["a", "b"], fx.clone()).await;
    wait_consumed(
        &js,
        subjects::COMMAND_STREAM,
        &subjects::participant_consumer(&"svc".into()),
        seq,
    )
    .await;
    let step_a = client.get(&id).await.unwrap().unwrap().state.steps[0].clone();
    assert_eq!(
        fx.count(&id, "b", "a"),
        0,
        "command b ran for step a, which is now {:?} with output {:?}",
        step_a.status,
        step_a.output
    );
    expect_dead_lettered_within(&js, &expected, PROMPT).await;
}
