//! berth's network module: every gRPC channel and server in berth is built here.
//!
//! One options type ([`NetConfig`]) carries addresses' timeouts, keep-alives, per-connection
//! limits and message limits; each kind of connection berth makes has a named preset
//! ([`NetConfig::peer`], [`NetConfig::agent`], [`NetConfig::provider`], ...). Channels to
//! the same address are reused through a [`ChannelPool`]. Outside this crate, building a
//! channel or a server (`Endpoint`, `Channel::from_shared`, `Server::builder`) is refused by
//! clippy (`clippy.toml`'s `disallowed-methods`), so TLS is set in one place.
//!
//! # Layout
//! - this file: [`NetConfig`], [`channel`], [`ChannelPool`], [`server`], [`NetError`].
//! - [`conn`]: [`incoming`] (a listener's connections, TLS or plain, with the peer's
//!   identity as [`PeerInfo`] in each request's extensions) and the dialling side.
//! - [`tls`]: certificates from files, reloaded on change; identities; the CA ([`tls::pki`]).
//! - [`leader`]: the `berth-leader` / `berth-read` metadata and the "not the leader"
//!   answer, shared by the replicas that send it and the clients that follow it.
//! - [`client`]: the leader-following client of a scheduler cluster (CLI, autoscaler,
//!   benches, tests).
//! - [`metrics_http`]: a Prometheus registry on `/metrics`.

// This crate is where channels and servers are allowed to be built.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod client;
pub mod conn;
pub mod leader;
pub mod metrics_http;
pub mod tls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tonic::transport::{Channel, Endpoint, Server};

pub use client::Client;
pub use conn::{PeerInfo, incoming};
pub use leader::{LEADER_METADATA, READ_MODE_METADATA, is_not_leader, not_leader_status};
pub use tls::{ClientTls, Expect, Identity, Role, Tls, TlsSettings};

/// Largest gRPC message between replicas (an append of `raft.max_message_bytes` plus
/// framing, or a 4 MiB snapshot chunk).
pub const MAX_PEER_MESSAGE: usize = 64 << 20;
/// Largest message a client or an agent may send a replica.
pub const MAX_CLIENT_MESSAGE: usize = 16 << 20;

/// HTTP/2 keep-alive pings on an otherwise quiet connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// Time between pings.
    pub interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    pub timeout: Duration,
}

/// How berth connects to one kind of peer, or serves one kind of client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Longest a TCP connect may take.
    pub connect_timeout: Duration,
    /// Deadline of each request on a channel (`None`: the caller sets one per call).
    pub request_timeout: Option<Duration>,
    /// Keep-alive pings, also while idle (`None`: no pings).
    pub keep_alive: Option<KeepAlive>,
    /// Concurrent requests per connection a server takes (`None`: unbounded).
    pub concurrency_per_connection: Option<usize>,
    /// Largest message decoded or encoded; services apply it with
    /// `max_decoding_message_size` / `max_encoding_message_size`.
    pub max_message_bytes: usize,
    /// TLS of channels (`None`: plaintext, for an insecure cluster).
    pub tls: Option<ClientTls>,
}

impl NetConfig {
    /// Replica to replica (Raft traffic), and clients of a replica: a short connect, a
    /// request deadline of 5 s.
    pub fn peer() -> NetConfig {
        NetConfig {
            connect_timeout: Duration::from_millis(500),
            request_timeout: Some(Duration::from_secs(5)),
            keep_alive: None,
            concurrency_per_connection: None,
            max_message_bytes: MAX_PEER_MESSAGE,
            tls: None,
        }
    }

    /// A node agent's stream to a replica: pings every 2 s so a dead replica is noticed in
    /// seconds, no request deadline (the stream is long-lived).
    pub fn agent() -> NetConfig {
        NetConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: None,
            keep_alive: Some(KeepAlive {
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(3),
            }),
            concurrency_per_connection: None,
            max_message_bytes: MAX_CLIENT_MESSAGE,
            tls: None,
        }
    }

    /// The autoscaler to an external provider: a connect of at most `connect_timeout`; each
    /// call sets its own deadline.
    pub fn provider(connect_timeout: Duration) -> NetConfig {
        NetConfig {
            connect_timeout,
            request_timeout: None,
            keep_alive: None,
            concurrency_per_connection: None,
            max_message_bytes: MAX_CLIENT_MESSAGE,
            tls: None,
        }
    }

    /// A node agent's own gRPC server (logs for the replicas): no limits beyond tonic's.
    pub fn agent_server() -> NetConfig {
        NetConfig {
            keep_alive: None,
            ..NetConfig::agent()
        }
    }

    /// A replica's gRPC server: at most 1,024 concurrent requests per connection.
    pub fn replica_server() -> NetConfig {
        NetConfig {
            concurrency_per_connection: Some(1_024),
            ..NetConfig::peer()
        }
    }

    /// The same, dialling with `tls` (if any) and accepting a server that is `expect`.
    pub fn with_tls(mut self, tls: Option<&Tls>, expect: Expect) -> NetConfig {
        self.tls = tls.map(|tls| ClientTls {
            tls: tls.clone(),
            expect,
        });
        self
    }
}

/// A channel or a server could not be set up.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum NetError {
    /// The address is not a `host:port` a URI can carry.
    #[error("address {address:?}: {why}")]
    Address {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        why: String,
    },
}

/// A channel to `address` (`host:port`). It connects lazily and reconnects on its own, so a
/// peer that is down now is no error.
pub fn channel(address: &str, cfg: &NetConfig) -> Result<Channel, NetError> {
    // The config's verifier and certificate resolver read the current files' contents at
    // each handshake, so one config per channel follows every reload.
    let tls = cfg
        .tls
        .as_ref()
        .map(|t| t.tls.client_config(t.expect.clone()));
    connect(address, cfg, tls)
}

/// A channel for a node that has no certificate yet (`NodeService.Join`): TLS with the CA
/// in `ca` checking that the server is a replica, and no client certificate.
pub fn join_channel(address: &str, ca: &std::path::Path) -> Result<Channel, NetError> {
    let config = tls::join_client_config(ca).map_err(|e| NetError::Address {
        address: address.to_owned(),
        why: e.to_string(),
    })?;
    let cfg = NetConfig {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Some(Duration::from_secs(10)),
        ..NetConfig::peer()
    };
    connect(address, &cfg, Some(config))
}

/// A lazy channel to `address` with `cfg`'s timeouts and pings, dialled by [`conn::dial`]
/// (TLS with `tls`, plaintext without).
fn connect(
    address: &str,
    cfg: &NetConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Channel, NetError> {
    if address.is_empty() || address.contains('/') {
        return Err(NetError::Address {
            address: address.to_owned(),
            why: "must be host:port, without a scheme or path".into(),
        });
    }
    let mut endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| NetError::Address {
            address: address.to_owned(),
            why: e.to_string(),
        })?
        .connect_timeout(cfg.connect_timeout);
    if let Some(timeout) = cfg.request_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    if let Some(k) = cfg.keep_alive {
        endpoint = endpoint
            .http2_keep_alive_interval(k.interval)
            .keep_alive_timeout(k.timeout)
            .keep_alive_while_idle(true);
    }
    let connector = tower::service_fn(move |uri: http::Uri| conn::dial(uri, tls.clone()));
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// A pooled channel's key: the address, and whom its TLS handshake expects to find there.
type PoolKey = (String, Option<Expect>);

/// Channels by address, each opened once and shared by every caller (a tonic `Channel` is
/// a handle to one HTTP/2 connection that multiplexes requests).
#[derive(Clone)]
pub struct ChannelPool {
    cfg: NetConfig,
    channels: Arc<Mutex<HashMap<PoolKey, Channel>>>,
}

impl ChannelPool {
    /// Most addresses remembered; past it, the pool is cleared (addresses are replicas and
    /// agents, so this bounds memory against a stream of one-off addresses).
    pub const MAX_ADDRESSES: usize = 16_384;

    /// A pool whose channels use `cfg`.
    pub fn new(cfg: NetConfig) -> ChannelPool {
        ChannelPool {
            cfg,
            channels: Arc::default(),
        }
    }

    /// The channel to `address`, opened on first use.
    pub fn get(&self, address: &str) -> Result<Channel, NetError> {
        self.get_expecting(address, None)
    }

    /// The channel to `address` whose server must be `expect` (instead of what the pool's
    /// config expects), e.g. a replica dialling the agent of one node.
    pub fn get_expecting(
        &self,
        address: &str,
        expect: Option<Expect>,
    ) -> Result<Channel, NetError> {
        let key = (address.to_owned(), expect.clone());
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let mut cfg = self.cfg.clone();
        if let (Some(expect), Some(tls)) = (expect, cfg.tls.as_mut()) {
            tls.expect = expect;
        }
        let c = channel(address, &cfg)?;
        if channels.len() >= Self::MAX_ADDRESSES {
            channels.clear();
        }
        channels.insert(key, c.clone());
        Ok(c)
    }

    /// How many addresses have a channel.
    pub fn len(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether no channel has been opened.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A gRPC server configured from `cfg`; add services and serve.
pub fn server(cfg: &NetConfig) -> Server {
    let mut server = Server::builder().tcp_nodelay(true);
    if let Some(n) = cfg.concurrency_per_connection {
        server = server.concurrency_limit_per_connection(n);
    }
    if let Some(k) = cfg.keep_alive {
        server = server
            .http2_keepalive_interval(Some(k.interval))
            .http2_keepalive_timeout(Some(k.timeout));
    }
    server
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pool_opens_one_channel_per_address_and_refuses_bad_ones() {
        let pool = ChannelPool::new(NetConfig::peer());
        pool.get("127.0.0.1:1").expect("lazy channel");
        pool.get("127.0.0.1:1").expect("the same channel");
        pool.get("127.0.0.1:2").expect("another");
        assert_eq!(pool.len(), 2);
        for bad in ["", "http://127.0.0.1:1", "a b:1/x"] {
            let err = pool.get(bad).expect_err(bad);
            assert!(err.to_string().contains("address"), "{err}");
        }
        assert_eq!(pool.len(), 2);
    }
}
