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

/// A report's event, as sent alone in a `ReportRequest`, as one of several.
impl From<v1::report_request::Event> for v1::report::Event {
    fn from(event: v1::report_request::Event) -> Self {
        match event {
            v1::report_request::Event::Started(s) => Self::Started(s),
            v1::report_request::Event::Finished(f) => Self::Finished(f),
        }
    }
}

/// One of several reports' event, as sent alone in a `ReportRequest`.
impl From<v1::report::Event> for v1::report_request::Event {
    fn from(event: v1::report::Event) -> Self {
        match event {
            v1::report::Event::Started(s) => Self::Started(s),
            v1::report::Event::Finished(f) => Self::Finished(f),
        }
    }
}

/// Encoded `FileDescriptorSet` of `kairos.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kairos_descriptor");

pub mod wire;
