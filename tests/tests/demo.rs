//! The demo scenario at small scale, in-process, through the same code `./scripts/demo` runs
//! (`orders batch` calls `scenario::run`), plus the Orders HTTP API.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use example_services::logistics::LogisticsConfig;
use example_services::orders::{router, OrderView, Orders};
use example_services::payments::{PaymentStatus, PaymentsConfig};
use example_services::scenario::{self, ScenarioConfig};
use example_services::{logistics, notification, payments, seller};
use saga_core::{Phase, SagaDefinition, SagaStatus};
use saga_nats::permissions::Access;
use saga_nats::subjects::{self, ReplyTo};
use saga_nats::{Coordinator, NatsOptions, Participant};
use saga_tests::auth::{expect_denied, no_denials, Bus};
use saga_tests::support::*;
use saga_tests::NatsServer;
use tower::ServiceExt;

const DEFINITION: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../example-services/sagas/place-order.yaml");

struct Stack {
    _coordinator: Coordinator,
    _seller: Participant,
    _logistics: Participant,
    _payments: saga_nats::follow::Following,
    notification: Option<saga_nats::follow::Following>,
    orders: Orders,
}

async fn stack(
    nats: &async_nats::Client,
    stock: &str,
    behaviour: LogisticsConfig,
    paying: PaymentsConfig,
) -> Stack {
    let def = SagaDefinition::load(DEFINITION).expect("the demo's saga definition loads");
    let coordinator =
        Coordinator::start(nats.clone(), coordinator_config(vec![def], Duration::from_secs(5)))
            .await
            .expect("coordinator starts");
    let stock = seller::parse_stock(stock).unwrap();
    Stack {
        _coordinator: coordinator,
        _seller: seller::run(nats.clone(), &stock, 16, None).await.expect("seller starts"),
        _logistics: logistics::run(nats.clone(), behaviour, 32, None)
            .await
            .expect("logistics starts"),
        _payments: payments::run(nats.clone(), paying).await.expect("payments starts"),
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
    // Payments declines some orders, and answers a while after the items are reserved.
    let paying = PaymentsConfig { latency_ms: 30, decline_rate: 0.15 };
    let mut stack =
        stack(&nats, "apple=25,pear=25,plum=25", behaviour.clone(), paying.clone()).await;
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
    // Every order Payments declines or no courier takes compensates (so do some that ran out).
    let doomed = orders.iter().filter(|o| paying.declines(o) || behaviour.fails(o)).count();
    assert!(compensated >= doomed, "{compensated} < {doomed}");

    // Each order's payment follows how its saga ended: a declined payment compensates the
    // saga at its await step, a completed order is charged, and one compensated after it was
    // charged (no courier) is refunded.
    assert!(report.payment_problems().is_empty(), "{printed}");
    let mut seen = BTreeSet::new();
    for o in &report.outcomes {
        let view = o.view.as_ref().expect("ended");
        let lines: Vec<&str> = view.timeline.iter().map(|e| e.what.as_str()).collect();
        let awaiting = format!(
            "awaiting payment: event payments.confirmed where order_id = \"{}\"",
            o.order.id
        );
        let waited = lines.iter().position(|l| l.starts_with(&awaiting));
        let paid = report.payments.get(&o.order.id).map(|p| p.status);
        match paid {
            Some(PaymentStatus::Declined) => {
                assert_eq!(view.status, SagaStatus::Compensated, "{lines:?}");
                let reason = view.reason.as_deref().unwrap_or_default();
                assert!(
                    reason.starts_with("step payment failed: event domain.payments.declined"),
                    "{reason}"
                );
                assert!(paying.declines(&o.order), "declined only when the draw says so");
            }
            Some(PaymentStatus::Charged) => {
                assert_eq!(view.status, SagaStatus::Completed, "{lines:?}");
                let shipped = lines
                    .iter()
                    .position(|l| l.starts_with("dispatched schedule-shipment"))
                    .expect("shipped");
                assert!(waited.expect("waited for the payment") < shipped, "{lines:?}");
            }
            Some(PaymentStatus::Refunded) => {
                assert_eq!(view.status, SagaStatus::Compensated);
                assert!(behaviour.fails(&o.order), "refunded: logistics failed it");
            }
            // Out of stock: the saga never got to the payment.
            Some(PaymentStatus::Void) | None => {
                assert_eq!(view.status, SagaStatus::Compensated);
                assert!(waited.is_none(), "{lines:?}");
            }
        }
        seen.insert(paid.map(|p| p.as_str()));
    }
    for wanted in ["charged", "declined"] {
        assert!(seen.contains(&Some(wanted)), "no payment {wanted}: {seen:?}\n{printed}");
    }
    assert!(printed.contains("waited for the payment event: p50"), "{printed}");

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
    // A compensated order's notice says why (the cause the saga recorded).
    for o in report.outcomes.iter().filter(|o| o.status() == Some(SagaStatus::Compensated)) {
        let reason = o.view.as_ref().and_then(|v| v.reason.clone()).expect("a reason");
        let notice = report.notifications.iter().find(|n| n.saga_id == o.saga_id.as_str());
        let message = &notice.expect("notified").message;
        assert!(message.contains(&reason), "{message:?} should say {reason:?}");
    }
    assert!(report.is_ok());

    // Placing the same batch again starts nothing new: the order id is the idempotency key.
    let again = scenario::run(nats.clone(), &stack.orders, &config).await.expect("scenario runs");
    let statuses = |r: &scenario::ScenarioReport| -> BTreeMap<String, Option<SagaStatus>> {
        r.outcomes.iter().map(|o| (o.order.id.clone(), o.status())).collect()
    };
    assert_eq!(statuses(&again), statuses(&report));
    assert_eq!(again.stock_after, report.stock_after, "stock untouched by the repeat");
    assert_eq!(again.payments, report.payments, "nobody charged twice");
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
    let instant = PaymentsConfig { latency_ms: 1, decline_rate: 0.0 };
    let stack = stack(&nats, "apple=5", no_trouble, instant).await;
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
    assert!(lines.iter().any(|l| l.starts_with("awaiting payment: event payments.confirmed")));
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

/// The policy `./scripts/demo` gives the demo's services.
fn demo_access() -> Access {
    let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
    Access {
        starters: [("orders".into(), set(&["place-order"]))].into(),
        followers: [
            ("notification".into(), set(&["place-order"])),
            ("payments".into(), set(&["place-order"])),
        ]
        .into(),
        operators: set(&["demo"]),
        buckets: [
            ("seller".into(), set(&["demo_stock"])),
            ("orders".into(), set(&["demo_orders"])),
            ("notification".into(), set(&["demo_notifications"])),
            ("payments".into(), set(&["demo_payments"])),
        ]
        .into(),
        readers: [("orders".into(), set(&["demo_stock", "demo_notifications", "demo_payments"]))]
            .into(),
        publishers: set(&["seller", "payments"]),
        ..Access::default()
    }
}

/// The demo with authentication on, each service with only the permissions `./scripts/demo`
/// generates: the scenario runs and nothing is refused; then what each service's credentials
/// try beyond its role is refused by the server, and the stock, the orders' sagas and the
/// notifications are as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_with_least_privilege_runs_and_every_attack_is_refused() {
    init_logging();
    let def = SagaDefinition::load(DEFINITION).expect("the demo's saga definition loads");
    let bus = Bus::start(std::slice::from_ref(&def), &demo_access());
    let (nats, coordinator_denials) = bus.connect("coordinator").await;
    let config = saga_nats::CoordinatorConfig {
        kv_buckets: ["demo_stock", "demo_orders", "demo_notifications", "demo_payments"]
            .map(String::from)
            .into(),
        ..coordinator_config(vec![def], Duration::from_secs(5))
    };
    let coordinator = Coordinator::start(nats, config).await.expect("coordinator starts");
    let (nats, seller_denials) = bus.connect("seller").await;
    let stock = seller::parse_stock("apple=8,pear=8,plum=8").unwrap();
    let _seller = seller::run(nats, &stock, 16, None).await.expect("seller starts");
    let (nats, logistics_denials) = bus.connect("logistics").await;
    let behaviour = LogisticsConfig { latency_ms: 5, failure_rate: 0.2, ..Default::default() };
    let _logistics = logistics::run(nats, behaviour, 32, None).await.expect("logistics starts");
    let (nats, notification_denials) = bus.connect("notification").await;
    let following = notification::run(nats).await.expect("notification starts");
    let (nats, payments_denials) = bus.connect("payments").await;
    let paying = PaymentsConfig { latency_ms: 5, decline_rate: 0.2 };
    let _payments = payments::run(nats, paying).await.expect("payments starts");
    let (orders_nats, orders_denials) = bus.connect("orders").await;
    let orders = Orders::new(orders_nats.clone()).await.expect("orders connects");

    let config = ScenarioConfig {
        orders: 20,
        concurrency: 8,
        timeout: Duration::from_secs(90),
        run_id: "auth".into(),
        progress: false,
        ..Default::default()
    };
    let report = scenario::run(orders_nats.clone(), &orders, &config).await.expect("it runs");
    assert!(report.unfinished().is_empty(), "unfinished: {:?}", report.unfinished());
    assert!(report.is_ok(), "the books do not balance");
    for (who, denials) in [
        ("coordinator", &coordinator_denials),
        ("seller", &seller_denials),
        ("logistics", &logistics_denials),
        ("notification", &notification_denials),
        ("payments", &payments_denials),
        ("orders", &orders_denials),
    ] {
        no_denials(who, denials);
    }
    let completed = report
        .outcomes
        .iter()
        .find(|o| o.status() == Some(SagaStatus::Completed))
        .expect("an order completed");
    let id = completed.saga_id.clone();
    // The seller published its own event for the order, tagged with the saga.
    let (operator, operator_denials) = bus.connect("demo").await;
    let client = saga_nats::SagaClient::new(operator).await.unwrap();
    let tagged = client.domain_events("place-order", &id).await.unwrap();
    no_denials("demo", &operator_denials);
    assert!(
        tagged.events.iter().any(|e| e.subject == "domain.seller.reserved"),
        "the seller's reserved event, tagged with saga {id}: {tagged:?}"
    );
    let stock_before = report.stock_after.clone();
    let statuses: Vec<_> =
        report.outcomes.iter().map(|o| (o.saga_id.clone(), o.status())).collect();

    // Logistics answers for the seller's step.
    let (logistics, denials) = bus.connect("logistics").await;
    let forged = ReplyTo {
        replica: coordinator.replica().to_owned(),
        service: "seller".into(),
        saga_id: id.clone(),
        step: "reserve-items".into(),
        phase: Phase::Compensation,
        attempt: 1,
    }
    .subject();
    logistics.publish(forged.clone(), "forged".into()).await.unwrap();
    expect_denied("logistics", &denials, &forged).await;
    // Orders tells the seller to release a completed order's stock.
    let (orders_bus, denials) = bus.connect("orders").await;
    let release = subjects::command(&"seller".into(), &"release".into());
    orders_bus.publish(release.clone(), "release it all".into()).await.unwrap();
    expect_denied("orders", &denials, &release).await;
    // ...rewrites the stock, cancels as an operator, or rewrites the saga's record.
    orders_bus.publish("$KV.demo_stock.apple", "999".into()).await.unwrap();
    expect_denied("orders", &denials, "$KV.demo_stock.apple").await;
    let cancel = subjects::operator(&id, &"place-order".into(), "orders");
    orders_bus.publish(cancel.clone(), "x".into()).await.unwrap();
    expect_denied("orders", &denials, &cancel).await;
    let record = subjects::log(&id, &"place-order".into(), "completed");
    orders_bus.publish(record.clone(), "x".into()).await.unwrap();
    expect_denied("orders", &denials, &record).await;
    // Notification tells a customer her completed order was cancelled.
    let (notification_bus, denials) = bus.connect("notification").await;
    let lie = subjects::log(&id, &"place-order".into(), "cancelled");
    notification_bus.publish(lie.clone(), "x".into()).await.unwrap();
    expect_denied("notification", &denials, &lie).await;
    // The seller reads customers' orders from the saga log, or writes the orders' bucket.
    let (seller_bus, denials) = bus.connect("seller").await;
    let read = format!("$JS.API.DIRECT.GET.SAGA_LOG.saga.log.{id}.>");
    seller_bus.publish(read.clone(), "".into()).await.unwrap();
    expect_denied("seller", &denials, &read).await;
    seller_bus.publish("$KV.demo_orders.x", "x".into()).await.unwrap();
    expect_denied("seller", &denials, "$KV.demo_orders.x").await;
    // The seller confirms a payment itself, to ship an order nobody paid for.
    let forged_payment = "domain.payments.confirmed";
    seller_bus.publish(forged_payment, "paid, honest".into()).await.unwrap();
    expect_denied("seller", &denials, forged_payment).await;
    // Payments completes the await step directly, in the coordinator's store of arrivals.
    let (payments_bus, denials) = bus.connect("payments").await;
    let arrival = format!("saga.await.{}.x", "0".repeat(16));
    payments_bus.publish(arrival.clone(), "x".into()).await.unwrap();
    expect_denied("payments", &denials, &arrival).await;
    // Nobody gets in without credentials.
    assert!(NatsOptions::with_url(bus.server.url()).connect("anonymous").await.is_err());

    // Everything is as it was.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stock_now =
        seller::StockStore::open(orders_nats.clone()).await.unwrap().all().await.unwrap();
    assert_eq!(stock_now, stock_before, "the stock changed");
    for (saga, status) in statuses {
        let view = orders.client().get(&saga).await.unwrap().expect("the saga is there");
        assert_eq!(Some(view.status()), status, "saga {saga} changed");
    }
    let notices = notification::sent(orders_nats.clone()).await.unwrap();
    assert_eq!(notices.len(), 20, "one notice per order, no forged one");
    following.shutdown().await;
}
