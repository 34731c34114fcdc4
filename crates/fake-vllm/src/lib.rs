//! fake-vllm: a stand-in for vLLM's OpenAI-compatible server (`vllm serve`)
//! for crossfade's tests, demo and benchmarks, on machines with no GPU and
//! no model weights.
//!
//! It IS faithful where crossfade can observe vLLM: the command line (every
//! vLLM flag is accepted), the closed port while the model loads, `/health`,
//! `/v1/models`, `/v1/completions` and `/v1/chat/completions` (JSON and
//! token-by-token SSE), `/v1/embeddings`, `/v1/audio/transcriptions`,
//! `/tokenize` and `/detokenize` (deterministic answers in vLLM's shapes), vLLM's error bodies, truthful `/metrics` gauges and
//! counters under vLLM's names, `--max-num-seqs` queueing, and SIGTERM
//! handling with and without `--shutdown-timeout`.
//!
//! It is NOT a model: replies are deterministic words paced at a configured
//! rate, whose first token `[MODEL as NAME]` names the deployment that
//! answered. Tests drive it by signal rather than timing through the
//! `/_fake/` controls (hold/release, scripted faults), which are not part of
//! vLLM.
//!
//! The binary (`fake-vllm serve MODEL ...`) and in-process tests share this
//! code: [`Config::from_args`], [`load`], then [`FakeVllm::serve`] or
//! [`Handle::spawn`].

mod api;
mod args;
mod control;
mod engine;
mod extra;
mod faults;
mod load;
mod metrics;
mod openai;
mod server;

pub use api::{MODEL_HEADER, SERVED_NAME_HEADER};
pub use args::{
    ApiKey, ArgsError, Config, DEFAULT_HOST, DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_NUM_SEQS,
    DEFAULT_MAX_TOKENS, DEFAULT_PORT, DEFAULT_TOKENS_PER_SECOND, USAGE,
};
pub use control::Controls;
pub use engine::reply_text;
pub use faults::{Fault, FaultParseError};
pub use load::{LoadError, MISSING_MODEL_PREFIX, load};
pub use metrics::{FinishReason, Stats};
pub use server::{Exit, FakeVllm, Handle, ServeError, Shutdown};

/// The names of fake-vllm's environment knobs.
pub mod cli;
pub mod knobs {
    pub use crate::args::{FAULT, LOAD_TIME, MAX_TOKENS, TOKENS_PER_SECOND, TTFT};
}
