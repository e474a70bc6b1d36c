//! The chaos harness, short: the demo stack under load while coordinators, participants (in
//! the middle of handlers) and the nats-server are killed with SIGKILL and started again;
//! the harness's own audit must find nothing wrong. The long run is in RELIABILITY.md.

use std::process::Command;

const CHAOS: &str = env!("CARGO_BIN_EXE_saga-chaos");

#[test]
fn a_short_chaos_run_loses_nothing_and_runs_no_effect_twice() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let dir = std::env::temp_dir().join(format!("saga-chaos-test-{seed}"));
    let out = Command::new(CHAOS)
        .args(["--sagas", "300", "--rate", "25", "--kills", "10", "--max-down-ms", "1500"])
        .args(["--seed", &seed.to_string()])
        .arg("--dir")
        .arg(&dir)
        .output()
        .expect("saga-chaos runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}\n{stdout}");
    assert!(
        out.status.success(),
        "saga-chaos failed ({}); its logs are in {}",
        out.status,
        dir.display()
    );
    // Ten kills in rounds of five kinds: every kind was killed at least twice.
    for kind in ["coordinator", "seller", "logistics", "notification", "nats-server"] {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("killed {kind} ")))
            .unwrap_or_else(|| panic!("no {kind} was killed:\n{stdout}"));
        let n: usize = line.split_whitespace().nth(2).and_then(|n| n.parse().ok()).unwrap_or(0);
        assert!(n >= 2, "{line}");
    }
    assert!(stdout.contains("completed"), "{stdout}");
    assert!(stdout.contains("OK: every saga ended"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
