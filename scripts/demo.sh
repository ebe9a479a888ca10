#!/usr/bin/env bash
# The whole story on one machine: build an ext4 app image (v1), patch one file in place (v2),
# import both, boot three VMs on v1 through the imagefs mount, roll v2 out into the running
# guests, show each guest reading the new bytes without a reboot, then roll back to v1.
# Invariant: every check that fails exits non-zero, and the trap leaves nothing behind (VMs
# stopped, mount released, temp dir removed) however the script ends.
# Usage (root): bash scripts/demo.sh   (make demo builds the binaries and the guest first)
# Binaries: $DEMO_BIN_DIR, else ${CARGO_TARGET_DIR:-target}/debug (what `make build` writes).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN_DIR=${DEMO_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}
KERNEL=$ROOT/target/guest/kernel/vmlinuz
INITRD=$ROOT/target/guest/initramfs.cpio.gz
VMS=(web-1 web-2 web-3)
T_START=$(date +%s%N)

# Bold headings, red failure, green success: on a terminal only.
if [ -t 1 ]; then B=$'\033[1m' RED=$'\033[1;31m' GREEN=$'\033[1;32m' N=$'\033[0m'; else B='' RED='' GREEN='' N=''; fi
say() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
note() { printf '    %s\n' "$*"; }
fail() { printf '\n%sDEMO FAILED: %s%s\n' "$RED" "$*" "$N" >&2; exit 1; }
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }
imagefs() { "$BIN_DIR/imagefs" "$@"; }
# Shows the command as a user would type it (arguments with shell characters in single quotes),
# then runs it.
shown() {
    local a out=()
    for a in "$@"; do
        if [[ $a =~ [^A-Za-z0-9_./:=,%@+-] ]]; then out+=("'$a'"); else out+=("$a"); fi
    done
    printf '$ %s\n' "${out[*]}" >&2
}
run() { shown "$@"; "$@"; }

[ "$(id -u)" = 0 ] || fail "run as root (FUSE mounts, VMs)"
for f in "$BIN_DIR/imagefs" "$BIN_DIR/vmm"; do
    [ -x "$f" ] || fail "$f missing: run make build (or make demo)"
done
for f in "$KERNEL" "$INITRD"; do
    [ -f "$f" ] || fail "$f missing: run make guest (or make demo)"
done
for c in mkfs.ext4 debugfs /bin/busybox; do
    command -v "$c" >/dev/null || fail "$c missing: run make setup"
done

WORK=$(mktemp -d /tmp/imagefs-demo.XXXXXX)
export IMAGEFS_STORE=$WORK/store
MNT=$WORK/mnt
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [ -d "$IMAGEFS_STORE/vms" ]; then
        imagefs vm stop --timeout 3 "${VMS[@]}" >/dev/null 2>&1
    fi
    if mountpoint -q "$MNT" 2>/dev/null; then
        imagefs umount "$MNT" >/dev/null 2>&1 || imagefs umount --lazy "$MNT" >/dev/null 2>&1
        mountpoint -q "$MNT" && umount -l "$MNT"
    fi
    # Never descend into a mount that is somehow still there.
    rm -rf --one-file-system "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# What a guest says, trimmed.
guest() { local vm=$1; shift; imagefs agent exec --vm "$vm" -- "$@" | tr -d '\r'; }
guest_sh() { local vm=$1; shift; imagefs agent exec --vm "$vm" --shell "$*" | tr -d '\r'; }
# Every guest must read `want` from /opt/app/version, by cat and by the agent's blake3: equal to
# the host's b3sum of the same bytes, or (without b3sum) the same in every guest. Sets HASH.
check_version() {
    local want=$1 want_hash='' vm got h
    if command -v b3sum >/dev/null; then
        want_hash=$(printf '%s\n' "$want" | b3sum --no-names)
    fi
    for vm in "${VMS[@]}"; do
        run imagefs agent hash --vm "$vm" /opt/app/version
        h=$(imagefs agent hash --vm "$vm" /opt/app/version | awk '{print $1}')
        shown imagefs agent exec --vm "$vm" -- cat /opt/app/version
        got=$(guest "$vm" cat /opt/app/version)
        printf '%s\n' "$got"
        [ "$got" = "$want" ] || fail "$vm reads '$got' from /opt/app/version, expected '$want'"
        [ -n "$want_hash" ] || want_hash=$h
        [ "$h" = "$want_hash" ] || fail "$vm hashes /opt/app/version as $h, expected $want_hash"
    done
    HASH=$want_hash
}
# "VM BOOT_ID UPTIME" per guest: the boot id changes on any reboot; the uptime only grows.
boot_state() {
    local vm
    for vm in "${VMS[@]}"; do
        echo "$vm $(guest "$vm" cat /proc/sys/kernel/random/boot_id) $(guest "$vm" cat /proc/uptime | awk '{print $1}')"
    done
}

# ---------------------------------------------------------------------------------------------
say "1. Build app:v1: a 32 MiB ext4 root (static busybox, /opt/app/version = v1, a health check)"
# shellcheck source=scripts/app-image.sh
. "$ROOT/scripts/app-image.sh"
build_app_images "$WORK"

say "   Import both into a fresh store ($IMAGEFS_STORE)"
run imagefs init
run imagefs import "$WORK/app-v1.img" app:v1 --block-size 4096
run imagefs import "$WORK/app-v2.img" app:v2 --block-size 4096

# ---------------------------------------------------------------------------------------------
say "2. What changed between v1 and v2: blocks, and the guest files they belong to"
run imagefs diff app:v1 app:v2 --files | tee "$WORK/diff"
grep -q '/opt/app/version' "$WORK/diff" || fail "diff --files does not name /opt/app/version"
run imagefs bundle app:v1 app:v2 "$WORK/v1-to-v2.bundle"
IMG_SIZE=$(stat -c %s "$WORK/app-v1.img")
BUNDLE_SIZE=$(stat -c %s "$WORK/v1-to-v2.bundle")
note "the patch ships as a ${BUNDLE_SIZE}-byte bundle; the image is ${IMG_SIZE} bytes ($((IMG_SIZE / BUNDLE_SIZE))x larger)"

# ---------------------------------------------------------------------------------------------
say "3. Mount the store and boot three VMs on app:v1 (their disks are instances in the mount)"
mkdir -p "$MNT"
run imagefs mount "$MNT" --daemon
if [ -e /sys/module/kvm_pvm ]; then
    WHY="/dev/kvm here is kvm_pvm, which runs only PVM-aware kernels: QEMU with software emulation (qemu-tcg)"
elif [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    WHY="/dev/kvm runs unmodified guests: our KVM microVM (vmm)"
else
    WHY="no usable /dev/kvm: QEMU with software emulation (qemu-tcg)"
fi
note "hypervisor auto: $WHY"
run imagefs vm config --kernel "$KERNEL" --initrd "$INITRD"
T=$(date +%s%N)
run imagefs vm start app:v1 "${VMS[@]}" --hypervisor auto --wait 120 | tee "$WORK/start"
BOOT_MS=$(ms_since "$T")
[ "$(grep -c '^started' "$WORK/start")" = 3 ] || fail "not every VM started"
HYPERVISOR=$(sed -n 's/.*(\([a-z-]*\), pid.*/\1/p' "$WORK/start" | head -n1)
note "3 VMs up with agents answering in $((BOOT_MS / 1000)).$((BOOT_MS % 1000 / 100)) s on ${HYPERVISOR:-?}"
run imagefs vm ls

# ---------------------------------------------------------------------------------------------
say "4. Each guest reads v1"
check_version v1
HASH_V1=$HASH
note "a process in web-1 holds /opt/app/version open across the patch:"
run imagefs agent exec --vm web-1 --shell 'sleep 1000 </opt/app/version &'
BEFORE=$(boot_state)

# ---------------------------------------------------------------------------------------------
say "5. Roll app:v2 out: web-1 first, then the rest, each wave health-checked inside the guests"
T=$(date +%s%N)
run imagefs rollout app:v2 --instances 'web-*' --waves 1,100% --health-cmd /opt/app/bin/check \
    2>&1 | tee "$WORK/rollout"
ROLLOUT_MS=$(ms_since "$T")
grep -q 'completed' "$WORK/rollout" || fail "the rollout did not complete"
grep -q 'process .*(sleep) had /opt/app/version open' "$WORK/rollout" ||
    fail "the process holding the old file was not reported"
say "   Each guest now reads v2, without a reboot"
check_version v2
[ "$HASH" != "$HASH_V1" ] || fail "the guests' hash of /opt/app/version did not change"
AFTER=$(boot_state)
printf '    %-6s %-38s %12s %12s\n' VM "boot id (before = after)" "uptime before" "after (s)"
while read -r vm id1 up1 && read -r _ id2 up2 <&3; do
    printf '    %-6s %-38s %12s %12s\n' "$vm" "$id2" "$up1" "$up2"
    [ "$id1" = "$id2" ] || fail "$vm rebooted (boot id $id1 -> $id2)"
    awk -v a="$up1" -v b="$up2" 'BEGIN { exit !(b > a) }' || fail "$vm uptime went back ($up1 -> $up2)"
done <<<"$BEFORE" 3<<<"$AFTER"

# ---------------------------------------------------------------------------------------------
say "6. Roll back: a rollout to the old version"
T=$(date +%s%N)
run imagefs rollout app:v1 --instances 'web-*' 2>&1 | tee "$WORK/rollback"
ROLLBACK_MS=$(ms_since "$T")
grep -q 'completed' "$WORK/rollback" || fail "the rollback did not complete"
check_version v1
[ "$HASH" = "$HASH_V1" ] || fail "the guests' hash after the rollback is not v1's"
run imagefs vm ls
run imagefs rollout ls

say "   Stop the VMs and release the mount"
run imagefs vm stop --timeout 5 "${VMS[@]}"
run imagefs umount "$MNT"

SUBS=$(sed -n 's/^ *\(web-[0-9]*\): substituted .* in \([0-9]*\) ms.*/\1 \2 ms/p' "$WORK/rollout" |
    paste -sd, - | sed 's/,/, /g')
printf '\n%sDEMO OK%s: 3 VMs (%s) patched v1 -> v2 -> v1 live, no reboot. ' "$GREEN" "$N" "${HYPERVISOR:-?}"
printf 'Substitution per VM: %s; rollout total %d ms (2 waves + health checks), rollback %d ms; ' \
    "${SUBS:-?}" "$ROLLOUT_MS" "$ROLLBACK_MS"
printf 'boot %d ms; whole demo %d s.\n' "$BOOT_MS" "$(($(ms_since "$T_START") / 1000))"
