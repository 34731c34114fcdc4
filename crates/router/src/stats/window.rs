//! The sliding window behind `GetStats`: buckets of counts and latency
//! histograms for the last [`BUCKETS_KEPT`] × [`super::BUCKET_SECONDS`] seconds.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Duration;

use crossfade_common::metrics::LATENCY_SECONDS_BUCKETS;
use crossfade_proto::v1;

use super::{BUCKETS_KEPT, add_counts};

/// Buckets of `T` for the last [`BUCKETS_KEPT`] × [`super::BUCKET_SECONDS`]
/// seconds, oldest first.
#[derive(Debug)]
pub(crate) struct Window<T> {
    /// (start, in units of BUCKET_SECONDS since the Unix epoch; the bucket).
    buckets: VecDeque<(u64, T)>,
}

impl<T> Default for Window<T> {
    fn default() -> Self {
        Self {
            buckets: VecDeque::new(),
        }
    }
}

impl<T: Default> Window<T> {
    /// The bucket for `now`, made when the clock moved on.
    pub(super) fn current(&mut self, now: u64) -> &mut T {
        if self.buckets.back().is_none_or(|(start, _)| *start < now) {
            self.buckets.push_back((now, T::default()));
            while self.buckets.len() > BUCKETS_KEPT {
                self.buckets.pop_front();
            }
        }
        &mut self
            .buckets
            .back_mut()
            .expect("a bucket was just pushed if none was there")
            .1
    }

    /// The buckets that start at or after `since`.
    pub(super) fn since(&self, since: u64) -> impl Iterator<Item = &T> {
        self.buckets
            .iter()
            .filter(move |(start, _)| *start >= since)
            .map(|(_, bucket)| bucket)
    }
}

/// One window bucket of a deployment: counts, retries, latencies.
#[derive(Debug, Default, Clone)]
pub(super) struct Bucket {
    pub(super) counts: v1::RequestCounts,
    pub(super) retries: v1::RetryCounts,
    pub(super) latency: Hist,
    pub(super) ttft: Hist,
}

impl Bucket {
    pub(super) fn add(&mut self, other: &Bucket) {
        add_counts(&mut self.counts, &other.counts);
        let (r, o) = (&mut self.retries, &other.retries);
        r.connect_error += o.connect_error;
        r.refused_stream += o.refused_stream;
        r.draining += o.draining;
        r.not_ready += o.not_ready;
        self.latency.add(&other.latency);
        self.ttft.add(&other.ttft);
    }
}

/// A histogram over the shared latency buckets (plus one for anything
/// longer); percentiles are reported as the upper bound of their bucket.
#[derive(Debug, Clone)]
pub(super) struct Hist {
    counts: [u64; LATENCY_SECONDS_BUCKETS.len() + 1],
    sum: f64,
    max: f64,
}

impl Default for Hist {
    fn default() -> Self {
        Self {
            counts: [0; LATENCY_SECONDS_BUCKETS.len() + 1],
            sum: 0.0,
            max: 0.0,
        }
    }
}

impl Hist {
    pub(super) fn record(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_SECONDS_BUCKETS.partition_point(|&b| b < s);
        self.counts[i] += 1;
        self.sum += s;
        self.max = self.max.max(s);
    }

    pub(super) fn add(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.sum += other.sum;
        self.max = self.max.max(other.max);
    }

    pub(super) fn quantile(&self, q: f64) -> f64 {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return LATENCY_SECONDS_BUCKETS
                    .get(i)
                    .copied()
                    .unwrap_or(self.max)
                    .min(self.max);
            }
        }
        self.max
    }

    /// The histogram's series in the text format: cumulative buckets, sum
    /// and count.
    pub(super) fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut seen = 0;
        for (i, n) in self.counts.iter().enumerate() {
            seen += n;
            match LATENCY_SECONDS_BUCKETS.get(i) {
                Some(le) => {
                    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {seen}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {seen}");
                }
            }
        }
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {seen}");
    }

    pub(super) fn summary(&self) -> v1::LatencySummary {
        v1::LatencySummary {
            count: self.counts.iter().sum(),
            sum_seconds: self.sum,
            p50_seconds: self.quantile(0.5),
            p90_seconds: self.quantile(0.9),
            p99_seconds: self.quantile(0.99),
            max_seconds: self.max,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_bucket_upper_bounds() {
        let mut h = Hist::default();
        for ms in [3, 3, 3, 40, 40, 40, 40, 40, 40, 900] {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.count, 10);
        assert_eq!(s.p50_seconds, 0.05);
        assert_eq!(s.p90_seconds, 0.05);
        assert_eq!(s.p99_seconds, 0.9, "capped by the largest observation");
        assert!((s.sum_seconds - 1.149).abs() < 1e-9);
        assert_eq!(Hist::default().summary().p99_seconds, 0.0);
    }

    #[test]
    fn the_window_keeps_an_hour() {
        let mut w = Window::<v1::RequestCounts>::default();
        for b in 0..(BUCKETS_KEPT as u64 + 10) {
            w.current(b).total += 1;
        }
        assert_eq!(w.buckets.len(), BUCKETS_KEPT);
        assert_eq!(w.buckets.front().unwrap().0, 10);
        assert_eq!(w.since(BUCKETS_KEPT as u64).count(), 10);
    }
}
