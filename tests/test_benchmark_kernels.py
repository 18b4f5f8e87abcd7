"""tools/analysis_tools/benchmark_kernels.py on CPU: the attention calls of a small DAT++ forward
pass are recorded once per shape with their counts, every backend is compared with the first, the
totals weigh each call by its count, and the GPU kernels' settings are applied, skipped where the
kernels cannot run, and undone (not any speed)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from projects.dat.models.dat import DATBlock, DeformableAttention, NeighborhoodAttention
from projects.dat.ops import cpu_kernels, gpu_kernels

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'analysis_tools'))

import benchmark_kernels  # noqa: E402


def _blocks_per_stage(kind):
    from projects.dat.models.dat import DAT

    model = DAT('datpp-t')
    return [sum(isinstance(b.attn, kind) for b in stage.modules() if isinstance(b, DATBlock)) for stage in model.stages]


def test_records_each_shape_once_with_its_count():
    calls = benchmark_kernels.record_calls('datpp-t', 48, 32, 2, 'cpu')
    for op, kind in (('deformable', DeformableAttention), ('neighborhood', NeighborhoodAttention)):
        counts = [c.count for c in calls if c.op == op]
        assert counts == [n for n in _blocks_per_stage(kind) if n]  # one shape per stage
    # The N blocks' q, k and v are views of their qkv buffer, recorded as such.
    q, k = next(c for c in calls if c.op == 'neighborhood').args[:2]
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() and not q.is_contiguous()


def test_differences_are_relative_with_a_floor_for_gradients_that_cancel():
    reference = [torch.tensor([2.0, -4.0]), torch.tensor([1e-9, -2e-9])]  # the second: zero up to round-off
    same_up_to_round_off = [torch.tensor([2.0, -4.0 * (1 + 1e-7)]), torch.tensor([-3e-9, 5e-9])]
    diffs = benchmark_kernels.differences(same_up_to_round_off, reference)
    assert max(diffs) <= benchmark_kernels.AGREEMENT
    wrong = [torch.tensor([2.0, -4.0 * (1 + 1e-3)]), torch.tensor([1e-9, -2e-9])]
    assert benchmark_kernels.differences(wrong, reference)[0] > benchmark_kernels.AGREEMENT
    wrong_gradient = [reference[0], torch.tensor([1e-9, 1e-3])]
    assert benchmark_kernels.differences(wrong_gradient, reference)[1] > benchmark_kernels.AGREEMENT


@pytest.mark.skipif(cpu_kernels.load_kernels() is None, reason='the C++ CPU kernels are not built here')
def test_backends_agree_and_totals_weigh_calls_by_count(tmp_path, capsys):
    path = tmp_path / 'kernels.json'
    args = ['--input', '48x32@2', '--device', 'cpu', '--warmup', '0', '--repeats', '1', '--threads', '1']
    totals = benchmark_kernels.main([*args, '--json', str(path)])
    data = json.loads(path.read_text())
    assert [(t['op'], t['backend']) for t in totals] == [
        ('neighborhood', 'pytorch'),
        ('deformable', 'pytorch'),
        ('neighborhood', 'cpu-kernel'),
        ('deformable', 'cpu-kernel'),
    ]
    assert len(data['rows']) == 2 * len(data['calls'])
    for row in data['rows']:
        assert 'error' not in row and row['fwd_ms'] > 0 and row['fwd_bwd_ms'] > 0
        if row['backend'] == 'cpu-kernel':  # compared with the first backend, pytorch
            assert row['agrees'] and set(row['differences']) >= {'out', 'grad_q', 'grad_k', 'grad_v'}
            assert row['compared_with'] == 'pytorch default'
    for total in totals:
        rows = [r for r in data['rows'] if (r['op'], r['backend']) == (total['op'], total['backend'])]
        expected = sum(data['calls'][r['call']]['count'] * r['fwd_bwd_ms'] for r in rows)
        assert total['fwd_bwd_ms'] == pytest.approx(expected, rel=1e-6, abs=1e-3)
    out = capsys.readouterr().out
    assert '| deformable | cpu-kernel | default |' in out and 'Fastest deformable cpu-kernel: default' in out
    assert {(b['op'], b['backend']) for b in data['fastest']} == {
        ('deformable', 'cpu-kernel'),
        ('neighborhood', 'cpu-kernel'),
    }


def test_tuning_settings_apply_to_their_operator_and_are_undone(monkeypatch):
    monkeypatch.delenv(gpu_kernels.ENV_SWITCH, raising=False)  # the kernels cannot run: every tuned call fails
    monkeypatch.delenv(gpu_kernels.INTERPRET_SWITCH, raising=False)
    calls = benchmark_kernels.record_calls('datpp-t', 32, 32, 1, 'cpu')
    before = {name: getattr(gpu_kernels, name) for name in ('KERNEL_BLOCKS', 'NUM_WARPS', 'NEIGHBORHOOD_TILE')}
    report = benchmark_kernels.Report(None, {}, calls)
    benchmark_kernels.run_measurements(calls, ['pytorch'], True, 0, 1, report)
    tuned = [row for row in report.rows if row['backend'] == 'gpu-kernel']
    expected = sum(len(benchmark_kernels.TUNING[c.op]) for c in calls)
    assert len(tuned) == expected and all('runs its GPU kernels on' in row['error'] for row in tuned)
    assert {row['setting'] for row in tuned if row['op'] == 'neighborhood'} == {
        benchmark_kernels.Setting(s).label() for s in benchmark_kernels.TUNING['neighborhood']
    }
    assert before == {name: getattr(gpu_kernels, name) for name in before}
    assert [t['backend'] for t in report.totals()] == ['pytorch', 'pytorch']  # failed settings have no total
    with pytest.raises(ValueError, match='constants of projects.dat.ops.gpu_kernels'):
        benchmark_kernels.Setting({'TILE': (8, 8)})


def test_gpu_kernels_must_be_turned_on(monkeypatch, capsys):
    monkeypatch.delenv(gpu_kernels.ENV_SWITCH, raising=False)
    with pytest.raises(SystemExit):
        benchmark_kernels.parse_args(['--device', 'cuda'])
    assert f'set {gpu_kernels.ENV_SWITCH}=1' in capsys.readouterr().err


def test_time_limit_stops_starting_measurements():
    calls = benchmark_kernels.record_calls('datpp-t', 32, 32, 1, 'cpu')
    report = benchmark_kernels.Report(None, {}, calls)
    benchmark_kernels.run_measurements(calls, ['pytorch'], False, 0, 1, report, time_limit_s=0.0)
    assert report.rows == [] and report.meta['not_measured'] == len(calls)


def test_fastest_settings_pick_the_quickest_agreeing_setting_per_backend():
    def total(backend, setting, fwd, step, diff=0.0):
        return dict(
            op='neighborhood', backend=backend, setting=setting, fwd_ms=fwd, fwd_bwd_ms=step, largest_difference=diff
        )

    totals = [
        total('pytorch', 'default', 10.0, 40.0),
        total('gpu-kernel', 'default', 4.0, 20.0, 1e-6),
        total('gpu-kernel', 'NEIGHBORHOOD_TILE=(4, 8)', 3.0, 10.0, 1e-2),  # quicker, but wrong
        total('gpu-kernel', 'NEIGHBORHOOD_TILE=(4, 16)', 5.0, 16.0, 1e-6),
    ]
    assert benchmark_kernels.fastest_settings(totals) == [
        dict(
            op='neighborhood',
            backend='gpu-kernel',
            setting='NEIGHBORHOOD_TILE=(4, 16)',
            fwd_bwd_ms=16.0,
            fwd_over_first=0.5,
            fwd_bwd_over_first=0.4,
        )
    ]
