//! How a follower points a caller at the leader, and how a caller tells that answer from a
//! refusal.
//!
//! A follower answers a write (or a linearizable read, or an agent's stream) with
//! FAILED_PRECONDITION and the leader's client address in `berth-leader` metadata. The
//! metadata is always there, empty while no leader is known, which is what tells this
//! answer apart from a FAILED_PRECONDITION refusal ([`is_not_leader`]).

use tonic::Status;
use tonic::metadata::MetadataValue;

/// Metadata key carrying the leader's client address on a follower's answer.
pub const LEADER_METADATA: &str = "berth-leader";
/// Metadata key a client sets to `local` to read a replica's applied state without
/// ReadIndex (possibly stale, served by any replica).
pub const READ_MODE_METADATA: &str = "berth-read";

/// The message of a "not the leader" answer; `leader` is 0 when unknown.
pub fn not_leader_message(leader: u64, address: &str) -> String {
    if leader == 0 {
        "this replica is not the leader and no leader is known yet; retry shortly".to_owned()
    } else {
        format!("this replica is not the leader; the leader is replica {leader} at {address}")
    }
}

/// The Status a follower answers with: FAILED_PRECONDITION, and the leader's address in
/// `berth-leader` metadata (empty while no leader is known).
pub fn not_leader_status(leader: u64, address: &str) -> Status {
    let mut status = Status::failed_precondition(not_leader_message(leader, address));
    let hint = address
        .parse()
        .unwrap_or_else(|_| MetadataValue::from_static(""));
    status.metadata_mut().insert(LEADER_METADATA, hint);
    status
}

/// Whether a Status is a follower's "not the leader" answer (worth sending to the leader),
/// as opposed to a refusal that would be the same anywhere.
pub fn is_not_leader(status: &Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && status.metadata().get(LEADER_METADATA).is_some()
}
