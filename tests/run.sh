#!/usr/bin/env bash
# Runs every test of pier: unit, integration (fake upstream) and end-to-end (real registry, real
# clients). Installs the Debian packages the end-to-end tests use when they are missing, so that it
# passes by itself on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# program -> Debian package
declare -A packages=(
  [docker-registry]=docker-registry
  [skopeo]=skopeo
  [promtool]=prometheus
  [dockerd]=docker.io
  [containerd]=containerd
  [podman]=podman
)
missing=()
for program in "${!packages[@]}"; do
  command -v "$program" >/dev/null 2>&1 || missing+=("${packages[$program]}")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# With the packages in place, a test whose real component is missing must fail, not skip.
export CI=true
cargo test --workspace --all-targets
