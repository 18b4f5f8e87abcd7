"""The C++ kernels built for the compiler's baseline instruction set (no AVX2, no FMA).

That build is what a CPU without AVX2 runs (``cpu_kernels.simd_flags``), with the portable code
of ``csrc/vector_math.h`` (plain loops where the AVX2 build has shuffles and min / max
instructions) and without fused multiply-adds, so its sums round differently. The rest of the
suite runs the AVX2 build; this test runs the tests of ``tests/test_attention_fast.py`` and
``tests/test_layers.py`` (but the Triton interpreter's) again in a process where torch's CPU
capability is ``DEFAULT`` (``ATEN_CPU_CAPABILITY=default``), in which the baseline module is
built (about 1-2 min on two cores the first time, cached after) and loaded.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from projects.dat.ops import cpu_kernels

REPO = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ('tests/test_attention_fast.py', 'tests/test_layers.py')
# The Triton kernels' cases in Triton's CPU interpreter run no C++ kernel (and take most of the
# files' time).
SELECTION = ('-k', 'not triton_interpreter')


@pytest.mark.skipif(os.environ.get(cpu_kernels.ENV_SWITCH) == '0', reason=f'{cpu_kernels.ENV_SWITCH}=0')
def test_kernel_tests_pass_with_the_baseline_build():
    env = dict(os.environ, ATEN_CPU_CAPABILITY='default')
    # Builds the module (or finds it cached) and names the one loaded.
    load = 'from projects.dat.ops import cpu_kernels; k = cpu_kernels.load_kernels(); print(k and k.__name__)'
    probe = subprocess.run(
        [sys.executable, '-c', load],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip().endswith('_baseline'), probe.stdout + probe.stderr[-4000:]
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', *KERNEL_TESTS, *SELECTION, '-q', '-p', 'no:cacheprovider', '-rfEs'],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f'the kernel tests failed with the baseline build:\n{result.stdout[-6000:]}'
