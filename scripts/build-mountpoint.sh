#!/usr/bin/env bash
# Builds mountpoint-s3's `mount-s3` binary from a local copy of its source, for
# scripts/compare.sh. Mountpoint for Amazon S3 publishes its library crates but
# not the binary, so the comparison builds it once and caches it.
#
#   MOUNTPOINT_SRC=/path/to/mountpoint-s3 scripts/build-mountpoint.sh
#
# Prints the path of the binary on stdout (progress goes to stderr). Exits 2,
# saying why, when the source is not there; this script never downloads the
# source itself. Only crates.io and the Debian archive are used.
#
# Environment:
#   MOUNTPOINT_SRC    a git directory (bare or not) or a plain source tree of
#                     github.com/awslabs/mountpoint-s3 (required)
#   MOUNTPOINT_REV    the revision to build from a git directory (default HEAD)
#   MOUNTPOINT_CACHE  where builds are kept (default /var/tmp/bucketfs-mountpoint);
#                     one directory per commit, holding the binary `mount-s3`
#   MOUNTPOINT_KEEP_TARGET=1  keep cargo's target directory (several GiB) after
#                     a build; by default only the binary is kept
#   MOUNTPOINT_JOBS   cargo -j (default 2)
#   MOUNTPOINT_REBUILD=1  build again even if a cached binary is there
#
# The recipe (checked with mount-s3 1.24.0 and rustc 1.95):
#  - the CRT C libraries are git submodules under mountpoint-s3-crt-sys/crt/;
#    a source archive lacks them, so they are taken from the published crate
#    mountpoint-s3-crt-sys of the same version, which carries the same sources;
#  - rust-toolchain.toml pins a newer toolchain than needed; it is removed and
#    the installed toolchain is used;
#  - cmake, clang and libfuse2's headers are needed (installed here with apt).
# The cargo build runs under `flock /tmp/bucketfs-cargo.lock` and `nice`, so it
# never overlaps another cargo build on the same machine.
set -euo pipefail

log() { echo "build-mountpoint: $*" >&2; }
unavailable() {
  log "$*"
  log "mount-s3 is not available; set MOUNTPOINT_SRC to a copy of the mountpoint-s3 source"
  exit 2
}

CACHE="${MOUNTPOINT_CACHE:-/var/tmp/bucketfs-mountpoint}"
SRC="${MOUNTPOINT_SRC:-}"
REV="${MOUNTPOINT_REV:-HEAD}"
JOBS="${MOUNTPOINT_JOBS:-2}"
CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"

[ -n "$SRC" ] || unavailable "MOUNTPOINT_SRC is not set"
[ -d "$SRC" ] || unavailable "MOUNTPOINT_SRC=$SRC is not a directory"

# Where the source comes from: a git directory gives an exact commit (the cache
# key); a plain tree is keyed by its path (MOUNTPOINT_REBUILD=1 after changing it).
gitdir=""
if git --git-dir="$SRC" rev-parse --verify -q "$REV^{commit}" >/dev/null 2>&1; then
  gitdir="$SRC"
elif [ -d "$SRC/.git" ] && git --git-dir="$SRC/.git" rev-parse --verify -q "$REV^{commit}" >/dev/null 2>&1; then
  gitdir="$SRC/.git"
fi
if [ -n "$gitdir" ]; then
  commit="$(git --git-dir="$gitdir" rev-parse "$REV^{commit}")"
  key="${commit:0:12}"
  crt_version="$(git --git-dir="$gitdir" show "$commit:mountpoint-s3-crt-sys/Cargo.toml" 2>/dev/null |
    sed -n 's/^version *= *"\(.*\)".*/\1/p' | head -1)" ||
    true
else
  [ -f "$SRC/mountpoint-s3/Cargo.toml" ] || unavailable "$SRC is neither a git directory nor a mountpoint-s3 source tree"
  key="tree-$(realpath "$SRC" | sha256sum | cut -c1-12)"
  crt_version="$(sed -n 's/^version *= *"\(.*\)".*/\1/p' "$SRC/mountpoint-s3-crt-sys/Cargo.toml" | head -1)"
fi
[ -n "$crt_version" ] || unavailable "cannot read the mountpoint-s3-crt-sys version from $SRC"

dir="$CACHE/$key"
bin="$dir/mount-s3"
if [ -z "${MOUNTPOINT_REBUILD:-}" ] && [ -x "$bin" ]; then
  log "cached: $bin"
  echo "$bin"
  exit 0
fi
mkdir -p "$dir"

# Build tools (Debian). libfuse-dev is libfuse2's: mount-s3 links libfuse2. The
# `fuse` package itself is not needed (it would replace fuse3): as root,
# libfuse2 mounts without fusermount.
pkgs=(cmake clang libclang-dev libfuse-dev pkg-config)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The source, without rust-toolchain.toml, with the CRT sources of the
# published crate.
log "preparing the source in $dir/src"
if [ -n "$gitdir" ]; then
  rm -rf "$dir/src"
  mkdir -p "$dir/src"
  git --git-dir="$gitdir" archive "$commit" | tar -x -C "$dir/src"
else
  mkdir -p "$dir/src"
  tar -C "$SRC" --exclude=./target --exclude=./.git -cf - . | tar -x -C "$dir/src"
fi
rm -f "$dir/src/rust-toolchain.toml" "$dir/src/rust-toolchain"

crt_crate() { ls -d "$CARGO_HOME"/registry/src/*/"mountpoint-s3-crt-sys-$crt_version" 2>/dev/null | head -1; }
if [ -z "$(crt_crate)" ]; then
  log "fetching the published crate mountpoint-s3-crt-sys $crt_version from crates.io"
  # `cargo info` downloads and unpacks the crate into cargo's registry; run it
  # outside any workspace so it looks at crates.io, not a local package.
  (cd / && cargo info --quiet "mountpoint-s3-crt-sys@$crt_version" >/dev/null)
fi
crt="$(crt_crate)"
[ -n "$crt" ] && [ -d "$crt/crt/aws-c-common" ] ||
  unavailable "the crate mountpoint-s3-crt-sys $crt_version has no CRT sources under $CARGO_HOME/registry/src"
rm -rf "$dir/src/mountpoint-s3-crt-sys/crt"
cp -a "$crt/crt" "$dir/src/mountpoint-s3-crt-sys/crt"

log "building mount-s3 (${key}, about 12 min on 2 cores the first time)"
(
  cd "$dir/src"
  CARGO_TARGET_DIR="$dir/target" RUSTFLAGS="-C debuginfo=line-tables-only" \
    flock /tmp/bucketfs-cargo.lock \
    nice -n 10 cargo build --locked --release -p mountpoint-s3 --bin mount-s3 -j "$JOBS" >&2
)
cp "$dir/target/release/mount-s3" "$bin.tmp"
mv "$bin.tmp" "$bin"
[ -n "${MOUNTPOINT_KEEP_TARGET:-}" ] || rm -rf "$dir/target"
rm -rf "$dir/src"
log "built: $bin ($("$bin" --version 2>/dev/null | head -1))"
echo "$bin"
