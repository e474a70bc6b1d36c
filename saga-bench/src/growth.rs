//! `--growth N`: ours at one concurrency, window after window, until the saga log holds `N`
//! finished sagas (retention on: the log keeps finished sagas for its configured age, the
//! effect buckets theirs). Each window prints its throughput, latency, CPU per saga, the
//! coordinators' resident memory and the log's size, so that a cost growing with history
//! shows as a trend; the last line compares the first windows with the last.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use saga_nats::subjects;

use crate::load::{closed_loop, Env, Measurement, System};
use crate::report::format_ms;

/// One measured window and the state after it.
pub(crate) struct Window {
    /// Finished sagas in the log at the end of the window.
    pub(crate) history: u64,
    pub(crate) m: Measurement,
    /// Resident memory of the coordinators, MiB.
    pub(crate) rss_mib: f64,
    /// The saga log's size on disk, MiB.
    pub(crate) log_mib: f64,
}

/// Measures windows until the log holds `target` sagas; prints each window as it ends.
pub(crate) async fn run(
    system: Arc<dyn System>,
    coordinators: usize,
    steps: usize,
    concurrency: usize,
    target: u64,
    env: &Env,
) -> anyhow::Result<Vec<Window>> {
    let js = env.stored.context();
    // Each finished saga (no failure) leaves its first record and one per step in the log.
    let records_per_saga = steps as u64 + 1;
    let mut windows = Vec::new();
    println!();
    println!(
        "growth: closed c={concurrency}, windows of {:?} until the log holds {target} sagas",
        env.measure
    );
    println!("{}", header());
    loop {
        let done = windows.last().map_or(0, |w: &Window| w.history);
        let label = format!("[ours] growth c={concurrency}, {done} of {target} sagas in the log");
        let m = closed_loop("ours", coordinators, system.clone(), concurrency, env, label).await?;
        let mut log = js.get_stream(subjects::LOG_STREAM).await.context("reading the saga log")?;
        let state = log.info().await.context("reading the saga log")?.state.clone();
        let pids = match system.processes() {
            pids if pids.is_empty() => vec![std::process::id()],
            pids => pids,
        };
        let window = Window {
            history: state.messages / records_per_saga,
            rss_mib: pids.iter().filter_map(|p| rss_kib(*p)).sum::<u64>() as f64 / 1024.0,
            log_mib: state.bytes as f64 / (1024.0 * 1024.0),
            m,
        };
        println!("{}", row(&window));
        let history = window.history;
        windows.push(window);
        if history >= target {
            return Ok(windows);
        }
    }
}

fn header() -> String {
    format!(
        "| {:>9} | {:>7} | {:>6} | {:>6} | {:>11} | {:>6} | {:>10} | {:>8} |\n|{}|",
        "history",
        "sagas/s",
        "p50 ms",
        "p99 ms",
        "CPU ms/saga",
        "errors",
        "coord. RSS",
        "log MiB",
        "--:|--:|--:|--:|--:|--:|--:|--:"
    )
}

fn row(w: &Window) -> String {
    format!(
        "| {:>9} | {:>7.0} | {:>6} | {:>6} | {:>11.3} | {:>6} | {:>6.0} MiB | {:>8.0} |",
        w.history,
        w.m.throughput(),
        format_ms(w.m.latency.p50),
        format_ms(w.m.latency.p99),
        w.m.cpu_ms_per_saga(),
        w.m.errors,
        w.rss_mib,
        w.log_mib
    )
}

/// The comparison of the first windows with the last ones (the mean of up to three each).
pub(crate) fn verdict(windows: &[Window]) -> String {
    let n = (windows.len() / 2).clamp(1, 3);
    let mean = |ws: &[Window]| ws.iter().map(|w| w.m.throughput()).sum::<f64>() / ws.len() as f64;
    let (first, last) = (mean(&windows[..n]), mean(&windows[windows.len() - n..]));
    let change = (last / first - 1.0) * 100.0;
    let met = if change.abs() <= 10.0 { "met" } else { "NOT met" };
    format!(
        "throughput, first {n} window(s) {first:.0} sagas/s, last {n} {last:.0} sagas/s: {change:+.1}% (goal: flat within 10%): {met}"
    )
}

/// Resident memory of process `pid`, KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A window length for growth runs when none is given.
pub(crate) const WINDOW: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_resident_size() {
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }
}
