//! The caps no scale-up may cross: nodes per group, nodes overall, nodes requested per
//! minute, and the $/hour budget (of nodes running and requested).
//!
//! Pure: [`cap_scale_up`] takes the wanted scale-ups in the caller's order of preference
//! (cheapest first) and grants what fits, in that order, saying why the rest was cut.

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
fn micro(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e6).round() as u64
    } else {
        0
    }
}

/// Grants as much of `wanted` (group, nodes) as the caps allow, in order.
pub fn cap_scale_up(
    cfg: &AutoscalerConfig,
    fleet: &Fleet,
    wanted: &[(String, u32)],
) -> (Vec<(String, u32)>, Vec<Cut>) {
    let groups: BTreeMap<&str, &NodeGroupConfig> = cfg
        .node_groups
        .iter()
        .map(|g| (g.name.as_str(), g))
        .collect();
    let mut nodes = fleet.nodes.clone();
    let mut total: u64 = nodes.values().map(|n| u64::from(*n)).sum();
    let mut spend: u64 = nodes
        .iter()
        .filter_map(|(g, n)| {
            Some(micro(groups.get(g.as_str())?.price_per_hour_usd) * u64::from(*n))
        })
        .sum();
    let budget = micro(cfg.budget_usd_per_hour);
    let mut rate_left = cfg
        .max_scale_up_nodes_per_minute
        .saturating_sub(fleet.requested_last_minute);
    let mut granted: Vec<(String, u32)> = Vec::new();
    let mut cuts = Vec::new();
    for (name, want) in wanted {
        let Some(group) = groups.get(name.as_str()) else {
            cuts.push(Cut {
                group: name.clone(),
                nodes: *want,
                reason: "no such node group".into(),
            });
            continue;
        };
        let have = nodes.get(name).copied().unwrap_or(0);
        let price = micro(group.price_per_hour_usd);
        let limits = [
            (
                group.max_nodes.saturating_sub(have),
                format!("group max_nodes {}", group.max_nodes),
            ),
            (
                u32::try_from(u64::from(cfg.max_nodes_total).saturating_sub(total))
                    .unwrap_or(u32::MAX),
                format!("max_nodes_total {}", cfg.max_nodes_total),
            ),
            (
                rate_left,
                format!(
                    "max_scale_up_nodes_per_minute {}",
                    cfg.max_scale_up_nodes_per_minute
                ),
            ),
            (
                budget
                    .saturating_sub(spend)
                    .checked_div(price)
                    .map_or(u32::MAX, |n| u32::try_from(n).unwrap_or(u32::MAX)),
                format!("budget ${}/hour", cfg.budget_usd_per_hour),
            ),
        ];
        let (allowed, binding) = limits
            .iter()
            .min_by_key(|(n, _)| *n)
            .map(|(n, why)| (*n, why.clone()))
            .unwrap_or((0, String::new()));
        let grant = (*want).min(allowed);
        if grant < *want {
            cuts.push(Cut {
                group: name.clone(),
                nodes: want - grant,
                reason: binding,
            });
        }
        if grant == 0 {
            continue;
        }
        *nodes.entry(name.clone()).or_default() += grant;
        total += u64::from(grant);
        spend += price * u64::from(grant);
        rate_left -= grant;
        granted.push((name.clone(), grant));
    }
    (granted, cuts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::fixtures::h100_group;
    use proptest::prelude::*;

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
