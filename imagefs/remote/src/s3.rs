//! [`S3Remote`]: the store's `Remote` trait over S3 with `object_store`. Blocking calls over
//! one small tokio runtime (2 threads) owned by the remote; every request is bounded by the
//! remote's deadline (the client's own retries included). With several endpoints (the nodes
//! of one cluster) a request that cannot reach one goes on to the next, and later requests
//! start from the one that last answered.

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::TryStreamExt;
use imagefs_store::remote::{Remote, RemoteError};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig};

use crate::config::{Credentials, RemoteConfig, RemotesError};

/// One remote's S3 client.
pub struct S3Remote {
    rt: tokio::runtime::Runtime,
    /// One client per endpoint (one for AWS when no endpoint is given).
    clients: Vec<(String, AmazonS3)>,
    current: AtomicUsize,
    prefix: String,
    timeout: Duration,
}

impl std::fmt::Debug for S3Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let eps: Vec<&str> = self.clients.iter().map(|(e, _)| e.as_str()).collect();
        write!(f, "S3Remote({eps:?}, prefix {:?})", self.prefix)
    }
}

impl S3Remote {
    /// A client for `cfg` signing with `creds`. Builds no connection yet.
    pub fn new(cfg: &RemoteConfig, creds: &Credentials) -> Result<S3Remote, RemotesError> {
        let timeout = cfg.timeout();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("imagefs-s3")
            .build()
            .map_err(|e| RemotesError::BadInput(format!("cannot start the S3 client: {e}")))?;
        let endpoints: Vec<Option<&String>> = if cfg.endpoints.is_empty() {
            vec![None]
        } else {
            cfg.endpoints.iter().map(Some).collect()
        };
        let mut clients = Vec::new();
        for ep in endpoints {
            let mut opts = ClientOptions::new()
                .with_timeout(timeout)
                .with_connect_timeout(timeout.min(Duration::from_secs(5)));
            // Explicit values only: AmazonS3Builder::new() reads no AWS_* variable, so the
            // AWS_CA_BUNDLE these machines set cannot break an http endpoint.
            let mut b = AmazonS3Builder::new()
                .with_bucket_name(&cfg.bucket)
                .with_region(cfg.region.as_deref().unwrap_or("us-east-1"))
                .with_access_key_id(&creds.access_key_id)
                .with_secret_access_key(&creds.secret_access_key)
                .with_retry(RetryConfig {
                    max_retries: 3,
                    retry_timeout: timeout,
                    ..RetryConfig::default()
                });
            if let Some(t) = &creds.session_token {
                b = b.with_token(t);
            }
            if let Some(ep) = ep {
                // a cluster's own endpoint: path-style requests, and http allowed
                opts = opts.with_allow_http(true);
                b = b
                    .with_endpoint(ep.trim_end_matches('/'))
                    .with_virtual_hosted_style_request(false);
            }
            let client = b
                .with_client_options(opts)
                .build()
                .map_err(|e| RemotesError::BadInput(format!("remote {}: {e}", cfg.name)))?;
            clients.push((ep.cloned().unwrap_or_else(|| "aws".to_string()), client));
        }
        Ok(S3Remote {
            rt,
            clients,
            current: AtomicUsize::new(0),
            prefix: cfg.prefix.clone(),
            timeout,
        })
    }

    fn path(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Runs `op` against the current endpoint, going on to the next ones when it cannot be
    /// reached or times out; each attempt is bounded by the deadline.
    fn run<T, F, Fut>(&self, key: &str, op: F) -> Result<T, RemoteError>
    where
        F: Fn(AmazonS3, ObjPath) -> Fut,
        Fut: Future<Output = Result<T, object_store::Error>>,
    {
        let n = self.clients.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = RemoteError::Unreachable("no endpoint".to_string());
        for i in 0..n {
            let at = (start + i) % n;
            let Some((ep, client)) = self.clients.get(at) else {
                continue;
            };
            let fut = op(client.clone(), self.path(key));
            let r = self
                .rt
                .block_on(async { tokio::time::timeout(self.timeout, fut).await });
            let err = match r {
                Ok(Ok(v)) => {
                    self.current.store(at, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(e)) => classify(key, ep, e),
                Err(_) => RemoteError::Timeout(self.timeout),
            };
            match err {
                RemoteError::Unreachable(_) | RemoteError::Timeout(_) => {
                    // the last endpoint's failure is the command's one line; say nothing twice
                    if i + 1 < n {
                        tracing::warn!(endpoint = %ep, "{err}; trying the next endpoint");
                    }
                    last = err;
                }
                other => return Err(other),
            }
        }
        Err(last)
    }
}

/// Maps object_store's error to ours: a failure to connect (refused, reset, DNS, a
/// connection-level timeout) is `Unreachable`, so the next endpoint is tried.
fn classify(key: &str, ep: &str, e: object_store::Error) -> RemoteError {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => RemoteError::NotFound {
            key: key.to_string(),
        },
        E::Unauthenticated { .. } | E::PermissionDenied { .. } => {
            RemoteError::Denied(format!("{ep}: {e}"))
        }
        E::NotSupported { .. } | E::NotImplemented => RemoteError::Other(format!("{ep}: {e}")),
        e => {
            let mut text = String::new();
            let mut src: Option<&dyn std::error::Error> = Some(&e);
            while let Some(s) = src {
                text.push_str(&s.to_string().to_ascii_lowercase());
                text.push(' ');
                src = s.source();
            }
            let unreachable = [
                "connect",
                "connection refused",
                "connection reset",
                "dns",
                "timed out",
                "timeout",
                "broken pipe",
                "sending request",
            ]
            .iter()
            .any(|w| text.contains(w));
            if unreachable {
                RemoteError::Unreachable(format!("{ep}: {e}"))
            } else {
                RemoteError::Other(format!("{ep}: {e}"))
            }
        }
    }
}

impl Remote for S3Remote {
    fn head(&self, key: &str) -> Result<Option<u64>, RemoteError> {
        match self.run(key, |c, p| async move { c.head(&p).await }) {
            Ok(m) => Ok(Some(m.size)),
            Err(RemoteError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, RemoteError> {
        self.run(key, |c, p| async move {
            let r = c.get(&p).await?;
            Ok(r.bytes().await?.to_vec())
        })
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, RemoteError> {
        self.run(key, |c, p| {
            let range = range.clone();
            async move { Ok(c.get_range(&p, range).await?.to_vec()) }
        })
    }

    fn put(&self, key: &str, data: Vec<u8>) -> Result<(), RemoteError> {
        let payload = PutPayload::from(bytes::Bytes::from(data));
        self.run(key, |c, p| {
            let payload = payload.clone();
            async move { c.put(&p, payload).await.map(|_| ()) }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, RemoteError> {
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let dir = prefix.trim_end_matches('/');
        let metas = self.run(dir, |c, p| async move {
            c.list(Some(&p)).try_collect::<Vec<_>>().await
        })?;
        let mut out: Vec<(String, u64)> = metas
            .into_iter()
            .filter_map(|m| {
                let k = m.location.to_string();
                let k = k.strip_prefix(&strip)?.to_string();
                k.starts_with(prefix).then_some((k, m.size))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), RemoteError> {
        match self.run(key, |c, p| async move { c.delete(&p).await }) {
            Err(RemoteError::NotFound { .. }) => Ok(()),
            r => r,
        }
    }
}
