#!/usr/bin/env bash
# Builds target/guest/initramfs.cpio.gz (newc, gzip): the guest-agent as /init, the virtio modules
# it loads (dependencies first, read from each module's own depends= field), and
# /etc/guest-agent.conf. Reproducible: fixed order, owners and mtimes, gzip without a timestamp.
# Usage: scripts/build-guest.sh AGENT_BIN [OUT]
set -euo pipefail

AGENT_BIN=${1:?usage: build-guest.sh AGENT_BIN [OUT]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
GUEST=$ROOT/target/guest
OUT=${2:-$GUEST/initramfs.cpio.gz}
MODDIR=$GUEST/kernel/modules
# What the guest needs for its disks: PCI (QEMU) and MMIO (our vmm) transports, and virtio-blk;
# and for the ACPI power button (the hypervisor's shutdown request): its driver and evdev.
WANT=(virtio_mmio virtio_pci virtio_blk button evdev)

[ -x "$AGENT_BIN" ] || { echo "build-guest: agent binary $AGENT_BIN not found (run make agent)" >&2; exit 1; }
[ -d "$MODDIR" ] || { echo "build-guest: $MODDIR missing (run scripts/fetch-kernel.sh)" >&2; exit 1; }
if ! file -L "$AGENT_BIN" | grep -q 'static'; then
    echo "build-guest: $AGENT_BIN is not statically linked (build it with make agent)" >&2
    exit 1
fi

module_file() {
    local f
    f=$(find "$MODDIR/kernel" -name "$1.ko" -print -quit)
    [ -n "$f" ] || { echo "build-guest: module $1 not found under $MODDIR" >&2; exit 1; }
    echo "$f"
}

ORDER=()
add_module() {
    local m=$1 dep f deps
    for done_m in "${ORDER[@]:-}"; do [ "$done_m" = "$m" ] && return 0; done
    f=$(module_file "$m")
    deps=$(strings "$f" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' ')
    for dep in $deps; do add_module "$dep"; done
    ORDER+=("$m")
}
for m in "${WANT[@]}"; do add_module "$m"; done

STAGE=$(mktemp -d "$GUEST/initramfs.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{dev,proc,sys,newroot,etc,lib/modules}
# Stripped: a smaller initramfs unpacks faster at every boot.
strip --strip-all -o "$STAGE/init" "$AGENT_BIN"
chmod 0755 "$STAGE/init"
for m in "${ORDER[@]}"; do
    cp "$(module_file "$m")" "$STAGE/lib/modules/$m.ko"
done
MODLIST=$(IFS=,; echo "${ORDER[*]}")
cat >"$STAGE/etc/guest-agent.conf" <<EOF
# guest-agent configuration (key=value); any key can be overridden with agent.KEY=VALUE on the
# kernel command line, and root=/rootfstype=/rw/ro are taken from it too.
modules=$MODLIST
module_dir=/lib/modules
root=/dev/vda
rootfstype=ext4
rw=0
rootwait_ms=10000
switch_root=1
device=/dev/ttyS1
EOF

find "$STAGE" -exec touch -h -d @0 {} +
TMP_OUT=$(mktemp "$OUT.XXXXXX")
(cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc --owner=0:0 --reproducible) | gzip -n -6 >"$TMP_OUT"
mv "$TMP_OUT" "$OUT"
echo "build-guest: $OUT ($(stat -c %s "$OUT") bytes; modules: $MODLIST)" >&2
