# Sourced by the demos: builds the demo's app image and its one-file patch.
# build_app_images WORK: WORK/app-v1.img, a 32 MiB ext4 root (static busybox,
# /opt/app/version = v1, a health check /opt/app/bin/check), and WORK/app-v2.img, the same image
# with /opt/app/version rewritten in place to v2 (same length, at the file's own block), so the
# two differ in exactly one block. Sets BLOCK. Needs the caller's run, note and fail.
build_app_images() {
    local work=$1 tree=$1/rootfs a
    mkdir -p "$tree"/{bin,dev,proc,sys,tmp,mnt,etc} "$tree/opt/app/bin"
    cp /bin/busybox "$tree/bin/busybox"
    for a in sh sleep cat echo ls true false mount umount sync head ps grep; do
        ln -s busybox "$tree/bin/$a"
    done
    printf 'v1\n' >"$tree/opt/app/version"
    cat >"$tree/opt/app/bin/check" <<'CHECK'
read -r v </opt/app/version && case "$v" in v[0-9]*) exit 0 ;; esac
exit 1
CHECK
    chmod 0755 "$tree/opt/app/bin/check"
    run mkfs.ext4 -q -F -b 4096 -E root_owner=0:0 -d "$tree" "$work/app-v1.img" 32M

    say "   Patch /opt/app/version in place for app:v2 (same length, written at the file's own block)"
    run debugfs -R 'blocks /opt/app/version' "$work/app-v1.img" | tee "$work/blocks"
    BLOCK=$(awk '{print $1; exit}' "$work/blocks")
    [ -n "$BLOCK" ] || fail "debugfs found no block for /opt/app/version"
    cp --sparse=always "$work/app-v1.img" "$work/app-v2.img"
    printf 'v2\n' >"$work/v2-content"
    run dd if="$work/v2-content" of="$work/app-v2.img" bs=4096 seek="$BLOCK" conv=notrunc status=none
    cmp -l "$work/app-v1.img" "$work/app-v2.img" >"$work/cmp" || true
    awk -v b="$BLOCK" 'int(($1 - 1) / 4096) != b { bad = 1 } END { exit bad || NR == 0 }' "$work/cmp" ||
        fail "app-v2.img differs from app-v1.img outside block $BLOCK"
    note "v2 differs from v1 in $(wc -l <"$work/cmp") byte(s), all in block $BLOCK; everything else is identical"
}
