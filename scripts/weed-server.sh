# Sourced by the benchmark scripts: `weed_server DIR` starts SeaweedFS with
# its S3 gateway on 127.0.0.1 (free ports, data under DIR, the keys $AK and
# $SK, SeaweedFS's Prometheus metrics on), waits until it answers and
# creates $BUCKET. Sets ENDPOINT, weed_pid and P, the ports: P[6] is S3,
# P[8] SeaweedFS's metrics, P[9] free for the caller. `s3` is curl, signed.
# The flags are those of tests/common/mod.rs.
source "$(dirname "${BASH_SOURCE[0]}")/weed-path.sh"

s3() { curl -sf --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AK:$SK" "$@"; }

weed_server() {
  local dir="$1"
  read -r -a P <<<"$(python3 -c '
import socket
ss=[socket.socket() for _ in range(10)]
for s in ss: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in ss))')"
  ENDPOINT="http://127.0.0.1:${P[6]}"
  mkdir -p "$dir/data"
  cat >"$dir/s3.json" <<JSON
{"identities":[{"name":"admin","credentials":[{"accessKey":"$AK","secretKey":"$SK"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
  "$WEED" server -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.port="${P[0]}" -master.port.grpc="${P[1]}" -volume.port="${P[2]}" -volume.port.grpc="${P[3]}" \
    -filer.port="${P[4]}" -filer.port.grpc="${P[5]}" -s3 -s3.port="${P[6]}" -s3.port.grpc="${P[7]}" \
    -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$dir/s3.json" \
    -metricsIp=127.0.0.1 -metricsPort="${P[8]}" \
    -volume.max=500 -master.volumeSizeLimitMB=512 >"$dir/weed.log" 2>&1 &
  weed_pid=$!
  for _ in $(seq 1 180); do s3 "$ENDPOINT/" >/dev/null 2>&1 && break; sleep 0.5; done
  s3 "$ENDPOINT/" >/dev/null || { echo "SeaweedFS did not start; log:" >&2; tail -20 "$dir/weed.log" >&2; return 1; }
  s3 -X PUT "$ENDPOINT/$BUCKET" >/dev/null
}
