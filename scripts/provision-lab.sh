#!/usr/bin/env bash
# Provisions the nested lab (test/lab, ../shared/docs/nested-lab.md): QEMU, Debian's 6.1 kernel
# and a static busybox from Debian, then the lab initramfs (scripts/lab/build-initramfs.sh,
# cached under .cache/lab/ by a hash of its inputs). Idempotent: with everything in place it
# only re-hashes the initramfs inputs (about a second).
#
# Run by scripts/test.sh before jest. It never fails the test command by itself: when it
# cannot provision (not root, no package registry, ...) it says why and exits non-zero, and the
# lab tests then skip loudly, or fail when VCPUD_REQUIRE_LAB=1 (CI).
# VCPUD_LAB_KERNEL_VERSION picks another installed kernel (default: linux-image-amd64's).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "provision-lab: $*" >&2; }
packages=(qemu-system-x86 linux-image-amd64 busybox-static)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing ${missing[*]}; installing needs root (apt-get install ${missing[*]})"
    exit 1
  fi
  command -v apt-get >/dev/null 2>&1 || { log "missing ${missing[*]} and there is no apt-get"; exit 1; }
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # The lab boots the kernel with its own initramfs: skip the kernel package's (10-15 s).
  export INITRD=No
  # No recommends: the kernel's firmware and QEMU's extras are not needed and double the time.
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The kernel: the one linux-image-amd64 depends on (the host may run another kernel), with its
# image in /boot and its modules in /lib/modules.
kver="${VCPUD_LAB_KERNEL_VERSION:-}"
if [ -z "$kver" ]; then
  kver="$(dpkg-query -W -f='${Depends}' linux-image-amd64 | grep -o 'linux-image-[0-9][^ ,|]*-amd64' | head -1 | sed 's/^linux-image-//')"
fi
if [ -z "$kver" ] || [ ! -r "/boot/vmlinuz-$kver" ] || [ ! -d "/lib/modules/$kver" ]; then
  # Fall back to the newest Debian amd64 kernel that has both.
  kver=""
  for d in $(ls -d /lib/modules/*-amd64 2>/dev/null | sort -V); do
    v="${d##*/}"
    [ -r "/boot/vmlinuz-$v" ] && kver="$v"
  done
fi
[ -n "$kver" ] || { log "no Debian amd64 kernel with /boot/vmlinuz-* and /lib/modules/* found"; exit 1; }
command -v qemu-system-x86_64 >/dev/null 2>&1 || { log "qemu-system-x86_64 is not on PATH"; exit 1; }

bash "$root/scripts/lab/build-initramfs.sh" "$kver"
