//! Membership: proposing one simple change at a time (add voter, add learner, remove) with
//! the new replica's address in the context, and applying a committed change to the
//! configuration and the address book.

use std::collections::BTreeSet;

use raft::eraftpb::{ConfChangeSingle, ConfChangeType, ConfChangeV2};

use super::{Applied, MembershipChange, ProposeError, Replica};
use crate::replication::codec::{MembershipContext, ProposalId};
use crate::replication::log_store::Durable;

impl<D: Durable> Replica<D> {
    /// Proposes a membership change (one at a time, no joint configuration).
    pub fn propose_membership(
        &mut self,
        change: MembershipChange,
    ) -> Result<ProposalId, ProposeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let proposal = self.next_proposal();
        let mut ctx = MembershipContext {
            proposal: Some(proposal),
            ..Default::default()
        };
        let mut single = ConfChangeSingle::default();
        match &change {
            MembershipChange::AddVoter { id, address } => {
                single.set_change_type(ConfChangeType::AddNode);
                single.node_id = *id;
                ctx.addresses.insert(*id, address.clone());
            }
            MembershipChange::AddLearner { id, address } => {
                single.set_change_type(ConfChangeType::AddLearnerNode);
                single.node_id = *id;
                ctx.addresses.insert(*id, address.clone());
            }
            MembershipChange::Remove { id } => {
                if !self.conf_state.voters.contains(id) && !self.conf_state.learners.contains(id) {
                    return Err(ProposeError::Membership(format!(
                        "replica {id} is not a member"
                    )));
                }
                if self.conf_state.voters == [*id] {
                    return Err(ProposeError::Membership(format!(
                        "replica {id} is the only voter"
                    )));
                }
                single.set_change_type(ConfChangeType::RemoveNode);
                single.node_id = *id;
            }
        }
        if single.node_id == 0 {
            return Err(ProposeError::Membership("peer_id must be non-zero".into()));
        }
        let mut cc = ConfChangeV2::default();
        cc.mut_changes().push(single);
        cc.set_context(ctx.encode().into());
        self.raw
            .propose_conf_change(Vec::new(), cc)
            .map_err(|e| match e {
                // Another change is still being applied (or a new leader has not applied its
                // first entry yet): transient, so retryable.
                raft::Error::ProposalDropped => ProposeError::Dropped(e.to_string()),
                e => ProposeError::Membership(e.to_string()),
            })?;
        let index = self.raw.raft.raft_log.last_index();
        self.pending.insert(index, proposal);
        Ok(proposal)
    }

    pub(super) fn apply_membership(&mut self, cc: &ConfChangeV2) -> Option<(ProposalId, Applied)> {
        let ctx = MembershipContext::decode(cc.get_context()).unwrap_or_default();
        let result = match self.raw.apply_conf_change(cc) {
            Ok(cs) => {
                self.conf_state = cs;
                for (id, address) in &ctx.addresses {
                    self.peers.insert(*id, address.clone());
                }
                let members: BTreeSet<u64> = self
                    .conf_state
                    .voters
                    .iter()
                    .chain(&self.conf_state.learners)
                    .copied()
                    .collect();
                self.peers.retain(|id, _| members.contains(id));
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        ctx.proposal.map(|p| (p, Applied::Membership(result)))
    }
}
