"""tools/analysis_tools/profile_ops.py on CPU: a small DAT++ training step's operators, modules and
backward nodes are found and timed (one step, not any speed)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'analysis_tools'))

import profile_ops  # noqa: E402


def test_profile_ops_cpu_step(tmp_path, capsys):
    path = tmp_path / 'profile.json'
    args = ['--models', 'datpp-t:fast', '--inputs', '64x48@1', '--modes', 'fwd+bwd', '--device', 'cpu']
    (case,) = profile_ops.main(
        [*args, '--warmup', '0', '--steps', '1', '--top', '200', '--threads', '1', '--json', str(path)]
    )
    assert case['wall_ms'] > 0 and case['device_busy_ms'] is None
    ops = {row['name']: row for row in case['ops']}
    assert {'dat::deformable_attention', 'dat::neighborhood_attention', 'aten::addmm'} <= set(ops)
    assert ops['dat::neighborhood_attention']['calls'] == 12  # DAT-T++ has 12 N blocks
    modules = {row['name'] for row in case['modules']}
    assert {'module::DAT', 'module::DeformableAttention', 'module::NeighborhoodAttention'} <= modules
    backward = ' '.join(row['name'] for row in case['backward'])
    assert 'neighborhood_attention' in backward and 'deformable_attention' in backward
    # The tables are sorted, and the step's time bounds every module's.
    times = [row['ms'] for row in case['modules']]
    assert times == sorted(times, reverse=True) and times[0] <= case['profiled_wall_ms']
    assert json.loads(path.read_text())['cases'][0]['ops'] == case['ops']
    assert '== datpp-t:fast 64x48@1 fwd+bwd fp32' in capsys.readouterr().out
