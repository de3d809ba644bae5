#!/usr/bin/env bash
# Pack what `python -m bench gpu` needs on an air-gapped GPU host that has only a Python 3.12
# with CUDA torch, numpy and CuPy: the pure-Python wheels the pipeline imports, and the parts of
# the nvidia-pytriton wheel that run a Triton server (the server, its libraries, the Python
# backend and the backend stub for that Python), xz-compressed to about half the wheel.
# Usage: bench/gpu_prepare.sh [DIR]   (default .whl; bench/gpu_run.sh reads it there)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.whl}"
py="${PYTHON_TAG:-3.12}"
mkdir -p "$out"
download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$out" "$@"
}
# The versions this project is tested with (pyproject.toml); CuPy, scipy, grpcio and protobuf
# are expected on the host.
download monai==1.6.1 nibabel==5.4.2 tritonclient==2.73.0 python-rapidjson==1.25
if [ ! -f "$out/pytriton-server.tar.xz" ]; then
  tmp="$(mktemp -d)"
  download -d "$tmp" nvidia-pytriton==0.7.0
  (cd "$tmp" && python3 -m zipfile -e nvidia_pytriton-*.whl unpacked && cd unpacked \
    && rm -f nvidia_pytriton.libs/libpython3* \
    && find pytriton/tritonserver/python_backend_stubs -mindepth 1 -maxdepth 1 ! -name "$py" \
       -exec rm -r {} + \
    && tar -cJf pytriton-server.tar.xz pytriton/__init__.py pytriton/tritonserver/bin \
       pytriton/tritonserver/backends/python pytriton/tritonserver/python_backend_stubs \
       nvidia_pytriton.libs)
  mv "$tmp/unpacked/pytriton-server.tar.xz" "$out/"
  rm -rf "$tmp"
fi
du -sh "$out"
