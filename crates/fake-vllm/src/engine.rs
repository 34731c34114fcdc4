//! The fake engine: admission behind `--max-num-seqs`, the hold switch,
//! token pacing, and deterministic text.
//!
//! Text is a pure function of (model, served name, prompt, seed): FNV-1a
//! seeds a xorshift64* stream that picks words from a fixed list. The first
//! token is always `[MODEL as NAME]` so any client can tell which deployment
//! answered.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::metrics::{FinishReason, Metrics, RequestGuard};

/// Plain lowercase ASCII, so a word needs no JSON escaping.
const WORDS: [&str; 32] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "amber", "basil", "cedar", "dune",
    "ember", "fjord",
];

/// FNV-1a, fed incrementally so prompts can be hashed while parsed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Writes `part` then a separator, so `["ab","c"]` and `["a","bc"]` differ.
    pub(crate) fn part(&mut self, part: &str) {
        self.write(part.as_bytes());
        self.write(&[0xff]);
    }
}

/// The word stream for one reply.
#[derive(Debug, Clone)]
pub(crate) struct Words(u64);

impl Words {
    /// `prompt` is the FNV state after hashing the prompt's parts.
    pub(crate) fn new(prompt: Fnv, model: &str, served_name: &str, seed: i64) -> Self {
        let mut h = prompt;
        h.part(model);
        h.part(served_name);
        h.write(&seed.to_le_bytes());
        // xorshift has a fixed point at zero.
        Words(if h.0 == 0 { 0x9e37_79b9_7f4a_7c15 } else { h.0 })
    }

    pub(crate) fn next_word(&mut self) -> &'static str {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        WORDS[(r >> 59) as usize % WORDS.len()]
    }
}

/// The reply text fake-vllm generates, for tests that want to predict it.
///
/// `prompt_parts` are what the server hashes: a completion's prompt string,
/// or each chat message's role then its text content, in order.
pub fn reply_text(
    model: &str,
    served_name: &str,
    prompt_parts: &[&str],
    seed: i64,
    max_tokens: u32,
) -> String {
    let mut fnv = Fnv::new();
    for part in prompt_parts {
        fnv.part(part);
    }
    let mut words = Words::new(fnv, model, served_name, seed);
    let mut text = tag(model, served_name);
    for _ in 1..max_tokens {
        text.push(' ');
        text.push_str(words.next_word());
    }
    text
}

/// The first token of every reply.
pub(crate) fn tag(model: &str, served_name: &str) -> String {
    format!("[{model} as {served_name}]")
}

/// One generated token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    /// The `[MODEL as NAME]` tag.
    Tag,
    /// A word, emitted with a leading space.
    Word(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Token(Token),
    Finished(FinishReason),
}

/// State shared by every request: slots, the hold switch, pacing.
#[derive(Debug)]
pub(crate) struct Engine {
    slots: Arc<Semaphore>,
    held: watch::Sender<bool>,
    pub(crate) metrics: Arc<Metrics>,
    period: Duration,
    ttft: Duration,
}

/// What a request asks the engine for.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) words: Words,
    pub(crate) max_tokens: u32,
    pub(crate) prompt_tokens: u64,
    pub(crate) stop: Vec<String>,
}

impl Engine {
    pub(crate) fn new(max_num_seqs: usize, period: Duration, ttft: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_num_seqs)),
            held: watch::Sender::new(false),
            metrics: Arc::new(Metrics::default()),
            period,
            ttft,
        }
    }

    pub(crate) fn set_held(&self, held: bool) {
        self.held.send_replace(held);
    }

    pub(crate) fn is_held(&self) -> bool {
        *self.held.borrow()
    }

    /// Queues a job; it counts as waiting until [`Generation::admit`].
    pub(crate) fn submit(&self, job: Job) -> Generation {
        Generation {
            guard: RequestGuard::waiting(self.metrics.clone()),
            slots: self.slots.clone(),
            held: self.held.subscribe(),
            metrics: self.metrics.clone(),
            period: self.period,
            ttft: self.ttft,
            next_at: None,
            emitted: 0,
            finished: None,
            job,
        }
    }
}

/// One request's generation. Dropping it mid-way is how a request is
/// cancelled: its guard puts the gauges right.
#[derive(Debug)]
pub(crate) struct Generation {
    guard: RequestGuard,
    slots: Arc<Semaphore>,
    held: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    period: Duration,
    ttft: Duration,
    /// When the next token is due; `None` until admitted.
    next_at: Option<Instant>,
    emitted: u32,
    finished: Option<FinishReason>,
    job: Job,
}

impl Generation {
    /// Waits for an engine slot; from then on the request counts as running.
    pub(crate) async fn admit(&mut self) {
        if self.next_at.is_some() {
            return;
        }
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the engine never closes its slot semaphore");
        self.guard.admit(permit, self.job.prompt_tokens);
        self.next_at = Some(Instant::now() + self.ttft + self.period);
    }

    pub(crate) fn prompt_tokens(&self) -> u64 {
        self.job.prompt_tokens
    }

    pub(crate) fn completion_tokens(&self) -> u32 {
        self.emitted
    }

    /// Produces the next token at the configured pace, pausing while held.
    pub(crate) async fn next(&mut self) -> Step {
        if let Some(reason) = self.finished {
            return Step::Finished(reason);
        }
        self.admit().await;
        if self.emitted >= self.job.max_tokens {
            return self.finish(FinishReason::Length);
        }
        self.wait_while_held().await;
        if !self.period.is_zero() || self.emitted == 0 {
            let due = self.next_at.unwrap_or_else(Instant::now);
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
                // A hold set during the sleep still pauses this token.
                self.wait_while_held().await;
            }
        }
        let token = if self.emitted == 0 {
            Token::Tag
        } else {
            let word = self.job.words.next_word();
            if !self.job.stop.is_empty() && self.job.stop.iter().any(|s| s.trim() == word) {
                return self.finish(FinishReason::Stop);
            }
            Token::Word(word)
        };
        self.emitted += 1;
        self.metrics.add_generation_tokens(1);
        if let Some(at) = self.next_at.as_mut() {
            *at += self.period;
        }
        Step::Token(token)
    }

    fn finish(&mut self, reason: FinishReason) -> Step {
        self.finished = Some(reason);
        self.guard.finish(reason);
        Step::Finished(reason)
    }

    async fn wait_while_held(&mut self) {
        if !*self.held.borrow() {
            return;
        }
        // The sender lives as long as the engine, which outlives every
        // generation, so `wait_for` cannot fail.
        let _ = self.held.wait_for(|held| !*held).await;
        // Resume at the configured pace from now, not in a burst.
        let now = Instant::now();
        if let Some(at) = self.next_at.as_mut() {
            *at = (*at).max(now);
        }
    }

    /// Hands the metrics guard over to whatever outlives this generation
    /// (a response body), so the request counts until its bytes are gone.
    pub(crate) fn into_guard(self) -> RequestGuard {
        self.guard
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(prompt: &str, max_tokens: u32, stop: &[&str]) -> Job {
        let mut fnv = Fnv::new();
        fnv.part(prompt);
        Job {
            words: Words::new(fnv, "org/m", "m", 0),
            max_tokens,
            prompt_tokens: 1,
            stop: stop.iter().map(|s| s.to_string()).collect(),
        }
    }

    async fn run(engine: &Engine, job: Job) -> (String, FinishReason) {
        let mut generation = engine.submit(job);
        let mut text = String::new();
        loop {
            match generation.next().await {
                Step::Token(Token::Tag) => text.push_str(&tag("org/m", "m")),
                Step::Token(Token::Word(w)) => {
                    text.push(' ');
                    text.push_str(w);
                }
                Step::Finished(reason) => return (text, reason),
            }
        }
    }

    #[test]
    fn text_is_deterministic_and_depends_on_every_input() {
        let a = reply_text("org/m", "m", &["hello world"], 0, 12);
        assert_eq!(a, reply_text("org/m", "m", &["hello world"], 0, 12));
        assert!(a.starts_with("[org/m as m] "), "{a}");
        assert_eq!(a.split(' ').count(), 1 + 2 + 11, "{a}");
        for other in [
            reply_text("org/n", "m", &["hello world"], 0, 12),
            reply_text("org/m", "n", &["hello world"], 0, 12),
            reply_text("org/m", "m", &["hello there"], 0, 12),
            reply_text("org/m", "m", &["hello world"], 1, 12),
        ] {
            assert_ne!(
                a.split_once("] ").map(|p| p.1),
                other.split_once("] ").map(|p| p.1)
            );
        }
        assert_ne!(
            reply_text("m", "m", &["ab", "c"], 0, 8),
            reply_text("m", "m", &["a", "bc"], 0, 8)
        );
        assert_eq!(reply_text("org/m", "m", &["x"], 0, 1), "[org/m as m]");
    }

    #[tokio::test(start_paused = true)]
    async fn engine_matches_reply_text_and_paces_tokens() {
        let engine = Engine::new(4, Duration::from_millis(100), Duration::from_millis(500));
        let start = Instant::now();
        let (text, reason) = run(&engine, job("hi", 5, &[])).await;
        assert_eq!(text, reply_text("org/m", "m", &["hi"], 0, 5));
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(start.elapsed(), Duration::from_millis(500 + 5 * 100));
        assert_eq!(engine.metrics.stats().served, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_word_finishes_with_stop() {
        let engine = Engine::new(1, Duration::ZERO, Duration::ZERO);
        let full = reply_text("org/m", "m", &["hi"], 0, 6);
        let third = full.split(' ').nth(3).expect("a third word");
        let (text, reason) = run(&engine, job("hi", 6, &[third])).await;
        assert_eq!(reason, FinishReason::Stop);
        assert!(
            full.starts_with(&text) && !text.contains(third),
            "{text} / {full}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hold_pauses_and_slots_queue() {
        let engine = Arc::new(Engine::new(1, Duration::from_millis(10), Duration::ZERO));
        engine.set_held(true);
        let mut first = engine.submit(job("a", 2, &[]));
        let mut second = engine.submit(job("b", 2, &[]));
        let stats = || engine.metrics.stats();
        assert_eq!((stats().running, stats().waiting), (0, 2));
        first.admit().await;
        assert_eq!((stats().running, stats().waiting), (1, 1));
        let paused = tokio::time::timeout(Duration::from_secs(5), first.next()).await;
        assert!(paused.is_err(), "a held generation must not produce tokens");
        engine.set_held(false);
        assert_eq!(first.next().await, Step::Token(Token::Tag));
        // The second only gets the slot once the first is gone.
        assert!(
            tokio::time::timeout(Duration::from_secs(1), second.admit())
                .await
                .is_err()
        );
        drop(first);
        second.admit().await;
        assert_eq!((stats().running, stats().waiting), (1, 0));
    }
}
