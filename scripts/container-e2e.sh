#!/usr/bin/env bash
# The FUSE image, built and run the way Fluid's ThinRuntime runs it, against
# SeaweedFS on the host's loopback. No registry and no Kubernetes: podman (with
# runc) on this host, a Debian base image made with mmdebstrap from the host's
# own apt mirror, and the image built from docker/Dockerfile's
# `runtime-prebuilt` stage with a release binary built here.
#
# What it does, as Fluid does it (docs/fluid.md):
#   DaemonSet mode, Dataset default/minio-demo (ReadOnlyMany):
#     FUSE container: --privileged, /dev/fuse, host network, no command (the
#     image's entry point), the runtime-mnt dir with Bidirectional (rshared)
#     propagation, config.json as a ConfigMap volume and the keys as a Secret
#     volume (kubelet's ..data symlink layout), Fluid's env vars;
#     readiness: `bucketfs probe` in the container, CSI's mount check on the host;
#     app container: targetPath bind-mounted with HostToContainer (rslave),
#     reads testfile and a large file (sha256);
#     config change: the ConfigMap's ..data swapped (a second mount added,
#     then removed), served without a restart;
#     rotated secret: new keys on the server, the Secret's ..data swapped;
#     crash: podman kill -s KILL leaves a dead mount, a new container cleans
#     it and serves again, one mount at targetPath;
#     preStop `umount <targetPath>`, podman stop: exit code 0, no mount left.
#   Sidecar mode, Dataset default/minio-rw (ReadWriteMany):
#     Fluid's check-mount.sh as the FUSE container's postStart;
#     the app writes a file: it is in the bucket when close() returns;
#     Job completion: preStop umount, the FUSE container exits 0 by itself.
#
# Needs root, /dev/fuse and a Debian/Ubuntu host with apt (it installs podman,
# runc, mmdebstrap). Everything else lives in a temp dir that is removed at
# exit. The base image tarball is cached in $BUCKETFS_E2E_CACHE
# (default /var/tmp/bucketfs-e2e-cache). BUCKETFS_BIN=path uses that binary
# instead of running `cargo build --release`. Fails loudly (never skips) when
# containers or FUSE cannot work here.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
T_START=$SECONDS

passed=0
failed=0
step_t0=0
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
log() { echo "container-e2e: $*"; }
begin() { step_t0=$(now); log "-- $*"; }
pass() {
  passed=$((passed + 1))
  echo "  PASS $* ($(secs "$step_t0" "$(now)") s)"
}
die() {
  failed=$((failed + 1))
  echo "  FAIL $*" >&2
  exit 1
}
finish() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
  if [ "$failed" -ne 0 ] && [ -n "${work:-}" ] && [ -d "$work" ]; then
    for c in $(podman ps -a --format '{{.Names}}' 2>/dev/null); do
      echo "---- podman logs $c (last 40 lines)" >&2
      podman logs --tail 40 "$c" >&2 2>&1 || true
    done
    [ -f "$work/weed.log" ] && { echo "---- weed.log (last 20 lines)" >&2; tail -20 "$work/weed.log" >&2; }
  fi
  cleanup
  echo "container-e2e: $passed passed, $failed failed ($((SECONDS - T_START)) s)"
  if [ "$failed" -ne 0 ]; then exit 1; fi
}

cleanup() {
  set +e
  if [ -n "${CONTAINERS_STORAGE_CONF:-}" ] && command -v podman >/dev/null; then
    podman rm -af -t 2 >/dev/null 2>&1
  fi
  if [ -n "${weed_pid:-}" ]; then
    kill -TERM -- "-$weed_pid" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$weed_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$weed_pid" 2>/dev/null
    wait "$weed_pid" 2>/dev/null
  fi
  if [ -n "${work:-}" ] && [ -d "$work" ]; then
    # Every mount under the temp dir (FUSE mounts, the rshared bind, podman's
    # overlay mounts), deepest first.
    for _ in 1 2 3; do
      mps=$(awk -v w="$work" '$5 == w || index($5, w "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r)
      [ -z "$mps" ] && break
      for m in $mps; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
    done
    rm -rf --one-file-system "$work"
  fi
}
trap finish EXIT

# ---------------------------------------------------------------------------
# Prerequisites: root, /dev/fuse, podman, runc, mmdebstrap, SeaweedFS, a binary
# ---------------------------------------------------------------------------
begin "prerequisites"
[ "$(id -u)" -eq 0 ] || die "must run as root (privileged FUSE containers, mounts on the host)"
[ -c /dev/fuse ] || die "/dev/fuse is missing: no FUSE in this kernel or machine; the FUSE container cannot run"
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc mmdebstrap >/dev/null ||
    die "cannot install podman, runc and mmdebstrap with apt-get"
fi
scripts/install-deps.sh >/dev/null || die "scripts/install-deps.sh failed"
source scripts/weed-path.sh
[ -x "$(command -v "$WEED")" ] || die "no SeaweedFS binary ($WEED)"
pass "root, /dev/fuse, $(podman --version), runc $(runc --version | awk 'NR==1{print $3}'), mmdebstrap, weed"

if [ -n "${BUCKETFS_BIN:-}" ]; then
  begin "binary: $BUCKETFS_BIN"
else
  begin "cargo build --release --locked --bin bucketfs"
  cargo build --release --locked --quiet --bin bucketfs || die "cargo build --release failed"
  BUCKETFS_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/bucketfs"
fi
[ -x "$BUCKETFS_BIN" ] || die "no executable $BUCKETFS_BIN"
pass "binary $(du -m "$BUCKETFS_BIN" | cut -f1) MB"

# ---------------------------------------------------------------------------
# podman with its own storage and config under the temp dir (set before any
# podman call, or state lands in /var/lib/containers)
# ---------------------------------------------------------------------------
work="$(mktemp -d /tmp/bucketfs-e2e.XXXXXX)"
mkdir -p "$work/podman/tmp"
cat >"$work/podman/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$work/podman/storage"
runroot = "$work/podman/run"
EOF
# runc, not crun (crun fails on cgroup v1 hybrid mode); ulimits that a
# container may get under the host's hard limits.
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
nproc=$(ulimit -Hu)
[ "$nproc" = unlimited ] && nproc=32768
[ "$nproc" -gt 32768 ] && nproc=32768
cat >"$work/podman/containers.conf" <<EOF
[containers]
netns = "host"
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
tmp_dir = "$work/podman/tmp"
EOF
export CONTAINERS_STORAGE_CONF="$work/podman/storage.conf"
export CONTAINERS_CONF="$work/podman/containers.conf"

begin "podman works here"
podman info >"$work/podman-info.txt" 2>&1 || {
  cat "$work/podman-info.txt" >&2
  die "podman cannot start on this machine (see podman info above)"
}
pass "podman info (storage under $work/podman)"

# ---------------------------------------------------------------------------
# Base image: Debian bookworm minbase from the host's apt mirror, trimmed like
# the official slim image (no man pages, docs or locales). Cached.
# ---------------------------------------------------------------------------
begin "base image localhost/debian:bookworm-slim"
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && mirror=$(awk '/^URIs:/ { print $2; exit }' "$f") && [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || die "no apt mirror found in /etc/apt/sources.list.d/*.sources or /etc/apt/sources.list"
mmopts=(--variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*')
cache="${BUCKETFS_E2E_CACHE:-/var/tmp/bucketfs-e2e-cache}"
key=$(printf '%s\n' "${mmopts[@]}" "$mirror" | sha256sum | cut -c1-12)
tarball="$cache/bookworm-minbase-$key.tar"
if [ ! -s "$tarball" ]; then
  mkdir -p "$cache"
  # mmdebstrap picks the output format from the name: keep ".tar" last.
  partial="$cache/partial-$$.tar"
  mmdebstrap "${mmopts[@]}" bookworm "$partial" "$mirror" >"$work/mmdebstrap.log" 2>&1 || {
    tail -20 "$work/mmdebstrap.log" >&2
    rm -rf "$partial"
    die "mmdebstrap could not make a Debian bookworm base image from the apt mirror"
  }
  mv "$partial" "$tarball"
  how="made with mmdebstrap"
else
  how="cached"
fi
podman import -q "$tarball" localhost/debian:bookworm-slim >/dev/null || die "podman import failed"
base_mb=$(podman image inspect --format '{{.Size}}' localhost/debian:bookworm-slim | awk '{ printf "%.1f", $1 / 1e6 }')
pass "$how ($tarball), imported: $base_mb MB"

# ---------------------------------------------------------------------------
# The FUSE image: docker/Dockerfile, target runtime-prebuilt
# ---------------------------------------------------------------------------
IMAGE=localhost/bucketfs:e2e
begin "podman build --target runtime-prebuilt"
mkdir -p "$work/ctx"
cp "$BUCKETFS_BIN" "$work/ctx/bucketfs"
podman build -q --network host -f "$ROOT/docker/Dockerfile" --target runtime-prebuilt \
  --build-arg BASE_IMAGE=localhost/debian:bookworm-slim -t "$IMAGE" "$work/ctx" >"$work/build.log" 2>&1 || {
  tail -30 "$work/build.log" >&2
  die "podman build failed"
}
image_bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
image_mb=$(awk -v b="$image_bytes" 'BEGIN { printf "%.1f", b / 1e6 }')
pass "image $IMAGE: $image_mb MB ($image_bytes bytes; base $base_mb MB, binary $(du -m "$BUCKETFS_BIN" | cut -f1) MB)"

begin "Fluid's tools in the image"
tools="bash cat grep expr date sleep test umount df ls wc"
podman run --rm --entrypoint bash "$IMAGE" -c \
  "for t in $tools; do command -v \$t >/dev/null || { echo missing \$t; exit 1; }; done; /usr/local/bin/bucketfs --version" \
  >"$work/tools.txt" 2>&1 || { cat "$work/tools.txt" >&2; die "a tool Fluid runs is missing from the image"; }
entry=$(podman image inspect --format '{{json .Config.Entrypoint}} {{json .Config.Cmd}}' "$IMAGE")
[ "$entry" = '["/usr/local/bin/bucketfs","fluid"] null' ] || die "entry point is $entry, want [\"/usr/local/bin/bucketfs\",\"fluid\"] and no CMD"
pass "$tools; $(cat "$work/tools.txt"); entry point bucketfs fluid"

# ---------------------------------------------------------------------------
# SeaweedFS on 127.0.0.1: an admin identity from a file (static), and the
# dataset's user "fluid" made through `weed shell` (dynamic, so that its keys
# can be rotated while the server runs)
# ---------------------------------------------------------------------------
begin "SeaweedFS S3 on 127.0.0.1"
read -r -a ports <<<"$(python3 -c 'import socket
ss = [socket.socket() for _ in range(8)]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))')"
S3_PORT=${ports[0]}
ENDPOINT="http://127.0.0.1:$S3_PORT"
ADMIN_AK=e2e-admin-key ADMIN_SK=e2e-admin-secret-0f3a
mkdir -p "$work/weed"
cat >"$work/s3.json" <<JSON
{"identities":[{"name":"admin","credentials":[{"accessKey":"$ADMIN_AK","secretKey":"$ADMIN_SK"}],"actions":["Admin","Read","Write","List"]}]}
JSON
setsid "$WEED" server -dir="$work/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.port="${ports[1]}" -master.port.grpc="${ports[2]}" -volume.port="${ports[3]}" \
  -volume.port.grpc="${ports[4]}" -filer.port="${ports[5]}" -filer.port.grpc="${ports[6]}" \
  -s3 -s3.port="$S3_PORT" -s3.port.grpc="${ports[7]}" -s3.port.iceberg=0 -s3.port.lance=0 \
  -s3.config="$work/s3.json" -volume.max=100 -master.volumeSizeLimitMB=64 >"$work/weed.log" 2>&1 &
weed_pid=$!
# S3 requests from the host, with SigV4 (curl --aws-sigv4).
s3_as() { curl -sS -f --aws-sigv4 "aws:amz:us-east-1:s3" --user "$1" "${@:2}"; }
s3() { s3_as "$ADMIN_AK:$ADMIN_SK" "$@"; }
weed_shell() {
  printf '%s\n' "$1" | timeout 30 "$WEED" shell -master="127.0.0.1:${ports[1]}.${ports[2]}" \
    -filer="127.0.0.1:${ports[5]}.${ports[6]}" >>"$work/weed-shell.log" 2>&1
}
up=""
for _ in $(seq 1 240); do
  if s3 "$ENDPOINT/" >/dev/null 2>&1; then up=1 && break; fi
  kill -0 "$weed_pid" 2>/dev/null || break
  sleep 0.25
done
[ -n "$up" ] || die "SeaweedFS did not start (see weed.log)"
AK1=fluid-key-one SK1=fluid-secret-one-7d2c
weed_shell "s3.configure -user=fluid -access_key=$AK1 -secret_key=$SK1 -actions=Read,Write,List -apply" ||
  die "weed shell s3.configure failed"
s3 -X PUT "$ENDPOINT/my-first-bucket" >/dev/null
s3 -X PUT "$ENDPOINT/extra-bucket" >/dev/null
s3 -X PUT "$ENDPOINT/rw-bucket" >/dev/null
printf 'hello from bucketfs\n' >"$work/testfile"
head -c $((64 * 1024 * 1024)) /dev/urandom >"$work/large.bin"
large_sha=$(sha256sum <"$work/large.bin" | cut -d' ' -f1)
s3 -T "$work/testfile" "$ENDPOINT/my-first-bucket/testfile" >/dev/null
s3 -T "$work/large.bin" "$ENDPOINT/my-first-bucket/data/large.bin" >/dev/null
s3 -T "$work/testfile" "$ENDPOINT/rw-bucket/testfile" >/dev/null
printf 'in the extra bucket\n' | s3 -T - "$ENDPOINT/extra-bucket/in-extra" >/dev/null
ok=""
for _ in $(seq 1 40); do
  if s3_as "$AK1:$SK1" "$ENDPOINT/my-first-bucket/testfile" >/dev/null 2>&1; then ok=1 && break; fi
  sleep 0.25
done
[ -n "$ok" ] || die "the fluid user's keys do not work on the server"
pass "$ENDPOINT; buckets my-first-bucket (testfile, data/large.bin 64 MiB), extra-bucket, rw-bucket"

# ---------------------------------------------------------------------------
# Kubelet-style volumes
# ---------------------------------------------------------------------------
gen=0
# kube_swap DIR NAME=FILE...: a new ..<timestamp> dir with the files, a
# ..data_tmp symlink to it renamed over ..data, NAME -> ..data/NAME symlinks,
# and the previous timestamp dir removed (as kubelet's atomic writer does).
kube_swap() {
  local dir=$1
  shift
  gen=$((gen + 1))
  local ts
  ts="..$(date -u +%Y_%m_%d_%H_%M_%S).$(printf '%09d' "$gen")"
  local old
  old=$(readlink "$dir/..data" 2>/dev/null || true)
  mkdir -p "$dir/$ts"
  local kv
  for kv in "$@"; do cp "${kv#*=}" "$dir/$ts/${kv%%=*}"; done
  chmod 0444 "$dir/$ts"/*
  ln -sfn "$ts" "$dir/..data_tmp"
  mv -T "$dir/..data_tmp" "$dir/..data"
  for kv in "$@"; do
    [ -L "$dir/${kv%%=*}" ] || ln -s "..data/${kv%%=*}" "$dir/${kv%%=*}"
  done
  if [ -n "$old" ] && [ "$old" != "$ts" ]; then rm -rf "${dir:?}/$old"; fi
}
write_secret() { # DIR ACCESS_KEY SECRET_KEY
  printf '%s' "$2" >"$work/ak.tmp"
  printf '%s' "$3" >"$work/sk.tmp"
  kube_swap "$1" minio-access-key="$work/ak.tmp" minio-access-secret="$work/sk.tmp"
}
write_config() { # DIR JSON
  printf '%s' "$2" >"$work/config.tmp"
  kube_swap "$1" config.json="$work/config.tmp"
}

# The host's runtime-mnt dir: Fluid's mount root, here under the temp dir so
# that paths are the same inside the containers and on the host (as with a
# hostPath), made a shared mount first.
MNT_ROOT="$work/runtime-mnt"
mkdir -p "$MNT_ROOT"
mount --bind "$MNT_ROOT" "$MNT_ROOT" && mount --make-rshared "$MNT_ROOT" || die "cannot make $MNT_ROOT a shared mount"

SECRET=minio-secret
mounts_at() { awk -v p="$1" '$5 == p' /proc/self/mountinfo; }
# CSI's check_mount.sh: a mountinfo line holding targetPath and the
# profile's fileSystemType (fixed strings, whole line), then stat.
csi_check() { grep -F "$1" /proc/self/mountinfo | grep -qF bucketfs && stat "$1" >/dev/null; }

# dataset NAME: sets NAME's paths; config/secret dirs are per dataset.
dataset() {
  DS=$1
  PARENT="$MNT_ROOT/thin/default/$DS"
  TARGET="$PARENT/thin-fuse"
  CONF_DIR="$work/volumes/$DS/config"
  SECRET_DIR="$work/volumes/$DS/secrets/$SECRET"
  mkdir -p "$PARENT" "$CONF_DIR" "$SECRET_DIR"
}
# A mounts[] element the way Fluid writes it (CONTRACT §9.1).
mount_json() { # BUCKET NAME
  local s=/etc/fluid/secrets/$SECRET
  printf '{"mountPoint":"minio://%s","options":{"minio-access-key":"%s/minio-access-key","minio-access-secret":"%s/minio-access-secret","minio-url":"%s"},"name":"%s"}' \
    "$1" "$s" "$s" "$ENDPOINT" "$2"
}
config_json() { # ACCESS_MODE MOUNT...
  local mode=$1
  shift
  local IFS=,
  printf '{"mounts":[%s],"targetPath":"%s","accessModes":["%s"]}' "$*" "$TARGET" "$mode"
}

# fuse_run NAME [EXTRA...]: the FUSE container of dataset $DS, as the
# DaemonSet (or the sidecar webhook) specifies it. Prints nothing; sets T_RUN.
fuse_run() {
  local name=$1
  shift
  T_RUN=$(now)
  podman run -d --name "$name" \
    --privileged --device /dev/fuse --network host \
    -v "$PARENT:$PARENT:rshared" \
    -v "$CONF_DIR:/etc/fluid/config:ro" \
    -v "$SECRET_DIR:/etc/fluid/secrets/$SECRET:ro" \
    -e FLUID_RUNTIME_TYPE=thin -e FLUID_RUNTIME_NS=default -e FLUID_RUNTIME_NAME="$DS" \
    -e MOUNT_POINT="$TARGET" "$@" \
    "$IMAGE" >/dev/null || die "podman run $name failed"
}
# wait_probe NAME: `bucketfs probe` in the container until it passes (30 s,
# Fluid's CSI wait); sets PROBE_SECS.
wait_probe() {
  local deadline=$((SECONDS + 30))
  until podman exec "$1" /usr/local/bin/bucketfs probe >"$work/probe.txt" 2>&1; do
    [ "$(podman inspect --format '{{.State.Running}}' "$1")" = true ] || die "$1 exited: $(podman logs --tail 5 "$1" 2>&1)"
    [ $SECONDS -lt $deadline ] || die "bucketfs probe in $1 did not pass within 30 s: $(cat "$work/probe.txt")"
    sleep 0.05
  done
  PROBE_SECS=$(secs "$T_RUN" "$(now)")
}
# app NAME MOUNT_OPTS CMD: a one-shot app container with targetPath at /data
# (HostToContainer propagation, as CSI publishes it).
app() {
  podman run --rm --name "$1" --network host -v "$TARGET:/data:$2" --entrypoint bash "$IMAGE" -c "$3"
}

# prestop NAME: Fluid's default preStop, `umount <targetPath>` exec'd in the
# FUSE container. bucketfs exits as soon as the umount ends its session, and
# when PID 1 exits the runtime kills what still runs in the container, so the
# exec may end with 137 after a successful umount. Fluid's app controller
# ignores 137 (and "not mounted") for the same reason; so does this check.
prestop() {
  local rc=0
  podman exec "$1" umount "$TARGET" >"$work/prestop.txt" 2>&1 || rc=$?
  case "$rc" in
  0) PRESTOP="umount exited 0" ;;
  137) PRESTOP="umount's exec ended with 137 as PID 1 exited (ignored, as Fluid does)" ;;
  *)
    grep -q 'not mounted' "$work/prestop.txt" && PRESTOP="not mounted (ignored, as Fluid does)" && return 0
    die "preStop umount $TARGET in $1 failed ($rc): $(cat "$work/prestop.txt")"
    ;;
  esac
}

# ===========================================================================
# DaemonSet mode: Dataset default/minio-demo, ReadOnlyMany
# ===========================================================================
dataset minio-demo
write_secret "$SECRET_DIR" "$AK1" "$SK1"
write_config "$CONF_DIR" "$(config_json ReadOnlyMany "$(mount_json my-first-bucket minio)")"

begin "DaemonSet FUSE container (privileged, /dev/fuse, host network, rshared runtime-mnt, ConfigMap + Secret volumes, no command)"
fuse_run demo-fuse -e MOUNT_OPTIONS=ro
wait_probe demo-fuse
RUN_TO_PROBE=$PROBE_SECS
pass "bucketfs probe passed $RUN_TO_PROBE s after podman run"

begin "Fluid's mount check from the host (mountinfo line with targetPath and bucketfs, stat)"
csi_check "$TARGET" || die "no mountinfo line with $TARGET and bucketfs on the host"
n=$(mounts_at "$TARGET" | wc -l)
[ "$n" -eq 1 ] || die "$n mounts at $TARGET on the host, want 1"
demo_mount_id=$(mounts_at "$TARGET" | awk '{ print $1 }')
pass "$(mounts_at "$TARGET" | awk '{ for (i = 7; i <= NF; i++) if ($i == "-") { print $(i+1), $(i+2); exit } }') at targetPath, propagated to the host"

begin "app container reads testfile and a 64 MiB file (sha256)"
out=$(app demo-app ro,rslave "cat /data/testfile && sha256sum /data/data/large.bin && { touch /data/nope 2>&1 || true; }") ||
  die "app container failed: $out"
grep -qx 'hello from bucketfs' <<<"$out" || die "testfile: $out"
grep -q "^$large_sha " <<<"$out" || die "sha256 of large.bin differs: $out (want $large_sha)"
grep -q 'Read-only file system' <<<"$out" || die "a write into the ReadOnlyMany dataset did not fail with EROFS: $out"
pass "testfile ok, sha256 ok, writes fail with EROFS"

begin "config change: ConfigMap ..data swapped (a second mount added, then removed), no restart"
started=$(podman inspect --format '{{.State.StartedAt}}' demo-fuse)
write_config "$CONF_DIR" "$(config_json ReadOnlyMany "$(mount_json my-first-bucket minio)" "$(mount_json extra-bucket extra)")"
ok=""
for _ in $(seq 1 100); do
  if [ -e "$TARGET/extra/in-extra" ]; then ok=1 && break; fi
  sleep 0.1
done
[ -n "$ok" ] || die "the added mount did not appear at $TARGET/extra within 10 s"
out=$(app demo-app2 ro,rslave "cat /data/extra/in-extra /data/minio/testfile") || die "app: $out"
[ "$out" = $'in the extra bucket\nhello from bucketfs' ] || die "after adding a mount the app read: $out"
write_config "$CONF_DIR" "$(config_json ReadOnlyMany "$(mount_json my-first-bucket minio)")"
ok=""
for _ in $(seq 1 100); do
  if [ ! -e "$TARGET/extra" ] && [ -e "$TARGET/testfile" ]; then ok=1 && break; fi
  sleep 0.1
done
[ -n "$ok" ] || die "the removed mount is still there after 10 s: $(ls -la "$TARGET" 2>&1)"
[ "$(mounts_at "$TARGET" | awk '{ print $1 }')" = "$demo_mount_id" ] || die "the FUSE mount was replaced"
[ "$(podman inspect --format '{{.State.StartedAt}}' demo-fuse)" = "$started" ] || die "the FUSE container restarted"
pass "extra/ appeared (app read both mounts), then went away; same mount id $demo_mount_id, same container"

begin "rotated secret: new keys on the server (old ones deleted), Secret ..data swapped"
AK2=fluid-key-two SK2=fluid-secret-two-91be
weed_shell "s3.configure -user=fluid -access_key=$AK2 -secret_key=$SK2 -apply" || die "weed shell: add key"
weed_shell "s3.configure -user=fluid -access_key=$AK1 -delete -apply" || die "weed shell: delete key"
ok=""
for _ in $(seq 1 40); do
  if ! s3_as "$AK1:$SK1" "$ENDPOINT/my-first-bucket/testfile" >/dev/null 2>&1 &&
    s3_as "$AK2:$SK2" "$ENDPOINT/my-first-bucket/testfile" >/dev/null 2>&1; then ok=1 && break; fi
  sleep 0.25
done
[ -n "$ok" ] || die "the server did not switch to the new keys"
write_secret "$SECRET_DIR" "$AK2" "$SK2"
printf 'written after the rotation\n' | s3 -T - "$ENDPOINT/my-first-bucket/after-rotation" >/dev/null
out=$(app demo-app3 ro,rslave "cat /data/after-rotation && sha256sum /data/data/large.bin") || die "app after rotation: $out"
grep -qx 'written after the rotation' <<<"$out" || die "after rotation: $out"
grep -q "^$large_sha " <<<"$out" || die "after rotation, sha256 differs: $out"
pass "old key rejected by the server, reads of new and old objects work, no restart"

begin "crash: podman kill -s KILL, then a new container from the same image"
podman run -d --name demo-app-long --network host -v "$TARGET:/data:ro,rslave" --entrypoint sleep "$IMAGE" 600 >/dev/null
podman kill -s KILL demo-fuse >/dev/null
podman wait demo-fuse >/dev/null 2>&1 || true
# `stat` may still answer from the kernel's attribute cache; a listing needs
# the (dead) FUSE server.
for _ in $(seq 1 50); do
  err=$(ls "$TARGET" 2>&1 || true)
  grep -q 'Transport endpoint is not connected' <<<"$err" && break
  sleep 0.1
done
grep -q 'Transport endpoint is not connected' <<<"$err" || die "after SIGKILL, ls $TARGET says: $err (want ENOTCONN)"
[ "$(mounts_at "$TARGET" | wc -l)" -eq 1 ] || die "after SIGKILL, want the one dead mount at $TARGET"
old_app=$(podman exec demo-app-long ls /data 2>&1 || true)
podman rm -f demo-fuse >/dev/null
fuse_run demo-fuse -e MOUNT_OPTIONS=ro
wait_probe demo-fuse
RESTART_TO_PROBE=$PROBE_SECS
n=$(mounts_at "$TARGET" | wc -l)
[ "$n" -eq 1 ] || die "$n mounts at $TARGET after the restart, want exactly 1: $(mounts_at "$TARGET")"
csi_check "$TARGET" || die "host mount check fails after the restart"
[ "$(cat "$TARGET/testfile")" = "hello from bucketfs" ] || die "testfile on the host after the restart"
out=$(app demo-app4 ro,rslave "sha256sum /data/data/large.bin") || die "app after restart: $out"
grep -q "^$large_sha " <<<"$out" || die "after restart, sha256 differs: $out"
podman rm -f -t 0 demo-app-long >/dev/null
pass "dead mount (ENOTCONN) cleaned, probe $RESTART_TO_PROBE s after podman run, exactly 1 mount, data ok; an app started before the crash saw: ${old_app//$'\n'/ }"

begin "preStop (umount targetPath in the container), then podman stop"
prestop demo-fuse
t_stop=$(now)
podman stop -t 30 demo-fuse >/dev/null || die "podman stop failed"
stop_secs=$(secs "$t_stop" "$(now)")
code=$(podman inspect --format '{{.State.ExitCode}}' demo-fuse)
[ "$code" = 0 ] || die "the FUSE container exited with $code: $(podman logs --tail 5 demo-fuse 2>&1)"
left=$(awk -v p="$PARENT" 'index($5, p) == 1 && $5 != p' /proc/self/mountinfo)
[ -z "$left" ] || die "mounts left on the host: $left"
pass "$PRESTOP; exit code 0, stop took $stop_secs s, no mount left under $PARENT"

begin "SIGTERM alone (no preStop): bucketfs as PID 1 unmounts and exits 0"
podman rm demo-fuse >/dev/null
fuse_run demo-fuse -e MOUNT_OPTIONS=ro
wait_probe demo-fuse
podman stop -t 30 demo-fuse >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' demo-fuse)
[ "$code" = 0 ] || die "after SIGTERM the FUSE container exited with $code"
[ -z "$(mounts_at "$TARGET")" ] || die "a mount is left at $TARGET after SIGTERM"
podman rm demo-fuse >/dev/null
pass "exit code 0, no mount left"

# ===========================================================================
# Sidecar mode: Dataset default/minio-rw, ReadWriteMany
# ===========================================================================
dataset minio-rw
write_secret "$SECRET_DIR" "$AK2" "$SK2"
write_config "$CONF_DIR" "$(config_json ReadWriteMany "$(mount_json rw-bucket minio)")"
mkdir -p "$work/check-mount"
cp "$ROOT/tests/data/check-mount.sh" "$work/check-mount/check-mount.sh"
chmod 0755 "$work/check-mount/check-mount.sh"

begin "sidecar FUSE container, postStart: Fluid's check-mount.sh"
fuse_run rw-fuse -v "$work/check-mount/check-mount.sh:/check-mount.sh:ro"
out=$(podman exec rw-fuse bash -c "time /check-mount.sh $PARENT bucketfs" 2>&1) || die "check-mount.sh failed: $out"
grep -qx mounted <<<"$out" || die "check-mount.sh: $out"
post_secs=$(secs "$T_RUN" "$(now)")
podman exec rw-fuse /usr/local/bin/bucketfs probe >/dev/null || die "probe in rw-fuse"
pass "check-mount.sh printed \"mounted\" ($post_secs s after podman run)"

begin "ReadWriteMany: the app writes a file; it is in the bucket when close() returns"
out=$(app rw-app rslave "cat /data/testfile && head -c 5242880 /dev/urandom > /data/written.bin && sha256sum /data/written.bin") ||
  die "app write failed: $out"
want=$(awk '/written.bin/ { print $1 }' <<<"$out")
[ -n "$want" ] || die "app: $out"
got=$(s3 "$ENDPOINT/rw-bucket/written.bin" | sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || die "the object in the bucket has sha256 $got, the app wrote $want"
pass "written.bin (5 MiB) in rw-bucket with the same sha256, read right after the app exited"

begin "Job completion: preStop umount exec'd by Fluid's app controller, the sidecar exits 0 by itself"
prestop rw-fuse
code=$(timeout 30 podman wait rw-fuse) || die "rw-fuse did not exit within 30 s after the umount"
[ "$code" = 0 ] || die "rw-fuse exited with $code"
[ -z "$(mounts_at "$TARGET")" ] || die "a mount is left at $TARGET"
podman rm rw-fuse >/dev/null
pass "$PRESTOP; exit code 0 without a signal, no mount left"

log "image $IMAGE $image_mb MB; podman run -> passing probe $RUN_TO_PROBE s (after a crash: $RESTART_TO_PROBE s)"
