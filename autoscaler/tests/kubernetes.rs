//! The `kubernetes` provider against an in-process fake Kubernetes API server.
//!
//! No Kubernetes API server runs in berth's test environment, so [`Fake`] stands in for one:
//! an axum server on 127.0.0.1 that keeps Cluster API `MachineDeployment`s and `Machine`s in
//! memory and speaks the real HTTP API and JSON shapes: the `scale` subresource as
//! `autoscaling/v1` `Scale` objects with optimistic concurrency on `resourceVersion` (409 with
//! a `Status` body on a stale write), `MachineList`s filtered by `labelSelector`, and JSON
//! merge patches of Machines. Like CAPI's MachineSet controller it creates Machines when
//! replicas rise and, when they drop, deletes those annotated `cluster.x-k8s.io/delete-machine`
//! first (then the newest). Knobs inject conflicts (another writer bumps the
//! `resourceVersion` between the provider's read and write) and failed requests (5xx, 403).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use serde_json::{Value, json};

use berth_autoscaler::config::NodeGroupConfig;
use berth_autoscaler::provider::kubernetes::{KubernetesProvider, RetryPolicy};
use berth_autoscaler::provider::{InstanceState, Provider, ProviderError, ProviderNode};
use berth_proto::node::CapacityType;

const NS: &str = "berth";
const DEPLOYMENT_LABEL: &str = "cluster.x-k8s.io/deployment-name";
const DELETE_ANNOTATION: &str = "cluster.x-k8s.io/delete-machine";

#[derive(Default)]
struct World {
    /// The etcd revision: every write takes the next one.
    revision: u64,
    /// (namespace, name) → (replicas, resourceVersion).
    deployments: BTreeMap<(String, String), (i32, u64)>,
    /// Machine name → the Machine as JSON (namespace `NS`).
    machines: BTreeMap<String, Value>,
    next_machine: u64,
    /// Machines the fake deleted, with their annotations at the time.
    deleted: Vec<(String, Value)>,
    /// The next this many scale PUTs find their resourceVersion stale.
    conflicts: u32,
    /// The next requests fail with these (code, reason, message).
    faults: Vec<(u16, &'static str, String)>,
    failed: u32,
    /// "METHOD path" of every request.
    log: Vec<String>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<World>>);

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    let code = StatusCode::from_u16(code).expect("valid status code");
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(body: &Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn not_found(resource: &str, name: &str) -> Response {
    let message = format!("{resource}.cluster.x-k8s.io \"{name}\" not found");
    status(404, "NotFound", &message)
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (key, value) in fields {
        let object = target.as_object_mut().expect("made an object above");
        if value.is_null() {
            object.remove(key);
        } else {
            merge(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Decodes one `application/x-www-form-urlencoded` query component.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ascii");
                out.push(u8::from_str_radix(hex, 16).expect("percent escape"));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("utf-8 query")
}

impl World {
    fn write(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    fn scale(&self, ns: &str, name: &str) -> Option<Value> {
        let (replicas, rv) = *self.deployments.get(&(ns.to_owned(), name.to_owned()))?;
        let running = self.machines_of(name).len();
        // Like the real API server, `spec.replicas: 0` is omitted (omitempty).
        let spec = if replicas == 0 {
            json!({})
        } else {
            json!({ "replicas": replicas })
        };
        Some(json!({
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": { "name": name, "namespace": ns, "resourceVersion": rv.to_string() },
            "spec": spec,
            "status": { "replicas": running, "selector": format!("{DEPLOYMENT_LABEL}={name}") },
        }))
    }

    fn machines_of(&self, deployment: &str) -> Vec<String> {
        self.machines
            .iter()
            .filter(|(_, m)| m["metadata"]["labels"][DEPLOYMENT_LABEL] == deployment)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// What the MachineSet controller does: as many Machines as replicas.
    fn reconcile(&mut self, deployment: &str, replicas: i32) {
        let mut have = self.machines_of(deployment);
        let want = usize::try_from(replicas).expect("replicas >= 0");
        while have.len() < want {
            self.next_machine += 1;
            let name = format!("{deployment}-m{}", self.next_machine);
            let rv = self.write();
            let machine = json!({
                "apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "Machine",
                "metadata": {
                    "name": name, "namespace": NS, "resourceVersion": rv.to_string(),
                    "labels": { DEPLOYMENT_LABEL: deployment, "cluster.x-k8s.io/cluster-name": "gpu" },
                    "annotations": {},
                },
                "spec": { "clusterName": "gpu" },
                "status": { "phase": "Provisioning" },
            });
            self.machines.insert(name.clone(), machine);
            have.push(name);
        }
        // Marked Machines go first, then the newest (creation order = the counter).
        let order = |name: &String| {
            let marked = self.machines[name]["metadata"]["annotations"]
                .get(DELETE_ANNOTATION)
                .is_some();
            let n: u64 = name
                .rsplit('m')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            (!marked, std::cmp::Reverse(n))
        };
        have.sort_by_key(order);
        for name in have
            .into_iter()
            .take(self.machines_of(deployment).len().saturating_sub(want))
        {
            let machine = self.machines.remove(&name).expect("listed above");
            self.deleted
                .push((name, machine["metadata"]["annotations"].clone()));
            self.write();
        }
    }
}

async fn faults(State(fake): State<Fake>, request: Request, next: Next) -> Response {
    let fault = {
        let mut world = fake.world();
        world
            .log
            .push(format!("{} {}", request.method(), request.uri().path()));
        if world.faults.is_empty() {
            None
        } else {
            world.failed += 1;
            Some(world.faults.remove(0))
        }
    };
    match fault {
        Some((code, reason, message)) => status(code, reason, &message),
        None => next.run(request).await,
    }
}

async fn get_scale(State(fake): State<Fake>, Path((ns, name)): Path<(String, String)>) -> Response {
    match fake.world().scale(&ns, &name) {
        Some(scale) => ok(&scale),
        None => not_found("machinedeployments", &name),
    }
}

async fn put_scale(
    State(fake): State<Fake>,
    Path((ns, name)): Path<(String, String)>,
    body: String,
) -> Response {
    let Ok(scale) = serde_json::from_str::<Value>(&body) else {
        return status(400, "BadRequest", "body is not JSON");
    };
    if scale["kind"] != "Scale" || scale["apiVersion"] != "autoscaling/v1" {
        return status(400, "BadRequest", "expected an autoscaling/v1 Scale");
    }
    let mut world = fake.world();
    let key = (ns.clone(), name.clone());
    if !world.deployments.contains_key(&key) {
        return not_found("machinedeployments", &name);
    }
    if world.conflicts > 0 {
        // Another writer got in between the provider's GET and this PUT.
        world.conflicts -= 1;
        let rv = world.write();
        world.deployments.get_mut(&key).expect("checked").1 = rv;
    }
    let current = world.deployments[&key].1.to_string();
    match scale["metadata"]["resourceVersion"].as_str() {
        Some(rv) if !rv.is_empty() && rv != current => {
            let message = format!(
                "Operation cannot be fulfilled on machinedeployments.cluster.x-k8s.io \"{name}\": \
                 the object has been modified; please apply your changes to the latest version \
                 and try again"
            );
            return status(409, "Conflict", &message);
        }
        _ => {}
    }
    let replicas = scale["spec"]["replicas"].as_i64().unwrap_or(0);
    let Ok(replicas) = i32::try_from(replicas) else {
        return status(422, "Invalid", "spec.replicas out of range");
    };
    if replicas < 0 {
        return status(
            422,
            "Invalid",
            "spec.replicas: must be greater than or equal to 0",
        );
    }
    let rv = world.write();
    world.deployments.insert(key, (replicas, rv));
    world.reconcile(&name, replicas);
    ok(&world.scale(&ns, &name).expect("exists"))
}

async fn list_machines(State(fake): State<Fake>, Path(ns): Path<String>, uri: Uri) -> Response {
    let selector: Vec<(String, String)> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(key, _)| *key == "labelSelector")
        .flat_map(|(_, value)| {
            decode(value)
                .split(',')
                .filter_map(|term| term.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    let world = fake.world();
    let items: Vec<Value> = world
        .machines
        .values()
        .filter(|m| m["metadata"]["namespace"] == ns.as_str())
        .filter(|m| {
            selector
                .iter()
                .all(|(k, v)| m["metadata"]["labels"][k] == v.as_str())
        })
        .cloned()
        .collect();
    ok(&json!({
        "apiVersion": "cluster.x-k8s.io/v1beta1", "kind": "MachineList",
        "metadata": { "resourceVersion": world.revision.to_string() },
        "items": items,
    }))
}

async fn patch_machine(
    State(fake): State<Fake>,
    Path((ns, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        != Some("application/merge-patch+json")
    {
        return status(
            415,
            "UnsupportedMediaType",
            "this fake takes merge patches only",
        );
    }
    let Ok(patch) = serde_json::from_str::<Value>(&body) else {
        return status(400, "BadRequest", "body is not JSON");
    };
    let mut world = fake.world();
    let rv = world.write();
    let Some(machine) = world.machines.get_mut(&name).filter(|_| ns == NS) else {
        return not_found("machines", &name);
    };
    merge(machine, &patch);
    machine["metadata"]["name"] = json!(name);
    machine["metadata"]["resourceVersion"] = json!(rv.to_string());
    ok(machine)
}

impl Fake {
    fn world(&self) -> MutexGuard<'_, World> {
        self.0.lock().expect("fake lock")
    }

    /// Serves on 127.0.0.1 and returns a client for it (kube's own retries off).
    async fn start() -> (Fake, kube::Client) {
        let fake = Fake::default();
        let base = "/apis/cluster.x-k8s.io/v1beta1/namespaces/{ns}";
        let app = Router::new()
            .route(
                &format!("{base}/machinedeployments/{{name}}/scale"),
                get(get_scale).put(put_scale),
            )
            .route(&format!("{base}/machines"), get(list_machines))
            .route(&format!("{base}/machines/{{name}}"), patch(patch_machine))
            .layer(middleware::from_fn_with_state(fake.clone(), faults))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        let mut config = kube::Config::new(format!("http://{addr}").parse().expect("uri"));
        config.default_namespace = NS.into();
        config.default_retry = false;
        let client = kube::Client::try_from(config).expect("client");
        (fake, client)
    }

    fn add_deployment(&self, name: &str, replicas: i32) {
        let mut world = self.world();
        let rv = world.write();
        world
            .deployments
            .insert((NS.into(), name.into()), (replicas, rv));
        world.reconcile(name, replicas);
    }

    fn replicas(&self, name: &str) -> i32 {
        self.world().deployments[&(NS.to_owned(), name.to_owned())].0
    }

    fn machine_names(&self, deployment: &str) -> Vec<String> {
        self.world().machines_of(deployment)
    }

    /// The infrastructure came up: every Provisioning Machine runs, with a node.
    fn boot_all(&self) {
        let mut world = self.world();
        let rv = world.write().to_string();
        for (name, machine) in world.machines.iter_mut() {
            if machine["status"]["phase"] == "Provisioning" {
                let status = json!({
                    "phase": "Running",
                    "nodeRef": { "apiVersion": "v1", "kind": "Node", "name": format!("node-{name}") },
                });
                merge(
                    machine,
                    &json!({ "status": status, "metadata": { "resourceVersion": rv } }),
                );
            }
        }
    }

    /// Merge-patches a Machine as another controller would.
    fn patch(&self, machine: &str, patch: Value) {
        let mut world = self.world();
        merge(
            world.machines.get_mut(machine).expect("machine exists"),
            &patch,
        );
        world.write();
    }

    fn inject_conflicts(&self, n: u32) {
        self.world().conflicts = n;
    }

    fn fail_next(&self, code: u16, reason: &'static str, message: &str, n: usize) {
        let mut world = self.world();
        world
            .faults
            .extend(std::iter::repeat_n((code, reason, message.to_owned()), n));
    }

    fn failed(&self) -> u32 {
        self.world().failed
    }

    /// Requests whose "METHOD path" ends with `suffix`.
    fn count(&self, method: Method, suffix: &str) -> usize {
        let prefix = format!("{method} ");
        self.world()
            .log
            .iter()
            .filter(|line| line.starts_with(&prefix) && line.ends_with(suffix))
            .count()
    }
}

fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
    }
}

fn group(name: &str) -> NodeGroupConfig {
    NodeGroupConfig {
        name: name.into(),
        provider: "capi".into(),
        region: "us-east-1".into(),
        instance_type: "p5.48xlarge".into(),
        gpu_model: Some("H100".into()),
        gpu_count: 8,
        cpu_milli: 192_000,
        memory_mib: 2_000_000,
        price_per_hour_usd: 98.32,
        capacity_type: CapacityType::Spot,
        min_nodes: 0,
        max_nodes: 16,
        labels: BTreeMap::new(),
    }
}

async fn setup(attempts: u32) -> (Fake, KubernetesProvider) {
    let (fake, client) = Fake::start().await;
    let provider = KubernetesProvider::with_client(client, NS).with_retry(fast_retry(attempts));
    (fake, provider)
}

fn node(id: &str, state: InstanceState, interruption_notice: bool) -> ProviderNode {
    ProviderNode {
        id: id.into(),
        state,
        interruption_notice,
    }
}

#[tokio::test]
async fn scale_up_from_zero_creates_machines_that_list_shows() {
    let (fake, provider) = setup(5).await;
    fake.add_deployment("gpu-a", 0);
    let gpu_a = group("gpu-a");

    provider.scale_up(&gpu_a, 3).await.expect("scale up");
    assert_eq!(fake.replicas("gpu-a"), 3);
    // Before the nodes exist, ids are the Machine names.
    let nodes = provider.list(&gpu_a).await.expect("list");
    assert_eq!(
        nodes,
        ["gpu-a-m1", "gpu-a-m2", "gpu-a-m3"].map(|id| node(id, InstanceState::Provisioning, false))
    );

    fake.boot_all();
    let nodes = provider.list(&gpu_a).await.expect("list");
    assert_eq!(
        nodes,
        ["node-gpu-a-m1", "node-gpu-a-m2", "node-gpu-a-m3"].map(|id| node(
            id,
            InstanceState::Running,
            false
        ))
    );

    // A group can name its MachineDeployment with a label.
    let mut renamed = group("gpus-east");
    renamed
        .labels
        .insert("cluster.x-k8s.io/machine-deployment".into(), "gpu-a".into());
    provider.scale_up(&renamed, 2).await.expect("scale up");
    assert_eq!(fake.replicas("gpu-a"), 5);
    assert_eq!(provider.list(&renamed).await.expect("list").len(), 5);
}

#[tokio::test]
async fn a_conflict_is_re_read_and_retried_without_double_counting() {
    let (fake, provider) = setup(5).await;
    fake.add_deployment("gpu-a", 2);
    fake.inject_conflicts(1);

    provider
        .scale_up(&group("gpu-a"), 3)
        .await
        .expect("scale up");
    assert_eq!(fake.replicas("gpu-a"), 5, "exactly +3, not +6");
    assert_eq!(fake.count(Method::PUT, "/scale"), 2);
    assert_eq!(
        fake.count(Method::GET, "/scale"),
        2,
        "re-read after the 409"
    );
    assert_eq!(fake.machine_names("gpu-a").len(), 5);

    // A conflict on every attempt: transient, and nothing was written.
    fake.inject_conflicts(100);
    let err = provider
        .scale_up(&group("gpu-a"), 1)
        .await
        .expect_err("conflicts persist");
    assert_eq!(err.class(), "transient", "{err}");
    assert!(err.to_string().contains("409"), "{err}");
    assert_eq!(fake.count(Method::PUT, "/scale"), 2 + 5);
    assert_eq!(fake.replicas("gpu-a"), 5);
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff_then_give_up_as_transient() {
    let (fake, provider) = setup(3).await;
    fake.add_deployment("gpu-a", 0);
    fake.fail_next(500, "InternalError", "etcdserver: request timed out", 1);
    fake.fail_next(
        503,
        "ServiceUnavailable",
        "the server is currently unable",
        1,
    );

    let started = Instant::now();
    provider
        .scale_up(&group("gpu-a"), 1)
        .await
        .expect("third try works");
    assert!(
        started.elapsed() >= Duration::from_millis(10 + 20),
        "backed off 10 ms then 20 ms, took {:?}",
        started.elapsed()
    );
    assert_eq!(fake.failed(), 2);
    assert_eq!(fake.replicas("gpu-a"), 1);

    // More failures than attempts: the provider stops after 3 and says transient.
    fake.fail_next(
        503,
        "ServiceUnavailable",
        "the server is currently unable",
        10,
    );
    let err = provider
        .scale_up(&group("gpu-a"), 1)
        .await
        .expect_err("out of attempts");
    assert_eq!(err.class(), "transient", "{err}");
    let message = err.to_string();
    assert!(message.contains("HTTP 503"), "{message}");
    assert!(
        message.contains("MachineDeployment berth/gpu-a"),
        "{message}"
    );
    assert_eq!(fake.failed(), 2 + 3);
    assert_eq!(fake.replicas("gpu-a"), 1);
}

#[tokio::test]
async fn remove_marks_exactly_those_machines_and_lowers_the_scale() {
    let (fake, provider) = setup(5).await;
    fake.add_deployment("gpu-a", 4);
    fake.boot_all();
    let gpu_a = group("gpu-a");

    let doomed = ["node-gpu-a-m2".to_owned(), "node-gpu-a-m4".to_owned()];
    let mut asked = doomed.to_vec();
    asked.push("node-of-another-group".into()); // skipped with a warning
    provider.remove(&gpu_a, &asked).await.expect("remove");

    assert_eq!(fake.replicas("gpu-a"), 2);
    assert_eq!(fake.count(Method::PATCH, "/machines/gpu-a-m2"), 1);
    assert_eq!(fake.count(Method::PATCH, "/machines/gpu-a-m4"), 1);
    // Without the annotation the fake (like CAPI's "Newest" policy) would take m4 and m3.
    let mut deleted = fake.world().deleted.clone();
    deleted.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<&str> = deleted.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["gpu-a-m2", "gpu-a-m4"]);
    for (_, annotations) in &deleted {
        assert_eq!(annotations[DELETE_ANNOTATION], "yes");
    }
    assert_eq!(fake.machine_names("gpu-a"), ["gpu-a-m1", "gpu-a-m3"]);
    let ids: Vec<String> = provider
        .list(&gpu_a)
        .await
        .expect("list")
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(ids, ["node-gpu-a-m1", "node-gpu-a-m3"]);

    // Only unknown ids: nothing is written.
    let puts = fake.count(Method::PUT, "/scale");
    provider
        .remove(&gpu_a, &["node-gone".to_owned()])
        .await
        .expect("remove");
    assert_eq!(fake.count(Method::PUT, "/scale"), puts);
    assert_eq!(fake.replicas("gpu-a"), 2);
}

#[tokio::test]
async fn an_unknown_machine_deployment_is_permanent_and_named() {
    let (_fake, provider) = setup(5).await;
    let err = provider
        .scale_up(&group("gpu-missing"), 1)
        .await
        .expect_err("no such deployment");
    assert_eq!(err.class(), "permanent");
    let message = err.to_string();
    assert!(
        message.contains("MachineDeployment berth/gpu-missing not found"),
        "{message}"
    );
    assert!(message.contains("404"), "{message}");
}

#[tokio::test]
async fn quota_and_forbidden_are_classified_without_retrying() {
    let (fake, provider) = setup(5).await;
    fake.add_deployment("gpu-a", 0);
    let quota = "exceeded quota: gpu-quota, requested: count/machines=1, used: 4, limited: 4";
    fake.fail_next(403, "Forbidden", quota, 1);
    let err = provider
        .scale_up(&group("gpu-a"), 1)
        .await
        .expect_err("quota");
    assert_eq!(
        err,
        ProviderError::Quota(format!(
            "GET scale of MachineDeployment berth/gpu-a: HTTP 403 Forbidden: {quota}"
        ))
    );

    let rbac = "machinedeployments.cluster.x-k8s.io \"gpu-a\" is forbidden: User \"x\" cannot get";
    fake.fail_next(403, "Forbidden", rbac, 1);
    let err = provider
        .scale_up(&group("gpu-a"), 1)
        .await
        .expect_err("forbidden");
    assert_eq!(err.class(), "permanent");
    assert!(err.to_string().contains("HTTP 403"), "{err}");
    assert_eq!(fake.failed(), 2, "neither was retried");
    assert_eq!(fake.replicas("gpu-a"), 0);
}

#[tokio::test]
async fn list_maps_phases_and_interruption_notices() {
    let (fake, provider) = setup(5).await;
    fake.add_deployment("gpu-a", 6);
    fake.boot_all();
    fake.patch(
        "gpu-a-m2",
        json!({ "metadata": { "annotations": { "berth.dev/spot-interruption": "2025-06-01T12:00:00Z" } } }),
    );
    let condition = |status: &str| {
        json!({ "status": { "conditions": [
            { "type": "Ready", "status": "True" },
            { "type": "berth.dev/SpotInterruption", "status": status, "reason": "RebalanceRecommendation" },
        ] } })
    };
    fake.patch("gpu-a-m3", condition("True"));
    fake.patch("gpu-a-m4", condition("False"));
    fake.patch("gpu-a-m5", json!({ "status": { "phase": "Failed" } }));
    fake.patch(
        "gpu-a-m6",
        json!({ "metadata": { "deletionTimestamp": "2025-06-01T12:00:00Z" } }),
    );

    let nodes = provider.list(&group("gpu-a")).await.expect("list");
    assert_eq!(
        nodes,
        [
            node("node-gpu-a-m1", InstanceState::Running, false),
            node("node-gpu-a-m2", InstanceState::Running, true),
            node("node-gpu-a-m3", InstanceState::Running, true),
            node("node-gpu-a-m4", InstanceState::Running, false),
            node("node-gpu-a-m5", InstanceState::Failed, false),
            node("node-gpu-a-m6", InstanceState::Deleting, false),
        ]
    );
}

#[tokio::test]
async fn connection_errors_are_retried_then_transient() {
    // A port with nothing listening: every connect is refused.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    drop(listener);
    let mut config = kube::Config::new(format!("http://{addr}").parse().expect("uri"));
    config.default_retry = false;
    let client = kube::Client::try_from(config).expect("client");
    let provider = KubernetesProvider::with_client(client, NS).with_retry(fast_retry(3));

    let started = Instant::now();
    let err = provider
        .list(&group("gpu-a"))
        .await
        .expect_err("nothing listens");
    assert_eq!(err.class(), "transient", "{err}");
    assert!(err.to_string().contains("connection error"), "{err}");
    assert!(err.to_string().contains("3 attempts"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(10 + 20));
}
