//! The results table, the goals, and the closing ratio line.

use std::fmt::Write;

use crate::load::{Load, Measurement};

/// The closed-loop concurrency of the main setting (with 3 steps and the default profile).
pub(crate) const MAIN_CONCURRENCY: usize = 64;

/// Microseconds as milliseconds, with three significant digits or so.
pub(crate) fn format_ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

/// How a setting is named in the table.
pub(crate) fn setting(m: &Measurement) -> String {
    let load = match m.load {
        Load::Closed { concurrency } => format!("closed c={concurrency}"),
        Load::Open { rate } => format!("open {rate:.0}/s"),
    };
    match m.coordinators {
        0 => load,
        1 => format!("{load}, 1 coord"),
        n => format!("{load}, {n} coords"),
    }
}

/// A one-line summary for progress output.
pub(crate) fn summary(m: &Measurement) -> String {
    let mut s = format!(
        "{:.0} sagas/s, p50 {} ms, p99 {} ms, {:.2} CPU-ms/saga",
        m.throughput(),
        format_ms(m.latency.p50),
        format_ms(m.latency.p99),
        m.cpu_ms_per_saga()
    );
    if m.errors > 0 {
        let _ =
            write!(s, ", {} errors (first: {})", m.errors, m.first_error.as_deref().unwrap_or("?"));
    }
    s
}

/// Other processes busier than this (in cores) during a setting make its figures suspect.
const OTHER_LOAD_WARNING: f64 = 0.1;

/// A warning naming the settings during which other processes used the machine.
pub(crate) fn other_load_warning(results: &[Measurement]) -> Option<String> {
    let busy: Vec<String> = results
        .iter()
        .filter(|m| m.other_load() > OTHER_LOAD_WARNING)
        .map(|m| format!("{} {} ({:.2} cores)", m.system, setting(m), m.other_load()))
        .collect();
    (!busy.is_empty()).then(|| {
        format!(
            "warning: other processes were busy during {} setting(s), so their figures are low: {}",
            busy.len(),
            busy.join(", ")
        )
    })
}

/// `ours / floor`, or `None` when the floor is zero.
pub(crate) fn ratio(ours: f64, floor: f64) -> Option<f64> {
    (floor > 0.0).then(|| ours / floor)
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".to_owned(), |r| format!("{r:.2}"))
}

/// The closed-loop measurement of `system` at `concurrency` with its base replica count.
pub(crate) fn closed<'a>(
    results: &'a [Measurement],
    system: &str,
    concurrency: usize,
    base_coordinators: usize,
) -> Option<&'a Measurement> {
    results.iter().find(|m| {
        m.system == system
            && m.load == Load::Closed { concurrency }
            && (m.coordinators == 0 || m.coordinators == base_coordinators)
    })
}

/// The concurrency the ratio line is about: 64 when measured, else the largest one that
/// both systems ran.
pub(crate) fn ratio_concurrency(
    results: &[Measurement],
    base_coordinators: usize,
) -> Option<usize> {
    let both = |c: usize| {
        closed(results, "floor", c, base_coordinators).is_some()
            && closed(results, "ours", c, base_coordinators).is_some()
    };
    if both(MAIN_CONCURRENCY) {
        return Some(MAIN_CONCURRENCY);
    }
    results
        .iter()
        .filter_map(|m| match m.load {
            Load::Closed { concurrency } if both(concurrency) => Some(concurrency),
            _ => None,
        })
        .max()
}

/// Throughput of ours over the floor's at closed-loop `concurrency`.
pub(crate) fn throughput_ratio(
    results: &[Measurement],
    concurrency: usize,
    base_coordinators: usize,
) -> Option<f64> {
    let floor = closed(results, "floor", concurrency, base_coordinators)?;
    let ours = closed(results, "ours", concurrency, base_coordinators)?;
    ratio(ours.throughput(), floor.throughput())
}

/// The results table, one row per system and setting.
pub(crate) fn table(results: &[Measurement]) -> String {
    let mut out = String::new();
    let header = [
        "system",
        "setting",
        "sagas/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "CPU ms/saga",
        "(server)",
        "msgs/saga",
        "writes/saga",
        "errors",
        "other load",
        "ours/floor",
    ];
    let mut rows = vec![header.map(str::to_owned).to_vec()];
    for m in results {
        let vs_floor = match (m.system, m.load) {
            ("ours", Load::Closed { concurrency }) => closed(results, "floor", concurrency, 0)
                .and_then(|f| ratio(m.throughput(), f.throughput())),
            _ => None,
        };
        rows.push(vec![
            m.system.to_owned(),
            setting(m),
            format!("{:.0}", m.throughput()),
            format_ms(m.latency.p50),
            format_ms(m.latency.p99),
            format_ms(m.latency.p999),
            format!("{:.3}", m.cpu_ms_per_saga()),
            format!("{:.3}", m.server_cpu_ms_per_saga()),
            format!("{:.1}", m.messages_per_saga()),
            format!("{:.1}", m.writes_per_saga()),
            m.errors.to_string(),
            format!("{:.2}", m.other_load()),
            vs_floor.map_or_else(String::new, |r| format!("{r:.2}")),
        ]);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for (n, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i < 2 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
        if n == 0 {
            let rule: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let dashes = "-".repeat(w + 1);
                    if i < 2 {
                        format!(":{dashes}")
                    } else {
                        format!("{dashes}:")
                    }
                })
                .collect();
            let _ = writeln!(out, "|{}|", rule.join("|"));
        }
    }
    out
}

/// The goals of issue 5, each with what was measured. `replica_processes`: the coordinator
/// replicas ran as child processes rather than in the bench process.
pub(crate) fn goals(
    results: &[Measurement],
    base_coordinators: usize,
    replica_processes: bool,
) -> String {
    let mut out = String::new();
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    if let Some(r) = throughput_ratio(results, MAIN_CONCURRENCY, base_coordinators) {
        let _ = writeln!(
            out,
            "- throughput at c={MAIN_CONCURRENCY}: ours/floor = {r:.2} (goal >= 0.50): {}",
            met(r >= 0.5)
        );
    }
    if let (Some(f), Some(o)) = (
        closed(results, "floor", 1, base_coordinators),
        closed(results, "ours", 1, base_coordinators),
    ) {
        let r = ratio(o.latency.p50 as f64, f.latency.p50 as f64);
        let _ = writeln!(
            out,
            "- unloaded p50 (c=1): ours {} ms, floor {} ms, ratio {} (goal <= 2): {}",
            format_ms(o.latency.p50),
            format_ms(f.latency.p50),
            fmt_ratio(r),
            met(r.is_some_and(|r| r <= 2.0))
        );
    }
    let base = closed(results, "ours", MAIN_CONCURRENCY, base_coordinators);
    let more = results.iter().find(|m| {
        m.system == "ours"
            && m.load == (Load::Closed { concurrency: MAIN_CONCURRENCY })
            && m.coordinators > base_coordinators
    });
    if let (Some(b), Some(m)) = (base, more) {
        let gain = ratio(m.throughput(), b.throughput()).map(|r| (r - 1.0) * 100.0);
        let _ = writeln!(
            out,
            "- {} -> {} coordinator replicas ({}) at c={MAIN_CONCURRENCY}: {:.0} -> {:.0} sagas/s ({}%) (goal: adds throughput): {}",
            b.coordinators,
            m.coordinators,
            if replica_processes { "separate processes" } else { "in the bench process" },
            b.throughput(),
            m.throughput(),
            gain.map_or_else(|| "n/a".into(), |g| format!("{g:+.0}")),
            scaling_verdict(gain)
        );
    }
    out
}

/// Throughput differences smaller than this (in percent) are within the run-to-run spread
/// of a 10 s setting on a small shared machine, so they show neither a gain nor a loss.
const NOISE_PERCENT: f64 = 10.0;

fn scaling_verdict(gain: Option<f64>) -> &'static str {
    match gain {
        Some(g) if g >= NOISE_PERCENT => "met",
        Some(g) if g > -NOISE_PERCENT => "not shown (within run-to-run noise)",
        _ => "NOT met",
    }
}

/// The last line the program prints.
pub(crate) fn ratio_line(results: &[Measurement], base_coordinators: usize) -> String {
    let r = ratio_concurrency(results, base_coordinators)
        .and_then(|c| throughput_ratio(results, c, base_coordinators));
    format!("ours/floor throughput ratio: {}", fmt_ratio(r))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::measure::{CpuSample, Percentiles};

    fn m(system: &'static str, load: Load, coordinators: usize, completed: u64) -> Measurement {
        Measurement {
            system,
            load,
            coordinators,
            completed,
            errors: 0,
            first_error: None,
            window: Duration::from_secs(10),
            latency: Percentiles { p50: 1500, p99: 12_340, p999: 250_000 },
            cpu: CpuSample {
                bench: Duration::from_millis(500),
                replicas: Duration::from_millis(200),
                server: Duration::from_millis(300),
                machine: Duration::from_millis(1000),
            },
            messages: completed * 10,
            writes: completed * 4,
        }
    }

    #[test]
    fn milliseconds_keep_about_three_digits() {
        assert_eq!(format_ms(840), "0.84");
        assert_eq!(format_ms(1_500), "1.50");
        assert_eq!(format_ms(12_345), "12.3");
        assert_eq!(format_ms(250_400), "250");
    }

    #[test]
    fn ratio_line_uses_concurrency_64_and_the_base_replicas() {
        let results = vec![
            m("floor", Load::Closed { concurrency: 1 }, 0, 10_000),
            m("floor", Load::Closed { concurrency: 64 }, 0, 40_000),
            m("ours", Load::Closed { concurrency: 1 }, 1, 5_000),
            m("ours", Load::Closed { concurrency: 64 }, 1, 10_000),
            m("ours", Load::Closed { concurrency: 64 }, 2, 30_000),
        ];
        assert_eq!(ratio_line(&results, 1), "ours/floor throughput ratio: 0.25");
        let goals_text = goals(&results, 1, false);
        assert!(goals_text.contains("ours/floor = 0.25 (goal >= 0.50): NOT met"), "{goals_text}");
        assert!(
            goals_text.contains(
                "- 1 -> 2 coordinator replicas (in the bench process) at c=64: \
                 1000 -> 3000 sagas/s (+200%) (goal: adds throughput): met"
            ),
            "{goals_text}"
        );
        assert!(goals_text.contains("ratio 1.00 (goal <= 2): met"), "{goals_text}");
        let processes = goals(&results, 1, true);
        assert!(
            processes.contains("2 coordinator replicas (separate processes) at"),
            "{processes}"
        );
        // Without the replica setting there is no replica line.
        assert!(!goals(&results[..4], 1, true).contains("replicas"));
    }

    #[test]
    fn a_small_scaling_gain_is_not_claimed() {
        assert_eq!(scaling_verdict(Some(25.0)), "met");
        assert_eq!(scaling_verdict(Some(6.0)), "not shown (within run-to-run noise)");
        assert_eq!(scaling_verdict(Some(-6.0)), "not shown (within run-to-run noise)");
        assert_eq!(scaling_verdict(Some(-20.0)), "NOT met");
        assert_eq!(scaling_verdict(None), "NOT met");
    }

    #[test]
    fn ratio_line_falls_back_to_the_largest_common_concurrency() {
        let results = vec![
            m("floor", Load::Closed { concurrency: 1 }, 0, 10_000),
            m("floor", Load::Closed { concurrency: 16 }, 0, 20_000),
            m("ours", Load::Closed { concurrency: 16 }, 1, 5_000),
            m("ours", Load::Closed { concurrency: 1 }, 1, 5_000),
        ];
        assert_eq!(ratio_line(&results, 1), "ours/floor throughput ratio: 0.25");
        assert_eq!(ratio_line(&results[..1], 1), "ours/floor throughput ratio: n/a");
    }

    #[test]
    fn table_has_a_row_per_measurement_and_per_saga_figures() {
        let results = vec![
            m("floor", Load::Closed { concurrency: 64 }, 0, 40_000),
            m("ours", Load::Closed { concurrency: 64 }, 1, 10_000),
        ];
        let t = table(&results);
        assert_eq!(t.lines().count(), 4, "{t}");
        assert!(t.lines().next().unwrap().contains("| msgs/saga | writes/saga |"), "{t}");
        let cells: Vec<&str> = t.lines().nth(3).unwrap().split('|').map(str::trim).collect();
        // 1,000 sagas/s, 1 s of CPU over 10,000 sagas (0.3 s of it the server's), 10 messages
        // and 4 stored messages each, no other load, a quarter of the floor's 4,000 sagas/s.
        assert_eq!(
            cells,
            [
                "",
                "ours",
                "closed c=64, 1 coord",
                "1000",
                "1.50",
                "12.3",
                "250",
                "0.100",
                "0.030",
                "10.0",
                "4.0",
                "0",
                "0.00",
                "0.25",
                ""
            ]
        );
    }

    #[test]
    fn other_load_is_flagged() {
        let mut busy = m("floor", Load::Closed { concurrency: 1 }, 0, 100);
        assert_eq!(other_load_warning(&[busy.clone()]), None);
        busy.cpu.machine += Duration::from_secs(5);
        let w = other_load_warning(&[busy]).expect("a warning");
        assert!(w.contains("floor closed c=1 (0.50 cores)"), "{w}");
    }
}
