//! The demo scenario at small scale, in-process, through the same code `./scripts/demo` runs
//! (`orders batch` calls `scenario::run`), plus the Orders HTTP API.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use example_services::logistics::LogisticsConfig;
use example_services::orders::{router, OrderView, Orders};
use example_services::scenario::{self, ScenarioConfig};
use example_services::{logistics, notification, seller};
use saga_core::{SagaDefinition, SagaStatus};
use saga_nats::{Coordinator, Participant};
use saga_tests::support::*;
use saga_tests::NatsServer;
use tower::ServiceExt;

const DEFINITION: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../example-services/sagas/place-order.yaml");

struct Stack {
    _coordinator: Coordinator,
    _seller: Participant,
    _logistics: Participant,
    notification: Option<saga_nats::follow::Following>,
    orders: Orders,
}

async fn stack(nats: &async_nats::Client, stock: &str, behaviour: LogisticsConfig) -> Stack {
    let def = SagaDefinition::load(DEFINITION).expect("the demo's saga definition loads");
    let coordinator =
        Coordinator::start(nats.clone(), coordinator_config(vec![def], Duration::from_secs(5)))
            .await
            .expect("coordinator starts");
    let stock = seller::parse_stock(stock).unwrap();
    Stack {
        _coordinator: coordinator,
        _seller: seller::run(nats.clone(), &stock, 16).await.expect("seller starts"),
        _logistics: logistics::run(nats.clone(), behaviour, 32).await.expect("logistics starts"),
        notification: Some(notification::run(nats.clone()).await.expect("notification starts")),
        orders: Orders::new(nats.clone()).await.expect("orders connects"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_scenario_ends_every_saga_and_the_books_balance() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    // Little stock, so some orders run out; logistics fails some orders and hangs on others.
    let behaviour = LogisticsConfig {
        latency_ms: 5,
        failure_rate: 0.15,
        timeout_rate: 0.1,
        ..Default::default()
    };
    let mut stack = stack(&nats, "apple=25,pear=25,plum=25", behaviour.clone()).await;
    let config = ScenarioConfig {
        orders: 60,
        concurrency: 16,
        timeout: Duration::from_secs(90),
        run_id: "t1".into(),
        progress: false,
        ..Default::default()
    };
    let report = scenario::run(nats.clone(), &stack.orders, &config).await.expect("scenario runs");
    let mut printed = Vec::new();
    report.print(&mut printed).unwrap();
    let printed = String::from_utf8(printed).unwrap();
    eprintln!("{printed}");

    // The counts add up and every saga is terminal.
    assert_eq!(report.outcomes.len(), 60);
    assert!(report.unfinished().is_empty(), "unfinished: {:?}", report.unfinished());
    let completed = report.count(SagaStatus::Completed);
    let compensated = report.count(SagaStatus::Compensated);
    assert_eq!(completed + compensated, 60, "{printed}");
    assert!(completed > 0 && compensated > 0, "both outcomes occur: {printed}");
    let orders = config.make_orders();
    let expected_courier_failures = orders.iter().filter(|o| behaviour.fails(o)).count();
    assert!(
        compensated >= expected_courier_failures,
        "{compensated} < {expected_courier_failures}"
    );

    // Stock after = stock before − what completed orders hold, SKU by SKU, computed here from
    // the orders themselves; and what the seller holds is exactly the completed orders.
    let mut held: BTreeMap<String, u32> = BTreeMap::new();
    let mut holders: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for o in report.outcomes.iter().filter(|o| o.status() == Some(SagaStatus::Completed)) {
        *held.entry(o.order.sku.clone()).or_default() += o.order.quantity;
        holders.entry(o.order.sku.clone()).or_default().insert(o.order.id.clone());
    }
    for sku in ["apple", "pear", "plum"] {
        let before = &report.stock_before[sku];
        let after = &report.stock_after[sku];
        assert_eq!(before.available, 25);
        assert!(before.held.is_empty());
        let h = held.get(sku).copied().unwrap_or(0);
        assert_eq!(after.available + h, before.available, "{sku}: {printed}");
        let holding: BTreeSet<String> = after.held.keys().cloned().collect();
        assert_eq!(holding, holders.get(sku).cloned().unwrap_or_default(), "{sku}");
    }
    assert!(report.stock_problems().is_empty());

    // Notification recorded exactly one message per finished order, with its outcome.
    assert_eq!(report.notifications.len(), 60, "{printed}");
    let by_saga: BTreeMap<&str, &str> =
        report.notifications.iter().map(|n| (n.saga_id.as_str(), n.outcome.as_str())).collect();
    assert_eq!(by_saga.len(), 60, "one notification per saga");
    for o in &report.outcomes {
        assert_eq!(by_saga.get(o.saga_id.as_str()).copied(), o.status().map(|s| s.as_str()));
    }
    assert!(report.is_ok());

    // Placing the same batch again starts nothing new: the order id is the idempotency key.
    let again = scenario::run(nats.clone(), &stack.orders, &config).await.expect("scenario runs");
    let statuses = |r: &scenario::ScenarioReport| -> BTreeMap<String, Option<SagaStatus>> {
        r.outcomes.iter().map(|o| (o.order.id.clone(), o.status())).collect()
    };
    assert_eq!(statuses(&again), statuses(&report));
    assert_eq!(again.stock_after, report.stock_after, "stock untouched by the repeat");
    let notices = notification::sent(nats.clone()).await.unwrap();
    assert_eq!(notices.len(), 60, "no second notification");
    stack.notification.take().unwrap().shutdown().await;
}

async fn call(app: &axum::Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let resp = app.clone().oneshot(req).await.expect("router answers");
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

fn post(body: impl Into<Body>) -> Request<Body> {
    Request::post("/orders").header("content-type", "application/json").body(body.into()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orders_api_places_and_shows_orders_and_names_what_is_wrong() {
    init_logging();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let no_trouble = LogisticsConfig {
        latency_ms: 1,
        failure_rate: 0.0,
        timeout_rate: 0.0,
        ..Default::default()
    };
    let stack = stack(&nats, "apple=5", no_trouble).await;
    let app = router(Arc::new(stack.orders.clone()));

    let (status, placed) =
        call(&app, post(r#"{"id":"o-1","customer":"ada","sku":"apple","quantity":2}"#)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    assert_eq!(placed["order_id"], "o-1");
    assert_eq!(placed["status_url"], "/orders/o-1");

    // The same order again: accepted, the same saga. Another order under its id: refused.
    let (status, again) =
        call(&app, post(r#"{"id":"o-1","customer":"ada","sku":"apple","quantity":2}"#)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["saga_id"], placed["saga_id"]);
    let (status, json) =
        call(&app, post(r#"{"id":"o-1","customer":"ada","sku":"apple","quantity":3}"#)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{json}");
    let message = json["error"].as_str().unwrap_or_default();
    assert!(message.contains("order o-1 exists with other contents"), "{message}");

    let view = loop {
        let (status, json) =
            call(&app, Request::get("/orders/o-1").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        let view: OrderView = serde_json::from_value(json).unwrap();
        if view.status.is_terminal() {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(view.status, SagaStatus::Completed);
    assert_eq!(view.order.as_ref().map(|o| o.quantity), Some(2));
    let lines: Vec<&str> = view.timeline.iter().map(|e| e.what.as_str()).collect();
    assert_eq!(lines.first(), Some(&"started"));
    assert!(
        lines.contains(&"dispatched reserve-items (action, attempt 1) → seller.reserve"),
        "{lines:?}"
    );
    assert_eq!(lines.last(), Some(&"finished: completed"));

    // More than the stock: the saga compensates, and the view says why.
    let (status, _) =
        call(&app, post(r#"{"id":"o-2","customer":"ada","sku":"apple","quantity":9}"#)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = stack
        .orders
        .client()
        .wait(&saga_nats::SagaClient::id_for_key("place-order", "o-2"), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(id.status(), SagaStatus::Compensated);
    let (_, json) = call(&app, Request::get("/orders/o-2").body(Body::empty()).unwrap()).await;
    let reason = json["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("out of stock: 9 apple wanted, 3 available"), "{json}");

    // Bad requests get 4xx with a message naming what is wrong.
    let cases: [(Request<Body>, StatusCode, &str); 5] = [
        (
            post(r#"{"customer":"ada","sku":"apple","quantity":0}"#),
            StatusCode::BAD_REQUEST,
            "quantity 0",
        ),
        (
            post(r#"{"customer":"ada","sku":"ap.ple","quantity":1}"#),
            StatusCode::BAD_REQUEST,
            "sku \"ap.ple\"",
        ),
        (
            post(r#"{"customer":"ada","quantity":1}"#),
            StatusCode::BAD_REQUEST,
            "missing field `sku`",
        ),
        (post("{not json"), StatusCode::BAD_REQUEST, "JSON"),
        (
            post(format!(r#"{{"customer":"{}","sku":"a","quantity":1}}"#, "x".repeat(20_000))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "length limit",
        ),
    ];
    for (req, want, says) in cases {
        let (status, json) = call(&app, req).await;
        assert_eq!(status, want, "{json}");
        let message = json["error"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{message:?} should say {says:?}");
    }
    let (status, json) =
        call(&app, Request::get("/orders/nope").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json["error"], "no order \"nope\"");
}
