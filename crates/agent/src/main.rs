//! `crossfade-agent --config agent.toml`: see [`crossfade_agent::cli`].

fn main() -> std::process::ExitCode {
    crossfade_agent::cli::main_from(std::env::args_os())
}
