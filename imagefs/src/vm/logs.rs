//! `vm logs`: a console log streamed with bounded memory (a 64 KiB buffer, however large the
//! log), from its start or its last N lines, and followed across rotations.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

const CHUNK: usize = 64 << 10;
/// How often a followed log is polled for more.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Where the last `lines` lines of `f` start (scanning back a chunk at a time).
fn tail_start(f: &mut File, lines: usize) -> std::io::Result<u64> {
    let len = f.metadata()?.len();
    if lines == 0 {
        return Ok(len);
    }
    let mut buf = vec![0u8; CHUNK];
    let mut end = len;
    // A last line without its newline counts as a line too.
    let mut seen = 0usize;
    let mut first = true;
    while end > 0 {
        let start = end.saturating_sub(CHUNK as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        for i in (0..n).rev() {
            if buf[i] != b'\n' {
                first = false;
                continue;
            }
            if first && start + i as u64 + 1 == len {
                // the log's final newline ends the last line; it does not start one
                first = false;
                continue;
            }
            seen += 1;
            if seen == lines {
                return Ok(start + i as u64 + 1);
            }
        }
        end = start;
    }
    Ok(0)
}

/// Copies `path` to `out` (from its last `tail` lines, if given); with `follow`, goes on
/// printing what is appended, and starts over at a new file when the log is rotated or cut,
/// until writing to `out` fails (the reader left).
pub fn stream(
    path: &Path,
    tail: Option<usize>,
    follow: bool,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !follow => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut pos = match tail {
        Some(n) => tail_start(&mut f, n)?,
        None => 0,
    };
    f.seek(SeekFrom::Start(pos))?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            pos += n as u64;
            continue;
        }
        if !follow {
            return out.flush();
        }
        out.flush()?;
        std::thread::sleep(FOLLOW_POLL);
        // Rotated (a new file under the name) or cut (copy-and-truncate): start over.
        match std::fs::metadata(path) {
            Ok(m) if m.ino() != f.metadata()?.ino() || m.len() < pos => {
                f = File::open(path)?;
                pos = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(dir: &Path, lines: usize) -> std::path::PathBuf {
        let p = dir.join("console.log");
        let text: String = (0..lines).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap_or_default();
        p
    }

    #[test]
    fn tail_gives_the_last_lines_across_chunks() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = log(dir.path(), 20_000);
        let mut out = Vec::new();
        stream(&p, Some(3), false, &mut out)?;
        assert_eq!(out, b"line 19997\nline 19998\nline 19999\n");
        out.clear();
        stream(&p, Some(0), false, &mut out)?;
        assert!(out.is_empty());
        out.clear();
        stream(&p, Some(1_000_000), false, &mut out)?;
        assert_eq!(out.len() as u64, std::fs::metadata(&p)?.len());
        std::fs::write(&p, "a\nno newline at the end")?;
        out.clear();
        stream(&p, Some(1), false, &mut out)?;
        assert_eq!(out, b"no newline at the end");
        Ok(())
    }
}
