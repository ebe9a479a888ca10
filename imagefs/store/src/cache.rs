//! A small cache of verified blocks for reads smaller than a block (a 4 KiB read of a 64 KiB
//! block would otherwise re-read and re-hash the whole block each time). Sharded, so readers
//! rarely contend. Invariant: only bytes that matched their hash are ever inserted; fsck and
//! export bypass it and always verify from disk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const SHARDS: usize = 16;
/// Bytes of blocks kept, over all shards.
const CAPACITY: usize = 32 << 20;

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<[u8; 32], (Arc<Vec<u8>>, u64)>,
    bytes: usize,
    tick: u64,
}

#[derive(Debug)]
pub(crate) struct BlockCache {
    shards: Vec<Mutex<Shard>>,
}

impl BlockCache {
    pub(crate) fn new() -> BlockCache {
        BlockCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    fn shard(&self, hash: &[u8; 32]) -> std::sync::MutexGuard<'_, Shard> {
        let i = hash[0] as usize % SHARDS;
        // a poisoned shard holds only verified blocks: keep using it
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn get(&self, hash: &[u8; 32]) -> Option<Arc<Vec<u8>>> {
        let mut s = self.shard(hash);
        s.tick += 1;
        let tick = s.tick;
        let e = s.map.get_mut(hash)?;
        e.1 = tick;
        Some(e.0.clone())
    }

    /// Inserts a verified block, evicting the least recently used ones past the shard's share.
    pub(crate) fn insert(&self, hash: [u8; 32], data: Arc<Vec<u8>>) {
        let mut s = self.shard(&hash);
        s.tick += 1;
        let tick = s.tick;
        let len = data.len();
        if let Some(old) = s.map.insert(hash, (data, tick)) {
            s.bytes -= old.0.len();
        }
        s.bytes += len;
        while s.bytes > CAPACITY / SHARDS && s.map.len() > 1 {
            let Some(oldest) = s.map.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k) else {
                break;
            };
            if let Some(v) = s.map.remove(&oldest) {
                s.bytes -= v.0.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_past_capacity() {
        let c = BlockCache::new();
        let per_shard = CAPACITY / SHARDS / 65536;
        // all in shard 0
        let key = |i: usize| {
            let mut k = [0u8; 32];
            k[0] = 0;
            k[1..9].copy_from_slice(&(i as u64).to_le_bytes());
            k
        };
        for i in 0..per_shard {
            c.insert(key(i), Arc::new(vec![i as u8; 65536]));
        }
        assert!(c.get(&key(0)).is_some()); // now recently used
        c.insert(key(per_shard), Arc::new(vec![0; 65536]));
        assert!(c.get(&key(0)).is_some());
        assert!(c.get(&key(1)).is_none());
        assert_eq!(c.get(&key(per_shard)).unwrap().len(), 65536);
    }
}
