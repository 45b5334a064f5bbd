//! The caps no scale-up may cross: nodes per group, nodes overall, nodes requested per
//! minute, and the $/hour budget (of nodes running and requested).
//!
//! Pure: [`Caps`] is a running account the policy takes each grant off, so the order of
//! grants is the policy's order of preference, and a cut says which cap made it.

use std::collections::BTreeMap;

use crate::config::{AutoscalerConfig, NodeGroupConfig};

/// The fleet as the caps see it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fleet {
    /// Nodes per group, running or being provisioned.
    pub nodes: BTreeMap<String, u32>,
    /// Nodes requested from providers in the last minute.
    pub requested_last_minute: u32,
}

/// A scale-up cut short, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// Group.
    pub group: String,
    /// Nodes wanted but not granted.
    pub nodes: u32,
    /// Which cap.
    pub reason: String,
}

/// Micro-dollars per hour: integers, so caps compare exactly.
pub(crate) fn micro(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e6).round() as u64
    } else {
        0
    }
}

/// The caps as a running account: each grant is taken off what is left, so a decision that
/// adds nodes one group at a time never crosses any of them.
#[derive(Debug, Clone)]
pub struct Caps<'a> {
    groups: BTreeMap<&'a str, &'a NodeGroupConfig>,
    nodes: BTreeMap<String, u32>,
    total: u64,
    spend: u64,
    budget: u64,
    max_total: u64,
    max_rate: u32,
    rate_left: u32,
}

impl<'a> Caps<'a> {
    /// The caps of `cfg` with the fleet as it stands.
    pub fn new(cfg: &'a AutoscalerConfig, fleet: &Fleet) -> Caps<'a> {
        let groups: BTreeMap<&str, &NodeGroupConfig> = cfg
            .node_groups
            .iter()
            .map(|g| (g.name.as_str(), g))
            .collect();
        let nodes = fleet.nodes.clone();
        let total = nodes.values().map(|n| u64::from(*n)).sum();
        let spend = nodes
            .iter()
            .filter_map(|(g, n)| {
                Some(micro(groups.get(g.as_str())?.price_per_hour_usd) * u64::from(*n))
            })
            .sum();
        Caps {
            groups,
            nodes,
            total,
            spend,
            budget: micro(cfg.budget_usd_per_hour),
            max_total: u64::from(cfg.max_nodes_total),
            max_rate: cfg.max_scale_up_nodes_per_minute,
            rate_left: cfg
                .max_scale_up_nodes_per_minute
                .saturating_sub(fleet.requested_last_minute),
        }
    }

    /// How many more nodes of `group` fit under every cap, and the tightest cap's name.
    pub fn allowed(&self, group: &str) -> (u32, String) {
        let Some(config) = self.groups.get(group) else {
            return (0, "no such node group".into());
        };
        let have = self.nodes.get(group).copied().unwrap_or(0);
        let price = micro(config.price_per_hour_usd);
        let limits = [
            (
                config.max_nodes.saturating_sub(have),
                format!("group max_nodes {}", config.max_nodes),
            ),
            (
                u32::try_from(self.max_total.saturating_sub(self.total)).unwrap_or(u32::MAX),
                format!("max_nodes_total {}", self.max_total),
            ),
            (
                self.rate_left,
                format!("max_scale_up_nodes_per_minute {}", self.max_rate),
            ),
            (
                self.budget
                    .saturating_sub(self.spend)
                    .checked_div(price)
                    .map_or(u32::MAX, |n| u32::try_from(n).unwrap_or(u32::MAX)),
                format!("budget ${}/hour", self.budget as f64 / 1e6),
            ),
        ];
        limits
            .into_iter()
            .min_by_key(|(n, _)| *n)
            .unwrap_or((0, String::new()))
    }

    /// Takes `n` nodes of `group` off the caps (the caller checked [`Caps::allowed`]).
    pub fn take(&mut self, group: &str, n: u32) {
        let price = self
            .groups
            .get(group)
            .map_or(0, |g| micro(g.price_per_hour_usd));
        *self.nodes.entry(group.to_owned()).or_default() += n;
        self.total += u64::from(n);
        self.spend += price * u64::from(n);
        self.rate_left = self.rate_left.saturating_sub(n);
    }

    /// Grants `want` nodes of `group` or as many as fit, saying which cap cut the rest.
    pub fn grant(&mut self, group: &str, want: u32) -> (u32, Option<Cut>) {
        let (allowed, binding) = self.allowed(group);
        let grant = want.min(allowed);
        if grant > 0 {
            self.take(group, grant);
        }
        let cut = (grant < want).then(|| Cut {
            group: group.to_owned(),
            nodes: want - grant,
            reason: binding,
        });
        (grant, cut)
    }

    /// Dollars per hour of the fleet counted so far, granted nodes included.
    pub fn spend_usd_per_hour(&self) -> f64 {
        self.spend as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::h100_group;
    use proptest::prelude::*;

    /// Grants as much of `wanted` (group, nodes) as the caps allow, in order.
    fn cap_scale_up(
        cfg: &AutoscalerConfig,
        fleet: &Fleet,
        wanted: &[(String, u32)],
    ) -> (Vec<(String, u32)>, Vec<Cut>) {
        let mut caps = Caps::new(cfg, fleet);
        let mut granted = Vec::new();
        let mut cuts = Vec::new();
        for (name, want) in wanted {
            let (grant, cut) = caps.grant(name, *want);
            cuts.extend(cut);
            if grant > 0 {
                granted.push((name.clone(), grant));
            }
        }
        (granted, cuts)
    }

    fn group(name: &str, max: u32, price: f64) -> NodeGroupConfig {
        h100_group(name, 0, max, price)
    }

    fn config(
        groups: Vec<NodeGroupConfig>,
        total: u32,
        rate: u32,
        budget: f64,
    ) -> AutoscalerConfig {
        AutoscalerConfig {
            node_groups: groups,
            max_nodes_total: total,
            max_scale_up_nodes_per_minute: rate,
            budget_usd_per_hour: budget,
            ..AutoscalerConfig::default()
        }
    }

    #[test]
    fn each_cap_cuts_and_says_so() {
        let cfg = config(
            vec![group("a", 5, 10.0), group("b", 100, 1.0)],
            100,
            100,
            1_000.0,
        );
        let (granted, cuts) = cap_scale_up(&cfg, &Fleet::default(), &[("a".into(), 8)]);
        assert_eq!(granted, [("a".to_string(), 5)]);
        assert_eq!(cuts[0].nodes, 3);
        assert_eq!(cuts[0].reason, "group max_nodes 5");

        let cfg = config(vec![group("a", 100, 10.0)], 100, 100, 35.0);
        let (granted, cuts) = cap_scale_up(&cfg, &Fleet::default(), &[("a".into(), 8)]);
        assert_eq!(
            granted,
            [("a".to_string(), 3)],
            "$35/h buys three $10 nodes"
        );
        assert!(cuts[0].reason.starts_with("budget"), "{cuts:?}");

        let cfg = config(vec![group("a", 100, 1.0)], 100, 10, 1_000.0);
        let fleet = Fleet {
            nodes: BTreeMap::new(),
            requested_last_minute: 7,
        };
        let (granted, cuts) = cap_scale_up(&cfg, &fleet, &[("a".into(), 8)]);
        assert_eq!(granted, [("a".to_string(), 3)]);
        assert!(cuts[0].reason.starts_with("max_scale_up"), "{cuts:?}");
    }

    proptest! {
        #[test]
        fn no_cap_is_ever_crossed(
            maxes in prop::collection::vec(0u32..20, 3),
            prices in prop::collection::vec(0.0f64..50.0, 3),
            have in prop::collection::vec(0u32..20, 3),
            wanted in prop::collection::vec((0usize..4, 0u32..30), 0..8),
            total in 0u32..60,
            rate in 0u32..40,
            recent in 0u32..40,
            budget in 0.0f64..2_000.0,
        ) {
            let groups: Vec<NodeGroupConfig> = (0..3)
                .map(|i| group(&format!("g{i}"), maxes[i], prices[i]))
                .collect();
            let cfg = config(groups.clone(), total, rate, budget);
            let fleet = Fleet {
                nodes: (0..3).map(|i| (format!("g{i}"), have[i])).collect(),
                requested_last_minute: recent,
            };
            let wanted: Vec<(String, u32)> =
                wanted.iter().map(|(g, n)| (format!("g{g}"), *n)).collect();
            let (granted, _) = cap_scale_up(&cfg, &fleet, &wanted);
            let added: u64 = granted.iter().map(|(_, n)| u64::from(*n)).sum();
            prop_assert!(added <= u64::from(rate.saturating_sub(recent)));
            let before: u64 = have.iter().map(|n| u64::from(*n)).sum();
            prop_assert!(added == 0 || before + added <= u64::from(total));
            for (i, g) in groups.iter().enumerate() {
                let got: u32 = granted.iter().filter(|(n, _)| *n == g.name).map(|(_, n)| *n).sum();
                prop_assert!(got == 0 || have[i] + got <= g.max_nodes);
            }
            let spend_before: u64 = (0..3).map(|i| micro(prices[i]) * u64::from(have[i])).sum();
            let spend_added: u64 = granted
                .iter()
                .map(|(n, k)| {
                    let i: usize = n[1..].parse().expect("index");
                    micro(prices[i]) * u64::from(*k)
                })
                .sum();
            prop_assert!(spend_added == 0 || spend_before + spend_added <= micro(budget));
            for (name, want) in &wanted {
                let got: u32 = granted.iter().filter(|(n, _)| n == name).map(|(_, n)| *n).sum();
                let asked: u32 = wanted.iter().filter(|(n, _)| n == name).map(|(_, n)| *n).sum();
                prop_assert!(got <= asked, "{name}: {got} > {asked} ({want})");
            }
        }
    }
}
