//! The autoscaler controller against a real one-replica `berth scheduler` process, with
//! the seeded `sim` provider standing in for clouds: the lease lets one instance act at a
//! time, a stockout moves demand to the next group in the same round, and a spot
//! interruption notice cordons the node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use berth_autoscaler::AutoscalerConfig;
use berth_autoscaler::config::{NodeGroupConfig, ProviderConfig, SimCloudConfig, SimStockout};
use berth_autoscaler::controller::{Controller, unix_ms};
use berth_autoscaler::metrics::Metrics;
use berth_autoscaler::policy::decide::template;
use berth_autoscaler::provider::Provider;
use berth_autoscaler::provider::sim::{SimClock, SimCloud};
use berth_autoscaler::testing::h100_group;
use berth_proto::GpuRequest;
use berth_proto::node::CapacityType;
use berth_proto::pb::v1 as pb;
use berth_scheduler::convert;
use berth_scheduler::model::NodeSpec;
use berth_scheduler::service::client::Client;

mod common;
use common::single_replica;

fn group(name: &str, provider: &str, region: &str, price: f64) -> NodeGroupConfig {
    NodeGroupConfig {
        provider: provider.into(),
        region: region.into(),
        ..h100_group(name, 0, 10, price)
    }
}

fn config(
    endpoints: Vec<String>,
    providers: &[(&str, SimCloudConfig)],
    groups: Vec<NodeGroupConfig>,
) -> AutoscalerConfig {
    AutoscalerConfig {
        schedulers: endpoints,
        interval_ms: 100,
        providers: providers
            .iter()
            .map(|(n, c)| (n.to_string(), ProviderConfig::Sim(c.clone())))
            .collect(),
        node_groups: groups,
        ..AutoscalerConfig::default()
    }
}

/// The autoscaler's certificate in `cluster`.
fn autoscaler_tls(
    cluster: &berth_scheduler::service::local_cluster::LocalCluster,
) -> Option<berth_net::Tls> {
    let pki = cluster.pki()?;
    let settings = pki
        .issue("autoscaler/test")
        .expect("autoscaler certificate");
    berth_net::Tls::load(&settings).expect("load it")
}

fn controller(
    cfg: &AutoscalerConfig,
    clock: &SimClock,
    holder: &str,
    tls: Option<berth_net::Tls>,
) -> Controller {
    let providers: BTreeMap<String, Arc<dyn Provider>> = cfg
        .providers
        .iter()
        .filter_map(|(name, p)| match p {
            ProviderConfig::Sim(sim) => Some((
                name.clone(),
                Arc::new(SimCloud::new(name, sim.clone(), clock.clone())) as Arc<dyn Provider>,
            )),
            _ => None,
        })
        .collect();
    Controller::new(cfg.clone(), providers, holder.into(), Metrics::new(), tls)
}

async fn create_h100(client: &mut Client, n: usize) {
    let gpu = GpuRequest::parse(&["H100:1"], None).expect("a request");
    for i in 0..n {
        let spec = pb::SandboxSpec {
            tenant: "acme".into(),
            command: vec!["true".into()],
            resources: Some(pb::Resources {
                cpu_milli: 1_000,
                memory_mib: 1_024,
                gpu: Some(berth_proto::convert::gpu_request_to_pb(&gpu)),
            }),
            ..Default::default()
        };
        client.create(&format!("r{i}"), spec).await.expect("create");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_acts_and_another_takes_over_when_it_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;
    let mut g = group("g", "sim", "r1", 10.0);
    g.min_nodes = 1;
    let cfg = config(
        cluster.endpoints(),
        &[("sim", SimCloudConfig::default())],
        vec![g],
    );
    let clock = SimClock::new();
    let mut a = controller(&cfg, &clock, "a", autoscaler_tls(&cluster));
    let mut b = controller(&cfg, &clock, "b", autoscaler_tls(&cluster));

    let ra = a.round(unix_ms()).await.expect("round a");
    assert!(ra.held);
    assert_eq!(ra.scaled_up, [("g".to_string(), 1)], "{ra:?}");
    let rb = b.round(unix_ms()).await.expect("round b");
    assert!(!rb.held, "b must wait while a holds the lease: {rb:?}");
    assert!(rb.scaled_up.is_empty());
    let ra = a.round(unix_ms()).await.expect("round a");
    assert!(ra.held, "a renews");

    // a stops renewing; its 2 s lease lapses and b takes over.
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let rb = b.round(unix_ms()).await.expect("round b");
    assert!(rb.held, "b takes the lapsed lease: {rb:?}");
    let ra = a.round(unix_ms()).await.expect("round a");
    assert!(!ra.held, "a is now the one waiting");

    let status = cluster.client().status().await.expect("status");
    assert_eq!(status.autoscaler_holder, "b");
    assert!(
        status
            .recent_autoscaler_decisions
            .iter()
            .any(|l| l.ends_with("scale-up g +1: min_nodes 1 (has 0)")),
        "{:?}",
        status.recent_autoscaler_decisions
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stockout_moves_demand_to_the_next_region_in_the_same_round() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;
    let aws = SimCloudConfig {
        stockouts: vec![SimStockout {
            region: "us-east-1".into(),
            instance_type: String::new(),
            start_s: 0,
            end_s: 1_000_000,
        }],
        ..SimCloudConfig::default()
    };
    let cfg = config(
        cluster.endpoints(),
        &[("aws", aws), ("gcp", SimCloudConfig::default())],
        vec![
            group("aws-east", "aws", "us-east-1", 90.0),
            group("gcp-central", "gcp", "us-central1", 95.0),
            group("aws-west", "aws", "us-west-2", 100.0),
        ],
    );
    let clock = SimClock::new();
    clock.set(5_000_000);
    let mut c = controller(&cfg, &clock, "a", autoscaler_tls(&cluster));
    let mut client = cluster.client();
    create_h100(&mut client, 12).await;

    let report = c.round(unix_ms()).await.expect("round");
    assert_eq!(
        report.scaled_up,
        [("aws-west".to_string(), 2)],
        "aws-east is out of stock; the same provider's next region is tried before gcp: {report:?}"
    );
    assert!(
        report
            .lines
            .iter()
            .any(|l| l.contains("scale-up aws-east +2 failed (stockout")),
        "{:?}",
        report.lines
    );
    assert!(
        report
            .lines
            .iter()
            .any(|l| l.contains("scale-up aws-west +2")
                && l.contains("failover: aws-east backing off")),
        "{:?}",
        report.lines
    );
    // The next round buys nothing more: the two nodes are in flight.
    let report = c.round(unix_ms()).await.expect("round");
    assert!(report.scaled_up.is_empty(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_interruption_notice_cordons_the_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;
    let sim = SimCloudConfig {
        delay_s_min: 1,
        delay_s_max: 1,
        // A mean of 36 s between interruptions: the 120 s notice shows at once.
        spot_interruptions_per_hour: 100.0,
        ..SimCloudConfig::default()
    };
    let mut spot = group("spot", "sim", "r1", 30.0);
    spot.capacity_type = CapacityType::Spot;
    spot.min_nodes = 1;
    let cfg = config(cluster.endpoints(), &[("sim", sim)], vec![spot.clone()]);
    let clock = SimClock::new();
    let mut c = controller(&cfg, &clock, "a", autoscaler_tls(&cluster));
    let report = c.round(unix_ms()).await.expect("round");
    assert_eq!(report.scaled_up, [("spot".to_string(), 1)]);

    // The node boots and its agent registers.
    clock.set(1_000);
    let id = "sim-spot-0";
    let t = template(&spot);
    let spec = NodeSpec {
        id: id.into(),
        gpus: NodeSpec::uniform_gpus(id, &t.gpus[0].model, t.gpus[0].memory_mib, 8),
        ..t
    };
    let mut client = cluster.client();
    client
        .register_node(convert::node_inventory_to_pb(&spec))
        .await
        .expect("register");

    let report = c.round(unix_ms()).await.expect("round");
    assert_eq!(report.cordoned, [id.to_string()], "{report:?}");
    let nodes = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .expect("nodes")
        .nodes;
    assert_eq!(
        nodes[0].status,
        pb::NodeStatus::Cordoned as i32,
        "{nodes:?}"
    );
    assert!(
        nodes[0].status_reason.contains("spot interruption"),
        "{nodes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_registers_is_released_and_demand_moves_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;
    // The cloud accepts requests but takes an hour to deliver.
    let slow = SimCloudConfig {
        delay_s_min: 3_600,
        delay_s_max: 3_600,
        ..SimCloudConfig::default()
    };
    let mut cfg = config(
        cluster.endpoints(),
        &[("slow", slow), ("fast", SimCloudConfig::default())],
        vec![
            group("slow-g", "slow", "r1", 10.0),
            group("fast-g", "fast", "r2", 20.0),
        ],
    );
    cfg.provision_timeout_s = 1;
    let clock = SimClock::new();
    let mut c = controller(&cfg, &clock, "a", autoscaler_tls(&cluster));
    create_h100(&mut cluster.client(), 4).await;

    let t0 = unix_ms();
    let report = c.round(t0).await.expect("round");
    assert_eq!(
        report.scaled_up,
        [("slow-g".to_string(), 1)],
        "cheapest first"
    );
    let report = c.round(t0 + 500).await.expect("round");
    assert!(report.scaled_up.is_empty(), "in flight: {report:?}");
    let report = c.round(t0 + 1_500).await.expect("round");
    assert!(
        report
            .lines
            .iter()
            .any(|l| l.contains("released slow-slow-g-0 in slow-g")
                && l.contains("provision_timeout_s")),
        "{:?}",
        report.lines
    );
    assert_eq!(
        report.scaled_up,
        [("fast-g".to_string(), 1)],
        "the demand moves on in the same round: {report:?}"
    );
}

/// Two `berth autoscaler` processes: one holds the lease and acts, the other waits; kill
/// the holder and the other takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_autoscaler_processes_one_acts_and_the_other_takes_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = single_replica(dir.path()).await;
    let config = dir.path().join("autoscaler.toml");
    let pki = cluster.pki().expect("a TLS cluster");
    let tls = pki
        .issue("autoscaler/procs")
        .expect("autoscaler certificate");
    std::fs::write(
        &config,
        format!(
            r#"
[autoscaler]
schedulers = ["{}"]
interval_ms = 200

[autoscaler.tls]
ca = "{}"
cert = "{}"
key = "{}"

[autoscaler.providers.sim]
kind = "sim"

[[autoscaler.node_groups]]
name = "g"
provider = "sim"
region = "r1"
instance_type = "8xH100"
gpu_model = "H100"
gpu_count = 8
cpu_milli = 64000
memory_mib = 262144
price_per_hour_usd = 10.0
min_nodes = 1
max_nodes = 4
"#,
            cluster.endpoints()[0],
            tls.ca,
            tls.cert,
            tls.key
        ),
    )
    .expect("config");
    let start = |holder: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["autoscaler", "--config"])
            .arg(&config)
            .args(["--metrics-address", "", "--holder", holder])
            .stderr(std::fs::File::create(dir.path().join(format!("{holder}.log"))).expect("log"))
            .spawn()
            .expect("spawn berth autoscaler")
    };
    let mut one = start("one");
    let mut two = start("two");
    let mut client = cluster.client();
    let holder = |wanted: Option<&'static str>| {
        let mut client = cluster.client();
        async move {
            for _ in 0..100 {
                let status = client.status().await.expect("status");
                let held = status.autoscaler_lease_expires_unix_ms > unix_ms();
                match wanted {
                    Some(w) if held && status.autoscaler_holder == w => return status,
                    None if held && !status.autoscaler_holder.is_empty() => return status,
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            panic!("no holder {wanted:?}");
        }
    };
    let status = holder(None).await;
    let first = status.autoscaler_holder.clone();
    let (acting, waiting, second) = if first == "one" {
        (&mut one, &mut two, "two")
    } else {
        (&mut two, &mut one, "one")
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    let status = client.status().await.expect("status");
    assert_eq!(
        status.autoscaler_holder, first,
        "the holder keeps it while alive"
    );
    let scaled: Vec<&String> = status
        .recent_autoscaler_decisions
        .iter()
        .filter(|l| l.contains("scale-up g +1: min_nodes 1"))
        .collect();
    assert_eq!(
        scaled.len(),
        1,
        "one instance acted, once: {:?}",
        status.recent_autoscaler_decisions
    );

    acting.kill().expect("kill the holder");
    let _ = acting.wait();
    let status = holder(Some(if second == "two" { "two" } else { "one" })).await;
    assert_eq!(status.autoscaler_holder, second);
    waiting.kill().expect("kill");
    let _ = waiting.wait();
}
