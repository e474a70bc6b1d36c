//! `sagactl`: operate sagas from a terminal. `sagactl --help` lists the commands.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    sagactl::main().await
}
