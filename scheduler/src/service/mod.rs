//! A scheduler replica as a network service: the Raft thread ([`driver`]), Raft traffic
//! between replicas ([`transport`]), the tonic services ([`grpc`]) with sandbox watches
//! ([`watch`]) and node liveness from agent heartbeats ([`liveness`]), typed errors and
//! their gRPC codes ([`error`]), Prometheus metrics ([`metrics`]), and the
//! process wiring ([`server`]). [`client`] is the leader-following client; [`local_cluster`]
//! runs real replica processes on loopback for benchmarks and tests.

pub use berth_net::client;
pub mod api;
pub mod driver;
pub mod error;
pub mod liveness;
pub mod local_cluster;
pub mod metrics;
pub mod server;
pub mod transport;
pub mod watch;

pub use driver::ReplicaHandle;
pub use error::{ServiceError, StartError};
pub use server::{Running, start};
