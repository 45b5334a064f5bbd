//! The harness's clients: what they ask for, how a request reaches a replica, and what an
//! applied proposal tells them.

use super::*;

impl Sim {
    pub(super) fn client_request(&mut self) -> Option<Request> {
        if let Some(r) = self.retry.pop() {
            return Some(r);
        }
        let live: Vec<SandboxId> = self
            .acked
            .values()
            .filter(|id| !self.deleted.contains(id) && !self.delete_in_flight.contains(id))
            .copied()
            .collect();
        if live.len() > 12 && self.chance(0.4) {
            let k = 1 + self.below(3) as usize;
            let mut ids = BTreeSet::new();
            for _ in 0..k {
                ids.insert(live[self.below(live.len() as u64) as usize]);
            }
            self.delete_in_flight.extend(ids.iter().copied());
            return Some(Request::Delete(ids.into_iter().collect()));
        }
        let k = 1 + self.below(6) as usize;
        let items = (0..k)
            .map(|_| {
                self.next_request += 1;
                let spec = self.below(self.specs.len() as u64) as usize;
                (format!("req-{}", self.next_request), spec)
            })
            .collect();
        Some(Request::Create(items))
    }

    pub(super) fn submit(&mut self, request: Request) {
        let n = self.cfg.replicas as u64;
        let target = if self.leader_hint == 0 {
            self.below(n) + 1
        } else {
            self.leader_hint
        };
        let now = self.now;
        let Some(replica) = self.slots[(target - 1) as usize].replica.as_mut() else {
            self.leader_hint = 0;
            self.retry.push(request);
            return;
        };
        let result = match &request {
            Request::Create(items) => {
                let items = items
                    .iter()
                    .map(|(rid, spec)| Submission::new(rid.clone(), self.specs[*spec].clone()))
                    .collect();
                replica.propose_creates(items, now)
            }
            Request::Delete(ids) => {
                replica.propose(Command::DeleteSandboxes { items: ids.clone() }, now)
            }
        };
        match result {
            Ok(p) => {
                self.in_flight.insert(p, request);
            }
            Err(ProposeError::NotLeader { leader, .. }) => {
                self.leader_hint = leader;
                self.retry.push(request);
            }
            Err(_) => self.retry.push(request),
        }
    }

    pub(super) fn on_applied(&mut self, proposal: ProposalId, applied: Applied) {
        let Some(request) = self.in_flight.remove(&proposal) else {
            return;
        };
        let Applied::Items { outcomes, .. } = applied else {
            return;
        };
        match request {
            Request::Create(items) => {
                for ((rid, _), outcome) in items.iter().zip(outcomes) {
                    let id = match outcome {
                        ItemOutcome::Created { id, .. }
                        | ItemOutcome::Duplicate { id }
                        | ItemOutcome::Claimed { id, .. } => id,
                        other => {
                            self.report
                                .violations
                                .push(format!("create {rid} was refused: {other:?}"));
                            continue;
                        }
                    };
                    if let Some(previous) = self.acked.insert(rid.clone(), id) {
                        if previous != id {
                            self.report.violations.push(format!(
                                "request {rid} was acknowledged as {previous} and then as {id}"
                            ));
                        }
                    } else {
                        self.report.acked_creates += 1;
                    }
                    if !self.faults_on && self.first_ack_after_heal.is_none() {
                        self.first_ack_after_heal = Some(self.now);
                    }
                }
            }
            Request::Delete(ids) => {
                for id in ids {
                    self.delete_in_flight.remove(&id);
                    self.deleted.insert(id);
                    self.report.acked_deletes += 1;
                }
            }
        }
    }
}
