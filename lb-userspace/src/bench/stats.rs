//! Median, min and max of repeated measurements, and the spread warning.
use serde::Serialize;

/// Runs whose (max - min) / median exceeds this get a warning.
pub const SPREAD_WARNING: f64 = 0.20;

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// (max - min) / median.
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
        let (min, max) = (sorted[0], sorted[n - 1]);
        let spread = if median.abs() > f64::EPSILON { (max - min) / median.abs() } else { 0.0 };
        Summary { median, min, max, spread }
    }

    /// A warning naming `what` when the runs spread too far.
    pub fn warning(&self, what: &str) -> Option<String> {
        (self.spread > SPREAD_WARNING).then(|| {
            format!(
                "{what}: runs spread {:.0}% of the median ({:.1}..{:.1}, median {:.1})",
                self.spread * 100.0,
                self.min,
                self.max,
                self.median
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max_and_spread() {
        let s = Summary::of(&[5.0, 1.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        assert!((s.spread - 4.0 / 3.0).abs() < 1e-9);
        assert!(s.warning("x").is_some_and(|w| w.contains("133%")));
        assert_eq!(Summary::of(&[2.0, 4.0]).median, 3.0);
        assert!(Summary::of(&[10.0, 10.5, 11.0]).warning("x").is_none());
    }
}
