//! The GPU catalog: canonical models, their specifications, and the NVML product names that
//! map to each.
//!
//! A name that is not in the catalog (an older GPU, an AMD part, a trace's synthetic model)
//! is kept verbatim as [`GpuModelName::Other`] and is schedulable by exact name only.
//!
//! "Strictly better" (used for optional upgrades) is Pareto dominance over memory, memory
//! bandwidth, dense FP16 tensor throughput and compute capability: a model is an upgrade of
//! another only when it is at least as good on every axis and better on one. Compute
//! capability is an axis because a binary built for `sm_90` does not run on `sm_80`; memory
//! bandwidth is one because an L40S is not a drop-in for an A100's HBM.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A canonical GPU model of the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum GpuModel {
    /// NVIDIA T4 (Turing, 16 GB).
    T4,
    /// NVIDIA L4 (Ada, 24 GB).
    L4,
    /// NVIDIA A10 / A10G (Ampere GA102, 24 GB).
    A10,
    /// NVIDIA L40S (Ada, 48 GB).
    L40S,
    /// NVIDIA A100 40 GB (SXM4 or PCIe).
    #[serde(rename = "A100-40GB")]
    A100_40GB,
    /// NVIDIA A100 80 GB (SXM4 or PCIe).
    #[serde(rename = "A100-80GB")]
    A100_80GB,
    /// NVIDIA RTX PRO 6000 Blackwell (96 GB).
    #[serde(rename = "RTX-PRO-6000")]
    RtxPro6000,
    /// NVIDIA H100 (SXM, PCIe or NVL).
    H100,
    /// NVIDIA H200 (141 GB).
    H200,
    /// NVIDIA B200 (180 GB).
    B200,
}

/// Specification of one catalog model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuModelInfo {
    /// The model.
    pub model: GpuModel,
    /// Canonical name, as written in requests and reports ("A100-80GB").
    pub name: &'static str,
    /// Other names accepted in requests (matched without regard to case).
    pub aliases: &'static [&'static str],
    /// Nominal memory per GPU in MiB (what NVML reports is slightly less).
    pub memory_mib: u64,
    /// Memory bandwidth in GB/s (SXM part where there are several).
    pub memory_bandwidth_gb_per_s: u32,
    /// Dense FP16 tensor throughput in TFLOPS (SXM part where there are several).
    pub fp16_dense_tflops: u32,
    /// CUDA compute capability (major, minor).
    pub compute_capability: (u8, u8),
    /// Architecture name.
    pub architecture: &'static str,
    /// Product names as NVML's `nvmlDeviceGetName` reports them.
    pub nvml_product_names: &'static [&'static str],
}

const GIB: u64 = 1024;

/// Every catalog model, weakest first (the order of [`GpuModel`]).
pub const CATALOG: &[GpuModelInfo] = &[
    GpuModelInfo {
        model: GpuModel::T4,
        name: "T4",
        aliases: &[],
        memory_mib: 16 * GIB,
        memory_bandwidth_gb_per_s: 320,
        fp16_dense_tflops: 65,
        compute_capability: (7, 5),
        architecture: "Turing",
        nvml_product_names: &["Tesla T4", "NVIDIA T4"],
    },
    GpuModelInfo {
        model: GpuModel::L4,
        name: "L4",
        aliases: &[],
        memory_mib: 24 * GIB,
        memory_bandwidth_gb_per_s: 300,
        fp16_dense_tflops: 121,
        compute_capability: (8, 9),
        architecture: "Ada Lovelace",
        nvml_product_names: &["NVIDIA L4"],
    },
    GpuModelInfo {
        model: GpuModel::A10,
        name: "A10",
        aliases: &["A10G"],
        memory_mib: 24 * GIB,
        memory_bandwidth_gb_per_s: 600,
        fp16_dense_tflops: 125,
        compute_capability: (8, 6),
        architecture: "Ampere",
        nvml_product_names: &["NVIDIA A10", "NVIDIA A10G"],
    },
    GpuModelInfo {
        model: GpuModel::L40S,
        name: "L40S",
        aliases: &[],
        memory_mib: 48 * GIB,
        memory_bandwidth_gb_per_s: 864,
        fp16_dense_tflops: 362,
        compute_capability: (8, 9),
        architecture: "Ada Lovelace",
        nvml_product_names: &["NVIDIA L40S"],
    },
    GpuModelInfo {
        model: GpuModel::A100_40GB,
        name: "A100-40GB",
        aliases: &["A100", "A100-40G"],
        memory_mib: 40 * GIB,
        memory_bandwidth_gb_per_s: 1555,
        fp16_dense_tflops: 312,
        compute_capability: (8, 0),
        architecture: "Ampere",
        nvml_product_names: &[
            "NVIDIA A100-SXM4-40GB",
            "NVIDIA A100-PCIE-40GB",
            "NVIDIA A100 40GB PCIe",
        ],
    },
    GpuModelInfo {
        model: GpuModel::A100_80GB,
        name: "A100-80GB",
        aliases: &["A100-80G"],
        memory_mib: 80 * GIB,
        memory_bandwidth_gb_per_s: 2039,
        fp16_dense_tflops: 312,
        compute_capability: (8, 0),
        architecture: "Ampere",
        nvml_product_names: &[
            "NVIDIA A100-SXM4-80GB",
            "NVIDIA A100 80GB PCIe",
            "NVIDIA A100-PCIE-80GB",
        ],
    },
    GpuModelInfo {
        model: GpuModel::RtxPro6000,
        name: "RTX-PRO-6000",
        aliases: &["RTX-PRO-6000-BLACKWELL"],
        memory_mib: 96 * GIB,
        memory_bandwidth_gb_per_s: 1792,
        fp16_dense_tflops: 503,
        compute_capability: (12, 0),
        architecture: "Blackwell",
        nvml_product_names: &[
            "NVIDIA RTX PRO 6000 Blackwell Server Edition",
            "NVIDIA RTX PRO 6000 Blackwell Workstation Edition",
            "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition",
        ],
    },
    GpuModelInfo {
        model: GpuModel::H100,
        name: "H100",
        aliases: &[],
        memory_mib: 80 * GIB,
        memory_bandwidth_gb_per_s: 3350,
        fp16_dense_tflops: 989,
        compute_capability: (9, 0),
        architecture: "Hopper",
        nvml_product_names: &[
            "NVIDIA H100 80GB HBM3",
            "NVIDIA H100 PCIe",
            "NVIDIA H100 NVL",
            "NVIDIA H100",
        ],
    },
    GpuModelInfo {
        model: GpuModel::H200,
        name: "H200",
        aliases: &[],
        memory_mib: 141 * GIB,
        memory_bandwidth_gb_per_s: 4800,
        fp16_dense_tflops: 989,
        compute_capability: (9, 0),
        architecture: "Hopper",
        nvml_product_names: &["NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA H200 141GB HBM3e"],
    },
    GpuModelInfo {
        model: GpuModel::B200,
        name: "B200",
        aliases: &[],
        memory_mib: 180 * GIB,
        memory_bandwidth_gb_per_s: 8000,
        fp16_dense_tflops: 2250,
        compute_capability: (10, 0),
        architecture: "Blackwell",
        nvml_product_names: &["NVIDIA B200"],
    },
];

impl GpuModel {
    /// Every model, weakest first.
    pub const ALL: [GpuModel; 10] = [
        GpuModel::T4,
        GpuModel::L4,
        GpuModel::A10,
        GpuModel::L40S,
        GpuModel::A100_40GB,
        GpuModel::A100_80GB,
        GpuModel::RtxPro6000,
        GpuModel::H100,
        GpuModel::H200,
        GpuModel::B200,
    ];

    /// The catalog entry of this model.
    pub fn info(self) -> &'static GpuModelInfo {
        // CATALOG is in the declaration order of GpuModel; a unit test checks it.
        &CATALOG[self as usize]
    }

    /// Canonical name ("A100-80GB").
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Looks up a canonical name or alias, ignoring ASCII case.
    pub fn from_name(name: &str) -> Option<GpuModel> {
        let name = name.trim();
        CATALOG
            .iter()
            .find(|info| {
                info.name.eq_ignore_ascii_case(name)
                    || info.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
            })
            .map(|info| info.model)
    }

    /// Maps an NVML product name to its model. Case and runs of white space are ignored.
    pub fn from_nvml_product_name(product_name: &str) -> Option<GpuModel> {
        let wanted = normalize_product_name(product_name);
        CATALOG
            .iter()
            .find(|info| {
                info.nvml_product_names
                    .iter()
                    .any(|p| normalize_product_name(p) == wanted)
            })
            .map(|info| info.model)
    }

    /// True when `self` can stand in for `other`: at least as good on memory, bandwidth,
    /// FP16 throughput and compute capability, and not the same model.
    pub fn strictly_better_than(self, other: GpuModel) -> bool {
        let (a, b) = (self.info(), other.info());
        self != other
            && a.memory_mib >= b.memory_mib
            && a.memory_bandwidth_gb_per_s >= b.memory_bandwidth_gb_per_s
            && a.fp16_dense_tflops >= b.fp16_dense_tflops
            && a.compute_capability >= b.compute_capability
    }
}

impl fmt::Display for GpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

fn normalize_product_name(name: &str) -> String {
    name.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase()
}

/// The model of a GPU as berth knows it: a catalog model, or any other name kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum GpuModelName {
    /// A model in the catalog.
    Known(GpuModel),
    /// A name not in the catalog, exactly as given (trimmed). Matches only itself.
    Other(String),
}

impl GpuModelName {
    /// Resolves a name written by a person or a file: a canonical name or alias first, then
    /// an NVML product name, else the name verbatim.
    pub fn resolve(name: &str) -> GpuModelName {
        let trimmed = name.trim();
        GpuModel::from_name(trimmed)
            .or_else(|| GpuModel::from_nvml_product_name(trimmed))
            .map_or_else(
                || GpuModelName::Other(trimmed.to_owned()),
                GpuModelName::Known,
            )
    }

    /// Resolves what NVML reported for a device: a known product name, else (as
    /// [`GpuModelName::resolve`]) a catalog name, else the product name verbatim. An `Other`
    /// never holds a name the catalog knows, so the serialised form round-trips.
    pub fn from_nvml_product_name(product_name: &str) -> GpuModelName {
        GpuModel::from_nvml_product_name(product_name)
            .map_or_else(|| GpuModelName::resolve(product_name), GpuModelName::Known)
    }

    /// The catalog model, if any.
    pub fn known(&self) -> Option<GpuModel> {
        match self {
            GpuModelName::Known(m) => Some(*m),
            GpuModelName::Other(_) => None,
        }
    }

    /// The name as written in reports: canonical for known models, verbatim otherwise.
    pub fn as_str(&self) -> &str {
        match self {
            GpuModelName::Known(m) => m.name(),
            GpuModelName::Other(s) => s,
        }
    }
}

impl fmt::Display for GpuModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<GpuModel> for GpuModelName {
    fn from(m: GpuModel) -> Self {
        GpuModelName::Known(m)
    }
}

impl From<String> for GpuModelName {
    fn from(s: String) -> Self {
        GpuModelName::resolve(&s)
    }
}

impl From<GpuModelName> for String {
    fn from(m: GpuModelName) -> Self {
        match m {
            GpuModelName::Known(m) => m.name().to_owned(),
            GpuModelName::Other(s) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_is_in_enum_order_and_names_are_unique() {
        for (i, model) in GpuModel::ALL.iter().enumerate() {
            assert_eq!(CATALOG[i].model, *model);
            assert_eq!(model.info().model, *model);
        }
        let mut names: Vec<String> = CATALOG
            .iter()
            .flat_map(|i| std::iter::once(i.name).chain(i.aliases.iter().copied()))
            .map(str::to_ascii_lowercase)
            .collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "a name or alias is listed twice");
    }

    #[test]
    fn real_nvml_product_names_map_to_their_model() {
        let cases = [
            ("Tesla T4", GpuModel::T4),
            ("NVIDIA L4", GpuModel::L4),
            ("NVIDIA A10", GpuModel::A10),
            ("NVIDIA A10G", GpuModel::A10),
            ("NVIDIA L40S", GpuModel::L40S),
            ("NVIDIA A100-SXM4-40GB", GpuModel::A100_40GB),
            ("NVIDIA A100-PCIE-40GB", GpuModel::A100_40GB),
            ("NVIDIA A100-SXM4-80GB", GpuModel::A100_80GB),
            ("NVIDIA A100 80GB PCIe", GpuModel::A100_80GB),
            ("NVIDIA H100 80GB HBM3", GpuModel::H100),
            ("NVIDIA H100 PCIe", GpuModel::H100),
            ("NVIDIA H100 NVL", GpuModel::H100),
            ("NVIDIA H200", GpuModel::H200),
            ("NVIDIA B200", GpuModel::B200),
            (
                "NVIDIA RTX PRO 6000 Blackwell Server Edition",
                GpuModel::RtxPro6000,
            ),
        ];
        for (product, model) in cases {
            assert_eq!(
                GpuModel::from_nvml_product_name(product),
                Some(model),
                "{product}"
            );
            assert_eq!(
                GpuModelName::from_nvml_product_name(product),
                GpuModelName::Known(model)
            );
        }
        // Case and white space do not matter; the string is otherwise exact.
        assert_eq!(
            GpuModel::from_nvml_product_name("  nvidia   h100 80gb hbm3 "),
            Some(GpuModel::H100)
        );
    }

    #[test]
    fn unknown_product_names_are_kept_verbatim() {
        for name in [
            "Tesla V100-SXM2-16GB",
            "NVIDIA L40",
            "AMD Instinct MI300X",
            "G2",
        ] {
            assert_eq!(
                GpuModelName::from_nvml_product_name(name),
                GpuModelName::Other(name.to_owned())
            );
            assert_eq!(GpuModelName::resolve(name).as_str(), name);
        }
        // "NVIDIA L40" is not an L40S, nor "NVIDIA A10" an A100.
        assert_eq!(GpuModel::from_nvml_product_name("NVIDIA L40"), None);
        assert_eq!(
            GpuModel::from_nvml_product_name("NVIDIA A10"),
            Some(GpuModel::A10)
        );
    }

    #[test]
    fn names_and_aliases_resolve_without_case() {
        assert_eq!(GpuModel::from_name("h100"), Some(GpuModel::H100));
        assert_eq!(GpuModel::from_name("a100"), Some(GpuModel::A100_40GB));
        assert_eq!(GpuModel::from_name("A100-80gb"), Some(GpuModel::A100_80GB));
        assert_eq!(
            GpuModel::from_name("rtx-pro-6000"),
            Some(GpuModel::RtxPro6000)
        );
        assert_eq!(GpuModel::from_name("H10"), None);
        assert_eq!(
            GpuModelName::resolve("NVIDIA B200"),
            GpuModelName::Known(GpuModel::B200)
        );
    }

    #[test]
    fn upgrades_are_pareto_dominance() {
        use GpuModel::*;
        assert!(H200.strictly_better_than(H100));
        assert!(B200.strictly_better_than(H200));
        assert!(A100_80GB.strictly_better_than(A100_40GB));
        assert!(H100.strictly_better_than(A100_80GB));
        assert!(!H100.strictly_better_than(H100));
        assert!(!H100.strictly_better_than(H200));
        // An L40S lacks an A100's memory bandwidth; an A100 lacks an L4's compute capability.
        assert!(!L40S.strictly_better_than(A100_40GB));
        assert!(!A100_40GB.strictly_better_than(L4));
        // Dominance is a strict partial order: irreflexive and antisymmetric.
        for a in GpuModel::ALL {
            for b in GpuModel::ALL {
                assert!(!(a.strictly_better_than(b) && b.strictly_better_than(a)));
            }
        }
    }

    #[test]
    fn other_never_holds_a_catalog_name() {
        // A catalog name given where a product name was expected still resolves, so the
        // serialised form (a string, read back with `resolve`) round-trips.
        assert_eq!(
            GpuModelName::from_nvml_product_name("H100"),
            GpuModelName::Known(GpuModel::H100)
        );
        for name in ["H100", "NVIDIA H100 PCIe", "G2", "Tesla V100-SXM2-16GB"] {
            let model = GpuModelName::from_nvml_product_name(name);
            assert_eq!(
                GpuModelName::from(String::from(model.clone())),
                model,
                "{name}"
            );
        }
    }

    #[test]
    fn model_names_serialize_as_strings() {
        let name: GpuModelName = "a100-80gb".to_owned().into();
        assert_eq!(name, GpuModelName::Known(GpuModel::A100_80GB));
        assert_eq!(String::from(name), "A100-80GB");
    }
}
