//! guest-agent: the guest's side of block substitution. As pid 1 it boots the guest (see `init`)
//! and then serves, or hands pid 1 to the root disk's own init; as a service (under systemd) it
//! only serves. Invariant: as pid 1 it never exits except by powering the machine off (or by
//! exec'ing the configured init).

mod config;
mod init;
mod notice;
mod ops;
mod power;
mod serve;
mod sys;

use std::io::Write;
use std::time::Duration;

use config::Config;

/// One line on stderr (the console as /init, the journal as a service); output errors ignored.
pub(crate) fn log(msg: &str) {
    let _ = writeln!(std::io::stderr(), "guest-agent: {msg}");
}

const USAGE: &str = "usage: guest-agent [--config FILE] [--device TTY]
  As pid 1 (/init of an initramfs) it mounts /proc, /sys, /dev, loads modules, mounts the root
  disk and switches into it, then serves the agent channel (or, with init=PROGRAM, makes that
  program pid 1). Otherwise it serves the channel only, as a service.";

/// Service mode: configuration from a file (optional) and the kernel command line.
fn service_config(args: &[String]) -> Result<Config, String> {
    let mut cfg = Config::default();
    let mut config_path = "/etc/guest-agent.conf".to_string();
    let mut device = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => config_path = it.next().ok_or("--config needs a file")?.clone(),
            "--device" => device = Some(it.next().ok_or("--device needs a path")?.clone()),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    match std::fs::read_to_string(&config_path) {
        Ok(text) => cfg
            .apply_file(&text)
            .map_err(|e| format!("{config_path}: {e}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{config_path}: {e}")),
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    for e in cfg.apply_cmdline(&cmdline) {
        log(&format!("kernel command line: {e}"));
    }
    if let Some(d) = device {
        cfg.device = d;
    }
    Ok(cfg)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::process::id() == 1 {
        let cfg = init::boot();
        loop {
            match serve::serve(&cfg, true) {
                Ok(()) => {
                    log("shutdown requested: powering off");
                    sys::sync();
                    let e = sys::power_off();
                    log(&format!("power off failed: {e}"));
                }
                Err(e) => log(&format!("channel {}: {e}; retrying", cfg.device)),
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let cfg = match service_config(&args) {
        Ok(c) => c,
        Err(msg) => {
            log(&msg);
            std::process::exit(2);
        }
    };
    watch_power_button();
    loop {
        match serve::serve(&cfg, false) {
            // Keep serving until the init system stops the service on its way down (and if
            // the power-off could not be asked for, the host can still reach the guest).
            Ok(()) => request_power_off(),
            Err(e) => {
                // The service manager restarts the agent (Restart=always).
                log(&format!("channel {}: {e}", cfg.device));
                std::process::exit(1);
            }
        }
    }
}

/// Service mode: a press of the ACPI power button (how our vmm passes on SIGTERM) asks the init
/// system to power off. systemd-logind would do the same, but a minimal guest has no logind
/// (it needs D-Bus); where it runs too, the second request for the same job is harmless.
fn watch_power_button() {
    let devices = power::find(
        std::path::Path::new("/sys/class/input"),
        std::path::Path::new("/dev/input"),
    );
    match power::watch(&devices, on_power_button) {
        Ok(0) => log("no ACPI power button seen (modules button and evdev)"),
        Ok(_) => log("watching the ACPI power button"),
        Err(e) => log(&format!("cannot watch the ACPI power button: {e}")),
    }
}

fn on_power_button() {
    log("ACPI power button pressed");
    request_power_off();
}

/// Service mode: power off through the init system, so units stop in order and filesystems are
/// synced and unmounted; reboot(2) from here would pull the machine from under it.
fn request_power_off() {
    // What sd_booted() checks: systemd is pid 1.
    if !std::path::Path::new("/run/systemd/system").is_dir() {
        log("shutdown requested: running poweroff");
        match std::process::Command::new("poweroff").status() {
            Ok(s) if s.success() => {}
            Ok(s) => log(&format!("poweroff: {s}")),
            Err(e) => log(&format!("poweroff: {e}")),
        }
        return;
    }
    log("shutdown requested: asking systemd to power off");
    // --no-block: the job is queued and this service is then stopped like any other.
    match std::process::Command::new("systemctl")
        .args(["--no-block", "poweroff"])
        .status()
    {
        Ok(s) if s.success() => return,
        Ok(s) => log(&format!("systemctl poweroff: {s}; signalling pid 1")),
        Err(e) => log(&format!("systemctl poweroff: {e}; signalling pid 1")),
    }
    // SIGRTMIN+4 is systemd's own "start poweroff.target".
    if let Err(e) = sys::signal_init(libc::SIGRTMIN() + 4) {
        log(&format!("{e}"));
    }
}
