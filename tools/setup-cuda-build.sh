#!/usr/bin/env bash
# Prepares `cargo build --features cuda` on a machine that reaches only the package registries.
#
# cubecl-cuda 0.11 always links cubecl-llvm, whose build dependency tracel-llvm-bundler downloads
# a prebuilt LLVM 23.1 from GitHub releases unless its sentinel file says a bundle is installed.
# Offline, this script stands Debian's LLVM 22 (`llvm-22-dev`) in for that bundle behind a thin
# `llvm-config` wrapper (the three mismatches it fixes are below). Users with internet access
# need none of this: the bundle downloads itself on the first cuda build.
#
# Idempotent: a second run changes nothing. It never touches a real bundle: when the sentinel
# exists and the `llvm-config` there is not this script's wrapper, it stops with exit 1.
# Usage: tools/setup-cuda-build.sh [--check]   (--check: report only, install nothing)
set -euo pipefail

bundle_version="tracel-llvm-23.1.0-4"
debian_llvm="/usr/lib/llvm-22/bin/llvm-config"
data_home="${XDG_DATA_HOME:-$HOME/.local/share}"
prefix="$data_home/tracel/$bundle_version"
wrapper="$prefix/bin/llvm-config"
sentinel="$prefix/.tracel-llvm-installed"
marker="# msfp stand-in for the tracel LLVM bundle"
check_only=0
[ "${1:-}" = "--check" ] && check_only=1

say() { echo "setup-cuda-build: $*"; }

if [ -e "$sentinel" ]; then
  if [ -f "$wrapper" ] && grep -qF "$marker" "$wrapper"; then
    if [ -x "$debian_llvm" ] && dpkg -s libzstd-dev >/dev/null 2>&1; then
      say "already set up ($wrapper -> $debian_llvm); nothing to do"
      exit 0
    fi
    say "stand-in present but Debian's llvm-22-dev or libzstd-dev is missing"
  else
    say "a real LLVM bundle is installed at $prefix; leaving it alone"
    exit 0
  fi
fi

if [ "$check_only" -eq 1 ]; then
  say "not set up: run tools/setup-cuda-build.sh (installs llvm-22-dev, libzstd-dev; ~735 MB)"
  exit 1
fi

if [ -e "$wrapper" ] && ! grep -qF "$marker" "$wrapper"; then
  say "$wrapper exists and is not ours (an unfinished bundle download?); remove $prefix and rerun"
  exit 1
fi

missing=()
[ -x "$debian_llvm" ] || missing+=(llvm-22-dev)
dpkg -s libzstd-dev >/dev/null 2>&1 || missing+=(libzstd-dev)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]} (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  say "llvm-22-dev and libzstd-dev already installed"
fi
[ -x "$debian_llvm" ] || { say "$debian_llvm not found after installing llvm-22-dev"; exit 1; }

mkdir -p "$prefix/bin"
tmp="$wrapper.tmp.$$"
# The wrapper fixes what Debian's llvm-config prints differently from the bundle's:
# - it lists Polly (-lPolly -lPollyISL), which is in another package and not needed;
# - `--system-libs` prints libraries as paths (/usr/lib/.../libz3.so), which the bundler turns
#   into `dylib=libz3` (does not link): rewrite them to -lNAME.
cat > "$tmp" <<WRAP
#!/bin/sh
$marker (tools/setup-cuda-build.sh); remove this folder to let the real bundle download.
"$debian_llvm" "\$@" | sed -e 's/-lPollyISL//g' -e 's/-lPolly//g' -e 's#[^ ]*/lib\([A-Za-z0-9_+-]*\)\.so#-l\1#g'
WRAP
chmod +x "$tmp"
mv "$tmp" "$wrapper"
touch "$sentinel"
say "wrote $wrapper and $sentinel"
say "LLVM $("$wrapper" --version) stands in for $bundle_version"
say "if cubecl-llvm was built before against something else: cargo clean -p cubecl-llvm"
