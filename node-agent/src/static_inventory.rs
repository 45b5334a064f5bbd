//! Static GPU inventory files: a TOML list of GPU groups that stands in for NVML on machines
//! without an NVIDIA driver (dev mode, the local autoscaler provider, CI).
//!
//! ```toml
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

/// A static inventory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticInventory {
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

    /// The GPUs in device-index order: (model, memory MiB).
    pub fn devices(&self) -> Vec<(GpuModelName, u64)> {
        self.gpus
            .iter()
            .flat_map(|group| {
                let model = GpuModelName::resolve(&group.product_name);
                let memory = group
                    .memory_mib
                    .or_else(|| model.known().map(|m| m.info().memory_mib))
                    .unwrap_or(0);
                (0..group.count).map(move |_| (model.clone(), memory))
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
        assert_eq!(devices[0], (GpuModel::L4.into(), 24 * 1024));
        assert_eq!(devices[2].0, GpuModel::T4.into());
    }

    #[test]
    fn problems_are_named() {
        let inventory = StaticInventory {
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
        assert_eq!(fields, ["gpus", "gpus[0].count", "gpus[0].memory_mib"]);
    }
}
