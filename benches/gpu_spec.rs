//! GPU request parsing and NVML name lookup: both sit on the create and register paths.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

use berth_proto::{GpuModelName, GpuRequest};

fn parse(c: &mut Criterion) {
    c.bench_function("gpu_request_parse_fallback_list", |b| {
        b.iter(|| GpuRequest::parse(black_box(&["H100!:8", "A100-80GB:8", "any:500m"]), None))
    });
    c.bench_function("gpu_model_from_nvml_product_name", |b| {
        b.iter(|| GpuModelName::from_nvml_product_name(black_box("NVIDIA H100 80GB HBM3")))
    });
}

criterion_group!(benches, parse);
criterion_main!(benches);
