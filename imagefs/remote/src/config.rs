//! The remotes of a store, in `STORE/remotes/`: `remotes.json` (names, buckets, endpoints,
//! region, timeout, the default) and one `NAME.credentials` per remote added with
//! `--credentials`. The directory is made 0700 and every file 0600 (group-readable store:
//! 0750/0640 for the config, credentials stay the owner's alone), as the rest of the store
//! (imagefs_store::access). Credentials are read only to sign requests: never printed or logged.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use imagefs_store::access::Access;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Default deadline of one request to a remote.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the remotes' configuration.
#[derive(Debug, Error)]
pub enum RemotesError {
    /// No remote is configured.
    #[error(
        "no remote is configured (imagefs remote add NAME s3://BUCKET[/PREFIX] --endpoint URL)"
    )]
    NoRemotes,
    /// No remote of that name.
    #[error("no remote named {0:?} (imagefs remote ls)")]
    Unknown(String),
    /// The name is taken.
    #[error("a remote named {0:?} exists already (imagefs remote rm {0} first)")]
    Exists(String),
    /// A bad name, URL, endpoint or duration.
    #[error("{0}")]
    BadInput(String),
    /// A credentials file that cannot be used.
    #[error("credentials {path}: {why}")]
    BadCredentials { path: PathBuf, why: String },
    /// The remote has neither a credentials file nor AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.
    #[error("remote {0:?} has no credentials file and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are not set")]
    NoCredentials(String),
    /// Reading or writing the configuration failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RemotesError {
    /// The CLI's exit code: 2 for usage and configuration, 4 for a name taken, 1 for I/O.
    pub fn exit_code(&self) -> i32 {
        match self {
            RemotesError::Io { .. } => 1,
            RemotesError::Exists(_) => 4,
            _ => 2,
        }
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RemotesError {
    let path = path.to_path_buf();
    move |source| RemotesError::Io { op, path, source }
}

/// One remote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteConfig {
    pub name: String,
    /// The bucket.
    pub bucket: String,
    /// The key prefix inside the bucket ("" for none; no leading or trailing slash).
    pub prefix: String,
    /// S3 endpoints (the nodes of one cluster); empty means AWS itself.
    pub endpoints: Vec<String>,
    /// The region (Garage's is "garage").
    pub region: Option<String>,
    /// Deadline of one request, in milliseconds.
    pub timeout_ms: u64,
    /// A credentials file was given (kept as `remotes/NAME.credentials`).
    pub credentials_file: bool,
}

impl RemoteConfig {
    /// `s3://BUCKET[/PREFIX]`.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// Deadline of one request.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Splits `s3://BUCKET[/PREFIX]` into bucket and prefix.
pub fn parse_url(url: &str) -> Result<(String, String), RemotesError> {
    let bad = || {
        RemotesError::BadInput(format!(
            "{url:?} is not s3://BUCKET[/PREFIX] (bucket: 3-63 of a-z 0-9 . -)"
        ))
    };
    let rest = url.strip_prefix("s3://").ok_or_else(bad)?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let ok_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-');
    let prefix = prefix.trim_matches('/');
    let ok_prefix = prefix.split('/').all(|seg| {
        prefix.is_empty()
            || (!seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-')))
    });
    if !ok_bucket || !ok_prefix {
        return Err(bad());
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// Parses `30s`, `500ms`, `2m`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mult_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else {
        (t, 1000)
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult_ms))
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is not a duration (e.g. 30s, 500ms, 2m)"))
}

fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    b.first().is_some_and(|c| c.is_ascii_alphanumeric())
        && b.len() <= 64
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// Access keys for S3.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

// Never show a secret, even in a debug print.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(..)")
    }
}

impl Credentials {
    /// Parses a credentials file: `key = value` lines (an AWS shared-credentials file's
    /// `[default]` section works as is; other sections, comments and blank lines are skipped).
    /// Keys: aws_access_key_id / access_key_id, aws_secret_access_key / secret_access_key,
    /// aws_session_token / session_token.
    pub fn parse(path: &Path, text: &str) -> Result<Credentials, RemotesError> {
        let (mut id, mut secret, mut token) = (None, None, None);
        let mut section_ok = true;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(s) = line.strip_prefix('[') {
                section_ok = s.trim_end_matches(']').trim() == "default";
                continue;
            }
            if !section_ok {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                // no echo of the line: it may hold a secret
                return Err(RemotesError::BadCredentials {
                    path: path.to_path_buf(),
                    why: "a line is not key = value".to_string(),
                });
            };
            let v = v.trim().to_string();
            match k.trim().to_ascii_lowercase().trim_start_matches("aws_") {
                "access_key_id" => id = Some(v),
                "secret_access_key" => secret = Some(v),
                "session_token" => token = Some(v),
                _ => {}
            }
        }
        match (id, secret) {
            (Some(a), Some(s)) if !a.is_empty() && !s.is_empty() => Ok(Credentials {
                access_key_id: a,
                secret_access_key: s,
                session_token: token,
            }),
            _ => Err(RemotesError::BadCredentials {
                path: path.to_path_buf(),
                why: "needs access_key_id and secret_access_key".to_string(),
            }),
        }
    }

    /// From the process's AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN).
    pub fn from_env() -> Option<Credentials> {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Some(Credentials {
            access_key_id: get("AWS_ACCESS_KEY_ID")?,
            secret_access_key: get("AWS_SECRET_ACCESS_KEY")?,
            session_token: get("AWS_SESSION_TOKEN"),
        })
    }
}

/// The remotes of one store.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Remotes {
    /// The remote push and pull use without `--remote`: the first added, unless changed.
    pub default: Option<String>,
    pub remotes: Vec<RemoteConfig>,
    #[serde(skip)]
    dir: PathBuf,
}

impl Remotes {
    /// The remotes of the store at `store_dir` (none when it has no `remotes/`).
    pub fn load(store_dir: &Path) -> Result<Remotes, RemotesError> {
        let dir = store_dir.join("remotes");
        let path = dir.join("remotes.json");
        let mut r = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<Remotes>(&b).map_err(|e| {
                RemotesError::BadInput(format!("{}: malformed: {e}", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Remotes::default(),
            Err(e) => return Err(io("read", &path)(e)),
        };
        r.dir = dir;
        Ok(r)
    }

    /// The remote named `name`, else the default; `NoRemotes` when there is none at all.
    pub fn pick(&self, name: Option<&str>) -> Result<&RemoteConfig, RemotesError> {
        if self.remotes.is_empty() {
            return Err(RemotesError::NoRemotes);
        }
        let want = match name {
            Some(n) => n,
            None => self.default.as_deref().ok_or(RemotesError::NoRemotes)?,
        };
        self.remotes
            .iter()
            .find(|r| r.name == want)
            .ok_or_else(|| RemotesError::Unknown(want.to_string()))
    }

    /// Where copies of a remote's pack indexes are kept.
    pub fn cache_dir(&self, name: &str) -> PathBuf {
        self.dir.join("cache").join(name)
    }

    fn credentials_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.credentials"))
    }

    /// The credentials of `r`: its file, else the process's AWS environment variables.
    pub fn credentials(&self, r: &RemoteConfig) -> Result<Credentials, RemotesError> {
        if r.credentials_file {
            let path = self.credentials_path(&r.name);
            let text = std::fs::read_to_string(&path).map_err(io("read", &path))?;
            return Credentials::parse(&path, &text);
        }
        Credentials::from_env().ok_or_else(|| RemotesError::NoCredentials(r.name.clone()))
    }

    /// Adds a remote (the default if it is the first); `credentials` is copied into the store
    /// (0600) after it parses.
    pub fn add(
        &mut self,
        mut r: RemoteConfig,
        credentials: Option<&Path>,
    ) -> Result<(), RemotesError> {
        if !valid_name(&r.name) {
            return Err(RemotesError::BadInput(format!(
                "{:?} is not a remote name (want [A-Za-z0-9][A-Za-z0-9._-]{{0,63}})",
                r.name
            )));
        }
        if self.remotes.iter().any(|x| x.name == r.name) {
            return Err(RemotesError::Exists(r.name));
        }
        for e in &r.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() < 10 {
                return Err(RemotesError::BadInput(format!(
                    "{e:?} is not an endpoint URL (http://HOST:PORT or https://...)"
                )));
            }
        }
        self.ensure_dir()?;
        r.credentials_file = false;
        if let Some(src) = credentials {
            let text = std::fs::read_to_string(src).map_err(io("read", src))?;
            Credentials::parse(src, &text)?;
            write_private(&self.credentials_path(&r.name), text.as_bytes(), 0o600)?;
            r.credentials_file = true;
        }
        if self.default.is_none() {
            self.default = Some(r.name.clone());
        }
        self.remotes.push(r);
        self.save()
    }

    /// Removes a remote, its credentials and its cache (the bucket is not touched).
    pub fn remove(&mut self, name: &str) -> Result<RemoteConfig, RemotesError> {
        let i = self
            .remotes
            .iter()
            .position(|r| r.name == name)
            .ok_or_else(|| RemotesError::Unknown(name.to_string()))?;
        let r = self.remotes.remove(i);
        if self.default.as_deref() == Some(name) {
            self.default = self.remotes.first().map(|r| r.name.clone());
        }
        self.save()?;
        let _ = std::fs::remove_file(self.credentials_path(name));
        let _ = std::fs::remove_dir_all(self.cache_dir(name));
        Ok(r)
    }

    /// Makes `name` the default remote.
    pub fn set_default(&mut self, name: &str) -> Result<(), RemotesError> {
        if !self.remotes.iter().any(|r| r.name == name) {
            return Err(RemotesError::Unknown(name.to_string()));
        }
        self.default = Some(name.to_string());
        self.save()
    }

    fn ensure_dir(&self) -> Result<(), RemotesError> {
        let store = self.dir.parent().unwrap_or(Path::new("."));
        let access = Access::of(store).unwrap_or_default();
        if !self.dir.exists() {
            std::fs::create_dir(&self.dir).map_err(io("create", &self.dir))?;
        }
        std::fs::set_permissions(
            &self.dir,
            std::fs::Permissions::from_mode(access.mode(true, true)),
        )
        .map_err(io("chmod", &self.dir))
    }

    fn save(&self) -> Result<(), RemotesError> {
        self.ensure_dir()?;
        let store = self.dir.parent().unwrap_or(Path::new("."));
        let access = Access::of(store).unwrap_or_default();
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| RemotesError::BadInput(format!("encoding the remotes: {e}")))?;
        write_private(
            &self.dir.join("remotes.json"),
            &json,
            access.mode(true, false),
        )
    }
}

/// Writes `path` whole (temp file, fsync, rename) with `mode` from its creation on.
fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), RemotesError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io("write", path))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_durations_and_credentials_parse() {
        assert_eq!(
            parse_url("s3://images/prod").unwrap(),
            ("images".into(), "prod".into())
        );
        assert_eq!(
            parse_url("s3://images").unwrap(),
            ("images".into(), "".into())
        );
        assert!(parse_url("s3://Images").is_err());
        assert!(parse_url("http://images").is_err());
        assert!(parse_url("s3://images/../x").is_err());
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("0s").is_err());
        let c = Credentials::parse(
            Path::new("x"),
            "[default]\naws_access_key_id = GK1\naws_secret_access_key = s3cr3t\n[other]\naws_access_key_id = no\n",
        )
        .unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.secret_access_key.as_str()),
            ("GK1", "s3cr3t")
        );
        assert!(!format!("{c:?}").contains("s3cr3t"));
        let e = Credentials::parse(Path::new("x"), "s3cr3t\n").unwrap_err();
        assert!(!e.to_string().contains("s3cr3t"));
    }

    #[test]
    fn remotes_are_kept_private_in_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        std::fs::create_dir(&store).unwrap();
        // a store is 0700 (imagefs init)
        std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut r = Remotes::load(&store).unwrap();
        assert!(matches!(r.pick(None), Err(RemotesError::NoRemotes)));
        let creds = tmp.path().join("creds");
        std::fs::write(&creds, "access_key_id=a\nsecret_access_key=b\n").unwrap();
        let cfg = |name: &str| RemoteConfig {
            name: name.into(),
            bucket: "images".into(),
            prefix: String::new(),
            endpoints: vec!["http://127.0.0.1:3900".into()],
            region: Some("garage".into()),
            timeout_ms: 30_000,
            credentials_file: false,
        };
        r.add(cfg("one"), Some(&creds)).unwrap();
        r.add(cfg("two"), None).unwrap();
        assert!(matches!(
            r.add(cfg("two"), None),
            Err(RemotesError::Exists(_))
        ));
        let r = Remotes::load(&store).unwrap();
        assert_eq!(r.pick(None).unwrap().name, "one");
        assert!(r.pick(None).unwrap().credentials_file);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&store.join("remotes")), 0o700);
        assert_eq!(mode(&store.join("remotes/remotes.json")), 0o600);
        assert_eq!(mode(&store.join("remotes/one.credentials")), 0o600);
        let mut r = r;
        r.set_default("two").unwrap();
        r.remove("two").unwrap();
        assert_eq!(
            Remotes::load(&store).unwrap().default.as_deref(),
            Some("one")
        );
    }
}
