//! Conversions between the generated `berth.v1` messages and the domain types, with errors
//! that name the offending field so servers can answer `InvalidArgument` precisely.

use crate::gpu::{GpuRequest, GpuRequestError};
use crate::pb::v1 as pb;
use crate::validate::FieldError;

/// Result of a conversion from the wire.
pub type ConvertResult<T> = Result<T, FieldError>;

/// Reads a wire GPU request; `field` is its path in the enclosing message
/// (`"spec.resources.gpu"`).
pub fn gpu_request_from_pb(msg: &pb::GpuRequest, field: &str) -> ConvertResult<GpuRequest> {
    let min_memory = (msg.min_memory_mib > 0).then_some(msg.min_memory_mib);
    GpuRequest::parse(&msg.options, min_memory).map_err(|e| {
        let field = match &e {
            GpuRequestError::Option { index, .. } => format!("{field}.options[{index}]"),
            GpuRequestError::DuplicateModel { second, .. } => format!("{field}.options[{second}]"),
            GpuRequestError::AnyNotLast { index, .. } => format!("{field}.options[{index}]"),
            GpuRequestError::MinMemoryTooLarge { .. } => format!("{field}.min_memory_mib"),
            GpuRequestError::NoOptions | GpuRequestError::TooManyOptions { .. } => {
                format!("{field}.options")
            }
        };
        let message = match e {
            GpuRequestError::Option { source, .. } => source.to_string(),
            other => other.to_string(),
        };
        FieldError { field, message }
    })
}

/// Writes a GPU request to the wire.
pub fn gpu_request_to_pb(request: &GpuRequest) -> pb::GpuRequest {
    pb::GpuRequest {
        options: request.specs(),
        min_memory_mib: request.min_memory_mib.unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuModel;

    #[test]
    fn round_trip_and_field_paths() {
        let request = GpuRequest::parse(&["H100!:2", "A100-80GB:2"], Some(40_000)).expect("valid");
        let wire = gpu_request_to_pb(&request);
        assert_eq!(gpu_request_from_pb(&wire, "gpu"), Ok(request));

        let bad = pb::GpuRequest {
            options: vec!["H100".into(), "B200:0".into()],
            min_memory_mib: 0,
        };
        let err = gpu_request_from_pb(&bad, "spec.resources.gpu").expect_err("zero count");
        assert_eq!(err.field, "spec.resources.gpu.options[1]");
        assert_eq!(
            err.message,
            "GPU spec \"B200:0\": the GPU count must be at least 1"
        );

        let whole = gpu_request_to_pb(&GpuRequest::whole(GpuModel::B200, 8));
        assert_eq!(whole.options, ["B200:8"]);
    }
}
