//! A seeded image catalog with skewed popularity, and the per-node image caches the
//! experiment keeps (least recently used first, as an agent's pull cache evicts).

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::Rng;

/// Most images in a catalog: an agent reports at most 256, and a larger catalog only makes
/// every node a miss.
pub const MAX_IMAGES: usize = 100_000;

/// Images with Zipf popularity: image `k` (0-based) is drawn with weight `1 / (k + 1)^s`.
#[derive(Debug, Clone)]
pub struct Catalog {
    names: Vec<String>,
    /// Cumulative weights, last = total.
    cumulative: Vec<f64>,
}

impl Catalog {
    /// `images` references (at least one, at most [`MAX_IMAGES`]) with Zipf exponent `s`
    /// (0 = uniform; about 1 is typical of container registries).
    pub fn new(images: usize, s: f64) -> Catalog {
        let images = images.clamp(1, MAX_IMAGES);
        let names = (0..images)
            .map(|k| format!("registry.berth.test/app-{k:05}:v1"))
            .collect();
        let mut total = 0.0;
        let cumulative = (0..images)
            .map(|k| {
                total += 1.0 / ((k + 1) as f64).powf(s.max(0.0));
                total
            })
            .collect();
        Catalog { names, cumulative }
    }

    /// How many images.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the catalog is empty (never: it holds at least one image).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The reference of image `k`.
    pub fn name(&self, k: u32) -> &str {
        &self.names[k as usize]
    }

    /// One image by popularity.
    pub fn draw(&self, rng: &mut ChaCha8Rng) -> u32 {
        let total = self.cumulative.last().copied().unwrap_or(1.0);
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
        let k = self.cumulative.partition_point(|c| *c <= u);
        k.min(self.names.len() - 1) as u32
    }

    /// `count` distinct images by popularity (all of them when `count` ≥ the catalog), in
    /// the order drawn: the first is the least recently used.
    pub fn draw_distinct(&self, count: usize, rng: &mut ChaCha8Rng) -> Vec<u32> {
        if count >= self.names.len() {
            return (0..self.names.len() as u32).collect();
        }
        let mut out: Vec<u32> = Vec::with_capacity(count);
        // Bounded: after this many draws the rest is filled in popularity order, so a very
        // skewed catalog cannot loop for long.
        let mut attempts = 64 * count;
        while out.len() < count && attempts > 0 {
            attempts -= 1;
            let k = self.draw(rng);
            if !out.contains(&k) {
                out.push(k);
            }
        }
        let mut k = 0u32;
        while out.len() < count {
            if !out.contains(&k) {
                out.push(k);
            }
            k += 1;
        }
        out
    }
}

/// The images one node holds, least recently used first, at most `capacity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCache {
    images: Vec<u32>,
    capacity: usize,
}

impl NodeCache {
    /// A cache holding `images` (the first is the least recently used); beyond `capacity`
    /// the oldest are dropped.
    pub fn new(mut images: Vec<u32>, capacity: usize) -> NodeCache {
        let capacity = capacity.max(1);
        if images.len() > capacity {
            images.drain(..images.len() - capacity);
        }
        NodeCache { images, capacity }
    }

    /// Whether the node holds the image.
    pub fn holds(&self, image: u32) -> bool {
        self.images.contains(&image)
    }

    /// A sandbox of `image` starts here: a hit makes it the most recently used; a miss
    /// pulls it and evicts the least recently used beyond capacity. Returns whether the
    /// set of images changed (a pull).
    pub fn start(&mut self, image: u32) -> bool {
        if let Some(at) = self.images.iter().position(|i| *i == image) {
            let hit = self.images.remove(at);
            self.images.push(hit);
            return false;
        }
        self.images.push(image);
        if self.images.len() > self.capacity {
            self.images.remove(0);
        }
        true
    }

    /// The references, as an agent would report them.
    pub fn references(&self, catalog: &Catalog) -> Vec<String> {
        self.images
            .iter()
            .map(|k| catalog.name(*k).to_owned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::SeedableRng;

    #[test]
    fn popularity_is_skewed_and_seeded() {
        let catalog = Catalog::new(100, 1.0);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut counts = vec![0u32; 100];
        for _ in 0..20_000 {
            counts[catalog.draw(&mut rng) as usize] += 1;
        }
        // Zipf(1) over 100: the first image is drawn about 19 % of the time, the tenth
        // about 1.9 %, the last about 0.19 %.
        assert!((3_400..4_400).contains(&counts[0]), "{}", counts[0]);
        assert!((250..520).contains(&counts[9]), "{}", counts[9]);
        assert!(counts[99] < 100, "{}", counts[99]);
        let again: Vec<u32> = {
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            (0..10).map(|_| catalog.draw(&mut rng)).collect()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let first: Vec<u32> = (0..10).map(|_| catalog.draw(&mut rng)).collect();
        assert_eq!(first, again);
        let distinct = catalog.draw_distinct(30, &mut rng);
        let mut sorted = distinct.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 30);
        assert_eq!(
            Catalog::new(3, 1.0).draw_distinct(5, &mut rng),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn a_node_cache_evicts_the_least_recently_used() {
        let mut cache = NodeCache::new(vec![1, 2, 3], 3);
        assert!(!cache.start(1), "a hit pulls nothing");
        assert!(cache.start(4), "a miss pulls");
        assert!(!cache.holds(2), "2 was the least recently used");
        assert!(cache.holds(1) && cache.holds(3) && cache.holds(4));
        assert_eq!(
            NodeCache::new(vec![1, 2, 3], 2),
            NodeCache::new(vec![2, 3], 2)
        );
    }
}
