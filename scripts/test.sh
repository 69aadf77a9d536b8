#!/usr/bin/env bash
# The full test suite on a fresh Debian/Ubuntu machine with the Rust toolchain: installs what the
# tests need (each step says what it does and is skipped when already done), then runs them.
# Tests start their own redis-server and Kafka-protocol broker (tansu) on free local ports;
# RESCORER_TEST_KAFKA=host:port runs the same suite against an existing Kafka cluster instead.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || missing+=(python3-venv)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v cc >/dev/null 2>&1 || missing+=(gcc g++)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> system packages: ${missing[*]} (redis-server for tests, promtool and docker-compose to check deploy/, OpenSSL headers for TLS)"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "==> system packages: present"
fi

echo "==> ONNX Runtime shared library (PyPI wheel onnxruntime)"
scripts/install-onnxruntime.sh

if [ ! -x .tools/bin/kubernetes-validate ]; then
  echo "==> kubernetes-validate (PyPI) in .tools/, to check deploy/k8s against the Kubernetes schemas"
  python3 -m venv .tools
  .tools/bin/pip install -q kubernetes-validate==1.37.0
else
  echo "==> kubernetes-validate present"
fi

# The tests' broker: tansu with its memory engine (fast; most tests) and its SQLite engine (cargo
# feature libsql; the crash, restart and rebalance tests: the memory engine of 0.6.0 loses the
# rest of a record batch a consumer resumes inside). Installed into .tools/tansu, where
# tests/common/services.rs looks first, so an older memory-only tansu on PATH is never used.
if [ -n "${RESCORER_TEST_KAFKA:-}" ]; then
  echo "==> Kafka-protocol broker for tests: external $RESCORER_TEST_KAFKA"
elif [ -x .tools/tansu/bin/tansu ]; then
  echo "==> Kafka-protocol broker for tests: tansu (memory and SQLite engines) present in .tools/tansu"
else
  echo "==> Kafka-protocol broker for tests: cargo install tansu 0.6.0 with the memory and SQLite engines into .tools/tansu (one time, several minutes)"
  cargo install tansu --version 0.6.0 --locked --features dynostore,libsql --debug --root .tools/tansu
fi
echo "==> cargo test"
cargo test --locked "$@"
# The central guarantee's tests again with owned state (state.mode = "owned"), but for the two on
# the backlog catch-up lane, which only the remote-state loop has (see docs/state.md).
if [ $# -eq 0 ]; then
  echo "==> cargo test --test worker_guarantees, owned state"
  RESCORER_TEST_STATE_MODE=owned cargo test --locked --test worker_guarantees -- \
    --skip a_backlog_drains_behind_live_events --skip messages_read_already_behind
fi
