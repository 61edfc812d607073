#!/usr/bin/env bash
# Runs the nbdfs benchmark (tests/bench/bench.py) on Debian 12 (or newer), as root:
#   1. scripts/setup.sh installs what is missing (build tools, libnbd 1.22 with nbdfuse,
#      qemu 10, nbdkit, nbd-server, fio); it installs nothing on a ready system
#   2. builds nbdfs with meson + ninja in build/ (or $NBDFS_BUILDDIR) if needed
#   3. runs bench.py with this script's arguments and that build's fuse/nbdfs
#
# Usage: scripts/bench.sh [--runs N] [--only W1,W3,...] [--quick] [--nbdfs PATH]
#                         [--workdir DIR] [--output FILE]
#   scripts/bench.sh --quick --runs 1                 # smoke run, about 1.5 minutes
#   scripts/bench.sh --output tests/bench/results.txt # the full run, about 11 minutes
# Workloads, subjects and how figures are counted: see the top of tests/bench/bench.py.
# Prints one table; exits non-zero if a subject failed (the table says which).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

bash scripts/setup.sh

builddir=${NBDFS_BUILDDIR:-build}
if [ ! -f "$builddir/build.ninja" ]; then
  meson setup "$builddir" >/dev/null
fi
ninja -C "$builddir" >/dev/null

nbdfs_args=(--nbdfs "$builddir/fuse/nbdfs")
for a in "$@"; do
  case "$a" in
    --nbdfs|--nbdfs=*) nbdfs_args=() ;;
  esac
done
exec /usr/bin/python3 tests/bench/bench.py "${nbdfs_args[@]}" "$@"
