//! Retry policies and their backoff schedule.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How failed or timed-out attempts of a step (or of its compensation) are retried.
///
/// The delay before attempt `n + 1` is `initial_backoff * multiplier^(n - 1)`, capped at
/// `max_backoff`, then spread by up to `jitter` (a fraction) either way. The jitter is derived
/// from the saga id, step and attempt, so replaying a saga reproduces its schedule exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1). A retriable step ignores this and is
    /// retried until it succeeds.
    pub max_attempts: u32,
    /// The delay before the second attempt.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// The longest delay between attempts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// How much each delay grows over the one before (at least 1.0).
    pub multiplier: f64,
    /// The fraction (0.0 to 1.0) by which a delay may be shortened or lengthened at random.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The delay after failed attempt `attempt` (1-based) before the next one; `seed` picks
    /// the jitter deterministically.
    pub fn backoff(&self, attempt: u32, seed: u64) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        let capped = base.min(self.max_backoff.as_secs_f64());
        // A value in [-1, 1) from the seed.
        let unit = (splitmix(seed) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
        let spread = capped * self.jitter.clamp(0.0, 1.0) * unit;
        Duration::from_secs_f64((capped + spread).max(0.0))
    }
}

/// A 64-bit FNV-1a hash, used to seed jitter from names.
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: 0.0,
        };
        assert_eq!(p.backoff(1, 7), Duration::from_millis(100));
        assert_eq!(p.backoff(2, 7), Duration::from_millis(200));
        assert_eq!(p.backoff(3, 7), Duration::from_millis(400));
        assert_eq!(p.backoff(9, 7), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_in_bounds_and_is_deterministic() {
        let p = RetryPolicy { jitter: 0.5, ..RetryPolicy::default() };
        for seed in 0..1000 {
            let d = p.backoff(1, seed).as_secs_f64();
            assert!((0.1..=0.3).contains(&d), "{d}");
            assert_eq!(p.backoff(1, seed), p.backoff(1, seed));
        }
    }
}
