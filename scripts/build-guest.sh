#!/usr/bin/env bash
# Builds target/guest/initramfs.cpio.gz: the guest-agent as /init plus the virtio modules.
# Owned by the guest-agent work; placeholder until then.
set -euo pipefail
echo "build-guest: not built yet" >&2
