#!/usr/bin/env bash
# Splits the debug info off built ELF binaries, for the image and the release archives.
#
#   scripts/split-debuginfo.sh target/release/soma-agent target/release/kubectl-soma
#
# Each BIN loses every .debug_* section (most of its size: DWARF of our crates, std and the C
# libraries) but keeps its symbol table, so a panic's backtrace still names the functions. The
# DWARF goes to BIN.debug, zlib-compressed, and BIN gets a .gnu_debuglink naming it: gdb,
# addr2line, and Rust's own backtraces (RUST_BACKTRACE=1) find it beside BIN, in BIN's .debug/
# directory, or as /usr/lib/debug/.build-id/XX/YYYY.debug for the build id printed below, and
# then give file:line for every address of a crash. Ship BIN; keep BIN.debug with the release.
#
# Why not Cargo's `strip`: it throws the debug info away instead of keeping it apart, and
# `split-debuginfo` leaves std's and the C libraries' DWARF in the binary.
#
# Refuses (non-zero, BIN untouched) a file that is not ELF (macOS: dsymutil + strip -S instead)
# and a binary with no debug info left to keep (already split, or built without it): a second
# run would otherwise replace a good BIN.debug with an empty one.
#
# Environment: OBJCOPY, READELF (default objcopy, readelf): the binutils of BIN's architecture,
# e.g. aarch64-linux-gnu-objcopy for an arm64 binary built on x86_64.
set -euo pipefail
OBJCOPY=${OBJCOPY:-objcopy}
READELF=${READELF:-readelf}

die() {
  echo "split-debuginfo: $*" >&2
  exit 1
}

[ $# -gt 0 ] || die "usage: $0 BIN... (ELF binaries built with the release profile)"
for tool in "$OBJCOPY" "$READELF"; do
  command -v "$tool" >/dev/null || die "$tool not found: install binutils (Debian: apt-get install binutils)"
done

# Section names of an ELF file, one a line; fails on anything that is not ELF.
sections() {
  "$READELF" -S -W "$1" 2>/dev/null | sed -n 's/^ *\[ *[0-9]*\] \([^ ]*\) .*/\1/p'
}

for bin in "$@"; do
  # A name starting with '-' would be read as an option by the tools below.
  case "$bin" in -*) bin="./$bin" ;; esac
  [ -f "$bin" ] || die "$bin: no such file"
  "$READELF" -h "$bin" >/dev/null 2>&1 ||
    die "$bin: not an ELF binary (for macOS binaries use dsymutil, then strip -S)"
  if ! sections "$bin" | grep -qx '\.debug_info\|\.debug_line'; then
    die "$bin: has no debug info to keep apart (already split, or built without it: build with \
\`cargo build --release\`, whose profile keeps line tables)"
  fi

  debug="$bin.debug"
  tmp_debug="$bin.debug.tmp.$$"
  tmp_bin="$bin.stripped.tmp.$$"
  trap 'rm -f "$tmp_debug" "$tmp_bin"' EXIT
  "$OBJCOPY" --only-keep-debug --compress-debug-sections=zlib "$bin" "$tmp_debug"
  chmod 0644 "$tmp_debug"
  mv -f "$tmp_debug" "$debug"
  # --add-gnu-debuglink records the debug file's name and CRC, so it reads the file just written.
  "$OBJCOPY" --strip-debug --add-gnu-debuglink="$debug" "$bin" "$tmp_bin"

  # .debug_gdb_scripts is loaded (a few bytes naming gdb's pretty printers), not debug info.
  left=$(sections "$tmp_bin" | grep '^\.z\?debug_' | grep -vx '\.debug_gdb_scripts' || true)
  [ -z "$left" ] || die "$bin: debug sections left after stripping: $(echo "$left" | tr '\n' ' ')"
  sections "$tmp_bin" | grep -qx '\.gnu_debuglink' || die "$bin: no .gnu_debuglink after stripping"
  sections "$debug" | grep -qx '\.debug_info\|\.debug_line' || die "$debug: holds no debug info"

  chmod --reference="$bin" "$tmp_bin"
  before=$(stat -c %s "$bin")
  mv -f "$tmp_bin" "$bin"
  trap - EXIT
  build_id=$("$READELF" -n "$bin" | sed -n 's/^ *Build ID: *//p')
  echo "$bin: $before -> $(stat -c %s "$bin") bytes; debug info in $debug ($(stat -c %s "$debug") bytes)${build_id:+, build id $build_id}"
done
