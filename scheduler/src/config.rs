//! The `[scheduler]` section of a berth config file.
//!
//! Every field has a default suited to a single-machine development cluster; production
//! deployments set at least `node_id`, `peers`, `listen_address` and `data_dir`. Durations
//! are integers with their unit in the name.

use serde::{Deserialize, Serialize};

use berth_proto::Validator;

/// Scheduler replica configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// This replica's Raft id: non-zero, and one of `peers`.
    pub node_id: u64,
    /// Name of the cluster; replicas refuse Raft traffic from another cluster.
    pub cluster_id: String,
    /// gRPC address served to clients, agents and peers.
    pub listen_address: String,
    /// HTTP address of Prometheus `/metrics`.
    pub metrics_address: String,
    /// Directory of the Raft log, hard state and snapshots (created if missing).
    pub data_dir: String,
    /// Where replicated state lives.
    pub backend: Backend,
    /// Every voting replica at bootstrap, this one included.
    pub peers: Vec<PeerConfig>,
    /// This replica is being added to a running cluster (`berth cluster add-peer`): it
    /// starts empty and catches up from the leader's snapshot instead of bootstrapping
    /// with `peers`, which then only tell it where the other replicas are (list them and
    /// this one). Ignored once its data directory holds state.
    pub join: bool,
    /// Raft timing and limits.
    pub raft: RaftConfig,
    /// Create batching on the leader's hot path.
    pub batching: BatchingConfig,
    /// Placement policy.
    pub placement: PlacementConfig,
    /// Node heartbeats.
    pub liveness: LivenessConfig,
    /// Session and idle limits of sandboxes, per tenant.
    pub sessions: crate::sessions::SessionsConfig,
    /// The etcd backend; required when `backend = "etcd"`.
    pub etcd: Option<EtcdConfig>,
    /// This replica's certificate (identity `spiffe://CLUSTER_ID/replica/NODE_ID`), key and
    /// the cluster CA; or `insecure = true`.
    pub tls: berth_net::TlsSettings,
    /// Tokens and the certificates replicas issue to joining nodes.
    pub auth: AuthConfig,
}

/// `[scheduler.auth]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The cluster CA's private key, so this replica can sign certificates for nodes that
    /// join with a token (`berth node token create`) and renew them. Empty: joins and
    /// renewals are refused (FAILED_PRECONDITION) and an operator's CA issues node
    /// certificates. The key stays in this file: it never enters the replicated state,
    /// a snapshot or the log.
    pub ca_key: String,
    /// Lifetime of the certificates this replica issues to nodes; agents renew at half.
    pub node_cert_ttl_s: u64,
    /// Longest lifetime a join token may be given.
    pub max_join_token_ttl_s: u64,
}

impl Default for AuthConfig {
    fn default() -> AuthConfig {
        AuthConfig {
            ca_key: String::new(),
            node_cert_ttl_s: 24 * 3_600,
            max_join_token_ttl_s: 7 * 24 * 3_600,
        }
    }
}

/// Which store holds the replicated state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// Embedded Raft among the scheduler replicas (no external service).
    Raft,
    /// An external etcd cluster (cargo feature `etcd`).
    Etcd,
}

/// One scheduler replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Raft id, non-zero and unique.
    pub id: u64,
    /// Its gRPC `host:port`.
    pub address: String,
}

/// Raft timing (in ticks of `tick_ms`) and limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    /// Length of one Raft tick.
    pub tick_ms: u64,
    /// Ticks without a leader before a follower campaigns (randomised up to twice this).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats; must be below `election_ticks`.
    pub heartbeat_ticks: usize,
    /// Take a state-machine snapshot and compact the log every this many applied entries.
    pub snapshot_every_entries: u64,
    /// Most in-flight append messages per follower.
    pub max_inflight_messages: usize,
    /// Largest append message in bytes.
    pub max_message_bytes: u64,
}

/// How the leader batches creates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchingConfig {
    /// Most sandboxes placed and proposed in one log entry.
    pub max_batch_sandboxes: usize,
    /// Longest a create waits for its batch to fill, in microseconds.
    pub max_batch_wait_us: u64,
    /// Creates queued on the leader before new ones get `ResourceExhausted`.
    pub max_queued_creates: usize,
}

pub use berth_core::placement::PolicyName;
pub use berth_core::placement::image::ImageRule;

/// Placement settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlacementConfig {
    /// The policy that ranks feasible nodes.
    pub policy: PolicyName,
    /// Serve a GPU option written without `!` with a strictly better model when the
    /// requested one is not free.
    pub allow_gpu_upgrade: bool,
    /// Seed of the policy's tie-breaking randomness (placement stays deterministic).
    pub seed: u64,
    /// How a node holding the sandbox's image counts: `"tie-break"` (default: it wins among
    /// nodes the policy scores equal, if it already runs sandboxes), `"bonus:N"` (N points
    /// on the policy's 0..100 score, empty or not) or `"off"`. ARCHITECTURE.md has the
    /// measurements behind the default.
    pub image_affinity: ImageRule,
}

/// Node liveness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LivenessConfig {
    /// How often agents heartbeat.
    pub heartbeat_interval_ms: u64,
    /// A node with no heartbeat for this long is marked Down; at least 3 intervals.
    pub node_ttl_ms: u64,
    /// After a leader change, no node is marked Down for this long (agents reconnect).
    pub leader_grace_ms: u64,
    /// How long the sandboxes of a node marked Down stay Unknown, keeping their GPUs, CPU
    /// and memory, before they are Lost (Nomad's `max_client_disconnect`). If the agent
    /// registers again within it, what it reports stands. 0 makes them Lost at the TTL.
    /// At most one day.
    pub node_disconnect_grace_ms: u64,
    /// Heartbeats per second the leader is willing to handle (Nomad's
    /// `max_heartbeats_per_second`). With more nodes than `heartbeat_interval_ms` allows
    /// at this rate, a registering agent is given a longer interval (nodes / rate
    /// seconds), and the TTL grows by the same factor. 0: no limit.
    pub max_heartbeats_per_second: u64,
}

/// The etcd backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client endpoints, `host:port`.
    pub endpoints: Vec<String>,
    /// Key prefix under which berth keeps its state.
    pub prefix: String,
    /// Leader-election lease TTL in seconds.
    pub lease_ttl_s: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            node_id: 1,
            cluster_id: "berth-dev".into(),
            listen_address: "127.0.0.1:7070".into(),
            metrics_address: "127.0.0.1:9090".into(),
            data_dir: "berth-data/scheduler-1".into(),
            backend: Backend::Raft,
            peers: vec![PeerConfig {
                id: 1,
                address: "127.0.0.1:7070".into(),
            }],
            join: false,
            raft: RaftConfig::default(),
            batching: BatchingConfig::default(),
            placement: PlacementConfig::default(),
            liveness: LivenessConfig::default(),
            sessions: crate::sessions::SessionsConfig::default(),
            etcd: None,
            tls: berth_net::TlsSettings::default(),
            auth: AuthConfig::default(),
        }
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            tick_ms: 50,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_every_entries: 50_000,
            max_inflight_messages: 256,
            max_message_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_batch_sandboxes: 512,
            max_batch_wait_us: 1000,
            max_queued_creates: 65_536,
        }
    }
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            policy: PolicyName::Berth,
            allow_gpu_upgrade: false,
            seed: 0,
            image_affinity: ImageRule::DEFAULT,
        }
    }
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            heartbeat_interval_ms: 1000,
            node_ttl_ms: 10_000,
            leader_grace_ms: 15_000,
            node_disconnect_grace_ms: 60_000,
            max_heartbeats_per_second: 1_000,
        }
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["127.0.0.1:2379".into()],
            prefix: "/berth".into(),
            lease_ttl_s: 5,
        }
    }
}

/// Upper bounds that keep a typo from exhausting memory.
const MAX_PEERS: usize = 7;
const MAX_BATCH_SANDBOXES: usize = 65_536;
const MAX_QUEUED_CREATES: usize = 10_000_000;
const MAX_MESSAGE_BYTES: u64 = 256 * 1024 * 1024;

impl SchedulerConfig {
    /// Records every problem under the validator's current path.
    pub fn validate(&self, v: &mut Validator) {
        v.check(self.node_id != 0, "node_id", || "must be non-zero".into());
        v.identifier("cluster_id", &self.cluster_id, 63);
        v.address("listen_address", &self.listen_address);
        v.address("metrics_address", &self.metrics_address);
        v.check(!self.data_dir.trim().is_empty(), "data_dir", || {
            "must be set".into()
        });
        let identity = v.nested("tls", |v| self.tls.validate(v));
        if let Some(id) = identity {
            let want =
                berth_net::Identity::new(&self.cluster_id, berth_net::Role::Replica(self.node_id));
            v.check(id == want, "tls.cert", || {
                format!("names {id}; this replica is {want} (cluster_id and node_id)")
            });
        }
        v.nested("auth", |v| {
            v.check(
                (60..=365 * 24 * 3_600).contains(&self.auth.node_cert_ttl_s),
                "node_cert_ttl_s",
                || format!("{} is outside 60..=31536000", self.auth.node_cert_ttl_s),
            );
            v.check(
                (60..=365 * 24 * 3_600).contains(&self.auth.max_join_token_ttl_s),
                "max_join_token_ttl_s",
                || {
                    format!(
                        "{} is outside 60..=31536000",
                        self.auth.max_join_token_ttl_s
                    )
                },
            );
            if !self.auth.ca_key.is_empty() {
                if self.tls.insecure {
                    v.error("ca_key", "needs TLS (tls.insecure is true)");
                } else if let Err(e) = berth_net::tls::pki::Ca::load(
                    std::path::Path::new(&self.tls.ca),
                    std::path::Path::new(&self.auth.ca_key),
                ) {
                    v.error("ca_key", e);
                }
            }
        });

        if self.peers.is_empty() {
            v.error("peers", "must list at least this replica");
        } else if self.peers.len() > MAX_PEERS {
            v.error(
                "peers",
                format!("{} peers; the limit is {MAX_PEERS}", self.peers.len()),
            );
        }
        for (i, peer) in self.peers.iter().enumerate() {
            v.nested("peers", |v| {
                v.nested(format!("[{i}]"), |v| {
                    v.check(peer.id != 0, "id", || "must be non-zero".into());
                    if let Some(first) = self.peers[..i].iter().position(|p| p.id == peer.id) {
                        v.error(
                            "id",
                            format!("{} is also the id of peers[{first}]", peer.id),
                        );
                    }
                    v.address("address", &peer.address);
                });
            });
        }
        if !self.peers.is_empty() && !self.peers.iter().any(|p| p.id == self.node_id) {
            v.error(
                "node_id",
                format!("{} is not among peers[].id", self.node_id),
            );
        }
        // A joining replica's peers are only an address book; membership comes from the
        // leader.
        if !self.join && (self.peers.len() == 2 || self.peers.len() == 4 || self.peers.len() == 6) {
            v.error(
                "peers",
                format!(
                    "{} replicas tolerate no more failures than {}; use an odd number",
                    self.peers.len(),
                    self.peers.len() - 1
                ),
            );
        }

        v.nested("raft", |v| self.raft.validate(v));
        v.nested("batching", |v| self.batching.validate(v));
        v.nested("liveness", |v| self.liveness.validate(v));
        self.sessions.validate(v);
        match (&self.etcd, self.backend) {
            (Some(etcd), _) => v.nested("etcd", |v| etcd.validate(v)),
            (None, Backend::Etcd) => v.error("etcd", "must be set when backend = \"etcd\""),
            (None, Backend::Raft) => {}
        }
    }
}

impl RaftConfig {
    fn validate(&self, v: &mut Validator) {
        v.check((1..=10_000).contains(&self.tick_ms), "tick_ms", || {
            format!("{} is outside 1..=10000", self.tick_ms)
        });
        v.check(self.heartbeat_ticks >= 1, "heartbeat_ticks", || {
            "must be at least 1".into()
        });
        v.check(
            self.election_ticks > self.heartbeat_ticks,
            "election_ticks",
            || {
                format!(
                    "{} must be greater than heartbeat_ticks ({})",
                    self.election_ticks, self.heartbeat_ticks
                )
            },
        );
        v.check(
            self.snapshot_every_entries >= 100,
            "snapshot_every_entries",
            || {
                format!(
                    "{} is below the minimum of 100",
                    self.snapshot_every_entries
                )
            },
        );
        v.check(
            (1..=4096).contains(&self.max_inflight_messages),
            "max_inflight_messages",
            || format!("{} is outside 1..=4096", self.max_inflight_messages),
        );
        v.check(
            (64 * 1024..=MAX_MESSAGE_BYTES).contains(&self.max_message_bytes),
            "max_message_bytes",
            || {
                format!(
                    "{} is outside 65536..={MAX_MESSAGE_BYTES}",
                    self.max_message_bytes
                )
            },
        );
    }
}

impl BatchingConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(
            (1..=MAX_BATCH_SANDBOXES).contains(&self.max_batch_sandboxes),
            "max_batch_sandboxes",
            || {
                format!(
                    "{} is outside 1..={MAX_BATCH_SANDBOXES}",
                    self.max_batch_sandboxes
                )
            },
        );
        v.check(
            self.max_batch_wait_us <= 100_000,
            "max_batch_wait_us",
            || format!("{} is above 100000 (100 ms)", self.max_batch_wait_us),
        );
        v.check(
            self.max_queued_creates >= self.max_batch_sandboxes
                && self.max_queued_creates <= MAX_QUEUED_CREATES,
            "max_queued_creates",
            || {
                format!(
                    "{} must be between max_batch_sandboxes ({}) and {MAX_QUEUED_CREATES}",
                    self.max_queued_creates, self.max_batch_sandboxes
                )
            },
        );
    }
}

impl LivenessConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(
            self.heartbeat_interval_ms >= 10,
            "heartbeat_interval_ms",
            || format!("{} is below the minimum of 10", self.heartbeat_interval_ms),
        );
        v.check(
            self.node_ttl_ms >= self.heartbeat_interval_ms.saturating_mul(3),
            "node_ttl_ms",
            || {
                format!(
                    "{} must be at least 3 heartbeat intervals ({})",
                    self.node_ttl_ms,
                    self.heartbeat_interval_ms.saturating_mul(3)
                )
            },
        );
        let max = crate::state::MAX_DISCONNECT_GRACE_MS;
        v.check(
            self.node_disconnect_grace_ms <= max,
            "node_disconnect_grace_ms",
            || {
                format!(
                    "{} is above the limit of {max} (one day)",
                    self.node_disconnect_grace_ms
                )
            },
        );
    }
}

impl EtcdConfig {
    fn validate(&self, v: &mut Validator) {
        v.check(!self.endpoints.is_empty(), "endpoints", || {
            "must list at least one".into()
        });
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            v.address(&format!("endpoints[{i}]"), endpoint);
        }
        v.check(self.prefix.starts_with('/'), "prefix", || {
            format!("{:?} must start with '/'", self.prefix)
        });
        v.check((1..=300).contains(&self.lease_ttl_s), "lease_ttl_s", || {
            format!("{} is outside 1..=300", self.lease_ttl_s)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(config: &SchedulerConfig) -> Vec<String> {
        let mut v = Validator::new();
        config.validate(&mut v);
        v.finish().map_or_else(
            |e| e.0.into_iter().map(|e| e.to_string()).collect(),
            |()| vec![],
        )
    }

    #[test]
    fn default_needs_certificates_or_an_explicit_insecure() {
        let found = errors(&SchedulerConfig::default());
        assert_eq!(found.len(), 3, "{found:?}");
        for (e, field) in found.iter().zip(["tls.ca", "tls.cert", "tls.key"]) {
            assert!(e.starts_with(&format!("{field}: missing")), "{e}");
            assert!(e.contains("insecure = true"), "{e}");
        }
        let insecure = SchedulerConfig {
            tls: berth_net::TlsSettings::insecure(),
            ..SchedulerConfig::default()
        };
        assert_eq!(errors(&insecure), Vec::<String>::new());
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let mut config = SchedulerConfig {
            node_id: 9,
            backend: Backend::Etcd,
            tls: berth_net::TlsSettings::insecure(),
            ..SchedulerConfig::default()
        };
        config.peers.push(PeerConfig {
            id: 1,
            address: "nowhere".into(),
        });
        config.raft.election_ticks = 2;
        config.liveness.node_disconnect_grace_ms = 2 * crate::state::MAX_DISCONNECT_GRACE_MS;
        let found = errors(&config);
        assert_eq!(
            found,
            [
                "peers[1].id: 1 is also the id of peers[0]",
                "peers[1].address: \"nowhere\" is not a host:port address (e.g. \"127.0.0.1:7070\")",
                "node_id: 9 is not among peers[].id",
                "peers: 2 replicas tolerate no more failures than 1; use an odd number",
                "raft.election_ticks: 2 must be greater than heartbeat_ticks (2)",
                "liveness.node_disconnect_grace_ms: 172800000 is above the limit of 86400000 \
                 (one day)",
                "etcd: must be set when backend = \"etcd\"",
            ]
        );
    }

    #[test]
    fn image_affinity_is_a_rule_name() {
        let cfg: SchedulerConfig =
            toml::from_str("[placement]\nimage_affinity = \"bonus:10\"\n").expect("parses");
        assert_eq!(cfg.placement.image_affinity, ImageRule::Bonus(10));
        assert_eq!(
            SchedulerConfig::default().placement.image_affinity,
            ImageRule::TieBreak
        );
        let err = toml::from_str::<SchedulerConfig>("[placement]\nimage_affinity = \"near\"\n")
            .expect_err("unknown rule");
        let text = err.to_string();
        assert!(
            text.contains("image_affinity") && text.contains("unknown image rule"),
            "{text}"
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err =
            toml::from_str::<SchedulerConfig>("[raft]\nelection_tiks = 3\n").expect_err("typo");
        assert!(
            err.to_string().contains("unknown field `election_tiks`"),
            "{err}"
        );
    }
}
