//! Power cuts (issue 11 §4): a store workload runs inside a software-emulated VM whose disk (a raw
//! file here, ext4 made by mkfs.ext4) is opened with `cache=none`; QEMU is killed with SIGKILL at
//! a random moment, and the next boot on the same disk checks that `imagefs fsck` is clean and
//! that everything the workload saw acknowledged is intact. Unlike the kill -9 tests, the guest's
//! page cache dies with the VM, so this tests the order and presence of fsyncs.
//!
//! The workload (a busybox script calling the real `imagefs`, the daemon serving a FUSE mount):
//! imports of small images, bundle applies, `instance create`, 6 KiB writes to the instance file
//! with `dd conv=fsync` (a FUSE fsync: a guest FLUSH), `substitute --keep-local`, tag removals and
//! `gc`. Each operation prints `BEGIN <op>` before it and `ACK <what is now durable> #` after it
//! succeeded; the host turns the ACKs into a model (tag -> sha256 of its raw bytes, instance
//! range -> the noise it was written from, instance tail -> the substituted version's tail), drops
//! what the operation in flight at the cut may have changed, and the next boot compares the model
//! with what the store serves. Every boot checks the whole model (not only the last boot's ACKs);
//! old instances and tags are removed by the workload so it stays small for any number of cuts.
//!
//! `CRASH_CUTS` (default 3) cuts = that many + 1 boots; `CRASH_SEED` (default the clock) picks
//! the cut moments, printed as CRASH_SEED=N. Ends with
//! `POWERCUT cuts=N acked_checked=M damage=0 seed=S`.
//!
//! A cut can land after an operation finished but before its console line reached this host
//! (the serial console lags the workload by up to an operation or so): so an operation that
//! removes or changes what an earlier ACK named (tag and instance removal, substitution) first
//! appends its intent to /d/intents with fsync, and the check skips (or, for a substitution,
//! also accepts) what a durable intent says may have changed. Additions (imports, writes to
//! fresh ranges, new instances) need no intent: unacknowledged ones are simply not checked.
//!
//! Timing on the 2-core development host, QEMU 7.2 TCG, Debian's 6.1 cloud kernel, other builds
//! and tests running beside it (Dec 2026; the test prints `boot k: ...` lines): the outer VM
//! reaches the mounted disk 3-10 s after QEMU starts (guest uptime), the daemon and the checks
//! take 2-6 s more; a workload round (import, three 6 KiB writes with fsync, substitute, two
//! tag removals, gc, apply) takes 1.5-4 s. A boot that is cut takes 10-40 s of wall time (cut
//! 0-30 s into the workload), the final check-only boot 9-15 s: 3 cuts ran in 110-115 s.
//! The cut window is 30 s because the guest kernel writes dirty pages back about 30 s after
//! they were dirtied (`dirty_expire_centisecs`): a missing fsync loses what was written in the
//! last ~30 s before the cut, and with the instance data file's fdatasync removed the first
//! cut already showed every write of the boot lost and fsck exit 5.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use imagefs_tests::nested::{self, Mode, Scenario};
use imagefs_tests::{bin, noise, skip, tool_command};

/// The cut falls uniformly in this window after `WORKLOAD-START`: the cleanup, the bundle
/// applies, the instance creation and 8-15 rounds under TCG, and the guest's ~30 s writeback
/// delay (see the module doc).
const CUT_WINDOW: Duration = Duration::from_secs(30);

/// Block size of the images (the store's default), and their size.
const BLOCK: usize = 64 << 10;
const IMAGE_BYTES: usize = 32 * BLOCK;

/// Bundles img:base -> img:uK for these K.
const UPDATES: [u32; 3] = [1, 2, 3];

#[test]
fn power_cuts_leave_fsck_clean_and_every_acknowledged_item_intact() {
    if let Some(why) = nested::missing_prerequisite() {
        skip!("{why}");
    }
    if let Some(why) = imagefs_tests::missing_tools(&["mkfs.ext4"]) {
        skip!("{why}");
    }
    if !bin("imagefs").is_file() {
        skip!("{} is not built", bin("imagefs").display());
    }
    if !nested::module("fs/fuse/fuse.ko").is_file() {
        skip!("the guest kernel has no fuse.ko (scripts/fetch-kernel.sh)");
    }
    power_cuts().unwrap_or_else(|e| panic!("{e:#}"));
}

/// What the workload saw acknowledged, by key (`tag:NAME:TAG`, `inst:ID`, `write:ID:SEEK`,
/// `sub:ID`): the value the next boot must find.
type Model = BTreeMap<String, String>;

fn power_cuts() -> anyhow::Result<()> {
    let cuts: u32 = match std::env::var("CRASH_CUTS") {
        Ok(v) => v.parse().context("CRASH_CUTS")?,
        Err(_) => 3,
    };
    let seed: u64 = match std::env::var("CRASH_SEED") {
        Ok(v) => v.parse().context("CRASH_SEED")?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64,
    };
    eprintln!("CRASH_SEED={seed} CRASH_CUTS={cuts}");
    // Under target/, not /tmp: QEMU opens the disk with O_DIRECT, which an older tmpfs refuses.
    let parent = imagefs_tests::workspace_root().join("target/powercut");
    std::fs::create_dir_all(&parent)?;
    let dir = tempfile::tempdir_in(&parent)?;
    let d = dir.path();
    let fx = fixtures(d)?;
    let mut rng = SplitMix(seed);
    let mut model = Model::new();
    let mut checked = 0usize;
    let mut skips = 0usize;
    let mut prev_delay = Duration::ZERO;
    let mut subs_seen = BTreeMap::new();
    let total = Instant::now();
    for boot in 0..=cuts {
        let last = boot == cuts;
        let script = boot_script(boot, &model, &subs_seen, &fx, last);
        let mut sc = Scenario::new(&script)
            .mode(Mode::Nested)
            .with_fuse()
            .file(&fx.imagefs, "/bin/imagefs")
            .file(&fx.base, "/work/base.raw")
            .file(&fx.noise, "/work/noise.bin")
            .disk(&fx.disk)
            .timeout(Duration::from_secs(400))
            .memory_mib(1024);
        for (k, bundle) in &fx.bundles {
            sc = sc.file(bundle, &format!("/work/b{k}.bundle"));
        }
        let delay = Duration::from_millis(rng.next() % CUT_WINDOW.as_millis() as u64);
        if !last {
            sc = sc.cut_after("WORKLOAD-START", delay);
        }
        let o = sc.run()?;
        let out = &o.output;
        let at = |marker: &str| -> String {
            out.lines()
                .find_map(|l| l.strip_prefix(marker))
                .map_or("-".into(), |t| t.trim().to_string())
        };
        let acks = out.lines().filter(|l| is_ack(l)).count();
        eprintln!(
            "boot {boot}: {:.1}s (uptime at disk mount {}s, at workload start {}s), cut {} \
             after the workload started, {acks} ACKs, {} rounds",
            o.elapsed.as_secs_f64(),
            at("MOUNTED t="),
            at("WORKLOAD-START t="),
            if last {
                "none".to_string()
            } else {
                format!("{:.1}s", delay.as_secs_f64())
            },
            out.lines().filter(|l| l.starts_with("ROUND ")).count(),
        );
        if boot > 0 {
            let fsck = at("FSCK-RC=");
            let bad: Vec<&str> = out.lines().filter(|l| l.starts_with("CHECK-BAD")).collect();
            let ok = out.lines().filter(|l| l.starts_with("CHECK-OK")).count();
            let skipped: Vec<&str> = out
                .lines()
                .filter_map(|l| l.strip_prefix("CHECK-SKIP "))
                .collect();
            let done = out.contains("CHECKS-DONE");
            let expected = model.len();
            if fsck != "0" || !bad.is_empty() || ok + skipped.len() != expected || !done {
                // Each item that failed or was never reported, and a fsck that was not clean.
                let damage = expected.saturating_sub(ok + skipped.len()).max(bad.len())
                    + usize::from(fsck != "0");
                eprintln!(
                    "POWERCUT cuts={boot} acked_checked={} damage={damage} seed={seed}",
                    checked + ok
                );
                bail!(
                    "after cut {boot} (CRASH_SEED={seed}, cut {:.1}s after WORKLOAD-START): \
                     fsck exit {fsck}, {ok} of {expected} acknowledged items intact ({} \
                     skipped), bad: {bad:#?}\noutput of the check boot:\n{out}",
                    prev_delay.as_secs_f64(),
                    skipped.len(),
                );
            }
            checked += ok;
            skips += skipped.len();
            // What an operation with a durable intent may have removed is unknown from now on.
            for key in skipped {
                model.remove(key.trim());
            }
            // A substitution whose intent was durable but whose ACK never arrived happened:
            // its tail is what later boots must find.
            for (key, now) in out
                .lines()
                .filter_map(|l| l.strip_prefix("CHECK-OK ")?.split_once(" now="))
            {
                model.insert(key.to_string(), now.trim().to_string());
            }
        }
        if last {
            ensure!(
                o.status == 0 && out.contains("LAST-BOOT-DONE"),
                "the last boot failed (status {}):\n{out}",
                o.status
            );
            break;
        }
        ensure!(
            o.cut,
            "boot {boot}: the workload ended before the cut (status {}):\n{out}",
            o.status
        );
        apply_acks(&mut model, out);
        subs_seen = substitutions_seen(out);
        prev_delay = delay;
    }
    eprintln!(
        "POWERCUT cuts={cuts} acked_checked={checked} damage=0 seed={seed} ({skips} skipped: \
         their removal was in flight; {:.0}s in all)",
        total.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A whole ACK line: the trailing `#` tells it from a line the cut truncated.
fn is_ack(line: &str) -> bool {
    line.starts_with("ACK ") && line.ends_with(" #")
}

/// Folds a boot's ACKs into the model, then forgets what the operation in flight at the cut (a
/// BEGIN without its ACK) may or may not have changed.
fn apply_acks(model: &mut Model, out: &str) {
    let drop_instance = |model: &mut Model, id: &str| {
        model.retain(|k, _| {
            k != &format!("inst:{id}")
                && k != &format!("sub:{id}")
                && !k.starts_with(&format!("write:{id}:"))
        });
    };
    let mut in_flight: Option<Vec<String>> = None;
    for line in out.lines() {
        if let Some(op) = line.strip_prefix("BEGIN ") {
            in_flight = Some(op.split_whitespace().map(str::to_string).collect());
            continue;
        }
        if !is_ack(line) {
            continue;
        }
        in_flight = None;
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["ACK", "tag", tag, sha, "#"] => {
                model.insert(format!("tag:{tag}"), sha.to_string());
            }
            ["ACK", "rmtag", tag, "#"] => {
                model.remove(&format!("tag:{tag}"));
            }
            ["ACK", "inst", id, "#"] => {
                model.insert(format!("inst:{id}"), "yes".into());
            }
            ["ACK", "rminst", id, "#"] => drop_instance(model, id),
            ["ACK", "write", id, seek, skip, "#"] => {
                model.insert(format!("write:{id}:{seek}"), skip.to_string());
            }
            ["ACK", "sub", id, tail, "#"] => {
                model.insert(format!("sub:{id}"), tail.to_string());
            }
            _ => {}
        }
    }
    if let Some(op) = in_flight {
        let op: Vec<&str> = op.iter().map(String::as_str).collect();
        match op.as_slice() {
            ["tag" | "rmtag", tag, ..] => {
                model.remove(&format!("tag:{tag}"));
            }
            ["rminst", id, ..] => drop_instance(model, id),
            ["sub", id, ..] => {
                model.remove(&format!("sub:{id}"));
            }
            // A write goes to a range no ACK names; gc and instance creation change nothing
            // the model holds.
            _ => {}
        }
    }
}

/// How many substitutions of each instance the boot acknowledged: the intents after them (in
/// /d/intents, in order) are the substitutions that may have happened unseen.
fn substitutions_seen(out: &str) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for line in out.lines().filter(|l| is_ack(l)) {
        if let ["ACK", "sub", id, ..] = line.split_whitespace().collect::<Vec<_>>().as_slice() {
            *seen.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    seen
}

/// The files every boot gets, made once.
struct Fixtures {
    disk: PathBuf,
    imagefs: PathBuf,
    base: PathBuf,
    noise: PathBuf,
    /// K -> bundle img:base -> img:uK.
    bundles: Vec<(u32, PathBuf)>,
    /// K -> sha256 of img:uK's raw bytes, and of its last block.
    update_sha: BTreeMap<u32, (String, String)>,
}

fn fixtures(d: &Path) -> anyhow::Result<Fixtures> {
    let base_bytes = noise("powercut-base", IMAGE_BYTES);
    let base = d.join("base.raw");
    std::fs::write(&base, &base_bytes)?;
    let noise_path = d.join("noise.bin");
    std::fs::write(&noise_path, noise("powercut-writes", 1 << 20))?;
    let store = d.join("host-store");
    let imagefs = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new(bin("imagefs"))
            .arg("--store")
            .arg(&store)
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "imagefs {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    imagefs(&["init"])?;
    imagefs(&["import", &base.to_string_lossy(), "img:base"])?;
    let mut bundles = Vec::new();
    let mut update_sha = BTreeMap::new();
    for k in UPDATES {
        // Block 5K and the last block differ from the base: the tail tells versions apart.
        let mut bytes = base_bytes.clone();
        let at = 5 * k as usize * BLOCK;
        bytes[at..at + BLOCK].copy_from_slice(&noise(&format!("powercut-u{k}-mid"), BLOCK));
        bytes[IMAGE_BYTES - BLOCK..].copy_from_slice(&noise(&format!("powercut-u{k}-tail"), BLOCK));
        let raw = d.join(format!("u{k}.raw"));
        std::fs::write(&raw, &bytes)?;
        let tail = d.join(format!("u{k}.tail"));
        std::fs::write(&tail, &bytes[IMAGE_BYTES - BLOCK..])?;
        imagefs(&["import", &raw.to_string_lossy(), &format!("img:u{k}")])?;
        let bundle = d.join(format!("b{k}.bundle"));
        imagefs(&[
            "bundle",
            "img:base",
            &format!("img:u{k}"),
            &bundle.to_string_lossy(),
        ])?;
        bundles.push((k, bundle));
        update_sha.insert(k, (sha256(&raw)?, sha256(&tail)?));
    }
    // The debug binary's symbols would make every boot unpack ~100 MB more under emulation.
    let small = d.join("imagefs");
    let stripped = tool_command("objcopy")
        .arg("--strip-debug")
        .arg(bin("imagefs"))
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(bin("imagefs"), &small)?;
    }
    let disk = d.join("disk.raw");
    std::fs::File::create(&disk)?.set_len(256 << 20)?;
    let st = tool_command("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .status()
        .context("mkfs.ext4")?;
    ensure!(st.success(), "mkfs.ext4 failed");
    Ok(Fixtures {
        disk,
        imagefs: small,
        base,
        noise: noise_path,
        bundles,
        update_sha,
    })
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    ensure!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_string)
        .context("sha256sum output")
}

/// Sectors (512 bytes) per instance write, and writes per boot (they stay below the image's
/// last block, which only substitutions change).
const WRITE_SECTORS: usize = 12;
/// Write j starts at sector j * WRITE_STRIDE + j % 4: ranges never overlap (a later write would
/// legitimately change bytes an earlier ACK names) and most straddle 4 KiB sub-blocks.
const WRITE_STRIDE: usize = 16;
const WRITES_PER_BOOT: usize = 150;

/// The script of boot `boot`: mount the disk; check the model (after a cut); run the workload
/// until the cut (or, on the last boot, only the checks).
fn boot_script(
    boot: u32,
    model: &Model,
    subs_seen: &BTreeMap<String, usize>,
    fx: &Fixtures,
    last: bool,
) -> String {
    let mut s = String::from(
        "export IMAGEFS_STORE=/d/store\n\
         ack() { echo \"ACK $* #\"; }\n\
         begin() { echo \"BEGIN $*\"; }\n\
         intent() { echo \"BEGIN $*\"; echo \"$*\" | dd of=/d/intents oflag=append conv=notrunc,fsync \
           2>/dev/null || fail intent; }\n\
         skipif() { grep -qxF \"$1\" /d/intents 2>/dev/null; }\n\
         fail() { echo \"WORKLOAD-FAIL $*\"; exit 1; }\n\
         sha() { sha256sum | cut -d' ' -f1; }\n\
         chk() { if [ \"$2\" = \"$3\" ]; then echo \"CHECK-OK $1\"; \
           else echo \"CHECK-BAD $1 expected=$2 got=$3\"; fi; }\n\
         chksub() { [ \"$3\" = \"$4\" ] && { echo \"CHECK-OK $1\"; return; }; \
           for k in $(grep \"^sub $2 \" /d/intents 2>/dev/null | tail -n +$(($5 + 1)) | sed 's/.*img:u//'); do \
           if [ \"$(utail $k)\" = \"$4\" ]; then echo \"CHECK-OK $1 now=$4\"; return; fi; done; chk $1 $3 $4; }\n\
         up() { cut -d' ' -f1 /proc/uptime; }\n\
         mkdir -p /d /m\n\
         mount -t ext4 /dev/vda /d || fail mount-ext4\n\
         echo \"MOUNTED t=$(up)\"\n",
    );
    let mut sha_of = String::from("usha() { case $1 in ");
    let mut tail_of = String::from("utail() { case $1 in ");
    for (k, (sha, tail)) in &fx.update_sha {
        sha_of.push_str(&format!("{k}) echo {sha};; "));
        tail_of.push_str(&format!("{k}) echo {tail};; "));
    }
    sha_of.push_str("esac; }\n");
    tail_of.push_str("esac; }\n");
    s.push_str(&sha_of);
    s.push_str(&tail_of);
    if boot == 0 {
        s.push_str(
            "imagefs init >/dev/null || fail init\n\
             imagefs import /work/base.raw img:base >/dev/null || fail import-base\n\
             sync\n",
        );
    } else {
        s.push_str(
            "imagefs fsck > /tmp/fsck.out 2>&1; echo \"FSCK-RC=$?\"; sed 's/^/FSCK| /' /tmp/fsck.out | tail -n 5\n",
        );
    }
    s.push_str("imagefs mount --daemon /m >/dev/null || fail daemon\n");
    let tail_block = IMAGE_BYTES / BLOCK - 1;
    for (key, want) in model {
        // A key that an operation with a durable intent (see `intent`) may have removed is
        // skipped: the console line of that operation may not have reached this host.
        let line = if let Some(tag) = key.strip_prefix("tag:") {
            let (name, t) = tag.split_once(':').unwrap_or((tag, ""));
            format!(
                "if skipif 'rmtag {tag}'; then echo 'CHECK-SKIP {key}'; else \
                 chk {key} {want} \"$(sha < /m/images/{name}/{t}.raw)\"; fi"
            )
        } else if let Some(id) = key.strip_prefix("inst:") {
            format!(
                "if skipif 'rminst {id}'; then echo 'CHECK-SKIP {key}'; else \
                 chk {key} yes \"$([ -f /m/instances/{id}.raw ] && echo yes)\"; fi"
            )
        } else if let Some(id) = key.strip_prefix("sub:") {
            format!(
                "if skipif 'rminst {id}'; then echo 'CHECK-SKIP {key}'; else \
                 chksub {key} {id} {want} \"$(dd if=/m/instances/{id}.raw bs={BLOCK} \
                 skip={tail_block} count=1 2>/dev/null | sha)\" {seen}; fi",
                seen = subs_seen.get(id).copied().unwrap_or(0)
            )
        } else if let Some(rest) = key.strip_prefix("write:") {
            let (id, seek) = rest.split_once(':').unwrap_or((rest, "0"));
            format!(
                "if skipif 'rminst {id}'; then echo 'CHECK-SKIP {key}'; else \
                 chk {key} \"$(dd if=/work/noise.bin bs=512 skip={want} count={WRITE_SECTORS} \
                 2>/dev/null | sha)\" \"$(dd if=/m/instances/{id}.raw bs=512 skip={seek} \
                 count={WRITE_SECTORS} 2>/dev/null | sha)\"; fi"
            )
        } else {
            format!("echo \"CHECK-BAD {key} unknown key\"")
        };
        s.push_str(&line);
        s.push('\n');
    }
    s.push_str("echo CHECKS-DONE\n");
    if last {
        s.push_str("imagefs umount /m || fail umount\necho LAST-BOOT-DONE\n");
        return s;
    }
    // The intents of the boot just checked are done with; the empty file is durable before the
    // cut window opens.
    s.push_str(
        ": > /d/intents; dd if=/dev/null of=/d/intents conv=fsync 2>/dev/null || fail intents\n\
         echo \"WORKLOAD-START t=$(up)\"\n",
    );
    // Old things go, so the store stays small over many cuts: the tags of earlier boots'
    // imports (acknowledged or not),
    s.push_str(
        "for f in /m/images/imp/*.raw; do [ -f \"$f\" ] || continue; t=${f##*/}; t=${t%.raw}; \
           intent rmtag imp:$t; imagefs rm imp:$t >/dev/null || fail rm; ack rmtag imp:$t; \
         done\n",
    );
    // and every instance older than the last boot's (the one of two boots ago, and any an
    // earlier cut kept from going or created without its ACK reaching this host).
    s.push_str(&format!(
        "for f in /m/instances/i*.raw; do [ -f \"$f\" ] || continue; n=${{f##*/i}}; n=${{n%.raw}}; \
           if [ \"$n\" -lt {prev} ]; then intent rminst i$n; \
             imagefs instance rm i$n >/dev/null || fail instance-rm; ack rminst i$n; fi; \
         done\n",
        prev = boot.saturating_sub(1)
    ));
    for (k, (sha, _)) in &fx.update_sha {
        s.push_str(&format!(
            "begin tag img:u{k}; imagefs apply /work/b{k}.bundle >/dev/null || fail apply; \
             ack tag img:u{k} {sha}\n"
        ));
    }
    let n_updates = UPDATES.len();
    s.push_str(&format!(
        "b={boot}; i=i$b\n\
         begin inst $i; imagefs instance create img:base $i >/dev/null || fail instance-create; ack inst $i\n\
         r=0; j=0\n\
         while :; do\n\
           t=b${{b}}r$r\n\
           cp /work/base.raw /tmp/img.raw\n\
           dd if=/work/noise.bin of=/tmp/img.raw bs=4096 seek=$(( (r * 5) % 512 )) \
             skip=$(( (b * 7 + r) % 240 )) count=16 conv=notrunc 2>/dev/null || fail mkimg\n\
           s=$(sha < /tmp/img.raw)\n\
           begin tag imp:$t; imagefs import /tmp/img.raw imp:$t >/dev/null || fail import; ack tag imp:$t $s\n\
           for w in 1 2 3; do\n\
             if [ $j -lt {WRITES_PER_BOOT} ]; then\n\
               seek=$(( j * {WRITE_STRIDE} + j % 4 )); skip=$(( (b * 131 + j * {WRITE_SECTORS}) % 2036 ))\n\
               begin write $i $seek\n\
               dd if=/work/noise.bin of=/m/instances/$i.raw bs=512 skip=$skip seek=$seek \
                 count={WRITE_SECTORS} conv=notrunc,fsync 2>/dev/null || fail write\n\
               ack write $i $seek $skip\n\
               j=$((j + 1))\n\
             fi\n\
           done\n\
           k=$(( r % {n_updates} + 1 ))\n\
           intent sub $i img:u$k\n\
           imagefs substitute --keep-local $i img:u$k >/dev/null || fail substitute\n\
           got=$(dd if=/m/instances/$i.raw bs={BLOCK} skip={tail_block} count=1 2>/dev/null | sha)\n\
           [ \"$got\" = \"$(utail $k)\" ] || fail substituted-tail\n\
           ack sub $i $got\n\
           if [ $r -ge 2 ]; then o=b${{b}}r$((r - 2)); intent rmtag imp:$o; \
             imagefs rm imp:$o >/dev/null || fail rm; ack rmtag imp:$o; fi\n\
           k2=$(( (r + 1) % {n_updates} + 1 ))\n\
           intent rmtag img:u$k2; imagefs rm img:u$k2 >/dev/null || fail rm-update; ack rmtag img:u$k2\n\
           begin gc; imagefs gc >/dev/null || fail gc; ack gc\n\
           begin tag img:u$k2; imagefs apply /work/b$k2.bundle >/dev/null || fail apply; \
             ack tag img:u$k2 $(usha $k2)\n\
           echo \"ROUND $r t=$(up)\"\n\
           r=$((r + 1))\n\
         done\n"
    ));
    s
}

/// splitmix64: the cut moments from CRASH_SEED.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
