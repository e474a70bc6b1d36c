//! Choreography: services that take no step follow lifecycle events and domain events
//! durably.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_core::{LifecycleKind, SagaStatus};
use saga_nats::follow::{follow_domain_events, follow_sagas, publish_domain_event};
use saga_tests::support::*;
use saga_tests::NatsServer;
use serde::{Deserialize, Serialize};

async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..600 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not reached within 30 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_starts_late_sees_every_finished_saga_once() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let _coord =
        coordinator(nats.clone(), vec![chain("ch", &["a", "b"], Duration::from_secs(10))]).await;
    let _p = echo_participant(nats.clone(), "svc", &["a", "b"], Effects::default()).await;
    let client = client(nats.clone()).await;

    let mut ids = Vec::new();
    for i in 0..10u64 {
        let fail = if i % 3 == 0 { vec!["b".to_string()] } else { vec![] };
        ids.push(
            client.start("ch", &TestInput { n: i, fail, ..Default::default() }).await.unwrap(),
        );
    }
    let statuses = wait_all(&client, &ids, Duration::from_secs(60)).await;

    // The follower starts after every saga finished: the events waited for it.
    let seen: Arc<Mutex<HashMap<String, Vec<SagaStatus>>>> = Arc::default();
    let s = seen.clone();
    let following = follow_sagas(
        nats.clone(),
        "notification",
        Some("ch"),
        &[LifecycleKind::Completed, LifecycleKind::Compensated],
        move |ev| {
            let s = s.clone();
            async move {
                s.lock().unwrap().entry(ev.saga_id.to_string()).or_default().push(ev.status);
                Ok::<(), String>(())
            }
        },
    )
    .await
    .unwrap();
    until(|| seen.lock().unwrap().len() == ids.len()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = seen.lock().unwrap().clone();
    for (id, status) in ids.iter().zip(statuses) {
        assert_eq!(seen.get(id.as_str()), Some(&vec![status]), "saga {id}: one terminal event");
    }
    following.shutdown().await;

    // Step events share log records with more significant ones (the last step's success is
    // in the record of the saga's completion): a follower of them still gets each one once.
    let steps: Arc<Mutex<Vec<(String, LifecycleKind, String)>>> = Arc::default();
    let s = steps.clone();
    let following = follow_sagas(
        nats.clone(),
        "audit",
        Some("ch"),
        &[LifecycleKind::StepSucceeded, LifecycleKind::StepCompensated],
        move |ev| {
            let s = s.clone();
            async move {
                let step = ev.step.map(|s| s.to_string()).unwrap_or_default();
                s.lock().unwrap().push((ev.saga_id.to_string(), ev.kind, step));
                Ok::<(), String>(())
            }
        },
    )
    .await
    .unwrap();
    let mut expected = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let succeeded = LifecycleKind::StepSucceeded;
        expected.push((id.to_string(), succeeded, "a".to_owned()));
        if i % 3 == 0 {
            expected.push((id.to_string(), LifecycleKind::StepCompensated, "a".to_owned()));
        } else {
            expected.push((id.to_string(), succeeded, "b".to_owned()));
        }
    }
    until(|| steps.lock().unwrap().len() >= expected.len()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = steps.lock().unwrap().clone();
    let key = |e: &(String, LifecycleKind, String)| (e.0.clone(), e.1.as_str(), e.2.clone());
    got.sort_by_key(key);
    expected.sort_by_key(key);
    assert_eq!(got, expected);
    following.shutdown().await;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Shipped {
    order: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_events_are_delivered_durably_and_once() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    saga_nats::provision(&nats, &Default::default()).await.unwrap();

    for order in 0..5 {
        publish_domain_event(
            &nats,
            "logistics.shipped",
            &format!("shipped-{order}"),
            &Shipped { order },
        )
        .await
        .unwrap();
    }
    // A duplicate publish (same id) is dropped.
    publish_domain_event(&nats, "logistics.shipped", "shipped-0", &Shipped { order: 0 })
        .await
        .unwrap();
    // Garbage on the same subject is dead-lettered, not delivered.
    let js = async_nats::jetstream::new(nats.clone());
    js.publish("domain.logistics.shipped", bytes::Bytes::from_static(b"\xc1garbage"))
        .await
        .unwrap()
        .await
        .unwrap();

    let got: Arc<Mutex<Vec<Shipped>>> = Arc::default();
    let g = got.clone();
    let following =
        follow_domain_events(nats.clone(), "billing", "logistics.>", move |ev: Shipped| {
            let g = g.clone();
            async move {
                g.lock().unwrap().push(ev);
                Ok::<(), String>(())
            }
        })
        .await
        .unwrap();
    until(|| got.lock().unwrap().len() >= 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let orders: Vec<u32> = got.lock().unwrap().iter().map(|s| s.order).collect();
    assert_eq!(orders, [0, 1, 2, 3, 4]);
    let dlq = js.get_stream("SAGA_DLQ").await.unwrap();
    let dead = dlq.direct_get_last_for_subject("saga.dlq.billing").await.unwrap();
    let reason = dead.headers.get("Saga-Dlq-Reason").unwrap().as_str().to_owned();
    assert!(reason.contains("does not decode"), "{reason}");
    following.shutdown().await;
}

/// A handler slower than the acknowledgement wait keeps its message (progress
/// acknowledgements): the other instance sharing the durable never gets it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_keeps_its_event_from_the_other_instance() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    saga_nats::provision(&nats, &Default::default()).await.unwrap();
    let slow = saga_nats::follow::ACK_WAIT + Duration::from_secs(2);

    let runs: Arc<Mutex<Vec<(&'static str, u32)>>> = Arc::default();
    let mut instances = Vec::new();
    for name in ["first", "second"] {
        let runs = runs.clone();
        let following =
            follow_domain_events(nats.clone(), "slow", "logistics.>", move |ev: Shipped| {
                let runs = runs.clone();
                async move {
                    runs.lock().unwrap().push((name, ev.order));
                    tokio::time::sleep(slow).await;
                    Ok::<(), String>(())
                }
            })
            .await
            .unwrap();
        instances.push(following);
    }
    publish_domain_event(&nats, "logistics.shipped", "slow-1", &Shipped { order: 1 })
        .await
        .unwrap();
    until(|| !runs.lock().unwrap().is_empty()).await;
    tokio::time::sleep(slow + Duration::from_secs(1)).await;
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 1, "handled once, by one instance: {runs:?}");
    for following in instances {
        following.shutdown().await;
    }
}
