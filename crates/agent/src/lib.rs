//! crossfade-agent: the service on every GPU host. It supervises the
//! inference engine (vLLM, launched from `MODEL_NAME` and `VLLM_ARGS`),
//! fronts it with a gate that counts and drains in-flight requests, and
//! reports GPU health and in-flight counts to the coordinator over gRPC.
//!
//! Built so far: [`gpu`], the GPU health probe (NVML behind a trait, a fake
//! for tests) and the classification of what it reads; and
//! [`supervisor::command`], the engine's command line. The process
//! supervision, the gate and the gRPC service are the rest of issue 4.

pub mod gpu;
pub mod supervisor;
