#!/bin/sh
# Incremental backup from a dirty bitmap.
#
# A qcow2 image carries a persistent dirty bitmap (qemu-img bitmap --add);
# qemu-nbd serves it, and nbdfs shows the bitmap as dirty/b0.map (the changed
# ranges) and dirty/b0.img (the export with only the changed ranges readable).
#   1. full backup:         cp --sparse=always MNT/disk full.img
#   2. the disk changes     (here: writes through the mount)
#   3. incremental backup:  cp --sparse=always MNT/dirty/b0.img delta.img
#   4. merge delta.img into full.img at the ranges of dirty/b0.map
#   5. full.img equals the disk; clear the bitmap for the next round.
set -eu
NBDFS=${NBDFS:-nbdfs}
work=$(mktemp -d)
mnt=$work/mnt
sock=$work/nbd.sock
stop_server() {
    if [ -s "$work/qemu-nbd.pid" ]; then
        kill "$(cat "$work/qemu-nbd.pid")" 2>/dev/null || true
        # qemu-nbd releases the image lock when it exits.
        while kill -0 "$(cat "$work/qemu-nbd.pid")" 2>/dev/null; do sleep 0.1; done
        rm -f "$work/qemu-nbd.pid"
    fi
}
start_server() {
    qemu-nbd -f qcow2 -B b0 -k "$sock" -e 4 --persistent --fork \
        --pid-file "$work/qemu-nbd.pid" "$work/vm.qcow2"
}
trap '"$NBDFS" umount "$mnt" 2>/dev/null || true; stop_server; rm -rf "$work"' EXIT

qemu-img create -q -f qcow2 "$work/vm.qcow2" 256M
qemu-io -f qcow2 -c 'write -q -P 0x11 0 8M' -c 'write -q -P 0x22 64M 4M' "$work/vm.qcow2"
qemu-img bitmap --add "$work/vm.qcow2" b0        # changes are tracked from now on

start_server
mkdir "$mnt"
"$NBDFS" mount "nbd+unix:///?socket=$sock" "$mnt"

# 1. Full backup.
cp --sparse=always "$mnt/disk" "$work/full.img"

# 2. The disk changes.
head -c 192K /dev/urandom | dd of="$mnt/disk" bs=64K seek=100 conv=notrunc,fsync status=none
head -c 4K /dev/urandom | dd of="$mnt/disk" bs=4K seek=30000 conv=notrunc,fsync status=none
echo "changed ranges (offset length):"
cat "$mnt/dirty/b0.map"

# 3. Incremental backup: only the changed blocks are read and stored.
cp --sparse=always "$mnt/dirty/b0.img" "$work/delta.img"
echo "delta: $(du -k "$work/delta.img" | cut -f1) KiB allocated"

# 4. Merge.
while read -r offset length; do
    dd if="$work/delta.img" of="$work/full.img" bs=1M conv=notrunc status=none \
        iflag=skip_bytes,count_bytes oflag=seek_bytes \
        skip="$offset" seek="$offset" count="$length"
done < "$mnt/dirty/b0.map"

# 5. The merged backup is the disk.
cmp "$work/full.img" "$mnt/disk"
"$NBDFS" umount "$mnt"
stop_server
qemu-img bitmap --clear "$work/vm.qcow2" b0

# The next round starts clean.
start_server
"$NBDFS" mount --read-only "nbd+unix:///?socket=$sock" "$mnt"
if [ -s "$mnt/dirty/b0.map" ]; then
    echo "incremental-backup: bitmap not clear after --clear" >&2
    exit 1
fi
"$NBDFS" umount "$mnt"
echo "incremental-backup: OK"
