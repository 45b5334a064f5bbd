//! Sandboxes' CPU and memory use as their agents last reported it: soft state on the leader
//! (agents stream to the leader only), never replicated. Each agent's `UsageReport`
//! replaces everything that node reported before, so the book holds at most one entry per
//! sandbox running somewhere, and a node's entries go when its stream closes. An entry is
//! shown only for a sandbox bound to the node that reported it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use berth_proto::pb::v1 as pb;

use crate::model::SandboxId;

/// Most entries taken from one report (an agent reports at most this many sandboxes).
pub const MAX_REPORTED: usize = super::api::MAX_OBSERVED;

#[derive(Default)]
struct Book {
    by_sandbox: HashMap<SandboxId, (String, pb::SandboxUsage)>,
    by_node: HashMap<String, Vec<SandboxId>>,
}

/// The leader's usage book; cheap to clone.
#[derive(Clone, Default)]
pub struct UsageBook(Arc<Mutex<Book>>);

impl UsageBook {
    /// Replaces `node`'s entries with `report`'s (entries that do not name a sandbox are
    /// left out).
    pub fn record(&self, node: &str, report: pb::UsageReport) {
        let mut book = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Self::drop_node(&mut book, node);
        let mut ids = Vec::with_capacity(report.sandboxes.len().min(MAX_REPORTED));
        for u in report.sandboxes.into_iter().take(MAX_REPORTED) {
            let Ok(id) = u.sandbox_id.parse::<SandboxId>() else {
                continue;
            };
            ids.push(id);
            book.by_sandbox.insert(id, (node.to_owned(), u));
        }
        book.by_node.insert(node.to_owned(), ids);
    }

    /// Forgets what `node` reported (its stream closed).
    pub fn forget(&self, node: &str) {
        let mut book = self.0.lock().unwrap_or_else(|p| p.into_inner());
        Self::drop_node(&mut book, node);
    }

    /// `id`'s last report, if `node` (the node it is bound to) made it.
    pub fn get(&self, id: SandboxId, node: &str) -> Option<pb::SandboxUsage> {
        let book = self.0.lock().unwrap_or_else(|p| p.into_inner());
        book.by_sandbox
            .get(&id)
            .filter(|(from, _)| from == node)
            .map(|(_, u)| u.clone())
    }

    /// Entries held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_sandbox
            .len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn drop_node(book: &mut Book, node: &str) {
        for id in book.by_node.remove(node).unwrap_or_default() {
            if book
                .by_sandbox
                .get(&id)
                .is_some_and(|(from, _)| from == node)
            {
                book.by_sandbox.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(id: &str, cpu: u64) -> pb::SandboxUsage {
        pb::SandboxUsage {
            sandbox_id: id.into(),
            cpu_milli: cpu,
            memory_bytes: 64 << 20,
            sampled_unix_ms: 1,
        }
    }

    #[test]
    fn a_report_replaces_the_nodes_last_and_only_the_bound_node_is_believed() {
        let book = UsageBook::default();
        let a: SandboxId = "sbx-0000000001".parse().expect("test value");
        let b: SandboxId = "sbx-0000000002".parse().expect("test value");
        book.record(
            "n1",
            pb::UsageReport {
                sandboxes: vec![usage("sbx-0000000001", 900), usage("junk", 1)],
            },
        );
        assert_eq!(book.get(a, "n1").map(|u| u.cpu_milli), Some(900));
        assert_eq!(book.get(a, "n2"), None, "n2 does not run it");
        book.record(
            "n1",
            pb::UsageReport {
                sandboxes: vec![usage("sbx-0000000002", 10)],
            },
        );
        assert_eq!(book.get(a, "n1"), None, "gone from n1's latest report");
        assert_eq!(book.get(b, "n1").map(|u| u.cpu_milli), Some(10));
        book.forget("n1");
        assert!(book.is_empty());
    }
}
