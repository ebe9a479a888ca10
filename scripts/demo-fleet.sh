#!/usr/bin/env bash
# A fleet rollout on one machine: three hosts, each a network namespace with its own store,
# mount daemon (serving the fleet over mutual TLS) and one live VM on app:v1; a single-node
# Garage as the fleet's block tier; the operator in a fourth namespace. The operator rolls
# app:v2 (one changed block) across the hosts in two waves, host by host; host 3's link is cut
# mid-rollout, so the rollout stops as interrupted with host 3 pending and the others kept on
# v2; the link comes back and `rollout --resume` finishes it. Every guest then reads v2 without
# a reboot, and each host fetched only the changed block from the bucket.
# Invariant: every check that fails exits non-zero, and the trap leaves nothing behind (VMs
# stopped, mounts gone, Garage stopped, namespaces and bridge deleted, temp dir removed).
# Usage: bash scripts/demo-fleet.sh   (make demo-fleet builds what it needs; run as root)
# Binaries: $DEMO_BIN_DIR, else ${CARGO_TARGET_DIR:-target}/debug (what `make build` writes).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN_DIR=${DEMO_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}
GARAGE=$(command -v garage || echo /usr/local/bin/garage)
KERNEL=$ROOT/target/guest/kernel/vmlinuz
INITRD=$ROOT/target/guest/initramfs.cpio.gz
HOSTS=(h1 h2 h3)

if [ -t 1 ]; then B=$'\033[1m' RED=$'\033[1;31m' GREEN=$'\033[1;32m' N=$'\033[0m'; else B='' RED='' GREEN='' N=''; fi
say() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
note() { printf '    %s\n' "$*"; }
fail() { printf '\n%sDEMO FAILED: %s%s\n' "$RED" "$*" "$N" >&2; exit 1; }
shown() { printf '$ %s\n' "$*" >&2; }
run() { shown "$@"; "$@"; }

[ "$(id -u)" = 0 ] || fail "run as root (network namespaces, FUSE mounts, VMs)"
for f in "$BIN_DIR/imagefs" "$BIN_DIR/vmm" "$KERNEL" "$INITRD"; do
    [ -e "$f" ] || fail "$f missing: run make demo-fleet (it builds them)"
done
[ -x "$GARAGE" ] || fail "garage missing: run make garage"
for c in ip nsenter mkfs.ext4 debugfs /bin/busybox; do
    command -v "$c" >/dev/null || fail "$c missing: run make setup"
done

WORK=$(mktemp -d /tmp/imagefs-demo-fleet.XXXXXX)
TAG=ifd$(($$ % 100000))
NET=10.$((100 + $$ % 100)).$((($$ / 100) % 250)).0
PFX=${NET%.0}
BR=${TAG}br
GPID=
ns() { echo "${TAG}$1"; }
# runs a command in namespace $1's network only (FUSE mounts stay visible machine-wide)
in_ns() { local n=$1; shift; nsenter --net="/var/run/netns/$(ns "$n")" -- "$@"; }
imagefs() { "$BIN_DIR/imagefs" "$@"; }
# imagefs on a store, from inside that store's namespace
on() { local n=$1; shift; shown "[$n] imagefs $*"; in_ns "$n" "$BIN_DIR/imagefs" --store "$WORK/$n" "$@"; }
quiet() { local n=$1; shift; in_ns "$n" "$BIN_DIR/imagefs" --store "$WORK/$n" "$@"; }

cleanup() {
    local rc=$? h
    trap - EXIT INT TERM
    set +e
    for h in "${HOSTS[@]}"; do
        ip link set "${TAG}v$h" up 2>/dev/null
        if [ -d "$WORK/$h/vms" ]; then quiet "$h" vm stop --timeout 3 web-1 >/dev/null 2>&1; fi
        if mountpoint -q "$WORK/mnt-$h" 2>/dev/null; then
            imagefs --store "$WORK/$h" umount "$WORK/mnt-$h" >/dev/null 2>&1 || umount -l "$WORK/mnt-$h"
        fi
    done
    [ -n "$GPID" ] && kill "$GPID" 2>/dev/null && wait "$GPID" 2>/dev/null
    for h in op "${HOSTS[@]}"; do ip netns del "$(ns "$h")" 2>/dev/null; ip link del "${TAG}v$h" 2>/dev/null; done
    ip link del "$BR" 2>/dev/null
    rm -rf --one-file-system "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "A private network: bridge $BR (no address of its own), one namespace per machine on $NET/24"
ip link add "$BR" type bridge
ip link set "$BR" up
i=1
for h in op "${HOSTS[@]}"; do
    ip netns add "$(ns "$h")"
    ip link add "${TAG}v$h" type veth peer name eth0 netns "$(ns "$h")"
    ip link set "${TAG}v$h" master "$BR" up
    in_ns "$h" ip addr add "$PFX.$i/24" dev eth0
    in_ns "$h" ip link set eth0 up
    in_ns "$h" ip link set lo up
    eval "IP_$h=$PFX.$i"
    note "$h: $PFX.$i"
    i=$((i + 1))
done

say "Garage, one node, in the operator's namespace: the fleet's block tier (bucket 'images')"
hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }
KEY="GK$(hex 12)" SECRET=$(hex 32)
mkdir -p "$WORK/garage"
cat >"$WORK/garage/garage.toml" <<EOF
metadata_dir = "$WORK/garage/meta"
data_dir = "$WORK/garage/data"
db_engine = "sqlite"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "$IP_op:3901"
rpc_public_addr = "$IP_op:3901"
rpc_secret = "$(hex 32)"
[s3_api]
s3_region = "garage"
api_bind_addr = "$IP_op:3900"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:3903"
EOF
# nsenter (not the in_ns function, which would leave a subshell's pid) execs garage: GPID is it
GARAGE_DEFAULT_ACCESS_KEY=$KEY GARAGE_DEFAULT_SECRET_KEY=$SECRET GARAGE_DEFAULT_BUCKET=images \
    RUST_LOG=garage=warn nsenter --net="/var/run/netns/$(ns op)" -- "$GARAGE" \
    -c "$WORK/garage/garage.toml" server --single-node --default-bucket >"$WORK/garage/log" 2>&1 &
GPID=$!
printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' "$KEY" "$SECRET" >"$WORK/creds"
chmod 600 "$WORK/creds"
remote_add() {
    on "$1" remote add fleet s3://images/prod --endpoint "http://$IP_op:3900" --region garage \
        --credentials "$WORK/creds" --timeout 10s
}

say "The operator's store: app:v1 and app:v2, pushed to the bucket; the fleet's CA"
mkdir -p "$WORK/images"
# shellcheck source=scripts/app-image.sh
. "$ROOT/scripts/app-image.sh"
build_app_images "$WORK/images"
on op init >/dev/null
on op import "$WORK/images/app-v1.img" app:v1 --block-size 4096 >/dev/null
on op import "$WORK/images/app-v2.img" app:v2 --block-size 4096 >/dev/null
remote_add op
for _ in $(seq 100); do quiet op remote ls >/dev/null 2>&1 && break; sleep 0.1; done
on op push app:v1 | tail -n1
on op push app:v2 | tail -n1
on op fleet ca init

say "Three hosts: each pulls app:v1, mounts with --listen (mutual TLS), boots one VM"
for h in "${HOSTS[@]}"; do
    on op fleet cert "$h" --out "$WORK/tls-$h" >/dev/null
    quiet "$h" init >/dev/null
    remote_add "$h"
    on "$h" pull app:v1 | tail -n1
    mkdir -p "$WORK/mnt-$h"
    on "$h" mount "$WORK/mnt-$h" --daemon --listen "$(eval echo "\$IP_$h"):7443" --tls-dir "$WORK/tls-$h"
    quiet "$h" vm config --kernel "$KERNEL" --initrd "$INITRD" >/dev/null
    on op fleet add "$h" "$(eval echo "\$IP_$h"):7443"
done
T=$(date +%s)
pids=()
for h in "${HOSTS[@]}"; do
    quiet "$h" vm start app:v1 web-1 --hypervisor auto --wait 180 >"$WORK/start-$h" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || fail "a VM did not start: $(cat "$WORK"/start-*)"; done
note "3 VMs up (one per host) in $(($(date +%s) - T)) s"
boot_id() { quiet "$1" agent exec --vm web-1 -- cat /proc/sys/kernel/random/boot_id | tr -d '\r'; }
for h in "${HOSTS[@]}"; do eval "BOOT_$h=$(boot_id "$h")"; done
on op fleet status --timeout 10s

say "Roll app:v2 across the fleet: h1 first, then h2 and h3; host 3's link is cut mid-rollout"
ROLL=(rollout app:v2 --hosts 'h*' --instances 'web-*' --waves 1,100% --by host
    --health-cmd /opt/app/bin/check --host-timeout 5s)
shown "[op] imagefs ${ROLL[*]}"
quiet op "${ROLL[@]}" >"$WORK/rollout.out" 2>&1 &
RPID=$!
for _ in $(seq 600); do grep -q '^wave 1 healthy' "$WORK/rollout.out" && break; sleep 0.1; done
grep -q '^wave 1 healthy' "$WORK/rollout.out" || fail "wave 1 did not finish: $(cat "$WORK/rollout.out")"
run ip link set "${TAG}vh3" down
set +e
wait "$RPID"
RC=$?
set -e
cat "$WORK/rollout.out"
[ "$RC" = 1 ] || fail "the rollout with h3 cut off exited $RC, expected 1 (interrupted)"
ID=$(quiet op rollout ls | tail -n1 | cut -f1)
on op rollout status "$ID"
on op fleet status --timeout 3s

say "Host 3 comes back; the rollout resumes where its journal says"
run ip link set "${TAG}vh3" up
shown "[op] imagefs rollout --resume $ID"
quiet op rollout --resume "$ID" | tee "$WORK/resume.out" || fail "the resumed rollout failed"

say "Every guest reads v2, without a reboot; each host fetched only what changed"
V2=$(quiet op rollout status "$ID" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_id"])')
for h in "${HOSTS[@]}"; do
    got=$(quiet "$h" agent exec --vm web-1 -- cat /opt/app/version | tr -d '\r')
    [ "$got" = v2 ] || fail "$h's guest reads '$got', expected v2"
    now=$(boot_id "$h")
    [ "$now" = "$(eval echo "\$BOOT_$h")" ] || fail "$h's guest rebooted"
    fetched=$(quiet "$h" remote stats --json | tail -n1 | python3 -c \
        'import json,sys; print(json.load(sys.stdin)["versions"].get(sys.argv[1], {}).get("bytes_fetched", 0))' "$V2")
    [ "$fetched" -gt 0 ] || fail "$h did not fetch app:v2's blocks from the bucket"
    [ "$fetched" -le 65536 ] || fail "$h fetched $fetched bytes for a one-block patch"
    note "$h: reads $got, same boot id; fetched $fetched bytes for app:v2 from the bucket (the image is $(stat -c %s "$WORK/images/app-v2.img") bytes)"
done
printf '\n%sDEMO OK%s: app:v2 rolled across 3 hosts live; h3 was cut off, resumed, and caught up\n' "$GREEN" "$N"
