#!/usr/bin/env bash
# Fetches Debian's stock cloud kernel (the package linux-image-cloud-amd64 depends on) from the
# package archive, caches the .deb in $IMAGEFS_CACHE (default /var/cache/imagefs), and unpacks it
# into target/guest/kernel: vmlinuz, config, and lib/modules/<version>/. A second run fetches nothing.
# Prints the kernel directory.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cache=${IMAGEFS_CACHE:-/var/cache/imagefs}
out=$top/target/guest/kernel
if [ -f "$out/vmlinuz" ] && [ -d "$out/modules" ]; then echo "$out"; exit 0; fi
mkdir -p "$cache/deb"
deb=$(ls "$cache"/deb/linux-image-*-cloud-amd64*.deb 2>/dev/null | grep -v -- -dbg | head -n1 || true)
if [ -z "$deb" ]; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends:/ && $2 ~ /^linux-image-/ {print $2; exit}')
  if [ -z "$pkg" ]; then apt-get update -qq; pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends:/ && $2 ~ /^linux-image-/ {print $2; exit}'); fi
  [ -n "$pkg" ] || { echo "fetch-kernel: linux-image-cloud-amd64 is not in the package archive" >&2; exit 1; }
  (cd "$cache/deb" && apt-get download -qq "$pkg")
  deb=$(ls "$cache"/deb/linux-image-*-cloud-amd64*.deb | head -n1)
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$deb" "$tmp"
rm -rf "$out"; mkdir -p "$out"
cp "$tmp"/boot/vmlinuz-* "$out/vmlinuz"
cp "$tmp"/boot/config-* "$out/config"
kver=$(ls "$tmp/lib/modules" | head -n1)
mv "$tmp/lib/modules/$kver" "$out/modules"
echo "$kver" > "$out/version"
echo "$out"
