#!/usr/bin/env bash
# Builds target/guest/fullguest.img: the ext4 root filesystem of a full Debian guest (debootstrap
# minbase of bookworm + systemd-sysv) with the static guest-agent as an enabled systemd service and
# a small /opt/app/version. It boots with the cloud kernel and our initramfs handing pid 1 over to
# systemd (agent.init=/sbin/init), root read-only.
# The debootstrap tree is cached as a tarball under $IMAGEFS_CACHE (default /var/cache/imagefs),
# keyed by suite, variant and package list, so a second run fetches nothing; the image is rebuilt
# only when the agent binary, guest-agent.service, this script or the tarball changes.
# Usage (root: debootstrap, device nodes, file owners): scripts/build-fullguest.sh AGENT_BIN [OUT]
set -euo pipefail

AGENT_BIN=${1:?usage: build-fullguest.sh AGENT_BIN [OUT]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SELF=$ROOT/scripts/build-fullguest.sh
GUEST=$ROOT/target/guest
OUT=${2:-$GUEST/fullguest.img}
CACHE=${IMAGEFS_CACHE:-/var/cache/imagefs}
MIRROR=${IMAGEFS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
VARIANT=minbase
# systemd-sysv makes systemd /sbin/init. Nothing else: no udev (devtmpfs already has the disk and
# the serial ports), no dbus (as root, systemctl talks to pid 1 over its private socket).
PACKAGES=systemd-sysv
SERVICE=$ROOT/guest-agent/guest-agent.service

die() { echo "build-fullguest: $*" >&2; exit 1; }

[ -x "$AGENT_BIN" ] || die "agent binary $AGENT_BIN not found (run make agent)"
file -L "$AGENT_BIN" | grep -q 'static' ||
    die "$AGENT_BIN is not statically linked (build it with make agent)"
[ -f "$SERVICE" ] || die "$SERVICE missing"
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, device nodes and file owners)"
for t in debootstrap mkfs.ext4 tar zstd; do
    command -v "$t" >/dev/null || die "$t not installed (run make setup)"
done

KEY=$(printf '%s\n' "$SUITE" "$VARIANT" "$PACKAGES" | sha256sum | cut -c1-12)
TARBALL=$CACHE/rootfs/debootstrap-$SUITE-$VARIANT-$KEY.tar.zst
WANT=$({
    sha256sum <"$AGENT_BIN"
    sha256sum <"$SELF"
    sha256sum <"$SERVICE"
    echo "$TARBALL"
} | sha256sum | cut -d' ' -f1)
if [ -f "$OUT" ] && [ -f "$OUT.stamp" ] && [ "$(cat "$OUT.stamp")" = "$WANT" ] && [ -f "$TARBALL" ]; then
    # Newer than its inputs again (a relinked but identical agent), as the tests check.
    touch "$OUT"
    echo "build-fullguest: $OUT is up to date" >&2
    exit 0
fi

WORK=
STAGE=
cleanup() {
    local d
    for d in "$WORK" "$STAGE"; do
        [ -n "$d" ] && [ -d "$d" ] || continue
        # debootstrap mounts /proc and /sys in its target and may leave them when it fails.
        findmnt -rn -o TARGET | grep -F "$d/" | sort -r | xargs -r -n1 umount -l || true
        rm -rf --one-file-system "$d"
    done
}
trap cleanup EXIT

# 1. The debootstrap tree, fetched once per key.
if [ ! -f "$TARBALL" ]; then
    mkdir -p "$CACHE/rootfs"
    WORK=$(mktemp -d "$CACHE/rootfs/work.XXXXXX")
    echo "build-fullguest: debootstrap $SUITE ($VARIANT + $PACKAGES) from $MIRROR ..." >&2
    started=$(date +%s)
    if ! debootstrap --variant="$VARIANT" --include="$PACKAGES" --components=main \
        "$SUITE" "$WORK/root" "$MIRROR" >"$WORK/debootstrap.out" 2>&1; then
        cp "$WORK/debootstrap.out" "$CACHE/rootfs/debootstrap-failed.log" 2>/dev/null || true
        [ -f "$WORK/root/debootstrap/debootstrap.log" ] &&
            cat "$WORK/root/debootstrap/debootstrap.log" >>"$CACHE/rootfs/debootstrap-failed.log"
        tail -n 20 "$WORK/debootstrap.out" >&2
        die "debootstrap failed (full log: $CACHE/rootfs/debootstrap-failed.log)"
    fi
    # The fetched .debs and package lists are not part of the guest.
    rm -rf "$WORK"/root/var/cache/apt/archives/*.deb "$WORK"/root/var/lib/apt/lists/*
    tar --numeric-owner --xattrs --xattrs-include='*' --one-file-system -C "$WORK/root" -cf - . |
        zstd -q -T0 -o "$WORK/rootfs.tar.zst"
    mv "$WORK/rootfs.tar.zst" "$TARBALL"
    echo "build-fullguest: cached $TARBALL ($(($(date +%s) - started)) s)" >&2
fi

# 2. The guest's own files on top.
mkdir -p "$GUEST"
STAGE=$(mktemp -d "$GUEST/fullguest.XXXXXX")
TREE=$STAGE/root
mkdir "$TREE"
zstd -dc "$TARBALL" | tar --numeric-owner --xattrs --xattrs-include='*' -xpf - -C "$TREE"
# Documentation and translations are never read in a test guest; a smaller image imports faster.
rm -rf "$TREE"/usr/share/doc/* "$TREE"/usr/share/man/* "$TREE"/usr/share/info/* \
    "$TREE"/usr/share/locale/*

install -D -m 0755 "$AGENT_BIN" "$TREE/usr/local/sbin/guest-agent"
strip --strip-all "$TREE/usr/local/sbin/guest-agent"
install -D -m 0644 "$SERVICE" "$TREE/etc/systemd/system/guest-agent.service"
mkdir -p "$TREE/etc/systemd/system/multi-user.target.wants"
ln -sfn /etc/systemd/system/guest-agent.service \
    "$TREE/etc/systemd/system/multi-user.target.wants/guest-agent.service"
install -D -m 0644 /dev/stdin "$TREE/opt/app/version" <<<"app 1.0"

echo fullguest >"$TREE/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tfullguest\n' >"$TREE/etc/hosts"
# Empty: on a read-only root systemd makes a transient id per boot (one image, many guests).
: >"$TREE/etc/machine-id"
rm -f "$TREE/var/lib/dbus/machine-id"
# The root stays read-only (the agent refuses notices for a writable filesystem); scratch space
# lives in memory.
cat >"$TREE/etc/fstab" <<'EOF'
# <fs> <mountpoint> <type> <options> <dump> <pass>
tmpfs /tmp tmpfs mode=1777,nosuid,nodev 0 0
tmpfs /var/tmp tmpfs mode=1777,nosuid,nodev 0 0
EOF
mkdir -p "$TREE/etc/systemd/journald.conf.d"
cat >"$TREE/etc/systemd/journald.conf.d/volatile.conf" <<'EOF'
# The root is read-only: keep the journal in /run.
[Journal]
Storage=volatile
EOF
# Without the persistent journal's directory, tmpfiles leaves it (and its ACLs) alone.
rm -rf "$TREE/var/log/journal"
# Units that would prompt (firstboot), wait for devices only udev announces (serial gettys; there
# is no udev), fail on a read-only root (random seed, utmp, journal flush, and the timers of apt,
# dpkg, e2scrub and fstrim, which write or need network), or need modules the root has none of
# (binfmt_misc's automount wants autofs4). Masked, so the boot is quick and quiet and nothing
# degrades the system later; getty on tty1 stays (getty-static would add tty2-6 without logind).
for u in systemd-firstboot.service serial-getty@ttyS0.service serial-getty@ttyS1.service \
    systemd-random-seed.service systemd-journal-flush.service systemd-update-utmp.service \
    systemd-update-utmp-runlevel.service systemd-machine-id-commit.service \
    proc-sys-fs-binfmt_misc.automount getty-static.service e2scrub_reap.service \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer; do
    ln -sfn /dev/null "$TREE/etc/systemd/system/$u"
done

# 3. The ext4 image: a quarter of headroom for metadata, a fixed UUID so rebuilds compare.
size_mb=$(($(du -sm "$TREE" | cut -f1) * 5 / 4 + 64))
UUID=$(echo "$KEY" | sha256sum | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')
truncate -s "${size_mb}M" "$STAGE/fullguest.img"
mkfs.ext4 -q -F -b 4096 -L fullguest -U "$UUID" -E "root_owner=0:0,hash_seed=$UUID" \
    -d "$TREE" "$STAGE/fullguest.img" ||
    die "mkfs.ext4 -d failed"
mv -f "$STAGE/fullguest.img" "$OUT"
echo "$WANT" >"$OUT.stamp"
echo "build-fullguest: $OUT (${size_mb} MiB; $SUITE $VARIANT + $PACKAGES)" >&2
