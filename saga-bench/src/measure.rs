//! What a measurement window records: latencies, CPU time of every process involved (from
//! `/proc/<pid>/stat`), the NATS messages the bench's connections sent and received, and the
//! messages JetStream stored.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use async_nats::jetstream;
use futures::TryStreamExt;
use hdrhistogram::Histogram;

/// The largest latency recorded, in microseconds; slower sagas count as this.
const MAX_LATENCY_US: u64 = 120_000_000;

/// A latency histogram in microseconds, shared by the tasks of one setting.
#[derive(Clone)]
pub(crate) struct Latencies(Arc<Mutex<Histogram<u64>>>);

impl Latencies {
    pub(crate) fn new() -> Self {
        let hist = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds");
        Latencies(Arc::new(Mutex::new(hist)))
    }

    pub(crate) fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).clamp(1, MAX_LATENCY_US);
        self.0.lock().expect("histogram lock").saturating_record(us);
    }

    /// p50, p99 and p99.9 in microseconds (zeros when nothing was recorded).
    pub(crate) fn percentiles(&self) -> Percentiles {
        let hist = self.0.lock().expect("histogram lock");
        if hist.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            p50: hist.value_at_quantile(0.50),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Percentiles {
    pub(crate) p50: u64,
    pub(crate) p99: u64,
    pub(crate) p999: u64,
}

/// User plus system CPU time of a process, in clock ticks, from the text of
/// `/proc/<pid>/stat`.
pub(crate) fn parse_stat_ticks(stat: &str) -> anyhow::Result<u64> {
    // The command name (field 2) is in parentheses and may contain spaces and parentheses:
    // the fields that follow start after the last ')'.
    let rest = match stat.rfind(')') {
        Some(i) => &stat[i + 1..],
        None => bail!("not a /proc/<pid>/stat line: {stat:?}"),
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0], so utime (14) and stime (15) are 11 and 12.
    let field = |i: usize, name: &str| -> anyhow::Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("/proc stat line has no {name} field: {stat:?}"))?
            .parse::<u64>()
            .with_context(|| format!("/proc stat {name} is not a number: {stat:?}"))
    };
    Ok(field(11, "utime")? + field(12, "stime")?)
}

/// Busy time of all CPUs together, in clock ticks, from the text of `/proc/stat` (its first
/// line: `cpu user nice system idle iowait irq softirq steal ...`; idle and iowait are not
/// busy).
pub(crate) fn parse_machine_busy_ticks(stat: &str) -> anyhow::Result<u64> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .with_context(|| "/proc/stat has no \"cpu\" line")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<u64>().with_context(|| format!("bad /proc/stat line: {line:?}")))
        .collect::<anyhow::Result<_>>()?;
    if values.len() < 8 {
        bail!("/proc/stat cpu line too short: {line:?}");
    }
    // user nice system idle iowait irq softirq steal: guests are already in user and nice.
    Ok(values[0] + values[1] + values[2] + values[5] + values[6] + values[7])
}

/// Reads CPU time of a set of processes.
#[derive(Debug, Clone)]
pub(crate) struct CpuProbe {
    ticks_per_second: u64,
}

impl CpuProbe {
    /// Asks the system for its clock tick rate (`getconf CLK_TCK`, 100 if that fails).
    pub(crate) fn new() -> Self {
        let ticks_per_second = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100);
        CpuProbe { ticks_per_second }
    }

    /// CPU time used so far by the whole machine (all CPUs, all processes).
    pub(crate) fn machine_time(&self) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        Ok(self.ticks(parse_machine_busy_ticks(&stat)?))
    }

    fn ticks(&self, ticks: u64) -> Duration {
        Duration::from_millis(ticks * 1000 / self.ticks_per_second)
    }

    /// CPU time (user + system, all threads) used so far by process `pid`.
    pub(crate) fn cpu_time(&self, pid: u32) -> anyhow::Result<Duration> {
        let path = format!("/proc/{pid}/stat");
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Ok(self.ticks(parse_stat_ticks(&stat)?))
    }
}

/// The processes whose CPU time a saga costs: the bench itself and the nats-server child
/// (and the system's own child processes, given to each [`Processes::sample`]).
#[derive(Debug, Clone)]
pub(crate) struct Processes {
    probe: CpuProbe,
    bench: u32,
    server: u32,
}

/// CPU time of the bench, its coordinator processes, the server and the whole machine at one
/// instant.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuSample {
    pub(crate) bench: Duration,
    /// Coordinator replicas running as child processes (zero when they run in the bench).
    pub(crate) replicas: Duration,
    pub(crate) server: Duration,
    /// Every process on the machine, these included.
    pub(crate) machine: Duration,
}

impl CpuSample {
    /// The CPU used between `earlier` and `self`.
    pub(crate) fn since(&self, earlier: &CpuSample) -> CpuSample {
        CpuSample {
            bench: self.bench.saturating_sub(earlier.bench),
            replicas: self.replicas.saturating_sub(earlier.replicas),
            server: self.server.saturating_sub(earlier.server),
            machine: self.machine.saturating_sub(earlier.machine),
        }
    }

    /// CPU used by the bench, its child processes and the server: what the sagas cost.
    pub(crate) fn sagas(&self) -> Duration {
        self.bench + self.replicas + self.server
    }

    /// CPU used by processes other than the bench, its children and the server (a shared
    /// machine).
    pub(crate) fn others(&self) -> Duration {
        self.machine.saturating_sub(self.sagas())
    }
}

impl Processes {
    pub(crate) fn new(server: u32) -> Self {
        Processes { probe: CpuProbe::new(), bench: std::process::id(), server }
    }

    /// CPU time so far, with that of the coordinator processes `replicas`.
    pub(crate) fn sample(&self, replicas: &[u32]) -> anyhow::Result<CpuSample> {
        let mut replica_time = Duration::ZERO;
        for &pid in replicas {
            replica_time += self
                .probe
                .cpu_time(pid)
                .with_context(|| format!("coordinator process {pid} is gone"))?;
        }
        Ok(CpuSample {
            bench: self.probe.cpu_time(self.bench)?,
            replicas: replica_time,
            server: self.probe.cpu_time(self.server)?,
            machine: self.probe.machine_time()?,
        })
    }
}

/// The last sequence number of each JetStream stream, by stream name.
pub(crate) type Sequences = HashMap<String, u64>;

/// Counts the messages JetStream stores, over every stream of the account (KV buckets are
/// streams `KV_<bucket>` too): each stored message takes the next sequence number of its
/// stream, so the growth of the streams' last sequences is the number of messages stored.
/// Deletions, purges and acknowledgements take none.
#[derive(Clone)]
pub(crate) struct StoredMessages {
    /// On a connection of its own, so that its requests are not counted in msgs/saga.
    js: jetstream::Context,
}

impl StoredMessages {
    pub(crate) async fn connect(conn: &crate::conn::Conn, user: &str) -> anyhow::Result<Self> {
        let conn = conn.connect(user).await.context("connecting to count stored messages")?;
        Ok(StoredMessages { js: jetstream::new(conn) })
    }

    /// The JetStream context it asks on.
    pub(crate) fn context(&self) -> &jetstream::Context {
        &self.js
    }

    /// Every stream's last sequence now: one `STREAM.LIST` request per 256 streams.
    pub(crate) async fn snapshot(&self) -> anyhow::Result<Sequences> {
        let mut streams = self.js.streams();
        let mut sequences = Sequences::new();
        while let Some(info) = streams.try_next().await.context("listing the JetStream streams")? {
            sequences.insert(info.config.name, info.state.last_sequence);
        }
        Ok(sequences)
    }
}

/// Messages stored between two snapshots: per stream, the growth of its last sequence (a
/// stream created in between counts from zero; one deleted in between cannot be counted).
pub(crate) fn stored_between(before: &Sequences, after: &Sequences) -> u64 {
    after
        .iter()
        .map(|(name, &last)| last.saturating_sub(before.get(name).copied().unwrap_or(0)))
        .sum()
}

/// Counts the NATS messages sent and received by a set of connections.
#[derive(Clone, Default)]
pub(crate) struct MessageCounter(Vec<Arc<async_nats::Statistics>>);

impl MessageCounter {
    /// Counts `client`'s messages too.
    pub(crate) fn watch(&mut self, client: &async_nats::Client) {
        self.0.push(client.statistics());
    }

    /// Messages sent plus messages received so far, over every watched connection.
    pub(crate) fn total(&self) -> u64 {
        self.0
            .iter()
            .map(|s| s.out_messages.load(Ordering::Relaxed) + s.in_messages.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_spaces_and_parentheses_in_the_name() {
        // Fields 14 and 15 are 1500 and 250.
        let line =
            "4242 (tokio (rt) worker) S 1 4242 4242 0 -1 4194560 9000 0 0 0 1500 250 0 0 20 0 \
                    8 0 123456 1000000 2000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        assert_eq!(parse_stat_ticks(line).unwrap(), 1750);
    }

    #[test]
    fn stat_line_that_is_cut_short_is_an_error() {
        assert!(parse_stat_ticks("1 (x) S 1 2 3").is_err());
        assert!(parse_stat_ticks("no parenthesis here").is_err());
        assert!(parse_stat_ticks("1 (x) S 1 2 3 4 5 6 7 8 9 10 ten 12").is_err());
    }

    #[test]
    fn own_and_machine_cpu_time_are_readable() {
        let probe = CpuProbe::new();
        assert!(probe.cpu_time(std::process::id()).is_ok());
        assert!(probe.machine_time().is_ok());
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 2 30 5000 40 5 6 7 0 0\ncpu0 50 1 15 2500 20 2 3 3 0 0\nintr 1 2 3\n";
        assert_eq!(parse_machine_busy_ticks(stat).unwrap(), 100 + 2 + 30 + 5 + 6 + 7);
        assert!(parse_machine_busy_ticks("cpu  1 2 3\n").is_err());
        assert!(parse_machine_busy_ticks("intr 1 2 3\n").is_err());
    }

    #[test]
    fn percentiles_come_from_what_was_recorded() {
        let lat = Latencies::new();
        assert_eq!(lat.percentiles(), Percentiles::default());
        for ms in 1..=1000 {
            lat.record(Duration::from_millis(ms));
        }
        let p = lat.percentiles();
        // Three significant figures: within 0.1%.
        assert!((499_000..=501_000).contains(&p.p50), "{p:?}");
        assert!((989_000..=991_000).contains(&p.p99), "{p:?}");
        assert!((998_000..=1_001_000).contains(&p.p999), "{p:?}");
    }

    #[test]
    fn cpu_sample_difference() {
        let ms = Duration::from_millis;
        let a = CpuSample { bench: ms(100), replicas: ms(20), server: ms(50), machine: ms(1000) };
        let b = CpuSample { bench: ms(350), replicas: ms(70), server: ms(60), machine: ms(1400) };
        let d = b.since(&a);
        assert_eq!(d.bench, ms(250));
        assert_eq!(d.replicas, ms(50));
        assert_eq!(d.server, ms(10));
        assert_eq!(d.sagas(), ms(310));
        assert_eq!(d.others(), ms(90));
    }

    #[test]
    fn own_cpu_time_counts_as_a_replica_and_a_missing_replica_is_an_error() {
        let processes = Processes::new(std::process::id());
        assert!(processes.sample(&[std::process::id()]).is_ok());
        // Pid numbers stop well below u32::MAX (at most 2^22 on Linux).
        let err = processes.sample(&[u32::MAX]).unwrap_err();
        assert!(format!("{err:#}").contains("coordinator process 4294967295"), "{err:#}");
    }

    fn sequences(pairs: &[(&str, u64)]) -> Sequences {
        pairs.iter().map(|&(name, seq)| (name.to_owned(), seq)).collect()
    }

    #[test]
    fn stored_messages_are_the_growth_of_each_stream() {
        let before = sequences(&[("SAGA_LOG", 100), ("KV_effects_p0", 40), ("GONE", 7)]);
        let after = sequences(&[("SAGA_LOG", 130), ("KV_effects_p0", 43), ("NEW", 5)]);
        // 30 + 3 + 5; the stream deleted in between adds nothing.
        assert_eq!(stored_between(&before, &after), 38);
        assert_eq!(stored_between(&after, &after), 0);
        assert_eq!(stored_between(&Sequences::new(), &Sequences::new()), 0);
        // A stream deleted and created again with the same name does not count negative.
        let recreated = sequences(&[("SAGA_LOG", 2)]);
        assert_eq!(stored_between(&before, &recreated), 0);
    }
}
