//! The placement engine's view of the cluster: free resources per node, kept in indexes so
//! candidates are found without scanning every node.
//!
//! A view is built from the replicated [`State`] (or from a trace in the simulator) and then
//! updated in place as placements are reserved, so the sandboxes of one batch see each
//! other. Indexes, per GPU model:
//! - `by_free_whole`: (fully free GPUs, node) — whole-GPU requests range over `k..`;
//! - `by_max_share`: (largest free milli on one GPU, node) — shared requests range over `m..`;
//!
//! and one over all nodes by free CPU for CPU-only requests. Ranges are visited tightest
//! first, which is also the order packing policies prefer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;

use berth_proto::GpuModelName;

use super::image::ImageIndex;
use crate::model::{NodeSpec, NodeStatus, Placement, SandboxSpec, TenantQuota};
use crate::state::State;

/// Index of a node in the view.
pub type NodeIndex = u32;

/// One node as placement sees it.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// Inventory (shared with the state's copy where possible).
    pub spec: Arc<NodeSpec>,
    /// Registration epoch the view was taken at.
    pub epoch: u64,
    /// Whether new sandboxes may land here.
    pub ready: bool,
    /// Free CPU.
    pub cpu_milli_free: u64,
    /// Free memory.
    pub memory_mib_free: u64,
    /// Free milli per GPU index; an unhealthy GPU counts as 0 free.
    pub gpu_milli_free: Vec<u32>,
    /// Model of the node's GPUs when they are all one model (the common case).
    pub gpu_model: Option<GpuModelName>,
    /// Tie-break rank: a seeded random permutation of the nodes.
    pub rank: u32,
}

impl NodeView {
    /// Whether anything runs here (some CPU or memory is taken).
    pub fn in_use(&self) -> bool {
        self.cpu_milli_free < self.spec.cpu_milli || self.memory_mib_free < self.spec.memory_mib
    }

    /// Sum of free milli over GPUs.
    pub fn gpu_milli_free_total(&self) -> u64 {
        self.gpu_milli_free.iter().map(|f| u64::from(*f)).sum()
    }
}

/// Where a node is: (provider, region). Indexes are split by location so a sandbox pinned
/// to a provider or region visits only nodes there.
pub type Location = (String, String);

#[derive(Debug, Default, Clone)]
pub(crate) struct ModelIndex {
    pub(crate) by_free_whole: BTreeSet<(u32, NodeIndex)>,
    pub(crate) by_max_share: BTreeSet<(u32, NodeIndex)>,
    pub(crate) nodes: u32,
}

/// Free capacity of every node, with indexes, plus tenant GPU usage for quota checks.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub(crate) nodes: Vec<NodeView>,
    pub(crate) by_id: HashMap<String, NodeIndex>,
    pub(crate) models: BTreeMap<GpuModelName, BTreeMap<Location, ModelIndex>>,
    pub(crate) by_cpu_free: BTreeMap<Location, BTreeSet<(u64, NodeIndex)>>,
    pub(crate) tenant_quota: HashMap<String, TenantQuota>,
    pub(crate) tenant_gpu_milli: HashMap<(String, GpuModelName), u64>,
    /// The images each node holds (image affinity).
    pub(crate) images: ImageIndex,
    /// Reserved beyond what was free, per node (CPU, memory, per-GPU milli). Reservations
    /// of plans that `apply` will refuse can exceed a node; counting the excess keeps
    /// `reserve` then `release` an exact round trip, so a view kept up to date
    /// incrementally never drifts. Sparse: almost always empty.
    overdraft: HashMap<NodeIndex, (u64, u64, Vec<u64>)>,
}

impl ClusterView {
    /// An empty view. Nodes are ranked in insertion order until [`ClusterView::shuffle_ranks`].
    pub fn new() -> ClusterView {
        ClusterView {
            nodes: Vec::new(),
            by_id: HashMap::new(),
            models: BTreeMap::new(),
            by_cpu_free: BTreeMap::new(),
            tenant_quota: HashMap::new(),
            tenant_gpu_milli: HashMap::new(),
            images: ImageIndex::default(),
            overdraft: HashMap::new(),
        }
    }

    /// The view of a replicated state's free capacity. `seed` fixes tie-break ranks.
    pub fn from_state(state: &State, seed: u64) -> ClusterView {
        let mut view = ClusterView::new();
        for node in state.nodes().values() {
            let free: Vec<u32> = node
                .spec
                .gpus
                .iter()
                .enumerate()
                .map(|(i, gpu)| {
                    if gpu.healthy {
                        node.gpu_milli_free(i)
                    } else {
                        0
                    }
                })
                .collect();
            view.push(
                Arc::new(node.spec.clone()),
                node.epoch,
                node.status == NodeStatus::Ready,
                node.cpu_milli_free(),
                node.memory_mib_free(),
                free,
            );
        }
        for (tenant, record) in state.tenants() {
            if !record.quota.max_gpu_milli_per_model.is_empty() {
                view.tenant_quota
                    .insert(tenant.clone(), record.quota.clone());
                for (model, milli) in &record.gpu_milli_by_model {
                    view.tenant_gpu_milli
                        .insert((tenant.clone(), model.clone()), *milli);
                }
            }
        }
        view.shuffle_ranks(seed);
        view
    }

    /// Adds a node with the given free resources (ranks follow insertion order until
    /// [`ClusterView::shuffle_ranks`]).
    pub fn push(
        &mut self,
        spec: Arc<NodeSpec>,
        epoch: u64,
        ready: bool,
        cpu_milli_free: u64,
        memory_mib_free: u64,
        gpu_milli_free: Vec<u32>,
    ) -> NodeIndex {
        let index = self.nodes.len() as NodeIndex;
        let first = spec.gpus.first().map(|g| g.model.clone());
        let gpu_model = first.filter(|m| spec.gpus.iter().all(|g| &g.model == m));
        self.by_id.insert(spec.id.clone(), index);
        self.images.push_node(&spec.cached_images);
        self.nodes.push(NodeView {
            spec,
            epoch,
            ready,
            cpu_milli_free,
            memory_mib_free,
            gpu_milli_free,
            gpu_model,
            rank: index,
        });
        let location = self.location(index);
        for model in self.node_models(index) {
            self.models
                .entry(model)
                .or_default()
                .entry(location.clone())
                .or_default()
                .nodes += 1;
        }
        self.update_index(index, true);
        index
    }

    /// Re-draws the tie-break ranks as a permutation seeded by `seed`.
    pub fn shuffle_ranks(&mut self, seed: u64) {
        use rand_chacha::rand_core::Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut ranks: Vec<u32> = (0..self.nodes.len() as u32).collect();
        // Fisher–Yates.
        for i in (1..ranks.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            ranks.swap(i, j);
        }
        for (node, rank) in self.nodes.iter_mut().zip(ranks) {
            node.rank = rank;
        }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// All nodes.
    pub fn nodes(&self) -> &[NodeView] {
        &self.nodes
    }

    /// A node by index.
    pub fn node(&self, index: NodeIndex) -> &NodeView {
        &self.nodes[index as usize]
    }

    /// A node's index by id.
    pub fn index_of(&self, id: &str) -> Option<NodeIndex> {
        self.by_id.get(id).copied()
    }

    /// GPU models present, with their node counts.
    pub fn models(&self) -> impl Iterator<Item = (&GpuModelName, u32)> {
        self.models
            .iter()
            .map(|(m, locations)| (m, locations.values().map(|i| i.nodes).sum()))
    }

    /// A node's location.
    pub fn location(&self, index: NodeIndex) -> Location {
        let spec = &self.nodes[index as usize].spec;
        (spec.provider.clone(), spec.region.clone())
    }

    /// The images each node holds.
    pub fn images(&self) -> &ImageIndex {
        &self.images
    }

    /// Replaces the images a node holds (the simulator's pulls and evictions; the scheduler
    /// rebuilds its view when an agent reports a new inventory instead).
    pub fn set_cached_images(&mut self, index: NodeIndex, images: &[String]) {
        let Some(node) = self.nodes.get_mut(index as usize) else {
            return;
        };
        Arc::make_mut(&mut node.spec).cached_images = images.to_vec();
        self.images.set_node(index, images);
    }

    /// Milli-GPU of `model` the tenant holds (only tracked for tenants with a GPU quota).
    pub fn tenant_gpu_milli(&self, tenant: &str, model: &GpuModelName) -> u64 {
        self.tenant_gpu_milli
            .get(&(tenant.to_owned(), model.clone()))
            .copied()
            .unwrap_or(0)
    }

    /// A tenant's quota, when it has a GPU quota.
    pub fn tenant_quota(&self, tenant: &str) -> Option<&TenantQuota> {
        self.tenant_quota.get(tenant)
    }

    /// Takes a placement's resources off its node, so later decisions see them as used.
    pub fn reserve(&mut self, spec: &SandboxSpec, placement: &Placement) {
        self.adjust(spec, placement, true);
    }

    /// Gives a placement's resources back (a sandbox ended, or a planned bind was refused).
    pub fn release(&mut self, spec: &SandboxSpec, placement: &Placement) {
        self.adjust(spec, placement, false);
    }

    /// Takes (`take`) or gives back a placement's resources, keeping the indexes and the
    /// tenant's GPU usage in step. Amounts stay within 0..=capacity, and an unhealthy GPU
    /// stays at 0 free: nothing new may land on it.
    fn adjust(&mut self, spec: &SandboxSpec, placement: &Placement, take: bool) {
        let Some(index) = self.index_of(&placement.node) else {
            return;
        };
        self.update_index(index, false);
        let node = &mut self.nodes[index as usize];
        let gpus = node.spec.gpus.len();
        let over = self
            .overdraft
            .entry(index)
            .or_insert_with(|| (0, 0, vec![0; gpus]));
        // Taking more than is free records the excess; giving back pays it off first.
        let step = |free: u64, over: &mut u64, amount: u64, capacity: u64| {
            if take {
                *over += amount.saturating_sub(free);
                free.saturating_sub(amount)
            } else {
                let paid = amount.min(*over);
                *over -= paid;
                (free + amount - paid).min(capacity)
            }
        };
        node.cpu_milli_free = step(
            node.cpu_milli_free,
            &mut over.0,
            spec.cpu_milli,
            node.spec.cpu_milli,
        );
        node.memory_mib_free = step(
            node.memory_mib_free,
            &mut over.1,
            spec.memory_mib,
            node.spec.memory_mib,
        );
        for i in &placement.gpu_indices {
            let healthy = node.spec.gpus.get(*i as usize).is_some_and(|g| g.healthy);
            let slot = over.2.get_mut(*i as usize);
            if let (Some(free), Some(over), true) =
                (node.gpu_milli_free.get_mut(*i as usize), slot, healthy)
            {
                // At most 1000, so the conversion back cannot fail.
                *free = u32::try_from(step(
                    u64::from(*free),
                    over,
                    u64::from(placement.gpu_milli_per_gpu),
                    1000,
                ))
                .unwrap_or(0);
            }
        }
        if over.0 == 0 && over.1 == 0 && over.2.iter().all(|g| *g == 0) {
            self.overdraft.remove(&index);
        }
        let model = placement
            .gpu_indices
            .first()
            .and_then(|i| node.spec.gpus.get(*i as usize))
            .map(|g| g.model.clone());
        self.update_index(index, true);
        let (Some(model), true) = (model, self.tenant_quota.contains_key(&spec.tenant)) else {
            return;
        };
        let milli = u64::from(placement.gpu_milli_per_gpu) * placement.gpu_indices.len() as u64;
        let held = self
            .tenant_gpu_milli
            .entry((spec.tenant.clone(), model))
            .or_default();
        *held = if take {
            *held + milli
        } else {
            held.saturating_sub(milli)
        };
    }

    fn node_models(&self, index: NodeIndex) -> Vec<GpuModelName> {
        let node = &self.nodes[index as usize];
        match &node.gpu_model {
            Some(m) => vec![m.clone()],
            None => {
                let mut models: Vec<GpuModelName> =
                    node.spec.gpus.iter().map(|g| g.model.clone()).collect();
                models.sort();
                models.dedup();
                models
            }
        }
    }

    /// Adds a node's current free amounts to the indexes, or removes them.
    fn update_index(&mut self, index: NodeIndex, add: bool) {
        let location = self.location(index);
        let node = &self.nodes[index as usize];
        let cpu = self.by_cpu_free.entry(location.clone()).or_default();
        let key = (node.cpu_milli_free, index);
        if add {
            cpu.insert(key);
        } else {
            cpu.remove(&key);
        }
        if node.spec.gpus.is_empty() {
            return;
        }
        for model in self.node_models(index) {
            let (whole, share) = self.model_free(index, &model);
            let Some(entry) = self
                .models
                .get_mut(&model)
                .and_then(|l| l.get_mut(&location))
            else {
                continue;
            };
            if add {
                entry.by_free_whole.insert((whole, index));
                entry.by_max_share.insert((share, index));
            } else {
                entry.by_free_whole.remove(&(whole, index));
                entry.by_max_share.remove(&(share, index));
            }
        }
    }

    /// (fully free GPUs, largest free milli) among a node's GPUs of one model.
    fn model_free(&self, index: NodeIndex, model: &GpuModelName) -> (u32, u32) {
        let node = &self.nodes[index as usize];
        let mut whole = 0;
        let mut share = 0;
        for (gpu, free) in node.spec.gpus.iter().zip(&node.gpu_milli_free) {
            if &gpu.model == model {
                whole += u32::from(*free == 1000);
                share = share.max(*free);
            }
        }
        (whole, share)
    }
}

impl Default for ClusterView {
    fn default() -> Self {
        ClusterView::new()
    }
}
