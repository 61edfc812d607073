#!/usr/bin/env bash
# Sets everything up on Debian 12 (as root) and runs the whole nbdfs test suite:
#   1. gcc build (build/): every suite, then the server's protocol and interop
#      suites and the mount suites (but the stress test) again with every
#      'nbdfs serve' and 'nbdfs mount' under valgrind memcheck
#   2. clang build with AddressSanitizer + UBSan and the libFuzzer targets
#      (build-asan/), linked with the system's libfuse (the fallback: step 1
#      uses the newer one setup.sh builds): every suite again, plus short
#      fuzzing runs
# Options:
#   --quick        step 1 only
#   --sanitize     step 2 only
#   -- ARGS        extra arguments for 'meson test' (e.g. -- --suite unit)
# Ends with one line "tests: N passed, N failed, N skipped" and exits non-zero on any failure.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

steps="plain sanitize"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) steps="plain"; shift ;;
    --sanitize) steps="sanitize"; shift ;;
    --) shift; break ;;
    *) echo "test.sh: unknown option '$1'" >&2; exit 2 ;;
  esac
done

bash scripts/setup.sh

# configure BUILDDIR [meson options...]: set up once, reconfigure after that.
configure() {
  local dir=$1; shift
  if [ -f "$dir/build.ninja" ]; then
    meson setup --reconfigure "$dir" "$@" >/dev/null
  else
    meson setup "$dir" "$@" >/dev/null
  fi
}

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$top/tests/lsan.supp:print_suppressions=0}
status=0
logs=()
for step in $steps; do
  case $step in
    plain)
      dir=build
      configure "$dir" ;;
    sanitize)
      dir=build-asan
      CC=clang configure "$dir" -Db_sanitize=address,undefined -Db_lundef=false \
        -Dbuildtype=debug -Dfuzzing=true -Dpkg_config_path= ;;
  esac
  echo "== $step build ($dir)"
  ninja -C "$dir"
  # Sanitizers report at exit: mounts stay in the foreground so the tests see it.
  NBDFS_TEST_FOREGROUND=$([ "$step" = sanitize ] && echo 1 || echo 0) \
    meson test -C "$dir" --print-errorlogs --num-processes 2 "$@" || status=1
  logs+=("$dir/meson-logs/testlog.json")
  if [ "$step" = plain ] && [ $# -eq 0 ]; then
    echo "== valgrind: protocol, interop and fuse suites"
    meson test -C "$dir" --setup valgrind --suite protocol --suite interop --suite fuse \
      --no-suite stress --print-errorlogs --num-processes 2 || status=1
    logs+=("$dir/meson-logs/testlog-valgrind.json")
  fi
done

/usr/bin/python3 - "${logs[@]}" <<'PY'
import json, sys
counts = {"passed": 0, "failed": 0, "skipped": 0}
for path in sys.argv[1:]:
    with open(path) as f:
        for line in f:
            r = json.loads(line)["result"]
            key = {"OK": "passed", "EXPECTEDFAIL": "passed", "SKIP": "skipped"}.get(r, "failed")
            counts[key] += 1
print("tests: %(passed)d passed, %(failed)d failed, %(skipped)d skipped" % counts)
PY
exit "$status"
