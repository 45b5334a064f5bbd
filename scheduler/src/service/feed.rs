//! What apply changed, fanned out: a wake-up per node for its agent's stream, and a
//! bounded history of changed sandboxes for watches that resume from a revision.
//!
//! A backend calls [`ChangeFeed::publish`] with the [`Changes`] of the entries it applied
//! (before it answers their clients) and [`ChangeFeed::replaced`] when a snapshot replaced
//! its state. The feed holds ids only; readers read the sandboxes themselves from the
//! applied-state copy, so the feed stays small and a slow reader only falls behind (and
//! resyncs from the state), never holds the backend up.
//!
//! - Per node: a `watch` of the revision that last touched the node. An agent's stream
//!   looks at its node when its own watch moves, not at every revision, so 10,000 connected
//!   agents cost nothing while their nodes are quiet.
//! - History: `(revision, sandbox)` for every sandbox written, at most [`HISTORY_ENTRIES`];
//!   the oldest revision it still answers for is `floor`. Older `after_revision`s are told
//!   so, with the floor.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::model::{NodeId, SandboxId};
use crate::state::Changes;

/// Most (revision, sandbox) pairs kept for resuming watches (16 bytes each).
pub const HISTORY_ENTRIES: usize = 1 << 20;

/// The fan-out of applied changes; one per replica, shared by its services.
#[derive(Debug)]
pub struct ChangeFeed {
    nodes: Mutex<HashMap<NodeId, watch::Sender<u64>>>,
    history: Mutex<History>,
    leading: watch::Sender<bool>,
}

#[derive(Debug)]
struct History {
    /// Changes after this revision are all in `entries`.
    floor: u64,
    entries: VecDeque<(u64, SandboxId, Option<Arc<str>>)>,
    cap: usize,
}

/// A watch asked to resume from before the oldest change kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooOld {
    /// The oldest `after_revision` that can be resumed from.
    pub floor: u64,
}

impl Default for ChangeFeed {
    fn default() -> Self {
        ChangeFeed::with_capacity(HISTORY_ENTRIES)
    }
}

impl ChangeFeed {
    /// A feed keeping at most `cap` history entries.
    pub fn with_capacity(cap: usize) -> ChangeFeed {
        ChangeFeed {
            nodes: Mutex::new(HashMap::new()),
            history: Mutex::new(History {
                floor: 0,
                entries: VecDeque::new(),
                cap: cap.max(1),
            }),
            leading: watch::channel(false).0,
        }
    }

    /// Records whether this replica leads; streams that only the leader serves end when
    /// it stops.
    pub fn set_leading(&self, leading: bool) {
        self.leading.send_if_modified(|was| {
            let changed = *was != leading;
            *was = leading;
            changed
        });
    }

    /// A receiver of whether this replica leads.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }

    /// A receiver that moves whenever an applied entry touches `node` (its value is that
    /// entry's revision). It starts marked changed, so the first wait returns at once.
    pub fn subscribe(&self, node: &str) -> watch::Receiver<u64> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let tx = nodes
            .entry(node.to_owned())
            .or_insert_with(|| watch::channel(0).0);
        let mut rx = tx.subscribe();
        rx.mark_changed();
        rx
    }

    /// Records what applied entries changed, oldest first, and wakes their nodes' streams.
    pub fn publish(&self, changes: &[Changes]) {
        if changes.is_empty() {
            return;
        }
        {
            let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
            for c in changes {
                let mut removed = c.removed.iter().peekable();
                for id in &c.sandboxes {
                    // Both lists ascend by id.
                    while removed.next_if(|(r, _)| r < id).is_some() {}
                    let tenant = removed
                        .next_if(|(r, _)| r == id)
                        .map(|(_, tenant)| Arc::<str>::from(tenant.as_str()));
                    h.entries.push_back((c.revision, *id, tenant));
                }
            }
            while h.entries.len() > h.cap {
                if let Some((revision, _, _)) = h.entries.pop_front() {
                    h.floor = h.floor.max(revision);
                }
            }
            // Entries left at the floor's revision are incomplete: drop them too.
            let floor = h.floor;
            while h.entries.front().is_some_and(|(r, _, _)| *r <= floor) {
                h.entries.pop_front();
            }
        }
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        for c in changes {
            for node in &c.nodes {
                let gone = nodes
                    .get(node)
                    .is_some_and(|tx| tx.send(c.revision).is_err());
                if gone {
                    nodes.remove(node);
                }
            }
        }
    }

    /// The state was replaced wholesale (a snapshot installed) at `revision`: history
    /// restarts there, and every node's stream looks again.
    pub fn replaced(&self, revision: u64) {
        {
            let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
            h.entries.clear();
            h.floor = revision;
        }
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.retain(|_, tx| tx.send(revision).is_ok());
    }

    /// The sandboxes written after `after` up to `upto` (inclusive), each once: `Some`
    /// tenant for one removed from the state by then, `None` for one still there. Or
    /// [`TooOld`] when changes after `after` are no longer all kept.
    pub fn changed_since(
        &self,
        after: u64,
        upto: u64,
    ) -> Result<BTreeMap<SandboxId, Option<Arc<str>>>, TooOld> {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if after < h.floor {
            return Err(TooOld { floor: h.floor });
        }
        let start = h.entries.partition_point(|(r, _, _)| *r <= after);
        // Later entries replace earlier ones: the last word on a sandbox wins.
        Ok(h.entries
            .range(start..)
            .take_while(|(r, _, _)| *r <= upto)
            .map(|(_, id, tenant)| (*id, tenant.clone()))
            .collect())
    }

    /// Streams waiting on nodes (for metrics).
    pub fn subscribed_nodes(&self) -> usize {
        self.nodes.lock().map_or(0, |n| n.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(revision: u64, sandboxes: &[u64], nodes: &[&str]) -> Changes {
        Changes {
            revision,
            sandboxes: sandboxes.iter().map(|n| SandboxId(*n)).collect(),
            removed: Vec::new(),
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
        }
    }

    fn ids(m: BTreeMap<SandboxId, Option<Arc<str>>>) -> Vec<u64> {
        m.keys().map(|id| id.0).collect()
    }

    #[tokio::test]
    async fn a_node_wakes_only_for_its_own_changes() {
        let feed = ChangeFeed::default();
        let mut a = feed.subscribe("a");
        let mut b = feed.subscribe("b");
        assert!(
            a.has_changed().expect("sender alive"),
            "a new subscriber looks once at once"
        );
        a.borrow_and_update();
        b.borrow_and_update();
        feed.publish(&[change(5, &[1], &["a"])]);
        assert!(a.has_changed().expect("sender alive"));
        assert!(
            !b.has_changed().expect("sender alive"),
            "b's node was not touched"
        );
        assert_eq!(*a.borrow_and_update(), 5);
        feed.replaced(9);
        assert!(a.has_changed().expect("sender alive") && b.has_changed().expect("sender alive"));
    }

    #[test]
    fn history_answers_after_a_revision_each_sandbox_once_and_says_when_too_old() {
        let feed = ChangeFeed::with_capacity(4);
        feed.publish(&[change(1, &[1, 2], &[]), change(2, &[2], &[])]);
        assert_eq!(ids(feed.changed_since(0, 2).expect("in the test")), [1, 2]);
        assert_eq!(ids(feed.changed_since(1, 2).expect("in the test")), [2]);
        assert!(feed.changed_since(2, 2).expect("in the test").is_empty());
        // Past the cap: revision 1's entries go (both, though the cap needed one), and 1
        // becomes the floor.
        feed.publish(&[change(3, &[3, 4], &[])]);
        assert_eq!(feed.changed_since(0, 3), Err(TooOld { floor: 1 }));
        assert_eq!(
            ids(feed.changed_since(1, 3).expect("in the test")),
            [2, 3, 4]
        );
        assert_eq!(ids(feed.changed_since(1, 2).expect("in the test")), [2]);
        // A removal carries the tenant, and is the last word on its sandbox.
        let mut gone = change(4, &[3], &[]);
        gone.removed = vec![(SandboxId(3), "t".into())];
        feed.publish(&[gone]);
        let since = feed.changed_since(2, 4).expect("in the test");
        assert_eq!(since.get(&SandboxId(3)), Some(&Some(Arc::from("t"))));
        assert_eq!(since.get(&SandboxId(4)), Some(&None));
        feed.replaced(10);
        assert_eq!(feed.changed_since(4, 10), Err(TooOld { floor: 10 }));
        assert!(feed.changed_since(10, 10).expect("in the test").is_empty());
    }
}
