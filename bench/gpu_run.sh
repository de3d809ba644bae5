#!/usr/bin/env bash
# Run `python -m bench gpu` on a GPU host prepared by bench/gpu_prepare.sh: the packed wheels
# and server are unpacked under /tmp/dicom-node-bench (nothing is installed system-wide),
# the figures are printed and, with RESULTS_DIR, copied there with the full log.
# Usage: [WHEELS=DIR] bench/gpu_run.sh [RESULTS_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
results="${1:-}"
wheels="${WHEELS:-.whl}"
site=/tmp/dicom-node-bench/site
mkdir -p "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" "$wheels"/*.whl || exit 1
tar -xJf "$wheels"/pytriton-server.tar.xz -C "$site" || exit 1
chmod +x "$site"/pytriton/tritonserver/bin/tritonserver \
  "$site"/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -m bench gpu 2>&1 | tee /tmp/dicom-node-bench/bench-gpu.log
status=${PIPESTATUS[0]}
if [ -n "$results" ]; then
  mkdir -p "$results"
  cp /tmp/dicom-node-bench/bench-gpu.log bench/results/latest.json "$results"/ 2>/dev/null
  for f in /tmp/bench-gpu-triton-*/server/tritonserver.log; do
    [ -f "$f" ] && cp "$f" "$results"/
  done
fi
exit "$status"
