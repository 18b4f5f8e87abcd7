#!/usr/bin/env bash
# The wheels that tools/gpu_check.sh installs on the GPU machine, into .whl/ (git-ignored):
# what `import projects.dat`, tools/analysis_tools/benchmark.py and mmdet need there and that
# machine lacks (it has Python 3.12 with a CUDA torch, numpy, onnx, onnxruntime, timm, psutil,
# matplotlib, scipy, opencv-python-headless, rich, pyyaml; no OpenMMLab package; no network).
#
#   make gpu-wheels        # or: bash tools/gpu_wheels.sh
#
# Needs PyPI and this repository's .venv (PYTHON=... for another Python with setuptools < 82 and
# wheel, which build mmcv). mmcv 2.1.0 comes without its compiled ops (MMCV_WITH_OPS=0: the
# distribution is then called mmcv-lite, the package is mmcv): its ops would have to be built
# for that machine's torch and CUDA, which takes longer than the check may run. mmdet's models
# import those ops, so there the benchmark's Swin-T is timm's and the detector steps skip.
# Fails where .whl/ holds wheels of other versions (two versions of one package stop the
# install there) or the wheels together exceed GPU_WHEELS_LIMIT_MIB (50): the whole working tree
# that travels to that machine may hold 64 MiB.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
DEST=.whl
LIMIT_MIB="${GPU_WHEELS_LIMIT_MIB:-50}"
# Pure Python. yapf needs platformdirs; mmdet's datasets and evaluation need the rest.
PURE=(mmengine==0.10.7 mmdet==3.3.0 addict==2.4.0 yapf==0.43.0 platformdirs==4.14.9 termcolor==3.3.0
      terminaltables==3.1.10)
# Compiled: for CPython 3.12 on x86-64 Linux.
BINARY=(pycocotools==2.0.11 shapely==2.2.0)
MMCV=2.1.0

mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$DEST" \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "${PURE[@]}" "${BINARY[@]}"

if ! compgen -G "$DEST/mmcv_lite-$MMCV-*.whl" > /dev/null; then
  src="$(mktemp -d)"
  trap 'rm -rf "$src"' EXIT
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$src" "mmcv==$MMCV"
  tar xzf "$src/mmcv-$MMCV.tar.gz" -C "$src"
  MMCV_WITH_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$src/mmcv-$MMCV"
fi

# Exactly the pinned wheels: one version of each package.
expected=("${PURE[@]}" "${BINARY[@]}" "mmcv_lite==$MMCV")
status=0
for wheel in "$DEST"/*.whl; do
  file="$(basename "$wheel")"  # NAME-VERSION-TAGS.whl
  pin="$(cut -d- -f1 <<< "$file" | tr '[:upper:]' '[:lower:]')==$(cut -d- -f2 <<< "$file")"
  if [[ " ${expected[*]} " != *" $pin "* ]]; then
    echo "gpu_wheels: $wheel is not one of the pinned wheels (${expected[*]}); remove it" >&2
    status=1
  fi
done
count="$(ls "$DEST"/*.whl | wc -l)"
if (( count != ${#expected[@]} )); then
  echo "gpu_wheels: expected ${#expected[@]} wheels in $DEST/, found $count" >&2
  status=1
fi
total="$(du -cb "$DEST"/*.whl | tail -n 1 | cut -f1)"
ls -l "$DEST"
echo "gpu_wheels: $count wheels, $((total / 1024)) KiB in $DEST/ (limit $LIMIT_MIB MiB)"
if (( total > LIMIT_MIB * 1024 * 1024 )); then
  echo "gpu_wheels: the wheels exceed $LIMIT_MIB MiB" >&2
  status=1
fi
exit "$status"
