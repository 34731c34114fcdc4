//! crossfade-coordinator: owns the desired state of every endpoint and runs
//! rolling promotions step by step: start candidate replicas, shift the
//! routers' traffic, drain and retire old replicas.
//!
//! Built so far:
//! - [`settings`]: promotion and scaling settings with the exact bounds of
//!   DESIGN §4, refused with the field's name and range.
//! - [`rollout`]: the rollout logic as a pure state machine,
//!   `(state, event) -> (state, actions)`, tested without I/O.
//! - [`state`] and [`store`]: the desired state (endpoints, deployments,
//!   promotions, workers, routers) and its embedded file-backed store,
//!   replaced atomically at every change.
//!
//! The shell that performs the actions, the gRPC service and the binary
//! come next.

pub mod actor;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod rollout;
pub mod service;
pub mod settings;
pub mod state;
pub mod store;
