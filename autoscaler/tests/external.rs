//! The `external` provider against a real `ProviderService` over loopback gRPC: an
//! in-memory cloud that keeps nodes per group, with knobs to answer the next `ScaleUp`
//! with a stockout or a quota error.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_autoscaler::config::NodeGroupConfig;
use berth_autoscaler::provider::external::{
    ExternalProvider, error_to_status, provider_node_to_pb,
};
use berth_autoscaler::provider::{InstanceState, Provider, ProviderError, ProviderNode};
use berth_net::tls::pki::LocalPki;
use berth_proto::node::CapacityType;
use berth_proto::pb::v1 as pb;
use berth_proto::pb::v1::provider_service_server::{ProviderService, ProviderServiceServer};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// What the next `ScaleUp` answers instead of creating nodes.
#[derive(Debug, Clone)]
enum Fail {
    Stockout,
    Quota,
    /// RESOURCE_EXHAUSTED with no `berth-provider-error` metadata.
    BareExhausted,
    /// A status code that is neither exhausted nor retryable.
    Status(tonic::Code),
}

#[derive(Default)]
struct State {
    /// Nodes per group name.
    nodes: BTreeMap<String, Vec<ProviderNode>>,
    /// Next node number per group.
    next: BTreeMap<String, u32>,
    /// Every group received in a ScaleUp, in order.
    scale_up_groups: Vec<(pb::NodeGroup, u32)>,
    /// Answer the next ScaleUp with this.
    fail_next_scale_up: Option<Fail>,
    /// ScaleUp waits this long before answering.
    scale_up_delay: Duration,
    /// ListNodes answers these instead of the real nodes.
    list_override: Option<Vec<pb::ProviderNode>>,
}

#[derive(Clone, Default)]
struct FakeCloud(Arc<Mutex<State>>);

impl FakeCloud {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }
}

fn group_name(group: Option<&pb::NodeGroup>) -> Result<String, Status> {
    match group {
        Some(g) if !g.name.is_empty() => Ok(g.name.clone()),
        _ => Err(Status::invalid_argument("group: must be set")),
    }
}

#[tonic::async_trait]
impl ProviderService for FakeCloud {
    async fn scale_up(
        &self,
        request: Request<pb::ScaleUpRequest>,
    ) -> Result<Response<pb::ScaleUpResponse>, Status> {
        let request = request.into_inner();
        let name = group_name(request.group.as_ref())?;
        let delay = self.state().scale_up_delay;
        tokio::time::sleep(delay).await;
        let mut state = self.state();
        if let Some(fail) = state.fail_next_scale_up.take() {
            return Err(match fail {
                Fail::Stockout => {
                    error_to_status(&ProviderError::Stockout(format!("no capacity for {name}")))
                }
                Fail::Quota => error_to_status(&ProviderError::Quota("vCPU quota 0".into())),
                Fail::BareExhausted => Status::resource_exhausted("limit"),
                Fail::Status(code) => Status::new(code, "nope"),
            });
        }
        state
            .scale_up_groups
            .push((request.group.clone().unwrap(), request.count));
        let mut ids = Vec::new();
        for _ in 0..request.count {
            let n = state.next.entry(name.clone()).or_insert(0);
            let id = format!("{name}-{n}");
            *n += 1;
            state
                .nodes
                .entry(name.clone())
                .or_default()
                .push(ProviderNode {
                    id: id.clone(),
                    state: InstanceState::Provisioning,
                    interruption_notice: false,
                });
            ids.push(id);
        }
        Ok(Response::new(pb::ScaleUpResponse { node_ids: ids }))
    }

    async fn remove_nodes(
        &self,
        request: Request<pb::RemoveNodesRequest>,
    ) -> Result<Response<pb::RemoveNodesResponse>, Status> {
        let request = request.into_inner();
        let name = group_name(request.group.as_ref())?;
        let mut state = self.state();
        if let Some(nodes) = state.nodes.get_mut(&name) {
            nodes.retain(|n| !request.node_ids.contains(&n.id));
        }
        Ok(Response::new(pb::RemoveNodesResponse {}))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListProviderNodesRequest>,
    ) -> Result<Response<pb::ListProviderNodesResponse>, Status> {
        let name = group_name(request.get_ref().group.as_ref())?;
        let state = self.state();
        let nodes = match &state.list_override {
            Some(nodes) => nodes.clone(),
            None => state
                .nodes
                .get(&name)
                .map(|nodes| nodes.iter().map(provider_node_to_pb).collect())
                .unwrap_or_default(),
        };
        Ok(Response::new(pb::ListProviderNodesResponse { nodes }))
    }
}

/// A CA with a certificate for the fake cloud (`provider/fake`) and one for the
/// autoscaler: the provider protocol runs over mutual TLS as in production.
struct Pki {
    _dir: tempfile::TempDir,
    server: berth_net::Tls,
    client: berth_net::Tls,
}

fn pki() -> &'static Pki {
    static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalPki::create(dir.path(), "test").unwrap();
        let load = |role: &str| {
            berth_net::Tls::load(&ca.issue(role).unwrap())
                .unwrap()
                .unwrap()
        };
        Pki {
            server: load("provider/fake"),
            client: load("autoscaler/test"),
            _dir: dir,
        }
    })
}

/// Serves a fresh fake cloud on 127.0.0.1:0 with `tls`; returns it and its `host:port`.
async fn serve_with(tls: berth_net::Tls) -> (FakeCloud, String) {
    let cloud = FakeCloud::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let server = berth_net::server(&berth_net::NetConfig::peer())
        .add_service(ProviderServiceServer::new(cloud.clone()))
        .serve_with_incoming(berth_net::incoming(listener, Some(tls)));
    tokio::spawn(server);
    (cloud, address)
}

async fn serve() -> (FakeCloud, String) {
    serve_with(pki().server.clone()).await
}

fn client(address: &str) -> ExternalProvider {
    ExternalProvider::connect_lazy_tls(address, Duration::from_secs(5), Some(&pki().client))
        .unwrap()
}

#[tokio::test]
async fn a_provider_with_a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other = LocalPki::create(dir.path(), "test").unwrap();
    let impostor = berth_net::Tls::load(&other.issue("provider/fake").unwrap())
        .unwrap()
        .unwrap();
    let (cloud, address) = serve_with(impostor).await;
    let error = client(&address)
        .scale_up(&group("aws-a"), 1)
        .await
        .unwrap_err();
    assert!(error.to_string().contains(&address), "{error}");
    assert!(
        cloud.state().nodes.is_empty(),
        "the impostor was never called"
    );
}

fn group(name: &str) -> NodeGroupConfig {
    NodeGroupConfig {
        name: name.into(),
        provider: "ext".into(),
        region: "us-east-1".into(),
        instance_type: "p5.48xlarge".into(),
        gpu_model: Some("H100".into()),
        gpu_count: 8,
        cpu_milli: 192_000,
        memory_mib: 2_000_000,
        price_per_hour_usd: 98.32,
        capacity_type: CapacityType::Spot,
        min_nodes: 0,
        max_nodes: 4,
        labels: BTreeMap::from([
            ("team".into(), "research".into()),
            ("zone".into(), "use1-az4".into()),
        ]),
    }
}

fn ids(nodes: &[ProviderNode]) -> Vec<&str> {
    nodes.iter().map(|n| n.id.as_str()).collect()
}

#[tokio::test]
async fn scale_up_list_and_remove() {
    let (_cloud, address) = serve().await;
    let provider = client(&address);
    let a = group("aws-a");
    let b = group("aws-b");

    provider.scale_up(&a, 2).await.unwrap();
    provider.scale_up(&b, 1).await.unwrap();
    let nodes = provider.list(&a).await.unwrap();
    assert_eq!(ids(&nodes), ["aws-a-0", "aws-a-1"]);
    assert!(nodes.iter().all(|n| n.state == InstanceState::Provisioning));
    assert!(nodes.iter().all(|n| !n.interruption_notice));
    assert_eq!(ids(&provider.list(&b).await.unwrap()), ["aws-b-0"]);

    provider.remove(&a, &["aws-a-0".into()]).await.unwrap();
    assert_eq!(ids(&provider.list(&a).await.unwrap()), ["aws-a-1"]);
    assert_eq!(ids(&provider.list(&b).await.unwrap()), ["aws-b-0"]);
    assert!(provider.list(&group("aws-c")).await.unwrap().is_empty());
}

#[tokio::test]
async fn node_group_arrives_intact() {
    let (cloud, address) = serve().await;
    let provider = client(&address);
    let mut cpu = group("cpu-od");
    cpu.gpu_model = None;
    cpu.gpu_count = 0;
    cpu.capacity_type = CapacityType::OnDemand;
    cpu.labels.clear();

    provider.scale_up(&group("gpu-spot"), 3).await.unwrap();
    provider.scale_up(&cpu, 1).await.unwrap();

    let received = cloud.state().scale_up_groups.clone();
    let expected = pb::NodeGroup {
        name: "gpu-spot".into(),
        region: "us-east-1".into(),
        instance_type: "p5.48xlarge".into(),
        gpu_model: "H100".into(),
        gpu_count: 8,
        cpu_milli: 192_000,
        memory_mib: 2_000_000,
        price_per_hour_usd: 98.32,
        capacity_type: pb::CapacityType::Spot.into(),
        labels: HashMap::from([
            ("team".into(), "research".into()),
            ("zone".into(), "use1-az4".into()),
        ]),
    };
    assert_eq!(received.len(), 2);
    assert_eq!(received[0], (expected, 3));
    let (cpu_received, count) = &received[1];
    assert_eq!(*count, 1);
    assert_eq!(cpu_received.gpu_model, "");
    assert_eq!(cpu_received.gpu_count, 0);
    assert_eq!(
        cpu_received.capacity_type,
        i32::from(pb::CapacityType::OnDemand)
    );
    assert!(cpu_received.labels.is_empty());
}

#[tokio::test]
async fn stockout_and_quota_are_classified() {
    let (cloud, address) = serve().await;
    let provider = client(&address);
    let g = group("aws-a");

    cloud.state().fail_next_scale_up = Some(Fail::Stockout);
    let error = provider.scale_up(&g, 2).await.unwrap_err();
    assert!(matches!(error, ProviderError::Stockout(_)), "{error:?}");
    assert_eq!(error.class(), "stockout");
    let message = error.to_string();
    assert!(message.contains(&address), "{message}");
    assert!(message.contains("ScaleUp"), "{message}");
    assert!(message.contains("no capacity for aws-a"), "{message}");
    assert!(provider.list(&g).await.unwrap().is_empty());

    cloud.state().fail_next_scale_up = Some(Fail::Quota);
    let error = provider.scale_up(&g, 2).await.unwrap_err();
    assert!(matches!(error, ProviderError::Quota(_)), "{error:?}");
    assert_eq!(error.class(), "quota");
    assert!(error.to_string().contains("vCPU quota 0"), "{error}");

    cloud.state().fail_next_scale_up = Some(Fail::BareExhausted);
    let error = provider.scale_up(&g, 2).await.unwrap_err();
    assert_eq!(error.class(), "quota", "{error}");

    cloud.state().fail_next_scale_up = Some(Fail::Status(tonic::Code::Unavailable));
    let error = provider.scale_up(&g, 2).await.unwrap_err();
    assert_eq!(error.class(), "transient", "{error}");

    cloud.state().fail_next_scale_up = Some(Fail::Status(tonic::Code::PermissionDenied));
    let error = provider.scale_up(&g, 2).await.unwrap_err();
    assert!(matches!(error, ProviderError::Permanent(_)), "{error:?}");

    // The knob answers one call only: the next scale-up goes through.
    provider.scale_up(&g, 1).await.unwrap();
    assert_eq!(ids(&provider.list(&g).await.unwrap()), ["aws-a-0"]);
}

#[tokio::test]
async fn unreachable_service_is_transient() {
    // Bind then drop a listener: the port is free and nothing listens on it.
    let address = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let provider = client(&address);
    let g = group("aws-a");
    for error in [
        provider.scale_up(&g, 1).await.unwrap_err(),
        provider.list(&g).await.unwrap_err(),
        provider.remove(&g, &["aws-a-0".into()]).await.unwrap_err(),
    ] {
        assert!(matches!(error, ProviderError::Transient(_)), "{error:?}");
        assert!(error.to_string().contains(&address), "{error}");
    }
}

#[tokio::test]
async fn slow_answers_are_transient() {
    let (cloud, address) = serve().await;
    cloud.state().scale_up_delay = Duration::from_secs(10);
    let provider = ExternalProvider::connect_lazy(&address, Duration::from_millis(300)).unwrap();
    let started = std::time::Instant::now();
    let error = provider.scale_up(&group("g"), 1).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(error, ProviderError::Transient(_)), "{error:?}");
    assert_eq!(
        error.to_string(),
        format!("transient: external provider {address}: ScaleUp: no answer within 300 ms")
    );
}

#[tokio::test]
async fn protocol_violations_are_permanent() {
    let (cloud, address) = serve().await;
    let provider = client(&address);
    let node = |id: &str, state: pb::ProviderNodeState| pb::ProviderNode {
        id: id.into(),
        state: state.into(),
        interruption_notice: false,
    };
    for (nodes, expected) in [
        (
            vec![node("n-0", pb::ProviderNodeState::Unspecified)],
            "node \"n-0\" has state PROVIDER_NODE_STATE_UNSPECIFIED",
        ),
        (
            vec![node("", pb::ProviderNodeState::Running)],
            "a node has an empty id",
        ),
        (
            vec![
                node("n-0", pb::ProviderNodeState::Running),
                node("n-0", pb::ProviderNodeState::Deleting),
            ],
            "node \"n-0\" is listed twice",
        ),
    ] {
        cloud.state().list_override = Some(nodes);
        let error = provider.list(&group("g")).await.unwrap_err();
        assert!(matches!(error, ProviderError::Permanent(_)), "{error:?}");
        assert!(error.to_string().contains(expected), "{error}");
        assert!(error.to_string().contains("ListNodes"), "{error}");
    }

    // Every state and the interruption notice come through.
    cloud.state().list_override = Some(vec![
        node("a", pb::ProviderNodeState::Provisioning),
        node("b", pb::ProviderNodeState::Running),
        pb::ProviderNode {
            interruption_notice: true,
            ..node("c", pb::ProviderNodeState::Running)
        },
        node("d", pb::ProviderNodeState::Deleting),
        node("e", pb::ProviderNodeState::Failed),
    ]);
    let states: Vec<(String, InstanceState, bool)> = provider
        .list(&group("g"))
        .await
        .unwrap()
        .into_iter()
        .map(|n| (n.id, n.state, n.interruption_notice))
        .collect();
    assert_eq!(
        states,
        [
            ("a".into(), InstanceState::Provisioning, false),
            ("b".into(), InstanceState::Running, false),
            ("c".into(), InstanceState::Running, true),
            ("d".into(), InstanceState::Deleting, false),
            ("e".into(), InstanceState::Failed, false),
        ]
    );
}

#[tokio::test]
async fn invalid_endpoints_are_permanent() {
    for endpoint in ["", "http://127.0.0.1:7400", "not a host:1"] {
        let error = ExternalProvider::connect_lazy(endpoint, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(error, ProviderError::Permanent(_)), "{error:?}");
        assert!(
            error.to_string().contains(&format!("{endpoint:?}")),
            "{error}"
        );
    }
}

#[test]
fn connecting_outside_a_runtime_is_an_error_not_a_panic() {
    let error = ExternalProvider::connect_lazy("127.0.0.1:1", Duration::from_secs(1)).unwrap_err();
    assert_eq!(error.class(), "permanent");
}
