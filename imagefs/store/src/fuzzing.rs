//! Entry points for fuzzing the store's parsers of untrusted bytes: each takes arbitrary input
//! and must return (an error is fine) without panicking, hanging or allocating in proportion
//! to a size the input merely claims. `imagefs/store/fuzz` drives them coverage-guided
//! (`make fuzz`, nightly); the store's tests replay the checked-in corpus on stable Rust.

use std::path::Path;

use crate::{open_image, ImageName, Store};

/// A disk image file (raw or qcow2): open it, read its start, its end and its data map.
pub fn image(data: &[u8]) {
    let Ok(dir) = tempfile_dir() else { return };
    let path = dir.join("image");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(mut src) = open_image(&path) {
        let size = src.size();
        let mut buf = vec![0u8; 4096];
        let _ = src.read_at(0, &mut buf);
        let _ = src.read_at(size.saturating_sub(4096), &mut buf);
        let _ = src.data_ranges(0, size.min(1 << 30));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A bundle applied to a store that holds a small base version.
pub fn bundle(data: &[u8]) {
    let Ok(dir) = tempfile_dir() else { return };
    let run = || -> Option<()> {
        let store = Store::init(&dir.join("s")).ok()?;
        let base = dir.join("base.img");
        std::fs::write(&base, vec![7u8; 3 * 4096]).ok()?;
        let mut src = open_image(&base).ok()?;
        store
            .import(
                &ImageName::new("web").ok()?,
                Some(4096),
                src.as_mut(),
                &mut |_| {},
            )
            .ok()?;
        let b = dir.join("in.bundle");
        std::fs::write(&b, data).ok()?;
        let _ = store.apply_bundle(&b);
        Some(())
    };
    let _ = run();
    let _ = std::fs::remove_dir_all(dir);
}

/// A checksummed record log (refs.log, instance logs), read as `open` would.
pub fn record_log(data: &[u8]) {
    let Ok(dir) = tempfile_dir() else { return };
    let path = dir.join("refs.log");
    if std::fs::write(&path, data).is_ok() {
        let _ = crate::log::RecordLog::read(&path);
        let _ = crate::instance_log::RecordLog::read(&path);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// An instance overlay record payload.
pub fn overlay_record(data: &[u8]) {
    if let Ok(ops) = crate::overlay::decode(data) {
        let mut o = crate::overlay::Overlay::new(16);
        for op in &ops {
            let _ = o.apply(op);
        }
        // what decodes re-encodes to the same ops
        assert_eq!(
            crate::overlay::decode(&crate::overlay::encode(&ops)).ok(),
            Some(ops)
        );
    }
}

/// A fresh private directory (no tempfile crate outside tests).
fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "imagefs-fuzz-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// A fuzz target: arbitrary bytes in, nothing out.
pub type Target = fn(&[u8]);

/// The targets by name, for the corpus replay and `make fuzz`.
pub const TARGETS: [(&str, Target); 4] = [
    ("image", image),
    ("bundle", bundle),
    ("record_log", record_log),
    ("overlay_record", overlay_record),
];

/// Runs every file of `corpus/<target>/` through its target.
pub fn replay(corpus: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for (name, target) in TARGETS {
        let dir = corpus.join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let data = std::fs::read(e?.path())?;
            target(&data);
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_checked_in_fuzz_corpus_replays_without_a_panic() {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let n = super::replay(&corpus).unwrap();
        assert!(n >= 8, "the corpus is missing ({n} inputs)");
    }
}
