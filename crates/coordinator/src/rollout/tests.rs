//! Scenarios, then random interleavings against a simulated fleet: one
//! endpoint in a hostile world, then several endpoints behind several
//! routers.

mod fleet;
mod scenarios;
mod simulation;
