//! `berth pool …`: warm pools (operators). `set` keeps a tenant's sandboxes of one shape
//! created and on standby, `list` shows each pool's ready and warming members and how many
//! creates it served, `delete` removes a pool and its unclaimed members. A keep-alive
//! `berth sandbox create` with no command whose tenant, image, resources, constraints,
//! network and limits equal a pool's is served by one of its sandboxes.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use berth_proto::pb::v1 as pb;

use super::sandbox::{ShapeArgs, shape_spec, show::spec_json};
use super::{DEFAULT_CALL_TIMEOUT, Endpoint, Table, emit};

/// Warm-pool commands.
#[derive(Debug, Args)]
pub(crate) struct PoolArgs {
    #[command(flatten)]
    endpoint: Endpoint,
    #[command(subcommand)]
    command: PoolCommand,
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Create or replace a pool: SIZE sandboxes of this shape kept ready for TENANT.
    /// Replacing one with another shape or a smaller size deletes the members that no
    /// longer fit.
    Set {
        /// Pool name (lowercase letters, digits, `-` and `.`).
        name: String,
        /// How many sandboxes it keeps ready (0..=1000).
        #[arg(long)]
        size: u32,
        #[command(flatten)]
        shape: Box<ShapeArgs>,
    },
    /// Every pool: tenant, image, shape, size, ready and warming members, served creates.
    List,
    /// Delete a pool and its unclaimed sandboxes.
    Delete {
        /// Pool name.
        name: String,
    },
}

pub(crate) fn run(args: &PoolArgs) -> ExitCode {
    let json = args.endpoint.json();
    // No `--timeout` of its own: `pool set`'s is the template's session limit, as in
    // `sandbox create`.
    super::with_client(
        "pool",
        &args.endpoint,
        DEFAULT_CALL_TIMEOUT,
        async |client| {
            match &args.command {
                PoolCommand::Set { name, size, shape } => {
                    let template = match shape_spec(shape) {
                        Ok(t) => t,
                        Err(message) => {
                            eprintln!("error: {message}");
                            return Ok(ExitCode::from(crate::exit::EXIT_USAGE));
                        }
                    };
                    let request = pb::SetWarmPoolRequest {
                        name: name.clone(),
                        template: Some(template),
                        size: *size,
                    };
                    let pool = client.set_warm_pool(request).await?;
                    if json {
                        emit(&format!("{}\n", pool_json(&pool)));
                    } else {
                        emit(&format!(
                            "{}: {} sandboxes kept ready\n",
                            pool.name, pool.size
                        ));
                    }
                }
                PoolCommand::List => {
                    let pools = client.list_warm_pools().await?;
                    if json {
                        let all: Vec<serde_json::Value> = pools.iter().map(pool_json).collect();
                        emit(&format!("{}\n", serde_json::Value::Array(all)));
                    } else {
                        emit(&table(&pools).to_string());
                    }
                }
                PoolCommand::Delete { name } => {
                    client.delete_warm_pool(name).await?;
                    if !json {
                        emit(&format!("{name}: deleted\n"));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        },
    )
}

fn pool_json(pool: &pb::WarmPool) -> serde_json::Value {
    serde_json::json!({
        "name": pool.name,
        "template": pool.template.as_ref().map(spec_json),
        "size": pool.size,
        "ready": pool.ready,
        "warming": pool.warming,
        "created": pool.created,
        "claimed": pool.claimed,
    })
}

fn table(pools: &[pb::WarmPool]) -> Table {
    let mut table = Table::new(&[
        "NAME", "TENANT", "IMAGE", "CPU", "MEMORY", "SIZE", "READY", "WARMING", "CLAIMED",
    ]);
    for p in pools {
        let t = p.template.clone().unwrap_or_default();
        let r = t.resources.unwrap_or_default();
        table.row(vec![
            p.name.clone(),
            t.tenant,
            if t.image.is_empty() {
                "-".into()
            } else {
                t.image
            },
            format!("{}m", r.cpu_milli),
            format!("{}Mi", r.memory_mib),
            p.size.to_string(),
            p.ready.to_string(),
            p.warming.to_string(),
            p.claimed.to_string(),
        ]);
    }
    table
}
