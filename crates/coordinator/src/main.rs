//! `crossfade-coordinator --config coordinator.toml`: see [`crossfade_coordinator::cli`].

/// The coordinator's state is many small maps of short strings, copied
/// into views and dropped pass after pass: glibc's allocator spent a third
/// of its CPU at 10,000 workers (`malloc_consolidate`, `unlink_chunk`);
/// mimalloc's per-size free lists do not (`bench/RESULTS.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    crossfade_coordinator::cli::main_from(std::env::args_os())
}
