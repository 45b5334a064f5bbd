//! Image affinity: prefer nodes that already hold the sandbox's OCI image, so it starts
//! without a pull.
//!
//! Agents report the images they hold (`NodeSpec::cached_images`, at most
//! [`MAX_CACHED_IMAGES`](crate::model::MAX_CACHED_IMAGES)); a sandbox names one
//! (`SandboxSpec::image`). References match exactly as written: no registry, `library/` or
//! tag normalisation, so `busybox` and `docker.io/library/busybox:latest` are two images.
//! A sandbox without an image (every openb pod) gets no image component at all, so the
//! scorer is neutral there by construction.
//!
//! [`ImageRule`] says how much a cached image weighs against the policy's packing score;
//! [`ImageIndex`] interns the references the view's nodes hold, so a decision looks its
//! image up once and each candidate costs one binary search over a few integers.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::view::NodeIndex;

/// How a cached image counts against the policy's packing score.
///
/// The scores it is added to are the 0..=100 points of bestfit, fgd and berth
/// (`⌊100 · sigmoid(ΔF / 1000)⌋` for the latter two); the random policy's scores are
/// not points, so only [`ImageRule::TieBreak`]'s ordering means anything there.
/// In configs it is spelled as on the command line (`"off"`, `"tie-break"`, `"bonus:N"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ImageRule {
    /// Images play no part.
    Off,
    /// Among nodes the policy scores equal, one that holds the image **and already runs
    /// sandboxes** wins; the policy's own tie-break (berth's "CPU-only goes where GPUs are
    /// used up") comes after it. An empty node holding the image does not count: the image
    /// never makes placement open a node that first-fit order would keep empty.
    TieBreak,
    /// A node holding the image, empty or not, gets this many points on top of the policy
    /// score (and wins ties among equal totals). Large values place by image first, at a
    /// measured cost in packing (ARCHITECTURE.md).
    Bonus(u32),
}

impl ImageRule {
    /// The rule the placer uses unless told otherwise; ARCHITECTURE.md has the figures that
    /// chose it (`berth sim images`).
    pub const DEFAULT: ImageRule = ImageRule::TieBreak;

    /// Points a node holding the image gets on top of the policy score.
    pub fn bonus_points(self) -> f64 {
        match self {
            ImageRule::Bonus(points) => f64::from(points),
            ImageRule::Off | ImageRule::TieBreak => 0.0,
        }
    }

    /// The name in reports and on the command line: `off`, `tie-break`, `bonus:N`.
    pub fn label(self) -> String {
        match self {
            ImageRule::Off => "off".into(),
            ImageRule::TieBreak => "tie-break".into(),
            ImageRule::Bonus(points) => format!("bonus:{points}"),
        }
    }
}

impl Default for ImageRule {
    fn default() -> Self {
        ImageRule::DEFAULT
    }
}

impl std::str::FromStr for ImageRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(ImageRule::Off),
            "tie-break" => Ok(ImageRule::TieBreak),
            "on" => Ok(ImageRule::DEFAULT),
            _ => s
                .strip_prefix("bonus:")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|n| *n <= MAX_BONUS_POINTS)
                .map(ImageRule::Bonus)
                .ok_or_else(|| {
                    format!(
                        "unknown image rule {s:?}; one of off, on, tie-break, bonus:N (N ≤ {MAX_BONUS_POINTS})"
                    )
                }),
        }
    }
}

impl TryFrom<String> for ImageRule {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ImageRule> for String {
    fn from(rule: ImageRule) -> String {
        rule.label()
    }
}

/// Largest bonus accepted: 100 points already outweighs any difference of policy scores.
pub const MAX_BONUS_POINTS: u32 = 1000;

/// An interned image reference.
pub type ImageId = u32;

/// The images each node of a view holds, by interned id.
///
/// Ids are never reused or dropped: the set of references is bounded by what the nodes
/// report (at most 256 each), and the scheduler rebuilds its view on inventory changes.
/// The map is only looked up, never iterated, so it cannot make a decision depend on
/// hash order.
#[derive(Debug, Clone, Default)]
pub struct ImageIndex {
    ids: HashMap<String, ImageId>,
    /// Per node, sorted and deduplicated.
    held: Vec<Vec<ImageId>>,
}

impl ImageIndex {
    /// The id of a reference some node holds or held.
    pub fn id(&self, image: &str) -> Option<ImageId> {
        self.ids.get(image).copied()
    }

    /// Whether the node holds the image.
    pub fn holds(&self, node: NodeIndex, image: ImageId) -> bool {
        self.held
            .get(node as usize)
            .is_some_and(|held| held.binary_search(&image).is_ok())
    }

    /// How many nodes hold the image.
    pub fn holders(&self, image: &str) -> usize {
        self.id(image).map_or(0, |id| {
            self.held
                .iter()
                .filter(|held| held.binary_search(&id).is_ok())
                .count()
        })
    }

    /// Records the images of the next node (nodes are pushed in index order).
    pub(crate) fn push_node(&mut self, images: &[String]) {
        let held = self.intern(images);
        self.held.push(held);
    }

    /// Replaces what a node holds (it pulled or evicted images).
    pub(crate) fn set_node(&mut self, node: NodeIndex, images: &[String]) {
        let held = self.intern(images);
        if let Some(slot) = self.held.get_mut(node as usize) {
            *slot = held;
        }
    }

    fn intern(&mut self, images: &[String]) -> Vec<ImageId> {
        let mut held: Vec<ImageId> = images
            .iter()
            .filter(|image| !image.is_empty())
            .map(|image| {
                let next = self.ids.len() as ImageId;
                *self.ids.entry(image.clone()).or_insert(next)
            })
            .collect();
        held.sort_unstable();
        held.dedup();
        held
    }
}

/// One decision's image question: which image, and which nodes hold it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ImageAsk<'a> {
    index: &'a ImageIndex,
    /// `None` when no node holds the image: every node is a miss.
    id: Option<ImageId>,
}

impl<'a> ImageAsk<'a> {
    /// The question for a sandbox, or `None` when the rule is off or it names no image.
    pub(crate) fn new(rule: ImageRule, index: &'a ImageIndex, image: &str) -> Option<Self> {
        (rule != ImageRule::Off && !image.is_empty()).then(|| ImageAsk {
            index,
            id: index.id(image),
        })
    }

    /// Whether the node holds the image.
    pub(crate) fn cached(&self, node: NodeIndex) -> bool {
        self.id.is_some_and(|id| self.index.holds(node, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn an_index_answers_per_node_and_follows_replacements() {
        let mut index = ImageIndex::default();
        index.push_node(&images(&["a:1", "b:1"]));
        index.push_node(&images(&["b:1", "", "b:1"]));
        let (a, b) = (index.id("a:1").expect("a"), index.id("b:1").expect("b"));
        assert!(index.holds(0, a) && index.holds(0, b));
        assert!(!index.holds(1, a) && index.holds(1, b));
        assert_eq!(index.holders("b:1"), 2);
        assert_eq!(index.id(""), None, "an empty reference is no image");
        index.set_node(1, &images(&["a:1"]));
        assert!(index.holds(1, a) && !index.holds(1, b));
        assert_eq!(index.holders("b:1"), 1);
        assert!(!index.holds(7, a), "an unknown node holds nothing");
    }

    #[test]
    fn an_ask_is_absent_when_off_or_without_image() {
        let mut index = ImageIndex::default();
        index.push_node(&images(&["a:1"]));
        assert!(ImageAsk::new(ImageRule::Off, &index, "a:1").is_none());
        assert!(ImageAsk::new(ImageRule::TieBreak, &index, "").is_none());
        let unknown = ImageAsk::new(ImageRule::TieBreak, &index, "z:9").expect("asked");
        assert!(!unknown.cached(0));
        let known = ImageAsk::new(ImageRule::Bonus(3), &index, "a:1").expect("asked");
        assert!(known.cached(0));
    }

    #[test]
    fn rules_parse_and_print_alike() {
        for rule in [ImageRule::Off, ImageRule::TieBreak, ImageRule::Bonus(4)] {
            assert_eq!(rule.label().parse::<ImageRule>(), Ok(rule));
        }
        assert_eq!("on".parse::<ImageRule>(), Ok(ImageRule::DEFAULT));
        assert!("bonus:x".parse::<ImageRule>().is_err());
        assert!("bonus:1001".parse::<ImageRule>().is_err());
        assert_eq!(ImageRule::Bonus(4).bonus_points(), 4.0);
        assert_eq!(ImageRule::TieBreak.bonus_points(), 0.0);
    }

    #[test]
    fn rules_are_strings_in_configs() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Section {
            image_affinity: ImageRule,
        }
        let section: Section = toml::from_str("image_affinity = \"bonus:10\"").expect("parses");
        assert_eq!(section.image_affinity, ImageRule::Bonus(10));
        let text = toml::to_string(&section).expect("prints");
        assert_eq!(text.trim(), "image_affinity = \"bonus:10\"");
        let err = toml::from_str::<Section>("image_affinity = \"always\"").expect_err("refused");
        assert!(
            err.to_string().contains("unknown image rule \"always\""),
            "{err}"
        );
    }
}
