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
        let window = Window {
            history: state.messages / records_per_saga,
            rss_mib: coordinators_rss_mib(&*system),
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
        "| {:>9} | {:>7} | {:>6} | {:>6} | {:>11} | {:>8} | {:>6} | {:>10} | {:>8} |\n|{}|",
        "history",
        "sagas/s",
        "p50 ms",
        "p99 ms",
        "CPU ms/saga",
        "(server)",
        "errors",
        "coord. RSS",
        "log MiB",
        "--:|--:|--:|--:|--:|--:|--:|--:|--:"
    )
}

fn row(w: &Window) -> String {
    format!(
        "| {:>9} | {:>7.0} | {:>6} | {:>6} | {:>11.3} | {:>8.3} | {:>6} | {:>6.0} MiB | {:>8.0} |",
        w.history,
        w.m.throughput(),
        format_ms(w.m.latency.p50),
        format_ms(w.m.latency.p99),
        w.m.cpu_ms_per_saga(),
        w.m.server_cpu_ms_per_saga(),
        w.m.errors,
        w.rss_mib,
        w.log_mib
    )
}

/// The first quarter of the windows against the last quarter (at least one each): the
/// medians of their throughput and of their CPU per saga (medians, because one window on a
/// shared machine can be off by 10 % or more). A trend over a long run also holds whatever
/// else the machine did meanwhile: [`paired_verdict`] gives the goal's verdict.
pub(crate) fn verdict(windows: &[Window]) -> String {
    let n = (windows.len() / 4).max(1);
    let med = |ws: &[Window], f: &dyn Fn(&Window) -> f64| {
        median(&mut ws.iter().map(f).collect::<Vec<f64>>())
    };
    let (first, last) = (&windows[..n], &windows[windows.len() - n..]);
    let rate = |w: &Window| w.m.throughput();
    let cpu = |w: &Window| w.m.cpu_ms_per_saga();
    let (r0, r1) = (med(first, &rate), med(last, &rate));
    let (c0, c1) = (med(first, &cpu), med(last, &cpu));
    let change = (r1 / r0 - 1.0) * 100.0;
    format!(
        "trend: medians of the first and last {n} window(s): throughput {r0:.0} -> {r1:.0} sagas/s ({change:+.1}%), CPU {c0:.3} -> {c1:.3} ms/saga ({:+.1}%)",
        (c1 / c0 - 1.0) * 100.0
    )
}

/// A system and where it is measured.
pub(crate) struct Stack {
    pub(crate) system: Arc<dyn System>,
    pub(crate) env: Env,
}

/// Window pairs measured after a growth run: the grown stack, then a fresh one (the order
/// alternates from pair to pair, so a drift of the machine's speed favours neither).
pub(crate) const PAIRS: usize = 4;

/// One window of the grown stack and one of a fresh stack, measured back to back.
pub(crate) struct Pair {
    pub(crate) grown: Measurement,
    pub(crate) fresh: Measurement,
}

impl Pair {
    /// The grown stack's throughput over the fresh one's.
    pub(crate) fn ratio(&self) -> f64 {
        self.grown.throughput() / self.fresh.throughput().max(f64::MIN_POSITIVE)
    }
}

/// Warms the fresh stack up with one window (not kept), then measures [`PAIRS`] pairs of
/// windows and prints each pair as it ends.
pub(crate) async fn paired(
    grown: &Stack,
    fresh: &Stack,
    coordinators: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Pair>> {
    async fn window(
        stack: &Stack,
        (coordinators, concurrency): (usize, usize),
        label: String,
    ) -> anyhow::Result<Measurement> {
        closed_loop("ours", coordinators, stack.system.clone(), concurrency, &stack.env, label)
            .await
    }
    let load = (coordinators, concurrency);
    window(fresh, load, format!("[ours, fresh] warm-up c={concurrency}")).await?;
    println!();
    println!("the grown stack against a fresh one, windows back to back (order alternating):");
    println!(
        "| pair | grown sagas/s | fresh sagas/s | ratio | grown CPU ms/saga (server) | fresh CPU ms/saga (server) |\n|--:|--:|--:|--:|--:|--:|"
    );
    let mut pairs = Vec::with_capacity(PAIRS);
    for i in 0..PAIRS {
        let label = |which: &str| format!("[ours, {which}] pair {} of {PAIRS}", i + 1);
        let (grown_m, fresh_m) = if i % 2 == 0 {
            let g = window(grown, load, label("grown")).await?;
            (g, window(fresh, load, label("fresh")).await?)
        } else {
            let f = window(fresh, load, label("fresh")).await?;
            (window(grown, load, label("grown")).await?, f)
        };
        let pair = Pair { grown: grown_m, fresh: fresh_m };
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.3} ({:.3}) | {:.3} ({:.3}) |",
            i + 1,
            pair.grown.throughput(),
            pair.fresh.throughput(),
            pair.ratio(),
            pair.grown.cpu_ms_per_saga(),
            pair.grown.server_cpu_ms_per_saga(),
            pair.fresh.cpu_ms_per_saga(),
            pair.fresh.server_cpu_ms_per_saga()
        );
        pairs.push(pair);
    }
    Ok(pairs)
}

/// The median of the pairs' throughput ratios and the verdict on the goal (the grown
/// stack within 10 % of a fresh one).
pub(crate) fn paired_verdict(pairs: &[Pair]) -> String {
    let mut ratios: Vec<f64> = pairs.iter().map(Pair::ratio).collect();
    let ratio = median(&mut ratios);
    let met = if ratio >= 0.9 { "met" } else { "NOT met" };
    format!(
        "grown against fresh, median of {} paired windows: throughput ratio {ratio:.2} ({:+.1}%); goal (throughput flat within 10%): {met}",
        pairs.len(),
        (ratio - 1.0) * 100.0
    )
}

/// The median of `v` (the mean of the middle two for an even count); `v` must not be empty.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// Resident memory of the system's coordinators, MiB: its coordinator processes, or this
/// process when the coordinators run in it.
pub(crate) fn coordinators_rss_mib(system: &dyn System) -> f64 {
    let pids = match system.processes() {
        pids if pids.is_empty() => vec![std::process::id()],
        pids => pids,
    };
    pids.iter().filter_map(|p| rss_kib(*p)).sum::<u64>() as f64 / 1024.0
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
