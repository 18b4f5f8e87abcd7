"""Conversion of original checkpoints that lack tensors: the error lists every missing tensor by
its original name, grouped; the names are the inverse of the converter's renaming."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.tiny_archs import TINY

from projects.dat import DAT
from projects.dat.converter import (
    ConversionError,
    convert_original_state_dict,
    group_keys,
    original_key,
    rename_original_key,
)

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_KEYS = REPO.parent / 'shared' / 'reference' / 'official_keys'


def original_checkpoint(arch, dense=False):
    """A state dict in the original code's naming, made from a fresh DAT of ``arch``."""
    torch.manual_seed(0)
    model = DAT(arch, out_indices=(0, 1, 2, 3) if dense else (3,))
    version = model.version
    state = {original_key(k, version, classifier=not dense): v for k, v in model.state_dict().items()}
    if dense:
        return {f'backbone.{k}': v for k, v in state.items()} | {'neck.conv.weight': torch.ones(2)}
    return state | {'cls_head.weight': torch.ones(10, model.num_features[-1]), 'cls_head.bias': torch.zeros(10)}


@pytest.mark.parametrize('version', ['v1', 'pp'])
@pytest.mark.parametrize('dense', [False, True])
def test_original_key_inverts_the_renaming(version, dense):
    keys = DAT(TINY[version], out_indices=(0, 1, 2, 3) if dense else (3,)).state_dict()
    for key in keys:
        original = original_key(key, version, classifier=not dense)
        assert original != key and rename_original_key(original, version) == key, (key, original)
    converted, info = convert_original_state_dict(original_checkpoint(TINY[version], dense))
    assert info['version'] == version and info['arch']['stage_spec'] == TINY[version]['stage_spec']
    assert len(converted) == len(keys) + (1 if dense else 2)


@pytest.mark.skipif(not OFFICIAL_KEYS.is_dir(), reason='../shared (official key lists) not present')
@pytest.mark.parametrize(
    'name, arch',
    [('dat_tiny', 'dat-t'), ('dat_base_384', 'dat-b-384'), ('dat_pp_tiny', 'datpp-t'), ('dat_pp_base', 'datpp-b')],
)
def test_original_key_gives_the_released_names(name, arch):
    lines = (OFFICIAL_KEYS / f'{name}.txt').read_text().splitlines()
    official = {line.split()[0] for line in lines if line and not line.startswith('#') and '[buffer]' not in line}
    model = DAT(arch, out_indices=(3,), img_size=384 if arch.endswith('384') else 224)
    ours = {original_key(k, model.version, classifier=True) for k in model.state_dict()}
    assert ours == official - {'cls_head.weight', 'cls_head.bias'}


def test_group_keys_lists_every_key_compactly():
    keys = [
        'patch_proj.0.weight',
        'patch_proj.0.bias',
        'patch_proj.3.weight',
        'patch_proj.3.bias',
        'stages.2.attns.1.proj_q.weight',
        'stages.2.attns.3.proj_q.weight',
        'stages.2.attns.5.rpe_table',
        'cls_norm.norm.weight',
        'cls_head.bias',
    ]
    assert group_keys(keys) == [
        'patch_proj.{0, 3}.{weight, bias}',
        'stages.2.attns.{1, 3}.proj_q.weight',
        'stages.2.attns.5.rpe_table',
        'cls_norm.norm.weight',
        'cls_head.bias',
    ]
    assert group_keys([]) == []


def test_missing_down_projection_is_named():
    """Used to fail with ``KeyError: 'down_projs.0.0.weight'`` while reading the layout."""
    state = original_checkpoint(TINY['pp'])
    del state['down_projs.0.0.weight']
    with pytest.raises(ConversionError) as error:
        convert_original_state_dict(state)
    message = str(error.value)
    assert 'KeyError' not in message
    assert message == (
        'Conversion failed:\n  the checkpoint lacks 1 of the 176 tensors of this custom pp layout '
        '(as read from the tensors present):\n    down_projs.0.0.weight'
    )


def test_many_missing_tensors_are_listed_in_groups_with_other_problems():
    state = original_checkpoint(TINY['v1'])
    removed = [k for k in state if re.match(r'stages\.[02]\.mlps\.|patch_proj\.1\.|cls_head\.bias', k)]
    for key in removed:
        del state[key]
    state['stages.1.attns.0.extra'] = torch.ones(1)
    with pytest.raises(ConversionError) as error:
        convert_original_state_dict(state)
    lines = str(error.value).splitlines()
    assert lines[1] == (
        '  unused source tensor stages.1.attns.0.extra (-> stages.1.blocks.0.attn.extra, no such parameter)'
    )
    assert re.match(rf'  the checkpoint lacks {len(removed)} of the \d+ tensors of this custom v1 layout', lines[2])
    assert lines[3:] == [
        '    patch_proj.1.{norm.weight, norm.bias}',
        '    stages.0.mlps.{0, 1}.{chunk.linear1.weight, chunk.linear1.bias, chunk.linear2.weight, chunk.linear2.bias}',
        '    stages.2.mlps.{0, 1}.{chunk.linear1.weight, chunk.linear1.bias, chunk.linear2.weight, chunk.linear2.bias}',
        '    cls_head.bias',
    ]


def test_a_released_variant_fills_a_stage_without_tensors():
    """Stage 3 of DAT-T++ is gone: its layout comes from the one released variant that fits the rest."""
    state = original_checkpoint('datpp-t', dense=True)
    state = {k: v for k, v in state.items() if not k.startswith('backbone.stages.3.')}
    with pytest.raises(ConversionError) as error:
        convert_original_state_dict(state)
    assert str(error.value).splitlines() == [
        'Conversion failed:',
        '  the checkpoint lacks 52 of the 593 tensors of the datpp-t layout (as read from the tensors present) '
        "(names after 'backbone.'):",
        '    stages.3.local_perception_units.{0, 1}.{weight, bias}',
        '    stages.3.layer_norms.{0, 1, 2, 3}.{norm.weight, norm.bias}',
        '    stages.3.attns.{0, 1}.{rpe_table, proj_q.weight, proj_q.bias, proj_k.weight, proj_k.bias, proj_v.weight, '
        'proj_v.bias, proj_out.weight, proj_out.bias, conv_offset.0.weight, conv_offset.0.bias, '
        'conv_offset.1.norm.weight, conv_offset.1.norm.bias, conv_offset.3.weight}',
        '    stages.3.mlps.{0, 1}.{linear1.0.weight, linear1.0.bias, dwc.weight, dwc.bias, linear2.0.weight, '
        'linear2.0.bias}',
    ]


def test_unreadable_layout_says_what_is_missing():
    state = original_checkpoint(TINY['pp'])
    state = {k: v for k, v in state.items() if not k.startswith('stages.2.attns.1.')}
    with pytest.raises(
        ConversionError,
        match=r'(?s)Cannot read the DAT layout.*no released variant fits.*\n'
        r'  stage_spec\[2\]: no attention tensor of block\(s\) \[1\] '
        r'\(stages\.2\.attns\.b\.\*\) is present',
    ):
        convert_original_state_dict(state)
    with pytest.raises(ConversionError, match='Not an original DAT checkpoint: no tensor is named as in the original'):
        convert_original_state_dict({'backbone.stem.conv1.weight': torch.ones(1)})


def test_converter_cli_lists_missing_tensors(tmp_path):
    state = original_checkpoint(TINY['pp'])
    for key in ('down_projs.0.0.weight', 'stages.0.attns.1.rpe_table', 'stages.2.attns.1.rpe_table'):
        del state[key]
    src, dst = tmp_path / 'partial.pth', tmp_path / 'out' / 'converted.pth'
    torch.save(dict(model=state), src)
    result = subprocess.run(
        [sys.executable, str(REPO / 'tools/model_converters/dat_official.py'), str(src), str(dst)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 1 and not dst.exists()
    assert result.stderr == (
        'error: Conversion failed:\n  the checkpoint lacks 3 of the 176 tensors of this custom '
        'pp layout (as read from the tensors present):\n    stages.0.attns.1.rpe_table\n'
        '    down_projs.0.0.weight\n    stages.2.attns.1.rpe_table\n'
    )
