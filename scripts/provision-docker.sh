#!/usr/bin/env bash
# Provisions Docker for the container image test (test/docker), idempotently, as root:
#
#   provision-docker.sh [start]   Debian's docker.io and debootstrap, a dockerd (our own when none
#                                 answers) and the local stand-ins for the Dockerfile's base images
#   provision-docker.sh stop      stops the dockerd that `start` started (none other)
#
# No image registry is reachable here, so the stand-ins are made locally and cached: a debootstrap'd
# Debian bookworm (minbase) root filesystem under .cache/docker/, plus this machine's Node (the `node`
# on PATH, with its npm and headers) at /usr/local like the official node images, imported as
#   vcpud-standin/node:MAJOR-bookworm-slim   node only (the runtime stage)
#   vcpud-standin/node:MAJOR-bookworm        node, npm and headers (the build stage)
# With the images in Docker's store this takes about a second.
#
# Our dockerd has no bridge (--bridge=none: no docker0, no bridge network) and touches no iptables:
# images are built with `docker build --network host` and containers run with `--network none`.
#
# It never fails the test command by itself: on a problem it writes the reason to
# .cache/docker/docker.json and exits non-zero; test/docker then skips loudly, or fails when
# VCPUD_REQUIRE_KVM=1 (CI).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="$root/.cache/docker"
status="$cache/docker.json"
started="$cache/dockerd.started"   # pid of the dockerd this script started
log() { echo "provision-docker: $*" >&2; }
mkdir -p "$cache"

DOCKER=/usr/bin/docker
SOCKET=/var/run/docker.sock
export DOCKER_HOST="unix://$SOCKET"
MIRROR=http://deb.debian.org/debian
SUITE=bookworm
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

daemon_answers() { [ -x "$DOCKER" ] && timeout 10 "$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

stop_ours() {
  [ -f "$started" ] || return 0
  local pid
  pid="$(cat "$started")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    # dockerd stops its containerd and containers (10 s each at most) before it exits.
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "dockerd $pid still running after 30 s; killing it"; kill -KILL "$pid"; }
  fi
  rm -f "$started"
  log "stopped the dockerd it started (pid $pid)"
}

if [ "${1:-start}" = stop ]; then
  stop_ours
  exit 0
fi

fail() {
  log "$1"
  printf '{ "problem": %s }\n' "$(printf '%s' "$1" | python3 -c 'import json, sys; print(json.dumps(sys.stdin.read()))')" > "$status"
  exit 1
}
rm -f "$status"

# 1. Packages.
packages=(docker.io debootstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || fail "missing ${missing[*]}; installing needs root (apt-get install ${missing[*]})"
  command -v apt-get >/dev/null 2>&1 || fail "missing ${missing[*]} and there is no apt-get"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # No recommends (apparmor, cgroupfs-mount, git...): dockerd needs none of them here.
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -qq || fail "apt-get update failed: no package registry?"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || fail "apt-get install ${missing[*]} failed"
  fi
fi
[ "$(id -u)" -eq 0 ] || fail "dockerd and debootstrap need root"

# 2. A dockerd: the one already answering on $SOCKET (left alone), else our own.
if ! daemon_answers; then
  stop_ours   # a stale marker from an interrupted run
  log "starting dockerd (--bridge=none --iptables=false)"
  setsid dockerd --host="unix://$SOCKET" --bridge=none --iptables=false --ip6tables=false \
    --ip-forward=false --ip-masq=false --pidfile=/var/run/vcpud-test-dockerd.pid \
    > "$cache/dockerd.log" 2>&1 < /dev/null &
  echo $! > "$started"
  for _ in $(seq 1 300); do daemon_answers && break; sleep 0.1; done
  daemon_answers || { tail -5 "$cache/dockerd.log" >&2; stop_ours; fail "dockerd did not answer within 30 s (log: .cache/docker/dockerd.log)"; }
fi
ip link show docker0 >/dev/null 2>&1 && fail "a docker0 bridge exists: the dockerd on $SOCKET was not started with --bridge=none"

# 3. The stand-in base images.
node_bin="$(readlink -f "$(command -v node)")" || fail "no node on PATH"
node_prefix="$(dirname "$(dirname "$node_bin")")"
node_version="$("$node_bin" -p process.versions.node)"
major="${node_version%%.*}"
[ -d "$node_prefix/lib/node_modules/npm" ] && [ -d "$node_prefix/include/node" ] ||
  fail "$node_bin has no npm ($node_prefix/lib/node_modules/npm) or headers ($node_prefix/include/node) beside it"
key="$( { cat "${BASH_SOURCE[0]}" "$CA_BUNDLE"; echo "$SUITE $MIRROR $node_bin $node_version"; } | sha256sum | cut -c1-16)"
slim="vcpud-standin/node:$major-bookworm-slim"
full="vcpud-standin/node:$major-bookworm"
has_image() { [ "$("$DOCKER" image inspect --format '{{index .Config.Labels "vcpud.standin-key"}}' "$1" 2>/dev/null)" = "$key" ]; }

if ! has_image "$slim" || ! has_image "$full"; then
  rootfs="$cache/rootfs-$SUITE"
  if [ ! -f "$rootfs/.complete" ]; then
    t0=$(date +%s%N)
    rm -rf "$rootfs"
    log "debootstrap --variant=minbase $SUITE (about 30 s)"
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" > "$cache/debootstrap.log" 2>&1 ||
      fail "debootstrap failed (log: .cache/docker/debootstrap.log)"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    touch "$rootfs/.complete"
    log "debootstrap took $((($(date +%s%N) - t0) / 1000000)) ms"
  fi
  stage="$(mktemp -d "$cache/stage.XXXXXX")"
  trap 'rm -rf "$stage"' EXIT
  mkdir -p "$stage/slim/usr/local/bin" "$stage/full/usr/local/bin" "$stage/full/usr/local/lib/node_modules" "$stage/full/usr/local/include"
  cp -p "$node_bin" "$stage/slim/usr/local/bin/node"
  cp -p "$node_bin" "$stage/full/usr/local/bin/node"
  cp -a "$node_prefix/lib/node_modules/npm" "$stage/full/usr/local/lib/node_modules/npm"
  cp -a "$node_prefix/include/node" "$stage/full/usr/local/include/node"
  ln -s ../lib/node_modules/npm/bin/npm-cli.js "$stage/full/usr/local/bin/npm"
  ln -s ../lib/node_modules/npm/bin/npx-cli.js "$stage/full/usr/local/bin/npx"
  # The build stage's npm reaches the registry as this machine does, trusting what it trusts
  # (here a TLS-intercepting proxy's CA is among them): the machine's CA bundle, public
  # certificates only. The runtime stand-in makes no outbound TLS and gets none.
  mkdir -p "$stage/full/usr/local/share/ca-certificates"
  cp -L "$CA_BUNDLE" "$stage/full/usr/local/share/ca-certificates/host-ca-bundle.pem"
  node_files=(./usr/local/bin/node)
  extra_env=()
  for variant in slim full; do
    tag="$slim"
    if [ "$variant" = full ]; then
      tag="$full"
      node_files+=(./usr/local/bin/npm ./usr/local/bin/npx ./usr/local/lib/node_modules ./usr/local/include/node
        ./usr/local/share/ca-certificates)
      extra_env=(--change 'ENV NODE_EXTRA_CA_CERTS=/usr/local/share/ca-certificates/host-ca-bundle.pem')
    fi
    # One archive: the root filesystem, then the Node files (named one by one: docker import
    # rejects a second entry for a directory such as ./usr/local/bin).
    tar -c --exclude=./.complete -C "$rootfs" . -C "$stage/$variant" "${node_files[@]}" |
      "$DOCKER" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change "ENV NODE_VERSION=$node_version" "${extra_env[@]}" \
        --change "LABEL vcpud.standin-key=$key vcpud.standin-of=node:$major-${tag##*:$major-}" \
        --change 'CMD ["node"]' - "$tag" >/dev/null || fail "docker import of $tag failed"
    log "imported $tag (Node $node_version)"
  done
  # The stand-ins these replaced, now untagged.
  "$DOCKER" image prune -f --filter label=vcpud.standin-key >/dev/null || true
fi

cat > "$status.tmp" <<JSON
{
  "docker": "$DOCKER",
  "host": "$DOCKER_HOST",
  "buildBase": "$full",
  "runtimeBase": "$slim",
  "nodeVersion": "$node_version",
  "ownDaemon": $([ -f "$started" ] && echo true || echo false)
}
JSON
mv -f "$status.tmp" "$status"
log "ready: $slim, $full"
