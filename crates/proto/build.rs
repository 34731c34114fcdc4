//! Compiles `proto/crossfade/v1/*.proto` with protox (a protobuf compiler in
//! Rust), so that building crossfade needs no `protoc` on the machine.
//!
//! Besides the Rust code, it writes the encoded `FileDescriptorSet` (with
//! source comments) for gRPC reflection, so tools can describe the services
//! without the `.proto` files.

use std::path::PathBuf;

const PROTO_ROOT: &str = "../../proto";
const FILES: &[&str] = &[
    "crossfade/v1/types.proto",
    "crossfade/v1/agent.proto",
    "crossfade/v1/router.proto",
    "crossfade/v1/coordinator.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(PROTO_ROOT);
    for file in FILES {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }

    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_source_info(true).include_imports(true);
    for file in FILES {
        compiler.open_file(file)?;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("crossfade_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        // Secrets travel in `EnvVar`; their Debug is written by hand so that a
        // `{:?}` in a log line can never print one.
        .skip_debug([".crossfade.v1.EnvVar", ".crossfade.v1.EnvVar.source"])
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
