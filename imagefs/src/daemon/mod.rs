//! The mount daemon: owns the store while mounted, serves FUSE, the control socket, signals and,
//! with --listen, the fleet's TLS transport (tls.rs).
//! Its commands (`mount`, `umount`) are in cmd.rs; its state machine is the mount's
//! (mount/lifecycle.rs). Invariants: the lifecycle moves only through `Lifecycle::on`; the
//! store is released (instances flushed, socket removed) only after the kernel has dropped the
//! mount, so no request can arrive at a closed store.

pub mod client;
pub mod cmd;
pub mod control;
pub mod metrics;
mod signals;
pub mod tls;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use imagefs_store::flat::FlatCache;
use imagefs_store::instance::Instances;
use imagefs_store::Store;

use crate::mount::fuse::{FuseFs, Pool, MAX_IO};
use crate::mount::inval::Invalidator;
use crate::mount::lifecycle::{Event, Lifecycle};
use crate::mount::model::Model;
use crate::mount::{Ctx, Live};

/// Asks the kernel to unmount the mount of `life`. `lazy` detaches even while files are open.
pub fn request_unmount(life: &Lifecycle, lazy: bool) -> std::io::Result<()> {
    cmd::unmount_path(life.mountpoint(), lazy)?;
    life.on(Event::StopRequested);
    Ok(())
}

/// How often the daemon gives instances' replaced data back to the filesystem.
const RECLAIM_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Every `RECLAIM_EVERY`, reclaims the dead data of open instances holding more than a quarter
/// dead (a guest rewriting its disk would otherwise grow the host's use without bound). Ends
/// with the daemon's instances.
fn spawn_reclaimer(instances: std::sync::Weak<Instances>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("reclaim".into())
        .spawn(move || loop {
            std::thread::sleep(RECLAIM_EVERY);
            let Some(instances) = instances.upgrade() else {
                return;
            };
            match instances.reclaim_open() {
                Ok(0) => {}
                Ok(n) => tracing::info!(bytes = n, "reclaimed replaced instance data"),
                Err(e) => tracing::warn!(error = %e, "reclaiming instance data failed"),
            }
        })
        .map(drop)
}

/// The pause between background scrubs of all flat copies.
const SCRUB_PAUSE: std::time::Duration = std::time::Duration::from_secs(60);

/// Re-verifies the flat copies at `rate` bytes per second, over and over with a pause between
/// rounds; a bad copy is removed and instances stop reading from it. Ends with the cache.
fn spawn_scrubber(
    flat: std::sync::Weak<FlatCache>,
    instances: std::sync::Weak<Instances>,
    rate: u64,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("scrub".into())
        .spawn(move || loop {
            std::thread::sleep(SCRUB_PAUSE);
            let Some(cache) = flat.upgrade() else { return };
            match cache.scrub(Some(rate)) {
                Ok(bad) if !bad.is_empty() => {
                    if let Some(i) = instances.upgrade() {
                        crate::mount::cmd::forget_base_copies(&i, &bad);
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "scrubbing flat copies failed"),
            }
        })
        .map(drop)
}

/// Worker threads for requests that wait on the disk (flush, fsync, fallocate).
const SYNC_WORKERS: usize = 4;

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// The store directory.
    pub store_dir: PathBuf,
    /// Where to mount (absolute).
    pub mountpoint: PathBuf,
    /// Session threads reading and answering requests (one /dev/fuse clone each).
    pub threads: usize,
    /// Detach into the background once the mount is up.
    pub daemonize: bool,
    /// Bytes of flat version copies kept for passthrough reads (0: none, no passthrough).
    pub flat_budget: u64,
    /// Free space to keep on the store's filesystem (`None`: the store's default).
    pub reserve: Option<crate::cli::Reserve>,
    /// Bytes per second of background re-verification of flat copies (0: none).
    pub scrub_rate: u64,
    /// Also serve commands over TCP with mutual TLS (the fleet transport).
    pub listen: tls::ListenArgs,
    /// Serve Prometheus metrics here (--metrics).
    pub metrics: Option<metrics::Addr>,
}

/// Where a command reached the daemon from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The control socket: a local CLI of the store's owner; every command runs.
    Local,
    /// The fleet's TLS listener: an operator holding a client certificate of the fleet CA;
    /// only the commands allowed there run.
    Fleet,
}

/// Runs one command forwarded to the daemon (over either transport) against its context.
pub type Dispatch = fn(Vec<String>, &Ctx, Transport, &mut dyn Write, &mut dyn Write) -> i32;

/// Errors of the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Opening the store failed
    #[error(transparent)]
    Store(#[from] imagefs_store::StoreError),
    /// The control socket failed
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// Mounting failed
    #[error("mounting {path}: {source}")]
    Mount {
        /// Mountpoint.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Starting a thread or the signal handler failed
    #[error("daemon setup: {0}")]
    Setup(#[source] std::io::Error),
    /// The detached daemon failed before the mount was up
    #[error("the background daemon failed: {0}")]
    Background(String),
    /// Flushing instances at shutdown failed
    #[error(transparent)]
    Flush(#[from] imagefs_store::instance::InstanceError),
    /// The fleet listener (--listen, --tls-dir) could not be set up
    #[error(transparent)]
    Listen(#[from] tls::TlsError),
    /// The metrics endpoint (--metrics) could not be set up
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
}

/// Mounts the store and serves until unmounted (by a signal, `imagefs umount` or umount(8)).
/// With `daemonize`, returns in the parent as soon as the mount is up in the child.
pub fn run(cfg: MountConfig, dispatch: Dispatch) -> Result<(), DaemonError> {
    // Before detaching: a bad TLS file or a taken port is said where the user ran `mount`.
    let listener = tls::prepare(&cfg.listen, &cfg.store_dir)?;
    let scrapes = match &cfg.metrics {
        Some(a) => Some(metrics::bind(a, &cfg.store_dir)?),
        None => None,
    };
    let ready = if cfg.daemonize {
        match signals::daemonize(&cfg.store_dir).map_err(DaemonError::Setup)? {
            signals::Forked::Parent(result) => {
                return result.map_err(DaemonError::Background);
            }
            signals::Forked::Child(ready) => Some(ready),
        }
    } else {
        None
    };
    let result = serve(&cfg, dispatch, listener, scrapes, ready.as_ref());
    if let (Err(_), Some(metrics::Addr::Unix(p))) = (&result, &cfg.metrics) {
        // Ours (bound above): a daemon that never came up leaves no socket behind.
        let _ = std::fs::remove_file(p);
    }
    if let (Err(e), Some(r)) = (&result, ready) {
        r.fail(&e.to_string());
    }
    result
}

fn serve(
    cfg: &MountConfig,
    dispatch: Dispatch,
    listener_tls: Option<tls::Listener>,
    scrapes: Option<metrics::Listener>,
    ready: Option<&signals::Ready>,
) -> Result<(), DaemonError> {
    // Before any thread starts, so every thread inherits the blocked set.
    let signals = signals::block_stop_signals().map_err(DaemonError::Setup)?;
    let store = Arc::new(Store::open(&cfg.store_dir)?);
    // lazy versions read through the remotes' clients, built now from the store's config
    crate::cli::remote::attach(&store, true);
    match cfg.reserve {
        None => {}
        Some(crate::cli::Reserve::Bytes(b)) => store.set_reserve(b),
        Some(crate::cli::Reserve::Percent(p)) => {
            let (_, total) =
                imagefs_store::space::fs_space(&cfg.store_dir).map_err(DaemonError::Setup)?;
            store.set_reserve(total / 100 * p);
        }
    }
    let instances = Arc::new(Instances::new(&store));
    crate::mount::register_gc_roots(&store, &instances);
    let listener = control::bind(&cfg.store_dir)?;
    let access = imagefs_store::access::Access::of(&cfg.store_dir)?;
    let mut model = Model::new(store.clone(), instances.clone()).with_access(access);
    if cfg.flat_budget > 0 {
        match FlatCache::open(store.clone(), cfg.flat_budget) {
            Ok(flat) => model = model.with_flat(flat),
            // Reads still work, through the daemon; say why they are slower.
            Err(e) => {
                tracing::warn!(error = %e, "no flat copies: version files are served by the daemon")
            }
        }
    }
    let model = Arc::new(model);
    let flat_for_scrub = model.flat().cloned();
    let pool = Pool::new(SYNC_WORKERS).map_err(DaemonError::Setup)?;
    let fs = FuseFs::new(model.clone(), pool);
    let mut options = fuser::Config::default();
    options.mount_options = vec![
        fuser::MountOption::FSName("imagefs".into()),
        fuser::MountOption::Subtype("imagefs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::CUSTOM(format!("max_read={MAX_IO}")),
    ];
    options.acl = fuser::SessionACL::All;
    // Each session thread reads requests from its own clone of the /dev/fuse descriptor and
    // answers reads and writes itself (FUSE_DEV_IOC_CLONE, as libfuse's clone_fd).
    options.n_threads = Some(cfg.threads.max(1));
    options.clone_fd = true;
    let session = fuser::Session::new(fs, &cfg.mountpoint, &options).map_err(|source| {
        DaemonError::Mount {
            path: cfg.mountpoint.clone(),
            source,
        }
    })?;
    let life = Arc::new(Lifecycle::new(cfg.mountpoint.clone()));
    let inval = Invalidator::start(session.notifier()).map_err(DaemonError::Setup)?;
    let ctx = Arc::new(Ctx {
        store: store.clone(),
        instances: instances.clone(),
        live: Some(Live {
            model,
            inval,
            life: life.clone(),
            tell_guest: crate::vm::notify::tell_guest,
        }),
    });
    let handler = |transport: Transport| -> crate::wire::Handler {
        let ctx = ctx.clone();
        Arc::new(move |argv, out, err| dispatch(argv, &ctx, transport, out, err))
    };
    let local = handler(Transport::Local);
    std::thread::Builder::new()
        .name("control-accept".into())
        .spawn(move || control::serve(listener, local))
        .map_err(DaemonError::Setup)?;
    if let Some(l) = listener_tls {
        let fleet = handler(Transport::Fleet);
        tracing::info!(addr = ?l.local_addr().ok(), "fleet: serving commands over TLS");
        std::thread::Builder::new()
            .name("fleet-accept".into())
            .spawn(move || tls::serve(l, fleet))
            .map_err(DaemonError::Setup)?;
    }
    if let Some(l) = scrapes {
        tracing::info!(addr = ?l.local_addr(), "serving metrics");
        metrics::serve(l, store.clone())?;
    }
    signals::spawn_stop_thread(signals, life.clone()).map_err(DaemonError::Setup)?;
    spawn_reclaimer(Arc::downgrade(&instances)).map_err(DaemonError::Setup)?;
    if let (Some(flat), true) = (flat_for_scrub, cfg.scrub_rate > 0) {
        spawn_scrubber(
            Arc::downgrade(&flat),
            Arc::downgrade(&instances),
            cfg.scrub_rate,
        )
        .map_err(DaemonError::Setup)?;
    }

    life.on(Event::Mounted);
    tracing::info!(mountpoint = %cfg.mountpoint.display(), "mounted");
    match ready {
        Some(r) => r.ok(),
        None => eprintln!(
            "imagefs: serving {} at {} (Ctrl-C or `imagefs umount {}` to stop)",
            cfg.store_dir.display(),
            cfg.mountpoint.display(),
            cfg.mountpoint.display()
        ),
    }
    let served = session.run();
    life.on(Event::SessionEnded);
    // No fleet command may start on the store being closed.
    tls::stop();
    let flushed = instances.flush_all(&store);
    store.flush_remote_stats();
    let _ = std::fs::remove_file(control::socket_path(&cfg.store_dir));
    if let Some(metrics::Addr::Unix(p)) = &cfg.metrics {
        let _ = std::fs::remove_file(p);
    }
    life.on(Event::Closed);
    tracing::info!("unmounted; store closed");
    // Let a waiting `umount` answer before the process goes.
    control::drain(Duration::from_secs(5));
    served.map_err(|source| DaemonError::Mount {
        path: cfg.mountpoint.clone(),
        source,
    })?;
    flushed?;
    Ok(())
}
