#!/usr/bin/env bash
# Sets everything up on Debian 12 (as root) and runs the whole nbdfs test suite.
#   scripts/test.sh              build in build/, run every suite
#   scripts/test.sh --sanitize   the same under AddressSanitizer + UBSan, in build-asan/
#   scripts/test.sh -- ARGS      extra arguments for 'meson test' (e.g. --suite unit)
# Ends with one line "tests: N passed, N failed, N skipped" and exits non-zero on any failure.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

builddir=build
setup_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --sanitize)
      builddir=build-asan
      setup_args=(-Db_sanitize=address,undefined -Db_lundef=false -Dbuildtype=debug)
      shift ;;
    --) shift; break ;;
    *) echo "test.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
done

bash scripts/setup.sh

if [ -f "$builddir/build.ninja" ]; then
  meson setup --reconfigure "$builddir" "${setup_args[@]}" >/dev/null
else
  meson setup "$builddir" "${setup_args[@]}" >/dev/null
fi
ninja -C "$builddir"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
status=0
meson test -C "$builddir" --print-errorlogs --num-processes 2 "$@" || status=$?

/usr/bin/python3 - "$builddir/meson-logs/testlog.json" <<'PY'
import json, sys
counts = {"passed": 0, "failed": 0, "skipped": 0}
with open(sys.argv[1]) as f:
    for line in f:
        r = json.loads(line)["result"]
        key = {"OK": "passed", "EXPECTEDFAIL": "passed", "SKIP": "skipped"}.get(r, "failed")
        counts[key] += 1
print("tests: %(passed)d passed, %(failed)d failed, %(skipped)d skipped" % counts)
PY
exit "$status"
