//! Records of the refs log (images, versions, tags, pins) and how each one updates the index.
//! Invariant: applying the log's records in order to an empty index gives the index's refs.

use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::ids::{ImageName, VersionId};

/// An index write: (key, Some(value)) sets, (key, None) removes.
pub(crate) type IndexOp = (Vec<u8>, Option<Vec<u8>>);

/// Kind byte of refs records in the log (payload is JSON).
pub(crate) const REF_KIND: u8 = 1;

/// One change to the store's names, as written to refs.log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum RefRecord {
    Image {
        name: String,
        block_size: u32,
    },
    Version {
        id: String,
        #[serde(flatten)]
        meta: VersionMeta,
    },
    Tag {
        image: String,
        tag: String,
        id: String,
    },
    Untag {
        image: String,
        tag: String,
    },
    Drop {
        id: String,
    },
    Pin {
        owner: String,
        key: String,
        id: String,
    },
    Unpin {
        owner: String,
        key: String,
    },
}

/// What the index stores about a version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct VersionMeta {
    pub image: String,
    pub size: u64,
    pub block_size: u32,
    pub root: String,
    pub created: u64,
}

/// What the index stores about an image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ImageMeta {
    pub block_size: u32,
}

/// The id of a version: a hash over everything that defines its bytes.
pub(crate) fn version_id(
    image: &ImageName,
    size: u64,
    block_size: u32,
    root: &[u8; 32],
) -> VersionId {
    let mut h = blake3::Hasher::new_derive_key("imagefs 2026 version v1");
    h.update(&(image.as_str().len() as u64).to_le_bytes());
    h.update(image.as_str().as_bytes());
    h.update(&size.to_le_bytes());
    h.update(&block_size.to_le_bytes());
    h.update(root);
    VersionId(*h.finalize().as_bytes())
}

pub(crate) fn image_key(name: &str) -> Vec<u8> {
    let mut k = b"i".to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

pub(crate) fn tag_key(image: &str, tag: &str) -> Vec<u8> {
    let mut k = b"t".to_vec();
    k.extend_from_slice(image.as_bytes());
    k.push(0);
    k.extend_from_slice(tag.as_bytes());
    k
}

pub(crate) fn version_key(id: &VersionId) -> Vec<u8> {
    let mut k = b"v".to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

pub(crate) fn pin_key(owner: &str, key: &str) -> Vec<u8> {
    let mut k = b"p".to_vec();
    k.extend_from_slice(owner.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn bad(why: String) -> StoreError {
    StoreError::IndexInconsistent(format!("refs log: {why}"))
}

fn parse_id(s: &str) -> Result<VersionId, StoreError> {
    s.parse::<VersionId>().map_err(|e| bad(e.to_string()))
}

impl RefRecord {
    pub(crate) fn decode(payload: &[u8]) -> Result<RefRecord, StoreError> {
        serde_json::from_slice(payload).map_err(|e| bad(e.to_string()))
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The index writes this record makes: (key, Some(value)) to set, (key, None) to remove.
    pub(crate) fn ops(&self) -> Result<Vec<IndexOp>, StoreError> {
        let json = |v: &dyn erased::Json| v.to_json();
        Ok(vec![match self {
            RefRecord::Image { name, block_size } => {
                let meta = ImageMeta {
                    block_size: *block_size,
                };
                (image_key(name), Some(json(&meta)))
            }
            RefRecord::Version { id, meta } => {
                let id = parse_id(id)?;
                let image = ImageName::new(&meta.image).map_err(|e| bad(e.to_string()))?;
                let root: [u8; 32] = parse_id(&meta.root)?.0;
                if version_id(&image, meta.size, meta.block_size, &root) != id {
                    return Err(bad(format!("version {id} does not match its contents")));
                }
                (version_key(&id), Some(json(meta)))
            }
            RefRecord::Tag { image, tag, id } => {
                (tag_key(image, tag), Some(parse_id(id)?.0.to_vec()))
            }
            RefRecord::Untag { image, tag } => (tag_key(image, tag), None),
            RefRecord::Drop { id } => (version_key(&parse_id(id)?), None),
            RefRecord::Pin { owner, key, id } => {
                (pin_key(owner, key), Some(parse_id(id)?.0.to_vec()))
            }
            RefRecord::Unpin { owner, key } => (pin_key(owner, key), None),
        }])
    }

    /// Adds this record's effect on the index to `batch`.
    pub(crate) fn apply(&self, batch: &mut sled::Batch) -> Result<(), StoreError> {
        for (k, v) in self.ops()? {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        Ok(())
    }
}

mod erased {
    /// Serializes index values; plain strings and numbers cannot fail.
    pub(crate) trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).unwrap_or_default()
        }
    }
}
