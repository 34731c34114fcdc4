//! Scenarios, then random interleavings against a simulated fleet: one
//! endpoint in a hostile world, then several endpoints behind several
//! routers.

mod during;
mod fleet;
mod scenarios;
mod simulation;
mod support;
