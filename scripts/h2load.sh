#!/usr/bin/env bash
# h2load recipe for vcpud's TCP path: drives GetState (all sections, one paused vCPU) over
# plaintext h2c with h2load, then cross-checks h2load's success count against the server's
# grpc_server_handled_total delta (h2load counts HTTP 200 as success even when grpc-status != 0).
#
#   bash scripts/h2load.sh [-n N] [-c C] [-m M] [--target HOST:PORT --metrics HOST:PORT] [--vm ID]
#
# Without --target it starts its own vcpud on 127.0.0.1 (ephemeral ports, --insecure: plaintext is
# allowed on loopback only) and stops it at the end. With --target it uses that vcpud (which must
# serve plaintext, i.e. run with --insecure on loopback) and its --metrics endpoint, creating a VM
# there unless --vm is given (and deleting it again). Defaults: -n 20000 -c 64 -m 1 (64 clients, one
# call in flight each, like bench/throughput.ts). Exit status: h2load's, else 1 on a mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."

N=20000 C=64 M=1 TARGET="" METRICS="" VM=""
while [ $# -gt 0 ]; do
  case "$1" in
    -n) N=$2; shift 2 ;;
    -c) C=$2; shift 2 ;;
    -m) M=$2; shift 2 ;;
    --target) TARGET=$2; shift 2 ;;
    --metrics) METRICS=$2; shift 2 ;;
    --vm) VM=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "h2load.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$TARGET" ] && [ -z "$METRICS" ]; then echo "h2load.sh: --target needs --metrics HOST:PORT for the cross-check" >&2; exit 2; fi

bash scripts/provision-tools.sh h2load
out=$(bash scripts/build-guests.sh 2>&1) || { echo "$out" >&2; exit 1; }   # counter64, for the VM we create
[ -f dist/bench/h2load.js ] && [ -f dist/src/server/main.js ] || npx tsc -p tsconfig.json

tmp=$(mktemp -d /tmp/vcpud-h2load.XXXXXX)
vcpud_pid="" created_vm=""
cleanup() {
  if [ -n "$created_vm" ] && [ -n "$TARGET" ]; then
    node dist/src/cli/vcpuctl.js --server "$TARGET" --insecure vm delete "$created_vm" >/dev/null || true
  fi
  if [ -n "$vcpud_pid" ]; then kill "$vcpud_pid" 2>/dev/null && wait "$vcpud_pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

if [ -z "$TARGET" ]; then
  node dist/src/server/main.js --listen 127.0.0.1:0 --insecure --metrics-listen 127.0.0.1:0 \
    --snapshot-dir "$tmp/snapshots" 2>"$tmp/vcpud.log" &
  vcpud_pid=$!
  for _ in $(seq 150); do
    grep -q '"vcpud serving"' "$tmp/vcpud.log" && break
    kill -0 "$vcpud_pid" 2>/dev/null || { cat "$tmp/vcpud.log" >&2; echo "h2load.sh: vcpud exited" >&2; exit 1; }
    sleep 0.1
  done
  serving=$(grep -m1 '"vcpud serving"' "$tmp/vcpud.log") || { cat "$tmp/vcpud.log" >&2; echo "h2load.sh: vcpud did not start" >&2; exit 1; }
  API=$(sed -n 's/.*"api":"\([^"]*\)".*/\1/p' <<<"$serving")
  METRICS=$(sed -n 's/.*"metrics":"\([^"]*\)".*/\1/p' <<<"$serving")
  echo "h2load.sh: started vcpud (pid $vcpud_pid) on $API, metrics on $METRICS"
else
  API=$TARGET
fi

vm_args=()
[ -n "$VM" ] && vm_args=(--vm "$VM")
vm=$(node dist/bench/h2load.js prepare --target "$API" --metrics "$METRICS" --dir "$tmp" "${vm_args[@]}")
[ -z "$VM" ] && created_vm=$vm
echo "h2load.sh: GetState of VM $vm, vCPU 0; $N requests, $C clients x $M streams"
echo

h2load -n "$N" -c "$C" -m "$M" \
  --header 'content-type: application/grpc' --header 'te: trailers' \
  -d "$tmp/body.bin" "http://$API/vcpud.v1.VcpuStateService/GetState" | tee "$tmp/h2load.txt"

echo
node dist/bench/h2load.js check --metrics "$METRICS" --dir "$tmp"
