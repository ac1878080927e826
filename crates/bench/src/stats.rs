//! Latency histograms and rates.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies in microseconds, from 1 µs to 1 h, 3 significant digits.
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies::new()
    }
}

impl Latencies {
    /// An empty histogram.
    pub fn new() -> Latencies {
        Latencies(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"))
    }

    /// Records one operation's latency (clamped into the histogram's range).
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(us.max(1));
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Latencies) {
        // Both share the same bounds, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// Median, in microseconds.
    pub fn p50_us(&self) -> f64 {
        self.0.value_at_quantile(0.50) as f64
    }

    /// 99th percentile, in microseconds.
    pub fn p99_us(&self) -> f64 {
        self.0.value_at_quantile(0.99) as f64
    }

    /// Mean, in microseconds.
    pub fn mean_us(&self) -> f64 {
        self.0.mean()
    }

    /// Largest sample, in microseconds.
    pub fn max_us(&self) -> f64 {
        self.0.max() as f64
    }
}

/// Events per second over `elapsed` (0 when no time passed).
pub fn rate(count: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 { count as f64 / s } else { 0.0 }
}

/// Megabytes (10^6 bytes) per second over `elapsed`.
pub fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    rate(bytes, elapsed) / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_samples() {
        let mut l = Latencies::new();
        for us in 1..=100u64 {
            l.record(Duration::from_micros(us));
        }
        assert_eq!(l.count(), 100);
        assert_eq!(l.p50_us(), 50.0);
        assert_eq!(l.p99_us(), 99.0);
        assert!((l.mean_us() - 50.5).abs() < 0.1);
        let mut other = Latencies::new();
        other.record(Duration::from_millis(10));
        l.merge(&other);
        assert_eq!(l.count(), 101);
        assert!(l.max_us() >= 9_990.0);
    }

    #[test]
    fn rates() {
        assert_eq!(rate(10, Duration::from_secs(2)), 5.0);
        assert_eq!(rate(10, Duration::ZERO), 0.0);
        assert_eq!(mb_per_s(4_000_000, Duration::from_secs(2)), 2.0);
    }
}
