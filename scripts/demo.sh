#!/usr/bin/env bash
# A first look at bucketfs: starts a local S3 server (SeaweedFS) with a demo
# bucket, mounts it, and lists and reads it. Everything lives in a temp dir
# and on 127.0.0.1. With a terminal, it waits for Enter before cleaning up.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
source scripts/weed-path.sh
cargo build --locked --quiet
BUCKETFS="$PWD/target/debug/bucketfs"

work="$(mktemp -d /tmp/bucketfs-demo.XXXXXX)"
port=$((20000 + RANDOM % 20000))
ak=demo-access-key sk=demo-secret-key
cat > "$work/s3.json" <<JSON
{"identities":[{"name":"demo","credentials":[{"accessKey":"$ak","secretKey":"$sk"}],"actions":["Admin","Read","Write","List"]}]}
JSON
mkdir -p "$work/data" "$work/mnt"
cleanup() {
  umount "$work/mnt" 2>/dev/null || true
  [ -n "${fs_pid:-}" ] && wait "$fs_pid" 2>/dev/null || true
  [ -n "${weed_pid:-}" ] && kill "$weed_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== starting SeaweedFS S3 on 127.0.0.1:$port (data in $work)"
"$WEED" server -dir="$work/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.port=$((port + 1)) -master.port.grpc=$((port + 2)) -volume.port=$((port + 3)) -volume.port.grpc=$((port + 4)) \
  -filer.port=$((port + 5)) -filer.port.grpc=$((port + 6)) -s3 -s3.port=$port -s3.port.grpc=$((port + 7)) \
  -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$work/s3.json" >"$work/weed.log" 2>&1 &
weed_pid=$!
s3() { curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$ak:$sk" "$@"; }
for _ in $(seq 1 120); do s3 "http://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.5; done

echo "== creating bucket 'demo' and uploading a few objects"
s3 -X PUT "http://127.0.0.1:$port/demo" >/dev/null
printf 'Hello from S3!\n' > "$work/hello.txt"
s3 -T "$work/hello.txt" "http://127.0.0.1:$port/demo/hello.txt" >/dev/null
s3 -T README.md "http://127.0.0.1:$port/demo/docs/README.md" >/dev/null
head -c 10485760 /dev/urandom > "$work/random.bin"
s3 -T "$work/random.bin" "http://127.0.0.1:$port/demo/data/random.bin" >/dev/null

echo "== mounting s3://demo at $work/mnt"
printf '%s' "$ak" > "$work/ak"; printf '%s' "$sk" > "$work/sk"
"$BUCKETFS" mount demo "$work/mnt" --endpoint-url "http://127.0.0.1:$port" \
  --access-key-file "$work/ak" --secret-key-file "$work/sk" 2>"$work/bucketfs.log" &
fs_pid=$!
for _ in $(seq 1 100); do grep -q " $work/mnt " /proc/self/mountinfo && break; sleep 0.1; done

echo "== ls -lR $work/mnt"
ls -lR "$work/mnt"
echo "== cat hello.txt"
cat "$work/mnt/hello.txt"
echo "== sha256 of data/random.bin through the mount and of the original"
sha256sum "$work/mnt/data/random.bin" "$work/random.bin"
echo "== df"
df -h "$work/mnt"
if [ -t 0 ]; then
  read -r -p "Mounted at $work/mnt. Press Enter to unmount and stop the server. " _
fi
