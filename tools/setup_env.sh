#!/usr/bin/env bash
# Create or update this project's Python environment in <repo>/.venv (called by `make env`).
#
# Idempotent: when the environment was built from the current requirements/*.txt, setup.py and
# installer files (a hash kept in .venv/.dat-setup-env.stamp) and a quick import check passes,
# a run only says "up to date" and takes seconds. An existing .venv is adopted: every step skips
# what is already satisfied.
#
# Steps: venv (python3.11) -> build tools + torch -> mmcv 2.1.0 with compiled ops -> OpenMMLab
# stack and test tools -> `pip install -e .` -> tools/check_env.py proves the stack works.
# Every version comes from requirements/constraints.txt (the tested set), passed to every pip call.
#
# Usage: bash tools/setup_env.sh [--check] [--force]
#   --check   only report: exit 0 when up to date, 3 when an install is needed (installs nothing)
#   --force   ignore the stamp and run every step (each still skips what is satisfied)
#
# Environment variables:
#   PYTHON          interpreter that creates the venv (default: python3.11)
#   DAT_WHEELS_DIR  folder of prebuilt wheels passed to pip as --find-links
#                   (default: <repo>/../shared/wheels when it exists)
#   DAT_WHEEL_CACHE where an mmcv wheel built from source is kept for later venvs
#                   (default: ~/.cache/dat-wheels)
#   FORCE_CUDA=1    build mmcv with CUDA ops (needs nvcc); the CPU-only wheel in the default
#                   wheels folder is then not used
#   MAX_JOBS        parallel compile jobs for mmcv (default: all cores)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
VPY="$VENV/bin/python"
STAMP="$VENV/.dat-setup-env.stamp"
CONSTRAINTS="$REPO/requirements/constraints.txt"
PYTHON="${PYTHON:-python3.11}"
FORCE_CUDA="${FORCE_CUDA:-0}"
# mmcv is installed on its own (step 3), at the version the constraints pin.
MMCV_VERSION="$(sed -n 's/^mmcv==\([^[:space:]#]*\).*/\1/p' "$CONSTRAINTS")"

MODE=install
for arg in "$@"; do
  case "$arg" in
    --check) MODE=check ;;
    --force) MODE=force ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup_env.sh: unknown argument '$arg' (expected --check, --force or --help)" >&2
       exit 2 ;;
  esac
done

T0=$SECONDS
log() { printf '[setup_env %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[setup_env %s] ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2; exit 1; }
[[ -n "$MMCV_VERSION" ]] || die "no 'mmcv==<version>' line in $CONSTRAINTS"

# pip with our constraints; drops the per-package notices of this machine's pip config about
# absent local index folders, and "already satisfied" lines, so that real work stays visible.
pip_install() {
  { "$VPY" -m pip install --disable-pip-version-check --progress-bar off \
      -c "$CONSTRAINTS" "$@"; } 2>&1 \
    | { grep -v -e "^WARNING: Location 'file://" -e '^Requirement already satisfied' || true; }
}

# Hash of everything that defines the environment.
env_hash() {
  {
    cat "$REPO/tools/setup_env.sh" "$REPO/tools/check_env.py" "$REPO/setup.py"
    for f in "$REPO"/requirements/*.txt; do echo "== $f"; cat "$f"; done
    echo "venv=$VENV force_cuda=$FORCE_CUDA"
  } | sha256sum | cut -d' ' -f1
}

quick_check() {  # from / so that only the installed package can satisfy it
  (cd / && "$VPY" "$REPO/tools/check_env.py" --quick)
}

# One installer at a time per venv (two `make test` at once would otherwise both pip install).
LOCK="${TMPDIR:-/tmp}/dat-setup-env-$(printf '%s' "$VENV" | sha256sum | cut -c1-16).lock"
exec 9>"$LOCK"
if ! flock -n 9; then
  log "another setup_env.sh is working on $VENV; waiting for it"
  flock 9
fi

HASH="$(env_hash)"
if [[ "$MODE" != force && -x "$VPY" && -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
  if OUT="$(quick_check 2>&1)"; then
    log "environment $VENV is up to date ($((SECONDS - T0)) s)"
    exit 0
  fi
  printf '%s\n' "$OUT"
  log "the stamp matches but the quick check failed: repairing"
fi
if [[ "$MODE" == check ]]; then
  log "environment $VENV needs to be (re)built: run 'make env' (bash tools/setup_env.sh)"
  exit 3
fi
rm -f "$STAMP"

# ---------------------------------------------------------------------------------------------
log "step 1/6: virtual environment $VENV"
if [[ -x "$VPY" ]]; then
  log "reusing the existing virtual environment"
else
  command -v "$PYTHON" >/dev/null \
    || die "'$PYTHON' not found: install Python 3.11 or set PYTHON=/path/to/python3.11"
  "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv $VENV' failed"
fi
PYVER="$("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[[ "$PYVER" == 3.11 ]] || die "$VENV runs Python $PYVER, but the pinned stack (and the prebuilt \
mmcv wheel) is for Python 3.11: remove $VENV and re-run with PYTHON=python3.11"

# ---------------------------------------------------------------------------------------------
log "step 2/6: build tools and torch (requirements/build.txt; a fresh torch is ~2.5 GB)"
pip_install -r "$REPO/requirements/build.txt" || die "installing requirements/build.txt failed"
SETUPTOOLS_OK='import importlib.metadata as m, sys
from packaging.version import Version as V
v = m.version("setuptools"); print(v); sys.exit(not V("77.0.3") <= V(v) < V("82"))'
"$VPY" -c "$SETUPTOOLS_OK" >/dev/null \
  || die "setuptools $("$VPY" -c "$SETUPTOOLS_OK" || true) is outside >=77.0.3,<82"
TORCH="$("$VPY" -c 'import torch; print(torch.__version__)')" \
  || die "torch does not import after installing it"
log "torch $TORCH"

# ---------------------------------------------------------------------------------------------
log "step 3/6: mmcv $MMCV_VERSION with compiled ops (FORCE_CUDA=$FORCE_CUDA)"
MMCV_ERR=""
mmcv_works() {  # sets MMCV_ERR to the reason when it fails
  MMCV_ERR="$("$VPY" - "$MMCV_VERSION" "$FORCE_CUDA" 2>&1 >/dev/null <<'EOF'
import importlib.metadata as m, sys
try:
    version = m.version('mmcv')
except m.PackageNotFoundError:
    sys.exit('mmcv is not installed')
if version != sys.argv[1]:
    sys.exit(f'mmcv {version} is installed, want {sys.argv[1]}')
import mmcv._ext  # noqa: F401  (the compiled ops)
from mmcv.ops import get_compiling_cuda_version
if sys.argv[2] == '1' and get_compiling_cuda_version() == 'not available':
    sys.exit('FORCE_CUDA=1 but the installed mmcv has no CUDA ops')
EOF
)" && return 0
  MMCV_ERR="$(printf '%s\n' "$MMCV_ERR" | grep -v '^\s*$' | tail -n 1)"
  return 1
}

# Install mmcv from wheel folders only (--only-binary mmcv), its dependencies from the index.
# A broken or wrong mmcv is removed first, so that no --force-reinstall touches its dependencies.
install_mmcv_wheel() {
  local links=() d
  for d in "$@"; do links+=(--find-links "$d"); done
  "$VPY" -m pip uninstall -y -q mmcv mmcv-lite >/dev/null 2>&1 || true
  pip_install --no-build-isolation --only-binary mmcv "${links[@]}" "mmcv==$MMCV_VERSION"
}

# Folders of prebuilt wheels. The shared default holds a CPU-only build, so FORCE_CUDA=1 ignores
# it; a folder named in DAT_WHEELS_DIR is always used. Our own cache is keyed by torch and CUDA.
WHEEL_DIRS=()
if [[ -n "${DAT_WHEELS_DIR:-}" ]]; then
  [[ -d "$DAT_WHEELS_DIR" ]] || die "DAT_WHEELS_DIR=$DAT_WHEELS_DIR is not a folder"
  WHEEL_DIRS+=("$(cd "$DAT_WHEELS_DIR" && pwd)")
elif [[ -d "$REPO/../shared/wheels" && "$FORCE_CUDA" != 1 ]]; then
  WHEEL_DIRS+=("$(cd "$REPO/../shared/wheels" && pwd)")
fi
CACHE="${DAT_WHEEL_CACHE:-$HOME/.cache/dat-wheels}/torch-$TORCH-cuda$FORCE_CUDA"
[[ -d "$CACHE" ]] && WHEEL_DIRS+=("$CACHE")

build_mmcv_from_source() {
  local jobs="${MAX_JOBS:-$(nproc)}" tmp std src
  log "building mmcv $MMCV_VERSION from source with MAX_JOBS=$jobs:" \
      "this takes 30-60 minutes on 2 cores (a prebuilt wheel in DAT_WHEELS_DIR skips it)"
  tmp="$(mktemp -d)"
  src="$tmp/mmcv-$MMCV_VERSION"
  { "$VPY" -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
      "mmcv==$MMCV_VERSION" -d "$tmp"; } 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }
  [[ -f "$src.tar.gz" ]] || die "could not download the mmcv $MMCV_VERSION source release"
  tar xzf "$src.tar.gz" -C "$tmp" || die "could not unpack $src.tar.gz"
  # mmcv's setup.py asks for C++17; newer torch headers need the standard that torch's own
  # extension builder uses (C++20 for torch 2.14).
  std="$("$VPY" - <<'EOF'
import inspect, re
import torch.utils.cpp_extension as ext
print(max(int(n) for n in re.findall(r"c\+\+(\d\d)'", inspect.getsource(ext))))
EOF
)" || die "could not read the C++ standard of torch's extension builder"
  grep -q "'-std=c++17'" "$src/setup.py" \
    || die "mmcv's setup.py has no '-std=c++17' flag to raise; the source release changed?"
  if (( std > 17 )); then
    log "torch $TORCH compiles extensions with C++$std: raising mmcv's -std=c++17"
    sed -i "s/'-std=c++17'/'-std=c++$std'/g" "$src/setup.py"
  fi
  mkdir -p "$CACHE"
  { MMCV_WITH_OPS=1 FORCE_CUDA="$FORCE_CUDA" MAX_JOBS="$jobs" "$VPY" -m pip wheel \
      --disable-pip-version-check --no-build-isolation --no-deps -w "$CACHE" "$src"; } 2>&1 \
    | { grep -v "^WARNING: Location 'file://" || true; } \
    || die "building mmcv $MMCV_VERSION failed (see the compiler output above)"
  rm -rf "$tmp"
  log "built wheel kept in $CACHE for later environments"
  install_mmcv_wheel "$CACHE" || die "installing the built mmcv wheel failed"
}

if mmcv_works; then
  log "mmcv $MMCV_VERSION with compiled ops is already installed"
else
  log "mmcv needs installing: $MMCV_ERR"
  installed=0
  if (( ${#WHEEL_DIRS[@]} )); then
    log "looking for a prebuilt mmcv wheel in: ${WHEEL_DIRS[*]}"
    if install_mmcv_wheel "${WHEEL_DIRS[@]}" && mmcv_works; then
      installed=1
      log "installed the prebuilt mmcv wheel"
    else
      log "no working prebuilt mmcv $MMCV_VERSION wheel there for torch $TORCH${MMCV_ERR:+ ($MMCV_ERR)}"
    fi
  fi
  (( installed )) || build_mmcv_from_source
  mmcv_works || die "mmcv $MMCV_VERSION is installed but does not work: $MMCV_ERR"
fi

# ---------------------------------------------------------------------------------------------
log "step 4/6: OpenMMLab stack and test tools (requirements/mminstall.txt, runtime.txt, tests.txt)"
pip_install -r "$REPO/requirements/mminstall.txt" -r "$REPO/requirements/runtime.txt" \
  -r "$REPO/requirements/tests.txt" || die "installing the OpenMMLab stack failed"

# ---------------------------------------------------------------------------------------------
log "step 5/6: this repository in editable mode (pip install -e . --no-deps --no-build-isolation)"
pip_install -e "$REPO" --no-deps --no-build-isolation >/dev/null \
  || die "the editable install of $REPO failed"

# ---------------------------------------------------------------------------------------------
log "step 6/6: checking the stack (tools/check_env.py)"
(cd / && "$VPY" "$REPO/tools/check_env.py") \
  || die "the environment check failed: the FAIL lines above name the broken part"

env_hash > "$STAMP"
log "done: $VENV is ready ($((SECONDS - T0)) s); use $VPY"
