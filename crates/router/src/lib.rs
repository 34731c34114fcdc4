//! crossfade-router: the public, OpenAI-compatible entrypoint. It holds one
//! routing table (endpoints, their deployments with relative weights, and
//! the deployments' workers) behind one `ArcSwap`, picks a deployment by
//! weight (sticky by session key), a worker by the power of two choices,
//! and proxies the request to that worker's agent gate.
//!
//! It is not a load balancer of arbitrary HTTP: it understands the OpenAI
//! routes well enough to route by `model`, and it never rewrites bodies.

pub mod admission;
pub mod balance;
pub mod cli;
pub mod config;
pub mod control;
pub mod demand;
pub mod error;
pub mod keys;
pub mod proxy;
pub mod queue;
pub mod server;
pub mod stats;
pub mod table;
mod tally;
pub mod target;
