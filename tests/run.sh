#!/usr/bin/env bash
# The one test command: installs what is missing (Deno from npm, the Debian
# packages of the real servers), runs the quality gates, the unit and
# interop tests, then the kernel test in its guest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
export DENO_NO_UPDATE_CHECK=1
export PATH="$PATH:$(npm prefix -g 2>/dev/null)/bin"

echo "== quality gates"
deno fmt --check
deno lint
deno check mod.ts ffi/mod.ts examples/ tests/ bench/
# Each entry point alone: a type only the other one exports is private to
# a user who imports just this one.
deno doc --lint mod.ts
deno doc --lint ffi/mod.ts
deno publish --dry-run --allow-dirty >/dev/null

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
echo "== unit and interop tests"
# Deno 2.8 made the op and resource sanitizers opt-in: every test here must
# finish what it starts and close what it opens.
deno test --allow-all --parallel --sanitize-ops --sanitize-resources \
  --ignore=tests/kernel tests/ 2>&1 | tee "$log" ||
  status=$?
echo "== kernel handoff (Debian kernel under qemu)"
deno test --allow-all tests/kernel/ 2>&1 | tee -a "$log" || status=$?

# One plain summary line over both runs.
passed=$(grep -aoE '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -aoE '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
# CI shows the end of the output: name what failed there, with its error.
if [ "$failed" -gt 0 ]; then
  echo "== what failed (repeated from above)"
  # awk stops printing by itself: a `head` here would end the pipeline with
  # SIGPIPE, which pipefail and set -e turn into the script's exit.
  sed 's/\x1b\[[0-9;]*m//g' "$log" |
    awk '/^ (ERRORS|FAILURES) *$/ { keep = 1 }
      /^(ok|FAILED) \|/ { keep = 0 }
      keep && shown++ < 300'
fi
echo "${passed} passed, ${failed} failed"
exit "$status"
