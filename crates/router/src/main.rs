//! `crossfade-router --config router.toml`: see [`crossfade_router::cli`].

fn main() -> std::process::ExitCode {
    crossfade_router::cli::main_from(std::env::args_os())
}
