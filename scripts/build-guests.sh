#!/usr/bin/env bash
# Assembles test/guests/*.asm into flat binaries test/guests/build/NAME.bin, and the nested SVM
# guests test/guests/nested/*.asm into test/guests/build/nested/NAME.bin.
# A guest is rebuilt only when its .bin is missing or older than its source or
# any shared include (test/guests/inc/*.inc), so a no-change run is near instant.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/provision-tools.sh"

src="$root/test/guests"
out="$src/build"
mkdir -p "$out"

# Newest of the given files (an include change must rebuild every guest that may use it).
newest() {
  local n="" f
  for f in "$@"; do
    [ -e "$f" ] || continue
    if [ -z "$n" ] || [ "$f" -nt "$n" ]; then n="$f"; fi
  done
  printf '%s' "$n"
}

built=0
# build_dir SRC_DIR OUT_DIR NEWEST_INC INCLUDE_DIR...: each SRC_DIR/NAME.asm -> OUT_DIR/NAME.bin
build_dir() {
  local dir="$1" outdir="$2" newest_inc="$3"; shift 3
  local incs=() d asm name bin
  for d in "$@"; do incs+=(-I "$d/"); done
  mkdir -p "$outdir"
  for asm in "$dir"/*.asm; do
    [ -e "$asm" ] || continue
    name="$(basename "$asm" .asm)"
    bin="$outdir/$name.bin"
    if [ -e "$bin" ] && [ ! "$asm" -nt "$bin" ] && { [ -z "$newest_inc" ] || [ ! "$newest_inc" -nt "$bin" ]; }; then
      continue
    fi
    # Assemble to a temp file and rename so a failed build never leaves a stale-but-new .bin.
    nasm -f bin -w+all "${incs[@]}" -o "$bin.tmp" "$asm"
    mv -f "$bin.tmp" "$bin"
    built=$((built + 1))
  done
}

build_dir "$src" "$out" "$(newest "$src"/inc/*.inc)" "$src/inc"
# Nested SVM guests (test/guests/nested, see README.md): they also use nested/*.inc.
build_dir "$src/nested" "$out/nested" "$(newest "$src"/inc/*.inc "$src"/nested/*.inc)" "$src/inc" "$src/nested"
echo "build-guests: $built guest(s) assembled into ${out#$root/}" >&2
