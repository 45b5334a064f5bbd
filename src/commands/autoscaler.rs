//! `berth autoscaler --config FILE`: the autoscaler as its own process. It waits for the
//! autoscaler lease in the scheduler's replicated state and, while it holds it, grows and
//! shrinks the node groups of the file's `[autoscaler]` section through their providers.
//! SIGINT or SIGTERM stops it (and the agents of a local provider).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use berth_autoscaler::AutoscalerConfig;
use berth_autoscaler::controller::{Controller, unix_ms};
use berth_autoscaler::metrics::Metrics;
use berth_autoscaler::policy::decide::GROUP_LABEL;
use berth_autoscaler::provider::local::LocalNode;
use berth_autoscaler::provider::{self, Environment, sim::SimClock};
use berth_node_agent::AgentConfig;
use berth_node_agent::agent::find_program;
use berth_node_agent::config::{InventorySource, RuntimeKind};
use berth_proto::GpuModelName;

use crate::config_file::ConfigFile;
use crate::exit::EXIT_FAILURE;

/// Arguments of `berth autoscaler`.
#[derive(Debug, Args)]
pub(crate) struct AutoscalerArgs {
    /// Config file with an [autoscaler] section.
    #[arg(long)]
    config: PathBuf,
    /// Where to serve /metrics; empty for nowhere.
    #[arg(long, default_value = "127.0.0.1:9190")]
    metrics_address: String,
    /// This instance's name in the lease (default: hostname/pid/start time).
    #[arg(long)]
    holder: Option<String>,
}

pub(crate) fn run(args: &AutoscalerArgs) -> ExitCode {
    let file = match ConfigFile::load(&args.config) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let Some(cfg) = file.autoscaler else {
        eprintln!("{}: no [autoscaler] section", args.config.display());
        return ExitCode::from(EXIT_FAILURE);
    };
    let holder = args.holder.clone().unwrap_or_else(default_holder);
    let metrics_address = args.metrics_address.clone();
    super::run_service("autoscaler", async move {
        let shutdown = super::scheduler::shutdown_signal();
        serve(cfg, holder, &metrics_address, None, shutdown).await
    })
}

/// This process's default lease name.
pub(crate) fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}/{}/{}", std::process::id(), unix_ms())
}

/// Runs an autoscaler until `shutdown`, then stops the local provider's agents.
pub(crate) async fn serve(
    cfg: AutoscalerConfig,
    holder: String,
    metrics_address: &str,
    node_tls: Option<NodeTls>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let tls = berth_net::Tls::load(&cfg.tls).map_err(|e| format!("autoscaler.tls: {e}"))?;
    match &tls {
        Some(t) => t.spawn_reloader(),
        None => tracing::warn!("autoscaler.tls.insecure = true: plaintext to the replicas"),
    }
    let agents_tls = match (&tls, node_tls) {
        (None, _) => AgentTls::Insecure,
        (Some(_), Some(f)) => AgentTls::Issue(f),
        (Some(_), None) => AgentTls::Unavailable,
    };
    let env = Environment {
        berth_binary: std::env::current_exe()
            .map_err(|e| format!("cannot find the berth binary for local agents: {e}"))?,
        schedulers: cfg.schedulers.clone(),
        sim_clock: SimClock::new(),
        call_timeout: Duration::from_secs(30),
        agent_config: Some(Arc::new(move |node: &LocalNode<'_>| {
            write_agent_files(node, &agents_tls)
        })),
        tls: tls.clone(),
    };
    let built = provider::build(&cfg, &env).await?;
    // A sim provider outside the simulator runs in real time.
    let clock = env.sim_clock.clone();
    let ticker = tokio::spawn(async move {
        let start = unix_ms();
        loop {
            clock.set(unix_ms().saturating_sub(start));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let metrics = Metrics::new();
    let server = if metrics_address.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(metrics_address)
            .await
            .map_err(|e| format!("metrics address {metrics_address}: {e}"))?;
        tracing::info!(address = %metrics_address, "autoscaler metrics on /metrics");
        Some(tokio::spawn(metrics.clone().serve(listener)))
    };
    tracing::info!(%holder, groups = cfg.node_groups.len(), "autoscaler starting");
    Controller::new(cfg, built.providers, holder, metrics, tls)
        .run(shutdown)
        .await;
    ticker.abort();
    if let Some(s) = server {
        s.abort();
    }
    for local in built.local {
        local.shutdown().await;
    }
    Ok(())
}

/// Issues a node certificate for a node id (the local provider's agents under `berth dev`).
pub(crate) type NodeTls = Arc<dyn Fn(&str) -> Result<berth_net::TlsSettings, String> + Send + Sync>;

/// What the local provider's agents authenticate with.
pub(crate) enum AgentTls {
    /// The cluster is insecure.
    Insecure,
    /// Certificates are issued by `berth dev`'s CA.
    Issue(NodeTls),
    /// The cluster is secure but this process cannot issue node certificates.
    Unavailable,
}

/// The local provider's agent files for one node: a static inventory of the group's
/// instance type (GPUs named as NVML names them) and an `[agent]` config that uses it,
/// with a node certificate when the cluster is secure.
pub(crate) fn write_agent_files(node: &LocalNode<'_>, tls: &AgentTls) -> Result<PathBuf, String> {
    let tls = match tls {
        AgentTls::Insecure => berth_net::TlsSettings::insecure(),
        AgentTls::Issue(issue) => issue(node.id)?,
        AgentTls::Unavailable => {
            return Err(
                "the local provider's agents need node certificates: run it under \
                 berth dev (which holds a CA), or with autoscaler.tls.insecure = true"
                    .into(),
            );
        }
    };
    let (group, dir) = (node.group, node.dir);
    let io = |what: &str, e: std::io::Error| format!("{what} {}: {e}", dir.display());
    let mut inventory = format!(
        "# {} ({}), written by the local provider.\ncpu_milli = {}\nmemory_mib = {}\n",
        group.instance_type, group.name, group.cpu_milli, group.memory_mib
    );
    if let (Some(model), true) = (&group.gpu_model, group.gpu_count > 0) {
        let model = GpuModelName::resolve(model);
        let (product, memory) = model.known().map_or_else(
            || (model.as_str().to_owned(), 0),
            |m| {
                let info = m.info();
                let product = info
                    .nvml_product_names
                    .first()
                    .copied()
                    .unwrap_or(info.name);
                (product.to_owned(), info.memory_mib)
            },
        );
        inventory.push_str(&format!(
            "\n[[gpus]]\nproduct_name = {product:?}\nmemory_mib = {memory}\ncount = {}\n",
            group.gpu_count
        ));
    }
    std::fs::write(dir.join("inventory.toml"), inventory)
        .map_err(|e| io("writing the inventory in", e))?;
    let runtime = match node.runtime {
        "gvisor" => RuntimeKind::Gvisor,
        "process" => RuntimeKind::Process,
        _ if find_program("runsc").is_some() => RuntimeKind::Gvisor,
        _ => RuntimeKind::Process,
    };
    let mut labels = group.labels.clone();
    labels.insert(GROUP_LABEL.into(), group.name.clone());
    let agent = AgentConfig {
        node_id: node.id.to_owned(),
        schedulers: node.schedulers.to_vec(),
        provider: group.provider.clone(),
        region: group.region.clone(),
        instance_type: group.instance_type.clone(),
        capacity_type: group.capacity_type,
        price_per_hour_usd: group.price_per_hour_usd,
        inventory: InventorySource::Static(PathBuf::from("inventory.toml")),
        runtime,
        state_dir: dir.join("state").display().to_string(),
        reserved_cpu_milli: 0,
        reserved_memory_mib: 0,
        labels,
        tls,
        ..AgentConfig::default()
    };
    #[derive(serde::Serialize)]
    struct File {
        agent: AgentConfig,
    }
    let body = toml::to_string(&File { agent }).map_err(|e| e.to_string())?;
    let config = dir.join("agent.toml");
    std::fs::write(&config, body).map_err(|e| io("writing the agent config in", e))?;
    Ok(config)
}
