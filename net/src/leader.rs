//! How a follower points a caller at the leader, and how a caller tells that answer from a
//! refusal.
//!
//! A follower answers a write (or a linearizable read, or an agent's stream) with the
//! leader's client address in `berth-leader` metadata:
//! - FAILED_PRECONDITION when it knows the leader: the request is fine, this replica is the
//!   wrong one, and the hint says which is right;
//! - UNAVAILABLE while no leader is known (an election is under way), with the metadata
//!   present and empty: there is nowhere to send the caller, so it is the retryable "try
//!   again shortly" of gRPC, which generic clients and retry policies already retry.
//!
//! The metadata is what tells either answer apart from a refusal ([`is_not_leader`]).

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
    } else if address.is_empty() {
        format!(
            "this replica is not the leader; the leader is replica {leader}, whose address \
             is not known here yet; retry shortly"
        )
    } else {
        format!("this replica is not the leader; the leader is replica {leader} at {address}")
    }
}

/// The Status a follower answers with: FAILED_PRECONDITION with the leader's address in
/// `berth-leader` metadata, or UNAVAILABLE with that metadata empty while no leader is known
/// (`leader` 0 or no address).
pub fn not_leader_status(leader: u64, address: &str) -> Status {
    let message = not_leader_message(leader, address);
    let mut status = if leader == 0 || address.is_empty() {
        Status::unavailable(message)
    } else {
        Status::failed_precondition(message)
    };
    let hint = address
        .parse()
        .unwrap_or_else(|_| MetadataValue::from_static(""));
    status.metadata_mut().insert(LEADER_METADATA, hint);
    status
}

/// Whether a Status is a follower's "not the leader" answer (worth sending to the leader,
/// or retrying once one is elected), as opposed to a refusal that would be the same
/// anywhere.
pub fn is_not_leader(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::FailedPrecondition | tonic::Code::Unavailable
    ) && status.metadata().get(LEADER_METADATA).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn a_known_leader_is_a_hint_and_no_leader_yet_is_retryable() {
        let hint = not_leader_status(2, "127.0.0.1:7071");
        assert_eq!(hint.code(), Code::FailedPrecondition);
        assert!(is_not_leader(&hint));
        assert_eq!(
            hint.metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok()),
            Some("127.0.0.1:7071")
        );

        let election = not_leader_status(0, "");
        assert_eq!(election.code(), Code::Unavailable);
        assert!(is_not_leader(&election));
        assert_eq!(
            election
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok()),
            Some("")
        );
        assert_eq!(
            election.message(),
            "this replica is not the leader and no leader is known yet; retry shortly"
        );
        // A leader id without an address is no hint either.
        assert_eq!(not_leader_status(3, "").code(), Code::Unavailable);

        // Refusals carry no metadata.
        assert!(!is_not_leader(&Status::unavailable("shutting down")));
        assert!(!is_not_leader(&Status::failed_precondition(
            "wrong cluster"
        )));
    }
}
