//! vLLM's Prometheus metrics, kept truthfully with atomics.
//!
//! The gauges are only ever moved by [`RequestGuard`], whose `Drop` undoes
//! whatever it did, so a client that disconnects mid-stream, a cancelled
//! connection or an aborted shutdown all leave the counts right.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::OwnedSemaphorePermit;

/// Why a request stopped generating, as vLLM labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop string was generated.
    Stop,
    /// `max_tokens` were generated.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A snapshot of the request counts, as `GET /_fake/stats` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Requests admitted and not yet finished sending (held ones included).
    pub running: u64,
    /// Requests queued behind `--max-num-seqs`.
    pub waiting: u64,
    /// Requests that finished generating (finish reason stop or length).
    pub served: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    running: AtomicU64,
    waiting: AtomicU64,
    finished_stop: AtomicU64,
    finished_length: AtomicU64,
    /// Requests that went away (client gone, shutdown) before finishing.
    finished_abort: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
}

impl Metrics {
    pub(crate) fn stats(&self) -> Stats {
        Stats {
            running: self.running.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            served: self.finished_stop.load(Ordering::Relaxed)
                + self.finished_length.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add_generation_tokens(&self, n: u64) {
        self.generation_tokens.fetch_add(n, Ordering::Relaxed);
    }

    /// Renders the Prometheus text exposition format (0.0.4), labelled with
    /// `model_name` as vLLM labels it: its first served name.
    pub(crate) fn render(&self, model_name: &str) -> String {
        let model = escape_label(model_name);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::with_capacity(1536);
        let o = &mut out;
        family(
            o,
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
        );
        sample(
            o,
            "vllm:num_requests_running",
            "",
            &model,
            load(&self.running),
        );
        family(
            o,
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
        );
        sample(
            o,
            "vllm:num_requests_waiting",
            "",
            &model,
            load(&self.waiting),
        );
        family(
            o,
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
        );
        for (reason, count) in [
            ("finished_reason=\"stop\",", &self.finished_stop),
            ("finished_reason=\"length\",", &self.finished_length),
            ("finished_reason=\"abort\",", &self.finished_abort),
        ] {
            sample(o, "vllm:request_success_total", reason, &model, load(count));
        }
        family(
            o,
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
        );
        sample(
            o,
            "vllm:prompt_tokens_total",
            "",
            &model,
            load(&self.prompt_tokens),
        );
        family(
            o,
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
        );
        sample(
            o,
            "vllm:generation_tokens_total",
            "",
            &model,
            load(&self.generation_tokens),
        );
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One sample line; values print as floats, as Python's client writes them.
fn sample(out: &mut String, name: &str, extra_labels: &str, model: &str, value: u64) {
    let _ = writeln!(
        out,
        "{name}{{{extra_labels}model_name=\"{model}\"}} {value}.0"
    );
}

fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Running,
}

/// One inference request's presence in the gauges, from arrival until its
/// response body is dropped.
#[derive(Debug)]
pub(crate) struct RequestGuard {
    metrics: Arc<Metrics>,
    phase: Phase,
    finished: bool,
    /// The engine slot (`--max-num-seqs`); freed with the guard so that
    /// `running` never exceeds it.
    permit: Option<OwnedSemaphorePermit>,
}

impl RequestGuard {
    /// A request that has arrived and waits for an engine slot.
    pub(crate) fn waiting(metrics: Arc<Metrics>) -> Self {
        metrics.waiting.fetch_add(1, Ordering::Relaxed);
        Self {
            metrics,
            phase: Phase::Waiting,
            finished: false,
            permit: None,
        }
    }

    /// The request got its slot: it counts as running from now on.
    pub(crate) fn admit(&mut self, permit: OwnedSemaphorePermit, prompt_tokens: u64) {
        if self.phase == Phase::Waiting {
            self.metrics.running.fetch_add(1, Ordering::Relaxed);
            self.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
            self.metrics
                .prompt_tokens
                .fetch_add(prompt_tokens, Ordering::Relaxed);
            self.phase = Phase::Running;
        }
        self.permit = Some(permit);
    }

    /// Records the request as successfully finished (once).
    pub(crate) fn finish(&mut self, reason: FinishReason) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let counter = match reason {
            FinishReason::Stop => &self.metrics.finished_stop,
            FinishReason::Length => &self.metrics.finished_length,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let gauge = match self.phase {
            Phase::Waiting => &self.metrics.waiting,
            Phase::Running => &self.metrics.running,
        };
        gauge.fetch_sub(1, Ordering::Relaxed);
        if !self.finished {
            self.metrics.finished_abort.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Semaphore;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn guard_moves_a_request_through_the_gauges() {
        let metrics = Arc::new(Metrics::default());
        let slots = Arc::new(Semaphore::new(1));
        let mut guard = RequestGuard::waiting(metrics.clone());
        assert_eq!(
            metrics.stats(),
            Stats {
                running: 0,
                waiting: 1,
                served: 0
            }
        );
        guard.admit(slots.clone().try_acquire_owned().expect("free slot"), 3);
        assert_eq!(
            metrics.stats(),
            Stats {
                running: 1,
                waiting: 0,
                served: 0
            }
        );
        assert_eq!(slots.available_permits(), 0);
        guard.finish(FinishReason::Length);
        guard.finish(FinishReason::Length);
        drop(guard);
        assert_eq!(
            metrics.stats(),
            Stats {
                running: 0,
                waiting: 0,
                served: 1
            }
        );
        assert_eq!(slots.available_permits(), 1);

        // Dropped while waiting: leaves nothing behind but an abort.
        drop(RequestGuard::waiting(metrics.clone()));
        let text = metrics.render("m");
        assert_eq!(
            value(&text, "vllm:num_requests_waiting{model_name=\"m\"}"),
            Some(0.0)
        );
        assert_eq!(
            value(
                &text,
                "vllm:request_success_total{finished_reason=\"abort\",model_name=\"m\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "vllm:prompt_tokens_total{model_name=\"m\"}"),
            Some(3.0)
        );
    }

    #[test]
    fn render_has_help_type_and_escaped_labels() {
        let metrics = Metrics::default();
        metrics.add_generation_tokens(7);
        let text = metrics.render("we\"ird\\name");
        for family in [
            "vllm:num_requests_running gauge",
            "vllm:num_requests_waiting gauge",
            "vllm:request_success_total counter",
            "vllm:prompt_tokens_total counter",
            "vllm:generation_tokens_total counter",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family}\n")),
                "{family}\n{text}"
            );
        }
        assert!(text.contains("# HELP vllm:num_requests_running "));
        assert_eq!(
            value(
                &text,
                "vllm:generation_tokens_total{model_name=\"we\\\"ird\\\\name\"}"
            ),
            Some(7.0)
        );
    }
}
