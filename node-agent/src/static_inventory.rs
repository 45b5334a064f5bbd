//! Static GPU inventory files: a TOML list of GPU groups that stands in for NVML on machines
//! without an NVIDIA driver (dev mode, the local autoscaler provider, CI).
//!
//! ```toml
//! cpu_milli = 192000                        # optional: the box's CPU, else the host's
//! memory_mib = 2097152                      # optional: the box's memory, else the host's
//!
//! [[gpus]]
//! product_name = "NVIDIA H100 80GB HBM3"   # as NVML would report it
//! memory_mib = 81559                        # optional for catalog models
//! count = 8                                 # default 1
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use berth_proto::gpu::request::MAX_GPUS_PER_SANDBOX;
use berth_proto::{FieldErrors, GpuModelName, Validator};

/// Most GPUs one node may report (the largest HGX boards carry 16).
pub const MAX_GPUS_PER_NODE: u32 = MAX_GPUS_PER_SANDBOX;
/// Largest static inventory file read.
const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Most CPU a static file may claim: 4096 vCPUs, above any single machine sold today. The
/// bound catches unit slips (cores written as millicores twice over).
pub const MAX_CPU_MILLI: u64 = 4096 * 1000;
/// Most memory a static file may claim: 64 TiB, above any single machine sold today. The
/// bound catches unit slips (bytes or KiB written where MiB are meant).
pub const MAX_MEMORY_MIB: u64 = 64 * 1024 * 1024;

/// A static inventory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticInventory {
    /// CPU of the machine this file stands in for, in millicores (192 vCPUs = 192000);
    /// unset means the host's own.
    #[serde(default)]
    pub cpu_milli: Option<u64>,
    /// Memory of the machine this file stands in for, in MiB (2 TiB = 2097152); unset means
    /// the host's own.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Groups of identical GPUs, in device-index order.
    pub gpus: Vec<StaticGpuGroup>,
}

/// `count` identical GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticGpuGroup {
    /// Product name as NVML reports it ("NVIDIA L4"), or a catalog name ("L4").
    pub product_name: String,
    /// Memory per GPU; defaults to the catalog's figure for known models.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// How many.
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// One GPU of a static inventory, at its device index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticDevice<'a> {
    /// The group's product name, trimmed.
    pub product_name: &'a str,
    /// The catalog model it resolves to, or the name verbatim.
    pub model: GpuModelName,
    /// Memory, from the file or else the catalog (0 only for a file that failed validation).
    pub memory_mib: u64,
}

/// Why a static inventory file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StaticInventoryError {
    /// Unreadable.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Too large to be an inventory.
    #[error("{path} is {size} bytes; a static inventory is at most {MAX_FILE_BYTES}")]
    TooLarge {
        /// File.
        path: String,
        /// Its size.
        size: u64,
    },
    /// Not valid TOML of this shape.
    #[error("{path}: {source}")]
    Parse {
        /// File.
        path: String,
        /// Cause.
        source: Box<toml::de::Error>,
    },
    /// Parsed, but wrong.
    #[error("{path}: {errors}")]
    Invalid {
        /// File.
        path: String,
        /// Every problem.
        errors: FieldErrors,
    },
}

impl StaticInventory {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<StaticInventory, StaticInventoryError> {
        let name = path.display().to_string();
        let read = |source| StaticInventoryError::Read {
            path: name.clone(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read)?.len();
        if size > MAX_FILE_BYTES {
            return Err(StaticInventoryError::TooLarge { path: name, size });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let inventory: StaticInventory =
            toml::from_str(&text).map_err(|source| StaticInventoryError::Parse {
                path: name.clone(),
                source: Box::new(source),
            })?;
        let mut v = Validator::new();
        inventory.validate(&mut v);
        v.finish()
            .map_err(|errors| StaticInventoryError::Invalid { path: name, errors })?;
        Ok(inventory)
    }

    /// Records every problem.
    pub fn validate(&self, v: &mut Validator) {
        if let Some(cpu_milli) = self.cpu_milli {
            v.check(
                (1..=MAX_CPU_MILLI).contains(&cpu_milli),
                "cpu_milli",
                || {
                    format!(
                        "{cpu_milli} is outside 1..={MAX_CPU_MILLI} (millicores: 8 vCPUs = 8000)"
                    )
                },
            );
        }
        if let Some(memory_mib) = self.memory_mib {
            v.check(
                (1..=MAX_MEMORY_MIB).contains(&memory_mib),
                "memory_mib",
                || format!("{memory_mib} is outside 1..={MAX_MEMORY_MIB} (MiB: 32 GiB = 32768)"),
            );
        }
        let total: u64 = self.gpus.iter().map(|g| u64::from(g.count)).sum();
        v.check(total <= u64::from(MAX_GPUS_PER_NODE), "gpus", || {
            format!("{total} GPUs in all; the limit is {MAX_GPUS_PER_NODE} per node")
        });
        for (i, group) in self.gpus.iter().enumerate() {
            v.nested(format!("gpus[{i}]"), |v| {
                v.check(
                    !group.product_name.trim().is_empty(),
                    "product_name",
                    || "must be set".into(),
                );
                v.check(group.count >= 1, "count", || "must be at least 1".into());
                let known = GpuModelName::resolve(&group.product_name).known();
                match (group.memory_mib, known) {
                    (Some(0), _) => v.error("memory_mib", "must be > 0"),
                    (None, None) => v.error(
                        "memory_mib",
                        format!(
                            "must be set: {:?} is not a catalog model, so its memory is unknown",
                            group.product_name
                        ),
                    ),
                    _ => {}
                }
            });
        }
    }

    /// The GPUs in device-index order, with the product name each was listed under.
    pub fn devices(&self) -> Vec<StaticDevice<'_>> {
        self.gpus
            .iter()
            .flat_map(|group| {
                let product_name = group.product_name.trim();
                let model = GpuModelName::resolve(product_name);
                let memory_mib = group
                    .memory_mib
                    .or_else(|| model.known().map(|m| m.info().memory_mib))
                    .unwrap_or(0);
                (0..group.count).map(move |_| StaticDevice {
                    product_name,
                    model: model.clone(),
                    memory_mib,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::GpuModel;

    #[test]
    fn groups_expand_in_order_with_catalog_memory() {
        let inventory: StaticInventory = toml::from_str(
            "[[gpus]]\nproduct_name = \"NVIDIA L4\"\ncount = 2\n[[gpus]]\nproduct_name = \"Tesla T4\"\n",
        )
        .expect("parses");
        let devices = inventory.devices();
        assert_eq!(devices.len(), 3);
        assert_eq!(
            (devices[0].model.clone(), devices[0].memory_mib),
            (GpuModel::L4.into(), 24 * 1024)
        );
        assert_eq!(devices[2].model, GpuModel::T4.into());
    }

    #[test]
    fn problems_are_named() {
        let inventory = StaticInventory {
            cpu_milli: Some(0),
            memory_mib: Some(MAX_MEMORY_MIB + 1),
            gpus: vec![
                StaticGpuGroup {
                    product_name: "Mystery GPU".into(),
                    memory_mib: None,
                    count: 0,
                },
                StaticGpuGroup {
                    product_name: "H100".into(),
                    memory_mib: None,
                    count: 17,
                },
            ],
        };
        let mut v = Validator::new();
        inventory.validate(&mut v);
        let fields: Vec<String> = v
            .finish()
            .expect_err("bad")
            .0
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            [
                "cpu_milli",
                "memory_mib",
                "gpus",
                "gpus[0].count",
                "gpus[0].memory_mib"
            ]
        );
    }

    #[test]
    fn machine_cpu_and_memory_are_optional() {
        let bare: StaticInventory =
            toml::from_str("[[gpus]]\nproduct_name = \"NVIDIA L4\"\n").expect("parses");
        assert_eq!((bare.cpu_milli, bare.memory_mib), (None, None));
        let whole: StaticInventory = toml::from_str(
            "cpu_milli = 8000\nmemory_mib = 32768\n[[gpus]]\nproduct_name = \"NVIDIA L4\"\n",
        )
        .expect("parses");
        assert_eq!(
            (whole.cpu_milli, whole.memory_mib),
            (Some(8000), Some(32768))
        );
        let mut v = Validator::new();
        whole.validate(&mut v);
        v.finish().expect("valid");
        assert!(
            toml::from_str::<StaticInventory>("cpus = 8\n[[gpus]]\nproduct_name = \"L4\"\n")
                .is_err(),
            "unknown fields are refused"
        );
    }

    #[test]
    fn devices_keep_the_listed_product_name() {
        let inventory: StaticInventory = toml::from_str(
            "[[gpus]]\nproduct_name = \" NVIDIA A10G \"\ncount = 2\n[[gpus]]\nproduct_name = \"Mystery\"\nmemory_mib = 1000\n",
        )
        .expect("parses");
        let devices = inventory.devices();
        assert_eq!(devices.len(), 3);
        assert_eq!(devices[1].product_name, "NVIDIA A10G");
        assert_eq!(devices[1].model, GpuModel::A10.into());
        assert_eq!(devices[1].memory_mib, 24 * 1024);
        assert_eq!(devices[2].model, GpuModelName::Other("Mystery".into()));
        assert_eq!(devices[2].memory_mib, 1000);
    }

    /// Every shipped example loads, and says what machine it stands in for.
    #[test]
    fn example_inventories_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/inventories");
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("examples folder") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let inventory = StaticInventory::load(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(
                    inventory.cpu_milli.is_some(),
                    "{}: cpu_milli",
                    path.display()
                );
                assert!(
                    inventory.memory_mib.is_some(),
                    "{}: memory_mib",
                    path.display()
                );
                let name = path
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned();
                seen.push((name, inventory));
            }
        }
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        let summary: Vec<(&str, usize, Option<GpuModel>)> = seen
            .iter()
            .map(|(name, inv)| {
                let devices = inv.devices();
                (name.as_str(), devices.len(), devices[0].model.known())
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("1xl4.toml", 1, Some(GpuModel::L4)),
                ("4xt4.toml", 4, Some(GpuModel::T4)),
                ("8xb200.toml", 8, Some(GpuModel::B200)),
                ("8xh100.toml", 8, Some(GpuModel::H100)),
            ]
        );
    }
}
