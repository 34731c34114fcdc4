//! Supervising the inference engine. Built so far: [`command`], the engine's
//! command line from a deployment.

pub mod command;
