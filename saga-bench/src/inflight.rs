//! `--in-flight N`: N sagas in flight at once, every one waiting at its first step on a slow
//! participant (its handler waits at a gate), then the participant speeds up (the gate opens)
//! and they all finish. Prints how fast the sagas were accepted, the coordinators' resident
//! memory and the CPU and messages spent per second while the sagas wait, how long they took
//! to finish once the participant sped up, and the memory after.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use tokio::sync::watch;

use crate::load::{Env, System};
use crate::ours::{Gate, Ours};

/// Starts sent at once while the sagas are placed.
const STARTING: usize = 256;
/// How long the sagas wait at the gate once all are there (memory and idle cost sampled).
const HOLD: Duration = Duration::from_secs(30);
/// How long placing the sagas and reaching the gate may take.
const ARRIVE_TIMEOUT: Duration = Duration::from_secs(900);

/// The gate the first participant's handlers wait at, and the switch that opens it.
pub(crate) fn gate(sagas: usize) -> (Gate, watch::Sender<bool>) {
    let (open, rx) = watch::channel(false);
    let gate = Gate { open: rx, waiting: Arc::default(), concurrency: sagas + 256 };
    (gate, open)
}

/// Runs the in-flight measurement and prints it.
pub(crate) async fn run(
    ours: Arc<Ours>,
    gate: Gate,
    open: watch::Sender<bool>,
    sagas: usize,
    env: &Env,
) -> anyhow::Result<()> {
    let rss = |ours: &Ours| crate::growth::coordinators_rss_mib(ours);
    println!();
    println!(
        "in flight: {sagas} sagas, each held at its first step until the participant speeds up"
    );
    let rss_before = rss(&ours);

    // Place them all; each one's end is awaited in a task of its own.
    let began = Instant::now();
    let mut ends = Vec::with_capacity(sagas);
    let mut placing = futures::stream::iter(0..sagas as u64)
        .map(|n| {
            let ours = ours.clone();
            async move { ours.begin(n).await.map(|id| (n, id)) }
        })
        .buffer_unordered(STARTING);
    let mut placed = 0;
    while let Some(started) = placing.next().await {
        let (n, id) = started?;
        let ours = ours.clone();
        ends.push(tokio::spawn(async move { ours.end(&id, n).await }));
        placed += 1;
        if placed % 10_000 == 0 {
            env.progress.note(&format!("[ours] in flight: {placed} of {sagas} sagas accepted"));
        }
    }
    let accepted_in = began.elapsed();
    // Wait until every saga's first command is in the participant's hands.
    let deadline = began + ARRIVE_TIMEOUT;
    let mut last_note = Instant::now();
    while (gate.waiting.load(Ordering::Relaxed) as usize) < sagas {
        if Instant::now() > deadline {
            bail!(
                "only {} of {sagas} sagas reached the first step within {ARRIVE_TIMEOUT:?}",
                gate.waiting.load(Ordering::Relaxed)
            );
        }
        if last_note.elapsed() > Duration::from_secs(10) {
            env.progress.note(&format!(
                "[ours] in flight: {} of {sagas} sagas wait at the first step",
                gate.waiting.load(Ordering::Relaxed)
            ));
            last_note = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let arrived_in = began.elapsed();
    println!(
        "- accepted: {sagas} starts in {:.1} s ({:.0}/s); all waiting at the first step after {:.1} s",
        accepted_in.as_secs_f64(),
        sagas as f64 / accepted_in.as_secs_f64(),
        arrived_in.as_secs_f64()
    );

    // Hold them, and measure what holding costs.
    let pids = ours.processes();
    let cpu_before = env.processes.sample(&pids)?;
    let msgs_before = ours.messages().await?;
    let mut rss_peak = rss(&ours);
    let held = Instant::now();
    while held.elapsed() < HOLD {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_peak = rss_peak.max(rss(&ours));
    }
    let cpu = env.processes.sample(&pids)?.since(&cpu_before);
    let msgs = ours.messages().await? - msgs_before;
    let secs = held.elapsed().as_secs_f64();
    println!(
        "- while {sagas} sagas wait ({secs:.0} s): coordinator RSS {rss_peak:.0} MiB (before the sagas: {rss_before:.0} MiB); CPU {:.2} cores (of which nats-server {:.2}); {:.0} NATS messages/s",
        cpu.sagas().as_secs_f64() / secs,
        cpu.server.as_secs_f64() / secs,
        msgs as f64 / secs
    );

    // The participant speeds up: every saga goes on to its end.
    let opened = Instant::now();
    open.send(true).context("opening the gate")?;
    let mut failed = 0usize;
    let mut first_error = None;
    for end in ends {
        if let Err(e) = end.await.context("a saga's waiter")? {
            failed += 1;
            first_error.get_or_insert(e.to_string());
        }
    }
    let drained = opened.elapsed();
    println!(
        "- after the participant sped up: all {sagas} sagas ended in {:.1} s ({:.0} sagas/s), {failed} not as planned{}",
        drained.as_secs_f64(),
        sagas as f64 / drained.as_secs_f64(),
        first_error.map_or(String::new(), |e| format!(" (first: {e})"))
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("- coordinator RSS after they ended: {:.0} MiB", rss(&ours));
    Ok(())
}
