//! crossfade-coordinator: owns the desired state of every endpoint and runs
//! rolling promotions step by step: start candidate replicas, shift the
//! routers' traffic, drain and retire old replicas.
//!
//! - [`settings`]: promotion and scaling settings with the exact bounds of
//!   DESIGN §4, refused with the field's name and range.
//! - [`rollout`]: the rollout logic as a pure state machine,
//!   `(state, event) -> (state, actions)`, tested without I/O, with the
//!   pure rules the shell asks: [`health`] (the gate), [`eligibility`]
//!   (who may host what), [`acks`] (when a table counts as acknowledged).
//! - [`template`]: a template is checked when it is promoted, not on a
//!   worker.
//! - [`state`] and [`store`]: the desired state (endpoints, deployments,
//!   promotions, workers, routers) and its embedded file-backed store,
//!   replaced atomically at every change.
//! - [`actor`]: the shell that performs the rollouts' actions, each call
//!   with a deadline; [`service`]: the gRPC service in front of it, whose
//!   refusals are one [`error::CoordinatorError`].

pub mod acks;
pub mod actor;
pub mod cli;
pub mod config;
pub mod eligibility;
pub mod error;
#[cfg(feature = "etcd")]
pub mod ha;
pub mod health;
pub mod metrics;
pub mod rest;
pub mod rollout;
pub mod service;
pub mod settings;
pub mod state;
pub mod store;
pub mod template;
