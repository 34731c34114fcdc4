//! crossfade's wire contract: the `Agent`, `RouterControl` and `Coordinator`
//! gRPC services and their messages, generated from `proto/crossfade/v1/`.
//!
//! The code is generated at build time by a protobuf compiler written in Rust
//! (protox), so no `protoc` is needed. This crate holds no logic beyond what
//! the wire needs: the `Debug` of secret-bearing messages, the descriptor
//! set that the gRPC servers hand to the reflection service, and the
//! [`server`] helpers every gRPC server shares (coordinator fencing, health
//! and reflection beside the service), and the control plane's mutual TLS
//! with roles ([`tls`]).

pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic, rust_2018_idioms)]
    tonic::include_proto!("crossfade.v1");
}

mod redact;
pub mod server;
pub mod tls;

pub use server::Fence;

/// The encoded `FileDescriptorSet` of every crossfade proto file and its
/// imports, with source comments: register it with `tonic-reflection` so that
/// `grpcurl`-style tools can list and describe the services.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/crossfade_descriptor.bin"));

/// The gRPC reflection service (v1) over crossfade's descriptor set, for
/// every program's gRPC server. `extra` adds the encoded descriptor sets of
/// other services the server carries, such as
/// `tonic_health::pb::FILE_DESCRIPTOR_SET`.
pub fn reflection_service(
    extra: &[&'static [u8]],
) -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    extra
        .iter()
        .fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET),
            |builder, set| builder.register_encoded_file_descriptor_set(set),
        )
        .build_v1()
}

/// Fully qualified names of the three services, as gRPC health and
/// reflection report them.
pub mod service_names {
    /// The agent's service.
    pub const AGENT: &str = "crossfade.v1.Agent";
    /// The router's control service.
    pub const ROUTER_CONTROL: &str = "crossfade.v1.RouterControl";
    /// The coordinator's service.
    pub const COORDINATOR: &str = "crossfade.v1.Coordinator";
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
