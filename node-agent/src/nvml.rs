//! The NVML side of a GPU inventory: one read of every device (UUID, model, memory, MIG
//! mode, compute capability, ECC errors), the XID events that mark a GPU unhealthy, and the
//! pure conversion of NVML's answers into the wire `Gpu`, which the tests drive without a
//! driver.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use berth_proto::GpuModelName;
use berth_proto::pb::v1 as pb;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet, Nvml};

use crate::inventory::InventoryError;
use crate::static_inventory::MAX_GPUS_PER_NODE;

/// Most XID events taken from NVML per read: a storm of events cannot stall a refresh, and
/// the rest wait in NVML's queue for the next one.
const MAX_XID_EVENTS_PER_POLL: usize = 256;
/// XIDs that the program running on the GPU causes (bad memory access, a killed context,
/// a timed-out kernel), not the GPU itself. Sandboxes run untrusted code, so these must not
/// take a GPU out of service, or any sandbox could do it at will. The same list as NVIDIA's
/// Kubernetes device plugin.
const APPLICATION_XIDS: &[u64] = &[13, 31, 43, 45, 68, 109];
/// What NVML reports when it does not know which XID happened.
const XID_UNKNOWN: u64 = 999;
/// `nvmlDeviceGetMigMode` values (`NVML_DEVICE_MIG_ENABLE`, `NVML_DEVICE_MIG_DISABLE` in
/// nvml.h; nvml-wrapper does not re-export them).
const NVML_MIG_ENABLE: u32 = 1;
const NVML_MIG_DISABLE: u32 = 0;

/// The NVML side of a [`GpuSource`].
pub(crate) struct NvmlGpus {
    nvml: &'static Nvml,
    /// `None` when no GPU supports XID events. The mutex only makes the source `Sync`
    /// (an `EventSet` is not); reads hold `&mut` and never lock.
    xid: Option<Mutex<XidWatch<'static>>>,
    /// GPUs a hardware XID marked unhealthy, with the reason; sticky.
    xid_unhealthy: HashMap<u32, String>,
    /// The last answer for each GPU, so one that stops answering keeps its identity.
    last_seen: HashMap<u32, pb::Gpu>,
    /// The query problems last logged for each GPU, so each is logged when it changes
    /// rather than at every refresh.
    logged_problems: HashMap<u32, String>,
}

impl NvmlGpus {
    pub(crate) fn new(nvml: &'static Nvml) -> NvmlGpus {
        NvmlGpus {
            nvml,
            xid: XidWatch::open(nvml).map(Mutex::new),
            xid_unhealthy: HashMap::new(),
            last_seen: HashMap::new(),
            logged_problems: HashMap::new(),
        }
    }

    /// (GPUs, driver version, CUDA version).
    pub(crate) fn read(&mut self) -> Result<(Vec<pb::Gpu>, String, String), InventoryError> {
        if let Some(watch) = &mut self.xid {
            let watch = watch.get_mut().unwrap_or_else(PoisonError::into_inner);
            for (index, xid) in watch.poll() {
                if !xid_marks_unhealthy(xid) {
                    tracing::info!(gpu = index, xid, "application xid; the GPU stays healthy");
                    continue;
                }
                let reason = xid_reason(xid);
                tracing::warn!(gpu = index, xid, %reason, "GPU marked unhealthy");
                self.xid_unhealthy.entry(index).or_insert(reason);
            }
        }
        let count = self
            .nvml
            .device_count()
            .map_err(|source| InventoryError::Nvml {
                query: "device count",
                source,
            })?;
        if count > MAX_GPUS_PER_NODE {
            return Err(InventoryError::TooManyGpus { count });
        }
        let driver_version = self.nvml.sys_driver_version().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "NVML driver version unknown");
            String::new()
        });
        let cuda_version = match self.nvml.sys_cuda_driver_version() {
            Ok(version) => cuda_version_string(version),
            Err(e) => {
                tracing::warn!(error = %e, "NVML CUDA version unknown");
                String::new()
            }
        };
        let mut gpus = Vec::with_capacity(count as usize);
        for index in 0..count {
            let report = DeviceReport::query(self.nvml, index);
            let xid_reason = self.xid_unhealthy.get(&index).map(String::as_str);
            let (gpu, problems) = gpu_from_report(report, xid_reason, self.last_seen.get(&index));
            let problems = problems.join("; ");
            if self.logged_problems.get(&index) != Some(&problems) {
                if !problems.is_empty() {
                    tracing::warn!(gpu = index, %problems, "NVML cannot read this GPU; reporting it unhealthy");
                }
                self.logged_problems.insert(index, problems);
            }
            self.last_seen.insert(index, gpu.clone());
            gpus.push(gpu);
        }
        Ok((gpus, driver_version, cuda_version))
    }
}

/// "12.4" from NVML's 12040.
fn cuda_version_string(version: i32) -> String {
    format!(
        "{}.{}",
        nvml_wrapper::cuda_driver_version_major(version),
        nvml_wrapper::cuda_driver_version_minor(version)
    )
}

/// What NVML answered about one device, each question with its own result, so the
/// conversion to `pb::Gpu` ([`gpu_from_report`]) is a pure function that tests can drive.
struct DeviceReport {
    index: u32,
    /// `Err` when NVML would not even hand out the device.
    answers: Result<DeviceAnswers, NvmlError>,
}

struct DeviceAnswers {
    uuid: Result<String, NvmlError>,
    product_name: Result<String, NvmlError>,
    memory_total_bytes: Result<u64, NvmlError>,
    mig_mode_current: Result<u32, NvmlError>,
    compute_capability: Result<(i32, i32), NvmlError>,
    uncorrected_ecc_errors_volatile: Result<u64, NvmlError>,
}

impl DeviceReport {
    fn query(nvml: &Nvml, index: u32) -> DeviceReport {
        let answers = nvml.device_by_index(index).map(|device| DeviceAnswers {
            uuid: device.uuid(),
            product_name: device.name(),
            memory_total_bytes: device.memory_info().map(|m| m.total),
            mig_mode_current: device.mig_mode().map(|m| m.current),
            compute_capability: device.cuda_compute_capability().map(|c| (c.major, c.minor)),
            uncorrected_ecc_errors_volatile: device
                .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
        });
        DeviceReport { index, answers }
    }
}

/// The wire GPU for one NVML device, and the query problems met (which also make it
/// unhealthy). `previous`, the last answer for this index, fills in what NVML no longer
/// answers, so a failing GPU keeps its UUID.
fn gpu_from_report(
    report: DeviceReport,
    xid_reason: Option<&str>,
    previous: Option<&pb::Gpu>,
) -> (pb::Gpu, Vec<String>) {
    let index = report.index;
    let mut problems = Vec::new();
    let answers = match report.answers {
        Ok(answers) => answers,
        Err(e) => {
            problems.push(format!("NVML device handle: {e}"));
            let mut gpu = previous.cloned().unwrap_or_else(|| pb::Gpu {
                index,
                uuid: format!("GPU-unreadable-{index}"),
                model: "unknown".into(),
                ..pb::Gpu::default()
            });
            set_health(&mut gpu, xid_reason, 0, &problems);
            return (gpu, problems);
        }
    };
    let uuid = answer(&mut problems, "uuid", answers.uuid)
        .or_else(|| previous.map(|p| p.uuid.clone()))
        .unwrap_or_else(|| format!("GPU-unreadable-{index}"));
    let (product_name, model) = match answer(&mut problems, "name", answers.product_name) {
        Some(name) => {
            let model = GpuModelName::from_nvml_product_name(&name)
                .as_str()
                .to_owned();
            (name, model)
        }
        None => previous.map_or_else(
            || (String::new(), "unknown".into()),
            |p| (p.product_name.clone(), p.model.clone()),
        ),
    };
    let memory_mib = answer(&mut problems, "memory info", answers.memory_total_bytes)
        .map(|bytes| bytes / (1024 * 1024))
        .or_else(|| previous.map(|p| p.memory_mib))
        .unwrap_or(0);
    let compute_capability = answer(
        &mut problems,
        "compute capability",
        answers.compute_capability,
    )
    .map(|(major, minor)| format!("{major}.{minor}"))
    .or_else(|| previous.map(|p| p.compute_capability.clone()))
    .unwrap_or_default();
    let mig_mode = match answers.mig_mode_current {
        Ok(NVML_MIG_ENABLE) => pb::MigMode::Enabled,
        Ok(NVML_MIG_DISABLE) => pb::MigMode::Disabled,
        Ok(other) => {
            problems.push(format!("NVML MIG mode: unknown value {other}"));
            pb::MigMode::Unspecified
        }
        Err(NvmlError::NotSupported) => pb::MigMode::Unsupported,
        Err(e) => {
            problems.push(format!("NVML MIG mode: {e}"));
            pb::MigMode::Unspecified
        }
    };
    let ecc_errors = match answers.uncorrected_ecc_errors_volatile {
        Ok(n) => n,
        // No ECC on this GPU, or ECC turned off.
        Err(NvmlError::NotSupported) => 0,
        Err(e) => {
            problems.push(format!("NVML ECC errors: {e}"));
            0
        }
    };
    let mut gpu = pb::Gpu {
        index,
        uuid,
        model,
        product_name,
        memory_mib,
        mig_mode: mig_mode.into(),
        compute_capability,
        ..pb::Gpu::default()
    };
    set_health(&mut gpu, xid_reason, ecc_errors, &problems);
    (gpu, problems)
}

/// The value, or `None` with the problem noted.
fn answer<T>(problems: &mut Vec<String>, what: &str, result: Result<T, NvmlError>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(e) => {
            problems.push(format!("NVML {what}: {e}"));
            None
        }
    }
}

/// Healthy unless a hardware XID, uncorrected ECC errors or a query problem says otherwise;
/// the reason lists them all, the XID first.
fn set_health(gpu: &mut pb::Gpu, xid_reason: Option<&str>, ecc_errors: u64, problems: &[String]) {
    let mut reasons: Vec<String> = xid_reason.map(str::to_owned).into_iter().collect();
    if ecc_errors > 0 {
        reasons.push(format!(
            "{ecc_errors} uncorrected ECC errors since the driver loaded"
        ));
    }
    reasons.extend(problems.iter().cloned());
    let health = if reasons.is_empty() {
        pb::GpuHealth::Healthy
    } else {
        pb::GpuHealth::Unhealthy
    };
    gpu.health = health.into();
    gpu.health_reason = reasons.join("; ");
}

/// Whether an XID means the GPU itself is in trouble (see [`APPLICATION_XIDS`]).
fn xid_marks_unhealthy(xid: u64) -> bool {
    !APPLICATION_XIDS.contains(&xid)
}

/// "xid 79: GPU has fallen off the bus".
fn xid_reason(xid: u64) -> String {
    let what = match xid {
        48 => "double-bit ECC error",
        63 => "ECC page retirement or row remapping recorded",
        64 => "ECC page retirement or row remapping failed",
        74 => "NVLink error",
        79 => "GPU has fallen off the bus",
        92 => "high single-bit ECC error rate",
        94 => "contained ECC error",
        95 => "uncontained ECC error",
        119 | 120 => "GSP firmware error",
        XID_UNKNOWN => "unknown XID",
        _ => "hardware error",
    };
    format!("xid {xid}: {what}")
}

/// NVML's critical-XID events for every GPU that supports them, polled without blocking.
pub struct XidWatch<'nvml> {
    events: EventSet<'nvml>,
    /// Device indices registered.
    watched: Vec<u32>,
}

impl<'nvml> XidWatch<'nvml> {
    /// Registers every GPU that supports XID events; `None` when none does (or NVML
    /// refuses an event set), which the log says.
    pub fn open(nvml: &'nvml Nvml) -> Option<XidWatch<'nvml>> {
        let count = match nvml.device_count() {
            Ok(count) => count.min(MAX_GPUS_PER_NODE),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch for XID errors: NVML device count");
                return None;
            }
        };
        let mut watched: Vec<u32> = (0..count)
            .filter(|&index| match nvml.device_by_index(index).and_then(|d| supports_xid(&d)) {
                Ok(supported) => supported,
                Err(e) => {
                    tracing::warn!(gpu = index, error = %e, "cannot watch this GPU for XID errors");
                    false
                }
            })
            .collect();
        // Registration consumes the set and frees it when a device refuses, so that device
        // is dropped and the set built again: at most one rebuild per GPU.
        while !watched.is_empty() {
            match register_all(nvml, &watched) {
                Ok(events) => {
                    tracing::debug!(gpus = ?watched, "watching for XID errors");
                    return Some(XidWatch { events, watched });
                }
                Err((Some(index), e)) => {
                    tracing::warn!(gpu = index, error = %e, "cannot watch this GPU for XID errors");
                    watched.retain(|&i| i != index);
                }
                Err((None, e)) => {
                    tracing::warn!(error = %e, "cannot watch for XID errors: NVML event set");
                    return None;
                }
            }
        }
        tracing::info!("no GPU here supports XID events; health comes from ECC counts only");
        None
    }

    /// The GPUs watched, by device index.
    pub fn watched(&self) -> &[u32] {
        &self.watched
    }

    /// The XID events since the last poll, as (device index, XID), without waiting; at most
    /// 256.
    pub fn poll(&mut self) -> Vec<(u32, u64)> {
        let mut seen = Vec::new();
        while seen.len() < MAX_XID_EVENTS_PER_POLL {
            let event = match self.events.wait(0) {
                Ok(event) => event,
                Err(NvmlError::Timeout) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "NVML XID event wait failed");
                    break;
                }
            };
            let xid = match event.event_data {
                Some(XidError::Value(xid)) => xid,
                Some(XidError::Unknown) => XID_UNKNOWN,
                None => continue,
            };
            match event.device.index() {
                Ok(index) => seen.push((index, xid)),
                Err(e) => tracing::warn!(xid, error = %e, "XID event from a GPU without an index"),
            }
        }
        seen
    }
}

/// Builds one event set with every device in `indices`; on failure, the device that refused
/// (`None`: the set itself).
fn register_all<'nvml>(
    nvml: &'nvml Nvml,
    indices: &[u32],
) -> Result<EventSet<'nvml>, (Option<u32>, NvmlError)> {
    let mut events = nvml.create_event_set().map_err(|e| (None, e))?;
    for &index in indices {
        let device = nvml.device_by_index(index).map_err(|e| (Some(index), e))?;
        events = register_xid(&device, events).map_err(|e| (Some(index), e))?;
    }
    Ok(events)
}

#[cfg(target_os = "linux")]
fn supports_xid(device: &Device<'_>) -> Result<bool, NvmlError> {
    device
        .supported_event_types()
        .map(|types| types.contains(EventTypes::CRITICAL_XID_ERROR))
}

#[cfg(target_os = "linux")]
fn register_xid<'nvml>(
    device: &Device<'nvml>,
    events: EventSet<'nvml>,
) -> Result<EventSet<'nvml>, NvmlError> {
    device
        .register_events(EventTypes::CRITICAL_XID_ERROR, events)
        .map_err(|e| e.error)
}

/// NVML events exist on Linux only.
#[cfg(not(target_os = "linux"))]
fn supports_xid(_device: &Device<'_>) -> Result<bool, NvmlError> {
    Ok(false)
}

#[cfg(not(target_os = "linux"))]
fn register_xid<'nvml>(
    _device: &Device<'nvml>,
    _events: EventSet<'nvml>,
) -> Result<EventSet<'nvml>, NvmlError> {
    Err(NvmlError::NotSupported)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(name: &str) -> DeviceAnswers {
        DeviceAnswers {
            uuid: Ok("GPU-0b9c1fd1-4b4e-7c3a-8d4f-5d2c6a4e3f21".into()),
            product_name: Ok(name.into()),
            memory_total_bytes: Ok(81559 * 1024 * 1024),
            mig_mode_current: Ok(NVML_MIG_DISABLE),
            compute_capability: Ok((9, 0)),
            uncorrected_ecc_errors_volatile: Ok(0),
        }
    }

    fn report(answers: DeviceAnswers) -> DeviceReport {
        DeviceReport {
            index: 3,
            answers: Ok(answers),
        }
    }

    #[test]
    fn nvml_product_names_map_to_catalog_models() {
        for (product, model) in [
            ("NVIDIA H100 80GB HBM3", "H100"),
            ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
            ("Tesla T4", "T4"),
            ("NVIDIA L4", "L4"),
            ("NVIDIA B200", "B200"),
            ("NVIDIA A10G", "A10"),
            ("NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"),
        ] {
            let (gpu, problems) = gpu_from_report(report(answers(product)), None, None);
            assert!(problems.is_empty(), "{problems:?}");
            assert_eq!(gpu.model, model, "{product}");
            assert_eq!(gpu.product_name, product);
        }
    }

    #[test]
    fn a_healthy_nvml_gpu() {
        let (gpu, problems) = gpu_from_report(report(answers("NVIDIA H100 80GB HBM3")), None, None);
        assert!(problems.is_empty());
        assert_eq!(
            gpu,
            pb::Gpu {
                index: 3,
                uuid: "GPU-0b9c1fd1-4b4e-7c3a-8d4f-5d2c6a4e3f21".into(),
                model: "H100".into(),
                product_name: "NVIDIA H100 80GB HBM3".into(),
                memory_mib: 81559,
                mig_mode: pb::MigMode::Disabled.into(),
                health: pb::GpuHealth::Healthy.into(),
                health_reason: String::new(),
                compute_capability: "9.0".into(),
                nvlink_peers: Vec::new(),
            }
        );
    }

    #[test]
    fn mig_modes() {
        for (mode, want) in [
            (Ok(NVML_MIG_ENABLE), pb::MigMode::Enabled),
            (Ok(NVML_MIG_DISABLE), pb::MigMode::Disabled),
            (Err(NvmlError::NotSupported), pb::MigMode::Unsupported),
        ] {
            let (gpu, problems) = gpu_from_report(
                report(DeviceAnswers {
                    mig_mode_current: mode,
                    ..answers("Tesla T4")
                }),
                None,
                None,
            );
            assert_eq!(gpu.mig_mode, i32::from(want));
            assert!(problems.is_empty());
            assert_eq!(gpu.health, i32::from(pb::GpuHealth::Healthy));
        }
    }

    #[test]
    fn ecc_errors_and_xids_make_a_gpu_unhealthy() {
        let unhealthy = i32::from(pb::GpuHealth::Unhealthy);
        let (gpu, _) = gpu_from_report(
            report(DeviceAnswers {
                uncorrected_ecc_errors_volatile: Ok(2),
                ..answers("NVIDIA H100 80GB HBM3")
            }),
            None,
            None,
        );
        assert_eq!(gpu.health, unhealthy);
        assert_eq!(
            gpu.health_reason,
            "2 uncorrected ECC errors since the driver loaded"
        );

        // No ECC on the device is not a problem.
        let (gpu, problems) = gpu_from_report(
            report(DeviceAnswers {
                uncorrected_ecc_errors_volatile: Err(NvmlError::NotSupported),
                ..answers("NVIDIA L4")
            }),
            None,
            None,
        );
        assert!(problems.is_empty());
        assert_eq!(gpu.health, i32::from(pb::GpuHealth::Healthy));

        let reason = xid_reason(79);
        assert_eq!(reason, "xid 79: GPU has fallen off the bus");
        let (gpu, problems) = gpu_from_report(report(answers("NVIDIA L4")), Some(&reason), None);
        assert!(problems.is_empty());
        assert_eq!(gpu.health, unhealthy);
        assert_eq!(gpu.health_reason, reason);
    }

    #[test]
    fn application_xids_do_not_make_a_gpu_unhealthy() {
        for xid in [13, 31, 43, 45, 68, 109] {
            assert!(!xid_marks_unhealthy(xid), "{xid}");
        }
        for xid in [48, 63, 64, 74, 79, 92, 94, 95, 119, XID_UNKNOWN] {
            assert!(xid_marks_unhealthy(xid), "{xid}");
        }
        assert_eq!(xid_reason(48), "xid 48: double-bit ECC error");
        assert_eq!(xid_reason(1234), "xid 1234: hardware error");
    }

    #[test]
    fn query_errors_mark_one_gpu_unhealthy_and_keep_its_identity() {
        let (good, _) = gpu_from_report(report(answers("NVIDIA A100-SXM4-80GB")), None, None);
        let (gpu, problems) = gpu_from_report(
            report(DeviceAnswers {
                uuid: Err(NvmlError::GpuLost),
                memory_total_bytes: Err(NvmlError::Unknown),
                ..answers("NVIDIA A100-SXM4-80GB")
            }),
            None,
            Some(&good),
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(gpu.uuid, good.uuid);
        assert_eq!(gpu.memory_mib, good.memory_mib);
        assert_eq!(gpu.model, "A100-80GB");
        assert_eq!(gpu.health, i32::from(pb::GpuHealth::Unhealthy));
        assert!(
            gpu.health_reason.starts_with("NVML uuid: "),
            "{}",
            gpu.health_reason
        );
        assert!(
            gpu.health_reason.contains("; NVML memory info: "),
            "{}",
            gpu.health_reason
        );

        // Without an earlier answer: a placeholder UUID, unique on the node.
        let (gpu, _) = gpu_from_report(
            report(DeviceAnswers {
                uuid: Err(NvmlError::GpuLost),
                ..answers("NVIDIA L4")
            }),
            None,
            None,
        );
        assert_eq!(gpu.uuid, "GPU-unreadable-3");

        // No device handle at all.
        let lost = DeviceReport {
            index: 3,
            answers: Err(NvmlError::GpuLost),
        };
        let (gpu, problems) = gpu_from_report(
            lost,
            Some("xid 79: GPU has fallen off the bus"),
            Some(&good),
        );
        assert_eq!(problems.len(), 1);
        assert_eq!(gpu.uuid, good.uuid);
        assert_eq!(gpu.model, "A100-80GB");
        assert_eq!(gpu.health, i32::from(pb::GpuHealth::Unhealthy));
        assert!(
            gpu.health_reason
                .starts_with("xid 79: GPU has fallen off the bus; NVML device handle: "),
            "{}",
            gpu.health_reason
        );
    }

    #[test]
    fn cuda_versions_read_like_nvidia_smi() {
        assert_eq!(cuda_version_string(12040), "12.4");
        assert_eq!(cuda_version_string(11080), "11.8");
        assert_eq!(cuda_version_string(13000), "13.0");
    }
}
