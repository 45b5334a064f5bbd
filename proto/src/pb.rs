//! Generated `berth.v1` messages and gRPC stubs (tonic + prost), re-exported as they come
//! out of `build.rs`. Hand-written conversions to the domain types live in
//! [`crate::convert`]; prefer those over building these structs field by field.

/// Messages and services of the `berth.v1` package.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("berth.v1");
}

/// Encoded `FileDescriptorSet` of `berth.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/berth_v1_descriptor.bin"));
