"""The C++ kernels of the instruction sets other than this machine's, run in a process of their own.

``cpu_kernels.simd_flags`` builds one module per torch CPU capability: AVX-512 (ConvFFN's
hidden-layer kernel in 16-lane vectors, the rest as for AVX2), AVX2 (8-lane vectors, FMA) and
the compiler's baseline (no AVX2, no FMA: the portable code of ``csrc/vector_math.h``, plain loops
where the AVX2 build has shuffles and min / max instructions, and sums that round differently).
The rest of the suite runs this machine's module; these tests run the kernel tests again in a
process where torch's CPU capability is lowered (``ATEN_CPU_CAPABILITY``), in which the module of
that capability is built (about half a minute on two cores the first time, cached after) and loaded:
the baseline build with the tests of ``tests/test_attention_fast.py`` and ``tests/test_layers.py``
(but the Triton interpreter's), and, on a machine with AVX-512, the AVX2 build with those of
``tests/test_layers.py`` (its other kernels are compiled as in the AVX-512 build).
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
@pytest.mark.parametrize(
    ('capability', 'build', 'tests'),
    [('default', 'baseline', KERNEL_TESTS), ('avx2', 'avx2', ('tests/test_layers.py',))],
)
def test_kernel_tests_pass_with_another_build(capability, build, tests):
    if build == 'avx2' and cpu_kernels.simd_flags()[0] != 'avx512':
        pytest.skip(f'this machine builds the {cpu_kernels.simd_flags()[0]} module, which the rest of the suite runs')
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
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
    assert probe.stdout.strip().endswith(f'_{build}'), probe.stdout + probe.stderr[-4000:]
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', *tests, *SELECTION, '-q', '-p', 'no:cacheprovider', '-rfEs'],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, f'the kernel tests failed with the {build} build:\n{result.stdout[-6000:]}'
