//! `berth dev`: a whole berth on one machine. Three scheduler replicas (real Raft over
//! loopback, durable logs) and seven node agents whose static inventories stand in for GPU
//! boxes at two providers in four regions; the agents run sandboxes under gVisor when
//! `runsc` is installed, and as plain processes when not. An autoscaler runs in-process
//! with the local provider (node groups that start at zero and grow with `berth agent`
//! processes). Ctrl-C stops the autoscaler and its agents, the sandboxes, then the static
//! agents, then the replicas.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use tokio::sync::watch;

use std::collections::BTreeMap;

use berth_autoscaler::AutoscalerConfig;
use berth_autoscaler::config::{NodeGroupConfig, ProviderConfig};
use berth_net::tls::pki::LocalPki;
use berth_net::{Tls, TlsSettings};
use berth_node_agent::AgentConfig;
use berth_node_agent::agent::{self, AgentOptions, find_program};
use berth_node_agent::config::{InventorySource, RuntimeKind};
use berth_proto::node::CapacityType;
use berth_proto::pb::v1 as pb;
use berth_scheduler::SchedulerConfig;
use berth_scheduler::config::PeerConfig;
use berth_scheduler::service::client::Client;
use std::sync::Arc;

use crate::credentials::CredentialsFile;

/// Arguments of `berth dev`.
#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Where the replicas and agents keep their state. Emptied at start unless --keep.
    #[arg(long, default_value = "berth-data/dev")]
    data_dir: PathBuf,
    /// Keep the state of the previous run instead of starting empty.
    #[arg(long)]
    keep: bool,
    /// gRPC port of the first replica; the others use the next two.
    #[arg(long, default_value_t = 7070)]
    port: u16,
    /// Metrics port of the first replica; the others use the next two.
    #[arg(long, default_value_t = 9090)]
    metrics_port: u16,
    /// Sandbox runtime: gvisor when runsc is installed (auto), or force one.
    #[arg(long, value_enum, default_value_t = DevRuntime::Auto)]
    runtime: DevRuntime,
    /// Agents' heartbeat TTL in ms: a killed agent's node is Down after this long.
    #[arg(long, default_value_t = 5_000)]
    node_ttl_ms: u64,
    /// How long a Down node's sandboxes stay Unknown (holding their GPUs) before they are
    /// Lost, in ms; an agent back within it has its report stand.
    #[arg(long, default_value_t = 60_000)]
    node_disconnect_grace_ms: u64,
    /// Config file whose [autoscaler] section replaces dev's default (its `schedulers`
    /// are set to dev's replicas, its `tls` to a certificate from dev's CA).
    #[arg(long)]
    autoscaler_config: Option<PathBuf>,
    /// Start none of the seven static agents: every node comes from the autoscaler.
    #[arg(long, conflicts_with = "only_nodes")]
    no_static_nodes: bool,
    /// Start only this one of the seven static agents (e.g. `gcp-euw4-g2-0`); repeatable.
    #[arg(long = "only-node", value_name = "NODE_ID")]
    only_nodes: Vec<String>,
    /// Run no autoscaler.
    #[arg(long)]
    no_autoscaler: bool,
    /// A registry the agents pull from over plain HTTP (e.g. `127.0.0.1:5000`); repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// Where `berth sandbox snapshot` pushes (`host[:port]/path`, the agents'
    /// `snapshot_repository`); default: `<first --insecure-registry>/berth-snapshots`, or
    /// none (snapshots refused) without one.
    #[arg(long, value_name = "HOST[:PORT]/PATH")]
    snapshot_repository: Option<String>,
    /// Metrics port of the first static agent's `/metrics`; the others use the next ones
    /// (0: each agent takes a free port and logs it).
    #[arg(long, default_value_t = 9190)]
    agent_metrics_port: u16,
    /// Idle time before the autoscaler removes a node (default config only).
    #[arg(long, default_value_t = 120)]
    scale_down_cooldown_s: u64,
    /// Run without TLS and without authentication (anyone who reaches a port is an admin).
    #[arg(long)]
    insecure: bool,
    /// Let GPU sandboxes be paused keeping their files only (their processes restart on
    /// resume): `[scheduler.sessions] gpu_pause_filesystem_only`.
    #[arg(long)]
    gpu_pause_filesystem_only: bool,
    /// How long a sandbox stays on standby before it is paused to disk, e.g. 15s or 1h:
    /// `[scheduler.sessions] standby_pause_after_ms`.
    #[arg(long, default_value = "15s", value_parser = super::parse_duration)]
    standby_pause_after: std::time::Duration,
    /// How long a paused sandbox's snapshot is kept before the sandbox is failed and the
    /// snapshot deleted, e.g. 2s or 7d: `[scheduler.sessions] snapshot_retention_ms`.
    #[arg(long, default_value = "7d", value_parser = super::parse_duration)]
    snapshot_retention: std::time::Duration,
}

/// `--runtime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DevRuntime {
    Auto,
    Gvisor,
    Process,
}

/// One stand-in machine.
struct DevNode {
    id: &'static str,
    provider: &'static str,
    region: &'static str,
    zone: &'static str,
    instance_type: &'static str,
    price_per_hour_usd: f64,
    inventory: &'static str,
}

/// The static inventories, shipped in the binary (the same files as deploy/examples).
const INVENTORIES: &[(&str, &str)] = &[
    (
        "8xh100.toml",
        include_str!("../../deploy/examples/inventories/8xh100.toml"),
    ),
    (
        "8xb200.toml",
        include_str!("../../deploy/examples/inventories/8xb200.toml"),
    ),
    (
        "1xl4.toml",
        include_str!("../../deploy/examples/inventories/1xl4.toml"),
    ),
    (
        "4xt4.toml",
        include_str!("../../deploy/examples/inventories/4xt4.toml"),
    ),
];

/// 2 × 8×H100, 1 × 8×B200, 2 × 1×L4, 2 × 4×T4 across AWS and GCP.
const NODES: &[DevNode] = &[
    DevNode {
        id: "aws-use1-p5-0",
        provider: "aws",
        region: "us-east-1",
        zone: "us-east-1a",
        instance_type: "p5.48xlarge",
        price_per_hour_usd: 98.32,
        inventory: "8xh100.toml",
    },
    DevNode {
        id: "gcp-usc1-a3-0",
        provider: "gcp",
        region: "us-central1",
        zone: "us-central1-a",
        instance_type: "a3-highgpu-8g",
        price_per_hour_usd: 88.25,
        inventory: "8xh100.toml",
    },
    DevNode {
        id: "gcp-usc1-a4-0",
        provider: "gcp",
        region: "us-central1",
        zone: "us-central1-b",
        instance_type: "a4-highgpu-8g",
        price_per_hour_usd: 130.0,
        inventory: "8xb200.toml",
    },
    DevNode {
        id: "gcp-euw4-g2-0",
        provider: "gcp",
        region: "europe-west4",
        zone: "europe-west4-a",
        instance_type: "g2-standard-8",
        price_per_hour_usd: 0.85,
        inventory: "1xl4.toml",
    },
    DevNode {
        id: "gcp-euw4-g2-1",
        provider: "gcp",
        region: "europe-west4",
        zone: "europe-west4-b",
        instance_type: "g2-standard-8",
        price_per_hour_usd: 0.85,
        inventory: "1xl4.toml",
    },
    DevNode {
        id: "aws-usw2-g4dn-0",
        provider: "aws",
        region: "us-west-2",
        zone: "us-west-2a",
        instance_type: "g4dn.12xlarge",
        price_per_hour_usd: 3.912,
        inventory: "4xt4.toml",
    },
    DevNode {
        id: "aws-usw2-g4dn-1",
        provider: "aws",
        region: "us-west-2",
        zone: "us-west-2b",
        instance_type: "g4dn.12xlarge",
        price_per_hour_usd: 3.912,
        inventory: "4xt4.toml",
    },
];

const REPLICAS: u16 = 3;
/// The cluster id, and so the trust domain of dev's certificates.
const CLUSTER: &str = "berth-dev";

pub(crate) fn run(args: &DevArgs) -> ExitCode {
    super::run_service("dev", dev(args))
}

/// Picks the runtime and says why.
fn choose_runtime(wanted: DevRuntime) -> Result<(RuntimeKind, String), String> {
    let runsc = find_program("runsc");
    match (wanted, runsc) {
        (DevRuntime::Process, _) => Ok((
            RuntimeKind::Process,
            "process (plain child processes, no isolation; --runtime process)".into(),
        )),
        (DevRuntime::Gvisor | DevRuntime::Auto, Some(path)) => Ok((
            RuntimeKind::Gvisor,
            format!("gvisor ({} --platform=ptrace)", path.display()),
        )),
        (DevRuntime::Gvisor, None) => {
            Err("--runtime gvisor: runsc is not installed (apt-get install runsc)".into())
        }
        (DevRuntime::Auto, None) => Ok((
            RuntimeKind::Process,
            "process: runsc is not installed, so sandboxes run as plain processes WITHOUT \
             isolation (apt-get install runsc for gVisor)"
                .into(),
        )),
    }
}

fn port(base: u16, i: u16, what: &str) -> Result<u16, String> {
    base.checked_add(i).filter(|p| *p != 0).ok_or_else(|| {
        format!(
            "--{what} {base}: ports {base}..{} do not fit",
            u32::from(base) + 2
        )
    })
}

async fn dev(args: &DevArgs) -> Result<(), String> {
    let (runtime_kind, runtime_note) = choose_runtime(args.runtime)?;
    let static_nodes = static_nodes(args)?;
    if !args.keep && args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)
            .map_err(|e| format!("emptying {}: {e}", args.data_dir.display()))?;
    }
    let inventories = args.data_dir.join("inventories");
    std::fs::create_dir_all(&inventories)
        .map_err(|e| format!("creating {}: {e}", inventories.display()))?;
    for (name, text) in INVENTORIES {
        std::fs::write(inventories.join(name), text)
            .map_err(|e| format!("writing {}: {e}", inventories.join(name).display()))?;
    }

    let pki = if args.insecure {
        None
    } else {
        Some(Arc::new(
            LocalPki::create(&args.data_dir.join("pki"), CLUSTER)
                .map_err(|e| format!("pki: {e}"))?,
        ))
    };
    let issue = |role: &str| -> Result<TlsSettings, String> {
        match &pki {
            None => Ok(TlsSettings::insecure()),
            Some(p) => p.issue(role).map_err(|e| format!("pki: {e}")),
        }
    };
    let admin = issue("admin/dev")?;
    let credentials = args.data_dir.join("credentials.toml");
    if !args.insecure {
        CredentialsFile::for_files(&admin.ca, &admin.cert, &admin.key).write(&credentials)?;
    }

    let mut grpc = Vec::new();
    let mut peers = Vec::new();
    for i in 0..REPLICAS {
        let address = format!("127.0.0.1:{}", port(args.port, i, "port")?);
        peers.push(PeerConfig {
            id: u64::from(i) + 1,
            address: address.clone(),
        });
        grpc.push(address);
    }
    let mut replicas = Vec::new();
    for i in 0..REPLICAS {
        let mut cfg = SchedulerConfig {
            node_id: u64::from(i) + 1,
            cluster_id: CLUSTER.into(),
            listen_address: grpc[usize::from(i)].clone(),
            metrics_address: format!("127.0.0.1:{}", port(args.metrics_port, i, "metrics-port")?),
            data_dir: args
                .data_dir
                .join(format!("scheduler-{}", i + 1))
                .display()
                .to_string(),
            peers: peers.clone(),
            tls: issue(&format!("replica/{}", i + 1))?,
            ..SchedulerConfig::default()
        };
        if let Some(p) = &pki {
            cfg.auth.ca_key = p.ca_key_path().display().to_string();
        }
        cfg.liveness.node_ttl_ms = args.node_ttl_ms;
        cfg.liveness.leader_grace_ms = args.node_ttl_ms;
        cfg.liveness.heartbeat_interval_ms = (args.node_ttl_ms / 5).max(50);
        cfg.liveness.node_disconnect_grace_ms = args.node_disconnect_grace_ms;
        cfg.sessions.gpu_pause_filesystem_only = args.gpu_pause_filesystem_only;
        cfg.sessions.standby_pause_after_ms =
            u64::try_from(args.standby_pause_after.as_millis()).unwrap_or(u64::MAX);
        cfg.sessions.snapshot_retention_ms =
            u64::try_from(args.snapshot_retention.as_millis()).unwrap_or(u64::MAX);
        let running = berth_scheduler::service::start(&cfg)
            .await
            .map_err(|e| format!("replica {}: {e}", i + 1))?;
        replicas.push(running);
    }

    let shim = crate::commands::agent::shim_command()?;
    let (stop_agents, agents_stop) = watch::channel(false);
    let mut agents = Vec::new();
    let registries: Vec<berth_node_agent::image::RegistryConfig> = args
        .insecure_registries
        .iter()
        .map(|host| berth_node_agent::image::RegistryConfig {
            host: host.clone(),
            insecure: true,
            ..Default::default()
        })
        .collect();
    let snapshot_repository = args.snapshot_repository.clone().unwrap_or_else(|| {
        args.insecure_registries
            .first()
            .map(|host| format!("{host}/berth-snapshots"))
            .unwrap_or_default()
    });
    if !snapshot_repository.is_empty()
        && !berth_node_agent::config::snapshot_repository_ok(&snapshot_repository)
    {
        return Err(format!(
            "--snapshot-repository {snapshot_repository:?}: not `host[:port]/path` (a registry \
             host, then lowercase path components; no tag or digest)"
        ));
    }
    for (i, node) in static_nodes.iter().copied().enumerate() {
        let metrics_port = if args.agent_metrics_port == 0 {
            0
        } else {
            port(args.agent_metrics_port, i as u16, "agent-metrics-port")?
        };
        let cfg = AgentConfig {
            node_id: node.id.into(),
            schedulers: grpc.clone(),
            provider: node.provider.into(),
            region: node.region.into(),
            zone: node.zone.into(),
            instance_type: node.instance_type.into(),
            price_per_hour_usd: node.price_per_hour_usd,
            inventory: InventorySource::Static(PathBuf::from(node.inventory)),
            runtime: runtime_kind,
            state_dir: args
                .data_dir
                .join("agents")
                .join(node.id)
                .display()
                .to_string(),
            reserved_cpu_milli: 0,
            reserved_memory_mib: 0,
            registries: registries.clone(),
            snapshot_repository: snapshot_repository.clone(),
            metrics_address: format!("127.0.0.1:{metrics_port}"),
            tls: issue(&format!("node/{}", node.id))?,
            ..AgentConfig::default()
        };
        let opts = AgentOptions {
            config_dir: inventories.clone(),
            shim: shim.clone(),
            stop_sandboxes_on_exit: true,
        };
        let mut stop = agents_stop.clone();
        let id = node.id;
        agents.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = agent::run(cfg, opts, shutdown).await {
                tracing::error!(node = id, error = %e, "agent failed");
            }
        }));
    }

    let autoscaler = if args.no_autoscaler {
        None
    } else {
        let mut cfg = autoscaler_config(args, &grpc, runtime_kind)?;
        cfg.tls = issue("autoscaler/dev")?;
        let node_tls = pki.clone().map(|p| {
            Arc::new(move |node: &str| {
                p.issue(&format!("node/{node}"))
                    .map_err(|e| format!("pki: {e}"))
            }) as crate::commands::autoscaler::NodeTls
        });
        let groups: Vec<String> = cfg
            .node_groups
            .iter()
            .map(|g| format!("{} ({}..={} nodes)", g.name, g.min_nodes, g.max_nodes))
            .collect();
        let metrics = format!(
            "127.0.0.1:{}",
            port(args.metrics_port, REPLICAS, "metrics-port")?
        );
        let mut stop = agents_stop.clone();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let holder = crate::commands::autoscaler::default_holder();
            crate::commands::autoscaler::serve(cfg, holder, &metrics, node_tls, shutdown).await
        });
        Some((task, groups))
    };

    let admin_tls = Tls::load(&admin).map_err(|e| format!("pki: {e}"))?;
    let ready = wait_for_nodes(
        &grpc,
        admin_tls.clone(),
        static_nodes.len(),
        Duration::from_secs(30),
    )
    .await;
    print_banner(
        args,
        &grpc,
        &runtime_note,
        ready.as_ref().err(),
        autoscaler.as_ref().map(|(_, g)| g.as_slice()),
        (!args.insecure).then_some(credentials.as_path()),
    );

    crate::commands::scheduler::shutdown_signal().await;
    println!("\nberth dev: stopping the autoscaler, sandboxes, agents and replicas…");
    let _ = stop_agents.send(true);
    if let Some((task, _)) = autoscaler {
        match task.await {
            Ok(Err(e)) => eprintln!("berth dev: autoscaler: {e}"),
            Err(e) => eprintln!("berth dev: autoscaler task: {e}"),
            Ok(Ok(())) => {}
        }
    }
    for a in agents {
        let _ = a.await;
    }
    for r in replicas {
        r.shutdown().await;
    }
    println!("berth dev: stopped");
    Ok(())
}

/// The autoscaler dev runs: the `[autoscaler]` of `--autoscaler-config`, or two local
/// groups that start at zero (8×H100 and 1×L4 boxes as `berth agent` processes).
fn autoscaler_config(
    args: &DevArgs,
    grpc: &[String],
    runtime: RuntimeKind,
) -> Result<AutoscalerConfig, String> {
    let mut cfg = match &args.autoscaler_config {
        Some(path) => crate::config_file::ConfigFile::dev_autoscaler(path, grpc)?,
        None => {
            let group =
                |name: &str, instance: &str, model: &str, gpus: u32, price: f64| NodeGroupConfig {
                    name: name.into(),
                    provider: "local".into(),
                    region: "local-1".into(),
                    instance_type: instance.into(),
                    gpu_model: Some(model.into()),
                    gpu_count: gpus,
                    cpu_milli: 16_000 * u64::from(gpus),
                    memory_mib: 65_536 * u64::from(gpus),
                    price_per_hour_usd: price,
                    capacity_type: CapacityType::OnDemand,
                    min_nodes: 0,
                    max_nodes: 4,
                    labels: BTreeMap::new(),
                };
            AutoscalerConfig {
                interval_ms: 1_000,
                scale_down_cooldown_s: args.scale_down_cooldown_s,
                budget_usd_per_hour: 1_000.0,
                providers: BTreeMap::from([(
                    "local".to_string(),
                    ProviderConfig::Local {
                        work_dir: args.data_dir.join("local-provider").display().to_string(),
                        runtime: match runtime {
                            RuntimeKind::Gvisor => "gvisor".into(),
                            RuntimeKind::Process => "process".into(),
                        },
                    },
                )]),
                node_groups: vec![
                    group("local-h100", "local.8xh100", "H100", 8, 98.32),
                    group("local-l4", "local.1xl4", "L4", 1, 0.85),
                ],
                ..AutoscalerConfig::default()
            }
        }
    };
    cfg.schedulers = grpc.to_vec();
    Ok(cfg)
}

/// The static agents `args` asks for; an `--only-node` that is not one of them is an error
/// naming the ones there are.
fn static_nodes(args: &DevArgs) -> Result<Vec<&'static DevNode>, String> {
    if args.no_static_nodes {
        return Ok(Vec::new());
    }
    if args.only_nodes.is_empty() {
        return Ok(NODES.iter().collect());
    }
    if let Some(twice) = args
        .only_nodes
        .iter()
        .enumerate()
        .find_map(|(i, id)| args.only_nodes[..i].contains(id).then_some(id))
    {
        return Err(format!("--only-node {twice} is given twice"));
    }
    args.only_nodes
        .iter()
        .map(|id| {
            NODES.iter().find(|n| n.id == id.as_str()).ok_or_else(|| {
                let ids: Vec<&str> = NODES.iter().map(|n| n.id).collect();
                format!(
                    "--only-node {id}: no such dev node (there are {})",
                    ids.join(", ")
                )
            })
        })
        .collect()
}

/// Waits until `count` nodes are Ready (or 30 s pass).
/// Waits until `count` nodes are Ready, or says how many were after `limit`.
pub(crate) async fn wait_for_nodes(
    grpc: &[String],
    tls: Option<Tls>,
    count: usize,
    limit: Duration,
) -> Result<(), String> {
    let mut client = Client::new(grpc.to_vec())
        .with_credentials(berth_net::client::Credentials { tls, token: None })?;
    client.deadline = Duration::from_secs(5);
    let started = Instant::now();
    loop {
        let ready = client
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .map(|r| {
                r.nodes
                    .iter()
                    .filter(|n| n.status == pb::NodeStatus::Ready as i32)
                    .count()
            });
        match ready {
            Ok(n) if n >= count => return Ok(()),
            _ if started.elapsed() > limit => {
                return Err(format!(
                    "only {} of {count} nodes registered within {} s",
                    ready.unwrap_or(0),
                    limit.as_secs()
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn print_banner(
    args: &DevArgs,
    grpc: &[String],
    runtime: &str,
    problem: Option<&String>,
    autoscaler: Option<&[String]>,
    credentials: Option<&std::path::Path>,
) {
    let endpoint = &grpc[0];
    let default_endpoint = endpoint == "127.0.0.1:7070";
    let e = if default_endpoint {
        String::new()
    } else {
        format!(" --endpoint {endpoint}")
    };
    let metrics: Vec<String> = (0..REPLICAS)
        .map(|i| {
            format!(
                "http://127.0.0.1:{}/metrics",
                u32::from(args.metrics_port) + u32::from(i)
            )
        })
        .collect();
    println!();
    println!("berth dev is up");
    if let Some(p) = problem {
        println!("  warning:   {p}");
    }
    println!(
        "  API:       {} (gRPC; any replica, followers redirect)",
        grpc.join(", ")
    );
    println!("  metrics:   {}", metrics.join(", "));
    println!("  runtime:   {runtime}");
    match credentials {
        Some(path) => {
            println!(
                "  security:  mutual TLS 1.3; CA {}/pki/ca.pem",
                args.data_dir.display()
            );
            println!(
                "             admin credentials {} (the CLI finds them when run here,",
                path.display()
            );
            println!(
                "             elsewhere: export BERTH_CREDENTIALS={})",
                path.display()
            );
        }
        None => {
            println!("  security:  OFF (--insecure): no TLS, NO AUTHENTICATION; anyone who");
            println!("             reaches these ports is an admin. Use the CLI with --insecure.");
        }
    }
    if args.no_static_nodes {
        println!("  nodes:     none static (--no-static-nodes)");
    } else if !args.only_nodes.is_empty() {
        println!("  nodes:     {} (--only-node)", args.only_nodes.join(", "));
    } else {
        println!(
            "  nodes:     2 × 8×H100 (aws us-east-1, gcp us-central1), 1 × 8×B200 (gcp us-central1),"
        );
        println!("             2 × 1×L4 (gcp europe-west4), 2 × 4×T4 (aws us-west-2)");
    }
    match autoscaler {
        Some(groups) => {
            println!("  autoscaler: local provider, groups {}", groups.join(", "));
            println!(
                "             metrics http://127.0.0.1:{}/metrics",
                u32::from(args.metrics_port) + u32::from(REPLICAS)
            );
        }
        None => println!("  autoscaler: off (--no-autoscaler)"),
    }
    println!("  state:     {}", args.data_dir.display());
    println!();
    println!("try, from another terminal:");
    println!("  berth node list{e}");
    println!("  berth sandbox create{e} --gpu H100:2 -- sh -c 'echo $CUDA_VISIBLE_DEVICES'");
    println!("  berth sandbox create{e} --gpu T4 --detach -- sleep 600");
    println!("  berth sandbox list{e}");
    println!("  berth cluster status{e}");
    println!("(with cargo: cargo run --release -- node list{e})");
    println!();
    println!("Ctrl-C stops everything.");
}
