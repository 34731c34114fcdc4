//! `crossfade-coordinator --config coordinator.toml`: see [`crossfade_coordinator::cli`].

fn main() -> std::process::ExitCode {
    crossfade_coordinator::cli::main_from(std::env::args_os())
}
