//! An echo participant as its own process, so that fault tests can kill it with SIGKILL in
//! the middle of its handlers: `echo-participant <nats-url> <instance>` serves steps `a`, `b`
//! and `c` of service `svc` (see `saga_tests::support::recording_participant`), prints
//! `ready` once it takes commands, and runs until killed.

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(instance)) = (args.next(), args.next()) else {
        eprintln!("usage: echo-participant <nats-url> <instance>");
        std::process::exit(2);
    };
    saga_coordinator::init_telemetry("echo-participant");
    let nats = async_nats::connect(&url).await.expect("connects to NATS");
    let _participant =
        saga_tests::support::recording_participant(nats, "svc", &["a", "b", "c"], &instance).await;
    println!("ready");
    std::future::pending::<()>().await;
}
