//! crossfade-agent: the service on every GPU host. It supervises the
//! inference engine (vLLM, launched from `MODEL_NAME` and `VLLM_ARGS`),
//! fronts it with a gate that counts and drains in-flight requests, and
//! reports GPU health and in-flight counts to the coordinator over gRPC.
//!
//! - [`supervisor`]: the engine's lifecycle (launch, readiness, crash
//!   restarts, drain, stop, adoption after an agent restart).
//! - [`gate`]: the host's inference port, counting and draining requests.
//! - [`gpu`]: GPU health (NVML behind a trait, a fake for tests).
//! - [`status`] and [`service`]: `WorkerStatus` and the Agent gRPC service.
//! - [`standalone`]: the deployment of `MODEL_NAME` / `VLLM_ARGS` when no
//!   coordinator drives the agent.

pub mod cli;
pub mod config;
pub mod gate;
pub mod gpu;
pub mod metrics;
pub mod service;
pub mod standalone;
pub mod status;
pub mod supervisor;
