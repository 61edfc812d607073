#!/usr/bin/env bash
# Run one libFuzzer target: replay the regression inputs, then fuzz for SECONDS
# starting from SEEDS.  New corpus entries go to a temporary directory, so the
# source tree is never written.  A crash fails the test and its input is kept
# in $FUZZ_ARTIFACTS (default: the build directory) to become a regression.
set -euo pipefail
exe=$1 seeds=$2 regressions=$3 seconds=$4
artifacts=${FUZZ_ARTIFACTS:-$(dirname "$exe")/fuzz-artifacts}
mkdir -p "$artifacts"
work=$(mktemp -d /tmp/nbdfs-fuzz-corpus.XXXXXX)
trap 'rm -rf "$work"' EXIT

shopt -s nullglob
inputs=("$regressions"/*)
if [ ${#inputs[@]} -gt 0 ]; then
  echo "replaying ${#inputs[@]} regression inputs"
  "$exe" -runs=1 "${inputs[@]}"
fi
"$exe" -max_total_time="$seconds" -max_len=65536 -timeout=20 -rss_limit_mb=4096 \
  -print_final_stats=1 -error_exitcode=1 -timeout_exitcode=1 -artifact_prefix="$artifacts/" "$work" "$seeds"
