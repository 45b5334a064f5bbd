//! `[scheduler.sessions]`: how long a sandbox may live. A spec's `timeout_ms` (the session
//! limit) and `idle_timeout_ms` of 0 take the tenant's default; a session limit above the
//! tenant's maximum is refused at create (INVALID_ARGUMENT on `spec.timeout_ms`). The
//! defaults are Vercel's tiers: 45 minutes by default, at most 5 hours. The leader applies
//! them before the spec goes into the log, so every replica holds the same resolved spec.
//! Whether a GPU sandbox may be paused keeping its files only is here too (the leader puts
//! it in the pause's log entry), and how long a sandbox stays on standby before the leader
//! pauses it to disk, and how long a paused sandbox's snapshot is kept before the leader
//! ends the sandbox and its node deletes the snapshot.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use berth_proto::{FieldErrors, Validator};

use crate::model::SandboxSpec;

/// Thirty days, the model's bound on both limits.
const LIMIT_MAX_MS: u64 = 30 * 24 * 3_600_000;
/// A year, the bound on snapshot retention.
const RETENTION_MAX_MS: u64 = 365 * 24 * 3_600_000;

/// Session and idle limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// Session limit of a sandbox created with `timeout_ms = 0`; 0 = none.
    pub default_timeout_ms: u64,
    /// Largest `timeout_ms` accepted; 0 = no maximum.
    pub max_timeout_ms: u64,
    /// Idle limit of a sandbox created with `idle_timeout_ms = 0`; 0 = none.
    pub default_idle_timeout_ms: u64,
    /// Allow pausing a sandbox that holds GPUs by keeping its files only (its processes
    /// restart on resume): gVisor cannot checkpoint GPU state. Off: such a pause is refused.
    pub gpu_pause_filesystem_only: bool,
    /// A sandbox on standby this long (frozen in place, holding its memory) is paused to
    /// disk, which frees its memory too; 0 = it stays on standby. 15 s by default, as
    /// Blaxel snapshots an idle sandbox after about 15 s.
    pub standby_pause_after_ms: u64,
    /// How long a paused sandbox's snapshot is kept on its node's disk; past it the
    /// sandbox is Failed and the snapshot deleted. 0 = kept until deleted. 7 days by
    /// default, as Modal keeps memory snapshots; at most 365 days.
    pub snapshot_retention_ms: u64,
    /// Per-tenant overrides (`[scheduler.sessions.tenants.NAME]`).
    pub tenants: BTreeMap<String, TenantSessions>,
}

/// One tenant's limits; an unset field takes the cluster's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantSessions {
    /// See [`SessionsConfig::default_timeout_ms`].
    pub default_timeout_ms: Option<u64>,
    /// See [`SessionsConfig::max_timeout_ms`].
    pub max_timeout_ms: Option<u64>,
    /// See [`SessionsConfig::default_idle_timeout_ms`].
    pub default_idle_timeout_ms: Option<u64>,
    /// See [`SessionsConfig::snapshot_retention_ms`].
    pub snapshot_retention_ms: Option<u64>,
}

impl Default for SessionsConfig {
    fn default() -> SessionsConfig {
        SessionsConfig {
            default_timeout_ms: 45 * 60_000,
            max_timeout_ms: 5 * 3_600_000,
            default_idle_timeout_ms: 0,
            gpu_pause_filesystem_only: false,
            standby_pause_after_ms: 15_000,
            snapshot_retention_ms: 7 * 24 * 3_600_000,
            tenants: BTreeMap::new(),
        }
    }
}

/// A tenant's resolved limits.
struct Limits {
    default_timeout_ms: u64,
    max_timeout_ms: u64,
    default_idle_timeout_ms: u64,
}

impl SessionsConfig {
    fn limits(&self, tenant: &str) -> Limits {
        let t = self.tenants.get(tenant).cloned().unwrap_or_default();
        Limits {
            default_timeout_ms: t.default_timeout_ms.unwrap_or(self.default_timeout_ms),
            max_timeout_ms: t.max_timeout_ms.unwrap_or(self.max_timeout_ms),
            default_idle_timeout_ms: t
                .default_idle_timeout_ms
                .unwrap_or(self.default_idle_timeout_ms),
        }
    }

    /// How long `tenant`'s paused sandboxes keep their snapshot; 0 = until deleted.
    pub fn snapshot_retention_ms(&self, tenant: &str) -> u64 {
        self.tenants
            .get(tenant)
            .and_then(|t| t.snapshot_retention_ms)
            .unwrap_or(self.snapshot_retention_ms)
    }

    /// Fills in the tenant's defaults and refuses a session limit above its maximum.
    pub fn apply(&self, spec: &mut SandboxSpec) -> Result<(), FieldErrors> {
        let l = self.limits(&spec.tenant);
        if spec.timeout_ms == 0 {
            spec.timeout_ms = l.default_timeout_ms;
        }
        if spec.idle_timeout_ms == 0 {
            spec.idle_timeout_ms = l.default_idle_timeout_ms;
        }
        if l.max_timeout_ms > 0 && (spec.timeout_ms == 0 || spec.timeout_ms > l.max_timeout_ms) {
            return Err(FieldErrors::one(
                "spec.timeout_ms",
                format!(
                    "{} is above tenant {:?}'s maximum session of {} ms",
                    if spec.timeout_ms == 0 {
                        "no limit".to_owned()
                    } else {
                        format!("{} ms", spec.timeout_ms)
                    },
                    spec.tenant,
                    l.max_timeout_ms
                ),
            ));
        }
        Ok(())
    }

    /// Records every problem, with paths under `sessions`.
    pub fn validate(&self, v: &mut Validator) {
        let check = |v: &mut Validator, field: &str, ms: u64| {
            v.check(ms <= LIMIT_MAX_MS, field, || {
                format!("{ms} is above 30 days ({LIMIT_MAX_MS} ms)")
            });
        };
        let check_all = |v: &mut Validator, d: u64, m: u64, i: u64| {
            check(v, "default_timeout_ms", d);
            check(v, "max_timeout_ms", m);
            check(v, "default_idle_timeout_ms", i);
            v.check(m == 0 || (d != 0 && d <= m), "default_timeout_ms", || {
                format!("{d} must be 1..={m} (max_timeout_ms) when there is a maximum")
            });
        };
        let retention = |v: &mut Validator, ms: u64| {
            v.check(ms <= RETENTION_MAX_MS, "snapshot_retention_ms", || {
                format!("{ms} is above 365 days ({RETENTION_MAX_MS} ms); 0 keeps snapshots until deleted")
            });
        };
        v.nested("sessions", |v| {
            check(v, "standby_pause_after_ms", self.standby_pause_after_ms);
            retention(v, self.snapshot_retention_ms);
            check_all(
                v,
                self.default_timeout_ms,
                self.max_timeout_ms,
                self.default_idle_timeout_ms,
            );
            for name in self.tenants.keys() {
                let l = self.limits(name);
                v.nested("tenants", |v| {
                    v.nested(format!("{name:?}"), |v| {
                        check_all(
                            v,
                            l.default_timeout_ms,
                            l.max_timeout_ms,
                            l.default_idle_timeout_ms,
                        );
                        retention(v, self.snapshot_retention_ms(name));
                    })
                });
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tenant: &str, timeout_ms: u64) -> SandboxSpec {
        let mut s = SandboxSpec::resources(tenant, 100, 64, None);
        s.timeout_ms = timeout_ms;
        s
    }

    #[test]
    fn defaults_fill_in_and_a_limit_above_the_tenants_maximum_is_refused() {
        let mut cfg = SessionsConfig::default();
        cfg.tenants.insert(
            "pro".into(),
            TenantSessions {
                max_timeout_ms: Some(24 * 3_600_000),
                default_idle_timeout_ms: Some(60_000),
                ..TenantSessions::default()
            },
        );
        let mut s = spec("free", 0);
        cfg.apply(&mut s).expect("default");
        assert_eq!((s.timeout_ms, s.idle_timeout_ms), (45 * 60_000, 0));
        let err = cfg
            .apply(&mut spec("free", 6 * 3_600_000))
            .expect_err("above 5 h");
        assert!(
            err.to_string()
                .contains("spec.timeout_ms: 21600000 ms is above tenant \"free\"'s maximum"),
            "{err}"
        );
        let mut s = spec("pro", 6 * 3_600_000);
        cfg.apply(&mut s).expect("pro may");
        assert_eq!(s.idle_timeout_ms, 60_000);
        let mut v = Validator::new();
        cfg.validate(&mut v);
        assert!(v.is_ok());
        cfg.default_timeout_ms = 0;
        let mut v = Validator::new();
        cfg.validate(&mut v);
        assert!(
            v.finish()
                .expect_err("no default under a maximum")
                .to_string()
                .contains("sessions.default_timeout_ms")
        );
    }

    #[test]
    fn snapshot_retention_is_per_tenant_and_bounded() {
        let mut cfg = SessionsConfig::default();
        cfg.tenants.insert(
            "pro".into(),
            TenantSessions {
                snapshot_retention_ms: Some(0),
                ..TenantSessions::default()
            },
        );
        assert_eq!(cfg.snapshot_retention_ms("free"), 7 * 24 * 3_600_000);
        assert_eq!(cfg.snapshot_retention_ms("pro"), 0, "kept until deleted");
        let mut v = Validator::new();
        cfg.validate(&mut v);
        assert!(v.is_ok());

        cfg.snapshot_retention_ms = RETENTION_MAX_MS + 1;
        cfg.tenants.insert(
            "team".into(),
            TenantSessions {
                snapshot_retention_ms: Some(u64::MAX),
                ..TenantSessions::default()
            },
        );
        let mut v = Validator::new();
        cfg.validate(&mut v);
        let err = v.finish().expect_err("above a year").to_string();
        assert!(
            err.contains("sessions.snapshot_retention_ms: 31536000001 is above 365 days"),
            "{err}"
        );
        assert!(
            err.contains("sessions.tenants.\"team\".snapshot_retention_ms"),
            "{err}"
        );
        assert!(!err.contains("\"pro\""), "0 is allowed: {err}");
    }
}
