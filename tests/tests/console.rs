//! The web console end to end in headless Chromium (Debian's `chromium`, driven by
//! playwright-core from tests/browser): against a real stack, the list shows the sagas the
//! test ran with the right counts; a compensated saga's page shows its steps, the failure's
//! reason and the compensations in order; a saga waiting at an await step shows the wait; an
//! operator action from the page changes the saga and its history names the operator. Screenshots go to target/browser/console/.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use saga_core::{SagaDefinition, SagaStatus, StepStatus};
use saga_tests::support::*;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_lists_shows_and_acts_in_a_real_browser() {
    init_logging();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: ./scripts/test installs Debian's chromium (apt-get install chromium)"
    );
    assert!(
        root.join("browser/node_modules/playwright-core").exists(),
        "playwright-core is missing: ./scripts/test installs it (npm ci in tests/browser)"
    );

    let stack = echo_stack("shop", &["a", "b", "c"], Duration::from_secs(10)).await;
    let client = stack.client.clone();
    let mut completed = Vec::new();
    for n in 0..3 {
        completed.push(client.start("shop", &TestInput { n, ..Default::default() }).await.unwrap());
    }
    let input = TestInput { n: 7, fail: vec!["c".into()], ..Default::default() };
    let compensated = client.start("shop", &input).await.unwrap();
    let input = TestInput {
        n: 8,
        fail: vec!["b".into()],
        comp_fail: vec![("a".into(), 100)],
        ..Default::default()
    };
    let parked = client.start("shop", &input).await.unwrap();
    for id in &completed {
        assert_eq!(client.wait(id, WAIT).await.unwrap().status(), SagaStatus::Completed);
    }
    assert_eq!(client.wait(&compensated, WAIT).await.unwrap().status(), SagaStatus::Compensated);
    assert_eq!(client.wait(&parked, WAIT).await.unwrap().status(), SagaStatus::NeedsIntervention);

    // A saga of another definition (registered now), waiting for a signal at its await step.
    let review = SagaDefinition::builder("review")
        .step("a", "svc", "a", |s| s.read_only())
        .await_step("approval", |a| a.signal("approve").timeout(Duration::from_secs(600)))
        .build();
    client.register(&review).await.unwrap();
    let waiting = client.start("review", &TestInput { n: 9, ..Default::default() }).await.unwrap();
    let mut tries = 0;
    while !client.get(&waiting).await.unwrap().is_some_and(|v| {
        v.snapshot
            .steps
            .iter()
            .any(|s| s.name.as_str() == "approval" && s.status == StepStatus::Running)
    }) {
        tries += 1;
        assert!(tries < 600, "saga {waiting} never began waiting");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A service's own event about the compensated order, tagged with its saga.
    let refund = serde_json::json!({ "order": 7, "refund": "full" });
    saga_nats::follow::publish_saga_event(
        &stack.nats,
        &compensated,
        "shop.refund_requested",
        "r-7",
        &refund,
    )
    .await
    .unwrap();
    // One about no saga: not shown.
    saga_nats::follow::publish_domain_event(&stack.nats, "shop.audit", "a-1", &refund)
        .await
        .unwrap();

    let console = saga_console::Console {
        client: client.clone().with_operator("browser-op"),
        nats: stack.nats.clone(),
        operator: Some("browser-op".into()),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, saga_console::router(console)).await.unwrap();
    });

    let shots = root.join("../target/browser/console");
    let want = serde_json::json!({
        "saga": "shop",
        "steps": 3,
        "finished": 4,
        "completed": 3,
        "compensated": compensated,
        "compensated_reason": "c refused order 7",
        "compensations": ["b", "a"],
        "parked": parked,
        "waiting": waiting,
        "waits_for": "signal approve",
        "operator": "browser-op",
    });
    let script = root.join("browser/console.mjs");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .arg(&url)
            .arg(&shots)
            .arg(want.to_string())
            .env("CHROMIUM", chromium)
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    println!("{}", text(&out.stdout));
    assert!(
        out.status.success(),
        "the browser checks failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    server.abort();
}
