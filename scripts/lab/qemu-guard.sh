#!/usr/bin/env bash
# Runs QEMU (the rest of argv) for test/lab/lab-vm.ts and makes sure it does not outlive the
# test process: when PARENT_PID disappears (a jest worker killed hard, so its exit handlers never
# ran) QEMU is killed. SIGTERM/SIGINT to this script are passed on to QEMU. QEMU keeps this
# script's stdin and stdout (the lab VM's serial console). Exits with QEMU's status.
#
# Usage: qemu-guard.sh PARENT_PID qemu-system-x86_64 ARGS...
set -u
trap '' PIPE               # the parent's pipes close when it dies: never let that kill us first
parent="$1"
shift
exec 3<&0                  # a background job would otherwise get /dev/null as stdin
"$@" <&3 3<&- &
qemu=$!
exec 3<&-
trap 'kill -TERM "$qemu" 2>/dev/null' TERM INT
while kill -0 "$qemu" 2>/dev/null; do
  if ! kill -0 "$parent" 2>/dev/null; then
    kill -KILL "$qemu" 2>/dev/null
    echo "qemu-guard: process $parent is gone, killed QEMU ($qemu)" >&2 || true
    break
  fi
  sleep 0.5 & wait $!      # wait (unlike sleep) lets the TERM trap run at once
done
wait "$qemu"
