//! Median, quartiles, min and max of repeated measurements, and the spread warning.
use serde::Serialize;

/// Runs whose interquartile range exceeds this share of the median get a warning. The
/// quartiles, not min and max: on a shared host a burst of interference hits a run or two of
/// many, which the median steps around and min-max would report as untrustworthy.
pub const SPREAD_WARNING: f64 = 0.10;

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// First and third quartiles (nearest rank).
    pub q1: f64,
    pub q3: f64,
    /// (q3 - q1) / median.
    pub spread: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Summary {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n == 0 {
            return Summary::default();
        }
        let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
        let (q1, q3) = (sorted[(n - 1) / 4], sorted[(3 * (n - 1)).div_ceil(4)]);
        let (min, max) = (sorted[0], sorted[n - 1]);
        let spread = if median.abs() > f64::EPSILON { (q3 - q1) / median.abs() } else { 0.0 };
        Summary { median, min, max, q1, q3, spread }
    }

    /// Whether the runs spread too far to trust the median.
    pub fn too_spread(&self) -> bool {
        self.spread > SPREAD_WARNING
    }

    /// A warning naming `what` when the runs spread too far.
    pub fn warning(&self, what: &str) -> Option<String> {
        self.too_spread().then(|| {
            format!(
                "{what}: the middle half of the runs spreads {:.0}% of the median ({:.1}..{:.1}, median {:.1})",
                self.spread * 100.0,
                self.q1,
                self.q3,
                self.median
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_quartiles_and_spread() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.median, s.min, s.max, s.q1, s.q3), (3.0, 1.0, 5.0, 2.0, 4.0));
        assert!((s.spread - 2.0 / 3.0).abs() < 1e-9);
        assert!(s.warning("x").is_some_and(|w| w.contains("67%")));
        assert_eq!(Summary::of(&[2.0, 4.0]).median, 3.0);
        assert!(Summary::of(&[10.0, 10.5, 11.0]).warning("x").is_none());
    }

    #[test]
    fn a_burst_in_a_few_runs_is_not_a_wide_spread() {
        let mut runs = vec![56.0; 21];
        runs[3] = 75.0;
        runs[11] = 72.0;
        let s = Summary::of(&runs);
        assert_eq!((s.median, s.max), (56.0, 75.0));
        assert!(s.warning("x").is_none());
        runs.iter_mut().take(10).for_each(|r| *r = 70.0);
        assert!(Summary::of(&runs).warning("x").is_some());
    }
}
