#!/usr/bin/env bash
# The GPU check of this repository (issue 19), one command on a machine with one NVIDIA GPU:
#
#   bash tools/gpu_check.sh                            # writes $OUT/gpu_check.json (else work_dirs/gpu_check/)
#   bash tools/gpu_check.sh --device cpu --no-install  # the dry run: the same steps, small, on CPU
#
# First run on a GPU (one H200) on 2026-12-04; results in docs/benchmarks.md. Steps added since
# (the profile) have run on CPU only.
#
# The GPU machine it is written for has Python 3.12 with a CUDA torch, numpy, onnx, onnxruntime,
# timm and psutil, no OpenMMLab package and no network. What it lacks travels as wheels in .whl/
# (git-ignored; `make gpu-wheels` makes them): mmengine, mmdet, mmcv 2.1.0 without its compiled
# ops (mmcv-lite) and their imports. This script installs them into /tmp/site, puts that and this
# checkout on PYTHONPATH, and runs tools/gpu_check.py (its docstring lists the steps; other
# arguments go to it: --device, --out, --budget-s). --no-install skips the install (an
# environment that has everything, such as this repository's .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
install=1
args=()
for arg in "$@"; do
  if [[ "$arg" == --no-install ]]; then install=0; else args+=("$arg"); fi
done

if (( install )) && compgen -G '.whl/*.whl' > /dev/null; then
  echo "[gpu_check] installing the $(ls .whl/*.whl | wc -l) wheels of .whl/ into /tmp/site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  (( install )) && echo "[gpu_check] no wheels in .whl/: nothing to install"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" tools/gpu_check.py "${args[@]}"
