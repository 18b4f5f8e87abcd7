"""Fixtures shared by the test modules."""
import os

import pytest

from projects.dat.ops import cpu_kernels


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
