//! Paired rounds (`--rounds N`): both systems stay up, and each round measures the floor,
//! then ours, at every concurrency. On a small shared machine one run's ratio moves by a
//! fifth or more from run to run; the median of several rounds, each a pair measured
//! minutes apart at most, says more than any single run.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::load::{closed_loop, Env, Measurement, System};
use crate::report::{self, format_ms, MAIN_CONCURRENCY};

/// One round: the floor's and ours' measurements at each concurrency.
pub(crate) struct Round {
    pub(crate) results: Vec<Measurement>,
}

impl Round {
    /// Ours over the floor's throughput at concurrency 64, if measured.
    pub(crate) fn throughput_ratio(&self, coordinators: usize) -> Option<f64> {
        report::throughput_ratio(&self.results, MAIN_CONCURRENCY, coordinators)
    }

    /// Ours over the floor's p50 at concurrency 1, if measured.
    pub(crate) fn p50_ratio(&self, coordinators: usize) -> Option<f64> {
        let p50 = |system: &str| self.at(system, 1, coordinators).map(|m| m.latency.p50 as f64);
        report::ratio(p50("ours")?, p50("floor")?)
    }

    /// The closed-loop measurement of `system` at `concurrency`, ours with `coordinators`.
    fn at<'a>(
        &'a self,
        system: &str,
        concurrency: usize,
        coordinators: usize,
    ) -> Option<&'a Measurement> {
        report::closed(&self.results, system, concurrency, coordinators)
    }
}

/// Runs `rounds` rounds of the floor then ours at each of `concurrencies`.
pub(crate) async fn run(
    rounds: usize,
    concurrencies: &[usize],
    coordinators: usize,
    floor: (Arc<dyn System>, &Env),
    ours: (Arc<dyn System>, &Env),
) -> anyhow::Result<Vec<Round>> {
    let mut out = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let mut results = Vec::new();
        for &c in concurrencies {
            let label = format!("[round {round}/{rounds}] floor closed c={c}");
            results.push(closed_loop("floor", 0, floor.0.clone(), c, floor.1, label).await?);
            let label = format!("[round {round}/{rounds}] ours closed c={c}");
            results
                .push(closed_loop("ours", coordinators, ours.0.clone(), c, ours.1, label).await?);
        }
        out.push(Round { results });
    }
    Ok(out)
}

/// The median of `values` (the mean of the middle two for an even count), or `None`.
pub(crate) fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 })
}

/// The per-round table and the goals judged on the medians.
pub(crate) fn report(rounds: &[Round], coordinators: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| round | floor c=64 sagas/s | ours c=64 sagas/s | ratio (goal >= 0.5) | ours CPU ms/saga | floor c=1 p50 | ours c=1 p50 | p50 ratio (goal <= 2) | other load |"
    );
    let _ = writeln!(out, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let cell = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    for (i, r) in rounds.iter().enumerate() {
        let f64_ = r.at("floor", MAIN_CONCURRENCY, coordinators);
        let o64 = r.at("ours", MAIN_CONCURRENCY, coordinators);
        let f1 = r.at("floor", 1, coordinators);
        let o1 = r.at("ours", 1, coordinators);
        let other = r.results.iter().map(Measurement::other_load).fold(0.0, f64::max);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {other:.2} |",
            i + 1,
            cell(f64_.map(|m| format!("{:.0}", m.throughput()))),
            cell(o64.map(|m| format!("{:.0}", m.throughput()))),
            cell(r.throughput_ratio(coordinators).map(|x| format!("{x:.2}"))),
            cell(o64.map(|m| format!("{:.3}", m.cpu_ms_per_saga()))),
            cell(f1.map(|m| format!("{} ms", format_ms(m.latency.p50)))),
            cell(o1.map(|m| format!("{} ms", format_ms(m.latency.p50)))),
            cell(r.p50_ratio(coordinators).map(|x| format!("{x:.2}"))),
        );
    }
    let errors: u64 = rounds.iter().flat_map(|r| &r.results).map(|m| m.errors).sum();
    let _ = writeln!(out);
    let _ = writeln!(out, "errors: {errors}");
    let _ = writeln!(out);
    let _ = writeln!(out, "goals, on the medians of {} rounds:", rounds.len());
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
    let mut t: Vec<f64> = rounds.iter().filter_map(|r| r.throughput_ratio(coordinators)).collect();
    let each = list(&t);
    if let Some(m) = median(&mut t) {
        let _ = writeln!(
            out,
            "- throughput at c={MAIN_CONCURRENCY}: ours/floor median {m:.2} (rounds: {each}) (goal >= 0.50): {}",
            met(m >= 0.5)
        );
    }
    let mut p: Vec<f64> = rounds.iter().filter_map(|r| r.p50_ratio(coordinators)).collect();
    let each = list(&p);
    if let Some(m) = median(&mut p) {
        let _ = writeln!(
            out,
            "- unloaded p50 (c=1): ours/floor median {m:.2} (rounds: {each}) (goal <= 2): {}",
            met(m <= 2.0)
        );
    }
    out
}

/// The last line the program prints with `--rounds`.
pub(crate) fn ratio_line(rounds: &[Round], coordinators: usize) -> String {
    let mut t: Vec<f64> = rounds.iter().filter_map(|r| r.throughput_ratio(coordinators)).collect();
    match median(&mut t) {
        Some(m) => format!("ours/floor throughput ratio: {m:.2}"),
        None => "ours/floor throughput ratio: n/a".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::load::Load;
    use crate::measure::{CpuSample, Percentiles};

    fn m(system: &'static str, concurrency: usize, per_second: u64, p50_us: u64) -> Measurement {
        Measurement {
            system,
            load: Load::Closed { concurrency },
            coordinators: usize::from(system == "ours"),
            completed: per_second * 10,
            errors: 0,
            first_error: None,
            window: Duration::from_secs(10),
            latency: Percentiles { p50: p50_us, p99: p50_us * 3, p999: p50_us * 5 },
            cpu: CpuSample {
                bench: Duration::from_millis(900),
                replicas: Duration::ZERO,
                server: Duration::from_millis(600),
                machine: Duration::from_millis(1500),
            },
            messages: per_second * 300,
            writes: per_second * 80,
        }
    }

    fn round(ours_64: u64, ours_p50_us: u64) -> Round {
        Round {
            results: vec![
                m("floor", 1, 900, 1000),
                m("ours", 1, 400, ours_p50_us),
                m("floor", 64, 1000, 9000),
                m("ours", 64, ours_64, 30_000),
            ],
        }
    }

    #[test]
    fn goals_are_judged_on_the_medians_of_the_rounds() {
        let rounds = [round(400, 2500), round(700, 1500), round(500, 2000)];
        let text = report(&rounds, 1);
        assert!(
            text.contains("ours/floor median 0.50 (rounds: 0.40, 0.70, 0.50) (goal >= 0.50): met"),
            "{text}"
        );
        assert!(
            text.contains("ours/floor median 2.00 (rounds: 2.50, 1.50, 2.00) (goal <= 2): met"),
            "{text}"
        );
        assert!(text.contains("| 1 | 1000 | 400 | 0.40 |"), "{text}");
        assert_eq!(ratio_line(&rounds, 1), "ours/floor throughput ratio: 0.50");
    }

    #[test]
    fn a_median_below_the_goal_is_not_met() {
        let rounds = [round(300, 2600), round(600, 2100)];
        let text = report(&rounds, 1);
        assert!(
            text.contains("median 0.45 (rounds: 0.30, 0.60) (goal >= 0.50): NOT met"),
            "{text}"
        );
        assert!(text.contains("median 2.35 (rounds: 2.60, 2.10) (goal <= 2): NOT met"), "{text}");
    }

    #[test]
    fn the_median_of_odd_and_even_counts() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0]), Some(3.0));
        assert_eq!(median(&mut [0.3, 0.1, 0.2]), Some(0.2));
        assert_eq!(median(&mut [0.4, 0.1, 0.3, 0.2]), Some(0.25));
    }
}
