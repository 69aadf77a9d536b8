#!/usr/bin/env bash
# Installs ONNX Runtime's shared library from its PyPI wheel (no other download source).
#
#   scripts/install-onnxruntime.sh [--gpu] [DEST]
#
# DEST defaults to .ort/lib in the repository; it ends up holding libonnxruntime.so (what
# ORT_DYLIB_PATH / model.runtime_library point at) and, with --gpu, the CUDA provider libraries
# from `onnxruntime-gpu` (CUDA 13 build). Re-running with the library present does nothing.
set -euo pipefail

ORT_VERSION="${ORT_VERSION:-1.31.1}"
package=onnxruntime
if [ "${1:-}" = "--gpu" ]; then
  package=onnxruntime-gpu
  shift
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/.ort/lib}"
marker="$dest/.installed-$package-$ORT_VERSION"

if [ -f "$marker" ] && [ -f "$dest/libonnxruntime.so" ]; then
  echo "ONNX Runtime $ORT_VERSION ($package) already in $dest"
  exit 0
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "Installing pip (needed to fetch the ONNX Runtime wheel from PyPI)..."
  if command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  else
    echo "error: python3 -m pip is missing; install pip and re-run" >&2
    exit 1
  fi
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "Downloading $package==$ORT_VERSION from PyPI..."
python3 -m pip download --quiet --no-deps --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --python-version 3.11 \
  --dest "$tmp" "$package==$ORT_VERSION"

mkdir -p "$dest"
python3 - "$tmp" "$dest" "$ORT_VERSION" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, dest, version = sys.argv[1:]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as zf:
    libs = [n for n in zf.namelist() if n.startswith("onnxruntime/capi/lib") and ".so" in n]
    for name in libs:
        target = os.path.join(dest, os.path.basename(name))
        with zf.open(name) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
        print("  " + os.path.basename(name))
main = os.path.join(dest, f"libonnxruntime.so.{version}")
link = os.path.join(dest, "libonnxruntime.so")
if os.path.lexists(link):
    os.remove(link)
os.symlink(os.path.basename(main), link)
PY
touch "$marker"
echo "ONNX Runtime $ORT_VERSION installed in $dest (libonnxruntime.so)"
