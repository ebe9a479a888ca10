//! init, fsck, gc: creating a store and keeping it healthy.

use std::path::Path;

use imagefs_store::instance::Instances;
use imagefs_store::Store;
use serde_json::json;

use super::output::{human_bytes, Out};
use super::CliError;

pub fn init(dir: &Path, a: &super::InitArgs, o: &mut Out<'_>) -> Result<(), CliError> {
    let access = match &a.group {
        None => imagefs_store::access::Access::default(),
        Some(name) => imagefs_store::access::Access {
            group: Some(
                imagefs_store::access::group_id(name)
                    .ok_or_else(|| CliError::new(3, format!("no group named {name:?}")))?,
            ),
        },
    };
    Store::init_shared(dir, access)?;
    o.result(
        json!({"store": dir.display().to_string(), "format": imagefs_store::FORMAT}),
        &format!("initialized store {}", dir.display()),
    )
}

/// `fsck --repair --drop-damaged`: repairs each damaged record log of the store (refs.log and the
/// instance logs) at its damage, saving a copy beside it first; says what it cut.
pub fn drop_damaged_logs(dir: &Path, o: &mut Out<'_>) -> Result<(), CliError> {
    let mut logs = vec![dir.join("refs.log")];
    if let Ok(entries) = std::fs::read_dir(dir.join("instances")) {
        logs.extend(
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log")),
        );
    }
    for log in logs {
        if !log.exists() {
            continue;
        }
        let cut = imagefs_store::log::drop_damaged(&log).map_err(|e| {
            CliError::new(1, format!("dropping damage from {}: {e}", log.display()))
        })?;
        if let Some(imagefs_store::log::Repaired { dropped, copy }) = cut {
            let ranges: Vec<String> = dropped
                .iter()
                .map(|(off, len)| format!("{len} bytes at offset {off}"))
                .collect();
            o.note(&format!(
                "REPAIRED {}: dropped {}; every other record kept; the whole file was saved as {}",
                log.display(),
                ranges.join(", "),
                copy.display()
            ))?;
        }
    }
    Ok(())
}

pub fn fsck(store: &Store, repaired: bool, o: &mut Out<'_>) -> Result<(), CliError> {
    let mut versions_total = 0;
    o.start("fsck", 0);
    let mut out_err = None;
    let mut progress = |done, total| {
        versions_total = total;
        if let Err(e) = o.progress("fsck", done, total) {
            out_err.get_or_insert(e);
        }
    };
    // only a repair run (store opened to itself) may delete bad flat copies
    let r = if repaired {
        store.fsck_repair(&mut progress)?
    } else {
        store.fsck(&mut progress)?
    };
    if let Some(e) = out_err {
        return Err(e);
    }
    let as_json = |list: &[imagefs_store::Problem]| -> Vec<serde_json::Value> {
        list.iter()
            .map(|p| {
                json!({"image": p.image, "version": p.version.map(|v| v.to_hex()),
                       "block": p.block, "offset": p.offset, "detail": p.detail})
            })
            .collect()
    };
    let problems = as_json(&r.problems);
    let flat_removed = as_json(&r.flat_removed);
    let mut text = String::new();
    for p in &r.flat_removed {
        let v = p.version.map(|v| v.short()).unwrap_or_default();
        text.push_str(&format!("REPAIRED {} {v}: {}\n", p.image, p.detail));
    }
    for p in &r.problems {
        match (p.version, p.block, p.offset) {
            (Some(v), Some(b), Some(off)) => text.push_str(&format!(
                "PROBLEM {} {}: block {b} at offset {off}: {}\n",
                p.image,
                v.short(),
                p.detail
            )),
            (Some(v), _, _) => text.push_str(&format!(
                "PROBLEM {} {}: {}\n",
                p.image,
                v.short(),
                p.detail
            )),
            (None, _, Some(off)) => {
                text.push_str(&format!("PROBLEM at offset {off}: {}\n", p.detail))
            }
            _ => text.push_str(&format!("PROBLEM store: {}\n", p.detail)),
        }
    }
    text.push_str(&format!(
        "{}checked {} versions, {} blocks ({} distinct bytes), {} nodes, {} flat copies ({}), \
         instance data ({}): {}",
        if repaired { "index rebuilt; " } else { "" },
        r.versions,
        r.blocks,
        human_bytes(r.bytes_checked),
        r.nodes,
        r.flat_copies,
        human_bytes(r.flat_bytes_checked),
        human_bytes(r.instance_bytes_checked),
        if r.remote_blocks > 0 {
            // a lazy version's absent blocks are in its remote: fetched on first read
            format!(
                "{} blocks remote (lazy versions), {}",
                r.remote_blocks,
                if r.problems.is_empty() { "clean" } else { "" }
            )
        } else if r.problems.is_empty() {
            "clean".to_string()
        } else {
            format!("{} problems", r.problems.len())
        }
    ));
    let ok = r.problems.is_empty();
    o.result(
        json!({"ok": ok, "repaired": repaired, "versions": r.versions, "blocks": r.blocks,
               "nodes": r.nodes, "bytes_checked": r.bytes_checked, "problems": problems,
               "flat_copies": r.flat_copies, "flat_bytes_checked": r.flat_bytes_checked,
               "flat_removed": flat_removed,
               "instance_bytes_checked": r.instance_bytes_checked,
               "remote_blocks": r.remote_blocks}),
        &text,
    )?;
    if ok {
        Ok(())
    } else {
        let mut e = CliError::new(5, format!("fsck found {} problems", r.problems.len()));
        e.reported = true;
        Err(e)
    }
}

pub fn gc(store: &Store, instances: &Instances, o: &mut Out<'_>) -> Result<(), CliError> {
    let r = store.gc()?;
    // Instance data replaced by later writes goes back to the filesystem at once.
    let reclaimed = instances.reclaim_all(store)?;
    let removed: Vec<String> = r.versions_removed.iter().map(|v| v.to_hex()).collect();
    o.result(
        json!({"versions_removed": removed, "objects_freed": r.objects_freed,
               "bytes_freed": r.bytes_freed, "packs_rewritten": r.packs_rewritten,
               "instance_bytes_reclaimed": reclaimed}),
        &format!(
            "removed {} versions, freed {} objects ({}), reclaimed {} of instance data",
            removed.len(),
            r.objects_freed,
            human_bytes(r.bytes_freed),
            human_bytes(reclaimed)
        ),
    )
}
