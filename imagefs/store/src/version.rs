//! Versions: immutable views of a block map, readable from many threads at once, and the ways
//! new versions are made from old ones (O(changed blocks) when the block count is unchanged).
//! Invariant: a `Version` never changes; leaves are loaded once, verified, and cached.

use std::sync::{Arc, OnceLock};

use crate::error::StoreError;
use crate::ids::{BlockHash, ImageName, VersionId};
use crate::refs::VersionMeta;
use crate::store::{Inner, Store};
use crate::tree::{self, Node, FANOUT, ZERO};

/// One version of an image. Cheap to clone; holds an `Arc` to the store's internals, so it
/// stays readable while any clone lives (block reads go through that store, the `store`
/// argument of [`Version::read_at`] is accepted for symmetry and must be the same store).
#[derive(Clone, Debug)]
pub struct Version(Arc<VersionInner>);

#[derive(Debug)]
struct VersionInner {
    store: Arc<Inner>,
    id: VersionId,
    image: ImageName,
    size: u64,
    block_size: u32,
    created: u64,
    root: [u8; 32],
    block_count: u64,
    /// Loaded leaves; `None` inside means an all-hole leaf.
    leaves: Vec<OnceLock<Option<Arc<Node>>>>,
}

impl Version {
    pub(crate) fn new(
        store: Arc<Inner>,
        id: VersionId,
        meta: VersionMeta,
    ) -> Result<Version, StoreError> {
        let image = ImageName::new(&meta.image)?;
        let root = meta
            .root
            .parse::<VersionId>()
            .map_err(|e| StoreError::IndexInconsistent(e.to_string()))?
            .0;
        let block_count = meta.size.div_ceil(u64::from(meta.block_size));
        let leaf_count = block_count.div_ceil(FANOUT) as usize;
        let mut leaves = Vec::with_capacity(leaf_count);
        leaves.resize_with(leaf_count, OnceLock::new);
        Ok(Version(Arc::new(VersionInner {
            store,
            id,
            image,
            size: meta.size,
            block_size: meta.block_size,
            created: meta.created,
            root,
            block_count,
            leaves,
        })))
    }

    /// The version's id.
    pub fn id(&self) -> VersionId {
        self.0.id
    }
    /// The image it belongs to.
    pub fn image(&self) -> &ImageName {
        &self.0.image
    }
    /// Size in bytes (exact; the last block may be partial).
    pub fn size(&self) -> u64 {
        self.0.size
    }
    /// The image's block size.
    pub fn block_size(&self) -> u32 {
        self.0.block_size
    }
    /// Number of blocks (the last may be partial).
    pub fn block_count(&self) -> u64 {
        self.0.block_count
    }
    /// Unix seconds of the first commit.
    pub fn created(&self) -> u64 {
        self.0.created
    }
    pub(crate) fn root(&self) -> &[u8; 32] {
        &self.0.root
    }

    fn leaf(&self, leaf: u64) -> Result<Option<Arc<Node>>, StoreError> {
        let v = &self.0;
        let slot = v
            .leaves
            .get(leaf as usize)
            .ok_or(StoreError::BlockOutOfRange {
                index: leaf * FANOUT,
                count: v.block_count,
            })?;
        if let Some(l) = slot.get() {
            return Ok(l.clone());
        }
        let n = v.block_count;
        let height = tree::height(n);
        let mut hash = v.root;
        let mut idx = 0u64;
        for level in (1..=height).rev() {
            if hash == ZERO {
                break;
            }
            let node = v
                .store
                .load_node(&hash, level, tree::entry_count(n, level, idx))?;
            let child = (leaf / tree::child_span(level - 1)) % FANOUT;
            hash = node.entries.get(child as usize).copied().unwrap_or(ZERO);
            idx = idx * FANOUT + child;
        }
        let loaded = if hash == ZERO {
            None
        } else {
            Some(v.store.load_node(&hash, 0, tree::entry_count(n, 0, leaf))?)
        };
        let _ = slot.set(loaded.clone());
        Ok(loaded)
    }

    /// The hash of block `index`, `None` for a hole.
    pub fn block_hash(&self, index: u64) -> Result<Option<BlockHash>, StoreError> {
        if index >= self.0.block_count {
            return Err(StoreError::BlockOutOfRange {
                index,
                count: self.0.block_count,
            });
        }
        let Some(leaf) = self.leaf(index / FANOUT)? else {
            return Ok(None);
        };
        match leaf.entries.get((index % FANOUT) as usize) {
            Some(e) if *e != ZERO => Ok(Some(BlockHash(*e))),
            _ => Ok(None),
        }
    }

    /// Reads up to `buf.len()` bytes at `offset`; short only at the end of the version.
    /// Every block is verified against its hash (`Corrupt` otherwise).
    pub fn read_at(
        &self,
        _store: &Store,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, StoreError> {
        let v = &self.0;
        if v.store.lazy.active() {
            v.store.lazy_prepare(self, offset, buf.len() as u64)?;
        }
        let bs = u64::from(v.block_size);
        let end = v.size.min(offset.saturating_add(buf.len() as u64));
        let mut pos = offset;
        while pos < end {
            let index = pos / bs;
            let within = (pos % bs) as usize;
            let take = (bs - within as u64).min(end - pos) as usize;
            let at = (pos - offset) as usize;
            let out = buf.get_mut(at..at + take).ok_or(StoreError::BadBuffer {
                expected: end - offset,
                got: 0,
            })?;
            match self.block_hash(index)? {
                None => out.fill(0),
                Some(h) if within == 0 && take == bs as usize => {
                    v.store.read_block_fetching(&h.0, out)?
                }
                Some(h) => v.store.read_block_part(&h.0, bs as usize, within, out)?,
            }
            pos += take as u64;
        }
        Ok((end.saturating_sub(offset)) as usize)
    }
}

impl Store {
    /// Commits a new version of `image` of `size` bytes: `base` (same image, or `None` for an
    /// empty map) with `changes` (block index, new hash or `None` for a hole) applied. Costs
    /// O(changes) when `size` keeps the base's block count, O(blocks) otherwise. Durable on return.
    pub fn create_version(
        &self,
        image: &ImageName,
        base: Option<&VersionId>,
        size: u64,
        changes: &[(u64, Option<BlockHash>)],
    ) -> Result<VersionId, StoreError> {
        let (bs, root) = self.plan_version(image, base, size, changes, false)?;
        self.inner.commit_version(image, size, bs, &root)
    }

    /// The id `create_version` would give, without writing anything.
    pub fn preview_version(
        &self,
        image: &ImageName,
        base: Option<&VersionId>,
        size: u64,
        changes: &[(u64, Option<BlockHash>)],
    ) -> Result<VersionId, StoreError> {
        let (bs, root) = self.plan_version(image, base, size, changes, true)?;
        Ok(crate::refs::version_id(image, size, bs, &root))
    }

    fn plan_version(
        &self,
        image: &ImageName,
        base: Option<&VersionId>,
        size: u64,
        changes: &[(u64, Option<BlockHash>)],
        dry: bool,
    ) -> Result<(u32, [u8; 32]), StoreError> {
        let bs = self
            .image_block_size(image)?
            .ok_or_else(|| StoreError::UnknownImage(image.to_string()))?;
        let n = size.div_ceil(u64::from(bs));
        let mut sorted: Vec<(u64, [u8; 32])> = changes
            .iter()
            .map(|&(i, h)| (i, h.map_or(ZERO, |h| h.0)))
            .collect();
        sorted.sort_by_key(|c| c.0);
        // last change of an index wins
        sorted.reverse();
        sorted.dedup_by_key(|c| c.0);
        sorted.reverse();
        if let Some(&(index, _)) = sorted.iter().find(|c| c.0 >= n) {
            return Err(StoreError::BlockOutOfRange { index, count: n });
        }
        let base = base.map(|id| self.version(id)).transpose()?;
        if let Some(b) = &base {
            if b.image() != image {
                return Err(StoreError::Refused(format!(
                    "base version {} belongs to image {}, not {image}",
                    b.id().short(),
                    b.image()
                )));
            }
        }
        let root = match &base {
            Some(b) if b.block_count() == n => {
                tree::update(&self.inner, n, b.root(), &sorted, dry)?
            }
            _ => {
                let mut builder = tree::Builder::new(&self.inner, n, dry);
                let mut next = sorted.iter().peekable();
                for i in 0..n {
                    let mut entry = match &base {
                        Some(b) if i < b.block_count() => b.block_hash(i)?.map(|h| h.0),
                        _ => None,
                    };
                    if let Some(&&(ci, h)) = next.peek() {
                        if ci == i {
                            entry = (h != ZERO).then_some(h);
                            next.next();
                        }
                    }
                    builder.push(entry)?;
                }
                builder.finish()?
            }
        };
        Ok((bs, root))
    }

    /// Indexes of the blocks that differ between two versions of equal block size, ascending.
    /// O(changed blocks) when both have the same block count.
    pub fn diff(&self, a: &VersionId, b: &VersionId) -> Result<Vec<u64>, StoreError> {
        let va = self.version(a)?;
        let vb = self.version(b)?;
        if va.block_size() != vb.block_size() {
            return Err(StoreError::IncomparableVersions {
                a: a.short(),
                b: b.short(),
            });
        }
        let mut out = Vec::new();
        if va.block_count() == vb.block_count() {
            tree::diff(
                &self.inner,
                va.block_count(),
                va.root(),
                vb.root(),
                &mut out,
            )?;
        } else {
            let n = va.block_count().max(vb.block_count());
            let get = |v: &Version, i: u64| {
                if i < v.block_count() {
                    v.block_hash(i)
                } else {
                    Ok(None)
                }
            };
            for i in 0..n {
                let differs = get(&va, i)? != get(&vb, i)?;
                // a block past one end counts as changed even when it is a hole
                if differs || i >= va.block_count().min(vb.block_count()) {
                    out.push(i);
                }
            }
        }
        Ok(out)
    }
}
