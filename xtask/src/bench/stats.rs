//! Order statistics of a sample: median, p95 (nearest rank), min, max, and how a number is
//! rounded for reading. Pure functions, no I/O; a leaf of the bench.

use serde::Serialize;

/// Rounds for reading: three significant figures, at most two decimals.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The summary BENCHMARKS.md shows for one series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub p95: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

/// The `p`-th percentile (0 < p ≤ 100) by nearest rank on sorted data: the smallest value with
/// at least p % of the sample at or below it. With few runs, p95 is the maximum; that is the
/// honest answer, not an interpolation between runs that never happened.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of an empty sample");
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// The median: the middle value, or the mean of the two middle values.
pub fn median(sorted: &[f64]) -> f64 {
    assert!(!sorted.is_empty(), "median of an empty sample");
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// `None` for an empty sample.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    Some(Summary {
        median: median(&s),
        p95: percentile(&s, 95.0),
        min: s[0],
        max: s[s.len() - 1],
        runs: s.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_samples() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
        assert_eq!(median(&[5.0]), 5.0);
    }

    #[test]
    fn p95_is_nearest_rank() {
        let s: Vec<f64> = (1..=20).map(f64::from).collect();
        // 95 % of 20 = 19: the 19th value.
        assert_eq!(percentile(&s, 95.0), 19.0);
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 95.0), 95.0);
        // Few runs: p95 is the maximum.
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 95.0), 3.0);
        assert_eq!(percentile(&[7.0], 95.0), 7.0);
    }

    #[test]
    fn summary_sorts_unsorted_input() {
        let s = summarize(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(
            s,
            Summary {
                median: 2.5,
                p95: 10.0,
                min: 1.0,
                max: 10.0,
                runs: 4
            }
        );
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn numbers_round_for_reading() {
        assert_eq!(fmt_num(1834.4), "1834");
        assert_eq!(fmt_num(12.345), "12.3");
        assert_eq!(fmt_num(2.345), "2.35");
    }
}
