//! The Kairos protocol: generated gRPC types for `kairos.v1`, the encoded
//! descriptor set for server reflection, and the JetStream wire contract
//! (stream, subject and header names) shared by servers and workers.
//!
//! # Layout
//! - [`v1`]: code generated from `proto/kairos/v1/*.proto`.
//! - [`wire`]: names of streams, subjects, consumers and headers.

/// Code generated from `proto/kairos/v1`.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    missing_debug_implementations
)]
pub mod v1 {
    tonic::include_proto!("kairos.v1");
}

/// Encoded `FileDescriptorSet` of `kairos.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kairos_descriptor");

pub mod wire;
