//! The store commands of the `imagefs` CLI: a thin clap layer over `imagefs_store`. Commands
//! write only to the `out` they are given and run on a `Store` handed to them, so the mount
//! daemon can run the very same commands on its own store and stream the output.

pub mod error;
mod images;
mod maint;
pub mod output;
mod patch;
pub mod remote;

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use imagefs_store::{parse_name_tag, ImageName, Store, Tag, VersionId};

pub use error::{exit_code, report, CliError};
use output::Out;

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// The store directory [default: $IMAGEFS_STORE, else ~/.local/share/imagefs]
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Print JSON Lines: progress events, then one result object
    #[arg(long, global = true)]
    pub json: bool,
}

/// `imagefs init`.
#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// Let this group read the store and its mount too (0750 instead of 0700).
    #[arg(long)]
    pub group: Option<String>,
}

/// The store's commands.
#[derive(Debug, Clone, Subcommand)]
pub enum StoreCommand {
    /// Create an empty store (0700: only its owner reads it)
    Init(InitArgs),
    /// Import a raw or qcow2 image file as NAME:TAG
    Import(ImportArgs),
    /// List images, tags and versions
    Ls(LsArgs),
    /// Write a version out as a raw image file (byte-identical to what was imported)
    Export(ExportArgs),
    /// Show the blocks that differ between two versions
    Diff(DiffArgs),
    /// Write a bundle holding only the blocks that turn version A into version B
    Bundle(BundleArgs),
    /// Apply a bundle: make its target version (and tag) from a base this store holds
    Apply(ApplyArgs),
    /// Point NAME:TAG at a version (creating or moving the tag)
    Tag(TagArgs),
    /// Remove tags (versions stay addressable by id until gc)
    Rm(RmArgs),
    /// Check every block and block-map node against its hash
    Fsck(FsckArgs),
    /// Remove versions nothing refers to and free their blocks
    Gc,
    /// Remotes: S3 buckets this store pushes versions to and pulls them from
    #[command(subcommand)]
    Remote(remote::RemoteCommand),
    /// Upload a version to a remote: only the blocks it lacks, then the tag (resumable)
    Push(remote::PushArgs),
    /// Fetch a version from a remote: only the blocks this store lacks, each verified
    Pull(remote::PullArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The image file (raw, or qcow2 detected by its header)
    pub file: PathBuf,
    /// NAME:TAG to create or move
    pub name_tag: String,
    /// Block size of a new image: a power of two from 4096 to 1048576 (default 65536)
    #[arg(long, value_parser = parse_size)]
    pub block_size: Option<u64>,
}

#[derive(Debug, Clone, Args)]
pub struct LsArgs {
    /// Only this image
    pub name: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// NAME:TAG or version id
    pub version: String,
    /// The raw file to write
    pub file: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct DiffArgs {
    /// NAME:TAG or version id
    pub a: String,
    /// NAME:TAG or version id
    pub b: String,
    /// Also name the guest files (and ext4 metadata) in the changed blocks
    #[arg(long)]
    pub files: bool,
}

#[derive(Debug, Clone, Args)]
pub struct BundleArgs {
    /// The base version (NAME:TAG or id) the receiver holds
    pub a: String,
    /// The target version (NAME:TAG or id); its tag is set on apply when given as NAME:TAG
    pub b: String,
    /// The bundle file to write
    pub file: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// The bundle file
    pub file: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct TagArgs {
    /// NAME:TAG to set
    pub name_tag: String,
    /// The version it names (NAME:TAG or id)
    pub version: String,
}

#[derive(Debug, Clone, Args)]
pub struct RmArgs {
    /// NAME:TAG to remove
    #[arg(required = true)]
    pub name_tags: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct FsckArgs {
    /// Rebuild the index from the pack files and refs log first
    #[arg(long)]
    pub repair: bool,
    /// With --repair: drop the damaged records of a record log (refs.log, an instance log),
    /// keeping every whole record before and after them, after saving the whole file beside
    /// it as NAME.damaged-SECS. Without this flag a damaged log stops every command (exit 5)
    /// and nothing is changed.
    #[arg(long, requires = "repair")]
    pub drop_damaged: bool,
}

/// Parses "30s", "500ms", "2m" or plain seconds; 0 is refused (a deadline of 0 allows nothing).
/// One parser for every duration flag: the remote crate's, which `remote add --timeout` uses.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    imagefs_remote::parse_duration(s)
}

/// Parses a size with an optional K/M/G suffix (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.trim().to_ascii_uppercase() {
        t if t.ends_with("GIB") || t.ends_with('G') => (
            t.trim_end_matches("GIB").trim_end_matches('G').to_string(),
            1 << 30,
        ),
        t if t.ends_with("KIB") || t.ends_with('K') => (
            t.trim_end_matches("KIB").trim_end_matches('K').to_string(),
            1024,
        ),
        t if t.ends_with("MIB") || t.ends_with('M') => (
            t.trim_end_matches("MIB").trim_end_matches('M').to_string(),
            1 << 20,
        ),
        t => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 65536, 64K, 1M, 8G)"))
}

/// A free-space reserve: a size (`512M`) or a percentage of the filesystem (`5%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Bytes.
    Bytes(u64),
    /// Percent of the filesystem, 0-100.
    Percent(u64),
}

/// Parses `--reserve SIZE|PCT`.
pub fn parse_reserve(s: &str) -> Result<Reserve, String> {
    match s.trim().strip_suffix('%') {
        Some(p) => p
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&p| p <= 100)
            .map(Reserve::Percent)
            .ok_or_else(|| format!("{s:?} is not a percentage (0% to 100%)")),
        None => parse_size(s).map(Reserve::Bytes),
    }
}

/// `--store`, else `$IMAGEFS_STORE`, else the per-user data dir.
pub fn store_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(p) = std::env::var_os("IMAGEFS_STORE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_DATA_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("imagefs");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/imagefs")
}

/// Runs `cmd` in the process that owns nothing yet: opens (or, for init and repair, creates
/// or rebuilds) the store in `dir` first.
pub fn run_dir(
    dir: &Path,
    cmd: &StoreCommand,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let mut o = Out::new(out, json);
    match cmd {
        StoreCommand::Init(a) => maint::init(dir, a, &mut o),
        StoreCommand::Fsck(FsckArgs {
            repair: true,
            drop_damaged,
        }) => {
            if *drop_damaged {
                maint::drop_damaged_logs(dir, &mut o)?;
            }
            let store = Store::open_rebuilding_index(dir)?;
            maint::fsck(&store, true, &mut o)
        }
        _ => {
            let store = Store::open(dir)?;
            remote::attach(&store, false);
            // No daemon holds the store (the caller forwards otherwise): these instances are
            // the only live ones.
            let instances = imagefs_store::instance::Instances::new(&store);
            run_on(&store, &instances, cmd, &mut o)
        }
    }
}

/// Runs `cmd` on an already open store (the daemon's). `init` and `fsck --repair` need the
/// store closed and are refused here.
pub fn run(
    store: &Store,
    instances: &imagefs_store::instance::Instances,
    cmd: &StoreCommand,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let mut o = Out::new(out, json);
    run_on(store, instances, cmd, &mut o)
}

fn run_on(
    store: &Store,
    instances: &imagefs_store::instance::Instances,
    cmd: &StoreCommand,
    o: &mut Out<'_>,
) -> Result<(), CliError> {
    match cmd {
        StoreCommand::Init(_) => Err(CliError::new(
            4,
            format!("{} is already a store in use", store.dir().display()),
        )),
        StoreCommand::Import(a) => images::import(store, a, o),
        StoreCommand::Ls(a) => images::ls(store, a, o),
        StoreCommand::Export(a) => images::export(store, a, o),
        StoreCommand::Tag(a) => images::tag(store, a, o),
        StoreCommand::Rm(a) => images::rm(store, a, o),
        StoreCommand::Diff(a) => patch::diff(store, a, o),
        StoreCommand::Bundle(a) => patch::bundle(store, a, o),
        StoreCommand::Apply(a) => patch::apply(store, a, o),
        StoreCommand::Fsck(FsckArgs { repair: false, .. }) => maint::fsck(store, false, o),
        StoreCommand::Fsck(FsckArgs { repair: true, .. }) => Err(CliError::new(
            4,
            "fsck --repair needs the store to itself: stop the mount first",
        )),
        StoreCommand::Gc => maint::gc(store, instances, o),
        StoreCommand::Remote(c) => remote::run(store, c, o),
        StoreCommand::Push(a) => remote::push(store, a, o),
        StoreCommand::Pull(a) => remote::pull(store, a, o),
    }
}

/// Resolves a version spec to (id, human label).
pub(crate) fn resolve(store: &Store, spec: &str) -> Result<(VersionId, String), CliError> {
    let id = store.resolve(spec)?;
    let label = if spec.contains(':') {
        spec.to_string()
    } else {
        id.short()
    };
    Ok((id, label))
}

pub(crate) fn name_tag(s: &str) -> Result<(ImageName, Tag), CliError> {
    parse_name_tag(s).map_err(|_| {
        CliError::new(
            2,
            format!("{s:?} is not NAME:TAG (each part [A-Za-z0-9][A-Za-z0-9._-]{{0,127}})"),
        )
    })
}
