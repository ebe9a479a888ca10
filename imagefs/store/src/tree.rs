//! The block map as a Merkle tree of canonical shape: fanout 32, leaves hold block hashes
//! (zero = hole), and an all-hole subtree is the zero hash and is never stored. The shape
//! depends only on the block count, so equal maps have equal roots and a changed block
//! rewrites only the nodes on its path.

use std::sync::Arc;

use crate::error::StoreError;
use crate::pack::{object_hash, ObjKind};
use crate::store::Inner;

/// Small nodes (1 KiB) keep the map overhead of a sparse patch low: a version changing 1%
/// of an image's blocks rewrites about 1 KiB of map per changed block at most.
pub(crate) const FANOUT: u64 = 32;
pub(crate) const ZERO: [u8; 32] = [0; 32];
/// Interior nodes cached per store beyond this many are dropped wholesale (cheap to reload).
const NODE_CACHE_MAX: usize = 1 << 16;

/// A decoded block-map node.
#[derive(Debug)]
pub(crate) struct Node {
    pub entries: Vec<[u8; 32]>,
}

/// Levels above the leaves for `n` blocks.
pub(crate) fn height(n: u64) -> u32 {
    let mut h = 0;
    let mut cap = FANOUT;
    while cap < n {
        cap = cap.saturating_mul(FANOUT);
        h += 1;
    }
    h
}

/// Blocks under one child of a node at `level`.
pub(crate) fn child_span(level: u32) -> u64 {
    FANOUT.saturating_pow(level)
}

/// Entries of node `idx` at `level` in a map of `n` blocks.
pub(crate) fn entry_count(n: u64, level: u32, idx: u64) -> usize {
    let span = child_span(level + 1);
    let start = idx.saturating_mul(span);
    let covered = span.min(n.saturating_sub(start));
    covered.div_ceil(child_span(level)) as usize
}

impl Inner {
    /// Loads and checks a node (`hash` non-zero) expected at `level` with `count` entries.
    pub(crate) fn load_node(
        &self,
        hash: &[u8; 32],
        level: u32,
        count: usize,
    ) -> Result<Arc<Node>, StoreError> {
        if level > 0 {
            let cache = self.node_cache.read().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = cache.get(hash) {
                return Ok(n.clone());
            }
        }
        let len =
            self.object_len(ObjKind::Node, hash)?
                .ok_or_else(|| StoreError::MissingObject {
                    what: ObjKind::Node.name(),
                    hash: crate::ids::to_hex(hash),
                })?;
        let mut buf = vec![0u8; len as usize];
        self.read_object(ObjKind::Node, hash, &mut buf)?;
        let bad = || StoreError::BadNode(crate::ids::to_hex(hash));
        let (&lvl, rest) = buf.split_first().ok_or_else(bad)?;
        if u32::from(lvl) != level || rest.len() != count * 32 {
            return Err(bad());
        }
        let entries = rest
            .chunks_exact(32)
            .map(|c| {
                let mut e = [0u8; 32];
                e.copy_from_slice(c);
                e
            })
            .collect();
        let node = Arc::new(Node { entries });
        if level > 0 {
            let mut cache = self.node_cache.write().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= NODE_CACHE_MAX {
                cache.clear();
            }
            cache.insert(*hash, node.clone());
        }
        Ok(node)
    }

    /// Entries of the node `hash` (all zero when the hash is zero).
    fn node_entries(
        &self,
        hash: &[u8; 32],
        n: u64,
        level: u32,
        idx: u64,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        let count = entry_count(n, level, idx);
        if *hash == ZERO {
            return Ok(vec![ZERO; count]);
        }
        Ok(self.load_node(hash, level, count)?.entries.clone())
    }

    /// Stores a node unless `dry`; returns its hash (zero for an all-hole node).
    pub(crate) fn emit_node(
        &self,
        level: u32,
        entries: &[[u8; 32]],
        dry: bool,
    ) -> Result<[u8; 32], StoreError> {
        if entries.iter().all(|e| *e == ZERO) {
            return Ok(ZERO);
        }
        let mut data = Vec::with_capacity(1 + entries.len() * 32);
        data.push(level as u8);
        for e in entries {
            data.extend_from_slice(e);
        }
        let hash = object_hash(ObjKind::Node, &data);
        if !dry {
            self.put_object(ObjKind::Node, &hash, &data)?;
        }
        Ok(hash)
    }
}

/// Builds a block map from its entries in order, holding one partial node per level.
pub(crate) struct Builder<'a> {
    inner: &'a Inner,
    height: u32,
    levels: Vec<Vec<[u8; 32]>>,
    dry: bool,
}

impl<'a> Builder<'a> {
    pub(crate) fn new(inner: &'a Inner, n: u64, dry: bool) -> Builder<'a> {
        let height = height(n);
        Builder {
            inner,
            height,
            levels: vec![Vec::new(); height as usize + 1],
            dry,
        }
    }

    /// Appends the next block's hash (`None`: hole).
    pub(crate) fn push(&mut self, entry: Option<[u8; 32]>) -> Result<(), StoreError> {
        self.push_at(0, entry.unwrap_or(ZERO))
    }

    fn push_at(&mut self, level: u32, entry: [u8; 32]) -> Result<(), StoreError> {
        let Some(buf) = self.levels.get_mut(level as usize) else {
            return Err(StoreError::BadNode("block map overflow".to_string()));
        };
        buf.push(entry);
        if buf.len() as u64 == FANOUT && level < self.height {
            self.carry(level)?;
        }
        Ok(())
    }

    fn carry(&mut self, level: u32) -> Result<(), StoreError> {
        let entries = std::mem::take(&mut self.levels[level as usize]);
        let hash = self.inner.emit_node(level, &entries, self.dry)?;
        self.push_at(level + 1, hash)
    }

    /// Emits the partial nodes and returns the root.
    pub(crate) fn finish(mut self) -> Result<[u8; 32], StoreError> {
        for level in 0..self.height {
            if !self.levels[level as usize].is_empty() {
                self.carry(level)?;
            }
        }
        let root = std::mem::take(&mut self.levels[self.height as usize]);
        self.inner.emit_node(self.height, &root, self.dry)
    }
}

/// The root after applying `changes` (sorted by index, unique, each < n) to the map `root`
/// of `n` blocks. Touches only the nodes on the changed paths.
pub(crate) fn update(
    inner: &Inner,
    n: u64,
    root: &[u8; 32],
    changes: &[(u64, [u8; 32])],
    dry: bool,
) -> Result<[u8; 32], StoreError> {
    update_node(inner, n, height(n), 0, root, changes, dry)
}

fn update_node(
    inner: &Inner,
    n: u64,
    level: u32,
    idx: u64,
    hash: &[u8; 32],
    changes: &[(u64, [u8; 32])],
    dry: bool,
) -> Result<[u8; 32], StoreError> {
    if changes.is_empty() {
        return Ok(*hash);
    }
    let mut entries = inner.node_entries(hash, n, level, idx)?;
    let base = idx * child_span(level + 1);
    let cs = child_span(level);
    let mut rest = changes;
    while let Some(&(first, _)) = rest.first() {
        let child = (first - base) / cs;
        let split = rest.partition_point(|&(b, _)| (b - base) / cs == child);
        let (group, tail) = rest.split_at(split);
        rest = tail;
        let slot = entries
            .get_mut(child as usize)
            .ok_or_else(|| StoreError::BadNode("change outside node".to_string()))?;
        *slot = if level == 0 {
            group.last().map_or(ZERO, |&(_, h)| h)
        } else {
            update_node(inner, n, level - 1, idx * FANOUT + child, slot, group, dry)?
        };
    }
    inner.emit_node(level, &entries, dry)
}

/// Appends to `out` the indexes of blocks that differ between maps `a` and `b` of `n` blocks.
pub(crate) fn diff(
    inner: &Inner,
    n: u64,
    a: &[u8; 32],
    b: &[u8; 32],
    out: &mut Vec<u64>,
) -> Result<(), StoreError> {
    diff_node(inner, n, height(n), 0, a, b, out)
}

fn diff_node(
    inner: &Inner,
    n: u64,
    level: u32,
    idx: u64,
    a: &[u8; 32],
    b: &[u8; 32],
    out: &mut Vec<u64>,
) -> Result<(), StoreError> {
    if a == b {
        return Ok(());
    }
    let ea = inner.node_entries(a, n, level, idx)?;
    let eb = inner.node_entries(b, n, level, idx)?;
    for (i, (x, y)) in ea.iter().zip(eb.iter()).enumerate() {
        if x == y {
            continue;
        }
        let child = idx * FANOUT + i as u64;
        if level == 0 {
            out.push(child);
        } else {
            diff_node(inner, n, level - 1, child, x, y, out)?;
        }
    }
    Ok(())
}

/// Callback for a node that cannot be read: gets the first block index under it and the
/// error; returning `Ok` skips the subtree, returning the error stops the walk.
pub(crate) type OnBadNode<'a> = &'a mut dyn FnMut(u64, StoreError) -> Result<(), StoreError>;

/// Visits every stored node (`on_node`) and every non-hole block (`on_block(index, hash)`).
pub(crate) fn walk(
    inner: &Inner,
    n: u64,
    root: &[u8; 32],
    on_node: &mut dyn FnMut(&[u8; 32]),
    on_block: &mut dyn FnMut(u64, &[u8; 32]),
    on_bad: OnBadNode<'_>,
) -> Result<(), StoreError> {
    walk_node(inner, n, height(n), 0, root, on_node, on_block, on_bad)
}

#[allow(clippy::too_many_arguments)]
fn walk_node(
    inner: &Inner,
    n: u64,
    level: u32,
    idx: u64,
    hash: &[u8; 32],
    on_node: &mut dyn FnMut(&[u8; 32]),
    on_block: &mut dyn FnMut(u64, &[u8; 32]),
    on_bad: OnBadNode<'_>,
) -> Result<(), StoreError> {
    if *hash == ZERO {
        return Ok(());
    }
    on_node(hash);
    let node = match inner.load_node(hash, level, entry_count(n, level, idx)) {
        Ok(node) => node,
        Err(e) => return on_bad(idx * child_span(level + 1), e),
    };
    for (i, e) in node.entries.iter().enumerate() {
        let child = idx * FANOUT + i as u64;
        if *e == ZERO {
            continue;
        }
        if level == 0 {
            on_block(child, e);
        } else {
            walk_node(inner, n, level - 1, child, e, on_node, on_block, on_bad)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_is_canonical() {
        assert_eq!(height(0), 0);
        assert_eq!(height(32), 0);
        assert_eq!(height(33), 1);
        assert_eq!(height(1024), 1);
        assert_eq!(height(1025), 2);
        assert_eq!(entry_count(40, 0, 1), 8);
        assert_eq!(entry_count(40, 1, 0), 2);
        assert_eq!(entry_count(1024, 1, 0), 32);
    }
}
