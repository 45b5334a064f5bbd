//! berth's wire contract and shared vocabulary.
//!
//! Every other crate speaks in these terms: the `berth.v1` gRPC messages and services, the
//! GPU catalog (T4 through B200, with the NVML product names that map to each), the Modal-style
//! GPU request language, checked resource arithmetic, and field-path validation errors.
//!
//! # Layout
//! - [`pb`]: code generated from `proto/berth/v1/*.proto` (tonic + prost), and the
//!   descriptor set for gRPC reflection.
//! - [`convert`]: hand-written conversions between `pb` messages and domain types, with
//!   errors that name the field.
//! - [`gpu`]: the GPU catalog ([`gpu::catalog`]) and request parsing ([`gpu::request`]).
//! - [`image`]: OCI image references, checked against the distribution grammar.
//! - [`network`]: sandbox network policies (none, egress to all, an allow-list of IPv4
//!   CIDRs and ports) and their wire form.
//! - [`node`]: node vocabulary (capacity type, taint effect).
//! - [`resources`]: CPU/memory/GPU amounts with overflow-checked arithmetic, and quantity
//!   parsing (`"1.5"`, `"500m"`, `"16GiB"`).
//! - [`validate`]: collects every problem with its field path (config files, requests).

pub mod convert;
pub mod gpu;
pub mod image;
pub mod network;
pub mod node;
pub mod pb;
pub mod resources;
pub mod validate;

pub use gpu::{GpuModel, GpuModelName, GpuRequest};
pub use image::ImageReference;
pub use resources::Resources;
pub use validate::{FieldError, FieldErrors, Validator};
