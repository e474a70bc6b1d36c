//! The chaos harness, short: the demo stack under load while coordinators, participants (in
//! the middle of handlers) and the nats-server are killed with SIGKILL and started again;
//! the harness's own audit must find nothing wrong; then the same on a 3-node JetStream
//! cluster, where the server kills take the saga log's stream leader and then a follower.
//! The long runs are in RELIABILITY.md.

use std::process::Command;

const CHAOS: &str = env!("CARGO_BIN_EXE_saga-chaos");

/// Runs `saga-chaos` with `args` and a fresh seed; returns its report, after checking that it
/// exited 0 with the audit OK and every kind of process killed at least twice.
fn chaos(name: &str, args: &[&str]) -> String {
    // One run at a time: each one alone keeps this machine's two cores busy.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let dir = std::env::temp_dir().join(format!("saga-{name}-{seed}"));
    let out = Command::new(CHAOS)
        .args(args)
        .args(["--seed", &seed.to_string()])
        .arg("--dir")
        .arg(&dir)
        .output()
        .expect("saga-chaos runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}\n{stdout}");
    assert!(
        out.status.success(),
        "saga-chaos failed ({}); its logs are in {}",
        out.status,
        dir.display()
    );
    // Twelve kills in rounds of six kinds: every kind was killed at least twice.
    for kind in ["coordinator", "seller", "logistics", "notification", "payments", "nats-server"] {
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
    stdout
}

#[test]
fn a_short_chaos_run_loses_nothing_and_runs_no_effect_twice() {
    chaos("chaos", &["--sagas", "300", "--rate", "25", "--kills", "12", "--max-down-ms", "1500"]);
}

#[test]
fn a_cluster_losing_its_log_leader_then_a_follower_loses_nothing() {
    let report = chaos(
        "chaos-cluster",
        // One instance of each service: three nats-servers and the stack share two cores.
        &["--cluster", "3", "--instances", "1", "--sagas", "300", "--rate", "20", "--kills", "12"],
    );
    // Two node kills: the first took the saga log's stream leader, the second a follower;
    // the report gives the pause each caused.
    let kills: Vec<&str> = report
        .lines()
        .skip_while(|l| !l.starts_with("== cluster node kills"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect();
    assert!(kills.len() >= 2, "{report}");
    assert!(kills[0].contains(" leader "), "{}", kills[0]);
    assert!(kills[1].contains(" follower "), "{}", kills[1]);
    assert!(
        kills[0].contains("new leader after") && !kills[0].contains("after        -"),
        "{}",
        kills[0]
    );
}
