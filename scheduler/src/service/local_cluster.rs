//! A cluster of real `berth scheduler` processes on loopback, each with its own data
//! directory: what `berth bench create` and the multi-process tests run against.
//!
//! Processes are killed with SIGKILL (`kill -9`) on [`LocalCluster::kill`] and on drop.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_proto::pb::v1 as pb;

use berth_net::Tls;
use berth_net::client::Credentials;
use berth_net::tls::pki::LocalPki;

use super::client::Client;

/// Settings of a local cluster.
#[derive(Debug, Clone)]
pub struct LocalClusterConfig {
    /// The `berth` binary.
    pub binary: PathBuf,
    /// Replicas.
    pub replicas: usize,
    /// Raft tick.
    pub tick_ms: u64,
    /// Election timeout in ticks.
    pub election_ticks: usize,
    /// Log filter of the processes.
    pub log_level: String,
    /// Extra lines appended to every `[scheduler]` section (e.g. batching settings).
    pub extra: String,
    /// Run without TLS (`[scheduler.tls] insecure = true`), e.g. to measure what TLS costs.
    pub insecure: bool,
    /// Extra lines of every `[scheduler.auth]` section (e.g. `node_cert_ttl_s = 60`).
    pub auth_extra: String,
}

impl LocalClusterConfig {
    /// Defaults: 3 replicas, 50 ms ticks, 10-tick elections (0.5–1 s).
    pub fn new(binary: impl Into<PathBuf>) -> LocalClusterConfig {
        LocalClusterConfig {
            binary: binary.into(),
            replicas: 3,
            tick_ms: 50,
            election_ticks: 10,
            log_level: "warn".into(),
            extra: String::new(),
            insecure: false,
            auth_extra: String::new(),
        }
    }
}

/// One replica process.
pub struct Member {
    /// Raft id.
    pub id: u64,
    /// gRPC address.
    pub address: String,
    /// Metrics address.
    pub metrics_address: String,
    /// Config file.
    pub config: PathBuf,
    /// Log file (stderr of the process).
    pub log: PathBuf,
    child: Option<Child>,
}

/// A running local cluster.
pub struct LocalCluster {
    cfg: LocalClusterConfig,
    /// The replicas.
    pub members: Vec<Member>,
    dir: PathBuf,
    pki: Option<LocalPki>,
    admin: Option<Tls>,
}

/// A free port below Linux's ephemeral range (32768–60999), so that after a replica is
/// killed no outgoing connection can be handed its port before it restarts. Each process
/// starts at its own offset; a port is taken only if it can be bound now.
fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 600) * 20;
    for _ in 0..12_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (base - 20_000 + n) % 12_000;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return Ok(port as u16);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port in 20000..32000",
    ))
}

fn tls_section(pki: Option<&LocalPki>, id: u64, auth_extra: &str) -> std::io::Result<String> {
    let Some(pki) = pki else {
        return Ok("[scheduler.tls]\ninsecure = true\n".into());
    };
    let s = pki
        .issue(&format!("replica/{id}"))
        .map_err(std::io::Error::other)?;
    Ok(format!(
        "[scheduler.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
         [scheduler.auth]\nca_key = \"{}\"\n{auth_extra}\n",
        s.ca,
        s.cert,
        s.key,
        pki.ca_key_path().display()
    ))
}

fn write_config(
    cfg: &LocalClusterConfig,
    dir: &Path,
    m: &Member,
    peers: &[String],
    join: bool,
    pki: Option<&LocalPki>,
) -> std::io::Result<()> {
    let tls = tls_section(pki, m.id, &cfg.auth_extra)?;
    let text = format!(
        "[scheduler]\nnode_id = {}\ncluster_id = \"local\"\nlisten_address = \"{}\"\n\
         metrics_address = \"{}\"\ndata_dir = \"{}\"\npeers = [{}]\njoin = {join}\n{}\n\
         [scheduler.raft]\ntick_ms = {}\nelection_ticks = {}\nheartbeat_ticks = 2\n{tls}",
        m.id,
        m.address,
        m.metrics_address,
        dir.join(format!("data-{}", m.id)).display(),
        peers.join(", "),
        cfg.extra,
        cfg.tick_ms,
        cfg.election_ticks,
    );
    fs::write(&m.config, text)
}

impl LocalCluster {
    /// Starts one more replica with `join = true` (empty, waiting to be added with
    /// `AddPeer`); returns its index.
    pub fn add_member(&mut self) -> std::io::Result<usize> {
        let id = self.members.iter().map(|m| m.id).max().unwrap_or(0) + 1;
        let member = Member {
            id,
            address: format!("127.0.0.1:{}", free_port()?),
            metrics_address: format!("127.0.0.1:{}", free_port()?),
            config: self.dir.join(format!("scheduler-{id}.toml")),
            log: self.dir.join(format!("scheduler-{id}.log")),
            child: None,
        };
        let peers: Vec<String> = self
            .members
            .iter()
            .chain(std::iter::once(&member))
            .map(|m| format!("{{ id = {}, address = \"{}\" }}", m.id, m.address))
            .collect();
        write_config(
            &self.cfg,
            &self.dir,
            &member,
            &peers,
            true,
            self.pki.as_ref(),
        )?;
        self.members.push(member);
        let i = self.members.len() - 1;
        self.restart(i)?;
        Ok(i)
    }

    /// Writes configs under `dir` and starts every replica.
    pub fn start(cfg: LocalClusterConfig, dir: &Path) -> std::io::Result<LocalCluster> {
        let mut members = Vec::new();
        for id in 1..=cfg.replicas as u64 {
            members.push(Member {
                id,
                address: format!("127.0.0.1:{}", free_port()?),
                metrics_address: format!("127.0.0.1:{}", free_port()?),
                config: dir.join(format!("scheduler-{id}.toml")),
                log: dir.join(format!("scheduler-{id}.log")),
                child: None,
            });
        }
        let peers: Vec<String> = members
            .iter()
            .map(|m| format!("{{ id = {}, address = \"{}\" }}", m.id, m.address))
            .collect();
        let pki = if cfg.insecure {
            None
        } else {
            Some(LocalPki::create(&dir.join("pki"), "local").map_err(std::io::Error::other)?)
        };
        for m in &members {
            write_config(&cfg, dir, m, &peers, false, pki.as_ref())?;
        }
        let admin = match &pki {
            None => None,
            Some(pki) => {
                let s = pki.issue("admin/local").map_err(std::io::Error::other)?;
                Tls::load(&s).map_err(|e| std::io::Error::other(e.to_string()))?
            }
        };
        let mut cluster = LocalCluster {
            cfg,
            members,
            dir: dir.to_path_buf(),
            pki,
            admin,
        };
        for i in 0..cluster.members.len() {
            cluster.restart(i)?;
        }
        Ok(cluster)
    }

    /// The directory holding configs, logs and data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every replica's gRPC address.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.address.clone()).collect()
    }

    /// A client over every replica, with the cluster's admin certificate.
    pub fn client(&self) -> Client {
        self.client_of(self.endpoints())
    }

    /// A client over `endpoints` with the cluster's admin certificate.
    pub fn client_of(&self, endpoints: Vec<String>) -> Client {
        let credentials = Credentials {
            tls: self.admin.clone(),
            token: None,
        };
        Client::new(endpoints.clone())
            .with_credentials(credentials)
            .unwrap_or_else(|_| Client::new(endpoints))
    }

    /// A raw channel to `address` with the admin certificate (for calls the [`Client`]
    /// does not wrap).
    pub fn admin_channel(&self, address: &str) -> tonic::transport::Channel {
        let cfg = berth_net::NetConfig::peer()
            .with_tls(self.admin.as_ref(), berth_net::Expect::AnyReplica);
        berth_net::channel(address, &cfg).unwrap_or_else(|e| panic!("channel to {address}: {e}"))
    }

    /// Replica `id`'s own certificate, loaded from its files (`None` when insecure): what
    /// a test sends Raft messages with.
    pub fn replica_tls(&self, id: u64) -> Option<Tls> {
        let pki = self.pki.as_ref()?;
        let settings = berth_net::TlsSettings::files(
            &pki.ca_path(),
            &pki.dir.join(format!("replica-{id}.pem")),
            &pki.dir.join(format!("replica-{id}.key")),
        );
        Tls::load(&settings).ok().flatten()
    }

    /// The cluster's CA and issued files (`None` when insecure).
    pub fn pki(&self) -> Option<&LocalPki> {
        self.pki.as_ref()
    }

    /// The admin certificate the cluster's clients use (`None` when insecure).
    pub fn admin_tls(&self) -> Option<&Tls> {
        self.admin.as_ref()
    }

    /// Starts (or restarts) replica `i` (0-based).
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        let m = &mut self.members[i];
        if let Some(mut child) = m.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let child = Command::new(&self.cfg.binary)
            .arg("--log-level")
            .arg(&self.cfg.log_level)
            .arg("scheduler")
            .arg("--config")
            .arg(&m.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        m.child = Some(child);
        Ok(())
    }

    /// The process id of replica `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Replica `i`'s data directory (its Raft log and snapshot).
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("data-{}", self.members[i].id))
    }

    /// SIGKILLs replica `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether replica `i` runs (and has not exited on its own).
    pub fn alive(&mut self, i: usize) -> bool {
        match self.members[i].child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The last lines of replica `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Index of the replica every live member agrees leads, waiting up to `timeout`.
    pub async fn wait_for_leader(&mut self, timeout: Duration) -> Option<usize> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            let mut seen = Vec::new();
            for i in 0..self.members.len() {
                if !self.alive(i) {
                    continue;
                }
                let mut c = self.client_of(vec![self.members[i].address.clone()]);
                c.deadline = Duration::from_millis(300);
                if let Ok(s) = c.status().await {
                    seen.push(s.leader_id);
                }
            }
            if let Some(&leader) = seen.first() {
                if leader != 0 && seen.iter().all(|l| *l == leader) {
                    if let Some(i) = self.members.iter().position(|m| m.id == leader) {
                        if self.alive(i) {
                            return Some(i);
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Status of replica `i`, read from it directly.
    pub async fn status(&self, i: usize) -> Result<pb::ClusterStatusResponse, tonic::Status> {
        let mut c = self.client_of(vec![self.members[i].address.clone()]);
        c.deadline = Duration::from_millis(500);
        c.status().await
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
