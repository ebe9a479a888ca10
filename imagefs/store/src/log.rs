//! Checksummed append-only record logs: the durable truth for everything the sled index cannot
//! recompute (tags, versions, pins; instance and event logs of other parts reuse this type).
//! Invariant: a record is either whole and verified or, only at the tail, ignored and truncated.
//!
//! Record layout: `magic "IFLG" | kind u8 | len u32 LE | payload | blake3(kind, len, payload)[..16]`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

const MAGIC: &[u8; 4] = b"IFLG";
const HEADER: usize = 9;
const CHECK: usize = 16;
/// Largest payload a record may carry; longer lengths are damage, not data.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// Errors of a record log.
#[derive(Debug, Error)]
pub enum LogError {
    /// I/O failed
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// a record before the tail is damaged
    #[error("log {path} is corrupt at offset {offset}")]
    Corrupt { path: PathBuf, offset: u64 },
    /// a payload is too large
    #[error("record of {0} bytes is larger than the limit")]
    TooLarge(usize),
}

/// One record read back from a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Byte offset of the record in the log.
    pub offset: u64,
    /// Caller-defined record type.
    pub kind: u8,
    /// The record's bytes.
    pub payload: Vec<u8>,
}

/// An append-only log open for writing. Not internally synchronized: wrap it in a Mutex.
#[derive(Debug)]
pub struct RecordLog {
    path: PathBuf,
    file: File,
    len: u64,
}

fn check(kind: u8, payload: &[u8]) -> [u8; CHECK] {
    let mut h = blake3::Hasher::new();
    h.update(&[kind]);
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    let mut out = [0u8; CHECK];
    out.copy_from_slice(&h.finalize().as_bytes()[..CHECK]);
    out
}

/// Parses the records of `data`; returns them and the length of the valid prefix. A damaged
/// record followed only by zeros or nothing is a torn tail; anything else is corruption.
fn parse(path: &Path, data: &[u8]) -> Result<(Vec<Record>, u64), LogError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let rest = &data[pos..];
        let torn_or_corrupt = |end: usize| {
            if data.get(end..).is_none_or(|r| r.iter().all(|&b| b == 0)) {
                Ok(())
            } else {
                Err(LogError::Corrupt {
                    path: path.to_path_buf(),
                    offset: pos as u64,
                })
            }
        };
        if rest.len() < HEADER {
            torn_or_corrupt(pos)?;
            break;
        }
        if &rest[..4] != MAGIC {
            torn_or_corrupt(pos)?;
            break;
        }
        let kind = rest[4];
        let len = u32::from_le_bytes([rest[5], rest[6], rest[7], rest[8]]) as usize;
        let total = HEADER + len + CHECK;
        if len > MAX_PAYLOAD {
            torn_or_corrupt(pos + HEADER)?;
            break;
        }
        let Some(rec) = rest.get(..total) else {
            // runs past the end of the file: torn tail
            break;
        };
        let payload = &rec[HEADER..HEADER + len];
        if rec[HEADER + len..] != check(kind, payload) {
            torn_or_corrupt(pos + total)?;
            break;
        }
        out.push(Record {
            offset: pos as u64,
            kind,
            payload: payload.to_vec(),
        });
        pos += total;
    }
    Ok((out, pos as u64))
}

fn read_file(path: &Path) -> Result<Vec<u8>, LogError> {
    let mut data = Vec::new();
    match File::open(path) {
        Ok(mut f) => f.read_to_end(&mut data).map_err(|source| LogError::Io {
            op: "read",
            path: path.to_path_buf(),
            source,
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(source) => {
            return Err(LogError::Io {
                op: "open",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    Ok(data)
}

impl RecordLog {
    /// Opens (creating if missing) the log at `path` for appending, truncating a torn tail.
    /// Returns every valid record. Damage before the tail is an error: nothing is truncated.
    pub fn open(path: &Path) -> Result<(RecordLog, Vec<Record>), LogError> {
        let io = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| LogError::Io { op, path, source }
        };
        let data = read_file(path)?;
        let (records, valid) = parse(path, &data)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("open"))?;
        if valid != data.len() as u64 {
            tracing::warn!(path = %path.display(), valid, "truncating torn log tail");
            file.set_len(valid).map_err(io("truncate"))?;
            file.sync_all().map_err(io("fsync"))?;
        }
        Ok((
            RecordLog {
                path: path.to_path_buf(),
                file,
                len: valid,
            },
            records,
        ))
    }

    /// Reads the valid records of a log without opening it for writing (missing file: empty).
    pub fn read(path: &Path) -> Result<Vec<Record>, LogError> {
        let data = read_file(path)?;
        Ok(parse(path, &data)?.0)
    }

    /// Appends one record (not yet durable: call [`RecordLog::sync`]); returns its offset.
    pub fn append(&mut self, kind: u8, payload: &[u8]) -> Result<u64, LogError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(LogError::TooLarge(payload.len()));
        }
        let mut rec = Vec::with_capacity(HEADER + payload.len() + CHECK);
        rec.extend_from_slice(MAGIC);
        rec.push(kind);
        rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        rec.extend_from_slice(payload);
        rec.extend_from_slice(&check(kind, payload));
        let offset = self.len;
        self.file
            .write_all_at(&rec, offset)
            .map_err(|source| LogError::Io {
                op: "append",
                path: self.path.clone(),
                source,
            })?;
        self.len += rec.len() as u64;
        Ok(offset)
    }

    /// Makes every appended record durable.
    pub fn sync(&self) -> Result<(), LogError> {
        self.file.sync_data().map_err(|source| LogError::Io {
            op: "fsync",
            path: self.path.clone(),
            source,
        })
    }

    /// Length of the valid log in bytes (the offset the next record gets).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the log holds no records.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the log lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a log's records one at a time with bounded memory (for large files read once, such
/// as bundles). Ends at end of file or at an incomplete last record; any other damage is an
/// error item, after which the stream ends.
#[derive(Debug)]
pub struct RecordStream {
    path: PathBuf,
    r: std::io::BufReader<File>,
    pos: u64,
    done: bool,
}

impl RecordStream {
    /// Opens `path` for streaming from its start.
    pub fn open(path: &Path) -> Result<RecordStream, LogError> {
        let f = File::open(path).map_err(|source| LogError::Io {
            op: "open",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(RecordStream {
            path: path.to_path_buf(),
            r: std::io::BufReader::with_capacity(1 << 20, f),
            pos: 0,
            done: false,
        })
    }

    fn corrupt(&mut self) -> Option<Result<Record, LogError>> {
        self.done = true;
        Some(Err(LogError::Corrupt {
            path: self.path.clone(),
            offset: self.pos,
        }))
    }
}

impl Iterator for RecordStream {
    type Item = Result<Record, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let mut head = [0u8; HEADER];
        if let Err(e) = self.r.read_exact(&mut head) {
            self.done = true;
            return match e.kind() {
                std::io::ErrorKind::UnexpectedEof => None,
                _ => Some(Err(LogError::Io {
                    op: "read",
                    path: self.path.clone(),
                    source: e,
                })),
            };
        }
        if &head[..4] != MAGIC {
            return self.corrupt();
        }
        let kind = head[4];
        let len = u32::from_le_bytes([head[5], head[6], head[7], head[8]]) as usize;
        if len > MAX_PAYLOAD {
            return self.corrupt();
        }
        let mut rest = vec![0u8; len + CHECK];
        if let Err(e) = self.r.read_exact(&mut rest) {
            self.done = true;
            return match e.kind() {
                std::io::ErrorKind::UnexpectedEof => None,
                _ => Some(Err(LogError::Io {
                    op: "read",
                    path: self.path.clone(),
                    source: e,
                })),
            };
        }
        if rest[len..] != check(kind, &rest[..len]) {
            return self.corrupt();
        }
        rest.truncate(len);
        let offset = self.pos;
        self.pos += (HEADER + len + CHECK) as u64;
        Some(Ok(Record {
            offset,
            kind,
            payload: rest,
        }))
    }
}

impl Write for RecordLog {
    /// Writes `buf` as one record of kind 0 (convenience for line-ish event logs).
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(0, buf).map_err(std::io::Error::other)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.sync().map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        // Any bytes: parsing never panics, and valid records before damage are kept.
        #[test]
        fn parse_never_panics(
            records in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
            noise in proptest::collection::vec(any::<u8>(), 0..64),
            flip in any::<usize>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("l");
            let (mut log, _) = RecordLog::open(&p).unwrap();
            for r in &records {
                log.append(7, r).unwrap();
            }
            drop(log);
            let mut bytes = std::fs::read(&p).unwrap();
            let clean = RecordLog::read(&p).unwrap();
            prop_assert_eq!(clean.len(), records.len());
            if !bytes.is_empty() {
                let i = flip % bytes.len();
                bytes[i] ^= 0x20;
            }
            bytes.extend_from_slice(&noise);
            let _ = parse(&p, &bytes);
        }
    }

    #[test]
    fn torn_tail_is_truncated_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let (mut log, recs) = RecordLog::open(&p).unwrap();
        assert!(recs.is_empty());
        log.append(1, b"one").unwrap();
        log.append(2, b"two").unwrap();
        log.sync().unwrap();
        let full = log.len();
        drop(log);
        // a torn third record: header and half the payload
        let f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all_at(b"IFLG\x03\x10\x00\x00\x00abc", full)
            .unwrap();
        let (mut log, recs) = RecordLog::open(&p).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].payload, b"two");
        assert_eq!(log.len(), full);
        log.append(3, b"three").unwrap();
        drop(log);
        let recs = RecordLog::read(&p).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[2].kind, 3);
    }

    #[test]
    fn damage_before_the_tail_is_an_error_and_truncates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let (mut log, _) = RecordLog::open(&p).unwrap();
        log.append(1, b"one").unwrap();
        log.append(2, b"two").unwrap();
        let len = log.len();
        drop(log);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"X", 10).unwrap();
        assert!(matches!(
            RecordLog::open(&p),
            Err(LogError::Corrupt { offset: 0, .. })
        ));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), len);
    }

    #[test]
    fn zero_filled_tail_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let (mut log, _) = RecordLog::open(&p).unwrap();
        log.append(1, b"one").unwrap();
        let len = log.len();
        drop(log);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len + 4096).unwrap();
        let (log, recs) = RecordLog::open(&p).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(log.len(), len);
    }
}
