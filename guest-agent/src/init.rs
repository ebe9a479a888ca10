//! The /init path: mount the pseudo filesystems, load the configured modules, mount the root disk
//! and switch root into it, then either hand pid 1 to the root's own init (`init=`) or start the
//! workload. Invariant: nothing here is fatal; a step that fails is logged and the agent still
//! comes up (in the initramfs if need be) to serve the channel.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::Config;
use crate::{log, power, sys};

const CONFIG_PATH: &str = "/etc/guest-agent.conf";
const NEWROOT: &str = "/newroot";

/// Runs the boot steps and returns the configuration the agent then serves with.
pub fn boot() -> Config {
    let start = Instant::now();
    for (dir, fstype, src) in [
        ("/dev", "devtmpfs", "devtmpfs"),
        ("/proc", "proc", "proc"),
        ("/sys", "sysfs", "sysfs"),
    ] {
        let _ = std::fs::create_dir_all(dir);
        if let Err(e) = sys::mount(src, dir, fstype, libc::MS_NOSUID) {
            log(&format!("{e}"));
        }
    }
    if let Err(e) = sys::redirect_stdio(Path::new("/dev/console")) {
        log(&format!("no console: {e}"));
    }
    let cfg = load_config();
    load_modules(&cfg);
    let mut switched = false;
    if let Some(root) = &cfg.root {
        match mount_root(&cfg, root) {
            Ok(()) => {
                log(&format!("root {root} mounted ({})", mode(cfg.rw)));
                switched = cfg.switch_root;
            }
            Err(e) => log(&format!("staying in the initramfs: {e}")),
        }
    }
    if let Some(init) = &cfg.init {
        if switched {
            log(&format!(
                "boot steps took {:?}; handing pid 1 to {init}",
                start.elapsed()
            ));
            let e = hand_off(init);
            log(&format!("{init} did not start: {e}; serving instead"));
        } else {
            log(&format!(
                "not handing pid 1 to {init}: the root disk is not switched into; serving"
            ));
        }
    }
    watch_power_button();
    if let Some(w) = &cfg.workload {
        match std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(w)
            .spawn()
        {
            Ok(child) => log(&format!("workload started (pid {})", child.id())),
            Err(e) => log(&format!("workload failed to start: {e}")),
        }
    }
    log(&format!("boot steps took {:?}", start.elapsed()));
    cfg
}

/// As pid 1 nobody else answers the ACPI power button, which our vmm presses on SIGTERM and
/// QEMU on `system_powerdown`. Its input device exists once `button` and `evdev` have loaded.
fn watch_power_button() {
    let devices = power::find(Path::new("/sys/class/input"), Path::new("/dev/input"));
    match power::watch(&devices, on_power_button) {
        Ok(0) => log(
            "no ACPI power button (modules button and evdev): the host must ask through the agent",
        ),
        Ok(_) => log(&format!(
            "watching the ACPI power button ({})",
            devices[0].display()
        )),
        Err(e) => log(&format!("cannot watch the ACPI power button: {e}")),
    }
}

fn on_power_button() {
    log("ACPI power button pressed: powering off");
    sys::sync();
    let e = sys::power_off();
    log(&format!("power off failed: {e}"));
}

fn mode(rw: bool) -> &'static str {
    if rw {
        "rw"
    } else {
        "ro"
    }
}

fn load_config() -> Config {
    let mut cfg = Config::default();
    match std::fs::read_to_string(CONFIG_PATH) {
        Ok(text) => {
            if let Err(e) = cfg.apply_file(&text) {
                log(&format!("{CONFIG_PATH}: {e}"));
            }
        }
        Err(e) => log(&format!("{CONFIG_PATH}: {e}; using defaults")),
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for e in cfg.apply_cmdline(&cmdline) {
        log(&format!("kernel command line: {e}"));
    }
    cfg
}

fn module_path(cfg: &Config, m: &str) -> PathBuf {
    if m.starts_with('/') {
        PathBuf::from(m)
    } else {
        cfg.module_dir.join(format!("{m}.ko"))
    }
}

fn load_modules(cfg: &Config) {
    for m in &cfg.modules {
        let path = module_path(cfg, m);
        let result = File::open(&path).and_then(|f| sys::finit_module(&f));
        if let Err(e) = result {
            log(&format!("module {}: {e}", path.display()));
        }
    }
}

/// Replaces this process (pid 1) with `init`; returns only if the exec failed.
///
/// What must not leak into the new pid 1 is already gone: every descriptor the agent opened is
/// close-on-exec (only stdio on /dev/console stays, as the kernel hands it to an init), no
/// thread or child has been started yet, and `Command::exec` restores the signal mask and the
/// SIGPIPE disposition that Rust's runtime changed. The initramfs was emptied by the switch.
fn hand_off(init: &str) -> std::io::Error {
    // The kernel's arguments for init (e.g. `single`) are meant for the real one.
    std::process::Command::new(init)
        .args(std::env::args_os().skip(1))
        .exec()
}

/// Deletes the initramfs's files before the switch: afterwards they are out of reach and would
/// pin their memory (a few MiB of agent and modules) for the guest's lifetime. Stays on the
/// initramfs's own filesystem (the new root and the moved mounts are others) and refuses to
/// touch a root that is not ramfs or tmpfs. Returns the bytes freed.
fn free_initramfs() -> std::io::Result<u64> {
    if !sys::is_ram_fs("/")? {
        return Err(std::io::Error::other("/ is not an initramfs; left as is"));
    }
    let dev = std::fs::symlink_metadata("/")?.dev();
    Ok(delete_tree(Path::new("/"), dev))
}

/// Removes what is under `dir` on device `dev`, best effort; returns the bytes of files removed.
fn delete_tree(dir: &Path, dev: u64) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut freed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            freed += delete_tree(&path, dev);
            let _ = std::fs::remove_dir(&path);
        } else if std::fs::remove_file(&path).is_ok() {
            freed += meta.len();
        }
    }
    freed
}

fn mount_root(cfg: &Config, root: &str) -> std::io::Result<()> {
    let waited = Instant::now();
    while !Path::new(root).exists() {
        if waited.elapsed() >= cfg.rootwait {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{root} did not appear within {:?}", cfg.rootwait),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::fs::create_dir_all(NEWROOT)?;
    let flags = if cfg.rw { 0 } else { libc::MS_RDONLY };
    sys::mount(root, NEWROOT, &cfg.rootfstype, flags)?;
    if !cfg.switch_root {
        return Ok(());
    }
    // Move the pseudo filesystems first: after the switch the initramfs is out of reach.
    for dir in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEWROOT}{dir}");
        if !Path::new(&target).is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("root disk has no {dir} to move onto"),
            ));
        }
    }
    for dir in ["/dev", "/proc", "/sys"] {
        sys::mount(dir, &format!("{NEWROOT}{dir}"), "", libc::MS_MOVE)?;
    }
    match free_initramfs() {
        Ok(bytes) => log(&format!("initramfs emptied ({} KiB freed)", bytes / 1024)),
        Err(e) => log(&format!("initramfs not emptied: {e}")),
    }
    std::env::set_current_dir(NEWROOT)?;
    sys::mount(".", "/", "", libc::MS_MOVE)?;
    sys::chroot(".")?;
    std::env::set_current_dir("/")?;
    Ok(())
}
