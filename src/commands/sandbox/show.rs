//! What `berth sandbox list` and `get` print: tables, `key: value` lines and JSON.

use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::Status;

use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::SandboxState;
use berth_scheduler::service::client::Client;

use super::{Table, emit, enum_label};

/// Most rows `sandbox list` prints; more would be a dump, not a listing.
const LIST_ROWS_MAX: usize = 10_000;

pub(super) async fn list(
    client: &mut Client,
    mut request: pb::ListSandboxesRequest,
    json: bool,
) -> Result<(), Status> {
    let mut sandboxes: Vec<pb::Sandbox> = Vec::new();
    let mut capped = false;
    loop {
        let page = client.list_sandboxes(request.clone()).await?;
        sandboxes.extend(page.sandboxes);
        if sandboxes.len() >= LIST_ROWS_MAX {
            capped = sandboxes.len() > LIST_ROWS_MAX || !page.next_page_token.is_empty();
            sandboxes.truncate(LIST_ROWS_MAX);
            break;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    if json {
        let all: Vec<serde_json::Value> = sandboxes.iter().map(sandbox_json).collect();
        emit(&format!("{}\n", serde_json::Value::Array(all)));
    } else {
        let now = now_unix_ms();
        let mut table = Table::new(&["ID", "STATE", "NODE", "GPUS", "AGE/EXIT"]);
        for s in &sandboxes {
            let st = status(s);
            table.row(vec![
                s.id.clone(),
                state_label(st.state),
                dash(&st.node_id),
                gpus_summary(s),
                age_or_exit(s, now),
            ]);
        }
        emit(&table.to_string());
    }
    if capped {
        eprintln!(
            "berth sandbox: showing the first {LIST_ROWS_MAX} sandboxes; narrow the list with \
             --tenant, --state or --node"
        );
    }
    Ok(())
}

/// `get` as `key: value` lines.
pub(super) fn describe(sandbox: &pb::Sandbox, now_ms: u64) -> String {
    let st = status(sandbox);
    let spec = sandbox.spec.clone().unwrap_or_default();
    let exited = state(sandbox) == SandboxState::Exited;
    let time = |ms: u64| {
        if ms == 0 {
            "-".to_owned()
        } else {
            format!(
                "{} ({} ago)",
                format_unix_ms(ms),
                format_age(now_ms.saturating_sub(ms))
            )
        }
    };
    let lines = [
        ("id", sandbox.id.clone()),
        ("state", state_label(st.state)),
        ("tenant", dash(&spec.tenant)),
        ("node", dash(&st.node_id)),
        ("gpus", gpus_summary(sandbox)),
        ("gpu model", dash(&st.gpu_model)),
        ("gpu uuids", dash(&st.gpu_uuids.join(","))),
        (
            "exit code",
            if exited {
                st.exit_code.to_string()
            } else {
                "-".to_owned()
            },
        ),
        ("reason", dash(&st.reason)),
        ("created", time(st.created_unix_ms)),
        ("started", time(st.started_unix_ms)),
        ("finished", time(st.finished_unix_ms)),
        ("command", dash(&shell_words(&spec.command))),
        ("network", network_summary(spec.network.as_ref())),
        ("usage", usage_summary(st.usage.as_ref(), now_ms)),
        (
            "placement",
            dash(
                &st.explanation
                    .as_ref()
                    .map(|e| e.summary.clone())
                    .unwrap_or_default(),
            ),
        ),
        ("warm pool", dash(&st.pool)),
    ];
    lines
        .iter()
        .map(|(key, value)| format!("{key}: {value}\n"))
        .collect()
}

/// `0.98 cpu, 64.2 MiB (3s ago)`, or `-` before the first report.
fn usage_summary(usage: Option<&pb::SandboxUsage>, now_ms: u64) -> String {
    let Some(u) = usage else {
        return "-".into();
    };
    format!(
        "{:.2} cpu, {:.1} MiB ({} ago)",
        u.cpu_milli as f64 / 1000.0,
        u.memory_bytes as f64 / f64::from(1u32 << 20),
        format_age(now_ms.saturating_sub(u.sampled_unix_ms))
    )
}

/// `none`, `egress-all`, or `allow 10.0.0.0/8, 1.2.3.4/32:80,443`.
fn network_summary(policy: Option<&pb::NetworkPolicy>) -> String {
    let Some(p) = policy else {
        return "none".into();
    };
    let mode = enum_label(p.mode, pb::NetworkMode::as_str_name, "NETWORK_MODE_");
    if p.allow.is_empty() {
        return if mode == "unspecified" {
            "none".into()
        } else {
            mode.replace('_', "-")
        };
    }
    let rules: Vec<String> = p
        .allow
        .iter()
        .map(|r| {
            let ports: Vec<String> = r.ports.iter().map(u32::to_string).collect();
            if ports.is_empty() {
                r.cidr.clone()
            } else {
                format!("{}:{}", r.cidr, ports.join(","))
            }
        })
        .collect();
    format!("allow {}", rules.join(", "))
}

pub(super) fn state(sandbox: &pb::Sandbox) -> SandboxState {
    SandboxState::try_from(status(sandbox).state).unwrap_or(SandboxState::Unspecified)
}

pub(super) fn status(sandbox: &pb::Sandbox) -> &pb::SandboxStatus {
    static EMPTY: LazyLock<pb::SandboxStatus> = LazyLock::new(Default::default);
    sandbox.status.as_ref().unwrap_or(&EMPTY)
}

/// `running` for `SANDBOX_STATE_RUNNING`.
pub(super) fn state_label(raw: i32) -> String {
    enum_label(raw, SandboxState::as_str_name, "SANDBOX_STATE_")
}

/// GPUs bound to a sandbox (`2×H100`, `500m×T4`), what it asks for while unbound
/// (`H100:2`), or `-`.
pub(super) fn gpus_summary(sandbox: &pb::Sandbox) -> String {
    let st = status(sandbox);
    let count = st.gpu_indices.len().max(st.gpu_uuids.len());
    if count > 0 {
        let model = if st.gpu_model.is_empty() {
            "GPU"
        } else {
            &st.gpu_model
        };
        return match st.gpu_milli_per_gpu {
            1..=999 => format!("{}m×{model}", st.gpu_milli_per_gpu),
            _ => format!("{count}×{model}"),
        };
    }
    sandbox
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.gpu.as_ref())
        .filter(|g| !g.options.is_empty())
        .map_or_else(|| "-".to_owned(), |g| g.options.join(","))
}

/// The AGE/EXIT column: how long ago a live sandbox was created, an exited one's code, or
/// why it failed, was lost or is unknown.
pub(super) fn age_or_exit(sandbox: &pb::Sandbox, now_ms: u64) -> String {
    let st = status(sandbox);
    match state(sandbox) {
        SandboxState::Exited => format!("exit {}", st.exit_code),
        SandboxState::Failed | SandboxState::Lost | SandboxState::Unknown => {
            let reason = dash(&st.reason);
            if reason.chars().count() > 60 {
                format!("{}…", reason.chars().take(59).collect::<String>())
            } else {
                reason
            }
        }
        _ => format_age(now_ms.saturating_sub(st.created_unix_ms)),
    }
}

pub(super) fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

/// argv as a shell would need it typed.
pub(super) fn shell_words(argv: &[String]) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    argv.iter()
        .map(|a| {
            if !a.is_empty() && a.chars().all(safe) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A span of milliseconds in its largest whole unit: `45s`, `12m`, `3h`, `2d`.
pub(super) fn format_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m", s / 60),
        3_600..86_400 => format!("{}h", s / 3_600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Unix milliseconds as RFC 3339 UTC, `2026-04-14T09:30:00.123Z`.
pub(crate) fn format_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (hour, minute, second) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    // Days to a civil date (Howard Hinnant's algorithm), in unsigned arithmetic: times
    // here are never before 1970.
    let z = secs / 86_400 + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:03}Z",
        ms % 1000
    )
}

// ---- JSON ----

/// A sandbox as JSON, enum values as lowercase names.
pub(super) fn sandbox_json(sandbox: &pb::Sandbox) -> serde_json::Value {
    serde_json::json!({
        "id": sandbox.id,
        "request_id": sandbox.request_id,
        "revision": sandbox.revision,
        "spec": sandbox.spec.as_ref().map(spec_json),
        "status": sandbox.status.as_ref().map(status_json),
    })
}

pub(crate) fn spec_json(spec: &pb::SandboxSpec) -> serde_json::Value {
    let resources = spec.resources.clone().unwrap_or_default();
    let constraints = spec.constraints.clone().unwrap_or_default();
    serde_json::json!({
        "tenant": spec.tenant,
        "image": spec.image,
        "command": spec.command,
        "env": spec.env,
        "resources": {
            "cpu_milli": resources.cpu_milli,
            "memory_mib": resources.memory_mib,
            "gpu": resources.gpu.map(|g| serde_json::json!({
                "options": g.options,
                "min_memory_mib": g.min_memory_mib,
            })),
        },
        "constraints": {
            "providers": constraints.providers,
            "regions": constraints.regions,
            "node_labels": constraints.node_labels,
            "tolerations": constraints.tolerations.iter().map(|t| serde_json::json!({
                "key": t.key, "value": t.value,
            })).collect::<Vec<_>>(),
            "capacity_type": enum_label(
                constraints.capacity_type,
                pb::CapacityType::as_str_name,
                "CAPACITY_TYPE_"
            ),
        },
        "priority": spec.priority,
        "timeout_ms": spec.timeout_ms,
        "idle_timeout_ms": spec.idle_timeout_ms,
        "keep_alive": spec.keep_alive,
        "auto_pause_idle_ms": spec.auto_pause_idle_ms,
        "auto_resume": spec.auto_resume,
        "network": spec.network.as_ref().map(|n| serde_json::json!({
            "mode": enum_label(n.mode, pb::NetworkMode::as_str_name, "NETWORK_MODE_"),
            "allow": n.allow.iter().map(|r| serde_json::json!({
                "cidr": r.cidr, "ports": r.ports,
            })).collect::<Vec<_>>(),
        })),
        "labels": spec.labels,
    })
}

pub(super) fn status_json(status: &pb::SandboxStatus) -> serde_json::Value {
    serde_json::json!({
        "state": state_label(status.state),
        "node_id": status.node_id,
        "gpu_indices": status.gpu_indices,
        "gpu_uuids": status.gpu_uuids,
        "gpu_milli_per_gpu": status.gpu_milli_per_gpu,
        "gpu_model": status.gpu_model,
        "exit_code": status.exit_code,
        "reason": status.reason,
        "created_unix_ms": status.created_unix_ms,
        "scheduled_unix_ms": status.scheduled_unix_ms,
        "started_unix_ms": status.started_unix_ms,
        "finished_unix_ms": status.finished_unix_ms,
        "explanation": status.explanation.as_ref().map(explanation_json),
        "pool": status.pool,
        "usage": status.usage.as_ref().map(|u| serde_json::json!({
            "cpu_milli": u.cpu_milli,
            "memory_bytes": u.memory_bytes,
            "sampled_unix_ms": u.sampled_unix_ms,
        })),
    })
}

pub(super) fn explanation_json(e: &pb::PlacementExplanation) -> serde_json::Value {
    serde_json::json!({
        "nodes_evaluated": e.nodes_evaluated,
        "filtered": e.filtered.iter().map(|f| serde_json::json!({
            "reason": f.reason, "nodes": f.nodes,
        })).collect::<Vec<_>>(),
        "top_scores": e.top_scores.iter().map(|s| serde_json::json!({
            "node_id": s.node_id, "components": s.components, "total": s.total,
        })).collect::<Vec<_>>(),
        "summary": e.summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::sandbox::test_sandbox as sandbox;

    #[test]
    fn states_shown_by_name() {
        assert_eq!(state_label(SandboxState::Unknown as i32), "unknown");
        let unknown = sandbox(SandboxState::Unknown, 0, "node n1 is down (no heartbeat)");
        assert_eq!(sandbox_json(&unknown)["status"]["state"], "unknown");
        assert_eq!(age_or_exit(&unknown, 0), "node n1 is down (no heartbeat)");
        assert!(describe(&unknown, 0).contains("state: unknown\n"));
        assert_eq!(state_label(SandboxState::Pending as i32), "pending");
        let json = sandbox_json(&sandbox(SandboxState::Running, 0, ""));
        assert_eq!(json["status"]["state"], "running");
    }

    #[test]
    fn gpu_column_and_describe() {
        let mut s = sandbox(SandboxState::Running, 0, "");
        assert_eq!(gpus_summary(&s), "-");
        s.spec = Some(pb::SandboxSpec {
            command: vec!["python".into(), "-c".into(), "print('hi')".into()],
            resources: Some(pb::Resources {
                gpu: Some(pb::GpuRequest {
                    options: vec!["H100:2".into()],
                    min_memory_mib: 0,
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(gpus_summary(&s), "H100:2");
        if let Some(st) = s.status.as_mut() {
            st.gpu_indices = vec![0, 1];
            st.gpu_model = "H100".into();
            st.gpu_milli_per_gpu = 1000;
            st.created_unix_ms = 1_776_159_000_000;
        }
        assert_eq!(gpus_summary(&s), "2×H100");
        let text = describe(&s, 1_776_159_090_000);
        assert!(text.contains("state: running\n"), "{text}");
        assert!(
            text.contains("created: 2026-04-14T09:30:00.000Z (1m ago)\n"),
            "{text}"
        );
        assert!(
            text.contains("command: python -c 'print('\\''hi'\\'')'\n"),
            "{text}"
        );
        assert!(text.contains("exit code: -\n"), "{text}");
    }

    #[test]
    fn dates() {
        assert_eq!(format_unix_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            format_unix_ms(1_776_159_000_123),
            "2026-04-14T09:30:00.123Z"
        );
        assert_eq!(format_age(59_999), "59s");
        assert_eq!(format_age(3_600_000), "1h");
    }
}
