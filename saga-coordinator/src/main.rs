//! The saga coordinator: run one or more replicas against a NATS server with JetStream.
//! `saga-coordinator --help` lists the settings.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    saga_coordinator::main().await
}
