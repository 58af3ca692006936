#!/usr/bin/env bash
# npm run bench [-- --no-write]: every benchmark, each beside its floor measured in the same run,
# in one table, also written to BENCHMARKS.md (bench/all.ts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build-guests.sh >/dev/null
npx tsc -p tsconfig.json
node dist/bench/all.js "$@"
