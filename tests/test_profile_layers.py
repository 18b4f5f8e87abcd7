"""tools/analysis_tools/profile_layers.py: every group is found, and the groups' times add up to
the profiled step, on small DAT++ and Swin models at 64x64 (one step each, not any speed)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from projects.dat import DAT, benchmarking

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'analysis_tools'))

import profile_layers  # noqa: E402

SMALL_DATPP = dict(version='pp', dims=[16, 32, 64, 128], heads=[1, 2, 4, 8], groups=[1, 1, 2, 4], stage_spec=['ND'] * 4)
SMALL_SWIN = dict(benchmarking.SWIN_T, embed_dims=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8])

DAT_GROUPS = set(profile_layers.GROUPS)
SWIN_GROUPS = DAT_GROUPS - {'offset net', 'key sampling', 'LPU'}


def _small_model(name):
    torch.manual_seed(0)
    if name == 'datpp':
        model, source = DAT(SMALL_DATPP, attn_impl='fast'), 'small DAT++'
    else:
        from projects.dat.toolboxes import build_toolbox_model

        model, source = build_toolbox_model(SMALL_SWIN, 'mmdet'), 'small mmdet SwinTransformer'
    return profile_layers.ModelProfile(name, model, model, torch.randn(1, 3, 64, 64), source)


@pytest.fixture(scope='module')
def profiles():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = {}
    try:
        for name in ('datpp', 'swin') if importlib.util.find_spec('mmdet') else ('datpp',):
            profile = _small_model(name)
            profile.plain.append(profile.plain_step())  # also the warm-up of the profiled step
            profile.profiled.append(profile.profiled_step())
            result[name] = profile
    finally:
        torch.set_num_threads(threads)
    return result


def _needs(profiles, name):
    if name not in profiles:
        pytest.skip('the Swin model needs mmdet')


@pytest.mark.parametrize('name, groups', [('datpp', DAT_GROUPS), ('swin', SWIN_GROUPS)])
def test_every_group_and_stage_present(profiles, name, groups):
    _needs(profiles, name)
    summary = profiles[name].summary()
    found = {g['group'] for g in summary['groups']}
    assert found == groups  # no 'other': every module's ops have a group
    assert summary['unmatched_nodes'] == 0  # every backward node has the forward op that created it
    stages = {g['stage'] for g in summary['groups'] if g['group'] not in profile_layers.OVERHEAD_GROUPS}
    assert stages == {'stem', '0', '1', '2', '3', '-'}
    kinds = {g['kind'] for g in summary['groups'] if g['group'] == 'attn core'}
    assert kinds == ({'N', 'D'} if name == 'datpp' else {'W'})
    for g in summary['groups']:  # the forward pass of a backward-only group is empty, and so on
        assert g['fwd_ms'] >= 0 and g['bwd_ms'] >= 0
        if g['group'] == 'AccumulateGrad':
            assert g['fwd_ms'] == 0


@pytest.mark.parametrize('name', ['datpp', 'swin'])
def test_groups_add_up_to_the_step(profiles, name):
    _needs(profiles, name)
    profile = profiles[name]
    step = profile.profiled[0]
    groups_ms = sum(step['fwd'].values()) + sum(step['bwd'].values())
    # By construction the groups, with the time between ops and nodes, are the two phases.
    assert groups_ms == pytest.approx(step['forward_ms'] + step['backward_ms'], rel=1e-6)
    # The phases lie inside the step's wall time and fill most of it (on a loaded machine the
    # process can lose the CPU between the clock and the profiler's scope, outside every group).
    # The profiler times events with a clock of its own, converted to wall time: "inside" to 2 %.
    assert 0.5 * step['step_s'] * 1e3 <= groups_ms <= 1.02 * step['step_s'] * 1e3
    # Much of the step is in the modules' ops, not in the profiler's and Python's time between them.
    modules_ms = sum(
        ms
        for phase in ('fwd', 'bwd')
        for key, ms in step[phase].items()
        if key[2] not in profile_layers.OVERHEAD_GROUPS
    )
    assert modules_ms >= 0.25 * groups_ms


@pytest.mark.parametrize('name', ['datpp', 'swin'])
def test_group_macs_add_up_to_the_model(profiles, name):
    _needs(profiles, name)
    profile = profiles[name]
    assert sum(profile.macs.values()) == profile.total_macs > 0
    assert all(macs > 0 for macs in profile.macs.values())
    by_group = {key[2] for key in profile.macs}
    assert {'attn proj', 'attn core', 'FFN fc', 'norm', 'stem', 'downsample'} <= by_group


def test_tables(profiles, monkeypatch):
    _needs(profiles, 'swin')
    # Ops of these tiny models can all take less than the JSON's threshold on a fast machine.
    monkeypatch.setattr(profile_layers, 'MIN_OP_MS', 0.0)
    summaries = [profiles['swin'].summary(), profiles['datpp'].summary()]
    table = profile_layers.format_table(summaries, 'group')
    lines = table.splitlines()
    assert lines[0].startswith('| group | swin fwd ms |') and lines[0].endswith('| datpp - swin ms |')
    assert lines[-1].startswith('| **step** |')
    assert any(line.startswith('| offset net |') for line in lines)
    detail = profile_layers.format_table(summaries[1:], 'stage+kind+group').splitlines()
    assert detail[2].startswith('| stem | - | stem |')  # stem first, then the stages in order
    assert 'overhead x' in profile_layers.format_steps(summaries)
    ops = summaries[1]['ops']
    assert ops and all(len(key.split('|')) == 5 for key in ops)
    top = profile_layers.format_top_ops(summaries[1], count=3).splitlines()
    assert len(top) == 5 and top[0].startswith('| datpp: kind | group | phase | op |')


def test_arguments():
    with pytest.raises(SystemExit):
        profile_layers.parse_args(['--models', 'datpp-t::cp'])
    with pytest.raises(SystemExit):
        profile_layers.parse_args(['--inputs', '0@1'])
    args = profile_layers.parse_args(['--inputs', '64@1', '512x832@1'])
    assert args.parsed_inputs == [(64, 64, 1), (512, 832, 1)]
