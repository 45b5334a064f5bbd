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

/// Most items in one `CreateSandboxes` or `DeleteSandboxes` call (more is INVALID_ARGUMENT
/// naming the list). A batch is answered when its slowest item is, so a larger one trades
/// latency for fewer calls; at 64 the per-call cost is already small beside the per-item
/// one, a batch fits in one of the leader's create batches (`max_batch_sandboxes`, 512 by
/// default), and the largest request (64 creates of at most 1 MiB) stays under a replica's
/// 64 MiB message limit.
pub const MAX_BATCH_ITEMS: usize = 64;
