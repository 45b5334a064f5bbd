//! GPUs: the catalog of models and the request language.

pub mod catalog;
pub mod request;

pub use catalog::{CATALOG, GpuModel, GpuModelInfo, GpuModelName};
pub use request::{
    GPU_MILLI_PER_GPU, GpuAmount, GpuModelSelector, GpuOption, GpuRequest, GpuRequestError,
    GpuSpecError,
};
