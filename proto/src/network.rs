//! A sandbox's network policy, what it may reach, and its wire form. Inbound is always denied; the node agent
//! enforces the policy outside the sandbox (a network namespace, a veth pair and nftables),
//! so nothing the sandbox runs can widen it.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Validator;
use crate::pb::v1 as pb;

/// Most egress rules in one policy.
pub const MAX_RULES: usize = 64;
/// Most ports in one rule.
pub const MAX_PORTS: usize = 16;

/// What a sandbox may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NetworkPolicy {
    /// Loopback only (the default: agent code is untrusted).
    #[default]
    None,
    /// Anywhere except the node itself, other sandboxes, and the node's blocked ranges (the
    /// control plane, cloud metadata).
    EgressAll,
    /// Only these destinations (the node's blocked ranges still win).
    EgressAllow(Vec<EgressRule>),
}

impl NetworkPolicy {
    /// Whether the sandbox has any network beyond loopback.
    pub fn any(&self) -> bool {
        !matches!(self, NetworkPolicy::None)
    }

    /// Records every problem, with field paths relative to the policy.
    pub fn validate(&self, v: &mut Validator) {
        let NetworkPolicy::EgressAllow(rules) = self else {
            return;
        };
        v.check(!rules.is_empty(), "allow", || {
            "must list at least one destination for NETWORK_MODE_EGRESS_ALLOW".into()
        });
        v.check(rules.len() <= MAX_RULES, "allow", || {
            format!("{} rules; the limit is {MAX_RULES}", rules.len())
        });
        for (i, r) in rules.iter().enumerate() {
            v.check(
                r.ports.len() <= MAX_PORTS,
                &format!("allow[{i}].ports"),
                || format!("{} ports; the limit is {MAX_PORTS}", r.ports.len()),
            );
            if r.ports.contains(&0) {
                v.error(&format!("allow[{i}].ports"), "port 0 is not a port");
            }
        }
    }
}

/// One allowed destination: an IPv4 network, and TCP/UDP ports on it (none = every port).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EgressRule {
    /// Destination network.
    pub cidr: Cidr,
    /// Destination ports, TCP and UDP; empty for all.
    pub ports: Vec<u16>,
}

/// An IPv4 network, `a.b.c.d/len` (a bare address is `/32`); host bits must be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cidr {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub len: u8,
}

impl Cidr {
    /// The `index`-th block of `2^(32-block_len)` addresses inside this network, if it fits.
    pub fn subnet(&self, block_len: u8, index: u32) -> Option<Cidr> {
        if block_len < self.len || block_len > 32 {
            return None;
        }
        let bits = u32::from(block_len - self.len);
        if bits < 32 && u64::from(index) >= 1u64 << bits {
            return None;
        }
        let step = if block_len == 32 {
            1
        } else {
            1u32 << (32 - block_len)
        };
        let addr = u32::from(self.addr).checked_add(index.checked_mul(step)?)?;
        Some(Cidr {
            addr: Ipv4Addr::from(addr),
            len: block_len,
        })
    }

    /// How many blocks of `block_len` fit (saturating at `u32::MAX`).
    pub fn blocks(&self, block_len: u8) -> u32 {
        if block_len < self.len || block_len > 32 {
            return 0;
        }
        let bits = u32::from(block_len - self.len);
        if bits >= 32 { u32::MAX } else { 1 << bits }
    }

    /// The `n`-th address of the network.
    pub fn nth(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr).wrapping_add(n))
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (
                a,
                l.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= 32)
                    .ok_or_else(|| format!("{s:?}: the prefix length must be 0..=32"))?,
            ),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| {
            format!("{s:?} is not an IPv4 address or network (a.b.c.d or a.b.c.d/len)")
        })?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        if u32::from(addr) & !mask != 0 {
            return Err(format!(
                "{s:?} has host bits set; the network is {}/{len}",
                Ipv4Addr::from(u32::from(addr) & mask)
            ));
        }
        Ok(Cidr { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Reads `spec.network`; problems are recorded under `network`.
pub fn network_from_pb(p: Option<&pb::NetworkPolicy>, v: &mut Validator) -> NetworkPolicy {
    use pb::NetworkMode as Mode;
    let Some(p) = p else {
        return NetworkPolicy::None;
    };
    let rules = |v: &mut Validator| -> Vec<EgressRule> {
        p.allow
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let cidr = r
                    .cidr
                    .parse()
                    .map_err(|why| v.error(&format!("network.allow[{i}].cidr"), why))
                    .ok();
                let mut ports = Vec::with_capacity(r.ports.len());
                for &port in &r.ports {
                    match u16::try_from(port) {
                        Ok(p) => ports.push(p),
                        Err(_) => v.error(
                            &format!("network.allow[{i}].ports"),
                            format!("{port} is above 65535"),
                        ),
                    }
                }
                Some(EgressRule { cidr: cidr?, ports })
            })
            .collect()
    };
    match Mode::try_from(p.mode) {
        Ok(Mode::Unspecified | Mode::None | Mode::EgressAll) if !p.allow.is_empty() => {
            v.error(
                "network.allow",
                "is only for NETWORK_MODE_EGRESS_ALLOW (the mode says otherwise)",
            );
            NetworkPolicy::None
        }
        Ok(Mode::Unspecified | Mode::None) => NetworkPolicy::None,
        Ok(Mode::EgressAll) => NetworkPolicy::EgressAll,
        Ok(Mode::EgressAllow) => NetworkPolicy::EgressAllow(rules(v)),
        Err(_) => {
            v.error(
                "network.mode",
                format!(
                    "unknown value {} (NETWORK_MODE_NONE, NETWORK_MODE_EGRESS_ALL or \
                     NETWORK_MODE_EGRESS_ALLOW)",
                    p.mode
                ),
            );
            NetworkPolicy::None
        }
    }
}

/// Writes a policy to the wire; `None` is written as an explicit NETWORK_MODE_NONE.
pub fn network_to_pb(p: &NetworkPolicy) -> pb::NetworkPolicy {
    use pb::NetworkMode as Mode;
    let (mode, allow) = match p {
        NetworkPolicy::None => (Mode::None, Vec::new()),
        NetworkPolicy::EgressAll => (Mode::EgressAll, Vec::new()),
        NetworkPolicy::EgressAllow(rules) => (
            Mode::EgressAllow,
            rules
                .iter()
                .map(|r| pb::EgressRule {
                    cidr: r.cidr.to_string(),
                    ports: r.ports.iter().map(|&p| u32::from(p)).collect(),
                })
                .collect(),
        ),
    };
    pb::NetworkPolicy {
        mode: mode as i32,
        allow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: pb::NetworkPolicy) -> (NetworkPolicy, String) {
        let mut v = Validator::new();
        let policy = network_from_pb(Some(&p), &mut v);
        policy.validate(&mut v);
        (
            policy,
            v.finish().err().map(|e| e.one_line()).unwrap_or_default(),
        )
    }

    #[test]
    fn policies_round_trip_and_bad_ones_name_the_field() {
        let allow = pb::NetworkPolicy {
            mode: pb::NetworkMode::EgressAllow as i32,
            allow: vec![pb::EgressRule {
                cidr: "10.77.0.2/32".into(),
                ports: vec![8080, 53],
            }],
        };
        let (policy, errors) = read(allow.clone());
        assert_eq!(errors, "");
        assert_eq!(network_to_pb(&policy), allow);
        assert_eq!(
            network_from_pb(None, &mut Validator::new()),
            NetworkPolicy::None
        );

        let (_, errors) = read(pb::NetworkPolicy {
            mode: pb::NetworkMode::EgressAllow as i32,
            allow: vec![pb::EgressRule {
                cidr: "10.77.0.1/24".into(),
                ports: vec![70000],
            }],
        });
        assert!(
            errors.contains("network.allow[0].cidr: \"10.77.0.1/24\" has host bits"),
            "{errors}"
        );
        assert!(
            errors.contains("network.allow[0].ports: 70000 is above 65535"),
            "{errors}"
        );
        let (_, errors) = read(pb::NetworkPolicy {
            mode: pb::NetworkMode::EgressAll as i32,
            allow: allow.allow.clone(),
        });
        assert!(errors.contains("network.allow: is only for"), "{errors}");
        let (_, errors) = read(pb::NetworkPolicy {
            mode: 9,
            allow: vec![],
        });
        assert!(errors.contains("network.mode: unknown value 9"), "{errors}");
    }

    #[test]
    fn cidrs_parse_and_refuse_what_they_should() {
        let c: Cidr = "10.88.0.0/16".parse().expect("test value");
        assert_eq!(c.to_string(), "10.88.0.0/16");
        assert_eq!("1.2.3.4".parse::<Cidr>().expect("test value").len, 32);
        assert!(
            "10.88.0.1/16"
                .parse::<Cidr>()
                .expect_err("should fail")
                .contains("10.88.0.0/16")
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("::1/128".parse::<Cidr>().is_err());
        assert!("example.com".parse::<Cidr>().is_err());
    }

    #[test]
    fn subnets_tile_the_pool() {
        let pool: Cidr = "10.88.0.0/16".parse().expect("test value");
        assert_eq!(pool.blocks(30), 16384);
        assert_eq!(
            pool.subnet(30, 0).expect("test value").to_string(),
            "10.88.0.0/30"
        );
        assert_eq!(
            pool.subnet(30, 3).expect("test value").to_string(),
            "10.88.0.12/30"
        );
        assert_eq!(
            pool.subnet(30, 16383).expect("test value").to_string(),
            "10.88.255.252/30"
        );
        assert_eq!(pool.subnet(30, 16384), None);
        assert_eq!(pool.subnet(8, 0), None);
    }

    #[test]
    fn an_allow_policy_needs_rules_and_real_ports() {
        let mut v = Validator::new();
        NetworkPolicy::EgressAllow(vec![]).validate(&mut v);
        let rule = EgressRule {
            cidr: "10.0.0.0/8".parse().expect("test value"),
            ports: vec![0],
        };
        NetworkPolicy::EgressAllow(vec![rule]).validate(&mut v);
        let errors = v.finish().expect_err("should fail").one_line();
        assert!(errors.contains("allow: must list at least one"), "{errors}");
        assert!(errors.contains("allow[0].ports: port 0"), "{errors}");
        let mut ok = Validator::new();
        NetworkPolicy::EgressAll.validate(&mut ok);
        assert!(ok.finish().is_ok());
    }
}
