//! diff, bundle, apply: what changed between versions, and moving only that between stores.

use imagefs_store::{ext4, Store, Version};
use serde_json::json;

use super::output::{human_bytes, Out};
use super::{resolve, ApplyArgs, BundleArgs, CliError, DiffArgs};

/// Merges sorted block indexes into `[offset, length]` byte ranges, clipped to `size`.
pub fn ranges(blocks: &[u64], block_size: u64, size: u64) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    for &b in blocks {
        let off = b * block_size;
        let len = block_size.min(size.saturating_sub(off));
        if len == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last[0] + last[1] == off => last[1] += len,
            _ => out.push([off, len]),
        }
    }
    out
}

pub fn diff(store: &Store, a: &DiffArgs, o: &mut Out<'_>) -> Result<(), CliError> {
    let (ia, la) = resolve(store, &a.a)?;
    let (ib, lb) = resolve(store, &a.b)?;
    let va = store.version(&ia)?;
    let vb = store.version(&ib)?;
    let blocks = store.diff(&ia, &ib)?;
    let bs = u64::from(va.block_size());
    let r = ranges(&blocks, bs, va.size().max(vb.size()));
    let bytes: u64 = r.iter().map(|x| x[1]).sum();
    let mut text = String::new();
    for [off, len] in &r {
        text.push_str(&format!(
            "{off:>14} {len:>10}  blocks {}..{}\n",
            off / bs,
            (off + len).div_ceil(bs)
        ));
    }
    text.push_str(&format!(
        "{la} -> {lb}: {} changed blocks in {} ranges, {}",
        blocks.len(),
        r.len(),
        human_bytes(bytes)
    ));
    let mut result = json!({
        "a": ia.to_hex(), "b": ib.to_hex(), "block_size": bs,
        "size_a": va.size(), "size_b": vb.size(),
        "ranges": r, "blocks": blocks, "changed_blocks": blocks.len(), "changed_bytes": bytes,
    });
    if a.files {
        files(store, (&va, &vb), (&blocks, &r), &mut result, &mut text);
    }
    o.result(result, &text)
}

/// `diff --files`: names the guest files and ext4 metadata in the changed blocks. An image
/// that is not ext4, or whose filesystem cannot be read, keeps its ranges with `"files": null`.
fn files(
    store: &Store,
    (va, vb): (&Version, &Version),
    (blocks, ranges): (&[u64], &[[u64; 2]]),
    result: &mut serde_json::Value,
    text: &mut String,
) {
    let (a, b) = (
        ext4::VersionReader { store, version: va },
        ext4::VersionReader { store, version: vb },
    );
    let bs = u64::from(va.block_size());
    let (fields, line) = match ext4::map_diff(&a, &b, bs, blocks) {
        Ok(Some(m)) => {
            let files = m.files();
            // A substitution between these versions (same size) will name the same files.
            if va.size() == vb.size() {
                let list = files.iter().cloned().collect();
                let (from, to) = (va.id().to_string(), vb.id().to_string());
                crate::guest_files::remember_files(
                    &from,
                    &to,
                    ranges,
                    (list, m.metadata_changed()),
                );
            }
            let kinds: Vec<String> = m.metadata().iter().map(|k| format!("{k:?}")).collect();
            let mut t = format!("\nfiles ({}):", files.len());
            for f in &files {
                t.push_str(&format!("\n  {f}"));
            }
            t.push_str(&format!(
                "\nfs metadata changed: {}",
                if kinds.is_empty() {
                    "none".to_string()
                } else {
                    kinds.join(", ")
                }
            ));
            (
                json!({"fs": "ext4", "files": files, "metadata_changed": m.metadata_changed(),
                    "metadata": m.metadata(), "fs_offset": m.fs_offset, "target_hashes": target_hashes(&b, &m),
                    "file_blocks": m.blocks}),
                t,
            )
        }
        Ok(None) => (
            json!({"fs": null, "files": null, "metadata_changed": null}),
            "\nfiles: not an ext2/3/4 image (ranges only)".to_string(),
        ),
        Err(e) => (
            json!({"fs": "ext4", "files": null, "metadata_changed": null, "fs_error": e.to_string()}),
            format!("\nfiles: cannot read the filesystem: {e} (ranges only)"),
        ),
    };
    if let (Some(r), serde_json::Value::Object(f)) = (result.as_object_mut(), fields) {
        r.extend(f);
    }
    text.push_str(&line);
}

/// blake3 of up to 64 of the changed files as they are in the target (B), read from the store's
/// version by the ext4 reader (the rollout's hash check); files absent from B are left out.
fn target_hashes(
    b: &dyn ext4::ReadAt,
    m: &ext4::FileMap,
) -> serde_json::Map<String, serde_json::Value> {
    let paths: std::collections::BTreeSet<&String> =
        m.blocks.iter().flat_map(|x| x.files.iter()).collect();
    let limits = ext4::Limits {
        time: std::time::Duration::from_secs(60),
    };
    let hashes = ext4::with_image(b, limits, |r| {
        let mut out = serde_json::Map::new();
        for p in paths.into_iter().take(64) {
            match r.hash(p) {
                Ok(Some(h)) => {
                    out.insert(p.clone(), json!(h.to_hex().to_string()));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(file = %p, error = %e, "cannot hash the target's copy"),
            }
        }
        out
    });
    hashes.unwrap_or_default()
}

pub fn bundle(store: &Store, a: &BundleArgs, o: &mut Out<'_>) -> Result<(), CliError> {
    let (ia, la) = resolve(store, &a.a)?;
    let (ib, _) = resolve(store, &a.b)?;
    let tag = match a.b.split_once(':') {
        Some(_) => Some(super::name_tag(&a.b)?.1),
        None => None,
    };
    if store.is_lazy(&ib)? {
        // the target's changed blocks of a lazy version, fetched in parallel up front
        let changed = store.diff(&ia, &ib)?;
        store.fetch_missing(
            &ib,
            Some(&changed),
            None,
            imagefs_store::remote::DEFAULT_JOBS,
        )?;
    }
    let r = store.write_bundle(&ia, &la, &ib, tag.as_ref(), &a.file)?;
    o.result(
        json!({"base": ia.to_hex(), "target": ib.to_hex(), "changes": r.changes,
               "blocks": r.blocks, "bytes": r.bytes, "file": a.file.display().to_string()}),
        &format!(
            "wrote {}: {} changed blocks, {} block payloads, {}",
            a.file.display(),
            r.changes,
            r.blocks,
            human_bytes(r.bytes)
        ),
    )
}

pub fn apply(store: &Store, a: &ApplyArgs, o: &mut Out<'_>) -> Result<(), CliError> {
    let r = store.apply_bundle(&a.file)?;
    let name = match &r.tag {
        Some(t) => format!("{}:{t}", r.image),
        None => r.image.to_string(),
    };
    o.result(
        json!({"image": r.image.as_str(), "tag": r.tag.as_ref().map(|t| t.to_string()),
               "id": r.target.to_hex(), "base": r.base.to_hex(), "changes": r.changes,
               "new_blocks": r.blocks}),
        &format!(
            "{name} = {} ({} changes, {} new blocks)",
            r.target.short(),
            r.changes,
            r.blocks
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::ranges;

    #[test]
    fn ranges_merge_adjacent_blocks_and_clip_the_tail() {
        assert_eq!(ranges(&[0, 1, 3], 10, 100), vec![[0, 20], [30, 10]]);
        assert_eq!(ranges(&[9], 10, 95), vec![[90, 5]]);
        assert_eq!(ranges(&[], 10, 95), Vec::<[u64; 2]>::new());
    }
}
