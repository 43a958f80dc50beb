#!/usr/bin/env bash
# The GPU check in one command, from the project root of a bare GPU machine (issue 16):
#
#   bench/gpu_wheels.sh                  # once, where PyPI is reachable: the wheels the GPU machine lacks
#   bench/gpu_check.sh                   # on the GPU machine (carry .whl/): everything, under a hard budget
#   bench/gpu_check.sh --tiny            # the same steps at tiny size on the CPU (tests/test_gpu_check.py)
#
# Writes to $OUT when set, else gpu-out/: gpu_check.json (every figure), gpu_check.md (ready for
# BENCHMARKS.md), gpu_check.log (every command's output). Flags after the first go to bench/gpu_check.py
# (--help lists them: --only, --budget, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
start=$(date +%s)
if ! "$PY" -c "import refseg.extract, refseg.heads, diffusers, zarr, pycocotools, tensorstore" 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "error: refseg's dependencies are missing and there is no .whl/ (run bench/gpu_wheels.sh first)" >&2
    exit 2
  fi
  site=$(mktemp -d)
  # the wheels and refseg itself (built by this machine's setuptools) in ONE call: a second
  # `pip install --target` into the same folder skips whatever already exists there, bin/ included,
  # which left refseg's console scripts off PATH (torchrun could not find refseg-train-head)
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --target "$site" .whl/*.whl . || exit 2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
fi
export GPU_CHECK_INSTALL_SECONDS=$(( $(date +%s) - start ))
exec "$PY" bench/gpu_check.py "$@"
