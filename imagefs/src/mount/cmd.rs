//! The mount-side commands: `instance create|commit|rm|ls`, `substitute`, `log`, `prefetch`,
//! `scrub` (the daemon's own, `mount` and `umount`, are in daemon/cmd.rs). Each runs against a
//! `Ctx` (the CLI's own store, or the daemon's with its live mount), so a command behaves the
//! same with or without a daemon. Invariant: output goes to the given
//! writers only (the daemon streams them back), and every failure maps to one exit code.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use imagefs_store::flat::verity::{self, Verity};
use imagefs_store::flat::{FlatCache, FlatError};
use imagefs_store::instance::{
    ConflictPolicy, InstanceError, InstanceId, SubstituteOutcome, SubstituteRequest,
};
use imagefs_store::instance_log::Record;
use imagefs_store::{ImageName, Tag};
use serde_json::{json, Value};

use super::Ctx;
use crate::cli::output::human_bytes;
use crate::cli::{exit_code, CliError};

/// The mount-side subcommands (flattened into the CLI's command enum).
#[derive(Debug, Clone, Subcommand)]
pub enum MountCommand {
    /// Copy-on-write VM disks
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Rebase an instance onto another version atomically (live, under a mount)
    Substitute(SubstituteArgs),
    /// Show an instance's event log (creation, substitutions, commits)
    Log(LogArgs),
    /// Build flat copies of versions now, so the mount serves their files at local-disk speed
    /// (the kernel reads the copy directly: FUSE passthrough); --list shows the copies
    Prefetch(PrefetchArgs),
    /// Re-verify every flat copy against its version's block hashes now; remove bad ones
    /// (their files are then served, and verified, by the daemon); exit 5 if any was bad
    Scrub,
}

/// `imagefs prefetch NAME:TAG|ID... | --list`.
#[derive(Debug, Clone, Args)]
pub struct PrefetchArgs {
    /// Versions to copy (NAME:TAG or a version id).
    #[arg(required_unless_present = "list")]
    pub versions: Vec<String>,
    /// List the flat copies held instead.
    #[arg(long, conflicts_with = "versions")]
    pub list: bool,
    /// Return at once; the blocks are fetched and the copy built in the background (by the
    /// daemon, else by a detached imagefs process)
    #[arg(long)]
    pub background: bool,
    /// The remote a lazy version's missing blocks are fetched from [default: the one it was
    /// pulled from]
    #[arg(long)]
    pub remote: Option<String>,
}

/// Runs `cmd` in a CLI process that holds no store yet (no daemon runs for `dir`).
pub fn run_dir(
    dir: &Path,
    cmd: &MountCommand,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let store = open_waiting(dir)?;
    crate::cli::remote::attach(&store, false);
    let ctx = Ctx::offline(store);
    run(&ctx, cmd, json, out)
}

/// Runs `cmd` against an open store (the CLI's own, or the daemon's for a forwarded command).
pub fn run(ctx: &Ctx, cmd: &MountCommand, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        MountCommand::Instance(c) => instance(ctx, c, json, out),
        MountCommand::Substitute(a) => substitute(ctx, a, json, out),
        MountCommand::Log(a) => log(ctx, a, json, out),
        MountCommand::Prefetch(a) => prefetch(ctx, a, json, out),
        MountCommand::Scrub => scrub(ctx, json, out),
    }
}

/// `imagefs scrub`: checks every flat copy at full speed, removes the bad ones.
fn scrub(ctx: &Ctx, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let flat = match flat_cache(ctx) {
        Ok(f) => f,
        // a mount without flat copies has nothing to scrub
        Err(e) if e.code == 4 && ctx.live.is_some() => {
            writeln!(out, "this mount keeps no flat copies: nothing to scrub").map_err(io_err)?;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let checked = flat.list().len();
    let (verity, with_verity) = flat.verity_status().map_err(flat_err)?;
    let bad = flat.scrub(None).map_err(flat_err)?;
    forget_base_copies(&ctx.instances, &bad);
    for b in &bad {
        let at = b
            .offset
            .map_or("as a whole".to_string(), |o| format!("at offset {o}"));
        let line = if json {
            json!({"type": "scrubbed", "id": b.id.to_string(), "offset": b.offset,
                   "detail": b.detail, "removed": true})
            .to_string()
        } else {
            format!("flat copy {}: corrupt {at}: removed", b.id.to_hex())
        };
        writeln!(out, "{line}").map_err(io_err)?;
    }
    let text = format!("scrubbed {checked} flat copies: {} corrupt", bad.len());
    let available = verity == Verity::Enabled;
    if json {
        let v = json!({"type": "result", "checked": checked, "corrupt": bad.len(),
                       "fs_verity": {"available": available, "copies": with_verity}});
        writeln!(out, "{v}").map_err(io_err)?;
    } else {
        writeln!(out, "{text}").map_err(io_err)?;
        if available {
            writeln!(
                out,
                "fs-verity: on for {with_verity} of {checked} flat copies"
            )
        } else {
            writeln!(out, "{}", verity::UNAVAILABLE)
        }
        .map_err(io_err)?;
    }
    if bad.is_empty() {
        Ok(())
    } else {
        let mut e = CliError::new(5, format!("{} corrupt flat copies removed", bad.len()));
        e.reported = true;
        Err(e)
    }
}

/// Instances reading unwritten blocks from a removed copy go back to the verified store path.
pub fn forget_base_copies(
    instances: &imagefs_store::instance::Instances,
    removed: &[imagefs_store::flat::Scrubbed],
) {
    for inst in instances.open_instances() {
        let view = inst.view();
        if removed.iter().any(|r| r.id == view.base().id()) {
            view.clear_base_copy();
        }
    }
}

/// Without a daemon, `prefetch` fills the same cache the next mount will use.
const OFFLINE_FLAT_BUDGET: u64 = 8 << 30;

/// The flat-copy cache: the live mount's, or one opened over the CLI's store.
fn flat_cache(ctx: &Ctx) -> Result<std::sync::Arc<FlatCache>, CliError> {
    match &ctx.live {
        Some(live) => live.model.flat().cloned().ok_or_else(|| {
            CliError::new(
                4,
                "this mount keeps no flat copies (it was started with --flat-cache 0)",
            )
        }),
        None => FlatCache::open(ctx.store.clone(), OFFLINE_FLAT_BUDGET).map_err(flat_err),
    }
}

fn flat_err(e: FlatError) -> CliError {
    let code = match &e {
        FlatError::Store(s) => exit_code(s.kind()),
        FlatError::TooLarge { .. } | FlatError::NoSpace { .. } => 4,
        _ => 1,
    };
    CliError::new(code, e.to_string())
}

/// Makes the kernel forget tag names that now lead to another version (or none).
pub fn refresh_tags(ctx: &Ctx) {
    if let Some(live) = &ctx.live {
        live.inval.invalidate_entries(&live.model.moved_tags());
    }
}

/// Drops flat copies of versions gc removed (a failure only leaves disk used).
pub fn prune_flat(ctx: &Ctx) {
    if let Some(flat) = ctx.live.as_ref().and_then(|l| l.model.flat()) {
        if let Err(e) = flat.prune() {
            tracing::warn!(error = %e, "pruning flat copies after gc failed");
        }
    }
}

fn prefetch(ctx: &Ctx, a: &PrefetchArgs, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let flat = flat_cache(ctx)?;
    if a.list {
        let copies = flat.list();
        if json {
            let v = json!({ "budget": flat.budget(), "copies": copies });
            return writeln!(out, "{v}").map_err(io_err);
        }
        let used: u64 = copies.iter().map(|c| c.allocated).sum();
        for c in &copies {
            writeln!(
                out,
                "{}  {:>10} on disk  {:>10} apparent",
                c.id,
                human_bytes(c.allocated),
                human_bytes(c.size)
            )
            .map_err(io_err)?;
        }
        return writeln!(
            out,
            "{} flat copies, {} of {} budget",
            copies.len(),
            human_bytes(used),
            human_bytes(flat.budget())
        )
        .map_err(io_err);
    }
    let mut done = Vec::new();
    let ids = a
        .versions
        .iter()
        .map(|s| ctx.store.resolve(s))
        .collect::<Result<Vec<_>, _>>()?;
    if a.background {
        return prefetch_background(ctx, a, &ids, flat, json, out);
    }
    for (spec, id) in a.versions.iter().zip(&ids) {
        let started = Instant::now();
        // a lazy version's missing blocks first: no copy is built before all are local
        let fetched = ctx.store.fetch_missing(
            id,
            None,
            a.remote.as_deref(),
            imagefs_store::remote::DEFAULT_JOBS,
        )?;
        flat.ensure(id).map_err(flat_err)?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if json {
            done.push(json!({ "version": spec, "id": id.to_string(), "ms": ms,
                "blocks_fetched": fetched.blocks, "bytes_fetched": fetched.bytes }));
        } else {
            let got = if fetched.blocks > 0 {
                format!(
                    "fetched {} block(s) ({}), ",
                    fetched.blocks,
                    human_bytes(fetched.bytes)
                )
            } else {
                String::new()
            };
            writeln!(
                out,
                "{spec} ({}): {got}flat copy ready in {ms:.0} ms",
                id.short()
            )
            .map_err(io_err)?;
        }
    }
    if json {
        writeln!(out, "{}", json!({ "prefetched": done })).map_err(io_err)?;
    }
    Ok(())
}

/// Set in the environment of the detached `imagefs prefetch` that `prefetch --background`
/// starts without a daemon: it waits for its parent to let the store go.
const PREFETCH_CHILD: &str = "IMAGEFS_PREFETCH_CHILD";

/// Opens the store; a background prefetch child waits up to 30 s while it is busy.
fn open_waiting(dir: &Path) -> Result<imagefs_store::Store, CliError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match imagefs_store::Store::open(dir) {
            Err(imagefs_store::StoreError::Busy(_))
                if std::env::var_os(PREFETCH_CHILD).is_some() && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return Ok(r?),
        }
    }
}

/// `prefetch --background`: the daemon runs it on a thread of its own; without a daemon a
/// detached `imagefs prefetch` (which then holds the store until done) does.
fn prefetch_background(
    ctx: &Ctx,
    a: &PrefetchArgs,
    ids: &[imagefs_store::VersionId],
    flat: std::sync::Arc<FlatCache>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    if ctx.live.is_some() {
        let store = ctx.store.clone();
        let (ids, remote) = (ids.to_vec(), a.remote.clone());
        std::thread::Builder::new()
            .name("prefetch".to_string())
            .spawn(move || {
                for id in ids {
                    let r = store
                        .fetch_missing(
                            &id,
                            None,
                            remote.as_deref(),
                            imagefs_store::remote::DEFAULT_JOBS,
                        )
                        .map_err(FlatError::from)
                        .and_then(|_| flat.ensure(&id));
                    if let Err(e) = r {
                        tracing::error!(id = %id.short(), "background prefetch failed: {e}");
                    }
                }
            })
            .map_err(|e| CliError::new(1, format!("cannot start a prefetch thread: {e}")))?;
    } else {
        drop(flat);
        let exe = std::env::current_exe()
            .map_err(|e| CliError::new(1, format!("cannot find the imagefs binary: {e}")))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("--store").arg(ctx.store.dir()).arg("prefetch");
        if let Some(r) = &a.remote {
            cmd.args(["--remote", r]);
        }
        cmd.args(ids.iter().map(|i| i.to_hex()))
            .env(PREFETCH_CHILD, "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // The child takes the store's lock once this process has let it go.
        cmd.spawn()
            .map_err(|e| CliError::new(1, format!("cannot start a background prefetch: {e}")))?;
    }
    let list: Vec<String> = ids.iter().map(|i| i.to_hex()).collect();
    if json {
        writeln!(
            out,
            "{}",
            json!({"type": "result", "background": true, "versions": list})
        )
    } else {
        writeln!(
            out,
            "prefetching {} version(s) in the background",
            list.len()
        )
    }
    .map_err(io_err)
}

/// `imagefs instance ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum InstanceCmd {
    /// Create a copy-on-write instance of a version.
    Create {
        /// NAME:TAG or version id to start from.
        source: String,
        /// Instance name.
        id: String,
        /// Most bytes the instance's writes may hold on the host (K, M, G suffixes; replaced
        /// data not yet reclaimed counts; default twice the disk). Past it writes fail with
        /// ENOSPC.
        #[arg(long, value_parser = crate::cli::parse_size)]
        max_bytes: Option<u64>,
    },
    /// Commit the instance as it is now as a new version NAME:TAG.
    Commit {
        /// Instance name.
        id: String,
        /// NAME:TAG to give the new version (the image must be the instance's).
        target: String,
    },
    /// Delete an instance.
    Rm {
        /// Instance name.
        id: String,
    },
    /// List instances.
    Ls,
}

/// `imagefs substitute INSTANCE NAME:TAG`.
#[derive(Debug, Clone, Args)]
pub struct SubstituteArgs {
    /// Instance name.
    pub instance: String,
    /// Target NAME:TAG or version id.
    pub target: String,
    /// On conflict take the target's block.
    #[arg(long, conflicts_with = "keep_local")]
    pub force: bool,
    /// On conflict keep the instance's block.
    #[arg(long)]
    pub keep_local: bool,
    /// Report what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The remote a lazy target's changed blocks are fetched from [default: the one it was
    /// pulled from]
    #[arg(long)]
    pub remote: Option<String>,
}

/// `imagefs log INSTANCE`.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Instance name.
    pub instance: String,
}

impl From<InstanceError> for CliError {
    fn from(e: InstanceError) -> CliError {
        CliError::new(exit_code(e.kind()), e.to_string())
    }
}

fn io_err(e: std::io::Error) -> CliError {
    CliError::new(1, format!("output: {e}"))
}

/// How long `instance rm` waits for handles the kernel has not released yet.
const RELEASE_GRACE: Duration = Duration::from_secs(2);

fn instance_id(s: &str) -> Result<InstanceId, CliError> {
    Ok(InstanceId::parse(s)?)
}

/// `instance create|commit|rm|ls`.
pub fn instance(
    ctx: &Ctx,
    cmd: &InstanceCmd,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let store = &ctx.store;
    match cmd {
        InstanceCmd::Create {
            source,
            id,
            max_bytes,
        } => {
            let id = instance_id(id)?;
            let base = store.resolve(source)?;
            let inst = ctx.instances.create(store, &id, &base, source)?;
            if let Some(max) = max_bytes {
                inst.set_max_bytes(*max)?;
            }
            // The kernel may still cache pages of an earlier instance of this name.
            if let Some(live) = &ctx.live {
                if let Some(ino) = live.model.known_instance_ino(&id) {
                    let all = vec![imagefs_store::instance::Range {
                        offset: 0,
                        len: inst.size(),
                    }];
                    live.inval.invalidate(ino, all, Duration::from_secs(10));
                }
            }
            if json {
                let v = json!({"type": "result", "instance": id.to_string(),
                    "base": base.to_string(), "size": inst.size()});
                writeln!(out, "{v}").map_err(io_err)?;
            } else {
                writeln!(out, "created instance {id} on {source} ({})", base.short())
                    .map_err(io_err)?;
            }
        }
        InstanceCmd::Commit { id, target } => {
            let id = instance_id(id)?;
            let (image, tag) = target
                .split_once(':')
                .ok_or_else(|| CliError::new(2, format!("{target:?} is not NAME:TAG")))?;
            let image = ImageName::new(image)?;
            let tag = Tag::new(tag)?;
            let inst = ctx.instances.get(store, &id)?;
            let t = Instant::now();
            let (base, changes) = inst.snapshot_changes(store)?;
            if base.image() != &image {
                return Err(CliError::new(
                    2,
                    format!(
                        "instance {id} is a disk of image {}, not {image}",
                        base.image()
                    ),
                ));
            }
            let version = store.create_version(&image, Some(&base.id()), base.size(), &changes)?;
            store.set_tag(&image, &tag, &version)?;
            inst.record_commit(&version.to_string(), target)?;
            if json {
                let v = json!({"type": "result", "instance": id.to_string(), "version": version.to_string(),
                    "tag": target, "changed_blocks": changes.len(), "time_us": t.elapsed().as_micros() as u64});
                writeln!(out, "{v}").map_err(io_err)?;
            } else {
                writeln!(
                    out,
                    "committed {id} as {target} ({}, {} changed blocks)",
                    version.short(),
                    changes.len()
                )
                .map_err(io_err)?;
            }
        }
        InstanceCmd::Rm { id } => {
            let id = instance_id(id)?;
            // The kernel sends FUSE RELEASE after the last close() has returned, so a file a
            // caller has just closed can still look open for a moment: give it time to drain.
            let still_open =
                |id: &InstanceId| ctx.live.as_ref().is_some_and(|l| l.model.is_open(id));
            let deadline = Instant::now() + RELEASE_GRACE;
            while still_open(&id) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if still_open(&id) {
                return Err(CliError::new(
                    4,
                    format!("instance {id} is open through the mount (a VM may be using it)"),
                ));
            }
            ctx.instances.remove(&id)?;
            writeln!(out, "removed instance {id}").map_err(io_err)?;
        }
        InstanceCmd::Ls => {
            for id in ctx.instances.list()? {
                let inst = ctx.instances.get(store, &id)?;
                let view = inst.view();
                let base = view.base();
                if json {
                    let v = json!({"instance": id.to_string(), "base": base.id().to_string(),
                        "image": base.image().to_string(), "size": base.size(),
                        "written_blocks": view.written_blocks(),
                        "data_bytes": inst.data_bytes(), "dead_bytes": inst.dead_bytes(),
                        "max_bytes": inst.max_bytes()});
                    writeln!(out, "{v}").map_err(io_err)?;
                } else {
                    writeln!(
                        out,
                        "{id}\t{} {}\t{} bytes\t{} written blocks",
                        base.image(),
                        base.id().short(),
                        base.size(),
                        view.written_blocks()
                    )
                    .map_err(io_err)?;
                }
            }
        }
    }
    Ok(())
}

/// `substitute INSTANCE TARGET`: rebase, then (under a daemon) invalidate the changed ranges.
pub fn substitute(
    ctx: &Ctx,
    a: &SubstituteArgs,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let t = Instant::now();
    let store = &ctx.store;
    let id = instance_id(&a.instance)?;
    let target_id = store.resolve(&a.target)?;
    // Checked in the store even when a live instance holds it (a version may have been gc'd).
    let target = store.version(&target_id)?;
    let target = ctx.instances.live_version(&target_id).unwrap_or(target);
    let inst = ctx.instances.get(store, &id)?;
    // A lazy target: its changed blocks are fetched (bounded parallel) before the switch, so
    // the switch itself never waits on the network.
    let mut fetched = imagefs_store::remote::FetchReport::default();
    if !a.dry_run && store.is_lazy(&target_id)? {
        let base = inst.view().base().id();
        let changed = store.diff(&base, &target_id)?;
        fetched = store.fetch_missing(
            &target_id,
            Some(&changed),
            a.remote.as_deref(),
            imagefs_store::remote::DEFAULT_JOBS,
        )?;
    }
    let prepare_us = t.elapsed().as_micros() as u64;
    let policy = match (a.force, a.keep_local) {
        (true, _) => ConflictPolicy::Force,
        (_, true) => ConflictPolicy::KeepLocal,
        _ => ConflictPolicy::Refuse,
    };
    let req = SubstituteRequest {
        target: &target,
        label: &a.target,
        policy,
        dry_run: a.dry_run,
    };
    let outcome: SubstituteOutcome = match inst.substitute(store, &req) {
        Ok(o) => o,
        Err(InstanceError::Conflicts(ranges)) => {
            crate::metrics::substitution_conflict();
            // The refusal lists every conflict: as the result object, or one line each.
            let msg = InstanceError::Conflicts(ranges.clone()).to_string();
            let mut e = CliError::new(4, msg.clone());
            if json {
                let v = json!({"type": "error", "error": msg, "code": 4, "conflicts": ranges});
                writeln!(out, "{v}").map_err(io_err)?;
                e.reported = true;
            } else {
                let mut text = Vec::new();
                for r in &ranges {
                    writeln!(text, "conflict: bytes {} +{}", r.offset, r.len).map_err(io_err)?;
                }
                out.write_all(&text).map_err(io_err)?;
            }
            return Err(e);
        }
        Err(e) => return Err(e.into()),
    };
    let mut invalidate_us = 0u64;
    if let (Some(live), false) = (&ctx.live, a.dry_run) {
        if let Some(ino) = live.model.known_instance_ino(&id) {
            let spent =
                live.inval
                    .invalidate(ino, outcome.changed.clone(), Duration::from_secs(10));
            match spent {
                Some(d) => invalidate_us = d.as_micros() as u64,
                None => tracing::warn!(instance = %id, "page-cache invalidation timed out"),
            }
        }
    }
    // Then the guest of a live VM on this instance drops what it cached (vm/notify.rs).
    let tg = Instant::now();
    let guest = match (&ctx.live, a.dry_run) {
        (Some(live), false) => (live.tell_guest)(store, &outcome),
        _ => json!({"guest": "not told"}),
    };
    let guest_us = tg.elapsed().as_micros() as u64;
    let total_us = t.elapsed().as_micros() as u64;
    if !a.dry_run {
        let (tm, g) = (&outcome.times, |k: &str| {
            guest.get(k).and_then(|v| v.as_u64()).unwrap_or(0)
        });
        crate::metrics::substitution(&[
            ("prepare", prepare_us),
            ("diff", tm.diff_us),
            ("plan", tm.plan_us),
            ("persist", tm.persist_us),
            ("swap", tm.swap_us),
            ("invalidate", invalidate_us),
            ("files", g("files_us")),
            ("notify", g("notify_us")),
            ("guest", guest_us),
            ("total", total_us),
        ]);
    }
    if json {
        let mut v = serde_json::to_value(&outcome).map_err(|e| io_err(e.into()))?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("type".into(), json!("result"));
            obj.insert("bytes_fetched".into(), json!(fetched.bytes));
            obj.insert("blocks_fetched".into(), json!(fetched.blocks));
            if let Some(times) = obj.get_mut("times").and_then(|t| t.as_object_mut()) {
                times.insert("prepare_us".into(), json!(prepare_us));
                times.insert("invalidate_us".into(), json!(invalidate_us));
                times.insert("guest_us".into(), json!(guest_us));
                for k in ["files_us", "notify_us"] {
                    times.insert(k.into(), guest.get(k).cloned().unwrap_or(json!(0)));
                }
                times.insert("total_us".into(), json!(total_us));
            }
            obj.insert("guest".into(), guest);
        }
        writeln!(out, "{v}").map_err(io_err)?;
    } else {
        // One write: through the daemon each write is an answer line on the control socket and
        // a write of the CLI's stdout, and a line per range cost ~1,000 of each (+4-10 ms).
        let mut text = Vec::new();
        let verb = if a.dry_run { "would change" } else { "changed" };
        writeln!(
            text,
            "{id}: {} -> {} ({}): {verb} {} block(s) in {} range(s), {} conflict range(s), {:.1} ms",
            &outcome.from[..12.min(outcome.from.len())],
            &outcome.to[..12.min(outcome.to.len())],
            a.target,
            outcome.changed_blocks,
            outcome.changed.len(),
            outcome.conflicts.len(),
            total_us as f64 / 1000.0
        )
        .map_err(io_err)?;
        for r in &outcome.changed {
            writeln!(text, "  changed: bytes {} +{}", r.offset, r.len).map_err(io_err)?;
        }
        for r in &outcome.conflicts {
            writeln!(text, "  conflict: bytes {} +{}", r.offset, r.len).map_err(io_err)?;
        }
        if fetched.blocks > 0 {
            writeln!(
                text,
                "  fetched {} block(s), {} from the remote first",
                fetched.blocks,
                human_bytes(fetched.bytes)
            )
            .map_err(io_err)?;
        }
        describe_guest(&guest, &mut text).map_err(io_err)?;
        out.write_all(&text).map_err(io_err)?;
    }
    Ok(())
}

/// The human lines for a report of `Live::tell_guest` (vm/notify.rs).
fn describe_guest(guest: &Value, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    if let Some(w) = guest.get("warning").and_then(Value::as_str) {
        return writeln!(out, "warning: {w}");
    }
    let Some(vm) = guest.get("vm").and_then(Value::as_str) else {
        return Ok(());
    };
    let ms = |k: &str| guest.get(k).and_then(Value::as_u64).unwrap_or(0) as f64 / 1000.0;
    writeln!(
        out,
        "  guest {vm} told: files {:.1} ms, notice + ack {:.1} ms",
        ms("files_us"),
        ms("notify_us")
    )?;
    let ack = guest.get("ack");
    for p in ack
        .and_then(|a| a.get("processes"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        writeln!(
            out,
            "  process {} ({}) had {} open",
            p.get("pid").unwrap_or(&Value::Null),
            agent_proto::text::shown(p.get("comm").and_then(Value::as_str).unwrap_or("?")),
            agent_proto::text::shown(p.get("file").and_then(Value::as_str).unwrap_or("?"))
        )?;
    }
    Ok(())
}

/// `log INSTANCE`: creation, substitutions and commits, oldest first.
pub fn log(ctx: &Ctx, a: &LogArgs, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let id = instance_id(&a.instance)?;
    for r in ctx.instances.events(&id)? {
        if json {
            let v = serde_json::to_value(&r).map_err(|e| io_err(e.into()))?;
            writeln!(out, "{v}").map_err(io_err)?;
            continue;
        }
        let line = match &r {
            Record::Created { base, source, at } => {
                format!("{} created on {source} ({})", utc(*at), short(base))
            }
            Record::Rebased {
                from,
                to,
                target,
                changed_blocks,
                conflicts,
                policy,
                at,
                ..
            } => format!(
                "{} substituted {} -> {} ({target}): {changed_blocks} block(s) changed, \
                 {conflicts} conflict(s), policy {policy}",
                utc(*at),
                short(from),
                short(to)
            ),
            Record::Committed { version, tag, at } => {
                format!("{} committed as {tag} ({})", utc(*at), short(version))
            }
            Record::Limits { max_bytes } => {
                format!("limit on host data set to {}", human_bytes(*max_bytes))
            }
            Record::Writes { .. } | Record::Overlay { .. } => continue,
        };
        writeln!(out, "{line}").map_err(io_err)?;
    }
    Ok(())
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (civil-from-days, proleptic Gregorian).
fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn event_times_print_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_795_564_609), "2026-11-24T23:56:49Z");
    }
}
