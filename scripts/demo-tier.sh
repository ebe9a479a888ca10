#!/usr/bin/env bash
# The fleet's block tier on one machine: a single-node Garage on loopback as the bucket, two
# stores as two "hosts". Host A imports an app image (v1) and a one-file patch of it (v2) and
# pushes both; host B pulls v1, then v2, and checks that each exports byte for byte what A
# imported. Prints the bytes each step moved. Then v1 is untagged and two `remote gc` passes
# delete what only v1 needed, and B pulls v2 again into a third store to show it is whole.
# Invariant: every check that fails exits non-zero, and the trap leaves nothing behind (Garage
# stopped, temp dir removed) however the script ends.
# Usage: bash scripts/demo-tier.sh   (make demo-tier builds the binaries and installs Garage)
# Binaries: $DEMO_BIN_DIR, else ${CARGO_TARGET_DIR:-target}/debug (what `make build` writes).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN_DIR=${DEMO_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}
GARAGE=$(command -v garage || echo /usr/local/bin/garage)

if [ -t 1 ]; then B=$'\033[1m' RED=$'\033[1;31m' GREEN=$'\033[1;32m' N=$'\033[0m'; else B='' RED='' GREEN='' N=''; fi
say() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
note() { printf '    %s\n' "$*"; }
fail() { printf '\n%sDEMO FAILED: %s%s\n' "$RED" "$*" "$N" >&2; exit 1; }
imagefs() { "$BIN_DIR/imagefs" "$@"; }
shown() { printf '$ imagefs %s\n' "$*" >&2; }
# imagefs STORE ARGS --json, shown; prints the result line (the last JSON line)
json() { local s=$1; shift; shown "--store $(basename "$s") $*"; imagefs --store "$s" "$@" --json | tail -n1; }
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }
mib() { python3 -c 'import sys; print(f"{int(sys.argv[1])/1048576:.2f} MiB")' "$1"; }

[ -x "$BIN_DIR/imagefs" ] || fail "$BIN_DIR/imagefs missing: run make build (or make demo-fleet)"
[ -x "$GARAGE" ] || fail "garage missing: run make garage"
command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null || fail "needs e2fsprogs"

WORK=$(mktemp -d /tmp/imagefs-demo-fleet.XXXXXX)
GPID=
cleanup() {
    [ -n "$GPID" ] && kill "$GPID" 2>/dev/null && wait "$GPID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

say "Garage 2.5.0, one node on loopback, bucket 'images'"
S3=$(port) RPC=$(port) ADMIN=$(port)
KEY="GK$(hex 12)" SECRET=$(hex 32)
mkdir -p "$WORK/garage"
cat >"$WORK/garage/garage.toml" <<EOF
metadata_dir = "$WORK/garage/meta"
data_dir = "$WORK/garage/data"
db_engine = "sqlite"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$RPC"
rpc_public_addr = "127.0.0.1:$RPC"
rpc_secret = "$(hex 32)"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$ADMIN"
EOF
GARAGE_DEFAULT_ACCESS_KEY=$KEY GARAGE_DEFAULT_SECRET_KEY=$SECRET GARAGE_DEFAULT_BUCKET=images \
    RUST_LOG=garage=warn "$GARAGE" -c "$WORK/garage/garage.toml" server --single-node --default-bucket \
    >"$WORK/garage/log" 2>&1 &
GPID=$!
printf '[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n' "$KEY" "$SECRET" >"$WORK/creds"
chmod 600 "$WORK/creds"

host() {  # a store with the remote 'fleet'
    imagefs --store "$WORK/$1" init >/dev/null
    shown "--store $1 remote add fleet s3://images/prod --endpoint http://127.0.0.1:$S3 --region garage --credentials creds"
    imagefs --store "$WORK/$1" remote add fleet s3://images/prod --endpoint "http://127.0.0.1:$S3" \
        --region garage --credentials "$WORK/creds" --timeout 10s
}
host host-a; host host-b
for _ in $(seq 100); do
    imagefs --store "$WORK/host-a" remote ls >/dev/null 2>&1 && break
    sleep 0.1
done
imagefs --store "$WORK/host-a" remote ls >/dev/null || fail "garage did not come up: $(tail -5 "$WORK/garage/log")"

say "Host A: an ext4 app image (v1, 256 MiB) and v2 = v1 with one file rewritten"
mkdir -p "$WORK/tree/app"
for i in $(seq 1 40); do head -c $((1 << 20)) /dev/urandom >"$WORK/tree/app/lib$i.so"; done
echo "version 1" >"$WORK/tree/app/VERSION"
mkfs.ext4 -q -F -d "$WORK/tree" "$WORK/v1.img" 256M >/dev/null
cp --sparse=always "$WORK/v1.img" "$WORK/v2.img"
head -c $((1 << 20)) /dev/urandom >"$WORK/lib7.new"
printf 'rm /app/lib7.so\nwrite %s /app/lib7.so\n' "$WORK/lib7.new" >"$WORK/patch.cmds"
debugfs -w -f "$WORK/patch.cmds" "$WORK/v2.img" >/dev/null 2>&1
cmp -s "$WORK/v1.img" "$WORK/v2.img" && fail "the patch changed nothing"
imagefs --store "$WORK/host-a" import "$WORK/v1.img" app:v1 >/dev/null
imagefs --store "$WORK/host-a" import "$WORK/v2.img" app:v2 >/dev/null
note "imported app:v1 and app:v2"

say "Host A pushes v1, then v2 (only v2's new blocks go)"
R1=$(json "$WORK/host-a" push app:v1)
R2=$(json "$WORK/host-a" push app:v2)
note "push v1: $(mib "$(field "$R1" bytes_uploaded)") uploaded ($(field "$R1" new_blocks) blocks)"
note "push v2: $(mib "$(field "$R2" bytes_uploaded)") uploaded ($(field "$R2" new_blocks) new blocks) of a $(mib "$(stat -c %s "$WORK/v2.img")") image"

say "Host B pulls v1, then v2 (only the blocks it lacks), each block verified"
P1=$(json "$WORK/host-b" pull app:v1)
P2=$(json "$WORK/host-b" pull app:v2)
note "pull v1: $(mib "$(field "$P1" bytes_fetched)") fetched in $(field "$P1" requests) requests"
note "pull v2: $(mib "$(field "$P2" bytes_fetched)") fetched in $(field "$P2" requests) requests"
for v in v1 v2; do
    imagefs --store "$WORK/host-b" export "app:$v" "$WORK/b-$v.img" >/dev/null
    cmp "$WORK/$v.img" "$WORK/b-$v.img" || fail "host B's app:$v differs from host A's"
    note "host B's app:$v is byte for byte host A's"
done

say "Untag v1 in the remote; two gc passes delete what only v1 needed"
shown "--store host-a remote untag app:v1"
imagefs --store "$WORK/host-a" remote untag app:v1
G1=$(json "$WORK/host-a" remote gc --grace 0s)
G2=$(json "$WORK/host-a" remote gc --grace 0s)
note "first pass: $(field "$G1" action), $(field "$G1" candidates) objects marked"
note "second pass: $(field "$G2" action) $(field "$G2" deleted) objects ($(mib "$(field "$G2" deleted_bytes)"))"
host host-c
json "$WORK/host-c" pull app:v2 >/dev/null
imagefs --store "$WORK/host-c" export app:v2 "$WORK/c-v2.img" >/dev/null
cmp "$WORK/v2.img" "$WORK/c-v2.img" || fail "app:v2 pulled after gc differs"
note "a third host pulls app:v2 whole after the gc"

printf '\n%sDEMO OK%s: v2 cost %s to push and %s to pull after v1 (image %s)\n' "$GREEN" "$N" \
    "$(mib "$(field "$R2" bytes_uploaded)")" "$(mib "$(field "$P2" bytes_fetched)")" \
    "$(mib "$(stat -c %s "$WORK/v2.img")")"
