#!/usr/bin/env bash
# Installs, idempotently, every system package the project needs beyond a fresh machine:
# QEMU (one matching version of qemu-system-x86/-common/-data and qemu-utils, which gives
# qemu-img), busybox-static, cpio, fuse3 tools, e2fsprogs (mkfs.ext4, debugfs), binutils (as,
# objcopy), file, debootstrap (the full guest's root filesystem), iproute2 (`ip`: the fleet tests'
# network namespaces; nsenter is util-linux's), and (with --bench) the bench
# peers (rclone is the remote group's S3 client). Every tool a test runs is here (tests/lib.rs
# TOOLS), so under IMAGEFS_STRICT no test skips. Safe to run again: it installs only what is
# missing.
set -euo pipefail
bench=0
[ "${1:-}" = "--bench" ] && bench=1

need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
for p in binutils busybox-static cpio debootstrap e2fsprogs file fuse3 iproute2 util-linux xz-utils zstd; do have "$p" || need+=("$p"); done
if [ "$bench" = 1 ]; then
  for p in casync fio b3sum time rclone; do have "$p" || need+=("$p"); done
fi
qemu_ok=1
command -v qemu-system-x86_64 >/dev/null 2>&1 || qemu_ok=0
command -v qemu-img >/dev/null 2>&1 || qemu_ok=0

if [ ${#need[@]} -gt 0 ] || [ "$qemu_ok" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  # Refresh the lists once a day at most; apt-cache needs them on a fresh machine.
  stamp=/var/lib/apt/periodic/imagefs-update-stamp
  if [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440 2>/dev/null)" ]; then
    apt-get update -qq
    mkdir -p "$(dirname "$stamp")" && touch "$stamp"
  fi
  if [ ${#need[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  if [ "$qemu_ok" = 0 ]; then
    # qemu-utils may come from backports on a fresh machine; pin all four to the version that
    # qemu-system-x86 is offered at, or apt refuses the mix.
    ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    [ -n "$ver" ] && [ "$ver" != "(none)" ] || { echo "setup: qemu-system-x86 is not in the package archive" >&2; exit 1; }
    datav=$(apt-cache madison qemu-system-data | awk -F'|' -v v="${ver%+b*}" '{gsub(/ /,"",$2); if ($2==v) print $2}' | head -n1)
    [ -n "$datav" ] || datav=$(apt-cache policy qemu-system-data | awk '/Candidate:/ {print $2}')
    apt-get install -y -qq --no-install-recommends --allow-downgrades \
      "qemu-system-x86=$ver" "qemu-system-common=$ver" "qemu-system-data=$datav" "qemu-utils=$ver" >/dev/null
  fi
fi
command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null && [ -x /bin/busybox ] &&
  echo "setup: system packages present"
