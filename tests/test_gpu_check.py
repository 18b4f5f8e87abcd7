"""tools/gpu_check.sh: its dry run on CPU (the steps of the GPU run, small), and its helpers.

The dry run runs without the wheels' install step (this environment has everything): the
environment probe, a few CPU cases of the device-parametrised tests, the attention operators alone
(PyTorch against the C++ kernels), the backbone benchmark (DAT-T++ reference, PyTorch and fast
path, Swin-T; fwd and fwd+bwd; fp32 and AMP) at tiny sizes with one timed iteration, the profile
of a training step and, since mmcv's ops are compiled here, the demo detector's training step;
mmdet's inference benchmark runs on CUDA only and is skipped.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'tools' / 'gpu_check.sh'


def _load_tool():
    spec = importlib.util.spec_from_file_location('_dat_tools_gpu_check', REPO / 'tools' / 'gpu_check.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load_tool()


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu_check')
    env = {k: v for k, v in os.environ.items() if k != 'OUT'}
    env['PYTHON'] = sys.executable
    command = ['bash', str(SCRIPT), '--device', 'cpu', '--no-install', '--out', str(out)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    report_path = out / 'gpu_check.json'
    assert report_path.is_file(), f'no report ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc, json.loads(report_path.read_text()), out


def test_dry_run_passes_every_step(dry_run):
    proc, report, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert report['device'] == 'cpu' and report['dry_run'] is True
    assert report['torch'] == torch.__version__ and report['python'] and report['gpu'] is None
    steps = report['steps']
    assert steps['environment']['status'] == 'passed'
    assert report['imports']['projects.dat']['ok'] and report['imports']['mmcv.ops']['ok']
    tests = steps['tests']
    assert tests['status'] == 'passed' and tests['passed'] > 0 and tests['failed'] == 0, tests
    assert steps['kernels']['status'] == 'passed' and steps['kernels']['measurements'] > 0, steps['kernels']
    kernel_totals = {(t['op'], t['backend']) for t in report['kernels']['totals']}
    assert kernel_totals == {(op, b) for op in ('deformable', 'neighborhood') for b in ('pytorch', 'cpu-kernel')}
    # In order of importance: the kernels before the benchmark, the AMP benchmark after the profile.
    names = list(steps)
    assert names.index('kernels') < names.index('benchmark:fp32:datpp-t:reference') < names.index('profile')
    assert names.index('profile') < names.index('benchmark:amp:datpp-t:reference')
    benchmark_steps = [name for name in steps if name.startswith('benchmark:')]
    assert len(benchmark_steps) == 6 and all(steps[name]['status'] == 'passed' for name in benchmark_steps)
    assert steps['profile']['status'] == 'passed' and steps['profile']['cases'] == 3, steps['profile']
    assert [case['model'] for case in report['profile']] == ['datpp-t:pytorch', 'swin-t', 'datpp-t:fast']
    assert all(case['mode'] == 'fwd+bwd' and case['ops'] and case['backward'] for case in report['profile'])
    assert steps['detector_train']['status'] == 'passed', steps['detector_train']
    assert 'loss' in steps['detector_train']['last_train_log']
    assert steps['mmdet_benchmark'] == dict(status='skipped', reason="mmdet's inference benchmark runs on CUDA only")
    log = (out / 'gpu_check.log').read_text()
    assert 'tests/test_attention_fast.py' in log and 'benchmark.py' in log
    assert 'benchmark:amp:swin-t: passed' in proc.stdout  # progress is printed


def test_dry_run_measures_every_case(dry_run):
    _, report, _ = dry_run
    results = report['benchmark']['results']
    cases = {
        (
            r['job']['model'],
            f'{r["job"]["width"]}x{r["job"]["height"]}@{r["job"]["batch"]}',
            r['job']['mode'],
            r['job']['amp'],
        )
        for r in results
    }
    models = ('datpp-t:reference', 'datpp-t:pytorch', 'datpp-t:fast', 'swin-t')
    inputs = ('48x32@2',)
    assert cases == {
        (m, i, mode, amp) for m in models for i in inputs for mode in ('fwd', 'fwd+bwd') for amp in (False, True)
    }
    for r in results:
        # On CPU the peak is the growth of the resident set: a fraction of a MiB below 0 where nothing grew.
        assert r['latency_ms']['median'] > 0 and r['peak_mem_mib'] > -1 and r['job']['device'] == 'cpu'
    assert report['swin_t'] == 'mmdet SwinTransformer'  # mmdet imports here; timm's on the GPU machine
    assert len(report['benchmark']['ratios']) == 4  # fwd and fwd+bwd, fp32 and AMP
    for row in report['benchmark']['ratios']:
        assert {'time_fast_over_reference', 'time_fast_over_pytorch', 'time_fast_over_swin_t'} <= set(row)
    assert report['benchmark']['table'].count('\n') == 1 + len(results)


def test_junit_summary_counts_and_reasons(tmp_path):
    report = tmp_path / 'junit.xml'
    report.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.t" name="a[cpu]"/>'
        '<testcase classname="tests.t" name="a[cuda]"><skipped message="CUDA is not available"/></testcase>'
        '<testcase classname="tests.t" name="b[cuda]"><skipped message="CUDA is not available"/></testcase>'
        '<testcase classname="tests.t" name="c[cuda]"><failure message="max error 1e-3"/></testcase>'
        '</testsuite></testsuites>'
    )
    assert gpu_check.junit_summary(report) == dict(
        passed=1,
        failed=1,
        skipped=2,
        failures={'tests.t.c[cuda]': 'max error 1e-3'},
        skip_reasons={'CUDA is not available': 2},
    )


def test_ratios_compare_the_fast_path_with_reference_pytorch_path_and_swin_t():
    def result(model, ms, mib, amp=False):
        job = dict(model=model, width=224, height=224, batch=64, mode='fwd', amp=amp)
        return dict(job=job, latency_ms=dict(median=ms), peak_mem_mib=mib)

    rows = gpu_check.ratios(
        [
            result('datpp-t:reference', 200.0, 1000.0),
            result('datpp-t:pytorch', 125.0, 250.0),
            result('datpp-t:fast', 100.0, 250.0),
            result('swin-t', 80.0, 500.0),
            result('datpp-t:fast', 50.0, 100.0, amp=True),
        ]
    )
    assert rows == [
        dict(
            case='224x224@64 fwd fp32',
            time_fast_over_reference=0.5,
            memory_fast_over_reference=0.25,
            time_fast_over_pytorch=0.8,
            memory_fast_over_pytorch=1.0,
            time_fast_over_swin_t=1.25,
            memory_fast_over_swin_t=0.5,
        ),
        dict(case='224x224@64 fwd amp'),  # nothing to compare with
    ]


def test_gpu_plan_fits_the_device_machines_limits():
    """The GPU run must end within 8 minutes, the wheels' install included (about 20 s)."""
    plan = gpu_check.PLANS['cuda']
    assert plan.budget_s + 30 <= 8 * 60
    assert plan.bench_inputs == ('1344x800@1', '224@64') and plan.tests_k == 'cuda'
    assert plan.det_val_images >= plan.mmdet_bench_iters  # mmdet's benchmark reads one image per iteration
