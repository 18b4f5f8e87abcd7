"""Constructor arguments of the DAT backbone: each wrong kind of value gets an error that says what
was expected and what was given; the opt-in search for non-finite values."""

import math

import pytest
import torch
from fixtures.tiny_archs import TINY

import projects.dat.models.dat as dat_module
from projects.dat import DAT
from projects.dat.models.variants import CANONICAL_ARCHS, resolve_arch

NAN, INF = float('nan'), float('inf')


def _arch(version, /, **changes):
    return dict(TINY[version], **changes)


# ---------------------------------------------------------------------------------------------
# Opt-in search for non-finite values
# ---------------------------------------------------------------------------------------------


def _record_logs(monkeypatch):
    records = []
    monkeypatch.setattr(dat_module, 'print_log', lambda msg, **kwargs: records.append((msg, kwargs.get('level'))))
    return records


def test_non_finite_check_is_off_by_default(monkeypatch):
    records = _record_logs(monkeypatch)
    searched = []
    monkeypatch.setattr(DAT, 'locate_non_finite', lambda self, x: searched.append(x) or 'searched')
    model = DAT(TINY['pp']).train()
    assert model.check_finite is False
    images = torch.randn(1, 3, 64, 64)
    images[0, 0, 5, 5] = float('nan')
    outs = model(images)
    assert not torch.isfinite(outs[0]).all()  # the NaN went through, nobody looked
    assert records == [] and searched == []


def test_non_finite_check_names_the_first_module(monkeypatch):
    records = _record_logs(monkeypatch)
    model = DAT(TINY['pp'], check_finite=True)
    with torch.no_grad():
        model.stages[1].blocks[0].attn.proj.bias[0] = float('inf')
    model.eval()(torch.randn(1, 3, 64, 64))
    assert records == []  # only in training mode
    model.train()(torch.randn(1, 3, 64, 64))
    import logging

    assert records == [
        (
            'DAT: non-finite values in the backbone output, first produced by '
            'stages.1.blocks.0 (NeighborhoodAttention)',
            logging.WARNING,
        )
    ]


def test_non_finite_check_names_the_input(monkeypatch):
    records = _record_logs(monkeypatch)
    images = torch.randn(1, 3, 64, 64)
    images[0, 1, 0, 0] = float('inf')
    DAT(TINY['v1'], check_finite=True).train()(images)
    assert [msg for msg, _ in records] == [
        'DAT: non-finite values in the backbone output, first produced by the input images'
    ]


def test_non_finite_check_through_the_registry():
    from mmengine.registry import MODELS

    assert MODELS.build(dict(type='DAT', arch=TINY['pp'], check_finite=True)).check_finite is True


# ---------------------------------------------------------------------------------------------
# Construction errors
# ---------------------------------------------------------------------------------------------

ARCH_ERRORS = [
    # offset_range_factor: v1 needs a finite number > 0; DAT++ does not use it
    *[
        pytest.param(
            'v1',
            dict(offset_range_factor=v),
            r"offset_range_factor'\] must be a finite number > 0 for v1.*"
            + f'got {v!r}'.replace('(', r'\(').replace(')', r'\)'),
            id=f'offset_range_factor={v!r}',
        )
        for v in (None, 0, 0.0, -2.0, NAN, INF, True, '2.0')
    ],
    pytest.param(
        'pp',
        dict(offset_range_factor=2.0),
        r"offset_range_factor'\] applies to v1 only.*got 2.0",
        id='offset_range_factor-pp',
    ),
    # neighbourhood sizes: odd ints >= 1
    *[
        pytest.param(
            'pp',
            dict(neighborhood_size=v),
            rf"neighborhood_size'\] must be an odd positive int .*got {v!r}",
            id=f'neighborhood_size={v!r}',
        )
        for v in (0, -1, 6, 8, True, 7.0)
    ],
    # stage_spec: a list of 4 non-empty strings of block letters
    pytest.param(
        'pp',
        dict(stage_spec='NDNDNDDD'),
        r"stage_spec'\] must be a list of 4 entries.*got 'NDNDNDDD'",
        id='stage_spec-str',
    ),
    pytest.param(
        'pp',
        dict(stage_spec=[['N', 'D'], 'N', 'ND', 'DD']),
        r"stage_spec\[0\] must be a non-empty string of the block letters.*got \['N', 'D'\]",
        id='stage_spec-list-of-letters',
    ),
    pytest.param(
        'pp',
        dict(stage_spec=['ND', ['ND', 'N'], 'ND', 'DD']),
        r"stage_spec\[1\] must be .*got \['ND', 'N'\]",
        id='stage_spec-multi-letter-strings',
    ),
    pytest.param(
        'pp', dict(stage_spec=['nd', 'N', 'ND', 'DD']), r"stage_spec\[0\] must be .*got 'nd'", id='stage_spec-lowercase'
    ),
    pytest.param(
        'pp', dict(stage_spec=['ND', '', 'ND', 'DD']), r"stage_spec\[1\] must be .*got ''", id='stage_spec-empty'
    ),
    pytest.param(
        'pp', dict(stage_spec=['N D', 'N', 'ND', 'DD']), r"stage_spec\[0\] must be .*got 'N D'", id='stage_spec-space'
    ),
    pytest.param(
        'v1',
        dict(stage_spec=['LS', 'L', 'LD', 'DX']),
        r"stage_spec\[3\] must be .*got 'DX'",
        id='stage_spec-unknown-letter',
    ),
    # bools and floats where ints are expected
    pytest.param(
        'pp', dict(groups=[1, True, 2, 2]), r"groups'\] must hold ints >= 0.*got \[1, True, 2, 2\]", id='groups-bool'
    ),
    pytest.param('pp', dict(groups=[1, 1, 2.0, 2]), r"groups'\] must hold ints >= 0", id='groups-float'),
    pytest.param(
        'pp',
        dict(dims=[16, 32, 64, True]),
        r"dims'\] must hold positive ints.*got \[16, 32, 64, True\]",
        id='dims-bool',
    ),
    pytest.param('pp', dict(heads=[True, 2, 2, 4]), r"heads'\] must hold positive ints.*True", id='heads-bool'),
    pytest.param(
        'pp', dict(key_strides=[8, 4, True, 1]), r"key_strides'\] must hold positive ints.*True", id='key_strides-bool'
    ),
    pytest.param(
        'pp',
        dict(offset_kernels=[9, 7, 5, True]),
        r"offset_kernels'\] must hold positive ints.*True",
        id='offset_kernels-bool',
    ),
    pytest.param(
        'v1', dict(window_size=True), r"window_size'\] must hold positive ints, got True", id='window_size-bool'
    ),
    pytest.param('pp', dict(mlp_ratio=True), r"mlp_ratio'\] must hold positive ints, got True", id='mlp_ratio-bool'),
    pytest.param('pp', dict(mlp_ratio=4.0), r"mlp_ratio'\] must hold positive ints, got 4.0", id='mlp_ratio-float'),
    pytest.param(
        'pp',
        dict(dims=[15, 30, 60, 120], heads=[1, 2, 2, 4], groups=[1, 1, 2, 2]),
        r"arch\['dims'\]\[0\] must be even for DAT\+\+ .*got 15",
        id='dims0-odd-pp',
    ),
    pytest.param(
        'pp', dict(dims=(16, 32, 64)), r"dims'\] must be a list of 4 entries.*got \(16, 32, 64\)", id='dims-three'
    ),
    pytest.param('pp', dict(heads=4), r"heads'\] must be a list of 4 entries.*got 4", id='heads-int'),
    # drop_path_rate inside the arch dict
    *[
        pytest.param(
            'pp',
            dict(drop_path_rate=v),
            rf"arch\['drop_path_rate'\] must be a number in \[0, 1\), got {v!r}",
            id=f'arch-drop_path_rate={v!r}',
        )
        for v in (NAN, 1.0, -0.1, True, '0.1')
    ],
    pytest.param(
        'pp', dict(version=['pp']), r"arch\['version'\] must be one of \('v1', 'pp'\), got \['pp'\]", id='version-list'
    ),
]


@pytest.mark.parametrize('version, changes, match', ARCH_ERRORS)
def test_arch_errors(version, changes, match):
    with pytest.raises(ValueError, match=match):
        DAT(_arch(version, **changes))


KWARG_ERRORS = [
    pytest.param(
        dict(frozen_stages=True),
        ValueError,
        r'frozen_stages must be an int in -1..4, got True',
        id='frozen_stages-bool',
    ),
    pytest.param(
        dict(frozen_stages=1.0), ValueError, r'frozen_stages must be an int in -1..4, got 1.0', id='frozen_stages-float'
    ),
    pytest.param(
        dict(out_indices=[True]),
        ValueError,
        r'out_indices must be increasing distinct ints.*got \[True\]',
        id='out_indices-[True]',
    ),
    pytest.param(dict(out_indices=True), ValueError, r'out_indices must be .*got True', id='out_indices-True'),
    pytest.param(
        dict(out_indices=(0, 1.0)), ValueError, r'out_indices must be .*got \(0, 1.0\)', id='out_indices-float'
    ),
    pytest.param(dict(out_indices='0123'), ValueError, r"out_indices must be .*got '0123'", id='out_indices-str'),
    pytest.param(dict(img_size=True), ValueError, r'img_size must be .*got True', id='img_size-bool'),
    pytest.param(
        dict(img_size=(224, True)), ValueError, r'img_size must be .*got \(224, True\)', id='img_size-pair-bool'
    ),
    *[
        pytest.param(
            dict(drop_path_rate=v),
            ValueError,
            rf'drop_path_rate must be a number in \[0, 1\), got {v!r}',
            id=f'drop_path_rate={v!r}',
        )
        for v in (NAN, INF, True, '0.1', 1.0)
    ],
    *[
        pytest.param(
            {name: value}, TypeError, rf'{name} must be a bool \(True or False\), got {value!r}', id=f'{name}={value!r}'
        )
        for name, value in (
            ('with_cp', 'yes'),
            ('recompute_ffn', 1),
            ('norm_eval', None),
            ('check_finite', 'no'),
            ('with_cp', 0),
        )
    ],
    pytest.param(
        dict(init_cfg=dict(type='Pretrained')),
        ValueError,
        r"A Pretrained init_cfg needs checkpoint=.*got \{'type': 'Pretrained'\}",
        id='Pretrained-no-checkpoint',
    ),
    pytest.param(
        dict(init_cfg=dict(type='Pretrained', checkpoint=None, prefix='backbone.')),
        ValueError,
        r'A Pretrained init_cfg needs checkpoint=.*None',
        id='Pretrained-checkpoint-None',
    ),
    pytest.param(
        dict(init_cfg=dict(type='Pretrained', checkpoint='')),
        ValueError,
        r'A Pretrained init_cfg needs checkpoint=',
        id='Pretrained-checkpoint-empty',
    ),
    pytest.param(
        dict(init_cfg=dict(type='Pretrained', checkpoint='a.pth', prefix=1)),
        TypeError,
        r"init_cfg\['prefix'\] must be a str such as 'backbone.' or None, got 1",
        id='Pretrained-prefix-int',
    ),
    pytest.param(
        dict(init_cfg=[dict(type='Pretrained', checkpoint='a.pth')]),
        ValueError,
        r'Pretrained init_cfg strictly only when it is given alone, as a dict',
        id='Pretrained-in-list',
    ),
    pytest.param(
        dict(init_cfg='a.pth'),
        TypeError,
        r"init_cfg must be a dict, a list of dicts or None, got str 'a.pth'",
        id='init_cfg-str',
    ),
    pytest.param(dict(arch=['datpp-t']), TypeError, r'arch must be a str or a dict, got list', id='arch-list'),
    pytest.param(dict(attn_impl='cuda'), ValueError, r"attn_impl must be one of .*got 'cuda'", id='attn_impl'),
]


@pytest.mark.parametrize('kwargs, error, match', KWARG_ERRORS)
def test_keyword_errors(kwargs, error, match):
    kwargs.setdefault('arch', TINY['pp'])
    with pytest.raises(error, match=match):
        DAT(**kwargs)


@pytest.mark.parametrize('name', CANONICAL_ARCHS)
def test_every_variant_passes_the_checks_as_a_custom_dict(name):
    """The zoo's settings (offset_range_factor 2.0 for v1, None for DAT++) are valid custom settings."""
    settings = resolve_arch(name)
    assert resolve_arch(dict(settings)) == settings
    assert (settings['offset_range_factor'] is None) == (settings['version'] == 'pp')


@pytest.mark.parametrize(
    'version, changes',
    [
        ('v1', dict(offset_range_factor=3)),
        ('v1', dict(offset_range_factor=0.5)),
        ('pp', dict(offset_range_factor=None)),
        ('pp', dict(neighborhood_size=3)),
        ('pp', dict(stage_spec=('ND', 'N', 'ND', 'DD'), dims=(16, 32, 64, 128))),
    ],
)
def test_valid_custom_settings_build_and_run(version, changes):
    model = DAT(_arch(version, **changes), drop_path_rate=0, out_indices=2, frozen_stages=0).eval()
    with torch.no_grad():
        (out,) = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 64, 4, 4) and math.isfinite(out.sum().item())
    assert model.drop_path_rate == 0.0
