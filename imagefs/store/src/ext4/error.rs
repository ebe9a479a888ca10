//! The ext4 reader's error type: one variant per cause. Every corrupt or unsupported filesystem
//! ends in one of these, never in a panic or an endless walk.

use thiserror::Error;

/// Why reading the filesystem inside an image failed.
#[derive(Debug, Error)]
pub enum Ext4Error {
    /// the image could not be read
    #[error("reading the image at offset {offset}")]
    Read {
        offset: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// the filesystem points past the end of the image
    #[error("the filesystem needs bytes {offset}..+{len}, but the image is {size} bytes")]
    OutOfImage { offset: u64, len: u64, size: u64 },
    /// a feature this reader cannot read safely
    #[error("unsupported ext4 feature: {0}")]
    Unsupported(&'static str),
    /// the superblock is inconsistent
    #[error("corrupt superblock: {0}")]
    BadSuperblock(&'static str),
    /// a group descriptor is inconsistent
    #[error("corrupt group descriptor {group}: {why}")]
    BadGroup { group: u64, why: &'static str },
    /// an inode is inconsistent
    #[error("corrupt inode {ino}: {why}")]
    BadInode { ino: u64, why: &'static str },
    /// an extent tree is inconsistent
    #[error("corrupt extent tree of inode {ino}: {why}")]
    BadExtents { ino: u32, why: &'static str },
    /// an old-style block map is inconsistent
    #[error("corrupt block map of inode {ino}: {why}")]
    BadBlockMap { ino: u32, why: &'static str },
    /// a directory block is inconsistent
    #[error("corrupt directory (inode {ino}): {why}")]
    BadDirectory { ino: u32, why: &'static str },
    /// a tree block was reached twice (a loop, or two owners)
    #[error("fs block {block} is reached twice from inode {ino}'s trees (a loop or a cross-link)")]
    Loop { ino: u32, block: u64 },
    /// the image holds no ext2/3/4 filesystem (bare or in an MBR/GPT partition)
    #[error("the image holds no ext2/3/4 filesystem")]
    NoFilesystem,
    /// the path names something other than a regular file (after following symlinks)
    #[error("{path} is a {kind}, not a regular file")]
    NotAFile { path: String, kind: &'static str },
    /// resolving the path followed too many symbolic links (a loop, as ELOOP)
    #[error("too many levels of symbolic links resolving {path}")]
    SymlinkLoop { path: String },
    /// the walk exceeded its time or size budget
    #[error("the filesystem walk exceeded its budget: {0}")]
    Budget(&'static str),
}
