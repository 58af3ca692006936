#!/usr/bin/env bash
# Installs the host tools the test guests need (nasm). Idempotent: does nothing
# when the tool is already on PATH, so it is cheap to call from every build.
set -euo pipefail

if command -v nasm >/dev/null 2>&1; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "provision-tools: nasm is missing and installing it needs root (apt-get install nasm)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "provision-tools: nasm is missing and apt-get is not available; install nasm by hand" >&2
  exit 1
fi

echo "provision-tools: installing nasm" >&2
export DEBIAN_FRONTEND=noninteractive
# Try without refreshing the package lists first (fast on a warm machine),
# then update once and retry (a fresh machine has empty lists).
if ! apt-get install -y -qq nasm >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq nasm
fi
command -v nasm >/dev/null 2>&1 || { echo "provision-tools: nasm still missing after apt-get" >&2; exit 1; }
