//! Running the tools under test: commands with their status checked, wall-clock timing, page-cache
//! control and disk usage. Invariant: a failed command is an error naming the command and its
//! stderr, so no bench ever times a failure as if it were a result.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

/// Why a bench step failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// could not start {cmd}
    #[error("could not start {cmd}")]
    Spawn { cmd: String, source: std::io::Error },
    /// a command exited non-zero
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
    /// a file operation failed
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// a tool's output was not what we parse
    #[error("could not parse {what} from: {text}")]
    Parse { what: &'static str, text: String },
    /// the mount served bytes other than the version's
    #[error("{0}")]
    WrongBytes(String),
}

pub type Result<T> = std::result::Result<T, BenchError>;

/// Wraps an io error with the operation and path it came from.
pub fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BenchError {
    let path = path.to_path_buf();
    move |source| BenchError::Io { op, path, source }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion; its output, or an error if it could not start or exited non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let name = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BenchError::Spawn {
            cmd: name.clone(),
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        return Err(BenchError::Failed {
            cmd: name,
            status: out.status.to_string(),
            stderr: tail,
        });
    }
    Ok(out)
}

/// Runs `cmd` and returns its stdout as text.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&run(cmd)?.stdout).into_owned())
}

/// Seconds taken by `f` (wall clock).
pub fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    let t = Instant::now();
    let v = f()?;
    Ok((t.elapsed().as_secs_f64(), v))
}

/// Writes back dirty pages, then drops the page cache (root only): the next read is cold.
pub fn drop_caches() -> Result<()> {
    run(&mut Command::new("sync"))?;
    let p = Path::new("/proc/sys/vm/drop_caches");
    std::fs::write(p, "3\n").map_err(io("write", p))
}

/// Reads a file once, so its pages are in the page cache.
pub fn warm(path: &Path) -> Result<u64> {
    read_all(path, 1 << 20)
}

/// Reads a whole file sequentially in `chunk`-byte reads; the number of bytes read.
pub fn read_all(path: &Path, chunk: usize) -> Result<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io("open", path))?;
    let mut buf = vec![0u8; chunk];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// Bytes on disk under `path` (allocated blocks, as `du` counts them).
pub fn du_bytes(path: &Path) -> Result<u64> {
    let out = stdout(Command::new("du").args(["-s", "-B1"]).arg(path))?;
    out.split_whitespace()
        .next()
        .and_then(|w| w.parse().ok())
        .ok_or(BenchError::Parse {
            what: "du size",
            text: out.clone(),
        })
}

/// Whether a program is on PATH.
pub fn have(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(prog).is_file()))
}

/// Whether we run as root (FUSE mounts and drop_caches need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Facts about the machine the figures come from.
pub fn machine() -> serde_json::Value {
    let text = |c: &mut Command| stdout(c).map(|s| s.trim().to_string()).unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    serde_json::json!({
        "nproc": text(&mut Command::new("nproc")).parse::<u64>().ok(),
        "kernel": text(Command::new("uname").arg("-srm")),
        "date": text(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])),
        "cpu": cpu,
        "memory": mem,
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}
