//! What berth puts inside Raft: log entry payloads, snapshot payloads and membership
//! contexts. Each is postcard behind a one-byte format version, so a replica refuses an
//! entry written by an incompatible build instead of misreading it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::state::Command;

// 2: node specs in commands carry MIG mode, NVLink peers and cached images.
// 3: `RegisterAgent` carries the agent's report per sandbox; `NodeDisconnected` and
//    `ExpireDisconnected` (the disconnect grace) joined the commands.
// 4: sandbox specs carry `keep_alive` and `idle_timeout_ms`.
// 5: a spec's `network` is a policy, not a bool.
// 6: token commands (PutToken, RevokeToken, UseJoinToken) and Rejection::Token.
// 7: PauseSandboxes, ResumeSandboxes, StatusChange::Paused (issue #17).
// 8: a spec's `auto_pause_idle_ms`, a node spec's `runtime`, StatusChange::PauseFailed.
// 9: StandbySandboxes, StatusChange::Standby, Rejection::NoRoomToThaw.
// 10: SetWarmPool, DeleteWarmPool, RefillWarmPools (warm pools, issue #17); ExpireSnapshots
//     (snapshot retention).
const ENTRY_FORMAT: u8 = 10;
const SNAPSHOT_FORMAT: u8 = 1;
// Membership contexts have had the same shape since entry format 2, so they keep that
// number: contexts already in a log stay readable.
const MEMBERSHIP_FORMAT: u8 = 2;

/// Identifies a proposal so the proposer can answer its client once the entry applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProposalId {
    /// Raft id of the proposing replica.
    pub replica: u64,
    /// Chosen at every start of the replica, so ids never repeat across restarts.
    pub incarnation: u64,
    /// Counter within the incarnation.
    pub seq: u64,
}

/// A normal log entry: one state-machine command with the leader's clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Who proposed it.
    pub proposal: ProposalId,
    /// The proposer's wall clock (ms since the unix epoch); every replica applies with this
    /// value, never its own clock, so replicas stay identical.
    pub now_ms: u64,
    /// The command.
    pub command: Command,
}

/// A state-machine snapshot as carried by Raft: the state and the replica addresses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotPayload {
    /// `State::snapshot()` bytes.
    pub state: Vec<u8>,
    /// Raft id → gRPC address of every member.
    pub peers: BTreeMap<u64, String>,
}

/// The context of a membership change: addresses of the replicas it adds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MembershipContext {
    /// Raft id → address.
    pub addresses: BTreeMap<u64, String>,
    /// Who proposed it (so the proposer can answer its client).
    pub proposal: Option<ProposalId>,
}

/// A payload that could not be decoded.
#[derive(Debug, Error)]
pub enum CodecError {
    /// Written by an incompatible build.
    #[error("{what} format {found} is not supported (this build reads {supported})")]
    Version {
        /// Entry or snapshot.
        what: &'static str,
        /// Found.
        found: u8,
        /// Supported.
        supported: u8,
    },
    /// Truncated or corrupt.
    #[error("{what} is corrupt: {source}")]
    Corrupt {
        /// Entry or snapshot.
        what: &'static str,
        /// Decoder error.
        source: postcard::Error,
    },
}

fn encode<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let mut out = vec![version];
    // Serialising plain data into a Vec cannot fail; an empty body is refused on decode.
    if let Ok(body) = postcard::to_stdvec(value) {
        out.extend_from_slice(&body);
    }
    out
}

fn decode<'a, T: Deserialize<'a>>(
    what: &'static str,
    supported: u8,
    bytes: &'a [u8],
) -> Result<T, CodecError> {
    let (&found, body) = bytes.split_first().ok_or(CodecError::Version {
        what,
        found: 0,
        supported,
    })?;
    if found != supported {
        return Err(CodecError::Version {
            what,
            found,
            supported,
        });
    }
    postcard::from_bytes(body).map_err(|source| CodecError::Corrupt { what, source })
}

impl Envelope {
    /// Encodes for a log entry.
    pub fn encode(&self) -> Vec<u8> {
        encode(ENTRY_FORMAT, self)
    }

    /// Decodes a log entry's data.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, CodecError> {
        decode("log entry", ENTRY_FORMAT, bytes)
    }
}

impl SnapshotPayload {
    /// Encodes for a Raft snapshot.
    pub fn encode(&self) -> Vec<u8> {
        encode(SNAPSHOT_FORMAT, self)
    }

    /// Decodes a Raft snapshot's data.
    pub fn decode(bytes: &[u8]) -> Result<SnapshotPayload, CodecError> {
        decode("snapshot", SNAPSHOT_FORMAT, bytes)
    }
}

impl MembershipContext {
    /// Encodes for a ConfChangeV2 context.
    pub fn encode(&self) -> Vec<u8> {
        encode(MEMBERSHIP_FORMAT, self)
    }

    /// Decodes a ConfChangeV2 context (empty = no addresses).
    pub fn decode(bytes: &[u8]) -> Result<MembershipContext, CodecError> {
        if bytes.is_empty() {
            return Ok(MembershipContext::default());
        }
        decode("membership context", MEMBERSHIP_FORMAT, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_and_refuses_other_versions() {
        let envelope = Envelope {
            proposal: ProposalId {
                replica: 2,
                incarnation: 7,
                seq: 9,
            },
            now_ms: 1_700_000_000_000,
            command: Command::DeleteSandboxes { items: vec![] },
        };
        let bytes = envelope.encode();
        assert_eq!(Envelope::decode(&bytes).ok(), Some(envelope));
        let mut other = bytes.clone();
        other[0] = ENTRY_FORMAT + 1;
        let err = Envelope::decode(&other).err().map(|e| e.to_string());
        assert_eq!(
            err,
            Some(format!(
                "log entry format {} is not supported (this build reads {ENTRY_FORMAT})",
                ENTRY_FORMAT + 1
            ))
        );
        assert!(Envelope::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(Envelope::decode(&[]).is_err());
    }
}
