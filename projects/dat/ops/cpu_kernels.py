"""The optional C++ CPU kernels of the operators (float32), compiled on first use.

``csrc/deformable_attention.cpp`` computes deformable attention, ``q.k``, the relative position
bias (a 4-tap bilinear read of the bias table for every query-key pair) added on the fly, the
softmax and the product with ``v``, and backwards all its gradients, in one pass per query row
and head while a block of queries' logits is in the cache (its matrix products through torch's
CPU BLAS), where the PyTorch path needs chunk-sized products, gathers, scatter-adds,
intermediate buffers and several passes. ``csrc/neighborhood_attention.cpp``
computes neighbourhood attention and its gradient window by window (exactly the ``k x k`` keys
of each query, where the PyTorch path computes whole tile regions and masks them).
``csrc/depthwise_conv_gelu.cpp`` computes ConvFFN's hidden layer ``GELU(y + DWConv(y))`` in one
pass over memory, forward and backward, in 16-lane AVX-512 vectors where torch runs AVX-512
(:func:`simd_flags`); it runs in the AVX2 and AVX-512 builds, while the baseline build leaves the
layer to oneDNN and PyTorch, which were the faster there (:mod:`~projects.dat.ops.convffn`).
``csrc/key_sampling.cpp`` reads the deformable blocks' keys bilinearly from channels-last maps in
place, and writes the gradient there (:mod:`~projects.dat.ops.key_sampling`).
``csrc/vector_math.h`` holds the float32 helpers (``exp``, sums, dot products) that the compiler
vectorises. They agree with the PyTorch paths to float32 round-off
(``tests/test_attention_fast.py``, ``tests/test_layers.py``); which one runs is decided by
:func:`projects.dat.ops.dispatch.select_backend`.

The module is built with ``torch.utils.cpp_extension`` (a C++ compiler and ninja) once per
torch version, instruction set (:func:`simd_flags`) and checkout, and cached under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); ``make env`` builds it
(``tools/check_env.py``). Where it cannot be built, the operators run in PyTorch and one warning
says why.
``DAT_CPU_KERNELS=0`` turns the kernels off (to compare).
"""

import contextlib
import hashlib
import logging
import os
import re
import sys
from pathlib import Path

import torch
from mmengine.logging import print_log

SOURCE_DIR = Path(__file__).resolve().parents[1] / 'csrc'
ENV_SWITCH = 'DAT_CPU_KERNELS'

_loaded = {}


def simd_flags() -> tuple[str, list[str]]:
    """The instruction set the kernels are compiled for, and its compiler flags: AVX2 with FMA
    where torch's own CPU kernels run with AVX2, the same and ConvFFN's hidden-layer kernel in
    AVX-512 (``DAT_AVX512``, ``csrc/depthwise_conv_gelu.cpp``) where they run with AVX-512
    (``ATEN_CPU_CAPABILITY`` lowers both), else the compiler's baseline. Not ``-march=native``: a
    cache folder may be shared by machines of several CPU types, and each capability gets its own
    module name. A torch without ``torch.backends.cpu.get_cpu_capability`` (2.0) gets the
    baseline."""
    get_capability = getattr(getattr(torch.backends, 'cpu', None), 'get_cpu_capability', None)
    capability = get_capability() if get_capability is not None else None
    if capability == 'AVX512':
        return 'avx512', ['-mavx2', '-mfma', '-DDAT_AVX512']
    if capability == 'AVX2':
        return 'avx2', ['-mavx2', '-mfma']
    return 'baseline', []


def extension_name() -> str:
    """Module name, per torch version and instruction set (a build for another torch or CPU
    must never be loaded)."""
    torch_version = re.sub(r'\W', '_', torch.__version__)
    return f'dat_cpu_kernels_torch_{torch_version}_{simd_flags()[0]}'


def build_directory() -> Path:
    """Where the module is compiled and cached: one folder per checkout (its build file names
    the sources' paths, so two checkouts sharing a folder would rebuild each other's module)."""
    root = os.environ.get('TORCH_EXTENSIONS_DIR') or Path.home() / '.cache' / 'torch_extensions'
    checkout = hashlib.sha1(str(SOURCE_DIR).encode()).hexdigest()[:8]
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
    if not (directory / f'{extension_name()}.so').exists():
        print_log(
            f'DAT: compiling the C++ CPU kernels into {directory} (once per torch version, about 25 s on 2 cores)',
            logger='current',
        )
    # -fopenmp: at::parallel_for is inlined from the headers and uses OpenMP as torch does.
    # -fno-trapping-math: lets the compiler vectorise the clamps of exp_approx (branch-free).
    sources = sorted(str(path) for path in SOURCE_DIR.glob('*.cpp'))
    with _environment_ninja_first():
        return load(
            extension_name(),
            sources,
            extra_cflags=['-O3', '-fopenmp', '-fno-trapping-math', *simd_flags()[1]],
            extra_ldflags=['-fopenmp'],
            build_directory=str(directory),
            verbose=verbose,
        )


@contextlib.contextmanager
def _environment_ninja_first():
    """Put the ninja of this Python environment (beside ``sys.executable``, where pip installs
    it) first on ``PATH`` while the kernels build, and restore ``PATH`` after.

    One build folder must always see the same ninja: ninja 1.13 hashes the commands in its log
    differently from earlier versions, so a system ninja 1.11 and the environment's 1.13, taking
    turns (an activated environment or not, a script that prepends its ``bin``), each find the
    other's log stale and recompile every source.
    """
    scripts = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(scripts, 'ninja')):
        yield
        return
    saved = os.environ.get('PATH')
    os.environ['PATH'] = scripts + os.pathsep + (saved or '')
    try:
        yield
    finally:
        if saved is None:
            del os.environ['PATH']
        else:
            os.environ['PATH'] = saved


def load_kernels() -> object | None:
    """The compiled kernels, or None when turned off (``DAT_CPU_KERNELS=0``) or not buildable."""
    if os.environ.get(ENV_SWITCH, '1') == '0':
        return None
    if 'module' not in _loaded:
        try:
            _loaded['module'] = build()
        except Exception as exc:  # no compiler, no ninja, read-only cache, ...
            _loaded['module'] = None
            print_log(
                f'DAT: the C++ CPU kernels are not available ({type(exc).__name__}: '
                f'{str(exc).strip()[:500]}); the fast attention runs in PyTorch (slower on CPU, same numbers)',
                logger='current',
                level=logging.WARNING,
            )
    return _loaded['module']


def required_kernels(operator: str, fallback: str) -> object:
    """The compiled kernels, for an operator that computes with them.

    Args:
        operator (str): What needs them, for the error (``'dat::sample_keys'``).
        fallback (str): What the operator's public entry does instead, for the error.

    Returns:
        module: The compiled extension.

    Raises:
        RuntimeError: Where the kernels are turned off or could not be built.
    """
    kernels = load_kernels()
    if kernels is None:
        raise RuntimeError(
            f'{operator} needs the C++ CPU kernels, which are turned off ({ENV_SWITCH}=0) or could not be '
            f'built (see the log); {fallback}'
        )
    return kernels


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """The ``(B, H, W, C)`` view of a ``(B, C, H, W)`` map, the kernels' layout (contiguous where
    the map is channels-last)."""
    return x.permute(0, 2, 3, 1)
