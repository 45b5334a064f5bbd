//! Scale-down: which nodes to cordon and remove.
//!
//! Pure: the caller passes the nodes as the scheduler sees them and the time. The rules:
//! - only a node with no sandbox on it is ever removed: the autoscaler never evicts;
//! - it must have been idle for at least the cooldown;
//! - a group never goes below its `min_nodes`;
//! - removals never leave fewer free whole GPUs of a model than its headroom asks for;
//! - among candidates, the longest idle go first, then the most expensive (the biggest
//!   saving), then by id, so the same input always gives the same answer.

use std::collections::BTreeMap;

use crate::config::NodeGroupConfig;

/// A node as scale-down sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Its node group (a node outside every group is never touched).
    pub group: String,
    /// Sandboxes bound to it (Scheduled or Running).
    pub sandboxes: u32,
    /// Since when it has had no sandbox, in ms; `None` while it has one.
    pub idle_since_ms: Option<u64>,
    /// Whole GPUs free on it, with their model.
    pub free_gpus: u32,
    /// Its GPU model, if any.
    pub gpu_model: Option<String>,
}

/// One node to cordon and remove, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    /// Node id.
    pub node: String,
    /// Its group.
    pub group: String,
    /// Why, for the decision log.
    pub reason: String,
}

/// Decides which idle nodes to remove at `now_ms`.
pub fn scale_down(
    now_ms: u64,
    cooldown_ms: u64,
    groups: &[NodeGroupConfig],
    headroom_gpus: &BTreeMap<String, u32>,
    nodes: &[NodeView],
) -> Vec<Removal> {
    let by_name: BTreeMap<&str, &NodeGroupConfig> =
        groups.iter().map(|g| (g.name.as_str(), g)).collect();
    let mut live: BTreeMap<&str, u32> = BTreeMap::new();
    let mut free: BTreeMap<&str, u64> = BTreeMap::new();
    for n in nodes {
        *live.entry(n.group.as_str()).or_default() += 1;
        if let Some(model) = &n.gpu_model {
            *free.entry(model.as_str()).or_default() += u64::from(n.free_gpus);
        }
    }
    let mut candidates: Vec<(&NodeView, u64, u64)> = nodes
        .iter()
        .filter(|n| n.sandboxes == 0)
        .filter_map(|n| {
            let since = n.idle_since_ms?;
            let idle = now_ms.checked_sub(since)?;
            let group = by_name.get(n.group.as_str())?;
            let price = (group.price_per_hour_usd * 1e6) as u64;
            (idle >= cooldown_ms).then_some((n, idle, price))
        })
        .collect();
    candidates.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.id.cmp(&b.0.id)));
    let mut out = Vec::new();
    for (node, idle, _) in candidates {
        let Some(group) = by_name.get(node.group.as_str()) else {
            continue;
        };
        let count = live.get(node.group.as_str()).copied().unwrap_or(0);
        if count <= group.min_nodes {
            continue;
        }
        if let Some(model) = &node.gpu_model {
            let keep = u64::from(headroom_gpus.get(model).copied().unwrap_or(0));
            let have = free.get(model.as_str()).copied().unwrap_or(0);
            if have.saturating_sub(u64::from(node.free_gpus)) < keep {
                continue;
            }
            if let Some(f) = free.get_mut(model.as_str()) {
                *f -= u64::from(node.free_gpus).min(*f);
            }
        }
        if let Some(c) = live.get_mut(node.group.as_str()) {
            *c -= 1;
        }
        out.push(Removal {
            node: node.id.clone(),
            group: node.group.clone(),
            reason: format!(
                "idle for {} s (cooldown {} s); group {} keeps {} of min {}",
                idle / 1000,
                cooldown_ms / 1000,
                node.group,
                count - 1,
                group.min_nodes
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::h100_group;
    use proptest::prelude::*;

    fn group(name: &str, min: u32, price: f64) -> NodeGroupConfig {
        h100_group(name, min, 100, price)
    }

    fn node(id: &str, group: &str, sandboxes: u32, idle_since: Option<u64>) -> NodeView {
        NodeView {
            id: id.into(),
            group: group.into(),
            sandboxes,
            idle_since_ms: idle_since,
            free_gpus: if sandboxes == 0 { 8 } else { 0 },
            gpu_model: Some("H100".into()),
        }
    }

    #[test]
    fn idle_past_the_cooldown_goes_longest_idle_first_and_min_is_kept() {
        let groups = [group("a", 1, 98.0)];
        let nodes = [
            node("n1", "a", 0, Some(0)),
            node("n2", "a", 0, Some(50_000)),
            node("n3", "a", 2, None),
            node("n4", "a", 0, Some(95_000)),
        ];
        let out = scale_down(100_000, 30_000, &groups, &BTreeMap::new(), &nodes);
        let ids: Vec<&str> = out.iter().map(|r| r.node.as_str()).collect();
        // n4 is inside the cooldown, n3 is busy; four nodes, min 1: both idle ones go.
        assert_eq!(ids, ["n1", "n2"]);
        assert!(
            out[0].reason.contains("idle for 100 s"),
            "{}",
            out[0].reason
        );

        let groups = [group("a", 3, 98.0)];
        let out = scale_down(100_000, 30_000, &groups, &BTreeMap::new(), &nodes);
        assert_eq!(out.len(), 1, "min 3 of 4 allows one removal: {out:?}");
        assert_eq!(out[0].node, "n1");
    }

    #[test]
    fn headroom_keeps_free_gpus() {
        let groups = [group("a", 0, 98.0)];
        let nodes = [node("n1", "a", 0, Some(0)), node("n2", "a", 0, Some(0))];
        let headroom = BTreeMap::from([("H100".to_string(), 8)]);
        let out = scale_down(100_000, 1_000, &groups, &headroom, &nodes);
        assert_eq!(out.len(), 1, "8 free H100s stay: {out:?}");
    }

    proptest! {
        #[test]
        fn never_removes_a_busy_node_or_goes_below_min(
            shape in prop::collection::vec((0u32..3, prop::option::of(0u64..200_000), 0usize..3), 0..40),
            mins in prop::collection::vec(0u32..5, 3),
            now in 0u64..300_000,
            cooldown in 0u64..100_000,
        ) {
            let groups: Vec<NodeGroupConfig> = mins
                .iter()
                .enumerate()
                .map(|(i, m)| group(&format!("g{i}"), *m, 1.0 + i as f64))
                .collect();
            let nodes: Vec<NodeView> = shape
                .iter()
                .enumerate()
                .map(|(i, (sandboxes, idle, g))| {
                    node(&format!("n{i}"), &format!("g{g}"), *sandboxes, if *sandboxes == 0 { *idle } else { None })
                })
                .collect();
            let out = scale_down(now, cooldown, &groups, &BTreeMap::new(), &nodes);
            for r in &out {
                let n = nodes.iter().find(|n| n.id == r.node).expect("a listed node");
                prop_assert_eq!(n.sandboxes, 0);
                prop_assert!(now - n.idle_since_ms.expect("idle") >= cooldown);
            }
            for (i, g) in groups.iter().enumerate() {
                let name = format!("g{i}");
                let before = nodes.iter().filter(|n| n.group == name).count() as u32;
                let removed = out.iter().filter(|r| r.group == name).count() as u32;
                prop_assert!(removed == 0 || before - removed >= g.min_nodes);
            }
            let again = scale_down(now, cooldown, &groups, &BTreeMap::new(), &nodes);
            prop_assert_eq!(out, again);
        }
    }
}
