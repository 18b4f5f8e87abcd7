"""The backbone on torch 2.1, the line most existing mmdet 3 / mmseg 1 environments run.

torch 2.1 is the last release with OpenMMLab's prebuilt mmcv 2.1 wheels; it predates the custom
operator API (``torch.library.custom_op``, torch 2.4) and ``torch.serialization.add_safe_globals``.
This test builds a throwaway virtual environment with torch 2.1.2, mmengine 0.10.7, mmcv 2.1.0
without its compiled ops (the ``mmcv-lite`` release) and numpy < 2 (torch 2.1 was built against
numpy 1), puts this checkout on its ``PYTHONPATH`` (no toolbox is installed there) and runs the
backbone tests in it: golden parity, fast paths against the reference paths forward and backward,
the fused ConvFFN layer, the C++ kernels (built against torch 2.1's headers). Tests that need
what that environment lacks (mmdet and the other toolboxes, custom operators and ``torch.compile``
of them, CPU autocast to float16) skip there with their reason; every other test must pass, and
those in ``MUST_PASS`` must have run.

The environment is cached in ``~/.cache/dat-old-torch/`` (``DAT_OLD_TORCH_CACHE``); a stamp
file holding the pinned versions decides whether it is reused, so only the first run downloads
(about 2.8 GB, 5 GB installed: torch's Linux wheels on PyPI are CUDA builds, and ``import torch``
needs the CUDA libraries of the ``nvidia-*`` wheels even on a machine without a GPU). ``DAT_OLD_TORCH=0``
skips this test.
"""

import fcntl
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What the throwaway environment holds. torch 2.1's extension modules need numpy 1: numpy 1.26,
# and an opencv-python (which mmengine requires) built for numpy 1.
OLD_TORCH_PINS = (
    'torch==2.1.2',
    'numpy==1.26.4',
    'mmengine==0.10.7',
    'mmcv-lite==2.1.0',
    'opencv-python==4.10.0.84',
    'pytest==8.3.4',
    'ninja==1.11.1.1',
)
TESTS = ('tests/test_backbone.py', 'tests/test_attention_fast.py', 'tests/test_layers.py')
STAMP_NAME = 'dat-old-torch.stamp'


def cache_root() -> Path:
    """Where the environment is kept (``DAT_OLD_TORCH_CACHE``, default ``~/.cache/dat-old-torch``)."""
    return Path(os.environ.get('DAT_OLD_TORCH_CACHE') or Path.home() / '.cache' / 'dat-old-torch')


def stamp_text() -> str:
    """The stamp of a finished environment: the Python it was made with and the pins."""
    return '\n'.join([f'python {sys.version_info.major}.{sys.version_info.minor}', *OLD_TORCH_PINS]) + '\n'


def _run_logged(command, log, **kwargs):
    log.write(f'$ {" ".join(map(str, command))}\n')
    log.flush()
    subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True, **kwargs)


def old_torch_python() -> Path:
    """The Python of the cached environment, built first when its stamp is missing or stale.

    The stamp is written last, after the installs and an import check have succeeded, and the
    build runs under a lock: an interrupted run leaves no stamp (the next run builds afresh) and
    two runs never build at once.

    Returns:
        Path: The environment's ``python``.

    Raises:
        RuntimeError: The environment could not be built; the message names the log.
    """
    root = cache_root()
    tag = f'py{sys.version_info.major}{sys.version_info.minor}-torch2.1'
    venv = root / tag
    python = venv / 'bin' / 'python'
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f'{tag}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = venv / STAMP_NAME
        if stamp.is_file() and stamp.read_text() == stamp_text() and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        log_path = root / f'{tag}.log'
        started = time.monotonic()
        with open(log_path, 'w') as log:
            try:
                # Made from the interpreter behind this one (a venv's base interpreter).
                _run_logged([sys.executable, '-m', 'venv', str(venv)], log)
                _run_logged(
                    [str(python), '-m', 'pip', 'install', '--no-input', '--retries', '10', *OLD_TORCH_PINS], log
                )
                _run_logged([str(python), '-c', 'import torch, mmcv.cnn, mmengine; print(torch.__version__)'], log)
            except (OSError, subprocess.CalledProcessError) as exc:
                raise RuntimeError(f'could not build the torch 2.1 environment ({exc}); see {log_path}') from exc
            log.write(f'built in {time.monotonic() - started:.0f} s\n')
        stamp.write_text(stamp_text())
        return python


def _outcomes(junit_xml: Path) -> dict:
    """``{test id: ('passed' | 'skipped' | 'failed', message)}`` from a pytest JUnit report."""
    outcomes = {}
    for case in ET.parse(junit_xml).getroot().iter('testcase'):
        test_id = f'{case.get("classname")}.{case.get("name")}'
        outcome, message = 'passed', ''
        for child in case:
            if child.tag in ('failure', 'error'):
                outcome, message = 'failed', child.get('message', '')
            elif child.tag == 'skipped' and outcome != 'failed':
                outcome, message = 'skipped', child.get('message', '')
        outcomes[test_id] = outcome, message
    return outcomes


# Tests that must have run and passed on torch 2.1 (prefixes of JUnit test ids; their CPU cases, the
# CUDA ones skip without a GPU): the numbers, and the C++ kernels built against its headers.
MUST_PASS = (
    'tests.test_attention_fast.test_deformable_matches_reference',
    'tests.test_attention_fast.test_deformable_cpu_kernels_equal_pytorch_path',
    'tests.test_attention_fast.test_deformable_float64_is_exact_and_passes_gradcheck',
    'tests.test_attention_fast.test_deformable_kernel_rejects_inconsistent_inputs',
    'tests.test_attention_fast.test_nan_key_position_gives_nan_where_it_is_read_and_nothing_else',
    'tests.test_attention_fast.test_neighborhood_matches_reference',
    'tests.test_attention_fast.test_backbone_fast_equals_reference',
    'tests.test_attention_fast.test_amp_keeps_positions_float32_and_agrees[cpu-bfloat16]',
    'tests.test_layers.test_fused_hidden_layer_matches_float64_reference',
    'tests.test_layers.test_fused_hidden_layer_equals_float32_pytorch_composition',
    'tests.test_layers.test_conv_ffn_fused_and_reference_agree',
    'tests.test_layers.test_gelu2d_gradient_for_any_layout_of_the_incoming_gradient',
    'tests.test_backbone.test_gradients_reach_every_parameter_and_with_cp_matches',
)
MUST_PASS_WITH_GOLDEN = (
    'tests.test_backbone.test_golden_parity',
    'tests.test_attention_fast.test_golden_parity_with_each_impl',
)
GOLDEN = REPO.parent / 'shared' / 'golden'


def runs_elsewhere(test_id: str) -> bool:
    """Whether a JUnit test id is a case that runs elsewhere: the ``cuda`` case of the ``device``
    fixture (``tests/conftest.py``), or a ``gpu_kernel`` case (on CPU, in Triton's interpreter in a
    process of its own; Triton 3, which torch 2.1 lacks)."""
    params = test_id.partition('[')[2].rstrip(']').split('-')
    return 'cuda' in params or 'gpu_kernel' in params


@pytest.mark.skipif(os.environ.get('DAT_OLD_TORCH') == '0', reason='DAT_OLD_TORCH=0')
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='the torch 2.1 environment is built on Linux only')
@pytest.mark.skipif(sys.version_info >= (3, 12), reason='torch 2.1 has no wheels for Python 3.12 or later')
def test_backbone_tests_pass_on_torch_2_1(tmp_path):
    python = old_torch_python()
    report = tmp_path / 'report.xml'
    env = {name: value for name, value in os.environ.items() if name not in ('PYTHONHOME', 'PYTHONPATH')}
    env['PYTHONPATH'] = str(REPO)
    version = subprocess.run(
        [str(python), '-c', 'import torch; print(torch.__version__)'],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version.startswith('2.1.'), f'expected torch 2.1 in {python}, got {version}'
    started = time.monotonic()
    result = subprocess.run(
        [str(python), '-m', 'pytest', *TESTS, '-q', '-p', 'no:cacheprovider', '-rfEs', f'--junitxml={report}'],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    print(result.stdout[-6000:], result.stderr[-2000:], sep='\n')
    print(f'torch {version}: backbone tests ran in {time.monotonic() - started:.0f} s')
    assert result.returncode == 0, f'the backbone tests failed on torch {version}:\n{result.stdout[-4000:]}'
    outcomes = _outcomes(report)
    required = MUST_PASS + (MUST_PASS_WITH_GOLDEN if GOLDEN.is_dir() else ())
    for prefix in required:
        matched = {
            test: outcome for test, outcome in outcomes.items() if test.startswith(prefix) and not runs_elsewhere(test)
        }
        assert matched, f'no test {prefix} ran on torch {version}'
        not_passed = {test: outcome for test, outcome in matched.items() if outcome[0] != 'passed'}
        assert not not_passed, f'on torch {version}, expected these to pass: {not_passed}'
