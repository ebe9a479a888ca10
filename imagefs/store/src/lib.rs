//! imagefs-store: a content-addressed, deduplicated, versioned store of VM disk images.
//! Block data and block-map nodes live in append-only pack files, names in a checksummed refs
//! log; sled is only an index that `Store::open_rebuilding_index` can rebuild from those files.
//! No FUSE, no CLI, no VMs here.

mod bundle;
mod error;
pub mod ext4;
mod ids;
mod import;
pub mod instance;
pub mod instance_log;
mod instance_sub;
pub mod log;
mod maint;
mod objects;
mod pack;
mod qcow2;
mod refs;
mod source;
mod store;
#[cfg(test)]
mod tests;
mod tree;
mod version;

pub use bundle::BundleReport;
pub use error::{ErrorKind, StoreError};
pub use ids::{parse_name_tag, BlockHash, IdError, ImageName, Tag, VersionId};
pub use store::{
    check_block_size, is_zero, ImageInfo, Store, VersionInfo, DEFAULT_BLOCK_SIZE, FORMAT,
};
pub use maint::{FsckReport, GcReport, GcRoots, Problem};
pub use import::{ImportProgress, ImportReport};
pub use source::{open_image, ImageSource};
pub use version::Version;
