//! The agent's configuration: `key=value` lines in /etc/guest-agent.conf, then `agent.key=value`
//! (and the kernel's own `root=`, `rootfstype=`, `rw`, `ro`) on the kernel command line.
//! Invariant: parsing is pure; the command line always wins over the file; unknown keys are errors
//! in the file (typos must not pass silently) and ignored on the command line (it is shared).

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// a line that is not key=value
    #[error("line {line}: expected key=value")]
    Syntax { line: usize },
    /// a key the agent does not know
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    /// a value that does not parse for its key
    #[error("bad value {value:?} for {key}")]
    Value { key: String, value: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Modules to load in order: names (looked up as MODULE_DIR/NAME.ko) or absolute paths.
    pub modules: Vec<String>,
    pub module_dir: PathBuf,
    /// Root disk; None ("none") keeps the agent in the initramfs.
    pub root: Option<String>,
    pub rootfstype: String,
    pub rw: bool,
    pub rootwait: Duration,
    /// Switch root into the disk (else mount it at /newroot and stay in the initramfs).
    pub switch_root: bool,
    /// Shell command started once the root is in place.
    pub workload: Option<String>,
    /// As /init: the program (absolute path in the root disk) that becomes pid 1 once the root is
    /// switched, instead of the agent serving (a full guest's /sbin/init; the agent then runs as
    /// its service).
    pub init: Option<String>,
    /// The agent channel.
    pub device: String,
    /// Restart hooks: (file or directory, shell command).
    pub hooks: Vec<(String, String)>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            modules: Vec::new(),
            module_dir: PathBuf::from("/lib/modules"),
            root: Some("/dev/vda".into()),
            rootfstype: "ext4".into(),
            rw: false,
            rootwait: Duration::from_secs(10),
            switch_root: true,
            workload: None,
            init: None,
            device: "/dev/ttyS1".into(),
            hooks: Vec::new(),
        }
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "1" | "yes" | "true" | "on" => Ok(true),
        "0" | "no" | "false" | "off" => Ok(false),
        _ => Err(ConfigError::Value {
            key: key.into(),
            value: v.into(),
        }),
    }
}

impl Config {
    /// Sets one key.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let bad = || ConfigError::Value {
            key: key.into(),
            value: value.into(),
        };
        match key {
            "modules" => {
                self.modules = value
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(String::from)
                    .collect();
            }
            "module_dir" => self.module_dir = PathBuf::from(value),
            "root" => {
                self.root = match value {
                    "" | "none" => None,
                    v => Some(v.into()),
                }
            }
            "rootfstype" => self.rootfstype = value.into(),
            "rw" => self.rw = parse_bool(key, value)?,
            "rootwait_ms" => {
                self.rootwait = Duration::from_millis(value.parse().map_err(|_| bad())?)
            }
            "switch_root" => self.switch_root = parse_bool(key, value)?,
            "workload" => self.workload = Some(value.to_string()).filter(|w| !w.is_empty()),
            "init" => {
                self.init = match value {
                    "" | "none" => None,
                    v if v.starts_with('/') => Some(v.into()),
                    _ => return Err(bad()),
                }
            }
            "device" => self.device = value.into(),
            k => match k.strip_prefix("hook.") {
                Some(path) if path.starts_with('/') && !value.is_empty() => {
                    self.hooks.retain(|(p, _)| p != path);
                    self.hooks.push((path.to_string(), value.to_string()));
                }
                Some(_) => return Err(bad()),
                None => return Err(ConfigError::UnknownKey(k.into())),
            },
        }
        Ok(())
    }

    /// Applies a config file's text: `#` comments, blank lines, `key = value`.
    pub fn apply_file(&mut self, text: &str) -> Result<(), ConfigError> {
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or(ConfigError::Syntax { line: i + 1 })?;
            self.set(k.trim(), v.trim())?;
        }
        Ok(())
    }

    /// Applies the kernel command line; returns the `agent.*` entries that were rejected.
    pub fn apply_cmdline(&mut self, cmdline: &str) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        for word in split_cmdline(cmdline) {
            let (k, v) = word.split_once('=').unwrap_or((word.as_str(), ""));
            let result = match k {
                "root" | "rootfstype" => self.set(k, v),
                "rw" if v.is_empty() => self.set("rw", "1"),
                "ro" if v.is_empty() => self.set("rw", "0"),
                _ => match k.strip_prefix("agent.") {
                    Some(key) => self.set(key, v),
                    None => Ok(()),
                },
            };
            if let Err(e) = result {
                errors.push(e);
            }
        }
        errors
    }

    /// Hooks whose file or directory covers `file`.
    pub fn hooks_for<'a>(&'a self, file: &'a str) -> impl Iterator<Item = &'a (String, String)> {
        self.hooks.iter().filter(move |(p, _)| {
            file == p
                || file
                    .strip_prefix(p.trim_end_matches('/'))
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    }
}

/// Splits a kernel command line on spaces, keeping double-quoted spans together (quotes dropped).
fn split_cmdline(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_cmdline() {
        let mut c = Config::default();
        c.apply_file(
            "# modules in dependency order\nmodules = virtio, virtio_ring\nrw=0\n\
             hook./opt/app=/opt/app/restart\nworkload=/bin/sh -c 'sleep 1'\n",
        )
        .unwrap();
        assert_eq!(c.modules, ["virtio", "virtio_ring"]);
        assert_eq!(c.workload.as_deref(), Some("/bin/sh -c 'sleep 1'"));
        let errs = c.apply_cmdline(
            "console=ttyS0 root=/dev/vdb rw agent.rootwait_ms=50 agent.workload=\"echo hi\" agent.bogus=1",
        );
        assert_eq!(errs, vec![ConfigError::UnknownKey("bogus".into())]);
        assert_eq!(c.root.as_deref(), Some("/dev/vdb"));
        assert!(c.rw);
        assert_eq!(c.rootwait, Duration::from_millis(50));
        assert_eq!(c.workload.as_deref(), Some("echo hi"));
        c.apply_cmdline("agent.root=none");
        assert_eq!(c.root, None);
    }

    #[test]
    fn init_hand_off_key() {
        let mut c = Config::default();
        assert_eq!(c.init, None, "by default the agent serves as pid 1");
        c.apply_file("init=/sbin/init\n").unwrap();
        assert_eq!(c.init.as_deref(), Some("/sbin/init"));
        // The command line wins, and `none` (or empty) turns the hand-off off again.
        assert!(c.apply_cmdline("quiet agent.init=none").is_empty());
        assert_eq!(c.init, None);
        assert!(c
            .apply_cmdline("console=ttyS0 agent.init=/lib/systemd/systemd")
            .is_empty());
        assert_eq!(c.init.as_deref(), Some("/lib/systemd/systemd"));
        assert!(c.apply_cmdline("agent.init=").is_empty());
        assert_eq!(c.init, None);
        // A relative program would be looked up nowhere in particular: refused, setting kept.
        c.apply_file("init=/sbin/init").unwrap();
        assert!(matches!(
            c.apply_file("init=sbin/init"),
            Err(ConfigError::Value { .. })
        ));
        assert_eq!(
            c.apply_cmdline("agent.init=systemd"),
            vec![ConfigError::Value {
                key: "init".into(),
                value: "systemd".into()
            }]
        );
        assert_eq!(c.init.as_deref(), Some("/sbin/init"));
    }

    #[test]
    fn file_errors_are_typed() {
        let mut c = Config::default();
        assert_eq!(c.apply_file("x"), Err(ConfigError::Syntax { line: 1 }));
        assert_eq!(
            c.apply_file("colour=blue"),
            Err(ConfigError::UnknownKey("colour".into()))
        );
        assert!(matches!(
            c.apply_file("rw=maybe"),
            Err(ConfigError::Value { .. })
        ));
        assert!(matches!(
            c.apply_file("hook.relative=x"),
            Err(ConfigError::Value { .. })
        ));
    }

    #[test]
    fn hooks_match_files_and_directories() {
        let mut c = Config::default();
        c.apply_file("hook./opt/app=a\nhook./etc/app.conf=b\n")
            .unwrap();
        let names = |f| {
            c.hooks_for(f)
                .map(|(_, cmd)| cmd.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("/opt/app/bin/x"), ["a"]);
        assert_eq!(names("/etc/app.conf"), ["b"]);
        assert!(names("/opt/apple").is_empty());
    }
}
