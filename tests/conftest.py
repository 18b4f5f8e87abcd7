"""Fixtures shared by the test modules."""

import os
import warnings

import pytest
import torch

from projects.dat.ops import cpu_kernels

# The devices that the tests comparing fast paths with the reference run on: CUDA where a GPU is
# visible (tools/gpu_check.sh selects those cases with `-k cuda`).
DEVICES = [
    'cpu',
    pytest.param(
        'cuda',
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason='CUDA is not available (tools/gpu_check.sh runs this case on a GPU)'
        ),
    ),
]


def _require_cpu_kernels():
    if os.environ.get(cpu_kernels.ENV_SWITCH) == '0':
        pytest.skip(f'{cpu_kernels.ENV_SWITCH}=0')
    # The project's environment has a compiler: unavailable kernels are a failure, not a skip.
    assert cpu_kernels.load_kernels() is not None, 'the C++ CPU kernels did not build (see the log)'


@pytest.fixture
def require_cpu_kernels():
    """A function to call where a test needs the C++ CPU kernels: it skips the test when they are
    turned off (``DAT_CPU_KERNELS=0``) and fails it when they did not build."""
    return _require_cpu_kernels


@pytest.fixture(params=DEVICES)
def device(request):
    """Each of :data:`DEVICES` as a ``torch.device``, for a test that takes ``device``.

    On CUDA, TF32 is off for the test (and restored after it): float32 matrix products and
    convolutions in TF32 keep 10 mantissa bits, so a fast path and the reference would differ by
    about 1e-3 instead of float32 round-off, which the comparisons' tolerances assume.
    """
    if request.param == 'cpu':
        yield torch.device('cpu')
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    with warnings.catch_warnings():  # newer torch may call these flags legacy (same meaning)
        warnings.simplefilter('ignore')
        saved = matmul.allow_tf32, cudnn.allow_tf32
        matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield torch.device('cuda')
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            matmul.allow_tf32, cudnn.allow_tf32 = saved
