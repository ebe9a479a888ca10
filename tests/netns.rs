//! Hosts as Linux network namespaces, for fleet tests on one machine: one bridge in the root
//! namespace with no address of its own, one namespace per host joined to it by a veth pair,
//! addresses on a private /24 only inside those namespaces (each with lo up). Programs run in a
//! host's namespace through `nsenter --net` (network only: a FUSE mount made there stays visible
//! to the whole machine, unlike `ip netns exec`, which also makes a private mount namespace).
//! A host's link can be cut and restored (its root-side veth set down/up), as a partition.
//!
//! Invariant: everything a `Net` makes is named `imf<PID>x<K>...` (PID this process, K a
//! counter, so tests running at once in one process do not clash); drop removes what it made
//! and ends what still runs in its namespaces; `Net::create` first removes what a killed earlier
//! run (a PID that no longer runs) left behind.

use std::ffi::OsString;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Every interface and namespace name a `Net` makes starts with this, then the owner's pid.
const PREFIX: &str = "imf";

/// Why fleet namespace tests cannot run here, if they cannot: root, `ip` (iproute2) and
/// `nsenter` (util-linux) are needed. Use with `skip!`.
pub fn missing() -> Option<String> {
    if !crate::is_root() {
        return Some("network namespaces need root".into());
    }
    let gone: Vec<&str> = [
        ("ip", "ip (package iproute2)"),
        ("nsenter", "nsenter (package util-linux)"),
    ]
    .into_iter()
    .filter(|(t, _)| crate::tool(t).is_none())
    .map(|(_, what)| what)
    .collect();
    (!gone.is_empty()).then(|| format!("needs {} (make setup)", gone.join(", ")))
}

/// One host: its namespace's name and its address on the bridge.
#[derive(Debug, Clone)]
pub struct NsHost {
    /// The short name the test gave it (h1, op, ...).
    pub name: String,
    /// The namespace's name (under /var/run/netns).
    pub ns: String,
    /// Its IPv4 address on the bridge.
    pub ip: String,
    /// The root namespace's end of its veth pair (on the bridge).
    veth: String,
}

impl NsHost {
    /// The namespace's file, as `nsenter --net=` takes it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.ns)
    }

    /// The words that run a program in this namespace: `nsenter --net=PATH --`. nsenter does not
    /// fork (no pid namespace is entered), so a child's pid is the program's own.
    pub fn prefix(&self) -> Vec<OsString> {
        let nsenter = crate::tool("nsenter").unwrap_or_else(|| PathBuf::from("nsenter"));
        let mut net = OsString::from("--net=");
        net.push(self.path());
        vec![nsenter.into_os_string(), net, "--".into()]
    }

    /// A command running `program` inside this namespace.
    pub fn command(&self, program: impl Into<OsString>) -> Command {
        let p = self.prefix();
        let mut c = Command::new(&p[0]);
        c.args(&p[1..]).arg(program.into());
        c
    }

    /// Runs `f` on a thread of this process that has joined the namespace (setns is per
    /// thread), e.g. to probe a listener there: the test's own threads stay where they are.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = std::fs::File::open(&path)
                    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                // SAFETY: a valid namespace fd; setns changes only this thread's namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "setns {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// True when a TCP connection to `addr` from inside this namespace succeeds within 1 s.
    pub fn can_connect(&self, addr: &str) -> bool {
        let Ok(sa) = addr.parse::<std::net::SocketAddr>() else {
            return false;
        };
        self.within(|| std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(1)).is_ok())
    }
}

/// A bridge and the host namespaces on it; removed on drop.
pub struct Net {
    /// imf<PID>x<K>: every name below starts with it.
    base: String,
    bridge: String,
    /// The third octet of 10.213.X.0/24.
    subnet: u8,
    hosts: Vec<NsHost>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`; Err with its stderr when it fails.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = crate::tool_command("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Like `ip`, but a failure fails the test.
fn ip_ok(args: &[&str]) -> String {
    ip(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Turns IPv6 off on a root-namespace interface, so it gets no link-local address either: the
/// root namespace keeps no address on the test's network. (No IPv6 in the kernel: nothing to do.)
fn no_ipv6(dev: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
}

/// The pid a name made by a `Net` carries, if it is one of ours.
fn owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() || !rest[digits.len()..].starts_with('x') {
        return None;
    }
    digits.parse().ok()
}

/// True when `pid` no longer runs (so what it named is stale).
fn is_gone(pid: u32) -> bool {
    pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Ends the processes still in namespace `ns` (all started by the test that made it): SIGTERM,
/// then SIGKILL for those still there after 3 s.
fn end_processes_in(ns: &str) {
    let pids = |ns: &str| -> Vec<i32> {
        ip(&["netns", "pids", ns])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let first = pids(ns);
    if first.is_empty() {
        return;
    }
    for &p in &first {
        // SAFETY: kill has no memory preconditions; the pid is a process in the test's namespace.
        unsafe { libc::kill(p, libc::SIGTERM) };
    }
    if !crate::wait_until(Duration::from_secs(3), || pids(ns).is_empty()) {
        for p in pids(ns) {
            // SAFETY: as above.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        crate::wait_until(Duration::from_secs(3), || pids(ns).is_empty());
    }
}

/// Removes the namespaces and interfaces left by earlier runs whose process is gone.
fn remove_stale() {
    for line in ip(&["netns", "list"]).unwrap_or_default().lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        if owner(ns).is_some_and(is_gone) {
            eprintln!("netns: removing namespace {ns} left by an earlier run");
            end_processes_in(ns);
            let _ = ip(&["netns", "del", ns]);
        }
    }
    // Lines like "12: imf123x0v1@if2: <...>": the name is the second word, up to '@' or ':'.
    for line in ip(&["-o", "link", "show"]).unwrap_or_default().lines() {
        let Some(word) = line.split_whitespace().nth(1) else {
            continue;
        };
        let dev = word.trim_end_matches(':').split('@').next().unwrap_or("");
        if owner(dev).is_some_and(is_gone) {
            eprintln!("netns: removing link {dev} left by an earlier run");
            let _ = ip(&["link", "del", dev]);
        }
    }
}

impl Net {
    /// A new bridge with no address (up), after removing what killed earlier runs left.
    /// Call `missing()` first: this panics when `ip` fails.
    pub fn create() -> Net {
        remove_stale();
        let pid = std::process::id();
        let k = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(
            k < 10,
            "at most 10 Nets per process (interface names <= 15 bytes)"
        );
        let base = format!("{PREFIX}{pid}x{k}");
        let bridge = format!("{base}br");
        ip_ok(&["link", "add", &bridge, "type", "bridge"]);
        let net = Net {
            subnet: ((pid % 50) * 5 + k % 5 + 1) as u8,
            base,
            bridge,
            hosts: Vec::new(),
        };
        no_ipv6(&net.bridge);
        ip_ok(&["link", "set", &net.bridge, "up"]);
        net
    }

    /// A new host namespace `name` on the bridge with the next address of the subnet.
    pub fn host(&mut self, name: &str) -> NsHost {
        let i = self.hosts.len() + 1;
        assert!(
            i < 10,
            "at most 9 hosts per Net (interface names <= 15 bytes)"
        );
        let h = NsHost {
            name: name.to_string(),
            ns: format!("{}-{name}", self.base),
            ip: format!("10.213.{}.{}", self.subnet, i + 1),
            veth: format!("{}v{i}", self.base),
        };
        // Recorded first, so drop removes it even when a step below fails.
        self.hosts.push(h.clone());
        ip_ok(&["netns", "add", &h.ns]);
        ip_ok(&[
            "link", "add", &h.veth, "type", "veth", "peer", "name", "eth0", "netns", &h.ns,
        ]);
        no_ipv6(&h.veth);
        ip_ok(&["link", "set", &h.veth, "master", &self.bridge, "up"]);
        let cidr = format!("{}/24", h.ip);
        ip_ok(&["-n", &h.ns, "addr", "add", &cidr, "dev", "eth0"]);
        ip_ok(&["-n", &h.ns, "link", "set", "eth0", "up"]);
        ip_ok(&["-n", &h.ns, "link", "set", "lo", "up"]);
        h
    }

    /// Cuts the host's link (its veth on the bridge goes down): nothing reaches it, nothing
    /// leaves it, and connections in flight hang until their deadlines.
    pub fn cut(&self, h: &NsHost) {
        ip_ok(&["link", "set", &h.veth, "down"]);
    }

    /// Brings a cut link back up.
    pub fn restore(&self, h: &NsHost) {
        ip_ok(&["link", "set", &h.veth, "up"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            end_processes_in(&h.ns);
            let _ = ip(&["link", "del", &h.veth]);
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
