//! A scheduler replica as a network service: the Raft thread ([`driver`]), Raft traffic
//! between replicas ([`transport`]), the tonic services ([`grpc`]) with sandbox watches
//! ([`watch`]) and node liveness from agent heartbeats ([`liveness`]), conversions between
//! the wire types and the model ([`convert`]), Prometheus metrics ([`metrics`]), and the
//! process wiring ([`server`]). [`client`] is the leader-following client; [`local_cluster`]
//! runs real replica processes on loopback for benchmarks and tests.

pub mod client;
pub mod convert;
pub mod driver;
pub mod grpc;
pub mod liveness;
pub mod local_cluster;
pub mod metrics;
pub mod server;
pub mod transport;
pub mod watch;

pub use driver::ReplicaHandle;
pub use server::{Running, start};
