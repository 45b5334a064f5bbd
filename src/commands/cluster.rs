//! `berth cluster …`: cluster status and Raft membership.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use berth_proto::pb::v1 as pb;

use super::{CallTimeout, Endpoint, Table};

/// Cluster commands.
#[derive(Debug, Args)]
pub(crate) struct ClusterArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    #[command(flatten)]
    call: CallTimeout,
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Leader, term, indexes, replicas, nodes, sandboxes and GPUs, as one replica sees them.
    Status,
    /// Add a scheduler replica (start it first with `join = true` in its config).
    AddPeer {
        /// Raft id of the new replica.
        #[arg(long)]
        id: u64,
        /// Its gRPC address.
        #[arg(long)]
        address: String,
        /// Add it as a voter at once instead of a non-voting learner.
        #[arg(long)]
        voter: bool,
    },
    /// Remove a scheduler replica.
    RemovePeer {
        /// Raft id of the replica.
        #[arg(long)]
        id: u64,
    },
}

fn replicas_json(replicas: &[pb::Replica]) -> serde_json::Value {
    serde_json::Value::Array(
        replicas
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id, "address": r.address, "role": r.role, "match_index": r.match_index
                })
            })
            .collect(),
    )
}

fn print_replicas(replicas: &[pb::Replica]) {
    let mut table = Table::new(&["ID", "ADDRESS", "ROLE", "MATCH"]).right_align(3);
    for r in replicas {
        table.row(vec![
            r.id.to_string(),
            r.address.clone(),
            r.role.clone(),
            r.match_index.to_string(),
        ]);
    }
    print!("{table}");
}

pub(crate) fn run(args: &ClusterArgs) -> ExitCode {
    let json = args.endpoint.json();
    super::with_client(
        "cluster",
        &args.endpoint,
        args.call.timeout,
        async |client| {
            match &args.command {
                ClusterCommand::Status => {
                    let s = client.status().await?;
                    if json {
                        let mut by_state: Vec<_> = s.sandboxes_by_state.iter().collect();
                        by_state.sort();
                        println!(
                            "{}",
                            serde_json::json!({
                                "leader_id": s.leader_id,
                                "term": s.term,
                                "commit_index": s.commit_index,
                                "applied_index": s.applied_index,
                                "replicas": replicas_json(&s.replicas),
                                "nodes_ready": s.nodes_ready,
                                "nodes_total": s.nodes_total,
                                "sandboxes_by_state": s.sandboxes_by_state,
                                "gpus_allocated_milli": s.gpus_allocated_milli,
                                "gpus_total_milli": s.gpus_total_milli,
                                "invariant_violations": s.invariant_violations,
                                "autoscaler": {
                                    "holder": s.autoscaler_holder,
                                    "lease_expires_unix_ms": s.autoscaler_lease_expires_unix_ms,
                                    "recent_decisions": s.recent_autoscaler_decisions,
                                },
                            })
                        );
                    } else {
                        println!(
                            "leader {} · term {} · commit {} · applied {} (as seen by {})",
                            s.leader_id,
                            s.term,
                            s.commit_index,
                            s.applied_index,
                            client.current()
                        );
                        print_replicas(&s.replicas);
                        println!("nodes: {} ready of {}", s.nodes_ready, s.nodes_total);
                        let mut states: Vec<_> = s.sandboxes_by_state.iter().collect();
                        states.sort();
                        let line: Vec<String> =
                            states.iter().map(|(k, v)| format!("{k} {v}")).collect();
                        println!("sandboxes: {}", line.join(", "));
                        let mut models: Vec<_> = s.gpus_total_milli.iter().collect();
                        models.sort();
                        for (model, total) in models {
                            let used = s.gpus_allocated_milli.get(model).copied().unwrap_or(0);
                            println!(
                                "gpu {model}: {:.1} of {:.0} allocated",
                                used as f64 / 1000.0,
                                *total as f64 / 1000.0
                            );
                        }
                        println!("invariant violations: {}", s.invariant_violations);
                        if s.autoscaler_holder.is_empty() {
                            println!("autoscaler: none has run");
                        } else {
                            println!(
                                "autoscaler: lease held by {} until {} (unix ms)",
                                s.autoscaler_holder, s.autoscaler_lease_expires_unix_ms
                            );
                            if !s.recent_autoscaler_decisions.is_empty() {
                                println!("recent autoscaler decisions (newest first):");
                                for line in s.recent_autoscaler_decisions.iter().take(20) {
                                    println!("  {line}");
                                }
                            }
                        }
                    }
                }
                ClusterCommand::AddPeer { id, address, voter } => {
                    let r = client.add_peer(*id, address, !voter).await?;
                    if json {
                        println!("{}", replicas_json(&r.replicas));
                    } else {
                        print_replicas(&r.replicas);
                    }
                }
                ClusterCommand::RemovePeer { id } => {
                    let r = client.remove_peer(*id).await?;
                    if json {
                        println!("{}", replicas_json(&r.replicas));
                    } else {
                        print_replicas(&r.replicas);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        },
    )
}
