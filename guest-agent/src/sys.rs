//! Thin, checked wrappers over the system calls the agent needs (mount, modules, ioctls, termios,
//! power-off). Invariant: every `unsafe` block in the agent lives here, each with its reason, and
//! every wrapper turns a failure into an `io::Error` naming what failed.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn check(ret: libc::c_int, what: &str) -> io::Result<()> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(())
    }
}

/// mount(2). `source`/`fstype` may be empty (moves and remounts).
pub fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> io::Result<()> {
    let (s, t, f) = (cstr(source)?, cstr(target)?, cstr(fstype)?);
    let fptr = if fstype.is_empty() {
        std::ptr::null()
    } else {
        f.as_ptr()
    };
    // SAFETY: all pointers are valid NUL-terminated strings (or null for fstype) that outlive the
    // call; data is null, which mount accepts.
    let ret = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), fptr, flags, std::ptr::null()) };
    check(ret, &format!("mount {source} on {target}"))
}

/// True when `path` is on a ramfs or tmpfs (what an initramfs is unpacked into).
pub fn is_ram_fs(path: &str) -> io::Result<bool> {
    let p = cstr(path)?;
    // SAFETY: statfs is plain old data; all-zero is valid and statfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: p is a valid NUL-terminated string and st a valid out-pointer for the call.
    check(unsafe { libc::statfs(p.as_ptr(), &mut st) }, "statfs")?;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let magic = st.f_type as i64;
    Ok(magic == RAMFS_MAGIC || magic == TMPFS_MAGIC)
}

/// Asks pid 1 to act on `signal` (systemd: SIGRTMIN+4 powers off, as `systemctl poweroff` does).
pub fn signal_init(signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory effects; pid 1 always exists.
    check(unsafe { libc::kill(1, signal) }, "kill pid 1")
}

/// chroot(2) into `dir`.
pub fn chroot(dir: &str) -> io::Result<()> {
    let d = cstr(dir)?;
    // SAFETY: d is a valid NUL-terminated string for the duration of the call.
    check(unsafe { libc::chroot(d.as_ptr()) }, "chroot")
}

/// Loads a kernel module from an open .ko file; an already loaded module is not an error.
pub fn finit_module(file: &File) -> io::Result<()> {
    let params = c"";
    // SAFETY: the fd is open for the whole call and params is a valid empty C string.
    let ret =
        unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// BLKFLSBUF: write back and drop the block device's buffer cache.
pub fn blkflsbuf(dev: &File) -> io::Result<()> {
    const BLKFLSBUF: libc::c_ulong = 0x1261; // _IO(0x12, 97)
                                             // SAFETY: BLKFLSBUF takes no argument; the fd is a block device open for the whole call.
    check(
        unsafe { libc::ioctl(dev.as_raw_fd(), BLKFLSBUF as _, 0) },
        "BLKFLSBUF",
    )
}

/// posix_fadvise(DONTNEED) over the whole file: drop its clean, unmapped cached pages.
pub fn fadvise_dontneed(file: &File) -> io::Result<()> {
    // SAFETY: the fd is open for the whole call; offset 0 and len 0 mean "the whole file".
    let ret = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// How many pages of `file` are in the page cache (mmap + mincore; the mapping is not touched,
/// so it faults nothing in).
pub fn resident_pages(file: &File) -> io::Result<usize> {
    let len = usize::try_from(file.metadata()?.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: sysconf has no memory effects.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let pages = len.div_ceil(page.max(1));
    // SAFETY: a fresh shared read-only mapping of an open file; no Rust reference aliases it and it
    // is unmapped below before returning.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mut vec = vec![0u8; pages];
    // SAFETY: addr..addr+len is the mapping made above; vec has one byte per page of it.
    let ret = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: addr and len are exactly the mapping made above, unmapped once.
    unsafe { libc::munmap(addr, len) };
    if ret != 0 {
        return Err(err);
    }
    Ok(vec.iter().filter(|b| *b & 1 == 1).count())
}

/// sync(2).
pub fn sync() {
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// Puts a tty into raw mode (no echo, no line discipline, 8N1, 115200 baud).
pub fn make_raw(tty: &File) -> io::Result<()> {
    let fd = tty.as_raw_fd();
    // SAFETY: termios is plain old data; all-zero is a valid value to be overwritten.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open tty and t a valid termios to fill.
    check(unsafe { libc::tcgetattr(fd, &mut t) }, "tcgetattr")?;
    // SAFETY: t is a valid termios obtained above.
    unsafe { libc::cfmakeraw(&mut t) };
    // Speed set through the CBAUD bits: static glibc lacks the versioned cfset*speed symbols.
    t.c_cflag = (t.c_cflag & !libc::CBAUD) | libc::B115200 | libc::CLOCAL | libc::CREAD;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: fd is an open tty and t a valid termios.
    let ret = unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
    check(ret, "tcsetattr")?;
    // SAFETY: fd is an open tty; dropping input queued before raw mode drops stale echo/garbage.
    check(unsafe { libc::tcflush(fd, libc::TCIFLUSH) }, "tcflush")
}

/// Waits until all output written to the tty has been transmitted.
pub fn drain(tty: &File) {
    // SAFETY: fd is an open tty for the whole call.
    unsafe { libc::tcdrain(tty.as_raw_fd()) };
}

/// Waits up to `timeout_ms` for `fd` to become readable; true when it is.
pub fn poll_readable(fd: libc::c_int, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: p is one valid pollfd for the whole call.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    n > 0 && (p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR)) != 0
}

/// Sets O_NONBLOCK on a descriptor.
pub fn set_nonblocking(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: F_GETFL on an fd we own has no memory effects.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    check(flags, "F_GETFL")?;
    // SAFETY: F_SETFL with flags read above plus O_NONBLOCK.
    check(
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) },
        "F_SETFL",
    )
}

/// Reaps every exited child without blocking (pid 1 inherits orphans), except `keep`, which the
/// caller waits for itself; returns how many were reaped.
pub fn reap_children(keep: Option<u32>) -> usize {
    let mut n = 0;
    loop {
        // SAFETY: siginfo_t is plain old data; all-zero is valid and waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // Peek (WNOWAIT) at an exited child without reaping it, so `keep` is left alone.
        // SAFETY: info is a valid out-pointer; WNOHANG never blocks.
        let ret = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        let pid = if ret == 0 {
            // SAFETY: waitid succeeded, so info holds a SIGCHLD siginfo (si_pid 0: none exited).
            unsafe { info.si_pid() }
        } else {
            0
        };
        if pid <= 0 || u32::try_from(pid).ok() == keep {
            return n;
        }
        let mut status = 0;
        // SAFETY: status is a valid out-pointer; pid has exited, so this does not block.
        unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        n += 1;
    }
}

/// Sends SIGKILL to a whole process group.
pub fn kill_group(pgid: u32) {
    if let Ok(p) = libc::pid_t::try_from(pgid) {
        // SAFETY: kill with a negative pid signals a process group; no memory is touched.
        unsafe { libc::kill(-p, libc::SIGKILL) };
    }
}

/// Powers the machine off (pid 1 only; the caller has synced).
pub fn power_off() -> io::Error {
    // SAFETY: reboot with RB_POWER_OFF has no memory effects; it returns only on failure.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    io::Error::last_os_error()
}

/// The kernel release (uname -r).
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain old data; all-zero is valid and uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid utsname for the call.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Redirects stdin, stdout and stderr to `path` (pid 1 starts without them when the initramfs
/// has no /dev/console node).
pub fn redirect_stdio(path: &Path) -> io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    for target in 0..3 {
        // SAFETY: both fds are valid; dup2 atomically replaces the target.
        check(unsafe { libc::dup2(f.as_raw_fd(), target) }, "dup2")?;
    }
    Ok(())
}
