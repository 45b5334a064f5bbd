//! The names of the placement policies, as configs and reports spell them.

use serde::{Deserialize, Serialize};

/// Placement policy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyName {
    /// Uniformly random feasible node (baseline).
    Random,
    /// Tightest fit (baseline).
    Bestfit,
    /// Fragmentation Gradient Descent, USENIX ATC '23 (baseline).
    Fgd,
    /// berth's own default.
    Berth,
}

impl PolicyName {
    /// Every policy, for help texts.
    pub const ALL: [PolicyName; 4] = [
        PolicyName::Random,
        PolicyName::Bestfit,
        PolicyName::Fgd,
        PolicyName::Berth,
    ];

    /// The name in configs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyName::Random => "random",
            PolicyName::Bestfit => "bestfit",
            PolicyName::Fgd => "fgd",
            PolicyName::Berth => "berth",
        }
    }
}

impl std::str::FromStr for PolicyName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyName::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown policy {s:?}; one of random, bestfit, fgd, berth"))
    }
}
