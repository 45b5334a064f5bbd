//! The harness's faulty network: sending with drops, duplicates and delays, delivering in
//! virtual time, and injecting partitions and crashes.

use super::*;

impl Sim {
    pub(super) fn send(&mut self, msg: Message) {
        let (from, to) = (msg.from, msg.to);
        let connected = self.group.get(&from).copied().unwrap_or(0)
            == self.group.get(&to).copied().unwrap_or(0);
        if !connected || (self.faults_on && self.chance(self.cfg.drop_probability)) {
            self.report.messages_dropped += 1;
            self.report_snapshot(&msg, false);
            return;
        }
        let copies = if self.faults_on && self.chance(self.cfg.duplicate_probability) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = 1 + self.below(if self.faults_on {
                self.cfg.max_delay_ms
            } else {
                3
            });
            let id = self.next_msg;
            self.next_msg += 1;
            self.network.push(Reverse((self.now + delay, id, to)));
            self.in_transit.insert(id, msg.clone());
        }
    }

    /// What a transport does after sending a snapshot: tell the sender's Raft how it went
    /// (a leader waits in snapshot state until told).
    pub(super) fn report_snapshot(&mut self, msg: &Message, ok: bool) {
        if msg.get_msg_type() != raft::eraftpb::MessageType::MsgSnapshot {
            return;
        }
        if let Some(sender) = self.slots[(msg.from - 1) as usize].replica.as_mut() {
            sender.report_snapshot(msg.to, ok);
        }
    }

    pub(super) fn deliver(&mut self) {
        while let Some(Reverse((at, id, to))) = self.network.peek().copied() {
            if at > self.now {
                break;
            }
            self.network.pop();
            let Some(msg) = self.in_transit.remove(&id) else {
                continue;
            };
            // A partition that formed while the message was in flight drops it too.
            let connected = self.group.get(&msg.from).copied().unwrap_or(0)
                == self.group.get(&to).copied().unwrap_or(0);
            if !connected {
                self.report.messages_dropped += 1;
                self.report_snapshot(&msg, false);
                continue;
            }
            let alive = self.slots[(to - 1) as usize].replica.is_some();
            self.report_snapshot(&msg, alive);
            self.trace(&[3, msg.from, to, msg.get_msg_type() as u64, msg.index]);
            if let Some(r) = self.slots[(to - 1) as usize].replica.as_mut() {
                r.step(msg);
            }
        }
    }

    pub(super) fn inject_fault(&mut self) {
        let n = self.cfg.replicas as u64;
        let leader = (0..self.cfg.replicas).find(|&i| {
            self.slots[i]
                .replica
                .as_ref()
                .is_some_and(|r| r.is_leader())
        });
        let kind = self.below(6);
        self.trace(&[4, kind]);
        match kind {
            0 => {
                // Crash the leader (or a random replica).
                let i = leader.unwrap_or(self.below(n) as usize);
                let after = 200 + self.below(2_000);
                self.crash(i, after);
            }
            1 => {
                // Crash in the middle of the next disk write.
                let i = leader.unwrap_or(self.below(n) as usize);
                if self.slots[i].replica.is_some() {
                    self.slots[i].crash_next_write.set(true);
                }
            }
            2 => {
                // Isolate the leader (or a random replica).
                let i = leader.unwrap_or(self.below(n) as usize) as u64 + 1;
                self.group = (1..=n).map(|id| (id, u32::from(id == i))).collect();
                self.report.partitions += 1;
            }
            3 => {
                // Random split.
                self.group = (1..=n)
                    .map(|id| (id, (self.rng.next_u64() % 2) as u32))
                    .collect();
                self.report.partitions += 1;
            }
            4 => {
                // Heal partitions.
                self.group.clear();
            }
            _ => {
                // Crash a follower.
                let followers: Vec<usize> = (0..self.cfg.replicas)
                    .filter(|&i| Some(i) != leader && self.slots[i].replica.is_some())
                    .collect();
                if !followers.is_empty() {
                    let i = followers[self.below(followers.len() as u64) as usize];
                    let after = 100 + self.below(3_000);
                    self.crash(i, after);
                }
            }
        }
    }
}
