//! Coordinator replicas as child processes (`--coordinator-processes`), so that each replica
//! has a runtime, an allocator and a scheduler entity of its own, as in production.
//!
//! The bench runs itself again as `saga-bench --serve-coordinator --nats-url URL --steps S`:
//! the child starts one [`saga_nats::Coordinator`] with the bench's definition, then answers
//! each line it reads on stdin with one line of its connection's message counts
//! ([`format_counts`]), and stops when stdin closes. The parent's first question doubles as
//! the readiness check (the child reads stdin only once its coordinator has started), and
//! [`CoordinatorProcess`] kills and reaps the child when dropped, on errors and panics too.
//! Should the parent die without unwinding, the child sees stdin close and exits.

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, ChildStdout};

use crate::conn::{Conn, COORDINATOR_USER};
use crate::ours;

/// How long a child may take to start its coordinator (connect, provision the streams).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a running child may take to answer a question.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A child's connection statistics: NATS messages received and sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) in_messages: u64,
    pub(crate) out_messages: u64,
}

impl Counts {
    /// Messages sent plus received.
    pub(crate) fn total(&self) -> u64 {
        self.in_messages + self.out_messages
    }
}

/// The line a child answers with, newline included.
pub(crate) fn format_counts(counts: Counts) -> String {
    format!("msgs in={} out={}\n", counts.in_messages, counts.out_messages)
}

/// Reads a line written by [`format_counts`].
pub(crate) fn parse_counts(line: &str) -> anyhow::Result<Counts> {
    let bad = || format!("a coordinator process answered {line:?}, not \"msgs in=N out=N\"");
    let rest = line.trim_end().strip_prefix("msgs ").with_context(bad)?;
    let mut in_messages = None;
    let mut out_messages = None;
    for field in rest.split(' ') {
        let (key, value) = field.split_once('=').with_context(bad)?;
        let value: u64 = value.parse().with_context(bad)?;
        let slot = match key {
            "in" => &mut in_messages,
            "out" => &mut out_messages,
            _ => bail!(bad()),
        };
        if slot.replace(value).is_some() {
            bail!(bad());
        }
    }
    match (in_messages, out_messages) {
        (Some(in_messages), Some(out_messages)) => Ok(Counts { in_messages, out_messages }),
        _ => bail!(bad()),
    }
}

/// The child's side: runs one coordinator replica until stdin closes.
pub(crate) async fn serve(url: &str, steps: usize) -> anyhow::Result<()> {
    // With --auth, the parent passes the coordinator's nkey and inbox prefix in the
    // environment.
    let options = saga_nats::NatsOptions {
        nkey: std::env::var_os("NATS_NKEY").map(Into::into),
        inbox_prefix: std::env::var("NATS_INBOX_PREFIX").ok(),
        ..saga_nats::NatsOptions::with_url(url)
    };
    let conn = options
        .connect("saga-bench coordinator")
        .await
        .with_context(|| format!("coordinator process: connecting to {url}"))?;
    let stats = conn.statistics();
    let coordinator = ours::start_coordinator(conn, &ours::definition(steps)).await?;
    let mut questions = BufReader::new(tokio::io::stdin()).lines();
    let mut answers = tokio::io::stdout();
    while questions.next_line().await.context("coordinator process: reading stdin")?.is_some() {
        let counts = Counts {
            in_messages: stats.in_messages.load(Ordering::Relaxed),
            out_messages: stats.out_messages.load(Ordering::Relaxed),
        };
        answers.write_all(format_counts(counts).as_bytes()).await?;
        answers.flush().await?;
    }
    coordinator.shutdown().await;
    Ok(())
}

/// Kills and reaps a child process when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Fails only when the child has been reaped already; waiting right after SIGKILL
        // takes a moment at most.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The parent's side: one coordinator replica in a child process, killed when dropped.
pub(crate) struct CoordinatorProcess {
    pid: u32,
    /// The question and answer pipes, one exchange at a time.
    io: tokio::sync::Mutex<(ChildStdin, BufReader<ChildStdout>)>,
    // Declared last so that it is dropped last: the pipes close first, then the child is
    // killed and reaped.
    _child: KillOnDrop,
}

impl CoordinatorProcess {
    /// Starts a replica of the bench's `steps`-step saga against `url`, and returns once its
    /// coordinator runs.
    pub(crate) async fn start(conn: &Conn, steps: usize) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this program to run a coordinator")?;
        let workers = crate::ours::coordinator_workers()
            .map(|w| vec!["--coordinator-workers".to_owned(), w.to_string()])
            .unwrap_or_default();
        let mut child = KillOnDrop(
            std::process::Command::new(&exe)
                .args(["--serve-coordinator", "--nats-url", conn.url()])
                .args(["--steps", &steps.to_string()])
                .args(workers)
                .envs(conn.env(COORDINATOR_USER))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting a coordinator process ({})", exe.display()))?,
        );
        let pid = child.0.id();
        let stdin = child.0.stdin.take().context("coordinator process has no stdin")?;
        let stdout = child.0.stdout.take().context("coordinator process has no stdout")?;
        let io = (
            ChildStdin::from_std(stdin).context("coordinator process stdin")?,
            BufReader::new(ChildStdout::from_std(stdout).context("coordinator process stdout")?),
        );
        let replica = CoordinatorProcess { pid, io: tokio::sync::Mutex::new(io), _child: child };
        replica
            .ask(START_TIMEOUT)
            .await
            .with_context(|| format!("coordinator process {pid} did not start"))?;
        Ok(replica)
    }

    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// NATS messages the child's connection sent plus received so far.
    pub(crate) async fn messages(&self) -> anyhow::Result<u64> {
        Ok(self.ask(ANSWER_TIMEOUT).await?.total())
    }

    async fn ask(&self, timeout: Duration) -> anyhow::Result<Counts> {
        let pid = self.pid;
        let mut io = self.io.lock().await;
        let (questions, answers) = &mut *io;
        let exchange = async {
            questions.write_all(b"counts?\n").await?;
            questions.flush().await?;
            let mut line = String::new();
            answers.read_line(&mut line).await?;
            Ok::<_, std::io::Error>(line)
        };
        let line = tokio::time::timeout(timeout, exchange)
            .await
            .with_context(|| {
                format!("coordinator process {pid} did not answer within {timeout:?}")
            })?
            .with_context(|| format!("coordinator process {pid} is gone (see its error above)"))?;
        if line.is_empty() {
            bail!("coordinator process {pid} exited (see its error above)");
        }
        parse_counts(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_the_pipe() {
        let counts = Counts { in_messages: 12_345, out_messages: 678 };
        let line = format_counts(counts);
        assert_eq!(line, "msgs in=12345 out=678\n");
        assert_eq!(parse_counts(&line).unwrap(), counts);
        assert_eq!(parse_counts("msgs out=2 in=1").unwrap().total(), 3);
    }

    #[test]
    fn a_garbled_answer_is_an_error_that_quotes_it() {
        for line in [
            "",
            "msgs in=1\n",
            "msgs in=1 out=x\n",
            "msgs in=1 out=2 in=3\n",
            "msgs in=1 out=2 up=3\n",
            "in=1 out=2\n",
            "thread 'main' panicked\n",
        ] {
            let err = parse_counts(line).unwrap_err().to_string();
            assert!(err.contains(&format!("{line:?}")), "{line:?}: {err}");
        }
    }

    #[test]
    fn a_dropped_guard_kills_and_reaps_its_child() {
        let child = std::process::Command::new("sleep").arg("60").spawn().expect("sleep runs");
        let pid = child.id();
        let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
        assert!(proc_dir.exists());
        drop(KillOnDrop(child));
        // Reaped, not a zombie: the pid's /proc entry is gone.
        assert!(!proc_dir.exists(), "process {pid} still exists");
    }
}
