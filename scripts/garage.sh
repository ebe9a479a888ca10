#!/usr/bin/env bash
# `make garage`: installs Garage (the fleet tier's S3-compatible object store, issue 12) into
# /usr/local/bin once per machine. Idempotent: a garage of the right version already there is
# left alone. The build takes about 11 minutes on 2 cores, at low priority so that tests and
# builds running beside it keep their pace.
set -euo pipefail
VERSION=2.5.0
ROOT=${GARAGE_ROOT:-/usr/local}
BIN="$ROOT/bin/garage"
CARGO=${CARGO:-cargo}

# `garage --version` says "garage cargo:2.5.0 [features: ...]" for a cargo-installed build.
have() { [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -Eq "(^|[^0-9.])${VERSION//./\\.}([^0-9.]|$)"; }
have && exit 0
# One build at a time per machine: a second `make garage` waits for the first, then finds it done.
mkdir -p /var/lock
exec 9>/var/lock/imagefs-garage-install.lock
flock 9
have && exit 0
echo "make garage: building garage $VERSION into $ROOT/bin (cargo install, about 11 minutes on 2 cores, once per machine)"
TGT=${GARAGE_BUILD_DIR:-/var/tmp/imagefs-garage-build}
CARGO_TARGET_DIR="$TGT" nice -n 19 "$CARGO" install garage --locked --version "$VERSION" --root "$ROOT" --quiet
have || { echo "make garage: $BIN --version does not report $VERSION" >&2; exit 1; }
rm -rf "$TGT"
echo "make garage: installed $("$BIN" --version | head -n1)"
