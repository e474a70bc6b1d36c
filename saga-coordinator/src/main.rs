//! The saga coordinator: run one or more replicas against a NATS server with JetStream.
//! `saga-coordinator --help` lists the settings.

/// The coordinator allocates a little for every message it handles; mimalloc does that markedly
/// cheaper than the system allocator (BENCHMARKS.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    saga_coordinator::main().await
}
