//! A JetStream cluster answers a compare-and-swap conflict differently from a single server
//! (error 10164 instead of 10071), and async-nats reports only the single server's as a
//! conflict. Every compare-and-swap of the coordinator, the SDK and the client must take both
//! for what they are: a conflict to reload, not NATS failing.

use async_nats::jetstream::{self, kv, stream};
use saga_nats::store::is_conflict;
use saga_tests::NatsCluster;

/// On `client`: a key-value update at a stale revision, and a publish expecting a stale last
/// sequence on its subject, are both refused as conflicts.
async fn conflicts_are_recognised(client: async_nats::Client, replicas: usize) {
    let js = jetstream::new(client);
    let store = js
        .create_key_value(kv::Config {
            bucket: "cas".into(),
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .expect("bucket");
    let first = store.create("k", "1".into()).await.expect("create");
    store.update("k", "2".into(), first).await.expect("update at the current revision");
    let stale = store.update("k", "3".into(), first).await.expect_err("a stale revision");
    assert!(is_conflict(&stale), "{replicas} replica(s): {stale:?}");
    // Concurrent updates at one revision: one wins, every other is a conflict. A clustered
    // stream refuses a write to a subject that has another write in flight at once, with
    // error 10164.
    let mut by_code = std::collections::BTreeMap::new();
    for round in 0..10 {
        let rev = store.put("hot", "0".into()).await.expect("put");
        let writes = (0..20).map(|i| store.update("hot", format!("{round}.{i}").into(), rev));
        let results = futures::future::join_all(writes).await;
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
        for e in results.into_iter().filter_map(Result::err) {
            assert!(is_conflict(&e), "{replicas} replica(s): {e:?}");
            let code = if e.to_string().contains("10164") { 10164 } else { 10071 };
            *by_code.entry(code).or_insert(0) += 1;
        }
    }
    eprintln!("{replicas} replica(s): conflicts by error code {by_code:?}");
    // Creating a key that exists is refused as such.
    let exists = store.create("k", "4".into()).await.expect_err("the key exists");
    assert_eq!(exists.kind(), kv::CreateErrorKind::AlreadyExists, "{exists:?}");

    js.create_stream(stream::Config {
        name: "LOGS".into(),
        subjects: vec!["logs.>".into()],
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .expect("stream");
    js.publish("logs.a", "1".into()).await.expect("publish").await.expect("stored");
    let refused = js
        .send_publish(
            "logs.a",
            jetstream::message::PublishMessage::build()
                .payload("2".into())
                .expected_last_subject_sequence(0),
        )
        .await
        .expect("publish")
        .await
        .expect_err("a stale expected sequence");
    assert!(is_conflict(&refused), "{replicas} replica(s): {refused:?}");
    // Anything else is not a conflict.
    let missing = js
        .send_publish("nowhere.a", jetstream::message::PublishMessage::build().payload("x".into()))
        .await
        .expect("publish")
        .await
        .expect_err("no stream");
    assert!(!is_conflict(&missing), "{missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_swap_conflicts_are_recognised_on_one_server_and_on_a_cluster() {
    for size in [1, 3] {
        let cluster = tokio::task::spawn_blocking(move || NatsCluster::start(size)).await.unwrap();
        let urls = cluster.urls();
        let client = async_nats::connect(urls.split(',').collect::<Vec<_>>()).await.unwrap();
        NatsCluster::wait_for_jetstream(&client).await.unwrap();
        conflicts_are_recognised(client, size).await;
    }
}
