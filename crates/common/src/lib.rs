//! What every crossfade program shares: configuration loading (file, then
//! `CROSSFADE_<SECTION>__<KEY>` environment variables, then flags, then
//! validation), log set-up, the Prometheus recorder, graceful shutdown on
//! SIGTERM / SIGINT, and a `Secret` wrapper that keeps values out of logs.
//!
//! The [`http`] module is the accept loop and the proxy rules every HTTP
//! listener shares. It holds no program's configuration types: each
//! program owns its `Config` and its listeners.

pub mod config;
pub mod engine_env;
pub mod files;
pub mod http;
pub mod metrics;
pub mod net;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
pub mod upstream;
pub mod vllm_args;

pub use config::{CommonArgs, ConfigError, FieldError, Validate};
pub use secret::Secret;
pub use shutdown::Shutdown;
