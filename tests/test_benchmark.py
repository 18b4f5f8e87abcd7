"""tools/analysis_tools/benchmark.py: spec parsing, the table, and short real runs.

The runs measure tiny inputs with one timed iteration: they check that the tool measures
what it says (every model, the interleaved worker protocol, the JSON file), not any speed.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from projects.dat import benchmarking

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'analysis_tools'))

import benchmark  # noqa: E402
import plot_benchmark  # noqa: E402

DET_CONFIG = str(ROOT / 'configs' / 'detection' / 'mask_rcnn' / 'mask-rcnn_datpp-t_fpn_1x_coco.py')


@pytest.mark.parametrize(
    'spec, expected',
    [
        ('datpp-t', ('datpp-t', None, None)),
        ('datpp-t:fast', ('datpp-t', 'fast', None)),
        ('dat-t:reference:cp', ('dat-t', 'reference', True)),
        ('datpp-t::cp', ('datpp-t', None, True)),
        ('datpp-t:fast-pytorch', ('datpp-t', 'fast-pytorch', None)),
        ('swin-t', ('swin-t', None, None)),
        (f'{DET_CONFIG}:reference:nocp', (DET_CONFIG, 'reference', False)),
    ],
)
def test_model_specs(spec, expected):
    assert benchmarking.parse_model_spec(spec) == expected


@pytest.mark.parametrize(
    'spec, match',
    [
        ('datpp-x', "Unknown model 'datpp-x'"),
        ('datpp-t:slow', "Unknown attention implementation 'slow'"),
        ('datpp-t:fast:yes', "Unknown checkpointing field 'yes'"),
        ('datpp-t:fast:cp:more', 'more than three fields'),
        ('swin-t:fast', 'swin-t takes no attention implementation'),
        ('missing.py', "Config file 'missing.py'"),
    ],
)
def test_bad_model_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        benchmarking.parse_model_spec(spec)


def test_input_specs():
    assert benchmarking.parse_input_spec('224@32') == (224, 224, 32)
    assert benchmarking.parse_input_spec('1344x800@1') == (1344, 800, 1)
    assert benchmarking.parse_input_spec('96') == (96, 96, 1)  # batch 1 when omitted
    for bad in ('0@1', '224@0', 'axb@1'):
        with pytest.raises(ValueError):
            benchmarking.parse_input_spec(bad)


def test_with_cp_reaches_the_backbone():
    model, _, _ = benchmarking.build_model('datpp-t:fast:cp', 64, 64)
    assert all(stage.with_cp for stage in model.stages)
    model, _, _ = benchmarking.build_model('datpp-t:fast', 64, 64)
    assert not any(stage.with_cp for stage in model.stages)


@pytest.mark.parametrize('spec', ['datpp-t:fast', 'swin-t'])
def test_training_loss_sends_a_gradient_through_the_output_norms(spec):
    """The timed backward pass carries gradients, not round-off: the outputs' LayerNorms have equal
    weights as initialised, so a plain sum of means has a zero input gradient (about 1e-10 in
    float32 here); the channel-weighted loss gives the input a gradient of 5e-4 to 2e-3."""
    _, run, _, x = benchmarking.seeded_model_and_input(spec, 64, 64, 1)
    x.requires_grad_(True)
    benchmarking.training_loss(run(x)).backward()
    assert x.grad.abs().max() > 1e-4


def test_fast_pytorch_is_the_pytorch_implementation():
    """``fast-pytorch`` (the name of earlier runs) builds the model with attn_impl='pytorch', the fast
    path without the C++ kernels, which needs no process of its own."""
    from projects.dat import set_attn_impl

    for spec in ('datpp-t:fast-pytorch', 'datpp-t:pytorch'):
        model, _, _ = benchmarking.build_model(spec, 64, 64)
        assert model.attn_impl == 'pytorch' and set(set_attn_impl(model, 'pytorch').values()) == {'pytorch'}
    benchmark.parse_args(['--models', 'datpp-t:fast-pytorch', 'datpp-t:cpu-kernel', '--no-isolate'])


def _no_mmdet(model_cfg, scope):
    raise ModuleNotFoundError("No module named 'mmcv._ext'")  # mmdet's models on an mmcv without its ops


def test_swin_t_is_timms_where_mmdet_cannot_be_imported(monkeypatch):
    """The fallback of a machine whose mmcv has no compiled ops (tools/gpu_check.sh): timm's Swin-T
    with mmdet's output norms has the parameters of mmdet's Swin-T, shape for shape, and its outputs
    (NCHW, contiguous) at any input size; the results say which one ran."""
    timm = pytest.importorskip('timm')
    mmdet_swin, _, source = benchmarking.build_model('swin-t', 64, 96)
    assert source == 'mmdet SwinTransformer'
    monkeypatch.setattr(benchmarking, 'build_toolbox_model', _no_mmdet)
    timm_swin, _, source = benchmarking.build_model('swin-t', 64, 96)
    assert isinstance(timm_swin, benchmarking.TimmSwinT)
    assert source.startswith(f'timm {timm.__version__} swin_tiny_patch4_window7_224') and 'mmcv._ext' in source
    assert sorted(p.shape for p in timm_swin.parameters()) == sorted(p.shape for p in mmdet_swin.parameters())
    x = torch.randn(1, 3, 64, 96)
    timm_swin.eval()
    mmdet_swin.eval()  # mmdet's train() returns None
    with torch.no_grad():
        for ours, theirs in zip(timm_swin(x), mmdet_swin(x), strict=True):
            assert ours.shape == theirs.shape and ours.is_contiguous()


def test_swin_t_without_mmdet_or_timm_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(benchmarking, 'build_toolbox_model', _no_mmdet)
    monkeypatch.setitem(sys.modules, 'timm', None)  # import timm raises ImportError
    with pytest.raises(ImportError, match=r'swin-t needs mmdet \(.*mmcv._ext.*\) or timm'):
        benchmarking.build_model('swin-t', 64, 64)


def _result(model, ms, mib, macs, width=64, height=64, batch=2, mode='fwd'):
    job = dict(model=model, width=width, height=height, batch=batch, mode=mode)
    return dict(
        job=job,
        latency_ms=dict(median=ms, min=0.9 * ms, max=1.2 * ms),
        images_per_s=batch * 1e3 / ms,
        peak_mem_mib=mib,
        macs=macs,
        macs_method='not counted: RuntimeError: cannot trace' if macs is None else 'counted',
    )


def test_table_ratios_compare_with_the_first_model():
    results = [_result('a', 100.0, 50.0, 4e9), _result('b', 25.0, 100.0, 3e9), _result('c', 50.0, 25.0, None)]
    table = benchmark.format_table(results).splitlines()
    assert table[0].split(' | ')[3:5] == ['GMACs', 'latency ms (median)']
    assert table[2].startswith('| a | 64x64@2 | fwd | 4.00 |') and table[2].endswith('| 1.00 | 1.00 | 1.00 |')
    # time / first, MACs / first, memory / first
    assert table[3].startswith('| b | 64x64@2 | fwd | 3.00 |') and table[3].endswith('| 0.25 | 0.75 | 2.00 |')
    # A model without MACs says so, and why, under the table.
    assert table[4].startswith('| c | 64x64@2 | fwd | n/a |') and table[4].endswith('| 0.50 | n/a | 0.50 |')
    assert table[-1] == 'MACs of c: not counted: RuntimeError: cannot trace'


def _job(model, width=64, height=48, batch=2, mode='fwd'):
    return benchmark.Job(
        model=model,
        width=width,
        height=height,
        batch=batch,
        mode=mode,
        device='cpu',
        amp=False,
        warmup=0,
        repeats=1,
        threads=torch.get_num_threads(),
        compile=False,
    )


def test_macs_are_the_flops_module_count_at_the_benchmark_input():
    """One count per model and input, whatever the implementation and mode; a backbone is counted
    at batch 1 times the batch, which must equal projects.dat.flops's count of the reference path
    at the full batch (for DAT-T++ and Swin-T alike)."""
    from projects.dat import DAT
    from projects.dat.flops import analyze_complexity
    from projects.dat.toolboxes import build_toolbox_model

    fast = _job('datpp-t:fast')
    jobs = [fast, _job('datpp-t:reference'), _job('datpp-t:fast', mode='fwd+bwd'), _job('swin-t')]
    messages = []
    counts = benchmark.count_all_macs(jobs, isolate=False, log=messages.append)
    assert sorted(counts) == [('datpp-t', 64, 48, 1), ('swin-t', 64, 48, 1)] and len(messages) == 2

    inputs = torch.randn(2, 3, 48, 64)
    dat = analyze_complexity(DAT('datpp-t', attn_impl='reference').eval(), inputs).flops
    swin_t = build_toolbox_model(benchmarking.SWIN_T, 'mmdet')
    swin_t.eval()  # its train() returns None
    swin = analyze_complexity(swin_t, inputs).flops
    for job, expected in zip(jobs, (dat, dat, dat, swin), strict=True):
        macs = benchmark.macs_of(job, counts)
        assert macs['macs'] == expected, job.model
        assert macs['macs_method'].endswith('counted at batch 1, times 2 (the backbone computes each image on its own)')


def test_models_that_cannot_be_counted_say_why(monkeypatch):
    def untraceable(*args):
        raise RuntimeError('torch.jit.trace could not trace X')

    monkeypatch.setattr(benchmark, 'count_macs', untraceable)
    counts = benchmark.count_all_macs([_job('swin-t')], isolate=False, log=lambda msg: None)
    assert benchmark.macs_of(_job('swin-t'), counts) == dict(
        macs=None, macs_method='not counted: RuntimeError: torch.jit.trace could not trace X'
    )


def test_config_models_are_counted_at_the_full_batch():
    """A config's heads may depend on the data: its count is made at the batch it runs at."""
    config = str(ROOT / 'configs' / 'classification' / 'datpp-t_8xb128_in1k.py')
    job = _job(f'{config}:fast', width=64, height=64, batch=2)
    assert benchmark.mac_count_key(job.model, 64, 64, 2) == (config, 64, 64, 2)
    counts = benchmark.count_all_macs([job], isolate=False, log=lambda msg: None)
    macs = benchmark.macs_of(job, counts)
    assert macs['macs'] > 0 and macs['macs_method'].endswith('counted at batch 2')


def test_interleaved_run_writes_every_measurement(tmp_path):
    out = tmp_path / 'bench.json'
    cmd = [
        sys.executable, str(ROOT / 'tools' / 'analysis_tools' / 'benchmark.py'),
        '--models', 'datpp-t:reference', 'datpp-t:fast', '--inputs', '64x48@2', '--modes', 'fwd', 'fwd+bwd',
        '--warmup', '0', '--repeats', '2', '--threads', '1', '--json', str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'round 2/2' in proc.stdout and '| datpp-t:fast | 64x48@2 | fwd+bwd |' in proc.stdout
    data = json.loads(out.read_text())
    assert data['machine']['threads'] == 1
    results = data['results']
    assert [(r['job']['model'], r['job']['mode']) for r in results] == [
        ('datpp-t:reference', 'fwd'), ('datpp-t:fast', 'fwd'),
        ('datpp-t:reference', 'fwd+bwd'), ('datpp-t:fast', 'fwd+bwd'),
    ]  # fmt: skip
    # One MAC count (in its own process) for both implementations of the model, in both modes.
    assert proc.stdout.count('MACs of datpp-t at 64x48:') == 1
    assert len({r['macs'] for r in results}) == 1 and results[0]['macs'] > 0
    assert '| datpp-t:fast | 64x48@2 | fwd | ' + f'{results[0]["macs"] / 1e9:.2f} |' in proc.stdout
    for r in results:
        assert r['model_source'] == 'projects.dat DAT datpp-t'
        assert len(r['latency_ms']['all']) == 2 and r['latency_ms']['median'] > 0
        assert r['images_per_s'] == pytest.approx(2e3 / r['latency_ms']['median'])
        assert r['peak_mem_mib'] >= 0 and r['memory_method']
        assert r['memory_between_iterations'] == 'kept'  # tiny models: they fit side by side
    # Training keeps activations for the backward pass: it must need more memory than inference.
    assert results[2]['peak_mem_mib'] > results[0]['peak_mem_mib']


def test_results_record_the_allocator_settings(monkeypatch):
    """Settings that decide whether freed memory goes back to the OS change CPU timings by a
    fifth (page faults): every result's machine record names them, and nothing else."""
    monkeypatch.setenv('MALLOC_MMAP_THRESHOLD_', '4294967296')
    monkeypatch.setenv('LD_PRELOAD', '/usr/lib/libjemalloc.so.2')
    monkeypatch.setenv('DAT_UNRELATED_SETTING', '1')
    monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
    allocator = benchmarking.machine_description('cpu', 1)['allocator']
    assert allocator['MALLOC_MMAP_THRESHOLD_'] == '4294967296'
    assert allocator['LD_PRELOAD'] == '/usr/lib/libjemalloc.so.2'
    assert 'DAT_UNRELATED_SETTING' not in allocator and 'GLIBC_TUNABLES' not in allocator


@pytest.mark.parametrize(
    'machine_mib, expected', [(None, 'released to the OS'), (1.0, 'released to the OS'), (1e9, 'kept')]
)
def test_workers_keep_memory_between_iterations_only_where_it_fits(machine_mib, expected, monkeypatch):
    """Freed memory is kept (as in training: no page faults for fresh pages every iteration)
    unless the workers' peaks together come near the machine's memory, or it is unknown."""
    monkeypatch.setattr(benchmark, 'memory_total_mib', lambda: machine_mib)
    job = benchmark.Job(
        model='datpp-t:fast',
        width=32,
        height=32,
        batch=1,
        mode='fwd',
        device='cpu',
        amp=False,
        warmup=0,
        repeats=1,
        threads=1,
        compile=False,
    )
    messages = []
    (result,) = benchmark.measure_interleaved([job], log=messages.append)
    assert result['memory_between_iterations'] == expected
    assert any(('keep their memory' if expected == 'kept' else 'return freed memory') in m for m in messages)


def test_bad_arguments_exit_with_a_message():
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'analysis_tools' / 'benchmark.py'), '--models', 'datpp-t:slow'],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Unknown attention implementation 'slow'" in proc.stderr


@pytest.mark.parametrize('x', ['pixels', 'macs'])
def test_plot_of_a_benchmark_json(tmp_path, x):
    """The plot script draws synthetic results (two models, two inputs, both modes) into a PNG."""
    results = [
        _result(model, ms * scale, mib * scale, None if model == 'c' and x == 'macs' else 1e9 * scale, w, h, 1, mode)
        for model, ms, mib in (('datpp-t:fast', 100.0, 50.0), ('swin-t', 80.0, 60.0), ('c', 90.0, 70.0))
        for (w, h, scale) in ((224, 224, 1.0), (1344, 800, 20.0))
        for mode in ('fwd', 'fwd+bwd')
    ]
    data = tmp_path / 'bench.json'
    data.write_text(json.dumps(dict(machine=dict(cpu='test CPU', threads=2, torch='2.x'), results=results)))
    out = tmp_path / 'bench.png'
    assert plot_benchmark.main([str(data), '--out', str(out), '--x', x]) == str(out)
    assert out.read_bytes().startswith(b'\x89PNG') and out.stat().st_size > 10_000
    if x == 'macs':
        messages = []
        plot_benchmark.plot(results, ['test'], 'macs', log=messages.append)
        assert messages == [
            f'c {size} {mode}: no MAC count, left out'
            for size in ('224@1', '1344x800@1')
            for mode in ('fwd', 'fwd+bwd')
        ]


def test_results_record_the_checkout_commit(tmp_path):
    """Every result names the commit it measured (and whether files differed from it), so that a
    JSON in docs/bench/ says what it is a measurement of; outside a checkout, nothing."""
    head = subprocess.run(['git', '-C', str(ROOT), 'rev-parse', 'HEAD'], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip('not run from a git checkout')
    described = benchmarking.machine_description('cpu', 1)['git']
    assert described['commit'] == head.stdout.strip() and described['changed_files'] >= 0
    assert benchmarking.checkout_description(tmp_path) is None  # not a checkout
    subprocess.run(['git', 'init', '-q', str(tmp_path)], check=True)
    (tmp_path / 'venv').mkdir()
    assert benchmarking.checkout_description(tmp_path / 'venv') is None  # inside another repository
