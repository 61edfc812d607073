#!/bin/sh
# Incremental backups of an image in use, with no downtime.
#
# nbdfs serve keeps serving disk.img and a writer never stops.  Each backup
# starts with `nbdfs backup begin --bitmap b0`: a read-only export
# disk.img@backup shows the image exactly as it was at that instant, carrying
# b0 frozen at that instant (what changed since the previous backup), while
# b0 itself restarts empty.  The view is mounted and copied with cp:
#   full backup:         cp --sparse=always MNT/disk.img@backup full.img
#   incremental backup:  cp --sparse=always MNT/dirty/b0.img delta-N.img
# then `nbdfs backup end`.  Each point in time is rebuilt from the full
# backup plus the deltas, and checked byte for byte against what the writer
# had written at that `begin`.  Two more rounds show the failure cases: a
# backup that is aborted (its changes go back into b0: the next delta holds
# them), and a server killed during a backup (b0 is then all dirty: the next
# delta is the whole image, and still right).
set -eu
NBDFS=${NBDFS:-nbdfs}
work=$(mktemp -d)
img=$work/disk.img
sock=$work/nbd.sock
mnt=$work/mnt
size=$((64 * 1024 * 1024))

# The writer: write i puts 4 KiB of the 8-byte number i at block i * 7919 mod
# 2048 (the first 8 MiB are busy, the rest of the image stays as it was), one
# after another, and records in $work/done the last one answered.
# The image at any instant is then "every write up to some k", and k can be
# read back from the image itself: the largest number in it.
writer='
import os, struct
n, i = 2048, int(os.environ["FIRST"]) - 1
while not os.path.exists(os.environ["STOP"]):
    i += 1
    h.pwrite(struct.pack(">Q", i) * 512, (i * 7919 % n) * 4096)
    with open(os.environ["DONE"] + ".new", "w") as f:
        f.write(str(i))
    os.rename(os.environ["DONE"] + ".new", os.environ["DONE"])
'
# Is FILE the image after exactly the writes 1..k, for some k in [LO, HI]?
check_point_in_time() {
    python3 - "$1" "$2" "$3" <<'PY'
import struct, sys
path, lo, hi = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = open(path, "rb").read()
n = 2048
k = max(struct.unpack_from(">Q", data, b * 4096)[0] for b in range(n))
want = bytearray(len(data))
for i in range(1, k + 1):
    want[(i * 7919 % n) * 4096:(i * 7919 % n + 1) * 4096] = struct.pack(">Q", i) * 512
if not lo <= k <= hi or want != data:
    sys.exit("%s: not the image at the backup's start (writes 1..%d; begin saw %d..%d)"
             % (path, k, lo, hi))
print("  %s = the image after writes 1..%d (begin ran while writes %d..%d were answered)"
      % (path.rsplit("/", 1)[1], k, lo, hi))
PY
}
start_server() {
    "$NBDFS" serve -U "$sock" --pid-file "$work/server.pid" --fork "$img"
}
# Wait (10 s at most) until the shell test "$@" is true.
wait_until() {
    tries=200
    until "$@"; do
        tries=$((tries - 1))
        if [ "$tries" -le 0 ]; then
            echo "live-incremental-backup: timed out waiting for: $*" >&2
            exit 1
        fi
        sleep 0.05
    done
}
writes_answered() { [ "$(cat "$work/done" 2>/dev/null || echo 0)" -ge "$1" ]; }
gone() { ! kill -0 "$1" 2>/dev/null; }
start_writer() {   # and wait until its first write is answered
    first=$(($(cat "$work/done" 2>/dev/null || echo 0) + 1))
    FIRST=$first STOP=$work/stop DONE=$work/done \
        nbdsh -u "nbd+unix:///disk.img?socket=$sock" -c "$writer" 2>> "$work/writer.err" &
    writer_pid=$!
    wait_until writes_answered "$first"
}
stop_server() {   # SIGTERM or SIGKILL; returns once it is gone
    pid=$(cat "$work/server.pid")
    kill "-$1" "$pid" 2>/dev/null || true
    wait_until gone "$pid"
}
cleanup() {
    touch "$work/stop"
    "$NBDFS" umount "$mnt" 2>/dev/null || true
    wait 2>/dev/null || true
    if [ -s "$work/server.pid" ]; then stop_server TERM; fi
    rm -rf "$work"
}
trap cleanup EXIT

# Apply the delta of the view mounted on $mnt to a copy of the previous rebuild.
backup_round() {   # NAME PREVIOUS
    lo=$(cat "$work/done")
    view=$("$NBDFS" backup begin --bitmap b0 "$img")
    hi=$(($(cat "$work/done") + 1))
    "$NBDFS" mount "nbd+unix:///$view?socket=$sock" "$mnt"
    if [ -z "$2" ]; then
        cp --sparse=always "$mnt/$view" "$work/$1.img"
    else
        cp --sparse=always "$mnt/dirty/b0.img" "$work/delta-$1.img"
        cp --sparse=always "$work/$2.img" "$work/$1.img"
        while read -r offset length; do
            dd if="$work/delta-$1.img" of="$work/$1.img" bs=1M conv=notrunc status=none \
                iflag=skip_bytes,count_bytes oflag=seek_bytes \
                skip="$offset" seek="$offset" count="$length"
        done < "$mnt/dirty/b0.map"
        echo "$1: $(awk '{ n += $2 } END { print n / 1048576 }' "$mnt/dirty/b0.map") MiB" \
             "changed since the previous backup, delta $(du -k "$work/delta-$1.img" | cut -f1)" \
             "KiB on disk"
    fi
    "$NBDFS" backup list "$img"
    "$NBDFS" umount "$mnt"
    "$NBDFS" backup end "$img"
    check_point_in_time "$work/$1.img" "$lo" "$hi"
}

truncate -s "$size" "$img"
"$NBDFS" bitmap add "$img" b0
start_server
mkdir "$mnt"
start_writer

backup_round full ""
sleep 1
backup_round inc1 full
sleep 1
backup_round inc2 inc1

# A backup that fails: abort gives its changes back to b0.
"$NBDFS" backup begin --bitmap b0 "$img" > /dev/null
sleep 0.5
"$NBDFS" backup abort "$img"
sleep 0.5
backup_round inc3 inc2

# A server killed during a backup: b0 is then all dirty, never short.
"$NBDFS" backup begin --bitmap b0 "$img" > /dev/null
stop_server KILL
wait "$writer_pid" 2>/dev/null || true     # its connection is gone
"$NBDFS" bitmap list "$img" 2>&1
start_server
start_writer
backup_round inc4 inc3

touch "$work/stop"
if ! wait "$writer_pid"; then
    cat "$work/writer.err" >&2
    exit 1
fi
echo "live-incremental-backup: OK"
