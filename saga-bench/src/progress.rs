//! Progress on stderr: one line redrawn in place on a terminal, a line per phase otherwise
//! (logs and CI keep every line readable).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Where progress goes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Progress {
    redraw: bool,
}

impl Progress {
    /// Redraws in place only when stderr is a terminal.
    pub(crate) fn new() -> Self {
        Progress { redraw: std::io::stderr().is_terminal() }
    }

    /// A one-off note, e.g. "starting nats-server".
    pub(crate) fn note(&self, text: &str) {
        if self.redraw {
            eprint!("\r\x1b[K{text}");
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("{text}");
        }
    }

    /// Begins a timed phase: warm-up, then measuring until `measure_end`. `done` counts sagas
    /// finished so far (including warm-up).
    pub(crate) fn phase(
        &self,
        label: String,
        measure_start: Instant,
        measure_end: Instant,
        done: Arc<AtomicU64>,
    ) -> Phase {
        let total = measure_end.saturating_duration_since(Instant::now());
        if !self.redraw {
            eprintln!("{label}: running for {:.1}s (warm-up included)", total.as_secs_f64());
            return Phase { redraw: false, ticker: None, label };
        }
        let line = label.clone();
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let now = Instant::now();
                let stage = if now < measure_start {
                    format!(
                        "warm-up {:.1}s",
                        measure_start.saturating_duration_since(now).as_secs_f64()
                    )
                } else if now < measure_end {
                    let left = measure_end.saturating_duration_since(now);
                    format!("measuring, {:.1}s left", left.as_secs_f64())
                } else {
                    "draining".to_owned()
                };
                eprint!("\r\x1b[K{line}: {stage}, {} sagas done", done.load(Ordering::Relaxed));
                let _ = std::io::stderr().flush();
            }
        });
        Phase { redraw: true, ticker: Some(ticker), label }
    }
}

/// A phase in progress; [`Phase::finish`] reports its result.
pub(crate) struct Phase {
    redraw: bool,
    ticker: Option<JoinHandle<()>>,
    label: String,
}

impl Phase {
    /// Ends the phase with a one-line summary.
    pub(crate) fn finish(mut self, summary: &str) {
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
        if self.redraw {
            eprintln!("\r\x1b[K{}: {summary}", self.label);
        } else {
            eprintln!("{}: {summary}", self.label);
        }
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
    }
}
