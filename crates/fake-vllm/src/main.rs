//! `fake-vllm serve MODEL ...`: see [`fake_vllm::cli`].

fn main() -> std::process::ExitCode {
    fake_vllm::cli::main_from(std::env::args())
}
