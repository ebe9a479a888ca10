//! Checksummed append-only record logs: the durable truth for everything the sled index cannot
//! recompute (tags, versions, pins; instance and event logs of other parts reuse this type).
//! Invariant: a record is either whole and verified or, only at the tail, ignored and truncated.
//!
//! Record layout (format 2, written since sub-block overlays): `magic "IFL2" | kind u8 |
//! len u32 LE | header check [4] | payload | blake3(kind, len, payload)[..16]`, where the header
//! check is blake3("hdr", kind, len)[..4]: a damaged length is told apart from a torn tail.
//! Format 1 (`magic "IFLG" | kind | len | payload | check`, no header check) is still read; a
//! format-1 record that runs past the end of the file is a torn tail only if no valid record
//! starts after its header.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

const MAGIC: &[u8; 4] = b"IFLG";
const HEADER: usize = 9;
const MAGIC2: &[u8; 4] = b"IFL2";
const HEADER2: usize = 13;
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
    /// A failed append could not be cut off: appending more would bury its bytes mid-log.
    stuck: bool,
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

fn header_check(kind: u8, len: u32) -> [u8; 4] {
    let mut h = blake3::Hasher::new();
    h.update(b"hdr");
    h.update(&[kind]);
    h.update(&len.to_le_bytes());
    let mut out = [0u8; 4];
    out.copy_from_slice(&h.finalize().as_bytes()[..4]);
    out
}

/// One whole, verified record at the start of `rest`: `(kind, payload, total length)`.
fn record_at(rest: &[u8]) -> Option<(u8, &[u8], usize)> {
    let (head, magic2) = match rest.get(..4)? {
        m if m == MAGIC2 => (HEADER2, true),
        m if m == MAGIC => (HEADER, false),
        _ => return None,
    };
    let kind = *rest.get(4)?;
    let len = u32::from_le_bytes(rest.get(5..9)?.try_into().ok()?);
    if magic2 && rest.get(9..13)? != header_check(kind, len) {
        return None;
    }
    let len = len as usize;
    if len > MAX_PAYLOAD {
        return None;
    }
    let payload = rest.get(head..head + len)?;
    let sum = rest.get(head + len..head + len + CHECK)?;
    (sum == check(kind, payload)).then_some((kind, payload, head + len + CHECK))
}

/// Whether a whole, valid record starts anywhere in `data` from `from` on (so what lies
/// before it is damage, not a torn tail).
fn valid_record_after(data: &[u8], from: usize) -> bool {
    let Some(tail) = data.get(from..) else {
        return false;
    };
    tail.windows(3)
        .enumerate()
        .filter(|(_, w)| *w == b"IFL")
        .any(|(i, _)| record_at(&tail[i..]).is_some())
}

/// Parses the records of `data`; returns them and the length of the valid prefix. A damaged
/// record followed only by zeros or nothing is a torn tail; anything else is corruption.
fn parse(path: &Path, data: &[u8]) -> Result<(Vec<Record>, u64), LogError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let rest = &data[pos..];
        if rest.starts_with(MAGIC2) || (rest.len() < 4 && MAGIC2.starts_with(rest)) {
            match parse2(path, data, pos)? {
                Some(rec) => {
                    pos += HEADER2 + rec.payload.len() + CHECK;
                    out.push(rec);
                    continue;
                }
                None => break,
            }
        }
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
            // Runs past the end of the file: a torn tail, unless a whole record follows its
            // header (then the length itself is damaged: format 1 has no header check).
            if valid_record_after(data, pos + HEADER) {
                return Err(LogError::Corrupt {
                    path: path.to_path_buf(),
                    offset: pos as u64,
                });
            }
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

/// Parses the format-2 record at `pos`: `Some` when whole, `None` for a torn tail, an error
/// for damage.
fn parse2(path: &Path, data: &[u8], pos: usize) -> Result<Option<Record>, LogError> {
    let corrupt = || LogError::Corrupt {
        path: path.to_path_buf(),
        offset: pos as u64,
    };
    let rest = &data[pos..];
    if rest.len() < HEADER2 {
        // A header cut short by the end of the file: torn, if what is there fits one.
        let fits = rest.len() <= 4 || rest.get(..4) == Some(MAGIC2.as_slice());
        return if fits { Ok(None) } else { Err(corrupt()) };
    }
    let kind = rest[4];
    let len = u32::from_le_bytes([rest[5], rest[6], rest[7], rest[8]]);
    if rest[9..13] != header_check(kind, len) || len as usize > MAX_PAYLOAD {
        // A whole header that does not check is damage (a torn one is shorter).
        return Err(corrupt());
    }
    let len = len as usize;
    let total = HEADER2 + len + CHECK;
    let Some(rec) = rest.get(..total) else {
        return Ok(None); // the checked length runs past the end: torn tail
    };
    let payload = &rec[HEADER2..HEADER2 + len];
    if rec[HEADER2 + len..] != check(kind, payload) {
        // Torn if nothing but zeros follows (a power cut left the tail unwritten).
        return if data[pos + total..].iter().all(|&b| b == 0) {
            Ok(None)
        } else {
            Err(corrupt())
        };
    }
    Ok(Some(Record {
        offset: pos as u64,
        kind,
        payload: payload.to_vec(),
    }))
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
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("open"))?;
        if !existed {
            // The new name must survive a power cut as well as the records fsynced into it.
            sync_parent(path).map_err(io("fsync dir of"))?;
        }
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
                stuck: false,
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
        if self.stuck {
            return Err(LogError::Io {
                op: "append (an earlier failed append could not be cut off; reopen the log)",
                path: self.path.clone(),
                source: std::io::Error::other("log needs reopening"),
            });
        }
        let len = payload.len() as u32;
        let mut rec = Vec::with_capacity(HEADER2 + payload.len() + CHECK);
        rec.extend_from_slice(MAGIC2);
        rec.push(kind);
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&header_check(kind, len));
        rec.extend_from_slice(payload);
        rec.extend_from_slice(&check(kind, payload));
        let offset = self.len;
        let written = if crate::fault::is_armed("log.appending") {
            // Half a record on disk when the process dies: a torn tail for the next open.
            let half = rec.len() / 2;
            self.file.write_all_at(&rec[..half], offset).and_then(|()| {
                crate::fault::point("log.appending");
                self.file.write_all_at(&rec[half..], offset + half as u64)
            })
        } else {
            self.file.write_all_at(&rec, offset)
        };
        if let Err(source) = written {
            // A partial record (ENOSPC, EFBIG mid-write) is cut off at once: left there, a
            // shorter record written over its start later would leave its tail as damage
            // mid-log instead of a torn tail.
            if let Err(e) = self.file.set_len(offset) {
                tracing::error!(path = %self.path.display(), offset, "cutting a failed append: {e}");
                self.stuck = true;
            }
            return Err(LogError::Io {
                op: "append",
                path: self.path.clone(),
                source,
            });
        }
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

/// fsyncs the directory holding `path`, making a create, rename or unlink there durable.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all())
}

/// Repairs a damaged log: keeps every whole, verified record, before and after the damage
/// (resyncing on the next valid record), and drops the damaged bytes, after saving the whole
/// file beside it as `NAME.damaged-SECS` (fsynced). The repaired log replaces the old one
/// atomically (written aside, fsynced, renamed over). What `fsck --repair --drop-damaged`
/// does, and nothing else does. Returns the damaged byte ranges dropped and the copy, or `None`
/// for an undamaged log.
pub fn drop_damaged(path: &Path) -> Result<Option<Repaired>, LogError> {
    let data = read_file(path)?;
    if parse(path, &data).is_ok() {
        return Ok(None);
    }
    let io = |op: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| LogError::Io {
            op,
            path: p,
            source,
        }
    };
    // Salvage: whole records wherever they start; the bytes between them are damage.
    let mut kept: Vec<(u8, &[u8])> = Vec::new();
    let mut dropped: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        if let Some((kind, payload, total)) = record_at(&data[pos..]) {
            kept.push((kind, payload));
            pos += total;
            continue;
        }
        let next = (pos + 1..data.len())
            .find(|&i| data[i..].starts_with(b"IFL") && record_at(&data[i..]).is_some())
            .unwrap_or(data.len());
        if data[pos..next].iter().any(|&b| b != 0) {
            dropped.push((pos as u64, (next - pos) as u64));
        }
        pos = next;
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let copy = path.with_file_name(format!("{name}.damaged-{secs}"));
    std::fs::write(&copy, &data).map_err(io("write", &copy))?;
    File::open(&copy)
        .and_then(|f| f.sync_all())
        .map_err(io("fsync", &copy))?;
    let tmp = path.with_file_name(format!("{name}.repair"));
    let _ = std::fs::remove_file(&tmp);
    {
        let (mut log, _) = RecordLog::open(&tmp)?;
        for (kind, payload) in kept {
            log.append(kind, payload)?;
        }
        log.sync()?;
    }
    std::fs::rename(&tmp, path).map_err(io("rename", &tmp))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", dir))?;
    }
    Ok(Some(Repaired { dropped, copy }))
}

/// What [`drop_damaged`] did to a damaged log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repaired {
    /// The damaged byte ranges dropped, as `(offset, length)`.
    pub dropped: Vec<(u64, u64)>,
    /// Where the whole damaged file was saved.
    pub copy: PathBuf,
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
        let format2 = &head[..4] == MAGIC2;
        if &head[..4] != MAGIC && !format2 {
            return self.corrupt();
        }
        let kind = head[4];
        let len32 = u32::from_le_bytes([head[5], head[6], head[7], head[8]]);
        if format2 {
            let mut hc = [0u8; 4];
            if self.r.read_exact(&mut hc).is_err() || hc != header_check(kind, len32) {
                return self.corrupt();
            }
        }
        let len = len32 as usize;
        if len > MAX_PAYLOAD {
            return self.corrupt();
        }
        let head_len = if format2 { HEADER2 } else { HEADER };
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
        self.pos += (head_len + len + CHECK) as u64;
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

    fn set_fsize_limit(bytes: u64) {
        let lim = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit with a valid struct; this process is a child run for this test.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) }, 0);
    }

    /// A failed append (here EFBIG from RLIMIT_FSIZE, a partial write as ENOSPC gives one) is
    /// cut back: a shorter record appended after it must not leave its tail as damage. Runs in
    /// a child process (the test binary again) because the limit is process-wide.
    #[test]
    fn a_failed_append_is_cut_back_and_later_appends_stay_readable() {
        const CHILD: &str = "IMAGEFS_LOG_FSIZE_CHILD";
        if let Some(dir) = std::env::var_os(CHILD) {
            let p = Path::new(&dir).join("l");
            let (mut log, _) = RecordLog::open(&p).unwrap();
            log.append(1, &[1u8; 100]).unwrap();
            log.sync().unwrap();
            let before = log.len();
            // SAFETY: ignoring SIGXFSZ so the write fails with EFBIG instead of killing us.
            unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
            set_fsize_limit(before + 300);
            let err = log.append(2, &[2u8; 4096]).unwrap_err();
            assert!(matches!(err, LogError::Io { op: "append", .. }), "{err}");
            assert_eq!(std::fs::metadata(&p).unwrap().len(), before, "not cut back");
            assert_eq!(log.len(), before);
            set_fsize_limit(libc::RLIM_INFINITY);
            log.append(3, b"short").unwrap();
            log.sync().unwrap();
            drop(log);
            let (_, recs) = RecordLog::open(&p).unwrap();
            let kinds: Vec<u8> = recs.iter().map(|r| r.kind).collect();
            assert_eq!(kinds, vec![1, 3]);
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "log::tests::a_failed_append_is_cut_back_and_later_appends_stay_readable",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
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

    /// A format-1 record, as logs written before format 2 hold them.
    fn v1(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut r = MAGIC.to_vec();
        r.push(kind);
        r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        r.extend_from_slice(payload);
        r.extend_from_slice(&check(kind, payload));
        r
    }

    #[test]
    fn a_flipped_length_byte_is_damage_in_both_formats_and_nothing_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let (mut log, _) = RecordLog::open(&p).unwrap();
        log.append(1, b"first record").unwrap();
        log.append(2, b"second").unwrap();
        drop(log);
        let v1_log = dir.path().join("old");
        std::fs::write(&v1_log, [v1(1, b"first record"), v1(2, b"second")].concat()).unwrap();
        for path in [&p, &v1_log] {
            let mut bytes = std::fs::read(path).unwrap();
            let before = bytes.clone();
            bytes[6] ^= 0x01; // the first record's length grows by 256: past the file's end
            std::fs::write(path, &bytes).unwrap();
            assert!(
                matches!(
                    RecordLog::open(path),
                    Err(LogError::Corrupt { offset: 0, .. })
                ),
                "{}",
                path.display()
            );
            assert_eq!(std::fs::read(path).unwrap(), bytes, "the log was changed");
            std::fs::write(path, &before).unwrap();
            assert_eq!(RecordLog::read(path).unwrap().len(), 2);
        }
        // Format 1 records followed by format 2 appends read as one log.
        let (mut log, recs) = RecordLog::open(&v1_log).unwrap();
        assert_eq!(recs.len(), 2);
        log.append(3, b"third").unwrap();
        drop(log);
        let kinds: Vec<u8> = RecordLog::read(&v1_log)
            .unwrap()
            .iter()
            .map(|r| r.kind)
            .collect();
        assert_eq!(kinds, vec![1, 2, 3]);
    }

    #[test]
    fn drop_damaged_saves_a_copy_and_keeps_every_record_but_the_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("refs.log");
        let (mut log, _) = RecordLog::open(&p).unwrap();
        log.append(1, b"one").unwrap();
        let keep = log.len();
        log.append(2, b"two").unwrap();
        log.append(3, b"three").unwrap();
        drop(log);
        assert!(
            drop_damaged(&p).unwrap().is_none(),
            "an undamaged log is left alone"
        );
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[keep as usize + 20] ^= 0xFF;
        std::fs::write(&p, &bytes).unwrap();
        let Repaired { dropped, copy } = drop_damaged(&p).unwrap().unwrap();
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].0, keep, "the damaged record is what is dropped");
        assert_eq!(std::fs::read(copy).unwrap(), bytes);
        // the records before and after the damaged one are kept
        let (_, recs) = RecordLog::open(&p).unwrap();
        let kinds: Vec<u8> = recs.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, vec![1, 3]);
    }

    #[test]
    fn a_header_cut_short_at_the_end_is_torn() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let (mut log, _) = RecordLog::open(&p).unwrap();
        log.append(1, b"one").unwrap();
        let len = log.len();
        log.append(2, b"two").unwrap();
        drop(log);
        for cut in [1, 4, 7, HEADER2 as u64, HEADER2 as u64 + 2] {
            let mut bytes = std::fs::read(&p).unwrap();
            bytes.truncate((len + cut) as usize);
            let q = dir.path().join(format!("cut{cut}"));
            std::fs::write(&q, &bytes).unwrap();
            let (log, recs) = RecordLog::open(&q).unwrap();
            assert_eq!((recs.len(), log.len()), (1, len), "cut at {cut}");
        }
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
