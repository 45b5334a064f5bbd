//! Snapshots: the whole state in a compact binary form (postcard), behind a magic and a
//! format version so an incompatible file is refused rather than misread.

use thiserror::Error;

use super::State;
use crate::invariants;

const MAGIC: &[u8; 6] = b"BERTH\0";
// 2: the autoscaler lease record joined the state.
// 3: nodes keep MIG mode and NVLink peers per GPU, and cached images.
// 4: sandboxes may be Unknown (a variant appended to the state enum).
// 5: sandbox specs carry `keep_alive` and `idle_timeout_ms` (issue #15). postcard is not
//    self-describing, so formats 3 and 4 no longer decode and are refused by version.
// 6: a spec's `network` is a policy (none, egress_all, an allow-list), not a bool.
// 7: API and join tokens (hashes) joined the state (issue #16).
// 8: pause (issue #17): Pausing and Paused states, a sandbox's snapshot record, the
//    snapshots each node holds, and each tenant's paused count.
// 9: a spec's `auto_pause_idle_ms`.
// 10: standby (issue #17): the Standby state, and each node's standby set.
// 11: warm pools (issue #17): the pools and each sandbox's pool membership.
const FORMAT_VERSION: u8 = 11;
/// Formats this build reads.
const READS: &[u8] = &[FORMAT_VERSION];

/// Why a snapshot could not be restored.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// Not a berth snapshot.
    #[error("not a berth state snapshot (bad magic)")]
    BadMagic,
    /// Written by an incompatible version.
    #[error("snapshot format {0} is not supported (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion(u8),
    /// Truncated or corrupt.
    #[error("snapshot is corrupt: {0}")]
    Decode(#[from] postcard::Error),
    /// Decoded, but the state breaks an invariant.
    #[error("snapshot state breaks invariants: {0}")]
    Invalid(String),
}

impl State {
    /// Serialises the state.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.sandboxes.len() * 128);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        // Serialising plain data into a Vec cannot fail; an empty body would be refused on
        // restore rather than silently accepted.
        if let Ok(body) = postcard::to_stdvec(self) {
            out.extend_from_slice(&body);
        }
        out
    }

    /// Restores a state written by [`State::snapshot`], and checks its invariants.
    pub fn restore(bytes: &[u8]) -> Result<State, SnapshotError> {
        let body = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or(SnapshotError::BadMagic)?;
        let (&version, body) = body.split_first().ok_or(SnapshotError::BadMagic)?;
        if !READS.contains(&version) {
            return Err(SnapshotError::UnsupportedVersion(version));
        }
        let state: State = postcard::from_bytes(body)?;
        let violations = invariants::check(&state);
        if let Some(first) = violations.first() {
            return Err(SnapshotError::Invalid(format!(
                "{} violations, first: {first}",
                violations.len()
            )));
        }
        Ok(state)
    }
}
