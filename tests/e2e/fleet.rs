//! Scenario module: fleet (issue 13, first slice). Real daemons (real FUSE mounts, root needed)
//! serving their commands over TCP with mutual TLS on loopback, each with its own store and
//! host certificate from `imagefs fleet cert`; an operator store with the fleet CA.
//! `fleet status --json` shows every host's versions and instances, marks a stopped host and a
//! host that never answers as unreachable within its deadline, and exits 0. Refusals, each
//! checked against the daemon's state and log: a client certificate of another CA, a host's
//! own certificate (serverAuth only) and no certificate are refused in the handshake and run
//! nothing; a command outside the fleet's list is exit 2 and runs nothing; `--listen` without
//! `--tls-dir` is exit 2; a host added as host-1 whose certificate says host-2 is refused by
//! the client; 32 silent connections take every slot of the listener, a 33rd is closed, and
//! the daemon serves again once they go.

// Test code: a failed unwrap is a failed test with its reason.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imagefs_tests::{bin, is_root, noise, skip, wait_until};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

const BS: usize = 4096;

/// What the daemon logs at info level from the fleet listener (and warnings elsewhere).
const DAEMON_LOG: &str = "warn,imagefs::daemon::tls=info,sled=off,fuser::session=error";

fn imagefs(store: &Path, args: &[&str]) -> Output {
    Command::new(bin("imagefs"))
        .arg("--store")
        .arg(store)
        .args(args)
        .env_remove("IMAGEFS_FAULT")
        .output()
        .unwrap()
}

fn ok(store: &Path, args: &[&str]) -> Output {
    let out = imagefs(store, args);
    assert!(
        out.status.success(),
        "imagefs {args:?} failed ({:?}): {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The last JSON line of `out` (the result object).
fn result(out: &Output) -> Value {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .next_back()
        .unwrap_or(Value::Null)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(p.as_ref()))
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The operator's store with a fleet CA.
struct Operator {
    dir: tempfile::TempDir,
    store: PathBuf,
}

impl Operator {
    fn new() -> Operator {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("operator");
        ok(&store, &["init"]);
        ok(&store, &["fleet", "ca", "init"]);
        Operator { dir, store }
    }

    fn fleet(&self, f: &str) -> PathBuf {
        self.store.join("fleet").join(f)
    }

    /// `fleet cert NAME --out DIR` into a fresh directory.
    fn host_files(&self, name: &str) -> PathBuf {
        let out = self.dir.path().join(format!("tls-{name}"));
        ok(
            &self.store,
            &["fleet", "cert", name, "--out", out.to_str().unwrap()],
        );
        out
    }

    fn add(&self, name: &str, addr: &str) {
        ok(&self.store, &["fleet", "add", name, addr]);
    }

    /// `fleet status --json --timeout T`: its result, exit code and how long it took. A status
    /// still running after 30 s is killed and fails the test (it must keep its deadline).
    fn status(&self, timeout: &str) -> (Value, i32, Duration) {
        let start = Instant::now();
        let mut child = Command::new(bin("imagefs"))
            .arg("--store")
            .arg(&self.store)
            .args(["--json", "fleet", "status", "--timeout", timeout])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let done = wait_until(Duration::from_secs(30), || {
            child.try_wait().unwrap().is_some()
        });
        if !done {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let took = start.elapsed();
        assert!(
            done,
            "fleet status --timeout {timeout} still ran after {took:?}"
        );
        (result(&out), out.status.code().unwrap_or(-1), took)
    }
}

/// One host: a store with app:v1 and app:v2 and instances on v1, mounted by a daemon that
/// listens on a loopback port with the host's TLS files.
struct Host {
    dir: tempfile::TempDir,
    store: PathBuf,
    mnt: PathBuf,
    port: u16,
    daemon: Option<Child>,
}

impl Host {
    fn new(instances: &[&str]) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        ok(&store, &["init"]);
        let v1 = noise("fleet-app", 16 * BS);
        let mut v2 = v1.clone();
        v2[3 * BS..4 * BS].copy_from_slice(&noise("fleet-patch", BS));
        for (tag, bytes) in [("app:v1", &v1), ("app:v2", &v2)] {
            let f = dir.path().join(tag.replace(':', "-"));
            std::fs::write(&f, bytes).unwrap();
            ok(
                &store,
                &["import", f.to_str().unwrap(), tag, "--block-size", "4096"],
            );
        }
        for i in instances {
            ok(&store, &["instance", "create", "app:v1", i]);
        }
        Host {
            dir,
            store,
            mnt,
            port: free_port(),
            daemon: None,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.stderr")).unwrap_or_default()
    }

    /// Starts the daemon (a foreground child) serving with the TLS files in `tls`.
    fn start(&mut self, tls: &Path) {
        let log = File::create(self.dir.path().join("daemon.stderr")).unwrap();
        let child = Command::new(bin("imagefs"))
            .arg("--store")
            .arg(&self.store)
            .arg("mount")
            .arg(&self.mnt)
            .args(["--listen", &self.addr(), "--tls-dir"])
            .arg(tls)
            .env("IMAGEFS_LOG", DAEMON_LOG)
            .env_remove("IMAGEFS_FAULT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        let (mnt, addr) = (self.mnt.clone(), self.addr());
        assert!(
            wait_until(Duration::from_secs(15), || is_mounted(&mnt)
                && TcpStream::connect(&addr).is_ok()),
            "daemon did not come up: {}",
            self.log()
        );
    }

    /// `imagefs umount`: the daemon exits 0 and its port closes.
    fn stop(&mut self) {
        ok(&self.store, &["umount", self.mnt.to_str().unwrap()]);
        let status = self.daemon.take().unwrap().wait().unwrap();
        assert!(status.success(), "daemon exit {status}: {}", self.log());
    }

    /// The instances and their base versions, from the daemon through the control socket.
    fn bases(&self) -> Vec<(String, String)> {
        let out = ok(&self.store, &["--json", "instance", "ls"]);
        let mut v: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| {
                (
                    v["instance"].as_str().unwrap().to_string(),
                    v["base"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        v.sort();
        v
    }

    fn version(&self, spec: &str) -> String {
        let out = ok(&self.store, &["--json", "ls"]);
        let r = result(&out);
        let (name, tag) = spec.split_once(':').unwrap();
        r["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .map(|i| i["tags"][tag].as_str().unwrap().to_string())
            .unwrap()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mnt) {
            let c = std::ffi::CString::new(self.mnt.to_string_lossy().as_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path; umount2 has no other preconditions.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// What a raw TLS client got from a daemon: its answer lines, and its exit code if it gave one
/// (`Err` when the connection failed, e.g. the daemon refused our certificate).
type Raw = Result<(String, i32), String>;

/// Sends `argv` to `addr` as a client of our own making: trusting `ca` (and checking the host
/// as `name`), presenting `identity` (cert, key) or no certificate at all.
fn raw_call(
    addr: &str,
    name: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    argv: &[&str],
) -> Raw {
    raw_call_upload(addr, name, ca, identity, argv, None)
}

/// `raw_call` with `upload` sent as the request's upload frame after its line.
fn raw_call_upload(
    addr: &str,
    name: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    argv: &[&str],
    upload: Option<&[u8]>,
) -> Raw {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let chain: Vec<_> = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let conn = rustls::ClientConnection::new(
        Arc::new(config),
        ServerName::try_from(name.to_string()).unwrap(),
    )
    .unwrap();
    let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut full = vec!["imagefs"];
    full.extend_from_slice(argv);
    let mut req = serde_json::json!({ "argv": full });
    if let Some(u) = upload {
        req["upload"] = serde_json::json!(u.len());
    }
    let line = req.to_string() + "\n";
    tls.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    if let Some(u) = upload {
        tls.write_all(u).map_err(|e| e.to_string())?;
    }
    tls.flush().map_err(|e| e.to_string())?;
    let mut text = String::new();
    for l in BufReader::new((&mut tls).take(1 << 20)).lines() {
        let l = l.map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&l).map_err(|e| e.to_string())?;
        if let Some(code) = v.get("exit").and_then(Value::as_i64) {
            return Ok((text, code as i32));
        }
        text.push_str(v["out"].as_str().or(v["err"].as_str()).unwrap_or(""));
    }
    Err("hung up without an exit code".into())
}

#[test]
fn fleet_status_shows_every_host_and_marks_the_unreachable_within_its_deadline() {
    if !is_root() {
        skip!("needs root for FUSE mounts");
    }
    let op = Operator::new();
    // The operator's fleet files are the operator's alone.
    assert_eq!(mode(&op.store.join("fleet")), 0o700);
    for f in ["ca.pem", "ca.key", "operator.pem", "operator.key"] {
        assert_eq!(mode(&op.fleet(f)), 0o600, "{f}");
    }
    let tls1 = op.host_files("host-1");
    let tls2 = op.host_files("host-2");
    assert_eq!(mode(&tls1), 0o700);
    assert_eq!(mode(&tls1.join("key.pem")), 0o600);

    let mut h1 = Host::new(&["web-1"]);
    let mut h2 = Host::new(&["web-2", "web-3"]);
    h1.start(&tls1);
    h2.start(&tls2);
    op.add("host-1", &h1.addr());
    op.add("host-2", &h2.addr());
    // A host that takes connections and never says a word: only the deadline ends it.
    let mute = TcpListener::bind("127.0.0.1:0").unwrap();
    op.add("host-3", &mute.local_addr().unwrap().to_string());

    let (r, code, took) = op.status("3s");
    assert_eq!(code, 0, "{r}");
    println!("FLEET status of 3 hosts (one mute, --timeout 3s): {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let hosts = r["hosts"].as_array().unwrap();
    let names: Vec<&str> = hosts.iter().map(|h| h["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["host-1", "host-2", "host-3"]);
    for (h, host, want) in [
        (&hosts[0], &h1, vec!["web-1"]),
        (&hosts[1], &h2, vec!["web-2", "web-3"]),
    ] {
        assert_eq!(h["reachable"], true, "{h}");
        assert_eq!(h["imagefs"], env!("CARGO_PKG_VERSION"), "{h}");
        let mut versions: Vec<&str> = h["versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap())
            .collect();
        versions.sort();
        let mut local = vec![host.version("app:v1"), host.version("app:v2")];
        local.sort();
        assert_eq!(versions, local, "{h}");
        let mut inst: Vec<(String, String)> = h["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["instance"].as_str().unwrap().to_string(),
                    i["base"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        inst.sort();
        assert_eq!(inst, host.bases(), "{h}");
        assert_eq!(inst.iter().map(|i| i.0.as_str()).collect::<Vec<_>>(), want);
        assert!(inst.iter().all(|i| i.1 == host.version("app:v1")));
        assert_eq!(h["vms"], serde_json::json!([]), "{h}");
    }
    assert_eq!(hosts[2]["reachable"], false);
    assert!(
        hosts[2]["error"].as_str().unwrap().contains("deadline"),
        "{}",
        hosts[2]
    );
    assert_eq!(
        (r["reachable"].as_u64(), r["unreachable"].as_u64()),
        (Some(2), Some(1))
    );

    // Host 2 stops: marked unreachable, the others as before, exit 0.
    h2.stop();
    let (r, code, took) = op.status("3s");
    assert_eq!(code, 0, "{r}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let hosts = r["hosts"].as_array().unwrap();
    assert_eq!(hosts[0]["reachable"], true, "{}", hosts[0]);
    assert_eq!(hosts[1]["reachable"], false, "{}", hosts[1]);
    assert!(
        hosts[1]["error"].as_str().unwrap().contains("connect"),
        "{}",
        hosts[1]
    );
    assert_eq!(hosts[2]["reachable"], false);
    // The text form says the same.
    let text = ok(&op.store, &["fleet", "status", "--timeout", "2s"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("host-2") && l.contains("UNREACHABLE")),
        "{text}"
    );
    drop(mute);
    h1.stop();
}

#[test]
fn the_fleet_transport_refuses_strangers_hosts_and_unlisted_commands() {
    if !is_root() {
        skip!("needs root for FUSE mounts");
    }
    let op = Operator::new();
    let tls1 = op.host_files("host-1");
    let tls2 = op.host_files("host-2");
    // Another fleet, with its own CA: its operator and hosts are strangers here.
    let other = Operator::new();
    let mut h = Host::new(&["web-a", "web-b", "web-c", "web-d"]);

    // --listen without --tls-dir: a usage error, nothing mounted.
    let out = imagefs(
        &h.store,
        &["mount", h.mnt.to_str().unwrap(), "--listen", &h.addr()],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&h.mnt));

    h.start(&tls1);
    let addr = h.addr();
    let ca = op.fleet("ca.pem");
    let v1 = h.version("app:v1");
    let v2 = h.version("app:v2");
    let operator = (op.fleet("operator.pem"), op.fleet("operator.key"));
    let stranger = (other.fleet("operator.pem"), other.fleet("operator.key"));
    let host2 = (tls2.join("cert.pem"), tls2.join("key.pem"));
    let call = |id: Option<&(PathBuf, PathBuf)>, argv: &[&str]| {
        raw_call(
            &addr,
            "host-1",
            &ca,
            id.map(|(c, k)| (c.as_path(), k.as_path())),
            argv,
        )
    };

    let refusals = |log: &str| {
        log.lines()
            .filter(|l| l.contains("refused a connection in the TLS handshake"))
            .count()
    };
    // (start's probe, a bare connect, was one.)
    let refused_before = refusals(&h.log());
    // Refused in the handshake, each: the substitution they ask for never runs.
    for (who, id, inst) in [
        (
            "a certificate of another fleet's CA",
            Some(&stranger),
            "web-a",
        ),
        (
            "a host's certificate (serverAuth only)",
            Some(&host2),
            "web-b",
        ),
        ("no certificate", None, "web-c"),
    ] {
        let got = call(id, &["substitute", inst, "app:v2"]);
        assert!(got.is_err(), "{who}: the daemon answered {got:?}");
        println!("FLEET refused {who}: {}", got.unwrap_err());
    }
    // The operator's own certificate: the same request runs.
    let got = call(Some(&operator), &["substitute", "web-d", "app:v2"]);
    assert!(matches!(&got, Ok((_, 0))), "{got:?}");
    let bases = h.bases();
    assert_eq!(
        bases,
        [
            ("web-a".to_string(), v1.clone()),
            ("web-b".to_string(), v1.clone()),
            ("web-c".to_string(), v1.clone()),
            ("web-d".to_string(), v2.clone()),
        ]
    );
    let log = h.log();
    let ran: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("fleet: command"))
        .collect();
    assert_eq!(refusals(&log) - refused_before, 3, "{log}");
    assert_eq!(ran.len(), 1, "{log}");
    assert!(ran[0].contains("web-d"), "{log}");

    // Commands outside the fleet's list: exit 2, and they did nothing.
    for argv in [
        vec!["gc"],
        vec!["rm", "app:v1"],
        vec!["--json", "instance", "rm", "web-a"],
        vec!["export", "app:v1", "/tmp/imagefs-fleet-export.raw"],
        // apply reads only a bundle that came in the request's own upload frame
        vec!["apply", "/etc/passwd"],
        vec!["apply", "fleet-uploads/upload-1-1.bundle"],
    ] {
        let got = call(Some(&operator), &argv);
        match &got {
            Ok((text, 2)) => assert!(
                text.contains("not served over the fleet"),
                "{argv:?}: {text}"
            ),
            other => panic!("{argv:?}: expected exit 2, got {other:?}"),
        }
    }
    assert_eq!(h.version("app:v1"), v1);
    assert_eq!(h.bases().len(), 4);
    assert!(!Path::new("/tmp/imagefs-fleet-export.raw").exists());
    // An upload frame: refused unless argv names it exactly once; spooled only for the
    // command, and what it holds is parsed as a bundle (garbage is an error, nothing applied).
    let upload = |argv: &[&str], bytes: &[u8]| {
        let (c, k) = &operator;
        raw_call_upload(&addr, "host-1", &ca, Some((c, k)), argv, Some(bytes))
    };
    let got = upload(&["--json", "ls"], b"junk");
    assert!(
        matches!(&got, Ok((t, 2)) if t.contains("exactly one @upload")),
        "{got:?}"
    );
    let got = upload(&["apply", "@upload"], b"not a bundle at all");
    assert!(
        matches!(&got, Ok((t, c)) if *c != 0 && !t.contains("not served")),
        "{got:?}"
    );
    let spool = h.store.join("fleet-uploads");
    assert_eq!(
        std::fs::read_dir(&spool).unwrap().count(),
        0,
        "upload left in {spool:?}"
    );
    assert_eq!(h.version("app:v1"), v1);
    // And one on the list answers.
    let got = call(Some(&operator), &["--json", "ls"]);
    assert!(matches!(&got, Ok((t, 0)) if t.contains(&v1)), "{got:?}");

    // A host added as host-1 whose certificate says host-2: the client refuses it. The same
    // daemon added under the name its certificate does carry is reachable.
    let mut h2 = Host::new(&[]);
    h2.start(&tls2);
    op.add("host-1", &h2.addr());
    op.add("host-2", &h2.addr());
    let (r, code, _) = op.status("5s");
    assert_eq!(code, 0, "{r}");
    let hosts = r["hosts"].as_array().unwrap();
    assert_eq!(hosts[0]["name"], "host-1");
    assert_eq!(hosts[0]["reachable"], false, "{}", hosts[0]);
    let why = hosts[0]["error"].as_str().unwrap();
    assert!(why.contains("not valid for name"), "{why}");
    assert_eq!(hosts[1]["reachable"], true, "{}", hosts[1]);
    // The stranger fleet's operator does not even trust our hosts.
    other.add("host-1", &addr);
    let (r, _, _) = other.status("5s");
    assert_eq!(r["hosts"][0]["reachable"], false, "{r}");
    h2.stop();
    h.stop();
}

#[test]
fn the_fleet_listener_serves_a_bounded_number_of_connections() {
    if !is_root() {
        skip!("needs root for FUSE mounts");
    }
    let op = Operator::new();
    let tls = op.host_files("host-1");
    let mut h = Host::new(&[]);
    h.start(&tls);
    let (addr, ca) = (h.addr(), op.fleet("ca.pem"));
    let (cert, key) = (op.fleet("operator.pem"), op.fleet("operator.key"));
    let call = || raw_call(&addr, "host-1", &ca, Some((&cert, &key)), &["status"]);
    assert!(matches!(call(), Ok((_, 0))), "{:?}", call());
    // 32 connections that never say a word hold every slot (the daemon accepts in order, so the
    // next one is the 33rd it sees)...
    let silent: Vec<TcpStream> = (0..32)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let got = call();
    assert!(got.is_err(), "a 33rd connection was served: {got:?}");
    assert!(h.log().contains("32 connections open"), "{}", h.log());
    // ...and once they go, the daemon serves again.
    drop(silent);
    assert!(
        wait_until(Duration::from_secs(10), || matches!(call(), Ok((_, 0)))),
        "{}",
        h.log()
    );
    h.stop();
}

/// The JSON lines of `out` (events, then the result).
fn json_lines(out: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A rollout across two hosts without a remote (each gets a bundle the driver uploads) whose
/// driver dies right after wave 1 is recorded, and whose second host's daemon restarts before
/// the resume: `--resume` picks up where the journal says and finishes on the restarted host.
#[test]
fn a_fleet_rollout_resumes_after_its_driver_dies_and_a_host_daemon_restarts() {
    if !is_root() {
        skip!("needs root for FUSE mounts");
    }
    let op = Operator::new();
    let mut hosts = Vec::new();
    for name in ["host-1", "host-2"] {
        let mut h = Host::new(&["web-1", "web-2"]);
        // the hosts hold only the version their instances run
        ok(&h.store, &["rm", "app:v2"]);
        ok(&h.store, &["gc"]);
        let tls = op.host_files(name);
        h.start(&tls);
        op.add(name, &h.addr());
        hosts.push((h, tls));
    }
    let v1 = hosts[0].0.version("app:v1");
    // the operator holds both versions (the same bytes as the hosts' images)
    for (tag, from) in [("app:v1", "app-v1"), ("app:v2", "app-v2")] {
        let f = hosts[0].0.dir.path().join(from);
        ok(
            &op.store,
            &["import", f.to_str().unwrap(), tag, "--block-size", "4096"],
        );
    }
    let v2 = result(&ok(&op.store, &["--json", "ls"]))["images"][0]["tags"]["v2"]
        .as_str()
        .unwrap()
        .to_string();
    let args = [
        "--json",
        "rollout",
        "app:v2",
        "--hosts",
        "host-*",
        "--instances",
        "web-*",
        "--waves",
        "1,100%",
        "--by",
        "host",
        "--host-timeout",
        "5s",
    ];
    // 1. The driver dies once wave 1 (host-1) is recorded healthy.
    let died = Command::new(bin("imagefs"))
        .arg("--store")
        .arg(&op.store)
        .args(args)
        .env("IMAGEFS_FAULT", "rollout.wave_saved")
        .output()
        .unwrap();
    assert!(!died.status.success(), "{died:?}");
    let ev = json_lines(&died);
    let id = ev[0]["rollout"].as_str().unwrap().to_string();
    let st = result(&ok(&op.store, &["--json", "rollout", "status", &id]));
    assert_eq!(st["state"], "interrupted", "{st}");
    assert_eq!(
        st["done"],
        serde_json::json!(["host-1/web-1", "host-1/web-2"]),
        "{st}"
    );
    let bases = |h: &Host| h.bases().into_iter().map(|(_, b)| b).collect::<Vec<_>>();
    assert_eq!(bases(&hosts[0].0), [v2.clone(), v2.clone()]);
    assert_eq!(bases(&hosts[1].0), [v1.clone(), v1.clone()]);
    // 2. host-2's daemon restarts.
    let (h2, tls2) = &mut hosts[1];
    h2.stop();
    h2.start(tls2);
    // 3. The resume finishes wave 2 on the restarted host, and redoes nothing on host-1.
    let out = imagefs(&op.store, &["--json", "rollout", "--resume", &id]);
    let ev = json_lines(&out);
    assert_eq!(out.status.code(), Some(0), "{ev:?}");
    let r = ev.last().unwrap();
    assert_eq!(r["state"], "completed", "{r}");
    let subs: Vec<&Value> = ev.iter().filter(|e| e["event"] == "substituted").collect();
    assert_eq!(subs.len(), 2, "{ev:?}");
    assert!(subs.iter().all(|e| e["host"] == "host-2"), "{ev:?}");
    let fetched: Vec<&Value> = ev.iter().filter(|e| e["event"] == "fetched").collect();
    assert_eq!(fetched.len(), 1, "{ev:?}");
    assert_eq!(fetched[0]["how"], "bundle", "{ev:?}");
    for (h, _) in &hosts {
        assert_eq!(bases(h), [v2.clone(), v2.clone()]);
        let spool = h.store.join("fleet-uploads");
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    }
    for (h, _) in &mut hosts {
        h.stop();
    }
}
