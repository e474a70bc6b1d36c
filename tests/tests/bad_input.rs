//! Bad input against real nats-server processes (protocol v2): garbage, truncated, empty,
//! oversized, wrong-version, mis-addressed, forged and stale messages on the subjects the
//! coordinator and participants consume (the input stream, core command requests, reply
//! subjects), forged replies from another service, tampered definitions, conflicting keyed
//! starts, poison inputs, attacker-sized values, and a server without JetStream.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Command as Process, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use saga_core::wire::{
    CommandMessage, OperatorAction, OperatorMessage, ReplyMessage, ReplyOutcome, StartMessage,
    DEFAULT_MAX_MESSAGE_SIZE, MAX_QUOTED, PROTOCOL_VERSION,
};
use saga_core::{
    Codec, CodecError, LifecycleKind, Payload, Phase, SagaDefinition, SagaId, SagaStatus, StepName,
    TimelineEvent as T, Timestamp,
};
use saga_nats::subjects::{self, headers, ReplyTo};
use saga_nats::{
    Command, Coordinator, CoordinatorConfig, CoordinatorError, ErrorKind, Participant,
    ParticipantConfig, ParticipantError, ProvisionConfig, ProvisionError, SagaClient,
};
use saga_tests::support::*;
use saga_tests::{NatsServer, NatsServerOptions};

const WAIT: Duration = Duration::from_secs(60);

/// How long something the coordinator or a participant should do at once may take here.
const PROMPT: Duration = Duration::from_secs(30);

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

/// Encodes a message with no size limit (the tests build oversized ones on purpose).
fn encode<M: saga_core::wire::WireMessage>(msg: &M) -> Vec<u8> {
    Codec::with_max_size(usize::MAX).encode(msg).expect("test message encodes")
}

/// The reply subject of one command.
fn reply_to(
    replica: &str,
    service: &str,
    saga: &SagaId,
    step: &str,
    phase: Phase,
    attempt: u32,
) -> String {
    ReplyTo {
        replica: replica.to_owned(),
        service: service.into(),
        saga_id: saga.clone(),
        step: step.into(),
        phase,
        attempt,
    }
    .subject()
}

/// A well-formed reply from service `service`.
fn reply(
    saga: &SagaId,
    service: &str,
    step: &str,
    attempt: u32,
    outcome: ReplyOutcome,
) -> ReplyMessage {
    ReplyMessage {
        v: PROTOCOL_VERSION,
        saga_id: saga.clone(),
        step: step.into(),
        phase: Phase::Action,
        attempt,
        service: service.into(),
        command: step.into(),
        outcome,
    }
}

/// A well-formed command of saga definition `three` to service `svc`, due far in the future.
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
        step: step.into(),
        phase,
        attempt,
        service: "svc".into(),
        command: command.as_str().into(),
        deadline: Timestamp(u64::MAX / 2),
        input,
        deps: BTreeMap::new(),
        output: None,
        exclusive: false,
    }
}

/// A well-formed start of definition `saga` version `digest`.
fn start_message(key: &str, saga: &str, digest: &str, input: Payload) -> StartMessage {
    StartMessage {
        v: PROTOCOL_VERSION,
        saga_id: SagaId::for_key(&saga.into(), key),
        saga: saga.into(),
        digest: digest.to_owned(),
        input,
        key: key.to_owned(),
    }
}

/// A well-formed operator action.
fn operator(id: &SagaId, action: OperatorAction, reason: &str) -> OperatorMessage {
    OperatorMessage { v: PROTOCOL_VERSION, saga_id: id.clone(), action, reason: reason.to_owned() }
}

/// Publishes through JetStream and waits for the stream's acknowledgement (once an earlier
/// input on the same subject is handled); returns the stream sequence.
async fn publish(js: &jetstream::Context, subject: &str, payload: Vec<u8>) -> u64 {
    publish_when_free(js, subject, payload, WAIT).await
}

/// Publishes on core NATS, with a reply subject when `reply` is given, and flushes.
async fn publish_core(
    nats: &async_nats::Client,
    subject: &str,
    reply: Option<&str>,
    payload: Vec<u8>,
) {
    let payload = Bytes::from(payload);
    match reply {
        Some(r) => nats.publish_with_reply(subject.to_owned(), r.to_owned(), payload).await,
        None => nats.publish(subject.to_owned(), payload).await,
    }
    .unwrap_or_else(|e| panic!("publish to {subject}: {e}"));
    nats.flush().await.expect("flush");
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
    /// The component expected to dead-letter it (`coordinator`, a service or a follower).
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

/// Waits (at most `limit`) for the first dead letter on `saga.dlq.<component>` whose reason
/// contains `needle`.
async fn wait_dead_letter(
    js: &jetstream::Context,
    component: &str,
    needle: &str,
    limit: Duration,
) -> DeadLetter {
    let deadline = Instant::now() + limit;
    loop {
        let all = dead_letters(js).await;
        if let Some(d) = all.iter().find(|d| {
            d.subject == subjects::dlq(component)
                && d.reason.as_deref().is_some_and(|r| r.contains(needle))
        }) {
            return d.clone();
        }
        if Instant::now() > deadline {
            panic!(
                "no dead letter of {component} with {needle:?} within {limit:?}: {:#?}",
                all.iter().map(|d| (&d.subject, &d.original, &d.reason)).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) until `check` holds for saga `id`'s view.
async fn wait_until(
    client: &SagaClient,
    id: &SagaId,
    what: &str,
    check: impl Fn(&saga_nats::SagaView) -> bool,
) -> saga_nats::SagaView {
    let deadline = Instant::now() + WAIT;
    loop {
        let view = client.get(id).await.unwrap();
        if let Some(v) = view.as_ref().filter(|v| check(v)) {
            return v.clone();
        }
        if Instant::now() > deadline {
            panic!("saga {id}: {what} did not happen within {WAIT:?}: {view:?}");
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
// Garbage on every subject family
// ---------------------------------------------------------------------------------------------

/// Garbage on the coordinator's subjects: starts and operator actions on the input stream,
/// subjects of input kinds that do not exist (v1's `timer` and `reply` among them), and
/// replies on the coordinator's reply subjects. Each is dead-lettered once, with a reason that
/// says what was wrong, and the sagas running meanwhile end as if nothing had happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_coordinator_subjects_is_dead_lettered() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let def = chain("three", &["a", "b", "c"], Duration::from_secs(10));
    let coord = coordinator(nats.clone(), vec![def]).await;
    let digest = coord.registry().latest("three").await.unwrap().digest().to_owned();
    let replica = coord.replica().to_owned();
    let fx = Effects::default();
    let _p = echo_participant(nats.clone(), "svc", &["a", "b", "c"], fx.clone()).await;
    let client = client(nats.clone()).await;

    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(client.start("three", &TestInput { n, ..Default::default() }).await.unwrap());
    }
    let target = ids[0].clone();
    let other = ids[1].clone();
    let never_started = SagaId::for_key(&"three".into(), "never-started");
    let start_on = |id: &SagaId| subjects::start(id, &"three".into());
    let op_on = |id: &SagaId| subjects::operator(id, &"three".into(), "mallory");

    // Replies, on the reply subject of the target's first command. Were a forged failure
    // accepted, the target would compensate.
    let failure = ReplyOutcome::Failure { reason: "forged".into(), transient: false };
    let real = reply(&target, "svc", "a", 1, failure.clone());
    let reply_subject = reply_to(&replica, "svc", &target, "a", Phase::Action, 1);
    let mut replies = vec![
        Expected::new(
            "random bytes as a reply",
            "coordinator",
            &reply_subject,
            random_bytes(1, 64),
            &["reply does not decode", "reply: malformed"],
        ),
        Expected::new(
            "truncated reply",
            "coordinator",
            &reply_subject,
            truncated(&encode(&real)),
            &["reply: malformed"],
        ),
        Expected::new(
            "empty reply",
            "coordinator",
            &reply_subject,
            Vec::new(),
            &["reply: empty message"],
        ),
        Expected::new(
            "reply of protocol version 99",
            "coordinator",
            &reply_subject,
            encode(&ReplyMessage { v: 99, ..real.clone() }),
            &["reply: protocol version 99 is not supported"],
        ),
        Expected::new(
            "reply of protocol version 1",
            "coordinator",
            &reply_subject,
            encode(&ReplyMessage { v: 1, ..real.clone() }),
            &["reply: protocol version 1 is not supported (this build speaks 2)"],
        ),
        Expected::new(
            "reply for another saga",
            "coordinator",
            &reply_subject,
            encode(&reply(&other, "svc", "a", 1, failure.clone())),
            &[&format!("reply names saga {other} step a"), "reply subject of another command"],
        ),
        Expected::new(
            "reply for another attempt",
            "coordinator",
            &reply_subject,
            encode(&reply(&target, "svc", "a", 2, failure.clone())),
            &["attempt 2", "reply subject of another command"],
        ),
        Expected::new(
            "reply whose step holds a wildcard",
            "coordinator",
            &reply_subject,
            encode(&ReplyMessage { step: "a.>".into(), ..real.clone() }),
            &["reply: field step \"a.>\"", "only letters, digits"],
        ),
        Expected::new(
            "reply whose service is empty",
            "coordinator",
            &reply_subject,
            encode(&ReplyMessage { service: "".into(), ..real.clone() }),
            &["reply: field service \"\" is empty"],
        ),
    ];

    // Starts. Were any accepted, `never-started` would exist.
    let start = start_message("never-started", "three", &digest, input_bytes(99));
    let start_subject = start_on(&never_started);
    let elsewhere = start_message("elsewhere", "three", &digest, input_bytes(98));
    let mut inputs = vec![
        Expected::new(
            "random bytes as a start",
            "coordinator",
            &start_subject,
            random_bytes(2, 40),
            &["start: malformed"],
        ),
        Expected::new(
            "truncated start",
            "coordinator",
            &start_subject,
            truncated(&encode(&start)),
            &["start: malformed"],
        ),
        Expected::new(
            "empty start",
            "coordinator",
            &start_subject,
            Vec::new(),
            &["start: empty message"],
        ),
        Expected::new(
            "start of protocol version 99",
            "coordinator",
            &start_subject,
            encode(&StartMessage { v: 99, ..start.clone() }),
            &["start: protocol version 99"],
        ),
        Expected::new(
            "start of protocol version 1",
            "coordinator",
            &start_subject,
            encode(&StartMessage { v: 1, ..start.clone() }),
            &["start: protocol version 1 is not supported (this build speaks 2)"],
        ),
        Expected::new(
            "start for another saga",
            "coordinator",
            &start_subject,
            encode(&elsewhere),
            &[&format!(
                "start for saga {} (three) arrived on the subject of saga {never_started} (three)",
                elsewhere.saga_id
            )],
        ),
        Expected::new(
            "start whose saga id holds a wildcard",
            "coordinator",
            &start_subject,
            encode(&StartMessage { saga_id: SagaId::new_unchecked("never-*"), ..start.clone() }),
            &["start: field saga_id \"never-*\"", "contains '*'"],
        ),
        Expected::new(
            "start whose saga name holds a space",
            "coordinator",
            &start_subject,
            encode(&StartMessage { saga: "th ree".into(), ..start.clone() }),
            &["start: field saga \"th ree\"", "contains ' '"],
        ),
        Expected::new(
            "start whose saga id is empty",
            "coordinator",
            &start_subject,
            encode(&StartMessage { saga_id: SagaId::new_unchecked(""), ..start.clone() }),
            &["start: field saga_id \"\" is empty"],
        ),
        Expected::new(
            "start whose digest is not one",
            "coordinator",
            &start_subject,
            encode(&StartMessage { digest: "0000".into(), ..start.clone() }),
            &["start: field digest \"0000\" is not a definition digest"],
        ),
        Expected::new(
            "start whose id is not the one its key gives",
            "coordinator",
            &start_subject,
            encode(&StartMessage { key: "another-key".into(), ..start.clone() }),
            &["start: field saga_id", "is not the id of a saga three started with this key"],
        ),
        Expected::new(
            "start with an empty key",
            "coordinator",
            &start_subject,
            encode(&StartMessage { key: String::new(), ..start.clone() }),
            &["start: field key \"\" must be 1 to 256 bytes long"],
        ),
        Expected::new(
            "start on the subject of another definition",
            "coordinator",
            subjects::start(&never_started, &"two".into()),
            encode(&start),
            &[&format!("start for saga {never_started} (three) arrived on the subject of saga {never_started} (two)")],
        ),
    ];

    // Operator actions. Were the cancels accepted, the target would be cancelled.
    let cancel = operator(&target, OperatorAction::Cancel, "forged");
    let op_subject = op_on(&target);
    inputs.extend([
        Expected::new(
            "random bytes as an operator action",
            "coordinator",
            &op_subject,
            random_bytes(4, 50),
            &["operator action: malformed"],
        ),
        Expected::new(
            "truncated operator action",
            "coordinator",
            &op_subject,
            truncated(&encode(&cancel)),
            &["operator action: malformed"],
        ),
        Expected::new(
            "cancel of protocol version 99",
            "coordinator",
            &op_subject,
            encode(&OperatorMessage { v: 99, ..cancel.clone() }),
            &["operator action: protocol version 99"],
        ),
        Expected::new(
            "cancel of protocol version 1",
            "coordinator",
            &op_subject,
            encode(&OperatorMessage { v: 1, ..cancel.clone() }),
            &["operator action: protocol version 1 is not supported (this build speaks 2)"],
        ),
        Expected::new(
            "cancel for another saga",
            "coordinator",
            &op_subject,
            encode(&OperatorMessage { saga_id: other.clone(), ..cancel.clone() }),
            &[&format!("operator action for saga {other} arrived on the subject of saga {target}")],
        ),
        Expected::new(
            "cancel whose saga id is a wildcard",
            "coordinator",
            &op_subject,
            encode(&OperatorMessage { saga_id: SagaId::new_unchecked(">"), ..cancel.clone() }),
            &["operator action: field saga_id \">\""],
        ),
        // v1's timer and reply inputs are gone: their subjects are inputs of no kind now.
        Expected::new(
            "a v1 timer input",
            "coordinator",
            format!("saga.in.{target}.timer"),
            random_bytes(3, 33),
            &["not a saga input subject", "timer"],
        ),
        Expected::new(
            "a v1 reply input",
            "coordinator",
            format!("saga.in.{target}.reply"),
            encode(&real),
            &["not a saga input subject"],
        ),
        Expected::new(
            "input of an unknown kind",
            "coordinator",
            format!("saga.in.{target}.bogus"),
            random_bytes(5, 10),
            &["not a saga input subject"],
        ),
        Expected::new(
            "operator action naming no operator",
            "coordinator",
            format!("saga.in.{target}.three.op"),
            encode(&cancel),
            &["not a saga input subject"],
        ),
        Expected::new(
            "input with an extra subject level",
            "coordinator",
            format!("saga.in.{target}.three.op.mallory.x"),
            encode(&cancel),
            &["not a saga input subject"],
        ),
        Expected::new(
            "cancel naming the saga a saga of another definition",
            "coordinator",
            subjects::operator(&target, &"two".into(), "mallory"),
            encode(&cancel),
            &[&format!("operator action by mallory names saga {target} a two, but it is a three")],
        ),
    ]);

    for e in &inputs {
        publish(&js, &e.subject, e.payload.clone()).await;
    }
    for e in &replies {
        publish_core(&nats, &e.subject, None, e.payload.clone()).await;
    }
    // A reply subject that names no command is dropped (there is no body to trust).
    publish_core(&nats, &format!("saga.reply.{replica}.svc.x"), None, encode(&real)).await;
    inputs.append(&mut replies);
    expect_dead_lettered(&js, &inputs).await;

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
        "the forged starts started nothing"
    );
    // Nothing but the garbage was dead-lettered.
    let all = dead_letters(&js).await;
    assert_eq!(all.len(), inputs.len(), "{all:#?}");
}

/// Garbage on a participant's command subjects: bodies that do not decode, of other versions,
/// with bad tokens, for another service; commands without a reply subject of the service, or
/// whose body disagrees with their subject or reply subject. Each is dead-lettered once by
/// the participant and no handler runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_command_subjects_is_dead_lettered() {
    init_logging();
    let stack = echo_stack("three", &["a", "b", "c"], Duration::from_secs(10)).await;
    let (nats, fx, client) = (stack.nats.clone(), stack.effects.clone(), stack.client.clone());
    let js = jetstream::new(nats.clone());

    // Each case has its own saga id, so that each body is distinct.
    let ghost = |n: u32| SagaId::new_unchecked(format!("ghost-{n}"));
    let cmd = |n: u32| command(&ghost(n), "a", Phase::Action, 1, input_bytes(1));
    let to = |n: u32| reply_to("attacker", "svc", &ghost(n), "a", Phase::Action, 1);
    let subject = subjects::command(&"svc".into(), &"a".into());
    // (case, reply subject, expected)
    let cases: Vec<(Option<String>, Expected)> = vec![
        (
            Some(to(1)),
            Expected::new(
                "random bytes as a command",
                "svc",
                &subject,
                random_bytes(11, 64),
                &["command: malformed"],
            ),
        ),
        (
            Some(to(2)),
            Expected::new(
                "truncated command",
                "svc",
                &subject,
                truncated(&encode(&cmd(2))),
                &["command: malformed"],
            ),
        ),
        (
            Some(to(3)),
            Expected::new("empty command", "svc", &subject, Vec::new(), &["command: empty"]),
        ),
        (
            Some(to(4)),
            Expected::new(
                "command of protocol version 99",
                "svc",
                &subject,
                encode(&CommandMessage { v: 99, ..cmd(4) }),
                &["command: protocol version 99"],
            ),
        ),
        (
            Some(to(5)),
            Expected::new(
                "command of protocol version 1",
                "svc",
                &subject,
                encode(&CommandMessage { v: 1, ..cmd(5) }),
                &["command: protocol version 1 is not supported (this build speaks 2)"],
            ),
        ),
        (
            Some(to(6)),
            Expected::new(
                "command for another service",
                "svc",
                &subject,
                encode(&CommandMessage { service: "other".into(), ..cmd(6) }),
                &["command for service other delivered to service svc"],
            ),
        ),
        (
            Some(to(7)),
            Expected::new(
                "command whose saga id holds a space",
                "svc",
                &subject,
                encode(&CommandMessage { saga_id: SagaId::new_unchecked("ghost 7"), ..cmd(7) }),
                &["command: field saga_id \"ghost 7\"", "contains ' '"],
            ),
        ),
        (
            Some(to(8)),
            Expected::new(
                "command whose deps name a wildcard",
                "svc",
                &subject,
                encode(&CommandMessage {
                    deps: BTreeMap::from([(StepName::from("*"), Payload::default())]),
                    ..cmd(8)
                }),
                &["command: field deps \"*\""],
            ),
        ),
        (
            None,
            Expected::new(
                "command without a reply subject",
                "svc",
                &subject,
                encode(&cmd(9)),
                &["command without a reply subject of service svc", "none"],
            ),
        ),
        (
            Some(reply_to("attacker", "other", &ghost(10), "a", Phase::Action, 1)),
            Expected::new(
                "command whose replies go to another service",
                "svc",
                &subject,
                encode(&cmd(10)),
                &["command without a reply subject of service svc", "saga.reply.attacker.other"],
            ),
        ),
        (
            Some("_INBOX.attacker".into()),
            Expected::new(
                "command whose replies go to an inbox",
                "svc",
                &subject,
                encode(&cmd(11)),
                &["command without a reply subject of service svc", "_INBOX.attacker"],
            ),
        ),
        (
            Some(to(12)),
            Expected::new(
                "command whose attempt is not its reply subject's",
                "svc",
                &subject,
                encode(&CommandMessage { attempt: 7, ..cmd(12) }),
                &["attempt 7", "its reply subject names another command"],
            ),
        ),
        (
            Some(to(13)),
            Expected::new(
                "command whose step is not its reply subject's",
                "svc",
                &subject,
                encode(&CommandMessage { step: "zzz".into(), ..cmd(13) }),
                &["step zzz", "its reply subject names another command"],
            ),
        ),
        (
            Some(to(14)),
            Expected::new(
                "command b on the subject of command a",
                "svc",
                &subject,
                encode(&CommandMessage { command: "b".into(), ..cmd(14) }),
                &["command \"b\" arrived on subject saga.cmd.svc.a"],
            ),
        ),
    ];
    for (reply, e) in &cases {
        publish_core(&nats, &e.subject, reply.as_deref(), e.payload.clone()).await;
    }
    let expected: Vec<Expected> = cases.into_iter().map(|(_, e)| e).collect();
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
    let coord = Coordinator::start(
        nats.clone(),
        CoordinatorConfig {
            max_message_size: LIMIT,
            ..coordinator_config(vec![def], Duration::from_secs(5))
        },
    )
    .await
    .expect("coordinator starts");
    let digest = coord.registry().latest("one").await.unwrap().digest().to_owned();
    let runs = Arc::new(AtomicU32::new(0));
    let config = ParticipantConfig { max_message_size: LIMIT, ..Default::default() };
    let _p = counting_participant(nats.clone(), config, runs.clone()).await;
    let client = client(nats.clone()).await;

    // Messages that would be fine but for their size.
    let ghost = SagaId::from("ghost");
    let big = Payload::new(random_bytes(21, 10 * 1024));
    let big_reply =
        encode(&reply(&ghost, "svc", "a", 1, ReplyOutcome::Success { output: big.clone() }));
    let big_command = encode(&CommandMessage {
        saga: "one".into(),
        ..command(&ghost, "a", Phase::Action, 1, big.clone())
    });
    let big_start = encode(&start_message("ghost", "one", &digest, big.clone()));
    let big_op = encode(&operator(&ghost, OperatorAction::Cancel, &"r".repeat(10 * 1024)));
    let sized =
        |what: &str, len: usize| format!("{what}: {len} bytes exceeds the limit of {LIMIT} bytes");
    let expected = vec![
        Expected::new(
            "10 KiB reply",
            "coordinator",
            reply_to(coord.replica(), "svc", &ghost, "a", Phase::Action, 1),
            big_reply.clone(),
            &[&sized("reply", big_reply.len())],
        ),
        Expected::new(
            "10 KiB command",
            "svc",
            subjects::command(&"svc".into(), &"a".into()),
            big_command.clone(),
            &[&sized("command", big_command.len())],
        ),
        Expected::new(
            "10 KiB start",
            "coordinator",
            subjects::start(&ghost, &"one".into()),
            big_start.clone(),
            &[&sized("start", big_start.len())],
        ),
        Expected::new(
            "10 KiB operator action",
            "coordinator",
            subjects::operator(&ghost, &"one".into(), "mallory"),
            big_op.clone(),
            &[&sized("operator action", big_op.len())],
        ),
    ];
    publish_core(&nats, &expected[0].subject, None, big_reply).await;
    let command_reply = reply_to("attacker", "svc", &ghost, "a", Phase::Action, 1);
    publish_core(&nats, &expected[1].subject, Some(&command_reply), big_command).await;
    publish(&js, &expected[2].subject, big_start).await;
    publish(&js, &expected[3].subject, big_op).await;
    expect_dead_lettered(&js, &expected).await;
    assert_eq!(runs.load(Ordering::SeqCst), 0, "no handler ran for the oversized command");
    assert!(client.get(&ghost).await.unwrap().is_none(), "the oversized start started nothing");

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
    let msg =
        reply(&ghost, "svc", "a", 1, ReplyOutcome::Success { output: Payload::new(vec![7; 500]) });
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

/// A command repeated long after it ran (stale) does not run its handler again: the
/// participant re-sends the recorded reply, and the coordinator, for which the saga is over,
/// changes nothing. A command past its deadline is dropped: no handler, no reply, no dead
/// letter. (v1's participants checked commands against the saga's state; v2's never read it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_and_expired_commands_do_not_run() {
    init_logging();
    let stack = echo_stack("three", &["a", "b", "c"], Duration::from_secs(10)).await;
    let (nats, fx, client) = (stack.nats.clone(), stack.effects.clone(), stack.client.clone());
    let js = jetstream::new(nats.clone());
    let replica = stack.coordinator.replica().to_owned();

    let id = client.start("three", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    assert_eq!(fx.total(), 3);
    let input = view.snapshot.input.clone();
    let subject_a = subjects::command(&"svc".into(), &"a".into());
    let mut replies = nats.subscribe("saga.reply.attacker.>").await.unwrap();
    nats.flush().await.unwrap();

    // Expired first, so that by the time the stale command's reply is back the expired one
    // has most likely been looked at too.
    let expired_id = SagaId::from("expired");
    let expired = CommandMessage {
        deadline: Timestamp(1),
        ..command(&expired_id, "a", Phase::Action, 1, input.clone())
    };
    let expired_to = reply_to("attacker", "svc", &expired_id, "a", Phase::Action, 1);
    publish_core(&nats, &subject_a, Some(&expired_to), encode(&expired)).await;

    // Stale: attempt 1 of step a again, to an attacker's replica and to the real one.
    let stale = encode(&command(&id, "a", Phase::Action, 1, input.clone()));
    let stale_to = reply_to("attacker", "svc", &id, "a", Phase::Action, 1);
    publish_core(&nats, &subject_a, Some(&stale_to), stale.clone()).await;
    let real_to = reply_to(&replica, "svc", &id, "a", Phase::Action, 1);
    publish_core(&nats, &subject_a, Some(&real_to), stale.clone()).await;
    let answer = tokio::time::timeout(WAIT, replies.next())
        .await
        .expect("the stale command is answered")
        .expect("subscription open");
    assert_eq!(answer.subject.as_str(), stale_to, "only the stale command is answered");
    let answer: ReplyMessage = Codec::default().decode(&answer.payload).unwrap();
    let recorded = view.snapshot.steps[0].output.clone().expect("a's output");
    assert_eq!(answer.outcome, ReplyOutcome::Success { output: recorded }, "the recorded reply");
    assert_eq!(fx.count(&id, "a", "a"), 1, "the stale command did not run the handler again");

    // Let the expired command be looked at for a while longer: nothing comes of it.
    let late = tokio::time::timeout(Duration::from_secs(2), replies.next()).await;
    assert!(late.is_err(), "the expired command was answered: {late:?}");
    assert_eq!(fx.count(&expired_id, "a", "a"), 0, "the expired command ran");
    assert_eq!(fx.total(), 3);
    let all = dead_letters(&js).await;
    assert!(all.is_empty(), "stale and expired are not forged: {all:#?}");
    // The saga is untouched.
    let after = client.get(&id).await.unwrap().unwrap();
    assert_eq!(after.snapshot, view.snapshot);
}

/// v2's form of v1's forged command naming another command: an attacker that sees step a's
/// command (subject and reply subject) re-sends it as command b on a's subject. It is
/// dead-lettered, and b's handler never runs for step a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_command_naming_another_command_is_dead_lettered() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let def = chain("one", &["a"], Duration::from_secs(30));
    let _coord = coordinator(nats.clone(), vec![def]).await;
    let fx = Effects::default();
    let _p = echo_participant(nats.clone(), "svc", &["a", "b"], fx.clone()).await;
    let client = client(nats.clone()).await;
    let attacker = server.connect().await;
    let mut seen = attacker.subscribe("saga.cmd.svc.>").await.unwrap();
    attacker.flush().await.unwrap();

    let id = client.start("one", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    let msg = tokio::time::timeout(WAIT, seen.next()).await.expect("command seen").unwrap();
    let reply = msg.reply.clone().expect("commands carry a reply subject").to_string();
    let cmd: CommandMessage = Codec::default().decode(&msg.payload).unwrap();
    assert_eq!((cmd.saga_id.as_str(), cmd.step.as_str()), (id.as_str(), "a"));
    let forged = encode(&CommandMessage { command: "b".into(), ..cmd });
    let expected = vec![Expected::new(
        "command b for step a",
        "svc",
        msg.subject.as_str(),
        forged.clone(),
        &["command \"b\" arrived on subject saga.cmd.svc.a"],
    )];
    publish_core(&attacker, msg.subject.as_str(), Some(&reply), forged).await;
    expect_dead_lettered_within(&js, &expected, PROMPT).await;
    assert_eq!(client.wait(&id, WAIT).await.unwrap().status(), SagaStatus::Completed);
    assert_eq!(fx.count(&id, "a", "a"), 1);
    assert_eq!(fx.count(&id, "b", "a"), 0, "command b ran for step a");
}

/// A reply must name the command its step's phase sends: one that names another command (say,
/// the reply of a forged command `b` that reused step `a`'s reply subject) is refused, and the
/// saga's outcome does not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_naming_another_command_is_refused() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    // Step a hangs on its first attempt, so that only the forged command can answer it then.
    let def = chain("one", &["a"], Duration::from_secs(5));
    let _coord = coordinator(nats.clone(), vec![def]).await;
    let fx = Effects::default();
    let _p = echo_participant(nats.clone(), "svc", &["a", "b"], fx.clone()).await;
    let client = client(nats.clone()).await;
    let attacker = server.connect().await;
    let mut seen = attacker.subscribe("saga.cmd.svc.a").await.unwrap();
    attacker.flush().await.unwrap();

    let input = TestInput { n: 1, hang: vec![("a".into(), 1)], ..Default::default() };
    let id = client.start("one", &input).await.unwrap();
    let msg = tokio::time::timeout(WAIT, seen.next()).await.expect("command seen").unwrap();
    let reply_to_subject = msg.reply.clone().expect("commands carry a reply subject").to_string();
    let cmd: CommandMessage = Codec::default().decode(&msg.payload).unwrap();
    assert_eq!(cmd.step.as_str(), "a");
    let answer = ReplyMessage {
        command: "b".into(),
        ..reply(
            &id,
            "svc",
            "a",
            1,
            ReplyOutcome::Success { output: Payload::new(echo_output("b", 1)) },
        )
    };
    let expected = vec![Expected::new(
        "the reply of command b for step a",
        "coordinator",
        &reply_to_subject,
        encode(&answer),
        &["ran command \"b\", which that step does not send: refused"],
    )];
    publish_core(&attacker, &reply_to_subject, None, encode(&answer)).await;
    expect_dead_lettered_within(&js, &expected, PROMPT).await;
    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    assert_eq!(view.snapshot.steps[0].attempt, 2, "step a completed by its own second attempt");
    assert_eq!(fx.count(&id, "a", "a"), 1);
}

// ---------------------------------------------------------------------------------------------
// Forged replies, tampered definitions, conflicting starts
// ---------------------------------------------------------------------------------------------

/// An attacker that listens on `saga.cmd.logistics.>` (it answers instead of logistics,
/// which is not running yet) sees the reply subject of the ship step. Its forged successes
/// are refused: one on the reply subject of service seller (which NATS permissions would let
/// seller publish), one on logistics' own reply subject with a body that names seller. The
/// step is not completed by them: its first attempt times out, and it succeeds only when the
/// real logistics runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reply_from_another_service_is_refused() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let def = SagaDefinition::builder("order")
        .step("reserve", "seller", "reserve", |s| {
            s.compensation("undo-reserve").timeout(Duration::from_secs(10)).retry(quick_retry(3))
        })
        .step("ship", "logistics", "ship", |s| {
            s.compensation("undo-ship").timeout(Duration::from_secs(5)).retry(quick_retry(3))
        })
        .build();
    let coord = coordinator(nats.clone(), vec![def]).await;
    let replica = coord.replica().to_owned();
    let seller_fx = Effects::default();
    let _seller = echo_participant(nats.clone(), "seller", &["reserve"], seller_fx.clone()).await;
    let client = client(nats.clone()).await;
    let attacker = server.connect().await;
    let mut seen = attacker.subscribe("saga.cmd.logistics.>").await.unwrap();
    attacker.flush().await.unwrap();

    let id = client.start("order", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    let msg = tokio::time::timeout(WAIT, seen.next()).await.expect("ship command seen").unwrap();
    let real_to = msg.reply.clone().expect("a reply subject").to_string();
    assert_eq!(real_to, reply_to(&replica, "logistics", &id, "ship", Phase::Action, 1));
    let output = Payload::new(echo_output("ship", 1));
    let success = ReplyOutcome::Success { output };
    let as_seller = encode(&reply(&id, "seller", "ship", 1, success.clone()));
    let seller_to = reply_to(&replica, "seller", &id, "ship", Phase::Action, 1);
    let expected = vec![
        Expected::new(
            "success for ship on seller's reply subject",
            "coordinator",
            &seller_to,
            as_seller.clone(),
            &[&format!(
                "reply for step ship of saga {id} came from service seller, but service logistics owns that step: refused"
            )],
        ),
        Expected::new(
            "success for ship naming seller on logistics' reply subject",
            "coordinator",
            &real_to,
            as_seller.clone(),
            &["of service seller", "arrived on the reply subject of another command"],
        ),
    ];
    publish_core(&attacker, &seller_to, None, as_seller.clone()).await;
    publish_core(&attacker, &real_to, None, as_seller).await;
    expect_dead_lettered_within(&js, &expected, PROMPT).await;
    let view = client.get(&id).await.unwrap().unwrap();
    assert_ne!(view.status(), SagaStatus::Completed, "completed by a forged reply: {view:?}");

    // The real logistics comes up; attempt 1 went to the attacker only, so it times out and
    // attempt 2 runs.
    let logistics_fx = Effects::default();
    let _logistics =
        echo_participant(nats.clone(), "logistics", &["ship"], logistics_fx.clone()).await;
    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    let timeline = client.timeline(&id).await.unwrap();
    let ship: Vec<_> = timeline
        .iter()
        .filter(|e| e.event.step().is_some_and(|s| s.as_str() == "ship"))
        .map(|e| &e.event)
        .collect();
    assert!(
        ship.iter().any(|e| matches!(e, T::TimedOut { attempt: 1, .. })),
        "ship's first attempt timed out: {ship:#?}"
    );
    assert!(
        !ship.iter().any(|e| matches!(e, T::Succeeded { attempt: 1, .. })),
        "ship's first attempt succeeded by a forged reply: {ship:#?}"
    );
    assert_eq!(logistics_fx.count(&id, "ship", "a"), 1, "the real ship ran once");
    assert_eq!(seller_fx.count(&id, "reserve", "a"), 1);
    assert_eq!(seller_fx.total() + logistics_fx.total(), 2, "nothing was compensated");
    assert_eq!(dead_letters(&js).await.len(), expected.len());
}

/// The MessagePack output of an echo step.
fn echo_output(step: &str, n: u64) -> Vec<u8> {
    Codec::default()
        .encode_value("output", &EchoOutput { step: step.into(), n })
        .expect("output encodes")
}

/// A definition overwritten in the registry under its digest (with another valid definition
/// of the same name) is refused by a coordinator that has not cached it: its start is
/// dead-lettered naming the mismatch, and no step runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definition_tampered_under_its_digest_is_refused() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    saga_nats::provision(&nats, &ProvisionConfig::default()).await.unwrap();
    let fx = Effects::default();
    let _p = echo_participant(nats.clone(), "svc", &["a", "b"], fx.clone()).await;
    let registering = client(nats.clone()).await;
    let digest =
        registering.register(&chain("two", &["a", "b"], Duration::from_secs(10))).await.unwrap();

    // The attacker stores a definition without step a under the registered digest.
    let kv = js.get_key_value(subjects::DEFINITIONS_BUCKET).await.unwrap();
    let tampered = chain("two", &["b"], Duration::from_secs(10));
    let tampered_digest = tampered.validate().unwrap().digest().to_owned();
    assert_ne!(tampered_digest, digest);
    let json = serde_json::to_vec(&tampered).unwrap();
    kv.put(format!("two.{digest}"), json.into()).await.unwrap();

    // A coordinator and a client that have never seen the definition.
    let _coord =
        Coordinator::start(nats.clone(), coordinator_config(Vec::new(), Duration::from_secs(5)))
            .await
            .unwrap();
    let fresh = client(nats.clone()).await;
    let err = fresh.start("two", &TestInput::default()).await.unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    assert_eq!(err.kind(), ErrorKind::InvalidDefinition, "{err}");

    let start = start_message("tampered", "two", &digest, input_bytes(1));
    let expected = vec![Expected::new(
        "start of a tampered version",
        "coordinator",
        subjects::start(&start.saga_id, &"two".into()),
        encode(&start),
        &["two", &digest, "does not match", &tampered_digest],
    )];
    publish(&js, &expected[0].subject, expected[0].payload.clone()).await;
    expect_dead_lettered_within(&js, &expected, PROMPT).await;
    assert_eq!(fx.total(), 0, "a step of the tampered definition ran");
    assert!(fresh.get(&start.saga_id).await.unwrap().is_none(), "the start started a saga");
}

/// A keyed start with other input is refused by the client (kind `Conflict`, naming the
/// saga), and a raw start with other input on an existing saga's subject is dead-lettered by
/// the coordinator; both while the saga runs and once it has finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_start_with_other_input_is_refused() {
    init_logging();
    let stack = echo_stack("two", &["a", "b"], Duration::from_secs(10)).await;
    let (nats, fx, client) = (stack.nats.clone(), stack.effects.clone(), stack.client.clone());
    let js = jetstream::new(nats.clone());
    let digest = stack.coordinator.registry().latest("two").await.unwrap().digest().to_owned();

    // Running: b hangs on its first attempt (30 s), so the saga is live while we attack it.
    let running_input = TestInput { n: 1, hang: vec![("b".into(), 1)], ..Default::default() };
    let finished_input = TestInput { n: 2, ..Default::default() };
    let running = client.start_with_key("two", "order-1", &running_input).await.unwrap();
    assert_eq!(running, SagaClient::id_for_key("two", "order-1"));
    wait_until(&client, &running, "step a succeeded", |v| v.logged).await;
    let finished = client.start_with_key("two", "order-2", &finished_input).await.unwrap();
    assert_eq!(client.wait(&finished, WAIT).await.unwrap().status(), SagaStatus::Completed);

    let mut expected = Vec::new();
    let cases = [
        ("other input for a running saga", "order-1", &running, &running_input),
        ("other input for a finished saga", "order-2", &finished, &finished_input),
    ];
    for (what, key, id, input) in cases {
        // The same key and input is the same saga.
        assert_eq!(&client.start_with_key("two", key, input).await.unwrap(), id);
        let other = TestInput { n: 99, ..Default::default() };
        let err = client.start_with_key("two", key, &other).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
        let text = err.to_string();
        assert!(text.contains(id.as_str()) && text.contains("another input"), "{text}");

        let forged = start_message(key, "two", &digest, input_bytes(99));
        let subject = subjects::start(id, &"two".into());
        if id == &running {
            // While a saga's start waits, the server refuses a second one on its subject.
            let refused = js.publish(subject.clone(), Bytes::from(encode(&forged))).await;
            let err = match refused {
                Ok(ack) => ack.await.expect_err("a second start while one waits is refused"),
                Err(e) => panic!("publish: {e}"),
            };
            assert!(err.to_string().contains("maximum messages per subject"), "{err}");
            continue;
        }
        expected.push(Expected::new(
            what,
            "coordinator",
            subject,
            encode(&forged),
            &[&format!("saga {id} already exists with another definition or input")],
        ));
    }
    for e in &expected {
        publish(&js, &e.subject, e.payload.clone()).await;
    }
    expect_dead_lettered_within(&js, &expected, PROMPT).await;

    // The running saga goes on with its own input (b's retry succeeds) and nothing ran twice.
    let view = client.wait(&running, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    assert_eq!(view.input::<TestInput>().unwrap().n, 1);
    assert_eq!(client.get(&finished).await.unwrap().unwrap().input::<TestInput>().unwrap().n, 2);
    assert!(fx.duplicates().is_empty(), "{:?}", fx.duplicates());
    assert_eq!(fx.total(), 4);
}

// ---------------------------------------------------------------------------------------------
// Poison inputs and attacker-sized values
// ---------------------------------------------------------------------------------------------

/// A follower whose handler always fails has the event dead-lettered after
/// [`saga_nats::follow::MAX_DELIVERIES`] deliveries, with the handler's error; a garbage
/// record in a saga's log is dead-lettered by the follower at once, and an operator action
/// for that saga (whose log no longer decodes) is dead-lettered by the coordinator, naming
/// the saga. (The follower's redelivery delays add up to about a minute and a half.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_inputs_are_dead_lettered_after_bounded_deliveries() {
    init_logging();
    let stack = echo_stack("one", &["a"], Duration::from_secs(10)).await;
    let (nats, client) = (stack.nats.clone(), stack.client.clone());
    let js = jetstream::new(nats.clone());

    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let following = saga_nats::follow::follow_sagas(
        nats.clone(),
        "grumpy",
        Some("one"),
        &[LifecycleKind::Completed],
        move |event| {
            let calls = c.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(format!("grumpy refuses saga {}", event.saga_id))
            }
        },
    )
    .await
    .unwrap();

    let id = client.start("one", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    assert_eq!(client.wait(&id, WAIT).await.unwrap().status(), SagaStatus::Completed);

    // Garbage at the end of the finished saga's log.
    let garbage_subject = format!("saga.log.{id}.one.completed");
    let garbage = random_bytes(31, 80);
    publish(&js, &garbage_subject, garbage.clone()).await;
    let op = encode(&operator(&id, OperatorAction::Retry, "poke"));
    let op_subject = subjects::operator(&id, &"one".into(), "mallory");
    publish(&js, &op_subject, op.clone()).await;
    let expected = vec![
        Expected::new(
            "garbage log record",
            "grumpy",
            &garbage_subject,
            garbage,
            &["saga log record: malformed"],
        ),
        Expected::new(
            "operator action for a saga whose log does not decode",
            "coordinator",
            &op_subject,
            op,
            &["cannot be handled", &format!("saga {id}"), "saga log record: malformed"],
        ),
    ];
    expect_dead_lettered_within(&js, &expected, PROMPT).await;

    // The completion record, refused by the handler at each delivery: 250 ms doubling, at
    // most 30 s, between deliveries.
    let d = wait_dead_letter(&js, "grumpy", "grumpy refuses", Duration::from_secs(300)).await;
    let reason = d.reason.unwrap();
    let max = saga_nats::follow::MAX_DELIVERIES;
    assert!(
        reason.contains(&format!("event handler failed {max} times: grumpy refuses saga {id}")),
        "{reason}"
    );
    assert_eq!(
        d.original.as_deref().map(|s| s.starts_with(&format!("saga.log.{id}."))),
        Some(true)
    );
    assert_eq!(calls.load(Ordering::SeqCst), max as u32, "the handler ran once per delivery");
    following.shutdown().await;
}

/// An input that keeps failing for a reason a redelivery might cure is dead-lettered after
/// `max_deliveries`: here a cancel arrives while the saga log refuses every write (its stream
/// is full). Once the log takes writes again, the saga goes on, unharmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_failing_every_delivery_is_dead_lettered_after_max_deliveries() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let def = chain("two", &["a", "b"], Duration::from_secs(10));
    let _coord = Coordinator::start(
        nats.clone(),
        CoordinatorConfig {
            max_deliveries: 3,
            ..coordinator_config(vec![def], Duration::from_secs(5))
        },
    )
    .await
    .unwrap();
    let fx = Effects::default();
    let _p = echo_participant(nats.clone(), "svc", &["a", "b"], fx.clone()).await;
    let client = client(nats.clone()).await;

    let input = TestInput { n: 1, hang: vec![("b".into(), 1)], ..Default::default() };
    let id = client.start("two", &input).await.unwrap();
    wait_until(&client, &id, "step a succeeded", |v| v.logged).await;
    // The log stream is full: every append is refused.
    let mut log = js.get_stream(subjects::LOG_STREAM).await.unwrap();
    let info = log.info().await.unwrap().clone();
    let open = info.config.clone();
    let full = async_nats::jetstream::stream::Config {
        max_bytes: info.state.bytes as i64,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..open.clone()
    };
    js.update_stream(full).await.unwrap();

    let cancel = encode(&operator(&id, OperatorAction::Cancel, "full log"));
    let expected = vec![Expected::new(
        "cancel while the log is full",
        "coordinator",
        subjects::operator(&id, &"two".into(), "mallory"),
        cancel.clone(),
        &["not handled after 3 deliveries", &format!("saga {id}")],
    )];
    publish(&js, &expected[0].subject, cancel).await;
    let all = expect_dead_lettered(&js, &expected).await;
    assert!(all[0].reason.as_deref().unwrap().len() <= 1000, "{:?}", all[0].reason);

    js.update_stream(open).await.unwrap();
    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed, "the saga was not cancelled");
    assert_eq!(fx.total(), 2);
}

/// Collects the length of the longest log line any test of this file writes (and the line),
/// once installed as the global subscriber.
#[derive(Default)]
struct LongestLine(Mutex<(usize, String)>);

impl LongestLine {
    fn global() -> &'static LongestLine {
        static LONGEST: OnceLock<LongestLine> = OnceLock::new();
        LONGEST.get_or_init(LongestLine::default)
    }
}

struct LineSink;

impl Write for LineSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let mut longest = LongestLine::global().0.lock().expect("lock");
        for line in text.lines() {
            if line.len() > longest.0 {
                *longest = (line.len(), line.chars().take(300).collect());
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs [`LineSink`] as the global subscriber (debug and up for the saga crates). `false`
/// if another subscriber was installed first (`RUST_LOG` set).
fn capture_log_lines() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "warn,saga_nats=debug,saga_core=debug",
            ))
            .with_writer(|| LineSink)
            .with_ansi(false)
            .try_init()
            .is_ok()
    })
}

/// Attacker-sized values (a 500 KB saga id, digest or saga name in a body, a 3,000-character
/// saga id in a subject, a reason just under the message limit) crash nothing; the reasons
/// that repeat them are cut, and so are the log lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacker_sized_values_are_cut() {
    let capturing = capture_log_lines();
    let stack = echo_stack("two", &["a", "b"], Duration::from_secs(10)).await;
    let (nats, fx, client) = (stack.nats.clone(), stack.effects.clone(), stack.client.clone());
    let js = jetstream::new(nats.clone());
    let digest = stack.coordinator.registry().latest("two").await.unwrap().digest().to_owned();
    let replica = stack.coordinator.replica().to_owned();

    let input = TestInput { n: 1, hang: vec![("b".into(), 1)], ..Default::default() };
    let id = client.start("two", &input).await.unwrap();
    wait_until(&client, &id, "step a succeeded", |v| v.logged).await;

    let huge = "x".repeat(500 * 1024);
    let long_id = SagaId::new_unchecked("y".repeat(3000));
    let start = start_message("attacked", "two", &digest, input_bytes(1));
    let start_subject = subjects::start(&start.saga_id, &"two".into());
    let op_subject = subjects::operator(&id, &"two".into(), "mallory");
    let quoted = format!("\"{}…\"", "x".repeat(MAX_QUOTED));
    let reply_subject = reply_to(&replica, "svc", &id, "b", Phase::Action, 1);
    let failure = ReplyOutcome::Failure { reason: huge.clone(), transient: false };
    let expected = vec![
        Expected::new(
            "cancel whose saga id is 500 KB",
            "coordinator",
            &op_subject,
            encode(&OperatorMessage {
                saga_id: SagaId::new_unchecked(huge.clone()),
                ..operator(&id, OperatorAction::Cancel, "r")
            }),
            &["operator action: field saga_id", &quoted, "is 512000 characters long"],
        ),
        Expected::new(
            "start whose digest is 500 KB",
            "coordinator",
            &start_subject,
            encode(&StartMessage { digest: huge.clone(), ..start.clone() }),
            &["start: field digest", &quoted],
        ),
        Expected::new(
            "start whose saga name is 500 KB",
            "coordinator",
            &start_subject,
            encode(&StartMessage { saga: huge.as_str().into(), ..start.clone() }),
            &["start: field saga ", &quoted],
        ),
        Expected::new(
            "reply whose step is 500 KB",
            "coordinator",
            &reply_subject,
            encode(&ReplyMessage {
                step: huge.as_str().into(),
                ..reply(&id, "svc", "b", 1, failure.clone())
            }),
            &["reply: field step", &quoted],
        ),
    ];
    for e in &expected {
        if e.subject == reply_subject {
            publish_core(&nats, &e.subject, None, e.payload.clone()).await;
        } else {
            publish(&js, &e.subject, e.payload.clone()).await;
        }
    }
    // A subject holding a 3,000-character saga id: the dead letter's subject header is cut,
    // so find it by its body.
    let long_subject = subjects::operator(&long_id, &"two".into(), "mallory");
    let marker = encode(&operator(&id, OperatorAction::Cancel, "long subject"));
    publish(&js, &long_subject, marker.clone()).await;

    let all = expect_dead_lettered(&js, &expected).await;
    let deadline = Instant::now() + WAIT;
    let long = loop {
        let all = dead_letters(&js).await;
        if let Some(d) = all.into_iter().find(|d| d.payload[..] == marker[..]) {
            break d;
        }
        assert!(Instant::now() < deadline, "the long subject was not dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reason = long.reason.as_deref().unwrap_or("");
    assert!(reason.contains("not a saga input subject"), "{reason}");
    assert!(long.original.as_deref().unwrap_or("").len() <= 1000, "the subject header is cut");
    for d in all.iter().chain([&long]) {
        let reason = d.reason.as_deref().unwrap_or("");
        assert!(
            reason.chars().count() < 3 * MAX_QUOTED + 300,
            "reason not cut: {} chars",
            reason.len()
        );
    }

    // The saga goes on: b's retry succeeds, and it was not cancelled.
    let view = client.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    assert_eq!((fx.count(&id, "a", "a"), fx.count(&id, "b", "a")), (1, 1));
    assert!(client.get(&start.saga_id).await.unwrap().is_none());

    // A cancel whose reason is 900 KB is taken, with the reason cut: it cannot bloat every
    // later record of the saga.
    let input = TestInput { n: 2, hang: vec![("a".into(), 1)], ..Default::default() };
    let victim = client.start("two", &input).await.unwrap();
    let cancel = encode(&operator(&victim, OperatorAction::Cancel, &"z".repeat(900 * 1024)));
    publish(&js, &subjects::operator(&victim, &"two".into(), "mallory"), cancel).await;
    assert_eq!(client.wait(&victim, WAIT).await.unwrap().status(), SagaStatus::Cancelled);
    let timeline = client.timeline(&victim).await.unwrap();
    let reason = timeline
        .iter()
        .find_map(|e| match &e.event {
            T::CancelRequested { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .expect("the cancel is in the timeline");
    assert_eq!(reason.chars().count(), saga_nats::coordinator::MAX_REASON + 1, "cut, with '…'");

    if capturing {
        let longest = LongestLine::global().0.lock().expect("lock").clone();
        assert!(longest.0 > 0, "no log line was captured");
        assert!(longest.0 < 4000, "a log line of {} bytes: {}…", longest.0, longest.1);
    } else {
        eprintln!("RUST_LOG is set: log lines not checked");
    }
}

// ---------------------------------------------------------------------------------------------
// No JetStream
// ---------------------------------------------------------------------------------------------

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
// Unregistered definitions, large inputs and outputs: each was a bug in saga-nats when these
// tests were written (the doc comment of each says what it was).
// ---------------------------------------------------------------------------------------------

/// A start naming a definition (or version) that is not registered is dead-lettered, naming
/// it. (Found as a bug: it was naked and redelivered every second forever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_of_an_unregistered_definition_is_dead_lettered() {
    init_logging();
    let stack = echo_stack("one", &["a"], Duration::from_secs(10)).await;
    let (nats, client) = (stack.nats.clone(), stack.client.clone());
    let js = jetstream::new(nats.clone());

    let unknown = "0".repeat(32);
    let version = start_message("unknown-version", "one", &unknown, input_bytes(1));
    let saga = start_message("unknown-saga", "no-such-saga", &unknown, input_bytes(1));
    let expected = vec![
        Expected::new(
            "start of an unknown version",
            "coordinator",
            subjects::start(&version.saga_id, &version.saga),
            encode(&version),
            &[&unknown, "is not registered"],
        ),
        Expected::new(
            "start of an unknown saga",
            "coordinator",
            subjects::start(&saga.saga_id, &saga.saga),
            encode(&saga),
            &["no-such-saga", "is not registered"],
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
    let start = start_message(
        "0123456789abcdef0123456789abcdef",
        "one",
        digest,
        Payload::new(vec![0; input_len]),
    );
    encode(&start).len()
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
/// no room for the rest of the saga's log record, is refused by the client (or runs to an
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
                    Some(v) => format!("it is {:?}, steps {:?}", v.status(), v.snapshot.steps),
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

/// A participant not written with the Rust SDK (so nothing holds its outputs to the limit)
/// answers step `a` with a success whose output is 300 KB, over a quarter of the message size
/// limit. The coordinator fails the step at once with a reason naming the size, instead of
/// taking an output that every later command and log record would have to carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_output_in_a_raw_reply_fails_the_step() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let def = chain("one", &["a"], Duration::from_secs(5));
    let _coord = coordinator(nats.clone(), vec![def]).await;
    let raw = server.connect().await;
    let mut commands = raw.queue_subscribe("saga.cmd.svc.>", "svc".into()).await.unwrap();
    raw.flush().await.unwrap();
    let responder = tokio::spawn({
        let raw = raw.clone();
        async move {
            while let Some(msg) = commands.next().await {
                let cmd: CommandMessage = Codec::default().decode(&msg.payload).unwrap();
                let big = rmp_serde::to_vec(&"x".repeat(300 * 1024)).unwrap();
                let outcome = ReplyOutcome::Success { output: Payload::new(big) };
                let mut answer =
                    reply(&cmd.saga_id, "svc", cmd.step.as_str(), cmd.attempt, outcome);
                answer.phase = cmd.phase;
                answer.command = cmd.command.clone();
                let to = msg.reply.expect("commands carry a reply subject").to_string();
                publish_core(&raw, &to, None, encode(&answer)).await;
            }
        }
    });
    let client = client(nats.clone()).await;

    let id = client.start("one", &TestInput::default()).await.unwrap();
    compensated_at_once(&client, &id, &["reply output of", "exceeds the limit of 262144 bytes"])
        .await;
    responder.abort();
}

/// Waits for saga `id` to end compensated because a step's first attempt failed for good with
/// a reason holding each of `says`, and not because anything timed out.
async fn compensated_at_once(client: &SagaClient, id: &SagaId, says: &[&str]) {
    let view = client.wait(id, WAIT).await.unwrap();
    let timeline: Vec<_> =
        client.timeline(id).await.unwrap().into_iter().map(|e| e.event).collect();
    assert_eq!(view.status(), SagaStatus::Compensated, "{timeline:?}");
    assert!(
        timeline.iter().any(|e| matches!(
            e,
            T::Failed { attempt: 1, transient: false, reason, .. }
                if says.iter().all(|s| reason.contains(s))
        )),
        "the timeline says {says:?}: {timeline:?}"
    );
    assert!(
        !timeline.iter().any(|e| matches!(e, T::TimedOut { .. })),
        "the step failed at once, not by timing out: {timeline:?}"
    );
}

/// Outputs each within the limit, but together more than a log record may hold (every record
/// carries every output so far): the step whose output would make the record too large fails
/// at once with a reason naming the sizes, and the saga compensates it and the steps before
/// it, rather than each of that step's attempts failing to be logged until they all time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_too_large_together_fail_the_step_that_overflows_the_record() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let steps = ["a", "b", "c", "d", "e"];
    let def = chain("five", &steps, Duration::from_secs(5));
    let _coord = coordinator(nats.clone(), vec![def]).await;
    let mut participant = Participant::builder(nats.clone(), "svc");
    for step in steps {
        participant = participant
            .action(step, |_cmd: Command<TestInput>| async { Ok("y".repeat(260_000)) })
            .compensation(&format!("undo-{step}"), |_cmd: Command<TestInput>| async { Ok(()) });
    }
    let _p = participant.start().await.expect("participant starts");
    let client = client(nats.clone()).await;

    let id = client.start("five", &TestInput::default()).await.unwrap();
    let says = ["the saga's log record would be", "over the limit of 1048576 bytes"];
    compensated_at_once(&client, &id, &says).await;
    // That step's action ran (its output is what was refused), so it is compensated too.
    let timeline: Vec<_> =
        client.timeline(&id).await.unwrap().into_iter().map(|e| e.event).collect();
    let overflowed = timeline
        .iter()
        .find_map(|e| match e {
            T::Failed { step, phase: saga_core::Phase::Action, .. } => Some(step.clone()),
            _ => None,
        })
        .expect("a step failed");
    assert!(
        timeline.iter().any(|e| matches!(e,
            T::Succeeded { step, phase: saga_core::Phase::Compensation, .. } if *step == overflowed)),
        "step {overflowed} ran, so it is compensated: {timeline:?}"
    );
}

/// A handler whose output is over the limit (here 2 MiB) fails the step at once, with a reason
/// naming the size, and runs once. (Found as a bug: neither its effect record nor its reply
/// could be sent; the participant kept retrying, and the step only ended when every attempt
/// had timed out, with nothing in the history saying why.)
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
    let timeline: Vec<_> =
        client.timeline(&id).await.unwrap().into_iter().map(|e| e.event).collect();
    assert!(view.status().is_terminal(), "{:?}", view.status());
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once; timeline {timeline:?}");
    assert!(
        !timeline.iter().any(|e| matches!(e, T::TimedOut { .. })),
        "the step failed at once, not by timing out: {timeline:?}"
    );
    assert!(
        timeline.iter().any(|e| matches!(
            e,
            T::Failed { attempt: 1, transient: false, reason, .. } if reason.contains("exceeds the limit")
        )),
        "the timeline says the output was too large: {timeline:?}"
    );
}
