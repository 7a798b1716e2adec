#!/usr/bin/env bash
# The main job in one command: installs Deno when missing (and nbdkit, when
# no URI is given and the demo starts its own server), then runs the demo
# against URI, or against a private nbdkit memory export.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -eq 0 ]; then
  bash .ci/setup demo-server
else
  bash .ci/setup demo
fi
export DENO_NO_UPDATE_CHECK=1
export PATH="$PATH:$(npm prefix -g 2>/dev/null)/bin"
exec deno run --allow-net --allow-read --allow-write --allow-run --allow-env \
  examples/demo.ts "$@"
