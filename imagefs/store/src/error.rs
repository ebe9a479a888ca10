//! The store's error type: one variant per cause, each mapped to a kind the CLI turns into an
//! exit code (NotFound 3, Conflict 4, Corrupt 5, Busy 4, BadInput 2, Io 1).

use std::path::PathBuf;

use thiserror::Error;

use crate::ids::IdError;
use crate::log::LogError;

/// What class of failure an error is; the CLI maps it to an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Something named does not exist.
    NotFound,
    /// The request contradicts the store's state.
    Conflict,
    /// Data is corrupt or missing (integrity failure).
    Corrupt,
    /// Another writer holds the store.
    Busy,
    /// The request itself is malformed.
    BadInput,
    /// Any other I/O failure.
    Io,
}

/// Errors of the block store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The store's filesystem is down to its reserve
    #[error("no space: {free} bytes free, at or below the store's reserve of {reserve} (mount --reserve)")]
    NoSpace {
        /// Free bytes on the filesystem.
        free: u64,
        /// The reserve.
        reserve: u64,
    },
    /// I/O failed
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// the sled index failed
    #[error("index: {0} (run `imagefs fsck --repair` to rebuild it)")]
    Index(#[from] sled::Error),
    /// the index disagrees with the logs
    #[error("index is inconsistent: {0} (run `imagefs fsck --repair` to rebuild it)")]
    IndexInconsistent(String),
    /// a record log is damaged
    #[error(transparent)]
    Log(#[from] LogError),
    /// the directory is not a store
    #[error("{0} is not an imagefs store (no FORMAT file; run `imagefs init` first)")]
    NotAStore(PathBuf),
    /// the directory already holds something
    #[error("{0} already exists and is not empty")]
    AlreadyExists(PathBuf),
    /// unknown on-disk format
    #[error("{path} has store format {found:?}, this imagefs understands {expected:?}")]
    UnknownFormat {
        path: PathBuf,
        found: String,
        expected: &'static str,
    },
    /// another process holds the writer lock
    #[error("store is busy: another imagefs process holds {0}")]
    Busy(PathBuf),
    /// a bad name or id
    #[error(transparent)]
    BadId(#[from] IdError),
    /// malformed version spec
    #[error("{0:?} is not NAME:TAG, a version id or an id prefix of 8+ hex digits")]
    BadSpec(String),
    /// unknown image
    #[error("no image named {0}")]
    UnknownImage(String),
    /// unknown tag
    #[error("no tag {0}")]
    UnknownTag(String),
    /// unknown version
    #[error("no version {0}")]
    UnknownVersion(String),
    /// ambiguous prefix
    #[error("id prefix {0} matches more than one version")]
    AmbiguousPrefix(String),
    /// bad block size
    #[error("block size {0} is not a power of two from 4096 to 1048576")]
    BadBlockSize(u64),
    /// block size conflicts with the image's
    #[error("image {image} uses block size {existing}, not {requested}")]
    BlockSizeMismatch {
        image: String,
        existing: u32,
        requested: u32,
    },
    /// diff/bundle of versions with different block sizes
    #[error("versions {a} and {b} have different block sizes")]
    IncomparableVersions { a: String, b: String },
    /// a change names a block past the end
    #[error("block index {index} is past the end ({count} blocks)")]
    BlockOutOfRange { index: u64, count: u64 },
    /// a buffer of the wrong length
    #[error("buffer of {got} bytes for an object of {expected} bytes")]
    BadBuffer { expected: u64, got: u64 },
    /// an object is missing
    #[error("{what} {hash} is missing from the store")]
    MissingObject { what: &'static str, hash: String },
    /// an object's bytes do not match its hash
    #[error("{what} {hash} is corrupt (pack {pack}, offset {offset})")]
    CorruptObject {
        what: &'static str,
        hash: String,
        pack: u32,
        offset: u64,
    },
    /// a block-map node is malformed
    #[error("block-map node {0} is malformed")]
    BadNode(String),
    /// the file does not exist
    #[error("{0}: no such file")]
    NoSuchFile(PathBuf),
    /// an image file could not be imported
    #[error("{path}: {why}")]
    BadSource { path: PathBuf, why: String },
    /// a bundle is damaged or tampered with
    #[error("bundle {path}: {why}")]
    BadBundle { path: PathBuf, why: String },
    /// a bundle needs a base version this store lacks
    #[error("bundle {path} needs base version {base} ({spec}), which this store does not hold")]
    BundleBaseMissing {
        path: PathBuf,
        base: String,
        spec: String,
    },
    /// the tag is in use
    #[error("{0}")]
    Refused(String),
    /// a lazy version's block could not be fetched from its remote (unreachable past the
    /// remote's deadline, no client, no such object)
    #[error("fetching {key} from the remote: {why}")]
    RemoteFetch { key: String, why: String },
    /// bytes a remote sent do not match their hash (nothing from them was stored)
    #[error("integrity error: {key}: {why} (nothing from it was stored)")]
    RemoteIntegrity { key: String, why: String },
}

impl StoreError {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        use StoreError::*;
        match self {
            Io { .. } | NoSpace { .. } | RemoteFetch { .. } => ErrorKind::Io,
            RemoteIntegrity { .. } => ErrorKind::Corrupt,
            Index(_) | IndexInconsistent(_) | MissingObject { .. } | CorruptObject { .. } => {
                ErrorKind::Corrupt
            }
            BadNode(_) => ErrorKind::Corrupt,
            Log(e) => match e {
                LogError::Io { .. } => ErrorKind::Io,
                _ => ErrorKind::Corrupt,
            },
            NotAStore(_) | BadId(_) | BadSpec(_) | AmbiguousPrefix(_) | BadBlockSize(_) => {
                ErrorKind::BadInput
            }
            UnknownFormat { .. } => ErrorKind::BadInput,
            IncomparableVersions { .. } | BlockOutOfRange { .. } | BadBuffer { .. } => {
                ErrorKind::BadInput
            }
            BadSource { .. } => ErrorKind::BadInput,
            BadBundle { .. } => ErrorKind::Corrupt,
            AlreadyExists(_) | BlockSizeMismatch { .. } | Refused(_) => ErrorKind::Conflict,
            Busy(_) => ErrorKind::Busy,
            NoSuchFile(_)
            | UnknownImage(_)
            | UnknownTag(_)
            | UnknownVersion(_)
            | BundleBaseMissing { .. } => ErrorKind::NotFound,
        }
    }

    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| StoreError::Io { op, path, source }
    }
}
