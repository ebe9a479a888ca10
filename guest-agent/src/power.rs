//! The ACPI power button, answered by pid 1. Hypervisors press it to ask for a clean shutdown
//! (our vmm on SIGTERM, QEMU's `system_powerdown`); Linux's button driver turns the press into a
//! KEY_POWER event on an input device named "Power Button". As /init nobody else listens, so
//! the agent does: a press syncs and powers off, as a Shutdown request would.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The input device name the ACPI button driver gives the power button.
const DEVICE_NAME: &str = "Power Button";
/// `struct input_event` on x86-64: a 16-byte timeval, then type u16, code u16, value i32.
const EVENT_LEN: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

/// The event devices (`DEV_DIR/eventN`) of every input device under `class_dir` (normally
/// /sys/class/input) whose name is "Power Button".
pub fn find(class_dir: &Path, dev_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(class_dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("event"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("device/name"))
                .map(|n| n.trim() == DEVICE_NAME)
                .unwrap_or(false)
        })
        .map(|e| dev_dir.join(e.file_name()))
        .collect();
    found.sort();
    found
}

/// True when `event` (one `struct input_event`) is a press of the power key.
fn is_power_press(event: &[u8]) -> bool {
    if event.len() != EVENT_LEN {
        return false;
    }
    let kind = u16::from_ne_bytes([event[16], event[17]]);
    let code = u16::from_ne_bytes([event[18], event[19]]);
    let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

/// Reads events from `source` until a power-key press (true) or the end of the stream (false).
fn wait_for_press(mut source: impl Read) -> bool {
    // evdev hands out whole events only, and at least one per read.
    let mut buf = [0u8; EVENT_LEN * 16];
    loop {
        match source.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                if buf[..n].chunks_exact(EVENT_LEN).any(is_power_press) {
                    return true;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Waits on every power button in `devices`, each on a thread of its own, and calls `on_press`
/// at a press. Devices are opened before this returns, so a press that comes after it is seen
/// (evdev drops events from before a reader opened the device).
pub fn watch(devices: &[PathBuf], on_press: fn()) -> std::io::Result<usize> {
    let mut watching = 0;
    for path in devices {
        let file = File::open(path)?;
        std::thread::Builder::new()
            .name("power-button".into())
            .spawn(move || {
                if wait_for_press(file) {
                    on_press();
                }
            })?;
        watching += 1;
    }
    Ok(watching)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; 16];
        e.extend_from_slice(&kind.to_ne_bytes());
        e.extend_from_slice(&code.to_ne_bytes());
        e.extend_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_power_key_press_counts() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(EV_KEY, 30, 1)), "another key");
        assert!(!is_power_press(&event(0, 0, 0)), "EV_SYN");
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 1)[..20]), "short");
    }

    #[test]
    fn a_press_after_other_events_is_found_and_eof_is_not_a_press() {
        let mut stream = event(0, 0, 0);
        stream.extend(event(EV_KEY, KEY_POWER, 0));
        assert!(!wait_for_press(&stream[..]));
        stream.extend(event(EV_KEY, KEY_POWER, 1));
        stream.extend(event(0, 0, 0));
        assert!(wait_for_press(&stream[..]));
    }

    #[test]
    fn finds_event_devices_by_input_name() -> std::io::Result<()> {
        let sys = tempfile::tempdir()?;
        for (node, name) in [
            ("event0", "AT Translated Set 2 keyboard"),
            ("event2", "Power Button"),
            ("mouse0", "Power Button"),
        ] {
            std::fs::create_dir_all(sys.path().join(node).join("device"))?;
            std::fs::write(
                sys.path().join(node).join("device/name"),
                format!("{name}\n"),
            )?;
        }
        std::fs::create_dir_all(sys.path().join("event5"))?; // no name: skipped
        assert_eq!(
            find(sys.path(), Path::new("/dev/input")),
            vec![PathBuf::from("/dev/input/event2")]
        );
        assert!(find(&sys.path().join("missing"), Path::new("/dev/input")).is_empty());
        Ok(())
    }
}
