#!/usr/bin/env bash
# Installs host tools from Debian, idempotently: does nothing when every tool asked for is already
# on PATH, so it is cheap to call from every build.
#
#   provision-tools.sh            nasm (the test guests)
#   provision-tools.sh h2load     h2load (scripts/h2load.sh), from nghttp2-client
#   provision-tools.sh promtool   promtool (the metrics format test), from prometheus; its server is
#                                 never started by the install (policy-rc.d), and that is checked
#   provision-tools.sh python-grpc  Debian's python3-grpcio and python3-protobuf (the foreign
#                                 Python reflection client), checked by importing them
#   provision-tools.sh TOOL...    several at once
set -euo pipefail

# Tool on PATH -> the Debian package that ships it.
package_of() {
  case "$1" in
    nasm) echo nasm ;;
    h2load) echo nghttp2-client ;;
    promtool) echo prometheus ;;
    python-grpc) echo "python3-grpcio python3-protobuf" ;;
    *) echo "provision-tools: unknown tool '$1' (known: nasm, h2load, promtool, python-grpc)" >&2; return 1 ;;
  esac
}

# A tool is present when it is on PATH; python-grpc when Debian's python imports both modules.
present() {
  case "$1" in
    python-grpc) /usr/bin/python3 -c 'import grpc, google.protobuf' >/dev/null 2>&1 ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

tools=("$@")
[ ${#tools[@]} -gt 0 ] || tools=(nasm)

missing=()
packages=()
for t in "${tools[@]}"; do
  pkg=$(package_of "$t")
  present "$t" && continue
  missing+=("$t")
  packages+=($pkg)
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "provision-tools: ${missing[*]} missing and installing needs root (apt-get install ${packages[*]})" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "provision-tools: ${missing[*]} missing and apt-get is not available; install ${packages[*]} by hand" >&2
  exit 1
fi

echo "provision-tools: installing ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Packages that ship a daemon (prometheus) must not start it: a policy-rc.d answering 101 ("action
# forbidden") for the install, unless the machine already has one (Docker images do).
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# provision-tools: no service starts while tools are installed\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi
servers_before=$(pgrep -x prometheus || true)
# Try without refreshing the package lists first (fast on a warm machine),
# then update once and retry (a fresh machine has empty lists).
if ! apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi
# Under systemd the package also enables its unit for the next boot: promtool is all we want.
if [[ " ${packages[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
  systemctl disable prometheus >/dev/null 2>&1 || true
fi
# Check: no prometheus server that was not running before the install.
if [ -z "$servers_before" ] && pgrep -x prometheus >/dev/null; then
  echo "provision-tools: installing prometheus started its server: stopping it" >&2
  invoke-rc.d --force prometheus stop >/dev/null 2>&1 || systemctl stop prometheus >/dev/null 2>&1 || true
  if pgrep -x prometheus >/dev/null; then echo "provision-tools: a prometheus server is still running after the install" >&2; exit 1; fi
fi
for t in "${missing[@]}"; do
  present "$t" || { echo "provision-tools: $t still missing after apt-get" >&2; exit 1; }
done
