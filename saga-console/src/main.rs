//! `saga-console`: the saga web console. `saga-console --help` lists the settings.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    saga_console::main().await
}
