//! The per-instance log: instance records (JSON) in the store's checksummed record log.
//! Invariant: replay applies exactly the records that reached disk whole, in order; a torn tail
//! is cut off, so a crash leaves the state as of the last complete record, never a partial one.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One overlay change: a block index and the hash (hex) of its new full contents, or `None`
/// for a hole (discarded or all-zero block).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockChange {
    /// Block index in the instance's disk.
    pub index: u64,
    /// Hex hash of the block's new contents; `None` makes the block a hole.
    pub hash: Option<String>,
}

/// A record in an instance log. Each is applied atomically on replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    /// The instance was created on `base` (a version id, hex).
    Created {
        /// Base version id.
        base: String,
        /// The tag the user named, for the event log (e.g. `web:v1`).
        source: String,
        /// Seconds since the epoch.
        at: u64,
    },
    /// Blocks written by the guest and made durable by a flush/fsync.
    Writes {
        /// The changed blocks.
        changes: Vec<BlockChange>,
    },
    /// The instance was rebased onto `to`; `dropped` overlay entries were replaced by the
    /// target's blocks (`--force`). This single record is the substitution's commit point.
    Rebased {
        /// Previous base version id.
        from: String,
        /// New base version id.
        to: String,
        /// What the user named as the target (e.g. `web:v2`).
        target: String,
        /// Overlay entries removed (the target's block wins there).
        dropped: Vec<u64>,
        /// Number of blocks whose visible content changed.
        changed_blocks: u64,
        /// Number of conflicts found.
        conflicts: u64,
        /// Conflict policy used: `refuse`, `force` or `keep-local`.
        policy: String,
        /// Seconds since the epoch.
        at: u64,
    },
    /// Overlay changes made durable by a flush (sub-block writes, whole-block discards);
    /// stored as a binary record of kind 2 (`overlay` module), never as JSON.
    #[serde(skip)]
    Overlay {
        /// The changes, in order.
        ops: Vec<crate::overlay::Op>,
    },
    /// The most bytes the instance's data file may hold on the host from now on.
    Limits {
        /// Bytes (live and replaced data not yet reclaimed).
        max_bytes: u64,
    },
    /// The instance's contents were committed as a new version.
    Committed {
        /// The new version id.
        version: String,
        /// The tag it was given (e.g. `web:v3`).
        tag: String,
        /// Seconds since the epoch.
        at: u64,
    },
}

/// Record kind of instance records in the shared record log (payload: one JSON `Record`).
const KIND_INSTANCE: u8 = 1;
/// Record kind of overlay records (payload: the `overlay` module's binary ops).
const KIND_OVERLAY: u8 = 2;

/// Errors of an instance log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The underlying record log failed
    #[error(transparent)]
    Log(#[from] crate::log::LogError),
    /// Creating the instance log file failed
    #[error("instance log {path}: {source}")]
    Io {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The instance log has no creation record
    #[error("instance log {0} has no creation record")]
    NoHeader(PathBuf),
    /// A record could not be encoded
    #[error("encoding an instance log record: {0}")]
    Encode(#[source] serde_json::Error),
    /// A whole, checksummed record does not decode: written by an incompatible version
    #[error("instance log {path}: undecodable record at offset {offset}")]
    Undecodable {
        /// The log file.
        path: PathBuf,
        /// Record offset.
        offset: u64,
    },
}

fn decode_all(path: &Path, raw: Vec<crate::log::Record>) -> Result<Vec<Record>, LogError> {
    let undecodable = |offset| LogError::Undecodable {
        path: path.to_path_buf(),
        offset,
    };
    raw.into_iter()
        .filter(|r| r.kind == KIND_INSTANCE || r.kind == KIND_OVERLAY)
        .map(|r| {
            if r.kind == KIND_OVERLAY {
                let ops = crate::overlay::decode(&r.payload).map_err(|_| undecodable(r.offset))?;
                return Ok(Record::Overlay { ops });
            }
            serde_json::from_slice(&r.payload).map_err(|_| undecodable(r.offset))
        })
        .collect()
}

/// A record's kind and payload as the record log stores it.
fn encode(r: &Record) -> Result<(u8, Vec<u8>), LogError> {
    match r {
        Record::Overlay { ops } => Ok((KIND_OVERLAY, crate::overlay::encode(ops))),
        other => Ok((
            KIND_INSTANCE,
            serde_json::to_vec(other).map_err(LogError::Encode)?,
        )),
    }
}

/// An open instance log (the store's checksummed record log holding JSON records).
#[derive(Debug)]
pub struct RecordLog {
    log: crate::log::RecordLog,
}

impl RecordLog {
    /// Creates a new log at `path` holding `first`, atomically: the file appears complete or
    /// not at all. Fails with `AlreadyExists` (inside `LogError::Io`) if `path` exists.
    pub fn create(path: &Path, first: &Record) -> Result<RecordLog, LogError> {
        let tmp = path.with_extension("log.tmp");
        let _ = std::fs::remove_file(&tmp);
        {
            let (mut log, _) = crate::log::RecordLog::open(&tmp)?;
            let payload = serde_json::to_vec(first).map_err(LogError::Encode)?;
            log.append(KIND_INSTANCE, &payload)?;
            log.sync()?;
        }
        // hard_link refuses an existing target, unlike rename.
        let linked = std::fs::hard_link(&tmp, path).map_err(|source| LogError::Io {
            path: path.to_path_buf(),
            source,
        });
        let _ = std::fs::remove_file(&tmp);
        linked?;
        sync_dir(path)?;
        Ok(RecordLog::open(path)?.0)
    }

    /// Replaces the log at `path` with `records`, atomically: a crash leaves the old log or the
    /// new one (written aside, fsynced, renamed over, directory fsynced).
    pub fn rewrite(path: &Path, records: &[Record]) -> Result<RecordLog, LogError> {
        let tmp = path.with_extension("log.compact");
        let _ = std::fs::remove_file(&tmp);
        {
            let (mut log, _) = crate::log::RecordLog::open(&tmp)?;
            for r in records {
                let (kind, payload) = encode(r)?;
                log.append(kind, &payload)?;
            }
            log.sync()?;
        }
        std::fs::rename(&tmp, path).map_err(|source| LogError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        sync_dir(path)?;
        Ok(RecordLog::open(path)?.0)
    }

    /// Opens an existing log, replays it (a torn tail is cut off by the record log).
    pub fn open(path: &Path) -> Result<(RecordLog, Vec<Record>), LogError> {
        if !path.exists() {
            return Err(LogError::Io {
                path: path.to_path_buf(),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        let (log, raw) = crate::log::RecordLog::open(path)?;
        let records = decode_all(path, raw)?;
        if !matches!(records.first(), Some(Record::Created { .. })) {
            return Err(LogError::NoHeader(path.to_path_buf()));
        }
        Ok((RecordLog { log }, records))
    }

    /// Reads the records of a log without opening it for writing (for `imagefs log`).
    pub fn read(path: &Path) -> Result<Vec<Record>, LogError> {
        decode_all(path, crate::log::RecordLog::read(path)?)
    }

    /// Appends records and makes them durable before returning.
    pub fn append_durable(&mut self, records: &[Record]) -> Result<(), LogError> {
        for r in records {
            let (kind, payload) = encode(r)?;
            self.log.append(kind, &payload)?;
        }
        crate::fault::point("instance_log.appended");
        Ok(self.log.sync()?)
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        self.log.path()
    }
}

/// Makes a directory entry change (create, link, unlink) in `path`'s parent durable.
pub fn sync_dir(path: &Path) -> Result<(), LogError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| LogError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created() -> Record {
        Record::Created {
            base: "ab".into(),
            source: "web:v1".into(),
            at: 1,
        }
    }

    fn writes(i: u64) -> Record {
        Record::Writes {
            changes: vec![BlockChange {
                index: i,
                hash: Some("cd".into()),
            }],
        }
    }

    #[test]
    fn replay_returns_appended_records_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.log");
        let mut log = RecordLog::create(&p, &created()).unwrap();
        log.append_durable(&[writes(1), writes(2)]).unwrap();
        drop(log);
        let (_, recs) = RecordLog::open(&p).unwrap();
        assert_eq!(recs, vec![created(), writes(1), writes(2)]);
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.log");
        let mut log = RecordLog::create(&p, &created()).unwrap();
        log.append_durable(&[writes(1), writes(2)]).unwrap();
        drop(log);
        // A crash mid-append: the last record is cut short.
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let (mut log, recs) = RecordLog::open(&p).unwrap();
        assert_eq!(recs, vec![created(), writes(1)]);
        log.append_durable(&[writes(3)]).unwrap();
        drop(log);
        let (_, recs) = RecordLog::open(&p).unwrap();
        assert_eq!(recs, vec![created(), writes(1), writes(3)]);
    }

    #[test]
    fn create_refuses_an_existing_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.log");
        RecordLog::create(&p, &created()).unwrap();
        assert!(RecordLog::create(&p, &created()).is_err());
    }
}
