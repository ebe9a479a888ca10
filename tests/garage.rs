//! A single-node Garage (the fleet tier's S3 engine, `make garage`) for one test: loopback
//! only, free ports, everything in a temp dir, one bucket and one key; killed on drop.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imagefs_store::remote::Remote;

/// Where `make garage` installs it (or the first `garage` on PATH).
pub fn binary() -> Option<PathBuf> {
    crate::tool("garage").or_else(|| {
        let p = PathBuf::from("/usr/local/bin/garage");
        p.is_file().then_some(p)
    })
}

/// A running Garage server.
pub struct Garage {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// http://127.0.0.1:PORT
    pub endpoint: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
    /// Words put before the garage command (empty: run directly), e.g. `nsenter --net=NS --`.
    prefix: Vec<OsString>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn hex(seed: &str, n: usize) -> String {
    crate::noise(seed, n.div_ceil(2))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..n]
        .to_string()
}

impl Garage {
    /// Starts a single node with bucket `bucket` and waits until it answers S3 requests.
    pub fn start(bucket: &str) -> Garage {
        Garage::start_at(bucket, "127.0.0.1", Vec::new())
    }

    /// Starts a single node whose listeners bind `addr` (an address of the place it runs in),
    /// spawned (as are its CLI calls) behind `prefix`, e.g. `nsenter --net=/var/run/netns/NS --`
    /// to run it in a network namespace. With a prefix, readiness is its log saying the S3 API
    /// listens and its CLI (through the prefix) seeing the bucket and key, not an S3 request
    /// from here; `client` then works only from a thread in that place.
    pub fn start_at(bucket: &str, addr: &str, prefix: Vec<OsString>) -> Garage {
        let dir = tempfile::tempdir().expect("temp dir");
        let (s3, rpc, admin) = (free_port(), free_port(), free_port());
        let seed = format!("{}-{s3}", std::process::id());
        let conf = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
             replication_factor = 1\ncompression_level = \"none\"\n\
             rpc_bind_addr = \"{addr}:{rpc}\"\nrpc_public_addr = \"{addr}:{rpc}\"\n\
             rpc_secret = \"{secret}\"\n\n[s3_api]\ns3_region = \"garage\"\n\
             api_bind_addr = \"{addr}:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\n\
             [admin]\napi_bind_addr = \"{addr}:{admin}\"\n",
            d = dir.path().display(),
            secret = hex(&format!("rpc{seed}"), 64),
        );
        let conf_path = dir.path().join("garage.toml");
        std::fs::write(&conf_path, conf).expect("write garage.toml");
        let key_id = format!("GK{}", hex(&format!("key{seed}"), 24));
        let secret = hex(&format!("secret{seed}"), 64);
        let mut g = Garage {
            child: None,
            dir,
            endpoint: format!("http://{addr}:{s3}"),
            bucket: bucket.to_string(),
            key_id,
            secret,
            prefix,
        };
        g.spawn();
        g.wait_ready();
        g
    }

    /// Starts the server process on the config and data in the test's dir.
    fn spawn(&mut self) {
        let bin = binary().expect("garage binary (make garage)");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("garage.log"))
            .expect("log");
        let child = self
            .command(&bin)
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &self.key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", &self.secret)
            .env("GARAGE_DEFAULT_BUCKET", &self.bucket)
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn garage");
        self.child = Some(child);
    }

    /// Starts a stopped server again on the same data (same ports, bucket and key).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
        self.wait_ready();
    }

    /// `program` behind the prefix.
    fn command(&self, program: &Path) -> Command {
        match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn wait_ready(&self) {
        if !self.prefix.is_empty() {
            return self.wait_ready_by_cli();
        }
        let client = self.client("", Duration::from_secs(2));
        let start = Instant::now();
        loop {
            if client.list("").is_ok() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "garage did not answer within 30 s; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Readiness seen from where the node runs: its log says the S3 API listens, and its CLI
    /// (through the prefix, over RPC) finds the default bucket and key.
    fn wait_ready_by_cli(&self) {
        let bin = binary().expect("garage binary (make garage)");
        let conf = self.dir.path().join("garage.toml");
        let cli_ok = |args: &[&str]| {
            self.command(&bin)
                .arg("-c")
                .arg(&conf)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let start = Instant::now();
        while !(self.log().contains("S3 API server listening")
            && cli_ok(&["bucket", "info", &self.bucket])
            && cli_ok(&["key", "info", &self.key_id]))
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "garage did not come up within 30 s; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Garage's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    /// Writes a credentials file for the key (as `remote add --credentials` takes it).
    pub fn credentials_file(&self, path: &Path) {
        std::fs::write(
            path,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                self.key_id, self.secret
            ),
        )
        .expect("write credentials");
    }

    /// An S3 client on the bucket (keys under `prefix`), for what a test does behind
    /// imagefs's back (overwriting an object, watching for a tag).
    pub fn client(&self, prefix: &str, timeout: Duration) -> imagefs_remote::S3Remote {
        let cfg = imagefs_remote::RemoteConfig {
            name: "test".into(),
            bucket: self.bucket.clone(),
            prefix: prefix.to_string(),
            endpoints: vec![self.endpoint.clone()],
            region: Some("garage".into()),
            timeout_ms: timeout.as_millis() as u64,
            credentials_file: false,
        };
        let creds = imagefs_remote::Credentials {
            access_key_id: self.key_id.clone(),
            secret_access_key: self.secret.clone(),
            session_token: None,
        };
        imagefs_remote::S3Remote::new(&cfg, &creds).expect("S3 client")
    }

    /// Kills the server (as a lost host) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Garage cluster of `n` nodes on loopback with replication factor `n` (the failure test:
/// quorum is 2 of 3, so one node may die): each node its own dir, ports and log; the layout
/// assigned and applied, a bucket and an imported key made with the garage CLI. Killed on drop.
pub struct GarageCluster {
    nodes: Vec<ClusterNode>,
    _dir: tempfile::TempDir,
    /// Each node's S3 endpoint, http://127.0.0.1:PORT, in node order.
    pub endpoints: Vec<String>,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

struct ClusterNode {
    child: Option<Child>,
    conf: PathBuf,
    log: PathBuf,
}

impl GarageCluster {
    /// Starts `n` nodes, joins them into one layout (zone dc1, 1 GB each) and makes `bucket`
    /// with one key allowed to read and write it; waits until every node answers S3 requests.
    pub fn start(n: usize, bucket: &str) -> GarageCluster {
        let bin = binary().expect("garage binary (make garage)");
        let dir = tempfile::tempdir().expect("temp dir");
        let seed = format!("cluster{}-{}", std::process::id(), free_port());
        let rpc_secret = hex(&format!("rpc{seed}"), 64);
        let mut nodes = Vec::new();
        let mut endpoints = Vec::new();
        let mut rpcs = Vec::new();
        for i in 0..n {
            let d = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&d).expect("node dir");
            let (s3, rpc, admin) = (free_port(), free_port(), free_port());
            let conf = format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = {n}\ncompression_level = \"none\"\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{rpc_secret}\"\n\n[s3_api]\ns3_region = \"garage\"\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                d = d.display(),
            );
            let conf_path = d.join("garage.toml");
            std::fs::write(&conf_path, conf).expect("write garage.toml");
            let log = d.join("garage.log");
            let f = std::fs::File::create(&log).expect("log");
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&conf_path)
                .arg("server")
                .env("RUST_LOG", "garage=info")
                .stdin(Stdio::null())
                .stdout(f.try_clone().expect("log"))
                .stderr(f)
                .spawn()
                .expect("spawn garage");
            nodes.push(ClusterNode {
                child: Some(child),
                conf: conf_path,
                log,
            });
            endpoints.push(format!("http://127.0.0.1:{s3}"));
            rpcs.push(rpc);
        }
        let c = GarageCluster {
            nodes,
            _dir: dir,
            endpoints,
            bucket: bucket.to_string(),
            key_id: format!("GK{}", hex(&format!("key{seed}"), 24)),
            secret: hex(&format!("secret{seed}"), 64),
        };
        let ids: Vec<String> = (0..n).map(|i| c.node_id(i)).collect();
        for (i, id) in ids.iter().enumerate().skip(1) {
            c.cli(&["node", "connect", &format!("{id}@127.0.0.1:{}", rpcs[i])]);
        }
        for id in &ids {
            c.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", id]);
        }
        c.cli(&["layout", "apply", "--version", "1"]);
        c.cli(&["bucket", "create", bucket]);
        let (k, s) = (c.key_id.clone(), c.secret.clone());
        c.cli(&["key", "import", "--yes", "-n", "imagefs-test", &k, &s]);
        c.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", bucket, "--key", &k,
        ]);
        for i in 0..n {
            c.wait_ready(i);
        }
        c
    }

    /// `garage -c NODE0 ARGS` (the admin CLI talks to node 0 over RPC); panics with the output
    /// and node 0's log when it fails.
    fn cli(&self, args: &[&str]) -> String {
        self.cli_on(0, args)
            .unwrap_or_else(|e| panic!("garage {args:?}: {e}\nnode 0 log:\n{}", self.log(0)))
    }

    fn cli_on(&self, node: usize, args: &[&str]) -> Result<String, String> {
        let bin = binary().expect("garage binary");
        let out = Command::new(bin)
            .arg("-c")
            .arg(&self.nodes[node].conf)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// The node's id (retried while it starts).
    fn node_id(&self, node: usize) -> String {
        let start = Instant::now();
        loop {
            if let Ok(out) = self.cli_on(node, &["node", "id", "-q"]) {
                if let Some(id) = out.trim().split('@').next().filter(|s| !s.is_empty()) {
                    return id.to_string();
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "garage node {node} did not start within 30 s; its log:\n{}",
                self.log(node)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_ready(&self, node: usize) {
        let client = self.client_on(&[node], "", Duration::from_secs(2));
        let start = Instant::now();
        while client.list("").is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "garage node {node} did not serve S3 within 30 s; its log:\n{}",
                self.log(node)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A node's log so far.
    pub fn log(&self, node: usize) -> String {
        std::fs::read_to_string(&self.nodes[node].log).unwrap_or_default()
    }

    /// Writes a credentials file for the key (as `remote add --credentials` takes it).
    pub fn credentials_file(&self, path: &Path) {
        std::fs::write(
            path,
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                self.key_id, self.secret
            ),
        )
        .expect("write credentials");
    }

    /// An S3 client on the bucket through the given nodes' endpoints (failing over in order).
    pub fn client_on(
        &self,
        nodes: &[usize],
        prefix: &str,
        timeout: Duration,
    ) -> imagefs_remote::S3Remote {
        let cfg = imagefs_remote::RemoteConfig {
            name: "test".into(),
            bucket: self.bucket.clone(),
            prefix: prefix.to_string(),
            endpoints: nodes.iter().map(|&i| self.endpoints[i].clone()).collect(),
            region: Some("garage".into()),
            timeout_ms: timeout.as_millis() as u64,
            credentials_file: false,
        };
        let creds = imagefs_remote::Credentials {
            access_key_id: self.key_id.clone(),
            secret_access_key: self.secret.clone(),
            session_token: None,
        };
        imagefs_remote::S3Remote::new(&cfg, &creds).expect("S3 client")
    }

    /// The node's process id (None once killed).
    pub fn pid(&self, node: usize) -> Option<u32> {
        self.nodes[node].child.as_ref().map(Child::id)
    }

    /// kill -9 of one node (a lost host), waited for.
    pub fn kill(&mut self, node: usize) {
        if let Some(mut c) = self.nodes[node].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for GarageCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
