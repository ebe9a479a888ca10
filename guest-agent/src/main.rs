//! guest-agent: the guest's side of block substitution. As pid 1 it boots the guest (see `init`)
//! and then serves; as a service (under systemd) it only serves. Invariant: as pid 1 it never
//! exits except by powering the machine off.

mod config;
mod init;
mod notice;
mod ops;
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
  disk and switches into it, then serves the agent channel. Otherwise it serves the channel only.";

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
    match serve::serve(&cfg, false) {
        Ok(()) => {
            log("shutdown requested: powering off");
            let status = std::process::Command::new("systemctl")
                .arg("poweroff")
                .status();
            if let Err(e) = status {
                log(&format!("systemctl poweroff: {e}"));
            }
        }
        Err(e) => {
            log(&format!("channel {}: {e}", cfg.device));
            std::process::exit(1);
        }
    }
}
