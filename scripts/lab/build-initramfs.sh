#!/usr/bin/env bash
# Builds the nested lab's initramfs: busybox, the KVM modules (kvm_amd loaded with nested=1),
# the virtio-net and fw_cfg modules, node and the shared libraries it and the addon need, and
# the built project (package.json, dist/src, build/Release/*.node, protos/, the production
# node_modules) under /opt/vcpud, with scripts/lab/init as /init.
#
# Cached under .cache/lab/: the archive is keyed by a hash of every input (paths, modes and
# contents), so a run with nothing changed only re-hashes (about a second) and a change in
# dist/ or the addon rebuilds it (a few seconds). Writes .cache/lab/lab.json, which the lab
# tests read: { kernel, initrd, kernelVersion, key, bytes }.
#
# Usage: build-initramfs.sh KERNEL_VERSION     (needs no root and no network)
# Uncompressed on purpose: under TCG the kernel unpacks a 125 MB plain cpio faster (init at
# ~3.5 s) than an lz4 one (~4.4 s) and far faster than gzip.
set -euo pipefail

kver="${1:?usage: build-initramfs.sh KERNEL_VERSION}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="$root/.cache/lab"
mkdir -p "$cache"
log() { echo "build-initramfs: $*" >&2; }

kernel="/boot/vmlinuz-$kver"
[ -r "$kernel" ] || { log "$kernel is missing or unreadable"; exit 1; }
busybox=/bin/busybox   # from busybox-static: no shared libraries needed in the initramfs
[ -x "$busybox" ] || { log "$busybox (busybox-static) is missing"; exit 1; }
node_bin="$(readlink -f "$(command -v node)")"
for f in "$root/package.json" "$root/dist/src/server/main.js" "$root/dist/src/descriptor-set.binpb" "$root/build/Release/vcpud_native.node"; do
  [ -e "$f" ] || { log "$f is missing: build the project first (npm test builds it)"; exit 1; }
done

# ---- what goes in: "ARCHIVE_PATH<TAB>SOURCE" lines for single files and for whole trees ----
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
files="$work/files" trees="$work/trees" order="$work/order"
: > "$files"
: > "$trees"
add() { printf '%s\t%s\n' "$1" "$2" >> "$files"; }
add_tree() { printf '%s\t%s\n' "$1" "$2" >> "$trees"; }

add init "$root/scripts/lab/init"
add bin/busybox "$busybox"

# Modules: each after its dependencies; "(builtin)" ones need nothing.
declare -A seen=()
add_module() {
  local name="$1" params="${2:-}" file dep
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  file="$(modinfo -k "$kver" -F filename "$name")" || { log "no module $name for $kver"; exit 1; }
  for dep in $(modinfo -k "$kver" -F depends "$name" | tr ',' ' '); do add_module "$dep"; done
  case "$file" in
    "(builtin)"|"") return 0 ;;
    *.ko) ;;
    *) log "$file: only uncompressed .ko modules are handled"; exit 1 ;;
  esac
  add "lib/modules/lab/$name.ko" "$file"
  echo "$name $params" >> "$order"
}
# KVM in the order the lab doc measured: irqbypass, kvm, ccp, kvm-amd nested=1.
add_module irqbypass
add_module kvm
add_module ccp
add_module kvm-amd "nested=1"
add_module virtio_pci
add_module virtio_net
add_module qemu_fw_cfg
add lib/modules/lab/order "$order"

# node and the shared libraries of node and the addon (ld.so included).
add usr/bin/node "$node_bin"
for lib in $( { ldd "$node_bin"; ldd "$root/build/Release/vcpud_native.node"; } | grep -o '/[^ ]*' | sort -u); do
  add "${lib#/}" "$(readlink -f "$lib")"
done

# The project: what `node dist/src/server/main.js` loads at run time, nothing else.
p=opt/vcpud
add "$p/package.json" "$root/package.json"
add "$p/build/Release/vcpud_native.node" "$root/build/Release/vcpud_native.node"
add_tree "$p/dist/src" "$root/dist/src"
add_tree "$p/protos" "$root/protos"
# Production dependencies only (npm's own view of the tree); a package's nested node_modules
# come along with it.
mapfile -t deps < <(cd "$root" && npm ls --omit=dev --all --parseable 2>/dev/null | grep '/node_modules/' | sort -u)
[ "${#deps[@]}" -gt 0 ] || { log "npm ls found no production dependencies: run npm install"; exit 1; }
declare -A tree_added=()
for d in "${deps[@]}"; do
  # Skip a package nested in one already added (it comes along with its parent).
  parent="$d" covered=""
  while [[ "$parent" == */node_modules/*/node_modules/* ]]; do
    parent="${parent%/node_modules/*}"
    [ -n "${tree_added[$parent]:-}" ] && covered=1
  done
  [ -n "$covered" ] && continue
  tree_added[$d]=1
  add_tree "$p/${d#"$root/"}" "$d"
done

# ---- the key: this script, the kernel version, and every file's archive path, mode and content ----
# (one line per file: ARCHIVE_PATH MODE SHA256; source paths do not matter)
manifest="$work/manifest"
{
  cat "$files"
  while IFS=$'\t' read -r dst src; do
    find "$src" -type f ! -name '*.map' -printf "$dst/%P\t$src/%P\n"
  done < "$trees"
} | LC_ALL=C sort > "$manifest"
key="$( {
  cat "${BASH_SOURCE[0]}" "$order"
  echo "$kver"
  cut -f2 "$manifest" | tr '\n' '\0' | xargs -0 stat -c '%a %s' | paste <(cut -f1 "$manifest") - \
    <(cut -f2 "$manifest" | tr '\n' '\0' | xargs -0 sha256sum | cut -d' ' -f1)
} | sha256sum | cut -c1-16)"
initrd="$cache/initramfs-$key.cpio"

if [ ! -s "$initrd" ]; then
  t0=$(date +%s%N)
  stage="$(mktemp -d "$cache/stage.XXXXXX")"
  while IFS=$'\t' read -r dst src; do
    mkdir -p "$stage/$(dirname "$dst")"
    cp -p "$src" "$stage/$dst"
  done < "$files"
  while IFS=$'\t' read -r dst src; do
    mkdir -p "$stage/$(dirname "$dst")"
    cp -a "$src" "$stage/$dst"
  done < "$trees"
  find "$stage/opt" -name '*.map' -delete
  chmod 755 "$stage/init" "$stage/bin/busybox"
  mkdir -p "$stage"/{proc,sys,dev,tmp,run}
  (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | "$busybox" cpio -o -H newc -R 0:0 2>/dev/null) > "$initrd.tmp"
  mv -f "$initrd.tmp" "$initrd"
  rm -rf "$stage"
  # Older archives are of no use any more.
  find "$cache" -maxdepth 1 -name 'initramfs-*.cpio' ! -name "initramfs-$key.cpio" -delete
  log "built ${initrd#"$root/"} ($(($(stat -c %s "$initrd") / 1048576)) MiB, $(wc -l < "$manifest") files) in $((($(date +%s%N) - t0) / 1000000)) ms"
else
  log "up to date: ${initrd#"$root/"}"
fi

cat > "$cache/lab.json.tmp" <<JSON
{
  "kernelVersion": "$kver",
  "kernel": "$kernel",
  "initrd": "$initrd",
  "key": "$key",
  "bytes": $(stat -c %s "$initrd")
}
JSON
mv -f "$cache/lab.json.tmp" "$cache/lab.json"
