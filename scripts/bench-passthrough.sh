#!/usr/bin/env bash
# Cached re-read of a 1 GiB object after dropping the page cache, with FUSE
# passthrough, with --no-passthrough, and a plain dd of the cache file on
# the same disk; bucketfs CPU seconds per GiB for each (utime + stime from
# /proc/PID/stat). Then append and in-place edit throughput on a staged file.
#
# Needs root (drop_caches, mount), the release build (cargo build --release)
# and SeaweedFS (scripts/install-deps.sh). Usage: scripts/bench-passthrough.sh [RUNS]
# SECTIONS="read staged edits" (the default) picks what runs.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
SECTIONS="${SECTIONS:-read staged edits}"
on() { [[ " $SECTIONS " == *" $1 "* ]]; }
BIN="$PWD/target/release/bucketfs"
source scripts/weed-server.sh
# The cache must be on a real disk, like a --cache-dir in production.
work="$(mktemp -d "$PWD/target/bench-passthrough.XXXXXX")"
mnt="$work/mnt"
cache="$work/cache"
mkdir -p "$work/data" "$mnt" "$cache"
AK=AKIABUCKETFSTEST SK=bucketfs-test-secret-4f1c9e BUCKET=bench
fs_pid="" weed_pid=""
unmount() {
  if [ -n "$fs_pid" ]; then
    kill -TERM "$fs_pid" 2>/dev/null || true
    wait "$fs_pid" 2>/dev/null || true
    fs_pid=""
  fi
  for _ in 1 2 3; do mountpoint -q "$mnt" || break; umount -l "$mnt" 2>/dev/null || true; sleep 0.2; done
}
cleanup() {
  unmount
  [ -n "$weed_pid" ] && kill "$weed_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $work" || rm -rf "$work"
}
trap cleanup EXIT

weed_server "$work"
printf '%s\n' "$AK" >"$work/ak"; printf '%s\n' "$SK" >"$work/sk"

mount_fs() {
  "$BIN" mount "$BUCKET" "$mnt" --endpoint-url "$ENDPOINT" --access-key-file "$work/ak" \
    --secret-key-file "$work/sk" --cache-dir "$cache" --metadata-ttl indefinite --metrics-addr "127.0.0.1:${P[9]}" "$@" >>"$work/bucketfs.log" 2>&1 &
  fs_pid=$!
  for _ in $(seq 1 100); do mountpoint -q "$mnt" && return; sleep 0.1; done
  echo "bucketfs did not mount" >&2; tail "$work/bucketfs.log" >&2; exit 1
}
metric() { curl -s "http://127.0.0.1:${P[9]}/metrics" | awk -v m="$1" '$1 ~ "^"m {s+=$NF} END {print s+0}'; }
report() { echo "   (this mount: passthrough opens $(metric bucketfs_passthrough_opens_total), GETs $(metric 'bucketfs_s3_requests_total.*get'))"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# One timed read of $1: "MiB/s cpu-s/GiB" (CPU of the bucketfs process, if mounted).
timed_read() {
  local file="$1" t0 t1 c0=0 c1=0 bytes
  drop
  if [ -n "$fs_pid" ]; then c0=$(cpu_ticks "$fs_pid"); fi
  t0=$(date +%s.%N)
  bytes=$(dd if="$file" of=/dev/null bs=1M 2>&1 | awk '/bytes/{print $1}')
  t1=$(date +%s.%N)
  if [ -n "$fs_pid" ]; then c1=$(cpu_ticks "$fs_pid"); fi
  python3 -c "import sys; b,t0,t1,c0,c1,hz=map(float,sys.argv[1:]); g=b/2**30; print(f'{b/2**20/(t1-t0):.0f} {(c1-c0)/hz/g:.3f}')" \
    "$bytes" "$t0" "$t1" "$c0" "$c1" "$(getconf CLK_TCK)"
}

echo "== kernel $(uname -r), $(nproc) CPUs, commit $(git rev-parse --short HEAD)"
if on read || on staged; then
head -c 1G /dev/urandom >"$work/src.bin"
want=$(sha256sum <"$work/src.bin" | cut -d' ' -f1)
s3 -T "$work/src.bin" "$ENDPOINT/$BUCKET/big.bin" >/dev/null
on staged || rm "$work/src.bin"

# Fill the cache: one read from the server, then wait for the join.
mount_fs
got=$(sha256sum <"$mnt/big.bin" | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "wrong bytes"; exit 1; }
for _ in $(seq 1 600); do obj=$(find "$cache" -name '*.obj' | head -1); [ -n "$obj" ] && break; sleep 0.1; done
[ -n "$obj" ] || { echo "the object was not joined"; exit 1; }
sleep 1
# The read section goes on with this mount; the others start their own.
on read || unmount
fi
if on read; then
echo "== cached re-read of 1 GiB after drop_caches: MiB/s, bucketfs CPU s/GiB (runs: $RUNS)"
for i in $(seq 1 "$RUNS"); do echo "passthrough   $(timed_read "$mnt/big.bin")"; done
report
unmount
for i in $(seq 1 "$RUNS"); do echo "dd cache file $(timed_read "$obj")"; done
mount_fs --no-passthrough
for i in $(seq 1 "$RUNS"); do echo "no-passthrough $(timed_read "$mnt/big.bin")"; done
report
unmount
# A new process checks the file whole on its first open.
mount_fs
echo "passthrough, first open after a restart (file checked) $(timed_read "$mnt/big.bin")"
echo "passthrough, next open $(timed_read "$mnt/big.bin")"
got=$(sha256sum <"$mnt/big.bin" | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "wrong bytes after the runs"; exit 1; }
report
unmount

fi

# Staged writes: overwrite 256 MiB in place inside, then append 256 MiB to,
# the cached 1 GiB file; close uploads. Time includes the upload. With
# passthrough the in-place edit fills its staging file from the cache file
# and the kernel writes it; the append (a new version by then, and over
# 5 MiB) takes the ordinary path, as with --no-passthrough. Each mount
# starts from the cached version (the object is put back in between).
timed_write() {
  local mib="$1" t0 t1 c0 c1
  shift
  c0=$(cpu_ticks "$fs_pid"); t0=$(date +%s.%N)
  "$@" 2>/dev/null
  t1=$(date +%s.%N); c1=$(cpu_ticks "$fs_pid")
  python3 -c "import sys; m,t0,t1,c0,c1,hz=map(float,sys.argv[1:]); print(f'{m/(t1-t0):.0f} {(c1-c0)/hz/(m/1024):.3f}')" \
    "$mib" "$t0" "$t1" "$c0" "$c1" "$(getconf CLK_TCK)"
}
if on staged; then
echo "== staged writes (time to close, upload included): MiB/s, bucketfs CPU s/GiB written"
for mode in passthrough no-passthrough; do
  flags=(); [ "$mode" = no-passthrough ] && flags=(--no-passthrough)
  # The same bytes again: the same ETag, so the cache still holds this version.
  s3 -T "$work/src.bin" "$ENDPOINT/$BUCKET/big.bin" >/dev/null
  mount_fs "${flags[@]}"
  echo "$mode 1 GiB file, in place 256 MiB $(timed_write 256 dd if=/dev/zero of="$mnt/big.bin" bs=1M count=256 seek=256 conv=notrunc)"
  echo "$mode 1 GiB file, append 256 MiB   $(timed_write 256 dd if=/dev/zero of="$mnt/big.bin" bs=1M count=256 oflag=append conv=notrunc)"
  unmount
done
fi

# Edits: 32 MiB appended to a 4 MiB and to a 32 MiB object, and 32 MiB
# overwritten in place in a 32 MiB object, in 4 KiB and in 1 MiB writes; each
# a new object. An open for writing downloads the object whole so the kernel
# can write it (passthrough), except an append to an object of 5 MiB or
# more, which is copied in S3 at upload instead.
on edits || exit 0
echo "== edits (time to close: download, writes, upload): MiB/s of the 32 MiB written, bucketfs CPU s/GiB written"
head -c 32M /dev/urandom >"$work/b32.bin"
head -c 4M /dev/urandom >"$work/b4.bin"
ops="append4M append32M inplace32M"
base_of() { if [ "$1" = append4M ]; then echo "$work/b4.bin"; else echo "$work/b32.bin"; fi; }
# The objects exist before the mount (it caches listings indefinitely).
for mode in passthrough no-passthrough; do
  for bs in 4k 1M; do
    for op in $ops; do s3 -T "$(base_of "$op")" "$ENDPOINT/$BUCKET/e-$bs-$op-$mode" >/dev/null; done
  done
done
for mode in passthrough no-passthrough; do
  flags=(); [ "$mode" = no-passthrough ] && flags=(--no-passthrough)
  mount_fs "${flags[@]}"
  for bs in 4k 1M; do
    count=8192
    [ "$bs" = 1M ] && count=32
    for op in $ops; do
      base="$(base_of "$op")"
      key="e-$bs-$op-$mode"
      f="$mnt/$key"
      if [ "$op" = inplace32M ]; then
        r=$(timed_write 32 dd if=/dev/zero of="$f" bs="$bs" count="$count" conv=notrunc)
        want=$(head -c 32M /dev/zero | sha256sum | cut -d' ' -f1)
      else
        r=$(timed_write 32 dd if=/dev/zero of="$f" bs="$bs" count="$count" oflag=append conv=notrunc)
        want=$(cat "$base" <(head -c 32M /dev/zero) | sha256sum | cut -d' ' -f1)
      fi
      got=$(s3 "$ENDPOINT/$BUCKET/$key" | sha256sum | cut -d' ' -f1)
      [ "$got" = "$want" ] || { echo "wrong bytes in the bucket after $mode $op $bs"; exit 1; }
      echo "$mode $op bs=$bs $r"
    done
  done
  report
  unmount
done
