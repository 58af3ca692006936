#!/usr/bin/env bash
# npm run bench: every benchmark, each beside its floor measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-guests.sh >/dev/null
npx tsc -p tsconfig.json
for b in ffi-ioctl exit-rate getstate throughput snapshot; do
  echo
  node "dist/bench/$b.js"
done
