#!/usr/bin/env bash
# The main job of nbdfs on a demo image, from a fresh Debian 12 machine (as root):
# installs what is missing, builds, makes a 16 GiB sparse raw image with 64 MiB of
# data, starts tracking its changes in a dirty bitmap, mounts it, copies it sparsely,
# writes through the mount and shows the dirty map and the delta image.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

bash scripts/setup.sh
[ -f build/build.ninja ] || meson setup build >/dev/null
ninja -C build >/dev/null
nbdfs=$top/build/fuse/nbdfs

work=${DEMO_DIR:-/tmp/nbdfs-demo}
img=$work/demo.img
mnt=$work/mnt
cleanup() {
  if mountpoint -q "$mnt" 2>/dev/null; then "$nbdfs" umount "$mnt" || umount -l "$mnt"; fi
}
trap cleanup EXIT
cleanup
rm -rf "$work"
mkdir -p "$mnt"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "A 16 GiB sparse raw image holding 64 MiB of data in 64 extents"
truncate -s 16G "$img"
for i in $(seq 0 63); do
  dd if=/dev/urandom of="$img" bs=1M count=1 seek=$((i * 256)) conv=notrunc status=none
done
ls -lsh "$img"

step "Track changes from now on: nbdfs bitmap add"
"$nbdfs" bitmap add "$img" b0
"$nbdfs" bitmap list "$img"

step "Mount it: nbdfs mount $img $mnt (bundled in-process server)"
"$nbdfs" mount "$img" "$mnt"
ls -ls "$mnt" "$mnt/dirty"
echo "du of the mounted file: $(du -h "$mnt/demo.img" | cut -f1) (the data, not 16G)"

step "Sparse copy: cp --sparse=always reads only the data (holes come from SEEK_DATA/SEEK_HOLE)"
time cp --sparse=always "$mnt/demo.img" "$work/copy.img"
cmp "$img" "$work/copy.img" && echo "copy is identical; allocated: $(du -h "$work/copy.img" | cut -f1)"

step "Write through the mount: 3 small writes"
for off in 1000 5000 9000; do
  printf 'changed at %d MiB' "$off" | dd of="$mnt/demo.img" bs=1M seek="$off" conv=notrunc,fsync status=none
done

step "The dirty map: $mnt/dirty/b0.map (offset length, in bytes)"
cat "$mnt/dirty/b0.map"

step "The delta image: only the changed blocks are data"
cp --sparse=always "$mnt/dirty/b0.img" "$work/delta.img"
ls -ls "$work/delta.img"
echo "delta allocated: $(du -h "$work/delta.img" | cut -f1) of $(du -h --apparent-size "$work/delta.img" | cut -f1)"

step "Unmount: nbdfs umount returns once the data is flushed and the image released"
"$nbdfs" umount "$mnt"
"$nbdfs" bitmap list "$img"
echo
echo "Done. Files are in $work."
