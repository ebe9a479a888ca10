//! The simple requests: ping (who and what is this guest), hash (a file as the guest reads it)
//! and exec (a command with a deadline). Invariant: exec never outlives its deadline (the whole
//! process group is killed) and never returns more than `MAX_OUTPUT` bytes per stream.

use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use agent_proto::message::MAX_OUTPUT;
use agent_proto::{
    Command, ErrorCode, ExecReply, ExecRequest, HashReply, Mount, Pong, Response, VERSION,
};

use crate::sys;

pub const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Maps an I/O error to the agent's error reply.
pub fn io_error(what: &str, e: &std::io::Error) -> Response {
    let code = if e.kind() == ErrorKind::NotFound {
        ErrorCode::NotFound
    } else {
        ErrorCode::Io
    };
    Response::error(code, format!("{what}: {e}"))
}

/// Unescapes the octal escapes (\040 etc.) of /proc/self/mounts fields.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let oct = b.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 8).ok())
        });
        match (c, oct) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses /proc/self/mounts text.
pub fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (dev, mp, fstype, opts) = (f.next()?, f.next()?, f.next()?, f.next()?);
            Some(Mount {
                device: unescape(dev),
                mountpoint: unescape(mp),
                fstype: fstype.to_string(),
                read_only: opts.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

pub fn ping(init_mode: bool) -> Response {
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    let mut mounts =
        parse_mounts(&std::fs::read_to_string("/proc/self/mounts").unwrap_or_default());
    mounts.truncate(256);
    Response::Pong(Pong {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: VERSION,
        kernel: sys::kernel_release(),
        uptime_ms: (uptime * 1000.0) as u64,
        init_mode,
        mounts,
    })
}

pub fn hash(path: &str) -> Response {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return io_error(path, &e),
    };
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(buf.get(..n).unwrap_or_default());
                size += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return io_error(path, &e),
        }
    }
    Response::Hash(HashReply {
        path: path.to_string(),
        size,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}

/// Output of one stream, capped.
#[derive(Default)]
struct Capture {
    bytes: Vec<u8>,
    truncated: bool,
    open: bool,
}

impl Capture {
    /// Reads what is available; marks the stream closed at EOF.
    fn pump(&mut self, r: &mut impl Read) {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) => {
                    self.open = false;
                    return;
                }
                Ok(n) => {
                    let room = MAX_OUTPUT.saturating_sub(self.bytes.len());
                    let take = n.min(room);
                    self.bytes
                        .extend_from_slice(buf.get(..take).unwrap_or_default());
                    self.truncated |= take < n;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

/// Spawns a command in its own process group with captured, non-blocking output.
pub fn spawn(command: &Command, env: &[(&str, String)]) -> std::io::Result<Child> {
    let mut cmd = match command {
        Command::Argv(argv) => {
            let (prog, args) = argv.split_first().ok_or(ErrorKind::InvalidInput)?;
            let mut c = std::process::Command::new(prog);
            c.args(args);
            c
        }
        Command::Shell(line) => {
            let mut c = std::process::Command::new("/bin/sh");
            c.arg("-c").arg(line);
            c
        }
    };
    cmd.env("PATH", PATH_ENV)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
}

/// Runs a command to completion or its deadline. Stops reading once the command itself has
/// exited, even if a background grandchild keeps the pipes open.
pub fn run(
    command: &Command,
    timeout: Duration,
    env: &[(&str, String)],
) -> std::io::Result<ExecReply> {
    let start = Instant::now();
    let mut child = spawn(command, env)?;
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    for fd in [
        out.as_ref().map(|o| o.as_raw_fd()),
        err.as_ref().map(|e| e.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    {
        sys::set_nonblocking(fd)?;
    }
    let (mut cout, mut cerr) = (
        Capture {
            open: true,
            ..Default::default()
        },
        Capture {
            open: true,
            ..Default::default()
        },
    );
    let mut timed_out = false;
    let status = loop {
        if let Some(o) = out.as_mut() {
            cout.pump(o);
        }
        if let Some(e) = err.as_mut() {
            cerr.pump(e);
        }
        // Orphans adopted by pid 1 may exit while a command runs: reap them, not the command.
        // (Only as pid 1: elsewhere orphans are not ours, and tests run commands in parallel.)
        if std::process::id() == 1 {
            sys::reap_children(Some(child.id()));
        }
        if let Some(status) = child.try_wait()? {
            // Take what the command wrote just before it exited.
            if let Some(o) = out.as_mut() {
                cout.pump(o);
            }
            if let Some(e) = err.as_mut() {
                cerr.pump(e);
            }
            break status;
        }
        if start.elapsed() >= timeout {
            timed_out = true;
            sys::kill_group(child.id());
            break child.wait()?;
        }
        if let Some(fd) = out.as_ref().filter(|_| cout.open).map(|o| o.as_raw_fd()) {
            sys::poll_readable(fd, 10);
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let (stdout, stdout_hex) = ExecReply::encode_output(&cout.bytes);
    let (stderr, stderr_hex) = ExecReply::encode_output(&cerr.bytes);
    Ok(ExecReply {
        exit_code: status.code(),
        signal: status.signal(),
        timed_out,
        stdout,
        stderr,
        stdout_truncated: cout.truncated,
        stderr_truncated: cerr.truncated,
        duration_ms: start.elapsed().as_millis() as u64,
        stdout_hex,
        stderr_hex,
    })
}

pub fn exec(req: &ExecRequest) -> Response {
    match run(&req.command, Duration::from_millis(req.timeout_ms), &[]) {
        Ok(r) => Response::Exec(r),
        Err(e) => io_error("exec", &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(line: &str, timeout_ms: u64) -> ExecReply {
        run(
            &Command::Shell(line.into()),
            Duration::from_millis(timeout_ms),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn exec_reports_status_output_and_caps() {
        let r = sh("echo out; echo err >&2; exit 3", 5000);
        assert_eq!(
            (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
            (Some(3), "out\n", "err\n")
        );
        let r = sh("head -c 100000 /dev/zero | tr '\\0' a", 5000);
        assert_eq!(r.stdout.len(), MAX_OUTPUT);
        assert!(r.stdout_truncated);
    }

    #[test]
    fn binary_output_arrives_exactly_and_fits_a_frame() {
        let r = sh("printf 'a\\377\\000b'; printf '\\351' >&2", 5000);
        assert_eq!(r.stdout_bytes(), b"a\xff\x00b");
        assert_eq!(r.stderr_bytes(), b"\xe9");
        assert_eq!(r.stdout_hex.as_deref(), Some("61ff0062"));
        // Both streams at the cap, neither UTF-8: the reply must still fit one frame.
        let r = sh(
            "head -c 100000 /dev/zero | tr '\\0' '\\377' | tee /dev/stderr",
            5000,
        );
        assert_eq!(r.stdout_bytes(), vec![0xff; MAX_OUTPUT]);
        assert_eq!(r.stderr_bytes(), vec![0xff; MAX_OUTPUT]);
        Response::Exec(r).to_frame(7).expect("fits one frame");
    }

    #[test]
    fn exec_kills_at_deadline_and_ignores_background_holders() {
        let r = sh("sleep 5", 200);
        assert!(
            r.timed_out && r.exit_code.is_none() && r.duration_ms < 2000,
            "{r:?}"
        );
        let r = sh("sleep 3 & echo started", 5000);
        assert_eq!(r.exit_code, Some(0));
        assert!(r.duration_ms < 2000, "waited for the background job: {r:?}");
    }

    #[test]
    fn hash_matches_blake3_and_missing_is_not_found() {
        let dir = std::env::temp_dir().join(format!("ga-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, b"v1\n").unwrap();
        match hash(p.to_str().unwrap()) {
            Response::Hash(h) => assert_eq!(h.blake3, blake3::hash(b"v1\n").to_hex().to_string()),
            r => panic!("{r:?}"),
        }
        assert!(matches!(
            hash("/nonexistent/x"),
            Response::Error(agent_proto::ErrorReply {
                code: ErrorCode::NotFound,
                ..
            })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn mounts_parse_with_escapes() {
        let m = parse_mounts("/dev/vda / ext4 ro,relatime 0 0\nnone /a\\040b tmpfs rw 0 0\n");
        assert!(m[0].read_only && m[0].device == "/dev/vda");
        assert_eq!(m[1].mountpoint, "/a b");
        assert!(!m[1].read_only);
    }
}
