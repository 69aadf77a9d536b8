#!/usr/bin/env bash
# The zero-setup first run on a fresh Debian/Ubuntu machine with the Rust toolchain: installs
# redis-server and the ONNX Runtime library if missing, then runs `rescorer demo` (embedded
# Kafka-protocol broker, local redis-server, synthetic traffic, live progress). Extra arguments go
# to the demo, e.g. scripts/demo.sh --seconds 60 --rate 5000.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v cc >/dev/null 2>&1 || missing+=(gcc g++)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing system packages: ${missing[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "==> ONNX Runtime shared library (PyPI wheel onnxruntime)"
scripts/install-onnxruntime.sh

echo "==> building rescorer (release) and running the demo"
cargo run --release --locked -- demo "$@"
