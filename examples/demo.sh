#!/usr/bin/env bash
# The main job in one command: installs Deno and nbdkit when missing, then
# runs the demo against URI, or against a private nbdkit memory export.
set -euo pipefail
cd "$(dirname "$0")/.."
NBD_SETUP_MINIMAL=1 bash .ci/setup
export DENO_NO_UPDATE_CHECK=1
export PATH="$PATH:$(npm prefix -g 2>/dev/null)/bin"
exec deno run --allow-net --allow-read --allow-write --allow-run --allow-env \
  examples/demo.ts "$@"
