//! remote add|ls|rm|default, push and pull: the store's remote block tier (issue 12). The
//! format and the algorithms are imagefs_store::remote; the S3 client is imagefs-remote.
//! Credentials are never printed: only the remote's name, URL and endpoints are.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, Subcommand};
use imagefs_remote::{RemoteConfig, Remotes, RemotesError, S3Remote};
use imagefs_store::remote::{
    gc, list_tags, tag_key, Counters, GcAction, GcOptions, PullEvent, PullOptions, PushEvent,
    PushOptions, Remote, RemoteError, RemoteSource, SyncError, DEFAULT_JOBS, DEFAULT_PACK_SIZE,
};
use imagefs_store::{Store, VersionId};
use serde_json::json;

use super::output::{human_bytes, Out};
use super::{exit_code, name_tag, parse_size, CliError};

/// `imagefs remote ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum RemoteCommand {
    /// Add a remote: an S3 bucket (and key prefix) this store pushes to and pulls from
    Add(RemoteAddArgs),
    /// List the remotes, and the tags, versions and sizes a remote holds
    Ls(RemoteLsArgs),
    /// Delete the objects no remote tag reaches: a first pass marks them, a pass at least
    /// --grace later deletes those still unreachable (a push racing it is never broken)
    Gc(RemoteGcArgs),
    /// Remove a tag from a remote (its objects go at a later `remote gc`)
    Untag(RemoteUntagArgs),
    /// Forget a remote (its bucket is not touched)
    Rm(RemoteNameArgs),
    /// Make a remote the one push and pull use without --remote
    Default(RemoteNameArgs),
    /// Fetch counters of lazy reads, prefetches and pulls: requests, bytes and blocks fetched,
    /// cache hits, integrity errors; in total and per version
    Stats(RemoteLsArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RemoteAddArgs {
    /// The remote's name
    pub name: String,
    /// s3://BUCKET[/PREFIX] (the bucket must exist; it is not created)
    pub url: String,
    /// S3 endpoint URL (repeat for the nodes of one cluster); requests are then path-style and
    /// http is allowed. Without it: AWS.
    #[arg(long = "endpoint", value_name = "URL")]
    pub endpoints: Vec<String>,
    /// The region (Garage's default is "garage")
    #[arg(long)]
    pub region: Option<String>,
    /// A credentials file (access_key_id / secret_access_key lines, or an AWS credentials file's
    /// [default] section), copied into the store, 0600. Without it the AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY of the process running the command are used.
    #[arg(long, value_name = "FILE")]
    pub credentials: Option<PathBuf>,
    /// Deadline of one request, retries included (e.g. 30s, 500ms)
    #[arg(long, value_parser = imagefs_remote::parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Args)]
pub struct RemoteLsArgs {
    /// The remote whose tags to list [default: the default remote]
    #[arg(long)]
    pub remote: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RemoteNameArgs {
    /// The remote's name
    pub name: String,
}

#[derive(Debug, Clone, Args)]
pub struct RemoteGcArgs {
    /// The remote [default: the default remote]
    #[arg(long)]
    pub remote: Option<String>,
    /// Least time between the pass that marks an unreachable object and the pass that deletes
    /// it (e.g. 1h, 30m, 10s, 0s); longer than any push or lazy reader relies on an untagged
    /// version
    #[arg(long, value_parser = parse_grace, default_value = "1h", value_name = "DURATION")]
    pub grace: Duration,
    /// Deletes in flight at most
    #[arg(long, default_value_t = DEFAULT_JOBS)]
    pub jobs: usize,
}

#[derive(Debug, Clone, Args)]
pub struct RemoteUntagArgs {
    /// NAME:TAG to remove from the remote
    pub name_tag: String,
    /// The remote [default: the default remote]
    #[arg(long)]
    pub remote: Option<String>,
}

/// A grace period: N followed by ms, s, m, h or d (0 allowed: the next pass may delete).
fn parse_grace(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let units: [(&str, u64); 5] = [
        ("ms", 1),
        ("s", 1000),
        ("m", 60_000),
        ("h", 3_600_000),
        ("d", 86_400_000),
    ];
    let (num, mult) = units
        .iter()
        .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n, *m)))
        .unwrap_or((t, 1000));
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is not a duration (e.g. 1h, 30m, 10s, 0s)"))
}

#[derive(Debug, Clone, Args)]
pub struct PushArgs {
    /// NAME:TAG to push (the remote's tag gets the same name)
    pub name_tag: String,
    /// The remote [default: the default remote]
    #[arg(long)]
    pub remote: Option<String>,
    /// Target size of a pack object (blocks are uploaded grouped into packs)
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_PACK_SIZE)]
    pub pack_size: u64,
    /// Uploads in flight at most
    #[arg(long, default_value_t = DEFAULT_JOBS)]
    pub jobs: usize,
}

#[derive(Debug, Clone, Args)]
pub struct PullArgs {
    /// NAME:TAG, or NAME:TAG@VERSION_ID to pin the version by id (then tagged NAME:TAG here)
    pub spec: String,
    /// The remote [default: the default remote]
    #[arg(long)]
    pub remote: Option<String>,
    /// Requests in flight at most
    #[arg(long, default_value_t = DEFAULT_JOBS)]
    pub jobs: usize,
    /// Record the version (its verified block map) without its blocks: readable through the
    /// mount at once, each block fetched on its first read (`imagefs prefetch` fetches the rest)
    #[arg(long)]
    pub lazy: bool,
}

impl From<RemotesError> for CliError {
    fn from(e: RemotesError) -> CliError {
        CliError::new(e.exit_code(), e.to_string())
    }
}

impl From<SyncError> for CliError {
    fn from(e: SyncError) -> CliError {
        CliError::new(exit_code(e.kind()), e.to_string())
    }
}

/// The remote `name` (or the default) with a client for it.
fn open(dir: &Path, name: Option<&str>) -> Result<(Remotes, RemoteConfig, S3Remote), CliError> {
    let remotes = Remotes::load(dir)?;
    let cfg = remotes.pick(name)?.clone();
    let creds = remotes.credentials(&cfg)?;
    let client = S3Remote::new(&cfg, &creds)?;
    Ok((remotes, cfg, client))
}

fn describe(r: &RemoteConfig) -> serde_json::Value {
    json!({"name": r.name, "url": r.url(), "endpoints": r.endpoints, "region": r.region,
           "timeout_ms": r.timeout_ms, "credentials": if r.credentials_file { "file" } else { "environment" }})
}

/// `imagefs remote gc`: one pass of imagefs_store::remote::gc.
fn remote_gc(store: &Store, a: &RemoteGcArgs, o: &mut Out<'_>) -> Result<(), CliError> {
    let (_, cfg, client) = open(store.dir(), a.remote.as_deref())?;
    let r = gc(
        &client,
        &GcOptions {
            grace: a.grace,
            jobs: a.jobs.max(1),
        },
    )?;
    let action = match r.action {
        GcAction::Empty => "empty",
        GcAction::Marked => "marked",
        GcAction::Waiting => "waiting",
        GcAction::Deleted => "deleted",
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let when = match r.deletable_at {
        Some(t) if r.candidates > 0 => format!(
            "; {} marked ({}), deletable by a gc {}",
            r.candidates,
            human_bytes(r.candidate_bytes),
            if t <= now_ms {
                "from now on".to_string()
            } else {
                format!("in {} s", (t - now_ms).div_ceil(1000))
            }
        ),
        _ => "; nothing marked".to_string(),
    };
    let text = match r.action {
        GcAction::Empty => format!("remote {} holds no imagefs objects", cfg.name),
        GcAction::Waiting => format!(
            "gc {}: the grace since the marking pass has not passed, nothing deleted{when}",
            cfg.name
        ),
        GcAction::Marked => format!(
            "gc {}: first pass over {} tags, {} objects reachable{when}",
            cfg.name, r.tags, r.reachable
        ),
        GcAction::Deleted => format!(
            "gc {}: deleted {} objects ({}) no tag reaches; {} tags, {} objects reachable{when}",
            cfg.name,
            r.deleted,
            human_bytes(r.deleted_bytes),
            r.tags,
            r.reachable
        ),
    };
    o.result(
        json!({"remote": cfg.name, "action": action, "tags": r.tags, "reachable": r.reachable,
               "unreachable": r.unreachable, "deleted": r.deleted,
               "deleted_bytes": r.deleted_bytes, "candidates": r.candidates,
               "candidate_bytes": r.candidate_bytes, "deletable_at_ms": r.deletable_at,
               "deletions": r.deletions, "grace_ms": a.grace.as_millis() as u64}),
        &text,
    )
}

/// `imagefs remote untag NAME:TAG`: deletes the tag object (exit 3 when there is none).
fn untag(store: &Store, a: &RemoteUntagArgs, o: &mut Out<'_>) -> Result<(), CliError> {
    let (image, tag) = name_tag(&a.name_tag)?;
    let (_, cfg, client) = open(store.dir(), a.remote.as_deref())?;
    let key = tag_key(&image, &tag);
    // the trait by path: its name is not otherwise needed here
    if imagefs_store::remote::Remote::head(&client, &key)
        .map_err(SyncError::from)?
        .is_none()
    {
        return Err(SyncError::NotInRemote(format!("tag {image}:{tag}")).into());
    }
    imagefs_store::remote::Remote::delete(&client, &key).map_err(SyncError::from)?;
    o.result(
        json!({"remote": cfg.name, "untagged": format!("{image}:{tag}")}),
        &format!(
            "removed {image}:{tag} from {} (its objects go at a later remote gc)",
            cfg.name
        ),
    )
}

pub fn run(store: &Store, cmd: &RemoteCommand, o: &mut Out<'_>) -> Result<(), CliError> {
    let dir = store.dir();
    match cmd {
        RemoteCommand::Gc(a) => remote_gc(store, a, o),
        RemoteCommand::Untag(a) => untag(store, a, o),
        RemoteCommand::Add(a) => {
            let (bucket, prefix) = imagefs_remote::parse_url(&a.url)?;
            let mut remotes = Remotes::load(dir)?;
            let cfg = RemoteConfig {
                name: a.name.clone(),
                bucket,
                prefix,
                endpoints: a.endpoints.clone(),
                region: a.region.clone(),
                timeout_ms: a
                    .timeout
                    .unwrap_or(imagefs_remote::DEFAULT_TIMEOUT)
                    .as_millis()
                    .try_into()
                    .unwrap_or(u64::MAX),
                credentials_file: a.credentials.is_some(),
            };
            remotes.add(cfg.clone(), a.credentials.as_deref())?;
            let is_default = remotes.default.as_deref() == Some(a.name.as_str());
            o.result(
                json!({"remote": describe(&cfg), "default": is_default}),
                &format!(
                    "added remote {} = {}{}",
                    cfg.name,
                    cfg.url(),
                    if is_default { " (default)" } else { "" }
                ),
            )
        }
        RemoteCommand::Rm(a) => {
            let mut remotes = Remotes::load(dir)?;
            if remotes.remotes.is_empty() {
                return Err(RemotesError::NoRemotes.into());
            }
            let r = remotes.remove(&a.name)?;
            o.result(
                json!({"removed": r.name, "default": remotes.default}),
                &format!(
                    "removed remote {} ({}; its bucket is untouched)",
                    r.name,
                    r.url()
                ),
            )
        }
        RemoteCommand::Default(a) => {
            let mut remotes = Remotes::load(dir)?;
            if remotes.remotes.is_empty() {
                return Err(RemotesError::NoRemotes.into());
            }
            remotes.set_default(&a.name)?;
            o.result(
                json!({"default": a.name}),
                &format!("default remote: {}", a.name),
            )
        }
        RemoteCommand::Stats(a) => stats(store, a, o),
        RemoteCommand::Ls(a) => {
            let (remotes, cfg, client) = open(dir, a.remote.as_deref())?;
            let tags = list_tags(&client)?;
            let mut text = String::new();
            for r in &remotes.remotes {
                let mark = if remotes.default.as_deref() == Some(r.name.as_str()) {
                    "*"
                } else {
                    " "
                };
                text.push_str(&format!(
                    "{mark} {:<16} {:<32} {}\n",
                    r.name,
                    r.url(),
                    r.endpoints.join(",")
                ));
            }
            text.push_str(&format!(
                "\ntags in {}:\n{:<28} {:<14} {:>12} PUSHED\n",
                cfg.name, "IMAGE:TAG", "VERSION", "SIZE"
            ));
            let mut jtags = Vec::new();
            for t in &tags {
                let short: String = t.version.chars().take(12).collect();
                text.push_str(&format!(
                    "{:<28} {:<14} {:>12} {}\n",
                    format!("{}:{}", t.image, t.tag),
                    short,
                    human_bytes(t.size),
                    t.pushed
                ));
                jtags.push(json!({"image": t.image, "tag": t.tag, "version": t.version,
                    "size": t.size, "block_size": t.block_size, "pushed": t.pushed}));
            }
            let list: Vec<serde_json::Value> = remotes.remotes.iter().map(describe).collect();
            o.result(
                json!({"remotes": list, "default": remotes.default, "remote": cfg.name, "tags": jtags}),
                &text,
            )
        }
    }
}

pub fn push(store: &Store, a: &PushArgs, o: &mut Out<'_>) -> Result<(), CliError> {
    let (image, tag) = name_tag(&a.name_tag)?;
    let (remotes, cfg, client) = open(store.dir(), a.remote.as_deref())?;
    let id = store.resolve(&a.name_tag)?;
    let opts = PushOptions {
        pack_size: a.pack_size.max(1),
        jobs: a.jobs.max(1),
        cache: Some(remotes.cache_dir(&cfg.name)),
    };
    let (mut done, mut total) = (0u64, 0u64);
    let mut out_err = None;
    let r = store.push(&client, &id, &tag, &opts, &mut |e| {
        let step = (|| -> Result<(), CliError> {
            match e {
                PushEvent::Planned {
                    blocks,
                    new_blocks,
                    new_bytes,
                    packs,
                } => {
                    total = *new_bytes;
                    o.event(
                        json!({"type": "planned", "blocks": blocks, "new_blocks": new_blocks,
                        "new_bytes": new_bytes, "packs": packs}),
                    )?;
                    o.start("push", total);
                }
                PushEvent::Pack {
                    pack,
                    blocks,
                    bytes,
                    uploaded,
                } => {
                    o.event(json!({"type": "pack", "pack": pack, "blocks": blocks,
                        "bytes": bytes, "uploaded": uploaded}))?;
                    done += bytes;
                    o.progress("push", done, total)?;
                }
                PushEvent::Map { bytes, uploaded } => {
                    o.event(json!({"type": "map", "bytes": bytes, "uploaded": uploaded}))?
                }
                PushEvent::Tag { key } => o.event(json!({"type": "tag", "key": key}))?,
            }
            Ok(())
        })();
        if let Err(err) = step {
            out_err.get_or_insert(err);
        }
    });
    o.finish();
    let r = r?;
    if let Some(e) = out_err {
        return Err(e);
    }
    o.result(
        json!({"image": image.as_str(), "tag": tag.as_str(), "id": r.id.to_hex(),
               "remote": cfg.name, "blocks": r.blocks, "new_blocks": r.new_blocks,
               "packs_uploaded": r.packs_uploaded, "packs_present": r.packs_present,
               "bytes_uploaded": r.bytes_uploaded, "block_bytes": r.block_bytes,
               "objects_uploaded": r.objects_uploaded}),
        &format!(
            "pushed {image}:{tag} = {} to {}: {} of {} blocks new, {} uploaded in {} objects",
            r.id.short(),
            cfg.name,
            r.new_blocks,
            r.blocks,
            human_bytes(r.bytes_uploaded),
            r.objects_uploaded
        ),
    )
}

pub fn pull(store: &Store, a: &PullArgs, o: &mut Out<'_>) -> Result<(), CliError> {
    let (spec, pinned) = match a.spec.split_once('@') {
        Some((s, id)) => (
            s,
            Some(id.parse::<VersionId>().map_err(|_| {
                CliError::new(2, format!("{id:?} is not a version id (64 hex digits)"))
            })?),
        ),
        None => (a.spec.as_str(), None),
    };
    let (image, tag) = name_tag(spec)?;
    let (remotes, cfg, client) = open(store.dir(), a.remote.as_deref())?;
    let opts = PullOptions {
        jobs: a.jobs.max(1),
        cache: Some(remotes.cache_dir(&cfg.name)),
        remote_name: cfg.name.clone(),
    };
    if a.lazy {
        let started = std::time::Instant::now();
        let r = store.pull_lazy(&client, &cfg.name, &image, &tag, pinned, &opts)?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        return o.result(
            json!({"image": image.as_str(), "tag": tag.as_str(), "id": r.id.to_hex(),
                   "remote": cfg.name, "size": r.size, "blocks": r.blocks, "lazy": true,
                   "blocks_fetched": 0, "bytes_fetched": 0, "meta_bytes": r.meta_bytes,
                   "already_local": r.already_local, "ms": ms,
                   "times_ms": r.times_ms.iter().map(|(k, v)| (k.to_string(), json!(v)))
                       .collect::<serde_json::Map<_, _>>()}),
            &format!(
                "pulled {image}:{tag} = {} from {} lazily in {ms:.0} ms: {} blocks, fetched on first read ({} of metadata)",
                r.id.short(),
                cfg.name,
                r.blocks,
                human_bytes(r.meta_bytes)
            ),
        );
    }
    let (mut done, mut total) = (0u64, 0u64);
    let mut out_err = None;
    let r = store.pull(&client, &image, &tag, pinned, &opts, &mut |e| {
        let step = (|| -> Result<(), CliError> {
            match e {
                PullEvent::Planned {
                    id,
                    blocks,
                    wanted_blocks,
                    wanted_bytes,
                    requests,
                } => {
                    total = *wanted_bytes;
                    o.event(
                        json!({"type": "planned", "id": id.to_hex(), "blocks": blocks,
                        "wanted_blocks": wanted_blocks, "wanted_bytes": wanted_bytes,
                        "requests": requests}),
                    )?;
                    o.start("pull", total);
                }
                PullEvent::Fetched { bytes, .. } => {
                    done += bytes;
                    o.progress("pull", done, total)?;
                }
            }
            Ok(())
        })();
        if let Err(err) = step {
            out_err.get_or_insert(err);
        }
    });
    o.finish();
    let r = r?;
    if let Some(e) = out_err {
        return Err(e);
    }
    o.result(
        json!({"image": image.as_str(), "tag": tag.as_str(), "id": r.id.to_hex(),
               "remote": cfg.name, "size": r.size, "blocks": r.blocks,
               "blocks_fetched": r.blocks_fetched, "bytes_fetched": r.bytes_fetched,
               "meta_bytes": r.meta_bytes, "requests": r.requests,
               "already_local": r.already_local}),
        &format!(
            "pulled {image}:{tag} = {} from {}: {} of {} blocks fetched ({} in {} requests)",
            r.id.short(),
            cfg.name,
            r.blocks_fetched,
            r.blocks,
            human_bytes(r.bytes_fetched),
            r.requests
        ),
    )
}

/// `imagefs remote stats`: the store's fetch counters for one remote.
fn stats(store: &Store, a: &RemoteLsArgs, o: &mut Out<'_>) -> Result<(), CliError> {
    let remotes = Remotes::load(store.dir())?;
    let cfg = remotes.pick(a.remote.as_deref())?;
    let all = store.remote_stats();
    let r = all.remotes.get(&cfg.name).cloned().unwrap_or_default();
    let line = |name: &str, c: &Counters| {
        format!(
            "{name:<18} {:>9} {:>12} {:>9} {:>10} {:>9}\n",
            c.requests,
            human_bytes(c.bytes_fetched),
            c.blocks_fetched,
            c.cache_hits,
            c.integrity_errors
        )
    };
    let mut text = format!(
        "remote {}:\n{:<18} {:>9} {:>12} {:>9} {:>10} {:>9}\n",
        cfg.name, "VERSION", "REQUESTS", "FETCHED", "BLOCKS", "CACHE_HITS", "INTEGRITY"
    );
    let mut versions = serde_json::Map::new();
    for (v, c) in &r.versions {
        text.push_str(&line(&v.chars().take(12).collect::<String>(), c));
        versions.insert(v.clone(), counters_json(c));
    }
    text.push_str(&line("total", &r.total));
    o.result(
        json!({"remote": cfg.name, "total": counters_json(&r.total), "versions": versions}),
        text.trim_end(),
    )
}

fn counters_json(c: &Counters) -> serde_json::Value {
    json!({"requests": c.requests, "bytes_fetched": c.bytes_fetched,
           "blocks_fetched": c.blocks_fetched, "cache_hits": c.cache_hits,
           "integrity_errors": c.integrity_errors})
}

/// A remote's client and its deadline.
type Client = (Arc<dyn Remote>, Duration);

/// The clients of a store's remotes, built from its remotes configuration on first use (the
/// daemon builds them at mount time): the store's lazy reads fetch through them.
struct Clients {
    dir: PathBuf,
    built: Mutex<HashMap<String, Client>>,
}

impl RemoteSource for Clients {
    fn remote(&self, name: &str) -> Result<(Arc<dyn Remote>, Duration), RemoteError> {
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((r, d)) = built.get(name) {
            return Ok((r.clone(), *d));
        }
        let remotes = Remotes::load(&self.dir).map_err(|e| RemoteError::Config(e.to_string()))?;
        let cfg = remotes
            .pick(Some(name))
            .map_err(|e| RemoteError::Config(e.to_string()))?;
        let creds = remotes
            .credentials(cfg)
            .map_err(|e| RemoteError::Config(e.to_string()))?;
        let client: Arc<dyn Remote> =
            Arc::new(S3Remote::new(cfg, &creds).map_err(|e| RemoteError::Config(e.to_string()))?);
        built.insert(name.to_string(), (client.clone(), cfg.timeout()));
        Ok((client, cfg.timeout()))
    }
}

/// Hands `store` the clients of its remotes, so lazy versions can be read. With `eager` (the
/// daemon at mount time) each configured remote's client is built now; failures are logged
/// and retried on first use.
pub fn attach(store: &Store, eager: bool) {
    let clients = Arc::new(Clients {
        dir: store.dir().to_path_buf(),
        built: Mutex::new(HashMap::new()),
    });
    if eager {
        if let Ok(remotes) = Remotes::load(store.dir()) {
            for r in &remotes.remotes {
                if let Err(e) = clients.remote(&r.name) {
                    tracing::warn!(remote = %r.name, "no client for lazy reads yet: {e}");
                }
            }
        }
    }
    store.set_remote_source(clients);
}
