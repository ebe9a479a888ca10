//! Substitution notices: make the guest drop what it cached of changed blocks, then report who
//! holds the changed files and run their restart hooks. Invariant: the ack is sent only after the
//! caches are dropped, and a filesystem the guest can write is never touched (refused instead).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use agent_proto::{
    Command, ErrorCode, HookRun, NoticeAck, ProcessHit, Response, Step, SubstitutionNotice,
};

use crate::config::Config;
use crate::{ops, sys};

const MAX_HITS: usize = 1024;
const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// One mount of /proc/self/mountinfo: what the notice check needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub dev: (u32, u32),
    pub mountpoint: String,
    pub source: String,
    /// The superblock is writable (any mount of it can write).
    pub writable: bool,
}

/// Parses /proc/self/mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split_whitespace().collect();
            let post: Vec<&str> = post.split_whitespace().collect();
            let (maj, min) = pre.get(2)?.split_once(':')?;
            Some(MountInfo {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                mountpoint: pre.get(4)?.to_string(),
                source: post.get(1)?.to_string(),
                writable: post.get(2)?.split(',').any(|o| o == "rw"),
            })
        })
        .collect()
}

/// Mounts of `device` (by device number) or of one of its partitions (by name).
pub fn mounts_of<'a>(
    mounts: &'a [MountInfo],
    device: &'a str,
    rdev: Option<(u32, u32)>,
) -> impl Iterator<Item = &'a MountInfo> {
    mounts.iter().filter(move |m| {
        Some(m.dev) == rdev
            || m.source == device
            || m.source.strip_prefix(device).is_some_and(|rest| {
                let digits = rest.strip_prefix('p').unwrap_or(rest);
                !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
            })
    })
}

struct Timer {
    steps: Vec<Step>,
}

impl Timer {
    fn step<T>(&mut self, name: &str, f: impl FnOnce() -> (T, String)) -> T {
        let t = Instant::now();
        let (v, detail) = f();
        self.steps.push(Step {
            name: name.to_string(),
            micros: t.elapsed().as_micros() as u64,
            detail,
        });
        v
    }
}

fn write_drop_caches(level: u8) -> String {
    match std::fs::write("/proc/sys/vm/drop_caches", format!("{level}\n")) {
        Ok(()) => format!("drop_caches={level}"),
        Err(e) => format!("drop_caches={level} failed: {e}"),
    }
}

/// Processes that execute, map or hold open one of `files`, from /proc.
pub fn holders(files: &[String]) -> Vec<ProcessHit> {
    if files.is_empty() {
        return Vec::new();
    }
    let me = std::process::id();
    let mut hits: BTreeMap<(u32, String), ProcessHit> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = entry.path();
        let mut comm: Option<String> = None;
        let mut note = |file: &str, how: &str| {
            let file = file.trim_end_matches(" (deleted)");
            if hits.len() >= MAX_HITS || !files.iter().any(|f| f == file) {
                return;
            }
            let hit = hits
                .entry((pid, file.to_string()))
                .or_insert_with(|| ProcessHit {
                    pid,
                    comm: comm
                        .get_or_insert_with(|| {
                            std::fs::read_to_string(base.join("comm"))
                                .map(|s| s.trim_end().to_string())
                                .unwrap_or_default()
                        })
                        .clone(),
                    file: file.to_string(),
                    how: Vec::new(),
                });
            if !hit.how.iter().any(|h| h == how) {
                hit.how.push(how.to_string());
            }
        };
        // Kernel threads have no exe, maps or files: skip them early.
        let Ok(exe) = std::fs::read_link(base.join("exe")) else {
            continue;
        };
        note(&exe.to_string_lossy(), "exe");
        if let Ok(maps) = std::fs::read_to_string(base.join("maps")) {
            for line in maps.lines() {
                // address perms offset dev inode pathname: the path is the sixth field onward.
                if let Some(path) = line.splitn(6, char::is_whitespace).nth(5) {
                    let path = path.trim_start();
                    if path.starts_with('/') {
                        note(path, "maps");
                    }
                }
            }
        }
        if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
            for fd in fds.flatten() {
                if let Ok(target) = std::fs::read_link(fd.path()) {
                    note(&target.to_string_lossy(), "fd");
                }
            }
        }
    }
    hits.into_values().collect()
}

fn run_hooks(cfg: &Config, files: &[String]) -> Vec<HookRun> {
    let mut todo: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for f in files {
        for (path, cmd) in cfg.hooks_for(f) {
            todo.entry((path.clone(), cmd.clone()))
                .or_default()
                .push(f.clone());
        }
    }
    todo.into_iter()
        .map(|((path, command), changed)| {
            let t = Instant::now();
            let env = [("IMAGEFS_CHANGED_FILES", changed.join("\n"))];
            let exit_code = ops::run(&Command::Shell(command.clone()), HOOK_TIMEOUT, &env)
                .ok()
                .and_then(|r| r.exit_code);
            HookRun {
                path,
                command,
                exit_code,
                micros: t.elapsed().as_micros() as u64,
            }
        })
        .collect()
}

/// Handles one notice end to end.
pub fn handle(cfg: &Config, n: &SubstitutionNotice) -> Response {
    let start = Instant::now();
    let rdev = match std::fs::metadata(&n.device) {
        Ok(m) => Some((libc::major(m.rdev()), libc::minor(m.rdev()))),
        Err(e) => return ops::io_error(&n.device, &e),
    };
    let mounts =
        parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    let mine: Vec<&MountInfo> = mounts_of(&mounts, &n.device, rdev).collect();
    if let Some(m) = mine.iter().find(|m| m.writable) {
        return Response::error(
            ErrorCode::Refused,
            format!(
                "{} is mounted read-write on {}: substitution needs a read-only filesystem",
                m.source, m.mountpoint
            ),
        );
    }
    let mut t = Timer { steps: Vec::new() };
    t.step("sync", || {
        sys::sync();
        ((), String::new())
    });
    t.step("blkflsbuf", || {
        let mut devs: Vec<&str> = vec![n.device.as_str()];
        devs.extend(
            mine.iter()
                .map(|m| m.source.as_str())
                .filter(|s| s.starts_with("/dev/")),
        );
        devs.dedup();
        let results: Vec<String> = devs
            .iter()
            .map(|d| match File::open(d).and_then(|f| sys::blkflsbuf(&f)) {
                Ok(()) => format!("{d} flushed"),
                Err(e) => format!("{d}: {e}"),
            })
            .collect();
        ((), results.join("; "))
    });
    let targeted = !n.files.is_empty() && !n.files_truncated;
    if targeted {
        t.step("fadvise_dontneed", || {
            let (mut ok, mut failed) = (0, 0);
            for f in &n.files {
                match File::open(f).and_then(|file| sys::fadvise_dontneed(&file)) {
                    Ok(()) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            ((), format!("{ok} files dropped, {failed} not opened"))
        });
    } else {
        t.step("drop_page_cache", || ((), write_drop_caches(1)));
    }
    if n.metadata_changed {
        t.step("drop_dentries_inodes", || ((), write_drop_caches(3)));
    }
    let stale_files = t.step("check_residency", || {
        let stale: Vec<String> = n
            .files
            .iter()
            .filter(|f| {
                File::open(f)
                    .and_then(|file| sys::resident_pages(&file))
                    .is_ok_and(|pages| pages > 0)
            })
            .cloned()
            .collect();
        let detail = format!("{} files still cached (mapped)", stale.len());
        (stale, detail)
    });
    let processes = t.step("scan_processes", || {
        let hits = holders(&n.files);
        let detail = format!("{} holders", hits.len());
        (hits, detail)
    });
    let hooks = t.step("hooks", || {
        let runs = run_hooks(cfg, &n.files);
        let detail = format!("{} hooks run", runs.len());
        (runs, detail)
    });
    Response::NoticeAck(NoticeAck {
        steps: t.steps,
        processes,
        hooks,
        stale_files,
        total_micros: start.elapsed().as_micros() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 254:0 / / ro,relatime shared:1 - ext4 /dev/vda ro\n\
23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=1k\n\
30 22 254:17 / /data rw,relatime - ext4 /dev/vdb1 rw\n";

    #[test]
    fn mountinfo_finds_disks_and_partitions() {
        let m = parse_mountinfo(INFO);
        assert_eq!(m.len(), 3);
        let vda: Vec<_> = mounts_of(&m, "/dev/vda", Some((254, 0))).collect();
        assert_eq!(vda.len(), 1);
        assert!(!vda[0].writable);
        let vdb: Vec<_> = mounts_of(&m, "/dev/vdb", Some((254, 16))).collect();
        assert_eq!(vdb.len(), 1, "partition of vdb");
        assert!(vdb[0].writable);
        assert_eq!(mounts_of(&m, "/dev/vd", None).count(), 0);
    }

    #[test]
    fn dropped_file_is_not_resident_but_a_mapped_one_is() {
        // Next to the test binary, not in /tmp: tmpfs pages cannot be dropped.
        let exe = std::env::current_exe().unwrap();
        let dir = exe
            .parent()
            .unwrap()
            .join(format!("ga-res-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("data");
        std::fs::write(&f, vec![7u8; 64 * 1024]).unwrap();
        let file = File::open(&f).unwrap();
        file.sync_all().unwrap();
        let _ = std::fs::read(&f).unwrap();
        assert!(
            sys::resident_pages(&file).unwrap() > 0,
            "just read, so cached"
        );
        sys::fadvise_dontneed(&file).unwrap();
        assert_eq!(sys::resident_pages(&file).unwrap(), 0);
        // A process that maps the file pins its pages: the drop leaves them.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let sleep_bin = File::open("/bin/sleep")
            .or_else(|_| File::open("/usr/bin/sleep"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        sys::fadvise_dontneed(&sleep_bin).unwrap();
        let pinned = sys::resident_pages(&sleep_bin).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        assert!(pinned > 0, "a running program's mapped pages stay cached");
    }

    #[test]
    fn holders_lists_a_process_holding_a_file() {
        let dir = std::env::temp_dir().join(format!("ga-hold-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("version");
        std::fs::write(&f, b"v1").unwrap();
        let fs = f.to_str().unwrap().to_string();
        let mut child = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("exec 3<{fs}; exec sleep 5"))
            .spawn()
            .unwrap();
        let found = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            holders(std::slice::from_ref(&fs))
                .iter()
                .any(|h| h.pid == child.id() && h.how == ["fd"])
        });
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        assert!(found);
    }
}
