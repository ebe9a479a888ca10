#!/usr/bin/env bash
# Mount benchmarks, side by side in one run (root needed for FUSE and drop_caches):
#  1. sequential read of a 2 GiB version through the mount, cold and warm, against the same raw
#     file on local disk; warm figures are medians of 5 alternating passes, both files checked to
#     be wholly in the page cache first, plus the share of each file's cache in large folios;
#  2. 4 KiB random reads (fio, psync, 1 and 4 jobs) through the mount against the raw file, warm;
#  3. substitution of 1,000 changed blocks into an idle instance: time from the command to the
#     mount serving the new bytes.
# Usage: scripts/bench-mount.sh [IMAGEFS_BINARY]   (default: target/release/imagefs)
#
# Notes on the warm-read gap (engineer warm-read, kernel 6.18.44-fc-v595, 2 cores, load ~8):
# - The whole gap is folio size. ext4 fills its page cache with large folios on a cold read
#   (perf tracepoint filemap:mm_filemap_add_to_page_cache over a cold 64 MiB read: orders 0-9,
#   most bytes order 9); this kernel's FUSE gives every file order-0 folios only (16416 x order 0
#   for the same read). After this script's drop + cold read: large-folio share mount 0.00,
#   local 1.00 (the "large folios" line below measures it with pagemap + kpageflags).
# - Warm, dd-like 1 MiB reads, median of 5 alternating: mount 2.6 GB/s (6.3 GB/s per reader
#   CPU-second), local 8.6 GB/s (19.3): 0.30x wall, 0.33x CPU. With both caches order-0 (the raw
#   file's pages as written by `head`, never re-read): mount 8.4 vs local 7.8 GB/s per CPU-second,
#   1.08x. FUSE is not slower per page; it cannot have large pages.
# - The daemon is not in the warm path: 10 ms of daemon CPU over 5 warm passes (10 GiB). So the
#   attr/entry TTLs, FUSE_AUTO_INVAL_DATA (fuser 0.15 does not ask for it; the kernel then only
#   revalidates on reads past EOF), init flags, max_pages/max_read and worker threads cannot move
#   it. Read size does not close it either: 128 KiB / 1 MiB / 4 MiB reads, mount 9.0/11.0/11.2,
#   local 10.1/13.7/13.2 GB/s per CPU-second (one run).
# - MADV_COLLAPSE on a mapping of the mount: EINVAL (CONFIG_READ_ONLY_THP_FOR_FS is not set).
# - What would close it: a kernel whose FUSE enables large folios (upstream "fuse: enable large
#   folios (if writeback cache is unused)", Aug 2025, reports ~8x on warm sequential reads with
#   passthrough_hp --nopassthrough; absent here), or FUSE passthrough (CONFIG_FUSE_PASSTHROUGH=y
#   here; needs a fuser with BackingId (0.18) and a backing file holding a version's bytes, which
#   the content-addressed packs are not: a flat copy per version would double disk and cache).
#   The brief's passthrough_hp 10.2 GB/s is most likely passthrough mode (libfuse >= 3.16 turns it
#   on by default; Debian's 3.14 here has none): not verified.
# - Cold, 1 MiB reads after drop_caches: mount 0.30-0.49 GB/s, local 0.55 GB/s; the daemon spent
#   1.7 CPU-s serving 2 GiB.
# - st_blksize 4096 -> 1 MiB (mount/fuse.rs): cat/cp read 1 MiB at a time through the mount
#   (strace: 2048 reads of 1 MiB for 2 GiB); 1 MiB vs 128 KiB reads: 7.8 vs 7.2 GB/s per CPU-s.
set -euo pipefail

BIN=${1:-${IMAGEFS_BIN:-target/release/imagefs}}
BIN=$(realpath "$BIN")
SIZE_MIB=${BENCH_SIZE_MIB:-2048}
W=$(mktemp -d /var/tmp/imagefs-bench.XXXXXX)
S=$W/store
M=$W/mnt
mkdir -p "$M"

cleanup() {
    "$BIN" --store "$S" umount "$M" >/dev/null 2>&1 || umount -l "$M" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# Seconds (float) taken by a command.
secs() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null 2>&1; t1=$(date +%s%N); echo "scale=3; ($t1-$t0)/1000000000" | bc; }
rate() { echo "scale=0; $SIZE_MIB / $1" | bc; }
ratio() { echo "scale=2; $1 / $2" | bc; }

echo "== setup: ${SIZE_MIB} MiB random image, import, mount"
head -c "${SIZE_MIB}M" /dev/urandom > "$W/raw.img"
"$BIN" --store "$S" init >/dev/null
"$BIN" --store "$S" import "$W/raw.img" big:v1 >/dev/null
"$BIN" --store "$S" mount "$M" --daemon
F=$M/images/big/v1.raw

echo "== sequential read (dd bs=1M; warm: median of 5 alternating passes)"
drop; cold_m=$(secs dd if="$F" of=/dev/null bs=1M)
drop; cold_l=$(secs dd if="$W/raw.img" of=/dev/null bs=1M)
# Other work on the machine can evict either file: both must be wholly cached before timing.
resident() { [ "$(fincore --bytes --noheadings -o RES "$1")" = "$(stat -c %s "$1")" ]; }
for f in "$F" "$W/raw.img"; do
    for _ in 1 2 3; do resident "$f" && break; dd if="$f" of=/dev/null bs=1M 2>/dev/null; done
    resident "$f" || echo "warning: $f is not wholly in the page cache"
done
median() { sort -n | sed -n 3p; }
wm=(); wl=()
for _ in 1 2 3 4 5; do
    wm+=("$(secs dd if="$F" of=/dev/null bs=1M)")
    wl+=("$(secs dd if="$W/raw.img" of=/dev/null bs=1M)")
done
warm_m=$(printf '%s\n' "${wm[@]}" | median)
warm_l=$(printf '%s\n' "${wl[@]}" | median)
printf '%-28s %8s MiB/s   local %8s MiB/s   ratio %s\n' \
    "cold, through the mount" "$(rate "$cold_m")" "$(rate "$cold_l")" "$(ratio "$cold_l" "$cold_m")" \
    "warm, through the mount" "$(rate "$warm_m")" "$(rate "$warm_l")" "$(ratio "$warm_l" "$warm_m")"
# Share of each file's cached pages that sit in large folios (pagemap + kpageflags, root only):
# the kernel copies a large folio per step where it must walk 4 KiB pages one by one.
python3 - "$F" "$W/raw.img" <<'EOF'
import ctypes, os, struct, sys
libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
def share(path, samples=512):
    fd = os.open(path, os.O_RDONLY); size = os.fstat(fd).st_size
    addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
    pm = os.open("/proc/self/pagemap", os.O_RDONLY); kf = os.open("/proc/kpageflags", os.O_RDONLY)
    pages = size // 4096; big = seen = 0
    for i in range(0, pages, max(1, pages // samples)):
        ctypes.c_char.from_address(addr + i * 4096).value  # map the cached page
        e, = struct.unpack("Q", os.pread(pm, 8, (addr // 4096 + i) * 8))
        if e >> 63:
            f, = struct.unpack("Q", os.pread(kf, 8, (e & ((1 << 55) - 1)) * 8))
            seen += 1; big += bool(f & (3 << 15))  # compound head or tail
    return big / seen if seen else 0.0
print("page cache in large folios:  mount %.2f   local %.2f" % tuple(share(p) for p in sys.argv[1:]))
EOF

echo "== 4 KiB random reads (fio psync, warm page cache)"
iops() {
    fio --name=r --filename="$1" --rw=randread --bs=4k --ioengine=psync --numjobs="$2" \
        --time_based --runtime=5 --group_reporting --readonly --invalidate=0 --output-format=json \
        2>/dev/null | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))'
}
for j in 1 4; do
    m=$(iops "$F" "$j"); l=$(iops "$W/raw.img" "$j")
    printf 'jobs=%s  mount %9s IOPS   local %9s IOPS   ratio %s\n' "$j" "$m" "$l" "$(ratio "$m" "$l")"
done

echo "== substitution of 1,000 changed blocks into an idle instance"
BS=$("$BIN" --store "$S" ls --json | python3 -c 'import json,sys
for l in sys.stdin:
    o=json.loads(l)
    bs=o.get("block_size") or (o.get("images") or [{}])[0].get("block_size")
    if bs: print(bs); break' || true)
BS=${BS:-65536}
BLOCKS=$((SIZE_MIB * 1048576 / BS))
"$BIN" --store "$S" instance create big:v1 patcher >/dev/null
# 1,000 scattered blocks, 4 KiB rewritten in each: the patch is made through the mount.
python3 - "$M/instances/patcher.raw" "$BS" "$BLOCKS" <<'EOF'
import os, sys
path, bs, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_WRONLY)
step = n // 1000
for i in range(1000):
    os.pwrite(fd, os.urandom(4096), i * step * bs)
os.fsync(fd); os.close(fd)
EOF
"$BIN" --store "$S" instance commit patcher big:v2 >/dev/null
"$BIN" --store "$S" instance create big:v1 idle >/dev/null
dd if="$M/instances/idle.raw" of=/dev/null bs=1M 2>/dev/null   # the page cache holds v1
LAST=$(( (999 * (BLOCKS / 1000)) * BS ))
want=$(dd if="$M/images/big/v2.raw" bs=4096 skip=$((LAST / 4096)) count=1 2>/dev/null | b3sum --no-names)
# The command returns once the view is swapped and the kernel's cached pages of the changed
# ranges are dropped: from then on every read of the mount sees v2.
t0=$(date +%s%N)
"$BIN" --store "$S" substitute idle big:v2 --json > "$W/sub.json"
t1=$(date +%s%N)
got=$(dd if="$M/instances/idle.raw" bs=4096 skip=$((LAST / 4096)) count=1 2>/dev/null | b3sum --no-names)
[ "$got" = "$want" ] || { echo "FAIL: the mount did not serve the new bytes"; exit 1; }
echo "command to new bytes served: $(( (t1 - t0) / 1000 )) us (goal <= 20000 us)"
python3 -c 'import json,sys; o=json.load(open(sys.argv[1])); print("steps (us):", o["times"], " changed blocks:", o["changed_blocks"], " ranges:", len(o["changed"]))' "$W/sub.json"
