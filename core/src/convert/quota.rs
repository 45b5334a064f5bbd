//! Tenant quotas, both ways.

use super::*;

/// Fields of `TenantQuota` in .proto order.
const QUOTA_FIELDS: &[&str] = &[
    "tenant",
    "max_concurrent_sandboxes",
    "max_gpus_per_model",
    "max_creates_per_second",
    "priority",
];

/// Validates and converts a quota; returns the tenant and its quota. `tenant` must be a
/// valid tenant name; `max_concurrent_sandboxes` 0 means unlimited (`None`); each key of
/// `max_gpus_per_model` must name a catalog model (canonical name or alias, any case, at
/// most once per model; e.g. `max_gpus_per_model["H10"]: ...` otherwise), and its whole
/// GPUs become milli-GPUs (x1000). A value of 0 forbids that model; absent models are
/// unlimited.
///
/// Not kept by the model (nothing enforces them yet): `max_creates_per_second` and
/// `priority` are accepted and dropped; [`quota_to_pb`] reports them as 0.
pub fn quota_from_pb(
    q: Option<&pb::TenantQuota>,
    field: &str,
) -> Result<(String, TenantQuota), FieldErrors> {
    let q = q.ok_or_else(|| missing(field))?;
    let mut problems = Validator::new();
    problems.identifier("tenant", &q.tenant, limits::TENANT_LEN);
    // Sorted, so the errors come in the same order every time.
    let mut entries: Vec<(&String, &u32)> = q.max_gpus_per_model.iter().collect();
    entries.sort();
    let mut seen: BTreeMap<GpuModel, &str> = BTreeMap::new();
    let mut max_gpu_milli_per_model = BTreeMap::new();
    for (name, gpus) in entries {
        let path = format!("max_gpus_per_model[{name:?}]");
        match GpuModel::from_name(name) {
            None => problems.error(
                &path,
                format!(
                    "{name:?} is not a GPU model of the catalog ({})",
                    GpuModel::ALL.map(GpuModel::name).join(", ")
                ),
            ),
            Some(model) => {
                if let Some(first) = seen.insert(model, name) {
                    problems.error(
                        &path,
                        format!("{name:?} and {first:?} are both the model {model}"),
                    );
                } else {
                    max_gpu_milli_per_model
                        .insert(GpuModelName::Known(model), u64::from(*gpus) * 1000);
                }
            }
        }
    }
    problems.sort_by_fields(QUOTA_FIELDS);
    problems.finish_under(field)?;
    let quota = TenantQuota {
        max_concurrent_sandboxes: (q.max_concurrent_sandboxes > 0)
            .then_some(q.max_concurrent_sandboxes),
        max_gpu_milli_per_model,
    };
    Ok((q.tenant.clone(), quota))
}

/// A tenant's quota on the wire. Milli-GPU limits are shown in whole GPUs, rounded down
/// (limits set through the API are always whole). `max_creates_per_second` and `priority`
/// are 0: the model does not keep them.
pub fn quota_to_pb(tenant: &str, quota: &TenantQuota) -> pb::TenantQuota {
    pb::TenantQuota {
        tenant: tenant.to_owned(),
        max_concurrent_sandboxes: quota.max_concurrent_sandboxes.unwrap_or(0),
        max_gpus_per_model: quota
            .max_gpu_milli_per_model
            .iter()
            .map(|(model, milli)| {
                (
                    model.as_str().to_owned(),
                    u32::try_from(milli / 1000).unwrap_or(u32::MAX),
                )
            })
            .collect(),
        max_creates_per_second: 0,
        priority: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::fixtures::*;

    #[test]
    fn quota_round_trips() {
        let wire = pb::TenantQuota {
            tenant: "acme".into(),
            max_concurrent_sandboxes: 50,
            max_gpus_per_model: HashMap::from([("H100".into(), 8), ("A100-80GB".into(), 0)]),
            max_creates_per_second: 0,
            priority: 0,
        };
        let (tenant, quota) = quota_from_pb(Some(&wire), "quota").expect("valid");
        assert_eq!(tenant, "acme");
        assert_eq!(
            quota,
            TenantQuota {
                max_concurrent_sandboxes: Some(50),
                max_gpu_milli_per_model: BTreeMap::from([
                    (GpuModelName::Known(GpuModel::A100_80GB), 0),
                    (GpuModelName::Known(GpuModel::H100), 8000),
                ]),
            }
        );
        assert_eq!(quota_to_pb(&tenant, &quota), wire);

        // Aliases resolve to the canonical name; 0 concurrent is unlimited; the fields the
        // model does not keep come back as 0.
        let wire = pb::TenantQuota {
            tenant: "t".into(),
            max_concurrent_sandboxes: 0,
            max_gpus_per_model: HashMap::from([("a10g".into(), 2)]),
            max_creates_per_second: 100,
            priority: 5,
        };
        let (tenant, quota) = quota_from_pb(Some(&wire), "quota").expect("valid");
        assert_eq!(quota.max_concurrent_sandboxes, None);
        assert_eq!(
            quota_to_pb(&tenant, &quota),
            pb::TenantQuota {
                tenant: "t".into(),
                max_concurrent_sandboxes: 0,
                max_gpus_per_model: HashMap::from([("A10".into(), 2)]),
                max_creates_per_second: 0,
                priority: 0,
            }
        );
    }

    #[test]
    fn quota_errors_name_tenant_and_model_keys() {
        let err = quota_from_pb(None, "quota").expect_err("absent");
        assert_eq!(message(&err), "quota: must be set");
        let wire = pb::TenantQuota {
            tenant: String::new(),
            max_concurrent_sandboxes: 1,
            max_gpus_per_model: HashMap::from([
                ("H10".into(), 1),
                ("H100".into(), 1),
                ("h100".into(), 2),
            ]),
            max_creates_per_second: 0,
            priority: 0,
        };
        let err = quota_from_pb(Some(&wire), "quota").expect_err("bad");
        assert_eq!(
            message(&err),
            [
                "quota.tenant: must be set",
                "quota.max_gpus_per_model[\"H10\"]: \"H10\" is not a GPU model of the catalog \
             (T4, L4, A10, L40S, A100-40GB, A100-80GB, RTX-PRO-6000, H100, H200, B200)",
                "quota.max_gpus_per_model[\"h100\"]: \"h100\" and \"H100\" are both the model H100",
            ]
            .join("; ")
        );
    }
}
