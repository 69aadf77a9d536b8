#!/usr/bin/env bash
# The full test suite on a fresh Debian/Ubuntu machine with the Rust toolchain: installs what the
# tests need (each step says what it does and is skipped when already done), then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> ONNX Runtime shared library (PyPI wheel onnxruntime)"
scripts/install-onnxruntime.sh

echo "==> cargo test"
cargo test --locked "$@"
