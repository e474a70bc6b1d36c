//! The `sagactl` command line, built inside the tests crate so that tests can run it as a
//! separate process, as an operator would.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    sagactl::main().await
}
