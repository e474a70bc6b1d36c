//! The coordinator command line, built inside the tests crate so that fault tests can start
//! it as a separate process (and kill it).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    saga_coordinator::main().await
}
