//! What the benches on `berth dev` share: dev on gVisor and one node, started as a child,
//! with a busybox image in a local `docker-registry` ([`BenchDev`]), and waiting for a
//! sandbox to reach a state ([`until`]). `bench resume` and `bench pool` use them.

use std::time::{Duration, Instant};

use berth_node_agent::image::ImageProcess;
use berth_node_agent::image::testing::{self, TestRegistry};
use berth_proto::pb::v1 as pb;
use berth_scheduler::service::client::Client;

use super::bench_burst::{dev_client, spawn_dev_with, wait_up};

/// The one node the benches run on (8 CPUs, one L4).
pub(crate) const NODE: &str = "gcp-euw4-g2-0";
/// How often a sandbox's state is polled while the bench waits for it.
const POLL: Duration = Duration::from_millis(5);

/// `berth dev` on gVisor and one node, started here as a child, pulling a busybox image
/// (`sh` its cmd) from a local `docker-registry`; the benches' common ground.
pub(crate) struct BenchDev {
    /// The busybox image's reference.
    pub(crate) image: String,
    /// A client with dev's admin credentials and a 60 s deadline.
    pub(crate) client: Client,
    _registry: TestRegistry,
    _dev: super::bench_burst::Dev,
}

impl BenchDev {
    /// Starts the registry (pushing the image with layer `layer`) and dev with `extra`
    /// arguments on ports from `base_port`, and waits for its node.
    pub(crate) async fn start(
        dir: &std::path::Path,
        base_port: u16,
        layer: &str,
        extra: &[String],
    ) -> Result<BenchDev, String> {
        let registry = TestRegistry::start().map_err(|e| {
            format!(
                "{e} (the bench runs Debian's docker-registry: apt-get install docker-registry)"
            )
        })?;
        let image = format!("{}/busybox:1", registry.address);
        testing::push(
            &image,
            vec![testing::busybox_layer(layer).map_err(|e| e.to_string())?],
            &ImageProcess {
                cmd: vec!["sh".into()],
                env: vec!["PATH=/bin".into()],
                ..ImageProcess::default()
            },
        )
        .await
        .map_err(|e| format!("pushing the bench image: {e}"))?;
        let mut dev_args = vec![
            format!("--only-node={NODE}"),
            format!("--insecure-registry={}", registry.address),
        ];
        dev_args.extend_from_slice(extra);
        let (dev, endpoints) = spawn_dev_with(dir, base_port, "gvisor", 5_000, &dev_args)?;
        wait_up(&endpoints, 1, dir).await?;
        let mut client = dev_client(dir, endpoints).await?;
        client.deadline = Duration::from_secs(60);
        Ok(BenchDev {
            image,
            client,
            _registry: registry,
            _dev: dev,
        })
    }
}

/// Polls until sandbox `id` is in `want`; how long since `since`.
pub(crate) async fn until(
    client: &mut Client,
    id: &str,
    want: pb::SandboxState,
    since: Instant,
) -> Result<Duration, String> {
    loop {
        let s = client.get(id).await.map_err(|s| s.message().to_owned())?;
        let status = s.status.unwrap_or_default();
        if status.state == want as i32 {
            return Ok(since.elapsed());
        }
        if since.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "{id} did not reach {want:?} (it is {}: {})",
                status.state, status.reason
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}
