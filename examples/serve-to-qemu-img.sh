#!/bin/sh
# Serve a local raw image with `nbdfs serve` and convert it to qcow2 with
# qemu-img, reading over NBD (a unix socket).
set -eu
NBDFS=${NBDFS:-nbdfs}
work=$(mktemp -d)
cleanup() {
    if [ -s "$work/serve.pid" ]; then
        kill "$(cat "$work/serve.pid")" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

truncate -s 256M "$work/disk.img"
head -c 4M /dev/urandom | dd of="$work/disk.img" bs=1M seek=100 conv=notrunc status=none

# --fork returns once the server listens; the pid file names it.
"$NBDFS" serve --read-only --fork --pid-file "$work/serve.pid" -U "$work/nbd.sock" \
    "$work/disk.img"
uri="nbd+unix:///disk.img?socket=$work/nbd.sock"

qemu-img info "$uri"
qemu-img convert -f raw -O qcow2 "$uri" "$work/disk.qcow2"
qemu-img compare -f raw -F qcow2 "$work/disk.img" "$work/disk.qcow2"
qemu-img info "$work/disk.qcow2" | grep -E 'virtual size|disk size'
echo "serve-to-qemu-img: OK"
