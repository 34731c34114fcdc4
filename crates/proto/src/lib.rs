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

pub mod json;
mod redact;
pub mod server;
pub mod tls;

pub use server::Fence;

/// The encoded `FileDescriptorSet` of every crossfade proto file and its
/// imports, with source comments: register it with `tonic-reflection` so that
/// `grpcurl`-style tools can list and describe the services.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/crossfade_descriptor.bin"));

/// The services every crossfade gRPC port carries beside its own.
pub const STANDARD_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// A reflection builder over crossfade's descriptor set, the health
/// service's and reflection's own, advertising `service` and
/// [`STANDARD_SERVICES`] only: a port lists what it serves.
fn reflection_builder(service: &str) -> tonic_reflection::server::Builder<'static> {
    [service].into_iter().chain(STANDARD_SERVICES).fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .include_reflection_service(false),
        |builder, name| builder.with_service_name(name),
    )
}

/// gRPC reflection, `v1` and `v1alpha` (grpcurl 1.8 and many IDE plugins
/// speak only the latter), for a port serving `service` (its fully
/// qualified name).
pub fn reflection_services(
    service: &str,
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    Ok((
        reflection_builder(service).build_v1()?,
        reflection_builder(service).build_v1alpha()?,
    ))
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
