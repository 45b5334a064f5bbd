//! What an assignment becomes: the start request (the shim's [`Launch`]) of a sandbox the
//! scheduler assigned, with the node's settings and, for a network policy other than
//! `none`, the [`NetPlan`] the shim builds the sandbox's network from.

use std::collections::BTreeMap;
use std::path::PathBuf;

use berth_proto::network::{Cidr, network_from_pb};
use berth_proto::pb::v1 as pb;

use crate::config::{AgentConfig, RuntimeKind};
use crate::launch::Launch;
use crate::network::NetPlan;
use crate::starter::StartRequest;

/// The node's part of every start request.
pub struct Assignments {
    runtime: RuntimeKind,
    runsc_path: String,
    runsc_platform: String,
    max_output_bytes: u64,
    snapshot_budget_bytes: u64,
    /// Where berth-sandboxd is installed.
    sandboxd_dir: Option<PathBuf>,
    pool: Cidr,
    /// What no sandbox may reach: `[agent.network] blocked` and the schedulers.
    blocked: Vec<Cidr>,
    run_dir: PathBuf,
}

impl Assignments {
    /// From the (validated) config; resolves the scheduler endpoints once.
    pub async fn new(cfg: &AgentConfig, sandboxd_dir: Option<PathBuf>) -> Assignments {
        Assignments {
            runtime: cfg.runtime,
            runsc_path: cfg.runsc_path.clone(),
            runsc_platform: cfg.runsc_platform.clone(),
            max_output_bytes: cfg.max_output_bytes,
            snapshot_budget_bytes: cfg.snapshot_disk_budget_bytes,
            sandboxd_dir,
            pool: cfg.network.pool.parse().unwrap_or(Cidr {
                addr: std::net::Ipv4Addr::new(10, 88, 0, 0),
                len: 16,
            }),
            blocked: blocked_destinations(cfg).await,
            run_dir: PathBuf::from(&cfg.network.run_dir),
        }
    }

    /// The network a spec's policy asks for; `None` for loopback only. The scheduler has
    /// checked the policy; a rule that does not read is left out (so refused, not allowed).
    fn net_plan(&self, policy: Option<&pb::NetworkPolicy>) -> Option<NetPlan> {
        let policy = network_from_pb(policy, &mut berth_proto::Validator::new());
        policy.any().then(|| NetPlan {
            policy,
            pool: self.pool,
            blocked: self.blocked.clone(),
            run_dir: self.run_dir.clone(),
        })
    }

    /// The start request of an assignment.
    pub fn request_of(&self, sandbox: &pb::Sandbox, epoch: u64) -> StartRequest {
        let spec = sandbox.spec.clone().unwrap_or_default();
        let resources = spec.resources.clone().unwrap_or_default();
        let gpu_uuids = sandbox
            .status
            .as_ref()
            .map(|s| s.gpu_uuids.clone())
            .unwrap_or_default();
        StartRequest {
            launch: Launch {
                sandbox_id: sandbox.id.clone(),
                epoch,
                command: Vec::new(),
                env: BTreeMap::new(),
                image: spec.image.clone(),
                image_digest: String::new(),
                rootfs: None,
                workdir: String::new(),
                uid: 0,
                gid: 0,
                gpu_uuids,
                cpu_milli: resources.cpu_milli,
                memory_mib: resources.memory_mib,
                timeout_ms: spec.timeout_ms,
                net: self.net_plan(spec.network.as_ref()),
                runtime: self.runtime,
                runsc_path: self.runsc_path.clone(),
                runsc_platform: self.runsc_platform.clone(),
                max_output_bytes: self.max_output_bytes,
                sandboxd_dir: self.sandboxd_dir.clone(),
                keep_alive: spec.keep_alive,
                idle_timeout_ms: spec.idle_timeout_ms,
                auto_pause_idle_ms: spec.auto_pause_idle_ms,
                snapshot_budget_bytes: self.snapshot_budget_bytes,
            },
            command: spec.command,
            env: spec.env.into_iter().collect(),
            snapshot_from: None,
        }
    }
}

/// `[agent.network] blocked`, and every IPv4 address the scheduler endpoints resolve to
/// (an endpoint that does not resolve now is logged; the node itself is never reachable).
async fn blocked_destinations(cfg: &AgentConfig) -> Vec<Cidr> {
    let mut out: Vec<Cidr> = cfg
        .network
        .blocked
        .iter()
        .filter_map(|b| b.parse().ok())
        .collect();
    for endpoint in &cfg.schedulers {
        match tokio::net::lookup_host(endpoint.as_str()).await {
            Ok(addrs) => {
                for a in addrs {
                    if let std::net::IpAddr::V4(ip) = a.ip() {
                        let c = Cidr { addr: ip, len: 32 };
                        if !out.contains(&c) {
                            out.push(c);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%endpoint, error = %e, "scheduler endpoint does not resolve; sandboxes are not blocked from it by address")
            }
        }
    }
    out
}
