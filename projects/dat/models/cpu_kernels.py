"""Optional C++ kernels of the fast attention path on CPU, compiled on first use.

``csrc/deformable_bias.cpp`` computes the deformable relative position bias (a 4-tap bilinear
read of the bias table for every query-key pair) and its gradient in one pass each, where the
PyTorch path needs gathers, scatter-adds and intermediate buffers; the same arithmetic in the
same order, so results and gradients agree with the PyTorch path to float32 round-off
(``tests/test_attention_fast.py``).

The module is built with ``torch.utils.cpp_extension`` (a C++ compiler and ninja) once per
torch version and checkout, and cached under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); ``make env`` builds it (``tools/check_env.py``). Where it
cannot be built, the fast path runs in PyTorch and one warning says why.
``DAT_CPU_KERNELS=0`` turns the kernels off (to compare).
"""
import hashlib
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
from mmengine.logging import print_log

SOURCE = Path(__file__).resolve().parents[1] / 'csrc' / 'deformable_bias.cpp'
ENV_SWITCH = 'DAT_CPU_KERNELS'

_loaded = {}


def extension_name() -> str:
    """Module name, per torch version (a build for another torch must never be loaded)."""
    return 'dat_cpu_kernels_torch_' + re.sub(r'\W', '_', torch.__version__)


def build_directory() -> Path:
    """Where the module is compiled and cached: one folder per checkout (its build file names
    the source's path, so two checkouts sharing a folder would rebuild each other's module)."""
    root = os.environ.get('TORCH_EXTENSIONS_DIR') or Path.home() / '.cache' / 'torch_extensions'
    checkout = hashlib.sha1(str(SOURCE).encode()).hexdigest()[:8]
    return Path(root) / f'{extension_name()}-{checkout}'


def build(verbose: bool = False):
    """Compile (when not cached yet) and import the kernels.

    Args:
        verbose (bool): Print the compiler's commands and output.

    Returns:
        module: The compiled extension.

    Raises:
        Exception: Whatever the compiler or the import raised.
    """
    # Importing cpp_extension on a machine without CUDA warns about CUDA_HOME: not our concern.
    cpp_logger = logging.getLogger('torch.utils.cpp_extension')
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load
    finally:
        cpp_logger.setLevel(level)

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    if shutil.which('ninja') is None:  # the venv's ninja, when the venv is not activated
        os.environ['PATH'] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')
    if not (directory / f'{extension_name()}.so').exists():
        print_log(f'DAT: compiling the C++ CPU kernels into {directory} (once per torch version, about 30 s)',
                  logger='current')
    # -fopenmp: at::parallel_for is inlined from the headers and uses OpenMP as torch does.
    return load(extension_name(), [str(SOURCE)], extra_cflags=['-O3', '-fopenmp'], extra_ldflags=['-fopenmp'],
                build_directory=str(directory), verbose=verbose)


def deformable_bias_kernels() -> Optional[object]:
    """The compiled kernels, or None when turned off (``DAT_CPU_KERNELS=0``) or not buildable."""
    if os.environ.get(ENV_SWITCH, '1') == '0':
        return None
    if 'module' not in _loaded:
        try:
            _loaded['module'] = build()
        except Exception as exc:  # no compiler, no ninja, read-only cache, ...
            _loaded['module'] = None
            print_log(f'DAT: the C++ CPU kernels are not available ({type(exc).__name__}: '
                      f'{str(exc).strip()[:500]}); the fast attention runs in PyTorch (slower on CPU, same numbers)',
                      logger='current', level=logging.WARNING)
    return _loaded['module']
