//! Proves the `NatsServer` harness: JetStream data survives `kill -9` and a
//! restart on the same store dir, and `jetstream: false` really disables it.

use async_nats::jetstream::{self, context::AccountErrorKind, stream};
use saga_tests::{NatsServer, NatsServerOptions};

#[tokio::test]
async fn jetstream_message_survives_kill_and_restart() {
    let mut server = NatsServer::start();
    assert!(server.is_running());
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    let port = server.port();
    let dir = server.store_dir().to_path_buf();

    let js = jetstream::new(server.connect().await);
    js.create_stream(stream::Config {
        name: "HARNESS".into(),
        subjects: vec!["harness.>".into()],
        ..Default::default()
    })
    .await
    .expect("create stream");
    let ack = js
        .publish("harness.one", "persisted".into())
        .await
        .expect("publish")
        .await
        .expect("publish ack");
    assert_eq!(ack.stream, "HARNESS");

    server.kill();
    assert!(!server.is_running());

    server.restart();
    assert!(server.is_running());
    assert_eq!(server.port(), port);
    assert_eq!(server.store_dir(), dir);

    let js = jetstream::new(server.connect().await);
    let stream = js.get_stream("HARNESS").await.expect("stream after restart");
    let msg = stream.get_raw_message(ack.sequence).await.expect("message after restart");
    assert_eq!(msg.subject.as_str(), "harness.one");
    assert_eq!(&msg.payload[..], b"persisted");

    drop(server);
    if std::env::var_os("KEEP_NATS_LOGS").is_none() {
        assert!(!dir.exists(), "store dir should be removed on drop");
    }
}

#[tokio::test]
async fn sync_always_server_starts_and_persists() {
    let mut server =
        NatsServer::start_with(NatsServerOptions { sync_always: true, ..Default::default() });
    let config =
        std::fs::read_to_string(server.store_dir().join("nats-server.conf")).expect("config file");
    assert!(config.contains("sync_interval: always"), "{config}");

    let js = jetstream::new(server.connect().await);
    js.create_stream(stream::Config {
        name: "SYNC".into(),
        subjects: vec!["sync.>".into()],
        ..Default::default()
    })
    .await
    .expect("create stream");
    js.publish("sync.a", "x".into()).await.expect("publish").await.expect("ack");

    server.restart();
    let js = jetstream::new(server.connect().await);
    let mut stream = js.get_stream("SYNC").await.expect("stream");
    assert_eq!(stream.info().await.expect("info").state.messages, 1);
}

#[tokio::test]
async fn jetstream_disabled_server_reports_unavailable() {
    let server =
        NatsServer::start_with(NatsServerOptions { jetstream: false, ..Default::default() });
    let js = jetstream::new(server.connect().await);
    let err = js.query_account().await.expect_err("JetStream must be unavailable");
    assert_eq!(err.kind(), AccountErrorKind::JetStreamUnavailable, "unexpected error: {err}");
}
