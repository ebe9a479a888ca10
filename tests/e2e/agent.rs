//! Scenario: the guest agent in real QEMU guests (software emulation): it boots as /init into an
//! ext4 root disk, answers ping, hash and exec, survives malformed input, and after the host
//! rewrites a block behind the guest's back, a notice makes the guest read the new bytes.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use agent_proto::frame::{self, Decoder};
use agent_proto::{
    AgentLink, ClientError, Command, ErrorCode, ExecRequest, Range, Response, SubstitutionNotice,
};
use anyhow::Context;
use imagefs_tests::qemu::{build_rootfs, file_blocks, guest_artifacts, Disk, Qemu};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

fn blake3_hex(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

fn sh(line: &str, timeout_ms: u64) -> ExecRequest {
    ExecRequest {
        command: Command::Shell(line.into()),
        timeout_ms,
    }
}

/// Sends raw bytes on the agent socket and returns the first reply frame decoded.
fn raw_exchange(socket: &Path, bytes: &[u8]) -> anyhow::Result<(u32, Response)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(bytes)?;
    let mut d = Decoder::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf)?;
        anyhow::ensure!(n > 0, "agent socket closed");
        d.push(&buf[..n]);
        if let Some(Ok(f)) = d.next_frame() {
            return Ok((f.id, Response::from_frame(&f)?));
        }
    }
}

fn error_code(r: &Response) -> Option<ErrorCode> {
    match r {
        Response::Error(e) => Some(e.code),
        _ => None,
    }
}

#[test]
fn agent_boots_as_init_and_answers_ping_hash_exec() {
    let (kernel, initrd) = match guest_artifacts() {
        Ok(a) => a,
        Err(why) => imagefs_tests::skip!("{why}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let version = b"app 1.0\n";
    let root = build_rootfs(dir.path(), 32, &[("/opt/app/version", version)]).unwrap();
    let data = build_rootfs(&dir.path().join("data"), 8, &[]).unwrap();
    let sock = dir.path().join("vm.agent");
    let mut vm = Qemu::start(
        &kernel,
        &initrd,
        &[Disk::rw(&root), Disk::rw(&data)],
        &sock,
        "agent.workload=\"exec sleep 1000\"",
    )
    .unwrap();
    let (pong, ready) = vm.wait_agent(BOOT_TIMEOUT).unwrap();
    eprintln!("boot to agent-ready under QEMU TCG: {ready:?}");
    assert!(pong.init_mode);
    assert!(pong.kernel.contains("cloud-amd64"), "{pong:?}");
    let root_mount = pong.mounts.iter().find(|m| m.mountpoint == "/").unwrap();
    assert_eq!(
        (root_mount.device.as_str(), root_mount.fstype.as_str()),
        ("/dev/vda", "ext4")
    );
    assert!(
        root_mount.read_only,
        "root must be mounted read-only by default"
    );

    let agent = vm.agent(Duration::from_secs(20));
    cli_passes_binary_output(vm.agent_socket()).unwrap();
    let h = agent.hash("/opt/app/version").unwrap();
    assert_eq!(
        (h.blake3, h.size),
        (blake3_hex(version), version.len() as u64)
    );
    match agent.hash("/opt/app/missing") {
        Err(ClientError::Agent {
            code: ErrorCode::NotFound,
            ..
        }) => {}
        other => panic!("hash of a missing file: {other:?}"),
    }

    let r = agent
        .exec(sh("cat /opt/app/version; echo oops >&2; exit 7", 5000))
        .unwrap();
    assert_eq!(
        (r.exit_code, r.stdout.as_bytes(), r.stderr.as_str()),
        (Some(7), &version[..], "oops\n")
    );
    let r = agent
        .exec(ExecRequest {
            command: Command::Argv(vec!["/bin/echo".into(), "a b".into()]),
            timeout_ms: 5000,
        })
        .unwrap();
    assert_eq!(r.stdout, "a b\n");
    let t = Instant::now();
    let r = agent.exec(sh("sleep 30", 500)).unwrap();
    assert!(r.timed_out && r.exit_code.is_none(), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "timeout not enforced: {:?}",
        t.elapsed()
    );

    // Malformed input gets an error reply and the agent keeps serving.
    let (id, resp) = raw_exchange(&sock, b"this is not a frame at all\n").unwrap();
    assert_eq!((id, error_code(&resp)), (0, Some(ErrorCode::Malformed)));
    let unknown = frame::encode(0x42, 77, b"{}").unwrap();
    let (id, resp) = raw_exchange(&sock, &unknown).unwrap();
    assert_eq!((id, error_code(&resp)), (77, Some(ErrorCode::UnknownType)));
    let bad_body = frame::encode(agent_proto::message::kind::HASH, 78, b"{\"path\":7}").unwrap();
    let (id, resp) = raw_exchange(&sock, &bad_body).unwrap();
    assert_eq!((id, error_code(&resp)), (78, Some(ErrorCode::BadRequest)));
    let mut oversized = frame::encode(1, 79, b"").unwrap();
    oversized[12..16].copy_from_slice(&(frame::MAX_PAYLOAD as u32 + 1).to_le_bytes());
    let sum = frame::checksum(&oversized[..20]);
    oversized[20..24].copy_from_slice(&sum.to_le_bytes());
    let (id, resp) = raw_exchange(&sock, &oversized).unwrap();
    assert_eq!((id, error_code(&resp)), (79, Some(ErrorCode::Oversized)));
    // A frame cut short: the agent gives up on it after a pause and still answers.
    let mut truncated = agent_proto::Request::Ping.to_frame(80).unwrap();
    truncated.truncate(10);
    let (_, resp) = raw_exchange(&sock, &truncated).unwrap();
    assert_eq!(error_code(&resp), Some(ErrorCode::Malformed));
    agent.ping().unwrap();

    // The configured workload runs in the root disk, and pid 1 (the agent) reaps orphans.
    let r = agent.exec(sh("ps", 5000)).unwrap();
    assert!(
        r.stdout.contains("sleep 1000"),
        "workload not running: {r:?}"
    );
    agent
        .exec(sh("sleep 0.2 & sleep 0.2 & echo", 5000))
        .unwrap();
    let zombies = "sleep 1; for s in /proc/[0-9]*/stat; do read -r l < $s; \
                   case \"$l\" in *\") Z \"*) echo \"$l\";; esac; done";
    let r = agent.exec(sh(zombies, 5000)).unwrap();
    assert_eq!(r.stdout, "", "unreaped children");

    // A notice for a filesystem the guest mounted read-write is refused.
    let r = agent
        .exec(sh("mount -o rw /dev/vdb /mnt && echo mounted", 10_000))
        .unwrap();
    assert_eq!(r.stdout, "mounted\n", "{r:?}");
    let notice = SubstitutionNotice::new(
        "/dev/vdb",
        vec![Range {
            offset: 0,
            len: 4096,
        }],
        vec![],
        false,
    );
    match agent.notice(&notice) {
        Err(ClientError::Agent {
            code: ErrorCode::Refused,
            message,
            ..
        }) => {
            assert!(message.contains("read-write"), "{message}")
        }
        other => panic!("notice for a rw filesystem: {other:?}"),
    }

    agent.shutdown().unwrap();
    assert!(
        vm.wait_exit(Duration::from_secs(30)),
        "guest did not power off"
    );
}

#[test]
fn notice_makes_the_guest_read_a_block_rewritten_behind_its_back() {
    let (kernel, initrd) = match guest_artifacts() {
        Ok(a) => a,
        Err(why) => imagefs_tests::skip!("{why}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (b"version=1\n", b"version=2\n");
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let root = build_rootfs(
        dir.path(),
        32,
        &[
            ("/opt/app/version", old),
            ("/opt/app/bin/busybox", &busybox),
        ],
    )
    .unwrap();
    let block = *file_blocks(&root, "/opt/app/version")
        .unwrap()
        .first()
        .unwrap();
    let sock = dir.path().join("vm.agent");
    let hook = "agent.hook./opt/app=/bin/true";
    let mut vm = Qemu::start(&kernel, &initrd, &[Disk::rw(&root)], &sock, hook).unwrap();
    let (_, ready) = vm.wait_agent(BOOT_TIMEOUT).unwrap();
    eprintln!("boot to agent-ready under QEMU TCG: {ready:?}");
    let agent = vm.agent(Duration::from_secs(20));

    // Guest reads (and caches) the old file; a process runs the app binary and holds the file.
    assert_eq!(
        agent.hash("/opt/app/version").unwrap().blake3,
        blake3_hex(old)
    );
    let r = agent
        .exec(sh(
            "exec 3</opt/app/version; /opt/app/bin/busybox sleep 600 </dev/null >/dev/null 2>&1 & echo $!",
            5000,
        ))
        .unwrap();
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    let server_pid: u32 = r.stdout.trim().parse().unwrap();

    // The host rewrites the file's data block in the image, behind the guest's back.
    let mut block_bytes = vec![0u8; 4096];
    block_bytes[..new.len()].copy_from_slice(new);
    let img = std::fs::OpenOptions::new().write(true).open(&root).unwrap();
    img.write_all_at(&block_bytes, block * 4096).unwrap();
    img.sync_data().unwrap();
    assert_eq!(
        agent.hash("/opt/app/version").unwrap().blake3,
        blake3_hex(old),
        "the guest's page cache should still hold the old bytes before the notice"
    );

    let notice = SubstitutionNotice::new(
        "/dev/vda",
        vec![Range {
            offset: block * 4096,
            len: 4096,
        }],
        vec!["/opt/app/version".into(), "/opt/app/bin/busybox".into()],
        false,
    );
    let t = Instant::now();
    let ack = agent.notice(&notice).unwrap();
    eprintln!(
        "notice round trip {:?}; agent steps: {:?}",
        t.elapsed(),
        ack.steps
    );
    assert_eq!(
        agent.hash("/opt/app/version").unwrap().blake3,
        blake3_hex(new)
    );

    let names: Vec<&str> = ack.steps.iter().map(|s| s.name.as_str()).collect();
    for step in [
        "sync",
        "blkflsbuf",
        "fadvise_dontneed",
        "scan_processes",
        "hooks",
    ] {
        assert!(names.contains(&step), "missing step {step}: {names:?}");
    }
    let server = ack
        .processes
        .iter()
        .find(|p| p.pid == server_pid && p.file == "/opt/app/bin/busybox")
        .unwrap_or_else(|| panic!("server process not listed: {:?}", ack.processes));
    assert!(
        server.how.iter().any(|h| h == "exe") && server.how.iter().any(|h| h == "maps"),
        "{server:?}"
    );
    assert!(
        ack.processes
            .iter()
            .any(|p| p.pid == server_pid && p.file == "/opt/app/version" && p.how == ["fd"]),
        "holder of the data file not listed: {:?}",
        ack.processes
    );
    assert_eq!(
        ack.stale_files,
        ["/opt/app/bin/busybox"],
        "the running binary's mapped pages stay cached; the data file's do not"
    );
    assert_eq!(ack.hooks.len(), 1, "{:?}", ack.hooks);
    assert_eq!(
        (ack.hooks[0].path.as_str(), ack.hooks[0].exit_code),
        ("/opt/app", Some(0))
    );

    // Without a file list (and with metadata changed) the agent drops the whole cache instead.
    let newer = b"version=3\n";
    block_bytes[..newer.len()].copy_from_slice(newer);
    img.write_all_at(&block_bytes, block * 4096).unwrap();
    img.sync_data().unwrap();
    assert_eq!(
        agent.hash("/opt/app/version").unwrap().blake3,
        blake3_hex(new)
    );
    let blind = SubstitutionNotice::new(
        "/dev/vda",
        vec![Range {
            offset: block * 4096,
            len: 4096,
        }],
        vec![],
        true,
    );
    let ack = agent.notice(&blind).unwrap();
    let names: Vec<&str> = ack.steps.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"drop_page_cache") && names.contains(&"drop_dentries_inodes"),
        "{names:?}"
    );
    assert_eq!(
        agent.hash("/opt/app/version").unwrap().blake3,
        blake3_hex(newer)
    );
}

#[test]
fn agent_without_a_root_disk_serves_from_the_initramfs() {
    let (kernel, initrd) = match guest_artifacts() {
        Ok(a) => a,
        Err(why) => imagefs_tests::skip!("{why}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.agent");
    let mut vm = Qemu::start(&kernel, &initrd, &[], &sock, "agent.root=none").unwrap();
    let (pong, ready) = vm.wait_agent(BOOT_TIMEOUT).unwrap();
    eprintln!("boot to agent-ready (no disk) under QEMU TCG: {ready:?}");
    assert!(pong.init_mode);
    assert!(
        !pong.mounts.iter().any(|m| m.device.starts_with("/dev/vd")),
        "{:?}",
        pong.mounts
    );
    let h = vm
        .agent(Duration::from_secs(10))
        .hash("/etc/guest-agent.conf")
        .unwrap();
    assert!(h.size > 0);
    cli_talks_to_the_agent(vm.agent_socket(), &h.blake3).unwrap();
}

/// `imagefs agent ...` against a live agent: output and exit codes a script relies on.
fn cli_talks_to_the_agent(socket: &Path, conf_hash: &str) -> anyhow::Result<()> {
    let imagefs = imagefs_tests::bin("imagefs");
    let sock = socket.to_str().context("socket path is not UTF-8")?;
    let run = |args: &[&str]| {
        std::process::Command::new(&imagefs)
            .arg("agent")
            .args(args)
            .output()
    };
    let wired = run(&["ping", "--socket", sock])
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !wired {
        if std::env::var("IMAGEFS_STRICT").as_deref() == Ok("1") {
            panic!("{} has no working `agent` subcommand", imagefs.display());
        }
        eprintln!(
            "*** imagefs agent CLI not available at {}: CLI checks not run ***",
            imagefs.display()
        );
        return Ok(());
    }
    let out = run(&["hash", "--socket", sock, "/etc/guest-agent.conf"])?;
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(conf_hash),
        "{out:?}"
    );
    let out = run(&["hash", "--socket", sock, "/no/such/file"])?;
    assert_eq!(out.status.code(), Some(3), "not found is exit 3: {out:?}");
    // The agent binary itself as the command: it rejects the flag with its usage exit code.
    let out = run(&["exec", "--socket", sock, "--", "/init", "--bogus-flag"])?;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown argument"),
        "{out:?}"
    );
    Ok(())
}

/// `imagefs agent exec` hands on output that is not UTF-8 byte for byte (needs a root disk
/// with /bin/sh and printf).
fn cli_passes_binary_output(socket: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new(imagefs_tests::bin("imagefs"))
        .args(["agent", "exec", "--socket"])
        .arg(socket)
        .args(["--shell", "printf 'a\\377\\000b'; printf '\\351' >&2"])
        .output()?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice()),
        (&b"a\xff\x00b"[..], &b"\xe9"[..])
    );
    Ok(())
}

/// The master side of a pseudo-terminal whose slave the agent serves as its "serial port".
struct Pty {
    master: std::fs::File,
    slave: std::path::PathBuf,
}

fn open_pty() -> anyhow::Result<Pty> {
    use std::os::fd::FromRawFd;
    // SAFETY: posix_openpt has no memory preconditions; the fd is checked before use.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) };
    anyhow::ensure!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor we own; File takes ownership and closes it.
    let master = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut name = [0u8; 128];
    // SAFETY: fd is a pty master; name is a writable buffer of the length given.
    let ok = unsafe {
        libc::grantpt(fd) == 0
            && libc::unlockpt(fd) == 0
            && libc::ptsname_r(fd, name.as_mut_ptr().cast(), name.len()) == 0
    };
    anyhow::ensure!(ok, "pty setup: {}", std::io::Error::last_os_error());
    let len = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    let slave = std::path::PathBuf::from(String::from_utf8_lossy(&name[..len]).into_owned());
    Ok(Pty { master, slave })
}

impl Pty {
    /// Sends `bytes` and returns the first reply frame with id `id`, skipping echoes and others.
    fn exchange(&mut self, bytes: &[u8], id: u32, timeout: Duration) -> Option<Response> {
        use std::os::fd::AsRawFd;
        self.master.write_all(bytes).ok()?;
        let deadline = Instant::now() + timeout;
        let mut d = Decoder::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            let mut p = libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: p is one valid pollfd for the call.
            if unsafe { libc::poll(&mut p, 1, 50) } <= 0 {
                continue;
            }
            let n = self.master.read(&mut buf).ok()?;
            d.push(&buf[..n]);
            while let Some(next) = d.next_frame() {
                let Ok(f) = next else { continue };
                if agent_proto::client::match_reply(id, &f) == agent_proto::client::ReplyMatch::Mine
                {
                    return Response::from_frame(&f).ok();
                }
            }
        }
        None
    }
}

#[test]
fn agent_serves_as_a_service_on_a_tty() {
    let agent_bin = imagefs_tests::bin("guest-agent");
    if !agent_bin.is_file() {
        imagefs_tests::skip!("{} not built", agent_bin.display());
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("guest-agent.conf");
    std::fs::write(&conf, "rootwait_ms=0\n").unwrap();
    let data = dir.path().join("data");
    std::fs::write(&data, b"served as a service\n").unwrap();
    let mut pty = open_pty().unwrap();
    let mut agent = std::process::Command::new(&agent_bin)
        .arg("--config")
        .arg(&conf)
        .arg("--device")
        .arg(&pty.slave)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _reap = KillOnDrop(&mut agent);

    // The agent drops input queued before its port was raw: retry the first ping.
    let mut id = 1;
    let pong = (0..50).find_map(|_| {
        id += 1;
        let ping = agent_proto::Request::Ping.to_frame(id).unwrap();
        pty.exchange(&ping, id, Duration::from_millis(200))
    });
    match pong {
        Some(Response::Pong(p)) => assert!(!p.init_mode, "{p:?}"),
        other => panic!("no pong from the service: {other:?}"),
    }
    let hash = agent_proto::Request::Hash {
        path: data.to_str().unwrap().into(),
    };
    match pty.exchange(&hash.to_frame(100).unwrap(), 100, Duration::from_secs(5)) {
        Some(Response::Hash(h)) => assert_eq!(h.blake3, blake3_hex(b"served as a service\n")),
        other => panic!("{other:?}"),
    }
    let exec = agent_proto::Request::Exec(sh("echo $((6*7))", 5000));
    match pty.exchange(&exec.to_frame(101).unwrap(), 101, Duration::from_secs(5)) {
        Some(Response::Exec(r)) => assert_eq!(r.stdout, "42\n"),
        other => panic!("{other:?}"),
    }
    let mut junk = b"\x00\x01garbage".to_vec();
    junk.extend(agent_proto::Request::Ping.to_frame(102).unwrap());
    match pty.exchange(&junk, 102, Duration::from_secs(5)) {
        Some(Response::Pong(_)) => {}
        other => panic!("no pong after garbage: {other:?}"),
    }
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
