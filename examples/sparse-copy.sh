#!/bin/sh
# Copy an NBD export into a sparse local file, reading only its data.
#
# nbdfs answers lseek(SEEK_DATA/SEEK_HOLE) from the server's block status and
# reports the export's real allocation in st_blocks, so `cp --sparse=always`
# skips the holes instead of reading them.  Here the source is a local raw
# image, served in-process; an NBD URI works the same way.
set -eu
NBDFS=${NBDFS:-nbdfs}
work=$(mktemp -d)
trap '"$NBDFS" umount "$work/mnt" 2>/dev/null || true; rm -rf "$work"' EXIT

# A 1 GiB image holding 3 MiB of data in three places.
truncate -s 1G "$work/disk.img"
for mib in 0 300 900; do
    head -c 1M /dev/urandom | dd of="$work/disk.img" bs=1M seek=$mib conv=notrunc status=none
done

mkdir "$work/mnt"
"$NBDFS" mount --read-only "$work/disk.img" "$work/mnt"
stat -c '%n: %s bytes, %b blocks of 512 allocated' "$work/mnt/disk.img"

cp --sparse=always "$work/mnt/disk.img" "$work/copy.img"
"$NBDFS" umount "$work/mnt"

# Same bytes, same holes.
cmp "$work/disk.img" "$work/copy.img"
used=$(du -k "$work/copy.img" | cut -f1)
echo "copy: $(stat -c %s "$work/copy.img") bytes, ${used} KiB allocated"
if [ "$used" -ne 3072 ]; then
    echo "sparse-copy: expected 3072 KiB allocated, found $used" >&2
    exit 1
fi
echo "sparse-copy: OK"
