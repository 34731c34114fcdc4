//! Scenarios, then random interleavings against a simulated fleet.

mod scenarios;
mod simulation;
