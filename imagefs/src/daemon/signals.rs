//! Process plumbing for the daemon: SIGINT/SIGTERM/SIGHUP become a clean unmount (taken by one
//! thread with sigwait, blocked everywhere else), and `--daemon` detaches after the mount is up.
//! Invariant: the parent of a detached daemon exits 0 only once the child reports the mount up.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Arc;

use crate::mount::lifecycle::Lifecycle;

/// The blocked stop signals, to be waited for by one thread.
#[derive(Debug)]
pub struct StopSignals(libc::sigset_t);

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it starts later).
pub fn block_stop_signals() -> std::io::Result<StopSignals> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(StopSignals(set))
}

/// Starts the thread that turns a stop signal into an unmount.
pub fn spawn_stop_thread(signals: StopSignals, life: Arc<Lifecycle>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: the set is initialised and blocked in this thread; `sig` is writable.
            let rc = unsafe { libc::sigwait(&signals.0, &mut sig) };
            if rc != 0 {
                continue;
            }
            tracing::info!(signal = sig, "stop signal: unmounting");
            // A plain unmount first; files still open (a VM) force a lazy detach, since the
            // operator asked the daemon to go.
            if let Err(e) = super::request_unmount(&life, false) {
                tracing::warn!(error = %e, "unmount refused; detaching lazily");
                if let Err(e) = super::request_unmount(&life, true) {
                    tracing::error!(error = %e, "lazy unmount failed");
                }
            }
        })
        .map(drop)
}

/// The child's side of the readiness pipe.
#[derive(Debug)]
pub struct Ready(std::sync::Mutex<Option<File>>);

impl Ready {
    fn send(&self, msg: &str) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut f) = slot.take() {
            let _ = f.write_all(msg.as_bytes());
        }
    }

    /// Tells the parent the mount is up.
    pub fn ok(&self) {
        self.send("ok\n");
    }

    /// Tells the parent the daemon failed, and why.
    pub fn fail(&self, why: &str) {
        self.send(&format!("error: {why}\n"));
    }
}

/// Which side of the fork this is.
#[derive(Debug)]
pub enum Forked {
    /// The parent: the child's verdict once the mount is up or failed.
    Parent(Result<(), String>),
    /// The child: report readiness through this.
    Child(Ready),
}

/// Forks; the child starts a new session with stdio on /dev/null and stderr appended to
/// `STORE/daemon.log`. Must run before any thread is started.
pub fn daemonize(store_dir: &Path) -> std::io::Result<Forked> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors that nothing else owns.
    let (read_end, write_end) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(store_dir.join("daemon.log"))?;
    // SAFETY: no other thread runs yet (the caller's contract), so the child may keep running
    // Rust code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid > 0 {
        drop(write_end);
        let mut answer = String::new();
        let mut r = read_end;
        let _ = r.read_to_string(&mut answer);
        let verdict = match answer.lines().next() {
            Some("ok") => Ok(()),
            Some(line) => Err(line.trim_start_matches("error: ").to_string()),
            None => Err("the daemon exited before mounting (see daemon.log)".to_string()),
        };
        return Ok(Forked::Parent(verdict));
    }
    drop(read_end);
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    use std::os::fd::AsRawFd;
    // SAFETY: setsid/dup2 act on this process and descriptors it owns.
    unsafe {
        libc::setsid();
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(null.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
    }
    Ok(Forked::Child(Ready(std::sync::Mutex::new(Some(write_end)))))
}
