//! Who may complete an await step, against a real nats-server with every user on its
//! generated permissions: the payments service publishes the payment events and a signaller
//! signals its own definition's sagas; a neighbour that forges an event, a stored arrival or a
//! signal is refused by the server or by the coordinator, and the saga keeps waiting.

use std::time::Duration;

use async_nats::jetstream;
use saga_core::wire::{ArrivalMessage, SignalMessage, PROTOCOL_VERSION};
use saga_core::{Codec, Payload, SagaDefinition, SagaId, SagaStatus, StepStatus, Timestamp};
use saga_nats::follow::publish_domain_event;
use saga_nats::permissions::Access;
use saga_nats::{subjects, Coordinator, SagaClient};
use saga_tests::auth::{expect_denied, no_denials, Bus};
use saga_tests::support::*;
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Payment {
    order: u64,
}

fn definitions() -> Vec<SagaDefinition> {
    let paid = SagaDefinition::builder("paid")
        .step("reserve", "svc", "reserve", |s| s.compensation("undo-reserve"))
        .await_step("payment", |a| {
            a.event("payments.confirmed").matching("order", "input.n").timeout(WAIT)
        })
        .build();
    let approved = SagaDefinition::builder("approved")
        .step("reserve", "svc", "reserve", |s| s.compensation("undo-reserve"))
        .await_step("approval", |a| a.signal("approve").timeout(WAIT))
        .build();
    vec![paid, approved]
}

fn access() -> Access {
    Access {
        starters: [("shop".into(), ["paid".into(), "approved".into()].into())].into(),
        publishers: ["payments".into(), "seller".into()].into(),
        signallers: [
            ("desk".into(), ["approved".into()].into()),
            ("other-desk".into(), ["paid".into()].into()),
        ]
        .into(),
        ..Access::default()
    }
}

async fn running(client: &SagaClient, id: &SagaId, step: &str) {
    for _ in 0..600 {
        if let Some(view) = client.get(id).await.unwrap() {
            if view
                .snapshot
                .steps
                .iter()
                .any(|s| s.name.as_str() == step && s.status == StepStatus::Running)
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{step} of {id} never waited");
}

async fn still_waiting(client: &SagaClient, id: &SagaId) {
    tokio::time::sleep(Duration::from_millis(700)).await;
    let view = client.get(id).await.unwrap().unwrap();
    assert_eq!(view.status(), SagaStatus::Running, "{:?}", view.snapshot.steps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_of_an_event_or_a_signal_completes_an_await_step() {
    init_logging();
    let bus = Bus::start(&definitions(), &access());
    let (nats, coordinator_denials) = bus.connect("coordinator").await;
    let _coordinator = Coordinator::start(nats, coordinator_config(definitions(), WAIT))
        .await
        .expect("the coordinator starts with its generated permissions");
    let (nats, svc_denials) = bus.connect("svc").await;
    let _p = echo_participant(nats, "svc", &["reserve"], Effects::default()).await;
    let (shop_nats, shop_denials) = bus.connect("shop").await;
    let shop = SagaClient::new(shop_nats).await.unwrap().only(["paid", "approved"]).unwrap();
    let (payments, payments_denials) = bus.connect("payments").await;
    let (seller, seller_denials) = bus.connect("seller").await;
    let (desk_nats, desk_denials) = bus.connect("desk").await;
    let desk = SagaClient::new(desk_nats).await.unwrap().only(["approved"]).unwrap();
    let (other_nats, other_denials) = bus.connect("other-desk").await;
    let other_desk = SagaClient::new(other_nats.clone()).await.unwrap().only(["paid"]).unwrap();

    let paid = shop.start("paid", &TestInput { n: 5, ..Default::default() }).await.unwrap();
    let approved = shop.start("approved", &TestInput { n: 6, ..Default::default() }).await.unwrap();
    running(&shop, &paid, "payment").await;
    running(&shop, &approved, "approval").await;

    // The seller publishes a payment confirmation: not its subject.
    let forged =
        publish_domain_event(&seller, "payments.confirmed", "forged-5", &Payment { order: 5 })
            .await;
    assert!(forged.is_err(), "the seller published domain.payments.confirmed");
    expect_denied("seller", &seller_denials, "domain.payments.confirmed").await;
    // A service writes a stored arrival itself, where the coordinator would.
    let codec = Codec::default();
    let arrival = ArrivalMessage {
        v: PROTOCOL_VERSION,
        subject: "domain.payments.confirmed".into(),
        seq: 1,
        at: Timestamp(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
                as u64,
        ),
        payload: Payload::new(rmp_serde::to_vec_named(&Payment { order: 5 }).unwrap()),
    };
    let spec = subjects::await_spec("payments.confirmed", "order", saga_core::DEFAULT_AWAIT_WINDOW);
    let subject = subjects::arrival(&spec, "5");
    let js = jetstream::new(payments.clone());
    let stored =
        async { js.publish(subject.clone(), codec.encode(&arrival).unwrap().into()).await?.await };
    assert!(tokio::time::timeout(Duration::from_secs(5), stored)
        .await
        .map_or(true, |r| r.is_err()));
    expect_denied("payments", &payments_denials, &subject).await;
    // A signaller of another definition signals this one: its client does not find the saga
    // among its definitions, and a raw publish is refused by the server.
    let err = other_desk.signal(&approved, "approve", &"yes").await.unwrap_err();
    assert_eq!(err.kind(), saga_nats::ErrorKind::NotFound, "{err}");
    let signal = SignalMessage {
        v: PROTOCOL_VERSION,
        saga_id: approved.clone(),
        name: "approve".into(),
        payload: Payload::new(rmp_serde::to_vec_named(&"yes").unwrap()),
    };
    let subject = subjects::signal(&approved, &"approved".into(), "approve");
    let sent = async {
        jetstream::new(other_nats.clone())
            .publish(subject.clone(), codec.encode(&signal).unwrap().into())
            .await?
            .await
    };
    assert!(tokio::time::timeout(Duration::from_secs(5), sent).await.map_or(true, |r| r.is_err()));
    expect_denied("other-desk", &other_denials, &subject).await;
    // A signaller of the right definition, with a body naming another saga.
    let forged = SignalMessage {
        v: PROTOCOL_VERSION,
        saga_id: paid.clone(),
        name: "approve".into(),
        payload: Payload::new(rmp_serde::to_vec_named(&"yes").unwrap()),
    };
    let (desk_raw, _) = bus.connect("desk").await;
    let subject = subjects::signal(&approved, &"approved".into(), "approve");
    jetstream::new(desk_raw)
        .publish(subject, codec.encode(&forged).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    still_waiting(&shop, &paid).await;
    still_waiting(&shop, &approved).await;

    // The owners complete them.
    publish_domain_event(&payments, "payments.confirmed", "p-5", &Payment { order: 5 })
        .await
        .unwrap();
    desk.signal(&approved, "approve", &"yes").await.unwrap();
    for id in [&paid, &approved] {
        assert_eq!(shop.wait(id, WAIT).await.unwrap().status(), SagaStatus::Completed);
    }
    no_denials("coordinator", &coordinator_denials);
    no_denials("svc", &svc_denials);
    no_denials("shop", &shop_denials);
    no_denials("desk", &desk_denials);
}
