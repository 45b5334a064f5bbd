//! The state's big maps: persistent and tracked.
//!
//! - **Persistent** (imbl's B+ tree with shared nodes): cloning the whole [`State`] costs
//!   a few pointer copies for these maps, so a replica can hand readers an applied-state
//!   copy after every batch of entries and serve reads without the Raft thread (see
//!   `berth_scheduler::service::driver`). A write after such a copy copies only the path
//!   to what it changes.
//! - **Tracked**: every key written (`get_mut`, `insert`, `remove`) since the last
//!   [`Tracked::take_touched`] is remembered, so the service layer can feed each node's
//!   agent and each watch from what `apply` changed instead of rescanning the state.
//!
//! Serialised exactly as the map (the touched set is not state), and compared by the map.
//!
//! [`State`]: super::State

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::sync::Arc;

use imbl::OrdMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A persistent ordered map that remembers the keys written since the last take.
#[derive(Debug, Clone)]
pub struct Tracked<K: Ord + Clone, V: Clone> {
    /// Values behind `Arc`s: copying a tree node after a copy of the map was handed out
    /// copies pointers, not sandboxes (a node holds up to 64 entries).
    map: OrdMap<K, Arc<V>>,
    touched: BTreeSet<K>,
    /// Values removed since the last take (a watch must know whose sandbox went).
    gone: BTreeMap<K, Arc<V>>,
}

impl<K: Ord + Clone, V: Clone> Default for Tracked<K, V> {
    fn default() -> Self {
        Tracked {
            map: OrdMap::new(),
            touched: BTreeSet::new(),
            gone: BTreeMap::new(),
        }
    }
}

impl<K: Ord + Clone, V: Clone> Deref for Tracked<K, V> {
    type Target = OrdMap<K, Arc<V>>;

    fn deref(&self) -> &OrdMap<K, Arc<V>> {
        &self.map
    }
}

impl<K: Ord + Clone, V: Clone> Tracked<K, V> {
    /// The value under `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.map.get(key).map(|v| &**v)
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> + '_ {
        self.map.iter().map(|(k, v)| (k, &**v))
    }

    /// Values in key order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + '_ {
        self.map.values().map(|v| &**v)
    }

    /// Entries with keys in `range`, in key order.
    pub fn range<R>(&self, range: R) -> impl DoubleEndedIterator<Item = (&K, &V)> + '_
    where
        R: std::ops::RangeBounds<K>,
    {
        self.map.range(range).map(|(k, v)| (k, &**v))
    }

    /// The value under `key`, to change; the key counts as touched when it exists.
    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let (k, v) = self.map.get_key_value_mut(key)?;
        self.touched.insert(k.clone());
        Some(Arc::make_mut(v))
    }

    /// Inserts; the key counts as touched.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.touched.insert(key.clone());
        self.map
            .insert(key, Arc::new(value))
            .map(Arc::unwrap_or_clone)
    }

    /// Removes; the key counts as touched when it existed. The value comes back shared
    /// with the record of what was removed (no copy of it is made).
    pub fn remove<Q>(&mut self, key: &Q) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let (k, v) = self.map.remove_with_key(key)?;
        self.touched.insert(k.clone());
        self.gone.insert(k, v.clone());
        Some(v)
    }

    /// The keys written since the last take, and the values of those removed (a key
    /// removed and then inserted again is in both).
    pub fn take_touched(&mut self) -> (BTreeSet<K>, BTreeMap<K, Arc<V>>) {
        (
            std::mem::take(&mut self.touched),
            std::mem::take(&mut self.gone),
        )
    }
}

impl<'a, K: Ord + Clone, V: Clone> IntoIterator for &'a Tracked<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Box<dyn Iterator<Item = (&'a K, &'a V)> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl<K: Ord + Clone, V: Clone + PartialEq> PartialEq for Tracked<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl<K: Ord + Clone, V: Clone + Eq> Eq for Tracked<K, V> {}

impl<K: Ord + Clone + Serialize, V: Clone + Serialize> Serialize for Tracked<K, V> {
    fn serialize<S: Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_map(self.map.iter().map(|(k, v)| (k, &**v)))
    }
}

impl<'de, K, V> Deserialize<'de> for Tracked<K, V>
where
    K: Ord + Clone + Deserialize<'de>,
    V: Clone + Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let plain = BTreeMap::<K, V>::deserialize(de)?;
        Ok(Tracked {
            map: plain.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
            touched: BTreeSet::new(),
            gone: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_remembered_until_taken_and_reads_are_not() {
        let mut m: Tracked<u32, &str> = Tracked::default();
        m.insert(1, "a");
        m.insert(2, "b");
        assert_eq!(m.take_touched().0, BTreeSet::from([1, 2]));
        assert_eq!(m.get(&1), Some(&"a"));
        assert!(m.take_touched().0.is_empty(), "a read is not a write");
        *m.get_mut(&2).expect("in the test") = "c";
        assert!(m.get_mut(&7).is_none());
        assert_eq!(m.remove(&1).map(|v| *v), Some("a"));
        assert_eq!(m.remove(&9), None);
        let (touched, gone) = m.take_touched();
        assert_eq!(touched, BTreeSet::from([1, 2]));
        assert_eq!(gone, BTreeMap::from([(1, Arc::new("a"))]));
    }

    #[test]
    fn a_copy_does_not_see_later_writes_and_serialises_like_a_btreemap() {
        let mut m: Tracked<u32, String> = Tracked::default();
        m.insert(1, "a".into());
        let copy = m.clone();
        m.insert(1, "b".into());
        m.insert(2, "c".into());
        assert_eq!(copy.get(&1).map(String::as_str), Some("a"));
        assert_eq!(copy.len(), 1);
        let plain: std::collections::BTreeMap<u32, String> =
            m.iter().map(|(k, v)| (*k, v.clone())).collect();
        assert_eq!(
            postcard::to_stdvec(&m).expect("in the test"),
            postcard::to_stdvec(&plain).expect("in the test")
        );
        let back: Tracked<u32, String> =
            postcard::from_bytes(&postcard::to_stdvec(&m).expect("in the test"))
                .expect("in the test");
        assert_eq!(back, m);
        assert!(back.touched.is_empty());
    }
}
