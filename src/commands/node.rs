//! `berth node …`: list nodes with their GPU and CPU use; cordon, uncordon and drain them;
//! create join tokens.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use berth_proto::pb::v1 as pb;

use super::{CallTimeout, Endpoint, Table, emit, enum_label, format_cores};

/// Node commands.
#[derive(Debug, Args)]
pub(crate) struct NodeArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    #[command(flatten)]
    call: CallTimeout,
    #[command(subcommand)]
    command: NodeCommand,
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Nodes with their GPUs in use, CPU allocated, status and sandbox count.
    List {
        /// Only nodes of this provider.
        #[arg(long)]
        provider: Option<String>,
        /// Only nodes in this region.
        #[arg(long)]
        region: Option<String>,
    },
    /// Stop placing new sandboxes on a node; running ones continue.
    Cordon {
        /// Node id.
        node: String,
        /// Why, for the record.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Let a cordoned or draining node take new sandboxes again.
    Uncordon {
        /// Node id.
        node: String,
    },
    /// Cordon a node and mark it for removal once its sandboxes finish.
    Drain {
        /// Node id.
        node: String,
        /// Why, for the record.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Join tokens: how a node without a certificate obtains one.
    #[command(subcommand)]
    Token(NodeTokenCommand),
}

#[derive(Debug, Subcommand)]
enum NodeTokenCommand {
    /// A single-use, expiring join token for an agent's `join_token_file`; prints it once.
    Create(super::token::JoinTokenArgs),
}

pub(crate) fn run(args: &NodeArgs) -> ExitCode {
    if let NodeCommand::Token(NodeTokenCommand::Create(join)) = &args.command {
        return super::token::create_join(&args.endpoint, &args.call, join);
    }
    let json = args.endpoint.json();
    super::with_client("node", &args.endpoint, args.call.timeout, async |client| {
        let node = match &args.command {
            NodeCommand::List { provider, region } => {
                let request = pb::ListNodesRequest {
                    provider: provider.clone().unwrap_or_default(),
                    region: region.clone().unwrap_or_default(),
                    statuses: Vec::new(),
                };
                let mut nodes = client.list_nodes(request).await?.nodes;
                nodes.sort_by(|a, b| node_id(a).cmp(node_id(b)));
                if json {
                    let all: Vec<serde_json::Value> = nodes.iter().map(node_json).collect();
                    emit(&format!("{}\n", serde_json::Value::Array(all)));
                } else {
                    emit(&table(&nodes).to_string());
                }
                return Ok(ExitCode::SUCCESS);
            }
            NodeCommand::Cordon { node, reason } => {
                client
                    .cordon(node, reason.as_deref().unwrap_or_default())
                    .await?
            }
            NodeCommand::Uncordon { node } => client.uncordon(node).await?,
            NodeCommand::Token(_) => return Ok(ExitCode::SUCCESS),
            NodeCommand::Drain { node, reason } => {
                client
                    .drain(node, reason.as_deref().unwrap_or_default())
                    .await?
            }
        };
        if json {
            emit(&format!("{}\n", node_json(&node)));
        } else {
            emit(&format!(
                "{}: {}\n",
                node_id(&node),
                status_text(&node, true)
            ));
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn node_id(node: &pb::Node) -> &str {
    node.inventory.as_ref().map_or("", |i| i.node_id.as_str())
}

fn table(nodes: &[pb::Node]) -> Table {
    let mut table = Table::new(&[
        "NODE",
        "PROVIDER/REGION",
        "INSTANCE",
        "GPUS",
        "CPU",
        "STATUS",
        "SANDBOXES",
    ])
    .right_align(6);
    for node in nodes {
        let inv = node.inventory.clone().unwrap_or_default();
        let instance = if inv.instance_type.is_empty() {
            "-".to_owned()
        } else {
            inv.instance_type.clone()
        };
        table.row(vec![
            inv.node_id.clone(),
            format!("{}/{}", inv.provider, inv.region),
            instance,
            gpu_usage(node),
            format!(
                "{}/{}",
                format_cores(node.cpu_milli_allocated),
                format_cores(inv.cpu_milli)
            ),
            status_text(node, false),
            node.sandboxes.to_string(),
        ]);
    }
    table
}

/// GPUs in use of each model, `A10G 0/4, H100 3/8` (a GPU shared by fractional sandboxes
/// counts as in use), or `-` for a CPU-only node.
fn gpu_usage(node: &pb::Node) -> String {
    let gpus = node.inventory.as_ref().map_or(&[][..], |i| &i.gpus[..]);
    let mut by_model: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for gpu in gpus {
        let used = node
            .gpu_allocations
            .iter()
            .any(|a| a.index == gpu.index && a.allocated_milli > 0);
        let model = if gpu.model.is_empty() {
            "GPU"
        } else {
            &gpu.model
        };
        let entry = by_model.entry(model).or_default();
        entry.0 += usize::from(used);
        entry.1 += 1;
    }
    if by_model.is_empty() {
        return "-".to_owned();
    }
    by_model
        .iter()
        .map(|(model, (used, total))| format!("{model} {used}/{total}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `ready`, `cordoned`, `draining` or `down (why)`; with `with_reason`, cordoned and
/// draining carry their reason too.
fn status_text(node: &pb::Node, with_reason: bool) -> String {
    let label = status_label(node.status);
    let show_reason = node.status == pb::NodeStatus::Down as i32
        || (with_reason && node.status != pb::NodeStatus::Ready as i32);
    if show_reason && !node.status_reason.is_empty() {
        format!("{label} ({})", node.status_reason)
    } else {
        label
    }
}

fn status_label(raw: i32) -> String {
    enum_label(raw, pb::NodeStatus::as_str_name, "NODE_STATUS_")
}

/// A node as JSON, enum values as lowercase names.
fn node_json(node: &pb::Node) -> serde_json::Value {
    let inv = node.inventory.clone().unwrap_or_default();
    let gpus: Vec<serde_json::Value> = inv
        .gpus
        .iter()
        .map(|g| {
            let allocation = node.gpu_allocations.iter().find(|a| a.index == g.index);
            serde_json::json!({
                "index": g.index,
                "uuid": g.uuid,
                "model": g.model,
                "product_name": g.product_name,
                "memory_mib": g.memory_mib,
                "health": enum_label(g.health, pb::GpuHealth::as_str_name, "GPU_HEALTH_"),
                "health_reason": g.health_reason,
                "allocated_milli": allocation.map_or(0, |a| a.allocated_milli),
                "sandbox_ids": allocation.map(|a| a.sandbox_ids.clone()).unwrap_or_default(),
            })
        })
        .collect();
    serde_json::json!({
        "node_id": inv.node_id,
        "provider": inv.provider,
        "region": inv.region,
        "zone": inv.zone,
        "instance_type": inv.instance_type,
        "capacity_type": enum_label(
            inv.capacity_type,
            pb::CapacityType::as_str_name,
            "CAPACITY_TYPE_"
        ),
        "labels": inv.labels,
        "status": status_label(node.status),
        "status_reason": node.status_reason,
        "epoch": node.epoch,
        "cpu_milli": inv.cpu_milli,
        "cpu_milli_allocated": node.cpu_milli_allocated,
        "memory_mib": inv.memory_mib,
        "memory_mib_allocated": node.memory_mib_allocated,
        "gpus": gpus,
        "sandboxes": node.sandboxes,
        "last_heartbeat_unix_ms": node.last_heartbeat_unix_ms,
        "agent_address": inv.agent_address,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, model: &str) -> pb::Gpu {
        pb::Gpu {
            index,
            model: model.into(),
            ..Default::default()
        }
    }

    fn allocation(index: u32, allocated_milli: u32) -> pb::GpuAllocation {
        pb::GpuAllocation {
            index,
            allocated_milli,
            sandbox_ids: Vec::new(),
        }
    }

    #[test]
    fn gpu_usage_counts_gpus_in_use_per_model() {
        let mut node = pb::Node {
            inventory: Some(pb::NodeInventory {
                node_id: "n1".into(),
                gpus: (0..8).map(|i| gpu(i, "H100")).collect(),
                ..Default::default()
            }),
            // Two whole GPUs and one shared by a fractional sandbox; one idle entry.
            gpu_allocations: vec![
                allocation(0, 1000),
                allocation(1, 1000),
                allocation(5, 250),
                allocation(6, 0),
            ],
            ..Default::default()
        };
        assert_eq!(gpu_usage(&node), "H100 3/8");
        if let Some(inv) = node.inventory.as_mut() {
            inv.gpus.push(gpu(8, "A10G"));
            inv.gpus.push(gpu(9, "A10G"));
        }
        node.gpu_allocations.push(allocation(9, 500));
        assert_eq!(gpu_usage(&node), "A10G 1/2, H100 3/8");
        node.inventory = Some(pb::NodeInventory::default());
        assert_eq!(gpu_usage(&node), "-");
    }

    #[test]
    fn status_column() {
        let mut node = pb::Node {
            status: pb::NodeStatus::Cordoned as i32,
            status_reason: "maintenance".into(),
            ..Default::default()
        };
        assert_eq!(status_text(&node, false), "cordoned");
        assert_eq!(status_text(&node, true), "cordoned (maintenance)");
        node.status = pb::NodeStatus::Ready as i32;
        node.status_reason = "Ready by an operator".into();
        assert_eq!(status_text(&node, true), "ready");
        node.status = pb::NodeStatus::Down as i32;
        node.status_reason = "no heartbeat for 30 s".into();
        assert_eq!(status_text(&node, false), "down (no heartbeat for 30 s)");
        assert_eq!(node_json(&node)["status"], "down");
    }
}
