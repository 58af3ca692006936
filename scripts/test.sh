#!/usr/bin/env bash
# The test command (npm test): provisions what the tests need, type-checks, runs jest, and ends
# with the one line CI reads: "N passed, N failed[, N skipped]".
set -uo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*" >&2; }

step "provision: guest programs"
bash scripts/build-guests.sh || { echo "guest build failed"; echo "0 passed, 1 failed"; exit 1; }

step "provision: promtool (the metrics format test), its server never started"
# Not fatal here: without promtool its test skips loudly, or fails with VCPUD_REQUIRE_KVM=1 (CI).
bash scripts/provision-tools.sh promtool || echo "promtool not provisioned: the promtool test will skip (or fail with VCPUD_REQUIRE_KVM=1)" >&2
bash scripts/provision-tools.sh python-grpc || echo "python3-grpcio not provisioned: the Python reflection client will skip" >&2

step "build: native addon (if missing or older than its sources)"
addon=build/Release/vcpud_native.node
{ [ -f "$addon" ] && [ -z "$(find native binding.gyp -newer "$addon" -print -quit)" ]; } || npx node-gyp rebuild --nodedir=/usr >/dev/null || {
  echo "addon build failed"; echo "0 passed, 1 failed"; exit 1; }

step "typecheck and build dist/ (the e2e tests run the built vcpud)"
typecheck_failed=0
npx tsc -p tsconfig.json || typecheck_failed=1

step "lint and format check (npm run lint: biome, config in biome.jsonc; npm run format fixes the format)"
lint_failed=0
npm run --silent lint || lint_failed=1

step "build: the descriptor set server reflection serves (dist/src/descriptor-set.binpb)"
bash scripts/build-descriptors.sh || typecheck_failed=1

step "provision: nested lab (QEMU, Debian kernel, initramfs with the built vcpud)"
# Not fatal here: without the lab its tests skip loudly, or fail under VCPUD_REQUIRE_LAB=1 (CI).
bash scripts/provision-lab.sh || echo "nested lab not provisioned: its tests will skip (or fail with VCPUD_REQUIRE_LAB=1)" >&2

step "provision: Docker (docker.io, a bridge-less dockerd of our own, stand-in base images)"
# Not fatal here either: without Docker test/docker skips loudly, or fails with VCPUD_REQUIRE_KVM=1.
# The dockerd it starts (none when one already runs) is stopped when this script exits, after the
# containers and volumes the tests made (label vcpud.test) are gone, even those of a crashed run.
docker_cleanup() {
  if [ -x /usr/bin/docker ] && DOCKER_HOST=unix:///var/run/docker.sock timeout 10 /usr/bin/docker version >/dev/null 2>&1; then
    export DOCKER_HOST=unix:///var/run/docker.sock
    left=$(/usr/bin/docker ps -a -q --filter label=vcpud.test)
    [ -z "$left" ] || /usr/bin/docker rm -f -v $left >/dev/null
    left=$(/usr/bin/docker volume ls -q --filter label=vcpud.test)
    [ -z "$left" ] || /usr/bin/docker volume rm -f $left >/dev/null
  fi
  bash scripts/provision-docker.sh stop || true
}
# Silent: nothing may follow the summary line (also on an early exit).
trap 'docker_cleanup >/dev/null 2>&1' EXIT
bash scripts/provision-docker.sh || echo "Docker not provisioned: test/docker will skip (or fail with VCPUD_REQUIRE_KVM=1)" >&2

step "jest"
results=$(mktemp)
npx jest --ci --json --outputFile="$results" "$@"
jest_rc=$?
docker_cleanup

node -e '
const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
const tc = Number(process.argv[2]);
const lint = Number(process.argv[3]);
const skipped = r.numPendingTests + r.numTodoTests;
const failed = r.numFailedTests + r.numRuntimeErrorTestSuites + tc + lint;
if (tc) console.log("typecheck or descriptor build failed (counted as one failure)");
if (lint) console.log("lint or format check failed (counted as one failure; npm run lint shows why)");
console.log(`${r.numPassedTests} passed, ${failed} failed` + (skipped ? `, ${skipped} skipped` : ""));
' "$results" "$typecheck_failed" "$lint_failed" || { echo "0 passed, 1 failed"; exit 1; }
rm -f "$results"
[ "$jest_rc" -eq 0 ] && [ "$typecheck_failed" -eq 0 ] && [ "$lint_failed" -eq 0 ]
