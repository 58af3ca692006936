#!/usr/bin/env bash
# Assembles test/guests/*.asm into flat binaries test/guests/build/NAME.bin.
# A guest is rebuilt only when its .bin is missing or older than its source or
# any shared include (test/guests/inc/*.inc), so a no-change run is near instant.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/provision-tools.sh"

src="$root/test/guests"
out="$src/build"
mkdir -p "$out"

# Newest include: a change in shared code must rebuild every guest.
newest_inc=""
for inc in "$src"/inc/*.inc; do
  [ -e "$inc" ] || continue
  if [ -z "$newest_inc" ] || [ "$inc" -nt "$newest_inc" ]; then newest_inc="$inc"; fi
done

built=0
for asm in "$src"/*.asm; do
  [ -e "$asm" ] || continue
  name="$(basename "$asm" .asm)"
  bin="$out/$name.bin"
  if [ -e "$bin" ] && [ ! "$asm" -nt "$bin" ] && { [ -z "$newest_inc" ] || [ ! "$newest_inc" -nt "$bin" ]; }; then
    continue
  fi
  # Assemble to a temp file and rename so a failed build never leaves a stale-but-new .bin.
  nasm -f bin -w+all -I "$src/inc/" -o "$bin.tmp" "$asm"
  mv -f "$bin.tmp" "$bin"
  built=$((built + 1))
done
echo "build-guests: $built guest(s) assembled into ${out#$root/}" >&2
