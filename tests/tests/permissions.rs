//! Least privilege against a real nats-server: every user has only the permissions
//! `saga_nats::permissions` generates from the definitions and the access policy. Each role
//! does its whole job with them (no denial), and what a hostile holder of each role's
//! credentials tries is refused by the server, with the sagas unchanged.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use saga_core::{LifecycleKind, Phase, SagaDefinition, SagaId, SagaStatus, TimelineEvent};
use saga_nats::follow::follow_sagas;
use saga_nats::permissions::{inbox_prefix, Access};
use saga_nats::subjects::{self, ReplyTo};
use saga_nats::{Coordinator, NatsOptions, SagaClient};
use saga_tests::auth::{expect_denied, no_denials, Bus, Denials};
use saga_tests::support::*;
use saga_tests::{NatsServer, NatsServerOptions};

const WAIT: Duration = Duration::from_secs(60);

fn definitions() -> Vec<SagaDefinition> {
    vec![chain("perm", &["a", "b"], Duration::from_secs(20)), chain("other", &["a"], WAIT)]
}

fn access() -> Access {
    Access {
        starters: [("shop".into(), ["perm".into()].into())].into(),
        followers: [("watcher".into(), ["perm".into()].into())].into(),
        operators: ["alice".into()].into(),
        ..Access::default()
    }
}

/// Every role on its own credentials and generated permissions.
struct Roles {
    coordinator: Coordinator,
    denials: Vec<(&'static str, Denials)>,
    effects: Effects,
    shop: SagaClient,
    alice: SagaClient,
    followed: Arc<Mutex<Vec<(SagaId, LifecycleKind)>>>,
    _participant: saga_nats::Participant,
    _following: saga_nats::follow::Following,
}

async fn roles(bus: &Bus) -> Roles {
    let (nats, coordinator_denials) = bus.connect("coordinator").await;
    let coordinator = Coordinator::start(nats, coordinator_config(definitions(), WAIT))
        .await
        .expect("the coordinator starts with its generated permissions");
    let (nats, svc_denials) = bus.connect("svc").await;
    let effects = Effects::default();
    let participant = echo_participant(nats, "svc", &["a", "b"], effects.clone()).await;
    let (nats, shop_denials) = bus.connect("shop").await;
    let shop = SagaClient::new(nats).await.expect("the starter's client").only(["perm"]).unwrap();
    let (nats, alice_denials) = bus.connect("alice").await;
    let alice = SagaClient::new(nats).await.expect("the operator's client").with_operator("alice");
    let (nats, watcher_denials) = bus.connect("watcher").await;
    let followed: Arc<Mutex<Vec<(SagaId, LifecycleKind)>>> = Arc::default();
    let seen = followed.clone();
    let following = follow_sagas(
        nats,
        "watcher",
        Some("perm"),
        &[LifecycleKind::Completed, LifecycleKind::Cancelled],
        move |event| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push((event.saga_id, event.kind));
                Ok::<(), String>(())
            }
        },
    )
    .await
    .expect("the follower starts with its generated permissions");
    Roles {
        coordinator,
        denials: vec![
            ("coordinator", coordinator_denials),
            ("svc", svc_denials),
            ("shop", shop_denials),
            ("alice", alice_denials),
            ("watcher", watcher_denials),
        ],
        effects,
        shop,
        alice,
        followed,
        _participant: participant,
        _following: following,
    }
}

async fn followed_until(roles: &Roles, id: &SagaId, kind: LifecycleKind) {
    let deadline = Instant::now() + WAIT;
    while !roles.followed.lock().unwrap().contains(&(id.clone(), kind)) {
        assert!(Instant::now() < deadline, "the follower never saw {kind:?} of {id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_does_its_job_with_only_its_generated_permissions() {
    init_logging();
    let bus = Bus::start(&definitions(), &access());
    let roles = roles(&bus).await;

    // The starter starts and waits; the participant runs both steps; the follower hears it.
    let id = roles.shop.start("perm", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    let view = roles.shop.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    assert_eq!((roles.effects.count(&id, "a", "a"), roles.effects.count(&id, "b", "a")), (1, 1));
    followed_until(&roles, &id, LifecycleKind::Completed).await;
    // Its timeline, through the coordinator's admin service (subjects naming the definition).
    let timeline = roles.shop.timeline(&id).await.unwrap();
    assert!(
        timeline.iter().any(|e| matches!(e.event, TimelineEvent::Finished { .. })),
        "{timeline:?}"
    );
    // Many readers at once: beyond what the service serves at once, they are asked to retry
    // (503 busy), and the client does.
    let reads = (0..300).map(|_| roles.shop.timeline(&id));
    for read in futures::future::join_all(reads).await {
        assert_eq!(read.unwrap().len(), timeline.len());
    }
    let nobody = SagaId::for_key(&"perm".into(), "never-started");
    let err = roles.shop.timeline(&nobody).await.unwrap_err();
    assert_eq!(err.kind(), saga_nats::ErrorKind::NotFound, "{err}");

    // A keyed start is found again by its key.
    let keyed = roles.shop.start_with_key("perm", "order-7", &TestInput::default()).await.unwrap();
    assert_eq!(keyed, SagaClient::id_for_key("perm", "order-7"));
    assert_eq!(roles.shop.wait(&keyed, WAIT).await.unwrap().status(), SagaStatus::Completed);

    // The operator cancels a saga whose step b hangs; the history names her.
    let input = TestInput { n: 2, hang: vec![("b".into(), 1)], ..Default::default() };
    let live = roles.shop.start("perm", &input).await.unwrap();
    wait_until_logged(&roles.shop, &live).await;
    roles.alice.cancel(&live, "customer called").await.unwrap();
    assert_eq!(roles.shop.wait(&live, WAIT).await.unwrap().status(), SagaStatus::Cancelled);
    let timeline = roles.alice.timeline(&live).await.unwrap();
    assert!(
        timeline.iter().any(|e| matches!(&e.event,
            TimelineEvent::CancelRequested { by, .. } if by.as_deref() == Some("alice"))),
        "the cancellation does not name alice: {timeline:?}"
    );
    followed_until(&roles, &live, LifecycleKind::Cancelled).await;
    // She lists the finished sagas through the admin service: the cancelled one is there.
    let finished = saga_nats::index::ListRequest {
        status: saga_nats::index::Which::Finished,
        ..Default::default()
    };
    let page = roles.alice.list("perm", &finished).await.unwrap();
    assert!(page.sagas.iter().any(|s| s.id == live), "{page:?}");

    for (who, denials) in &roles.denials {
        no_denials(who, denials);
    }
}

async fn wait_until_logged(client: &SagaClient, id: &SagaId) {
    let deadline = Instant::now() + WAIT;
    while !client.get(id).await.unwrap().is_some_and(|v| v.logged) {
        assert!(Instant::now() < deadline, "saga {id} was never logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_each_role_may_not_do_the_server_refuses() {
    init_logging();
    let bus = Bus::start(&definitions(), &access());
    let roles = roles(&bus).await;
    let replica = roles.coordinator.replica().to_owned();

    // A live saga to attack: b hangs on its first attempt, then succeeds.
    let input = TestInput { n: 1, hang: vec![("b".into(), 1)], ..Default::default() };
    let id = roles.shop.start("perm", &input).await.unwrap();
    wait_until_logged(&roles.shop, &id).await;
    let forged_reply = Bytes::from_static(b"forged");

    // An operator acts under her own name only.
    let (alice, alice_denials) = bus.connect("alice").await;
    let as_bob = subjects::operator(&id, &"perm".into(), "bob");
    alice.publish(as_bob.clone(), Bytes::from_static(b"x")).await.unwrap();
    expect_denied("alice", &alice_denials, &as_bob).await;
    let err = roles.alice.clone().with_operator("bob").cancel(&id, "not me").await.unwrap_err();
    assert!(err.to_string().contains("NATS"), "{err}");

    // The participant: no commands to send, no replies for another service, no saga log.
    let (svc, svc_denials) = bus.connect("svc").await;
    let command = subjects::command(&"svc".into(), &"b".into());
    let own_reply = ReplyTo {
        replica: replica.clone(),
        service: "svc".into(),
        saga_id: id.clone(),
        step: "b".into(),
        phase: Phase::Action,
        attempt: 1,
    };
    svc.publish_with_reply(command.clone(), own_reply.subject(), forged_reply.clone())
        .await
        .unwrap();
    expect_denied("svc", &svc_denials, &command).await;
    let foreign_reply = ReplyTo { service: "billing".into(), ..own_reply.clone() }.subject();
    svc.publish(foreign_reply.clone(), forged_reply.clone()).await.unwrap();
    expect_denied("svc", &svc_denials, &foreign_reply).await;
    let _sub = svc.subscribe("saga.log.>").await.unwrap();
    expect_denied("svc", &svc_denials, "saga.log.>").await;
    let read_log = format!("$JS.API.DIRECT.GET.SAGA_LOG.saga.log.{id}.>");
    svc.publish(read_log.clone(), Bytes::new()).await.unwrap();
    expect_denied("svc", &svc_denials, &read_log).await;
    svc.publish("$KV.saga_fx_other.x", Bytes::new()).await.unwrap();
    expect_denied("svc", &svc_denials, "$KV.saga_fx_other.x").await;
    // Nor read another service's commands or effect records, nor delete a saga's records.
    let _other_commands = svc.subscribe("saga.cmd.other.>").await.unwrap();
    expect_denied("svc", &svc_denials, "saga.cmd.other.>").await;
    let other_effects = "$JS.API.DIRECT.GET.KV_saga_fx_other.$KV.saga_fx_other.x";
    svc.publish(other_effects, Bytes::new()).await.unwrap();
    expect_denied("svc", &svc_denials, other_effects).await;
    for api in ["$JS.API.STREAM.PURGE.SAGA_LOG", "$JS.API.STREAM.MSG.DELETE.SAGA_LOG"] {
        svc.publish(api, Bytes::from_static(b"{}")).await.unwrap();
        expect_denied("svc", &svc_denials, api).await;
    }
    // Nor have the server answer "no responders" for b's command: a request, on a subject it
    // may publish on and nobody listens on, with b's reply subject. The server sends that
    // status only to the requester's own connection (b's timeline shows none, below).
    svc.publish_with_reply("saga.reply.ghost.svc.x.y.a.1", own_reply.subject(), Bytes::new())
        .await
        .unwrap();
    svc.flush().await.unwrap();

    // The starter: no log records, no operator actions, no other definition's sagas.
    let (shop, shop_denials) = bus.connect("shop").await;
    let forged_log = subjects::log(&id, &"perm".into(), "completed");
    shop.publish(forged_log.clone(), Bytes::from_static(b"x")).await.unwrap();
    expect_denied("shop", &shop_denials, &forged_log).await;
    let cancel = subjects::operator(&id, &"perm".into(), "shop");
    shop.publish(cancel.clone(), Bytes::from_static(b"x")).await.unwrap();
    expect_denied("shop", &shop_denials, &cancel).await;
    let other_start = subjects::start(&SagaId::for_key(&"other".into(), "k"), &"other".into());
    shop.publish(other_start.clone(), Bytes::from_static(b"x")).await.unwrap();
    expect_denied("shop", &shop_denials, &other_start).await;
    let other_read = "$JS.API.DIRECT.GET.SAGA_LOG.saga.log.x.other.*";
    shop.publish(other_read, Bytes::new()).await.unwrap();
    expect_denied("shop", &shop_denials, other_read).await;
    let other_timeline = "saga.admin.timeline.other";
    shop.publish(other_timeline, Bytes::from_static(b"{}")).await.unwrap();
    expect_denied("shop", &shop_denials, other_timeline).await;
    let definitions = "$KV.saga_definitions.perm";
    shop.publish(definitions, Bytes::from_static(b"x")).await.unwrap();
    expect_denied("shop", &shop_denials, definitions).await;

    // The follower: no lifecycle events of its own making, no consumer over other sagas.
    let (watcher, watcher_denials) = bus.connect("watcher").await;
    let forged_event = subjects::log(&id, &"perm".into(), "cancelled");
    watcher.publish(forged_event.clone(), Bytes::from_static(b"x")).await.unwrap();
    expect_denied("watcher", &watcher_denials, &forged_event).await;
    let js = jetstream::new(watcher.clone());
    let wide = js
        .create_consumer_on_stream(
            jetstream::consumer::pull::Config {
                durable_name: Some("watcher".into()),
                filter_subject: "saga.log.>".into(),
                ..Default::default()
            },
            subjects::LOG_STREAM,
        )
        .await;
    assert!(wide.is_err(), "the follower widened its consumer to every saga");
    expect_denied("watcher", &watcher_denials, "CONSUMER.CREATE.SAGA_LOG.watcher.saga.log.>").await;

    // Nobody without credentials gets in.
    let anonymous = NatsOptions::with_url(bus.server.url()).connect("anonymous").await;
    assert!(anonymous.is_err());

    // The saga went on untouched: b's retry succeeded, nothing was cancelled or run twice,
    // and no attempt was taken for undelivered.
    let view = roles.shop.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    let timeline = roles.shop.timeline(&id).await.unwrap();
    assert!(
        !timeline.iter().any(|e| matches!(e.event, TimelineEvent::NotDelivered { .. })),
        "{timeline:?}"
    );
    assert_eq!((roles.effects.count(&id, "a", "a"), roles.effects.count(&id, "b", "a")), (1, 1));
    assert!(roles.effects.duplicates().is_empty());
}

#[test]
fn the_command_line_writes_a_config_the_server_accepts_and_keeps_its_keys() {
    let defs = definitions_dir(&definitions());
    let keys = defs.join("keys");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_saga-coordinator"))
            .arg("permissions")
            .arg("--definitions")
            .arg(&defs)
            .args(["--starts", "shop=perm", "--follows", "watcher=perm", "--operator", "alice"])
            .arg("--keys")
            .arg(&keys)
            .output()
            .expect("saga-coordinator permissions runs")
    };
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let config = String::from_utf8(first.stdout).unwrap();
    let seed = std::fs::read_to_string(keys.join("shop.nk")).unwrap();
    let second = run();
    assert_eq!(String::from_utf8(second.stdout).unwrap(), config, "the keys changed");
    assert_eq!(std::fs::read_to_string(keys.join("shop.nk")).unwrap(), seed);
    let summary = String::from_utf8_lossy(&second.stderr);
    assert!(summary.contains("starter of perm"), "{summary}");
    assert!(summary.contains("--inbox-prefix _INBOX.shop"), "{summary}");

    // nats-server starts with it, and the starter's key gets in.
    let server = NatsServer::start_with(NatsServerOptions {
        extra_config: Some(config),
        ..Default::default()
    });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let options = NatsOptions {
        nkey: Some(keys.join("shop.nk")),
        inbox_prefix: Some(inbox_prefix("shop")),
        ..NatsOptions::with_url(server.url())
    };
    runtime.block_on(options.connect("shop")).expect("the generated key is accepted");

    // A policy naming an unknown definition is refused, naming it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_saga-coordinator"))
        .arg("permissions")
        .arg("--definitions")
        .arg(&defs)
        .args(["--follows", "watcher=refund"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("watcher is to follow saga \"refund\", but no definition"), "{err}");
    let _ = std::fs::remove_dir_all(&defs);
}

/// A service started with credentials that lack what it needs says "permission denied" and
/// names what the server refused, instead of "request timed out".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_permission_is_reported_as_a_denial_naming_it() {
    init_logging();
    let bus = Bus::start(&definitions(), &access());
    let (nats, _) = bus.connect("coordinator").await;
    let _coordinator = Coordinator::start(nats, coordinator_config(definitions(), WAIT)).await;
    let as_shop = bus.options("shop");

    // The starter's credentials, used to run participant svc.
    let nats = as_shop.connect("shop-as-svc").await.unwrap();
    let Err(err) = saga_nats::Participant::builder(nats, "svc").start().await else {
        panic!("the participant started without its permissions");
    };
    let text = err.to_string();
    assert!(text.contains("permission denied"), "{text}");
    assert!(text.contains("Permissions Violation for Publish to"), "{text}");
    assert!(text.contains("KV_saga_fx_svc"), "{text}");

    // ...and to follow sagas with a durable consumer that is not its own.
    let nats = as_shop.connect("shop-as-follower").await.unwrap();
    let following =
        follow_sagas(nats, "shop", Some("perm"), &[], |_| async { Ok::<(), String>(()) }).await;
    let Err(err) = following else { panic!("the follower started without its permissions") };
    let text = err.to_string();
    assert!(text.contains("permission denied"), "{text}");
    assert!(text.contains("CONSUMER.CREATE.SAGA_LOG.shop"), "{text}");
}

/// The reasons of every dead letter so far.
async fn dead_letter_reasons(js: &jetstream::Context) -> Vec<String> {
    let Ok(mut stream) = js.get_stream(subjects::DLQ_STREAM).await else { return Vec::new() };
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            let reason = m.headers.get(subjects::headers::DLQ_REASON);
            out.push(reason.map(|v| v.as_str().to_owned()).unwrap_or_default());
        }
    }
    out
}

/// JetStream answers a read on the reply subject the reader names, publishing as the server:
/// a user who can write a stream and read it back can have any bytes published on any
/// subject, whatever its own permissions. Each way the generated permissions leave open is
/// tried here; the relayed message carries JetStream's headers and is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_relayed_by_jetstream_reads_are_refused() {
    init_logging();
    let bus = Bus::start(&definitions(), &access());
    let roles = roles(&bus).await;
    let (coordinator, _) = bus.connect("coordinator").await;
    let coordinator_js = jetstream::new(coordinator);

    // A live saga: b hangs on its first attempt (20 s).
    let input = TestInput { n: 1, hang: vec![("b".into(), 1)], ..Default::default() };
    let id = roles.shop.start("perm", &input).await.unwrap();
    wait_until_logged(&roles.shop, &id).await;
    let cancel = saga_core::wire::OperatorMessage {
        v: saga_core::wire::PROTOCOL_VERSION,
        saga_id: id.clone(),
        action: saga_core::wire::OperatorAction::Cancel,
        reason: "relayed".into(),
    };
    let cancel = Bytes::from(saga_core::Codec::default().encode(&cancel).unwrap());
    let as_alice = subjects::operator(&id, &"perm".into(), "alice");

    // The participant stores a cancel in its own effect bucket and reads it back with the
    // reply subject of an operator action.
    let (svc, svc_denials) = bus.connect("svc").await;
    let js = jetstream::new(svc.clone());
    js.publish("$KV.saga_fx_svc.forged", cancel.clone()).await.unwrap().await.unwrap();
    let get = "$JS.API.DIRECT.GET.KV_saga_fx_svc.$KV.saga_fx_svc.forged";
    svc.publish_with_reply(get, as_alice.clone(), Bytes::new()).await.unwrap();
    // It may not create a consumer on it (a consumer delivers where its creator says).
    svc.publish("$JS.API.CONSUMER.CREATE.KV_saga_fx_svc", Bytes::from_static(b"{}")).await.unwrap();
    expect_denied("svc", &svc_denials, "CONSUMER.CREATE.KV_saga_fx_svc").await;

    // The starter publishes the cancel as a start of its own definition and reads it back.
    let (shop, _) = bus.connect("shop").await;
    let decoy = SagaId::for_key(&"perm".into(), "decoy");
    let decoy_start = subjects::start(&decoy, &"perm".into());
    let js = jetstream::new(shop.clone());
    js.publish(decoy_start.clone(), cancel.clone()).await.unwrap().await.unwrap();
    let get = format!("$JS.API.DIRECT.GET.SAGA_IN.{decoy_start}");
    shop.publish_with_reply(get, as_alice.clone(), Bytes::new()).await.unwrap();

    // The starter asks the admin service for a timeline, naming the operator action's
    // subject as where the answer should go: it is not answered.
    let request = format!(r#"{{"id": "{id}"}}"#);
    shop.publish_with_reply("saga.admin.timeline.perm", as_alice.clone(), request.into())
        .await
        .unwrap();

    // The participant's relay is dead-lettered for what it is. The starter's races the
    // coordinator, which dead-letters the decoy start at once: the read then finds nothing,
    // and what is relayed is an empty "not found" answer, refused as empty.
    let deadline = Instant::now() + WAIT;
    loop {
        let reasons = dead_letter_reasons(&coordinator_js).await;
        let relayed = reasons.iter().filter(|r| r.contains("relayed by the server")).count();
        let empty = reasons.iter().filter(|r| r.contains("operator action: empty message")).count();
        if relayed >= 1 && relayed + empty >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "relays not refused; dead letters: {reasons:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing else reached the coordinator's input (an answer would be dead-lettered as
    // malformed).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reasons = dead_letter_reasons(&coordinator_js).await;
    assert!(!reasons.iter().any(|r| r.contains("operator action: malformed")), "{reasons:?}");
    // The saga was not cancelled: b's retry succeeds.
    let view = roles.shop.wait(&id, WAIT).await.unwrap();
    assert_eq!(view.status(), SagaStatus::Completed);
    let timeline = roles.alice.timeline(&id).await.unwrap();
    assert!(!timeline.iter().any(|e| matches!(e.event, TimelineEvent::CancelRequested { .. })));
}
