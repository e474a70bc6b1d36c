//! Every process connects with the usual NATS credentials: a user and password (as flags or
//! inside the URL), a token, an nkey, and mutual TLS; a refused credential is reported as a
//! refusal naming who was refused, with no secret in the message. Against real nats-server
//! processes with authentication on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use saga_core::SagaStatus;
use saga_nats::{ConnectError, NatsOptions};
use saga_tests::support::*;
use saga_tests::{NatsServer, NatsServerOptions};

const COORDINATOR: &str = env!("CARGO_BIN_EXE_saga-coordinator");
const WAIT: Duration = Duration::from_secs(60);

fn server_with(config: String) -> NatsServer {
    NatsServer::start_with(NatsServerOptions { extra_config: Some(config), ..Default::default() })
}

/// A directory of its own for a test's key and certificate files.
fn scratch(name: &str) -> PathBuf {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir =
        std::env::temp_dir().join(format!("saga-creds-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn coordinator_participant_and_client_each_authenticate_their_own_way() {
    let dir = scratch("users");
    let participant_key = nkeys::KeyPair::new_user();
    let seed = write(&dir, "participant.nk", &participant_key.seed().unwrap());
    let server = server_with(format!(
        r#"authorization {{
  users = [
    {{ user: "coordinator", password: "c-secret" }}
    {{ user: "client", password: "cl-secret" }}
    {{ nkey: "{}" }}
  ]
}}"#,
        participant_key.public_key()
    ));
    let url = server.url();
    let host = url.trim_start_matches("nats://");

    // The coordinator command line, with --user and --password.
    let def = chain("creds", &["a", "b"], Duration::from_secs(5));
    let defs = definitions_dir(&[def]);
    let _coordinator = CoordinatorProcess::start_with(
        COORDINATOR,
        &["--nats-url", &url, "--user", "coordinator", "--password", "c-secret"],
        &defs,
    );

    // A participant with an nkey; a client with the user and password in the URL.
    let participant_nats = NatsOptions { nkey: Some(seed), ..NatsOptions::with_url(url.clone()) }
        .connect("svc")
        .await
        .expect("the nkey is accepted");
    let effects = Effects::default();
    let _participant =
        echo_participant(participant_nats, "svc", &["a", "b"], effects.clone()).await;
    let client_nats = NatsOptions::with_url(format!("nats://client:cl-secret@{host}"))
        .connect("client")
        .await
        .expect("the URL's user and password are accepted");
    let client = client_when_ready(client_nats, "creds").await;

    let id = client.start("creds", &TestInput { n: 1, ..Default::default() }).await.unwrap();
    let view = client.wait(&id, WAIT).await.expect("the saga ends");
    assert_eq!(view.status(), SagaStatus::Completed);
    assert_eq!(effects.count(&id, "a", "a"), 1);
    assert_eq!(effects.count(&id, "b", "a"), 1);

    // No credentials at all, and a wrong password: refused, named, no secret shown.
    let none = NatsOptions::with_url(url.clone()).connect("anonymous").await.unwrap_err();
    assert!(matches!(none, ConnectError::Refused { .. }), "{none}");
    assert!(none.to_string().contains("refused no credentials"), "{none}");
    let wrong = NatsOptions {
        user: Some("client".into()),
        password: Some("not-the-password".into()),
        ..NatsOptions::with_url(url.clone())
    }
    .connect("client")
    .await
    .unwrap_err()
    .to_string();
    assert!(wrong.contains(&format!("NATS at {url} refused user \"client\"")), "{wrong}");
    assert!(!wrong.contains("not-the-password"), "{wrong}");
    let in_url = NatsOptions::with_url(format!("nats://client:wrong-pw@{host}"))
        .connect("client")
        .await
        .unwrap_err()
        .to_string();
    assert!(in_url.contains("nats://client:***@"), "{in_url}");
    assert!(!in_url.contains("wrong-pw"), "{in_url}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&defs);
}

#[tokio::test]
async fn the_coordinator_command_line_reports_a_refusal_and_exits() {
    let server = server_with(
        r#"authorization { users = [ { user: "coordinator", password: "c-secret" } ] }"#.into(),
    );
    // The coordinator command line with `args`: did it fail, and what it wrote on stderr.
    let run = |args: &[&str]| {
        let out = Command::new(COORDINATOR)
            .args(["--nats-url", &server.url()])
            .args(args)
            .env("RUST_LOG", "error")
            .output()
            .expect("the coordinator runs");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, stderr) = run(&["--user", "coordinator", "--password", "guess"]);
    assert!(!ok);
    assert!(stderr.contains("refused user \"coordinator\": authorization violation"), "{stderr}");
    assert!(!stderr.contains("guess"), "{stderr}");

    // Two ways to authenticate at once: refused before any connection, naming both.
    let (ok, stderr) = run(&["--token", "t", "--creds", "/dev/null"]);
    assert!(!ok);
    assert!(stderr.contains("choose one way to authenticate, not creds and token"), "{stderr}");
}

#[tokio::test]
async fn a_token_is_accepted_as_a_flag_or_in_the_url_and_a_wrong_one_is_refused() {
    let server = server_with(r#"authorization { token: "t0ken-s3cret" }"#.into());
    let url = server.url();
    let host = url.trim_start_matches("nats://");
    let by_flag =
        NatsOptions { token: Some("t0ken-s3cret".into()), ..NatsOptions::with_url(url.clone()) };
    let nats = by_flag.connect("t").await.expect("the token is accepted");
    nats.publish("x", "y".into()).await.unwrap();
    nats.flush().await.unwrap();
    NatsOptions::with_url(format!("nats://t0ken-s3cret@{host}"))
        .connect("t")
        .await
        .expect("the token in the URL is accepted");
    let wrong = NatsOptions { token: Some("nope".into()), ..NatsOptions::with_url(url) }
        .connect("t")
        .await
        .unwrap_err()
        .to_string();
    assert!(wrong.contains("refused a token"), "{wrong}");
    assert!(!wrong.contains("nope"), "{wrong}");
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "saga test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issue = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) =
        issue(vec!["127.0.0.1".into(), "localhost".into()], ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) =
        issue(vec!["seller".into()], ExtendedKeyUsagePurpose::ClientAuth);
    Pki {
        ca: write(dir, "ca.pem", &ca_cert.pem()),
        server_cert: write(dir, "server.pem", &server_cert),
        server_key: write(dir, "server-key.pem", &server_key),
        client_cert: write(dir, "client.pem", &client_cert),
        client_key: write(dir, "client-key.pem", &client_key),
    }
}

#[tokio::test]
async fn mutual_tls_connects_with_a_client_certificate_and_refuses_without_one() {
    let dir = scratch("tls");
    let pki = pki(&dir);
    let server = server_with(format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 2\n}}",
        pki.server_cert, pki.server_key, pki.ca
    ));
    let url = server.url();
    let tls = NatsOptions {
        tls_ca: Some(pki.ca.clone()),
        tls_cert: Some(pki.client_cert.clone()),
        tls_key: Some(pki.client_key.clone()),
        ..NatsOptions::with_url(url.clone())
    };
    let nats = tls.connect("seller").await.expect("mutual TLS connects");
    let js = async_nats::jetstream::new(nats);
    js.query_account().await.expect("JetStream answers over TLS");

    let no_client_cert =
        NatsOptions { tls_ca: Some(pki.ca.clone()), ..NatsOptions::with_url(url.clone()) };
    let err = no_client_cert.connect("seller").await.unwrap_err();
    eprintln!("without a client certificate: {err}");
    assert!(matches!(err, ConnectError::Tls { .. }), "{err}");
    assert!(err.to_string().contains(&url), "{err}");
    let unknown_ca = NatsOptions::with_url(url.clone()).connect("seller").await.unwrap_err();
    eprintln!("without the CA: {unknown_ca}");
    assert!(matches!(unknown_ca, ConnectError::Tls { .. }), "{unknown_ca}");
    assert!(unknown_ca.to_string().contains(&url), "{unknown_ca}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A JWT signed by `signer`, as nsc writes them.
fn jwt(claims: serde_json::Value, signer: &nkeys::KeyPair) -> String {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = b64(claims.to_string().as_bytes());
    let signature = signer.sign(format!("{header}.{body}").as_bytes()).unwrap();
    format!("{header}.{body}.{}", b64(&signature))
}

/// Decentralized authentication: an operator, an account and a user JWT (made here as nsc
/// would), the server in operator mode, and the user's `.creds` file given with `--creds`.
#[tokio::test]
async fn a_creds_file_authenticates_in_operator_mode_and_a_foreign_one_is_refused() {
    use serde_json::json;
    let dir = scratch("creds");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let now = now.as_secs();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let (op, acc) = (operator.public_key(), account.public_key());
    let operator_jwt = jwt(
        json!({"jti": "op", "iat": now, "iss": op, "sub": op, "name": "test",
               "nats": {"type": "operator", "version": 2}}),
        &operator,
    );
    let account_jwt = jwt(
        json!({"jti": "acc", "iat": now, "iss": op, "sub": acc, "name": "services",
               "nats": {"limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1,
                                   "exports": -1, "wildcards": true, "conn": -1, "leaf": -1},
                        "type": "account", "version": 2}}),
        &operator,
    );
    let creds = |name: &str, signer: &nkeys::KeyPair| {
        let user = nkeys::KeyPair::new_user();
        let user_jwt = jwt(
            json!({"jti": name, "iat": now, "iss": signer.public_key(), "sub": user.public_key(),
                   "name": name,
                   "nats": {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                            "type": "user", "version": 2}}),
            signer,
        );
        let text = format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        );
        write(&dir, &format!("{name}.creds"), &text)
    };
    let seller = creds("seller", &account);
    // Signed by an account the server does not know.
    let stranger = creds("stranger", &nkeys::KeyPair::new_account());
    let server = NatsServer::start_with(NatsServerOptions {
        jetstream: false,
        extra_config: Some(format!(
            "operator: {operator_jwt:?}\nresolver: MEMORY\nresolver_preload: {{\n  {acc}: {account_jwt:?}\n}}"
        )),
        ..Default::default()
    });
    let url = server.url();

    let nats = NatsOptions { creds: Some(seller), ..NatsOptions::with_url(url.clone()) }
        .connect("seller")
        .await
        .expect("the creds file is accepted");
    let mut sub = nats.subscribe("ping").await.unwrap();
    nats.publish("ping", "pong".into()).await.unwrap();
    use futures::StreamExt as _;
    assert_eq!(sub.next().await.unwrap().payload, "pong");

    let err = NatsOptions { creds: Some(stranger.clone()), ..NatsOptions::with_url(url) }
        .connect("stranger")
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Refused { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("refused the credentials file {}", stranger.display())),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
