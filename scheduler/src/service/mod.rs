//! A scheduler replica as a network service: the Raft thread ([`driver`]), Raft traffic
//! between replicas ([`transport`]), the tonic services ([`api`], one file per service)
//! over the [`store`] seam, what applied entries changed per node and per sandbox
//! ([`feed`], which agents' streams and watches follow), sandbox watches ([`watch`]), node
//! liveness from agent
//! heartbeats ([`liveness`]), the leader's clocks on one loop ([`leader_rounds`]): standby
//! to disk ([`standby`]), the warm pools' keeper ([`pools`]) and snapshot retention
//! ([`retention`]), sandboxes' reported CPU and memory use ([`usage`]), who may
//! call which service ([`auth`]), typed errors and their gRPC codes ([`error`]), Prometheus
//! metrics ([`metrics`]), and the process wiring ([`server`]). [`client`] is the
//! leader-following client (from berth-net); [`local_cluster`] runs real replica processes
//! on loopback for benchmarks and tests. Channels and servers are built by berth-net.

pub mod api;
pub mod auth;
pub mod driver;
pub mod error;
pub mod feed;
pub mod leader_rounds;
pub mod liveness;
pub mod local_cluster;
pub mod metrics;
pub mod pools;
pub mod retention;
pub mod server;
pub mod standby;
pub mod store;
pub mod transport;
pub mod usage;
pub mod watch;

pub use berth_net::client;
pub use driver::ReplicaHandle;
pub use error::{ServiceError, StartError};
pub use server::{Running, start};
pub use store::Store;
