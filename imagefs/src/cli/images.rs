//! import, ls, export, tag, rm: getting images in and out and naming their versions.
//! Invariant: export writes a temp file and renames it only when every block verified.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use imagefs_store::{check_block_size, open_image, Store, VersionId};
use serde_json::json;

use super::output::{human_bytes, Out};
use super::{name_tag, resolve, CliError, ExportArgs, ImportArgs, LsArgs, RmArgs, TagArgs};

pub fn import(store: &Store, a: &ImportArgs, o: &mut Out<'_>) -> Result<(), CliError> {
    let (image, tag) = name_tag(&a.name_tag)?;
    let bs = a.block_size.map(check_block_size).transpose()?;
    let mut src = open_image(&a.file)?;
    o.start("import", src.size());
    let mut progress_err = None;
    let report = store.import(&image, bs, src.as_mut(), &mut |p| {
        if let Err(e) = o.progress("import", p.done, p.total) {
            progress_err.get_or_insert(e);
        }
    })?;
    if let Some(e) = progress_err {
        return Err(e);
    }
    store.set_tag(&image, &tag, &report.id)?;
    let s = report.stats;
    o.result(
        json!({
            "image": image.as_str(), "tag": tag.as_str(), "id": report.id.to_hex(),
            "format": report.format, "size": report.size, "block_size": report.block_size,
            "new_blocks": s.new_blocks, "dedup_blocks": s.dedup_blocks, "holes": s.holes,
        }),
        &format!(
            "{image}:{tag} = {} ({} {}, {} new blocks, {} shared, {} holes)",
            report.id.short(),
            human_bytes(report.size),
            report.format,
            s.new_blocks,
            s.dedup_blocks,
            s.holes
        ),
    )
}

pub fn ls(store: &Store, a: &LsArgs, o: &mut Out<'_>) -> Result<(), CliError> {
    let images = store.images()?;
    if let Some(name) = &a.name {
        imagefs_store::ImageName::new(name)?;
        if !images.iter().any(|i| i.name.as_str() == name) {
            return Err(CliError::new(3, format!("no image named {name}")));
        }
    }
    let wanted = |n: &str| a.name.as_deref().is_none_or(|w| w == n);
    let mut tags_of: BTreeMap<VersionId, Vec<String>> = BTreeMap::new();
    let mut jimages = Vec::new();
    for img in images.iter().filter(|i| wanted(i.name.as_str())) {
        let mut tags = serde_json::Map::new();
        for (t, id) in &img.tags {
            tags.insert(t.to_string(), json!(id.to_hex()));
            tags_of.entry(*id).or_default().push(t.to_string());
        }
        jimages
            .push(json!({"name": img.name.as_str(), "block_size": img.block_size, "tags": tags}));
    }
    let mut jversions = Vec::new();
    let mut text = format!(
        "{:<20} {:<16} {:<14} {:>12} {:>7} CREATED\n",
        "IMAGE", "TAGS", "VERSION", "SIZE", "LOCAL"
    );
    for v in store
        .versions()?
        .iter()
        .filter(|v| wanted(v.image.as_str()))
    {
        let tags = tags_of.get(&v.id).cloned().unwrap_or_default();
        // how much of a lazy version is in this store (the rest is in its remote)
        let (local, remote) = match store.lazy_status(&v.id)? {
            Some(s) if s.blocks > 0 => (
                (s.blocks - s.absent.min(s.blocks)) as f64 / s.blocks as f64,
                Some(s.remote),
            ),
            _ => (1.0, None),
        };
        jversions.push(json!({
            "id": v.id.to_hex(), "image": v.image.as_str(), "size": v.size,
            "block_size": v.block_size, "created": v.created, "tags": tags,
            "local": local, "lazy_remote": remote,
        }));
        let pct = local * 100.0;
        // never rounded up to 100%: that means every block is here
        let local_s = if local >= 1.0 {
            "100%".to_string()
        } else if pct < 10.0 {
            format!("{pct:.1}%")
        } else {
            format!("{:.0}%", pct.floor().min(99.0))
        };
        text.push_str(&format!(
            "{:<20} {:<16} {:<14} {:>12} {:>7} {}\n",
            v.image.as_str(),
            if tags.is_empty() {
                "-".to_string()
            } else {
                tags.join(",")
            },
            v.id.short(),
            human_bytes(v.size),
            local_s,
            v.created
        ));
    }
    o.result(json!({"images": jimages, "versions": jversions}), &text)
}

pub fn export(store: &Store, a: &ExportArgs, o: &mut Out<'_>) -> Result<(), CliError> {
    let (id, label) = resolve(store, &a.version)?;
    if store.is_lazy(&id)? {
        // all of a lazy version is needed: fetched in parallel up front (then it is local)
        store.fetch_missing(&id, None, None, imagefs_store::remote::DEFAULT_JOBS)?;
    }
    let v = store.version(&id)?;
    let tmp = {
        let mut name = a
            .file
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(format!(".imagefs-tmp-{}", std::process::id()));
        a.file.with_file_name(name)
    };
    let io = |op: &str, e: std::io::Error| CliError::new(1, format!("{op} {}: {e}", tmp.display()));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    let result = (|| -> Result<(), CliError> {
        let bs = u64::from(v.block_size());
        let mut buf = vec![0u8; bs as usize];
        o.start("export", v.size());
        for i in 0..v.block_count() {
            let off = i * bs;
            if let Some(h) = v.block_hash(i)? {
                store.read_block(&h, &mut buf).map_err(|e| {
                    CliError::new(
                        super::exit_code(e.kind()),
                        format!(
                            "{label} (version {}): block {i} at offset {off} (hash {}): {e}",
                            id.short(),
                            h.short()
                        ),
                    )
                })?;
                let len = bs.min(v.size() - off) as usize;
                file.write_all_at(&buf[..len], off)
                    .map_err(|e| io("write", e))?;
            }
            if i % 256 == 255 {
                o.progress("export", off + bs, v.size())?;
            }
        }
        file.set_len(v.size()).map_err(|e| io("truncate", e))?;
        file.sync_all().map_err(|e| io("fsync", e))?;
        imagefs_store::fault::point("export.before_rename");
        std::fs::rename(&tmp, &a.file).map_err(|e| io("rename", e))?;
        imagefs_store::log::sync_parent(&a.file).map_err(|e| io("fsync dir of", e))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    o.result(
        json!({"id": id.to_hex(), "size": v.size(), "file": a.file.display().to_string()}),
        &format!(
            "exported {label} ({}) to {}",
            human_bytes(v.size()),
            a.file.display()
        ),
    )
}

pub fn tag(store: &Store, a: &TagArgs, o: &mut Out<'_>) -> Result<(), CliError> {
    let (image, tag) = name_tag(&a.name_tag)?;
    let (id, _) = resolve(store, &a.version)?;
    let previous = store.resolve(&a.name_tag).ok();
    store.set_tag(&image, &tag, &id)?;
    o.result(
        json!({"image": image.as_str(), "tag": tag.as_str(), "id": id.to_hex(),
               "previous": previous.map(|p| p.to_hex())}),
        &format!("{image}:{tag} = {}", id.short()),
    )
}

pub fn rm(store: &Store, a: &RmArgs, o: &mut Out<'_>) -> Result<(), CliError> {
    // validate all first so a bad argument changes nothing
    let mut parsed = Vec::new();
    for s in &a.name_tags {
        let nt = name_tag(s)?;
        store.resolve(s)?;
        parsed.push(nt);
    }
    let mut removed = Vec::new();
    let mut text = String::new();
    for (image, tag) in parsed {
        let id = store.remove_tag(&image, &tag)?;
        text.push_str(&format!("removed {image}:{tag} (was {})\n", id.short()));
        removed.push(json!({"image": image.as_str(), "tag": tag.as_str(), "id": id.to_hex()}));
    }
    o.result(json!({"removed": removed}), &text)
}
