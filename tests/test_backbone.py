"""Backbone tests: golden parity with the original code, conversion, training behaviour, errors.

The tests that take ``device`` (``tests/conftest.py``) also run on CUDA where a GPU is visible.
"""

import argparse
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.released import RELEASED_PARAMS
from fixtures.tiny_archs import TINY

from projects.dat import DAT
from projects.dat.converter import (
    ConversionError,
    convert_original_state_dict,
    infer_original_arch,
)
from projects.dat.models.geometry import (
    relative_position_index,
    shift_size_for,
    shifted_window_mask,
    stripes_with_halo,
)
from projects.dat.models.inspection import record_sampling_points
from projects.dat.models.variants import CANONICAL_ARCHS
from projects.dat.ops import cpu_kernels, torch_compat

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
GOLDEN = SHARED / 'golden'
OFFICIAL_KEYS = SHARED / 'reference' / 'official_keys'
needs_shared = pytest.mark.skipif(not GOLDEN.is_dir(), reason='../shared (golden tensors) not present')

KEY_FILES = {
    'dat_tiny': ('dat-t', 224),
    'dat_small': ('dat-s', 224),
    'dat_base': ('dat-b', 224),
    'dat_base_384': ('dat-b-384', 384),
    'dat_pp_tiny': ('datpp-t', 224),
    'dat_pp_small': ('datpp-s', 224),
    'dat_pp_base': ('datpp-b', 224),
    'dat_pp_base_384': ('datpp-b', 224),
}  # DAT++ 384 keeps the 224 tables


def load_golden(name):
    return torch.load(GOLDEN / f'{name}.pt', weights_only=True)


def build_from_original(state_dict, out_indices=(3,)):
    converted, info = convert_original_state_dict(state_dict)
    model = DAT(arch=info['arch'], out_indices=out_indices, img_size=tuple(info['img_size']))
    model.load_state_dict(
        {k[len('backbone.') :]: v for k, v in converted.items() if k.startswith('backbone.')},
        strict=out_indices == (3,),
    )
    return model.eval(), converted, info


@needs_shared
@pytest.mark.parametrize('name', ['dat_v1_small', 'dat_pp_small'])
def test_golden_parity(name, device):
    golden = load_golden(name)
    model, converted, _ = build_from_original(golden['state_dict'])
    model.to(device)
    stage_outputs = []
    for stage in model.stages:
        stage.register_forward_hook(lambda module, args, out: stage_outputs.append(out.cpu()))
    for case_name, case in golden['cases'].items():
        stage_outputs.clear()
        with torch.no_grad(), record_sampling_points(model) as records:
            pooled = model(case['input'].to(device))[0].mean((2, 3)).cpu()
        logits = pooled @ converted['head.fc.weight'].t() + converted['head.fc.bias']
        torch.testing.assert_close(logits, case['logits'], atol=1e-4, rtol=1e-4, msg=f'{case_name} logits')
        for i, (ours, ref) in enumerate(zip(stage_outputs, case['stages'], strict=True)):
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4, msg=f'{case_name} stage {i}')
        assert len(records) == len(case['positions'])
        for original_name, ref in case['positions'].items():
            _, stage, _, block = original_name.split('.')
            ours = records[f'stages.{stage}.blocks.{block}.attn']['positions'].cpu()
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5, msg=f'{case_name} {original_name}')


def _official_shapes(path):
    header, shapes = path.read_text().splitlines()[:2], {}
    for line in path.read_text().splitlines():
        if line.startswith('#') or not line.strip():
            continue
        m = re.match(r'(\S+) \(([\d, ]*)\)( \[buffer\])?', line)
        shapes[m[1]] = (tuple(int(s) for s in m[2].split(',') if s.strip()), bool(m[3]))
    total = int(re.search(r'(\d+) parameters', header[0])[1])
    return shapes, total


def _fake_original(shapes, window):
    """Random tensors of the official shapes; derived buffers get their true values."""
    state_dict = {}
    for key, (shape, _is_buffer) in shapes.items():
        if key.endswith('relative_position_index'):
            state_dict[key] = relative_position_index(window)
        elif key.endswith('attn_mask'):
            side = math.isqrt(shape[0]) * window
            state_dict[key] = shifted_window_mask(side, side, window, shift_size_for(window))
        else:
            state_dict[key] = torch.randn(shape)
    return state_dict


@needs_shared
@pytest.mark.parametrize('key_file', sorted(KEY_FILES))
def test_convert_every_released_layout(key_file):
    arch, img_size = KEY_FILES[key_file]
    shapes, total = _official_shapes(OFFICIAL_KEYS / f'{key_file}.txt')
    window = 12 if arch == 'dat-b-384' else 7
    converted, info = convert_original_state_dict(_fake_original(shapes, window))
    assert info['arch'] == arch and info['img_size'] == [img_size, img_size] and info['kind'] == 'classifier'
    n_params = sum(v.numel() for v in converted.values())
    assert n_params == total
    assert round(n_params / 1e6, 2) == RELEASED_PARAMS[arch]


@needs_shared
def test_convert_dense_checkpoint_and_strictness():
    shapes, _ = _official_shapes(OFFICIAL_KEYS / 'dat_pp_tiny.txt')
    original = {f'backbone.{k}': v for k, v in _fake_original(shapes, 7).items() if not k.startswith('cls_')}
    for i, dim in enumerate([64, 128, 256, 512]):
        original[f'backbone.norms.{i}.norm.weight'] = torch.ones(dim)
        original[f'backbone.norms.{i}.norm.bias'] = torch.zeros(dim)
    original['neck.lateral_convs.0.conv.weight'] = torch.randn(256, 64, 1, 1)
    converted, info = convert_original_state_dict(original)
    assert info['kind'] == 'dense' and info['arch'] == 'datpp-t'
    assert 'backbone.norm2.weight' in converted and 'neck.lateral_convs.0.conv.weight' in converted
    model = DAT('datpp-t')
    model.load_state_dict({k[9:]: v for k, v in converted.items() if k.startswith('backbone.')}, strict=True)

    broken = dict(original)
    del broken['backbone.stages.2.attns.3.proj_q.bias']
    broken['backbone.stages.0.attns.0.extra'] = torch.zeros(1)
    with pytest.raises(
        ConversionError,
        match=r'(?s)unused source tensor stages\.0\.attns\.0\.extra.*'
        r'lacks 1 of the 593 tensors of the datpp-t layout.*:\n'
        r'    stages\.2\.attns\.3\.proj_q\.bias$',
    ):
        convert_original_state_dict(broken)


@pytest.mark.parametrize('arch', CANONICAL_ARCHS)
def test_variant_table(arch):
    model = DAT(arch, out_indices=(3,), img_size=384 if arch == 'dat-b-384' else 224)
    n_params = sum(p.numel() for p in model.parameters()) + (model.num_features[-1] + 1) * 1000
    assert round(n_params / 1e6, 2) == RELEASED_PARAMS[arch]
    assert 'groups' in repr(model)


@pytest.mark.parametrize('version', ['v1', 'pp'])
@pytest.mark.parametrize('size', [(1, 1), (16, 16), (33, 47), (112, 137), (64, 64)])
def test_any_input_size(version, size, device):
    model = DAT(TINY[version]).eval().to(device)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size).to(device))
    h, w = size
    for i, out in enumerate(outs):
        h, w = math.ceil(h / (4 if i == 0 else 2)), math.ceil(w / (4 if i == 0 else 2))
        assert out.shape == (1, model.num_features[i], h, w)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize('version', ['v1', 'pp'])
def test_gradients_reach_every_parameter_and_with_cp_matches(version, device):
    torch.manual_seed(0)
    model = DAT(TINY[version], drop_path_rate=0.0).to(device)
    x = torch.randn(2, 3, 64, 96).to(device)
    loss = sum(o.square().mean() for o in model(x))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model_cp = DAT(TINY[version], drop_path_rate=0.0, with_cp=True).to(device)
    model_cp.load_state_dict(model.state_dict())
    loss_cp = sum(o.square().mean() for o in model_cp(x))
    loss_cp.backward()
    torch.testing.assert_close(loss_cp, loss)
    for name, p in model_cp.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize('version', ['pp', 'v1'])
def test_recompute_ffn_same_results_less_stored(version, device):
    torch.manual_seed(0)
    lean = DAT(TINY[version], drop_path_rate=0.0).to(device)
    assert all(block.mlp.recompute_hidden for stage in lean.stages for block in stage.blocks)
    plain = DAT(TINY[version], drop_path_rate=0.0, recompute_ffn=False).to(device)
    plain.load_state_dict(lean.state_dict())
    x = torch.randn(2, 3, 64, 96).to(device)
    for model in (lean, plain):
        sum(o.square().mean() for o in model(x)).backward()
    # On CUDA the D blocks' table gradients are scatter-adds, summed in a varying order.
    tolerance = dict(atol=1e-7, rtol=1e-6) if device.type == 'cpu' else dict(atol=1e-6, rtol=1e-5)
    for (name, p), q in zip(lean.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **tolerance, msg=name)
    # What the backward pass keeps of one FFN: fc1's output alone instead of it and the hidden
    # tensors after it (v1: GELU output; DAT++: GELU output, and GELU input where the hidden layer
    # is not the fused CPU kernel).
    fused = version == 'pp' and device.type == 'cpu' and cpu_kernels.load_kernels() is not None
    stored_without = 3 if version == 'pp' and not fused else 2
    ffn, ffn_plain = lean.stages[0].blocks[0].mlp, plain.stages[0].blocks[0].mlp
    dim, hidden_dim = ffn.fc2.weight.shape[:2]
    h = torch.randn(2, dim, 16, 24).to(device).requires_grad_()
    hidden = 2 * hidden_dim * 16 * 24

    def stored(module):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            module(h)
        return sum(n for n in sizes if n >= hidden)

    assert stored(ffn) == hidden and stored(ffn_plain) == stored_without * hidden
    # Off where it would be redundant: whole blocks are recomputed with with_cp.
    cp_model = DAT(TINY[version], with_cp=True)
    assert not any(block.mlp.recompute_hidden for stage in cp_model.stages for block in stage.blocks)


# Ops that make a tensor from host values or read one back: on a GPU each is a copy that waits
# for the device to finish its queue, so the host can no longer run ahead of it.
HOST_ROUND_TRIPS = ('aten::lift_fresh', 'aten::lift_fresh_copy', 'aten::_local_scalar_dense', 'aten::nonzero')


@pytest.mark.parametrize('version', ['v1', 'pp'])
def test_training_step_does_not_wait_for_the_device(version, device):
    """A training step of the PyTorch operators (what runs on a GPU) neither copies host values to
    the device nor reads values back. On CUDA, torch's sync debug mode raises at any synchronising
    call; on CPU, the profiler finds the ops that would be one on a GPU (also inside the custom
    operators, which the profiler sees into)."""
    torch.manual_seed(0)
    model = DAT(TINY[version], attn_impl='pytorch').to(device)
    x = torch.randn(2, 3, 64, 96).to(device)
    sum(o.square().mean() for o in model(x)).backward()  # warm-up: lazy one-time set-up may sync
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
        try:
            loss = sum(o.square().mean() for o in model(x))
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode('default')
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        sum(o.square().mean() for o in model(x)).backward()
    found = sorted({event.name for event in prof.events() if event.name in HOST_ROUND_TRIPS})
    assert not found, found


def test_frozen_stages_and_norm_eval():
    model = DAT(TINY['pp'], frozen_stages=2, norm_eval=True)
    model.train()
    assert not model.stem.training and not model.stages[1].training and model.stages[2].training
    assert not model.norm0.training and not model.norm1.training
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    sum(o.sum() for o in model(torch.randn(1, 3, 64, 64))).backward()
    frozen_modules = (model.stem, model.stages[0], model.stages[1], model.norm0, model.norm1)
    frozen = [p for m in frozen_modules for p in m.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    assert all(p.grad is not None for p in model.stages[2].parameters())


def test_recording_costs_nothing_outside_context():
    model = DAT(TINY['pp']).eval()
    with torch.no_grad(), record_sampling_points(model) as records:
        model(torch.randn(1, 3, 64, 64))
    assert set(records) == {
        'stages.0.blocks.1.attn',
        'stages.2.blocks.1.attn',
        'stages.3.blocks.0.attn',
        'stages.3.blocks.1.attn',
    }
    assert records['stages.0.blocks.1.attn']['positions'].shape == (1, 1, 2, 2, 2)
    assert all('sampling_positions' not in vars(m) for m in model.modules())  # unwrapped on exit
    recorded = records['stages.0.blocks.1.attn']
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert records['stages.0.blocks.1.attn'] is recorded


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg', 'mmpretrain'])
def test_builds_through_toolbox_registries(scope):
    registry = pytest.importorskip(f'{scope}.registry', reason=f'{scope} is not installed').MODELS
    if scope in ('mmdet', 'mmseg'):  # the registry imports the toolbox's models, which import mmcv.ops
        pytest.importorskip('mmcv.ops', reason=f"{scope}'s models need mmcv's compiled ops (mmcv-lite has none)")
    model = registry.build(dict(type='DAT', arch=TINY['pp'], out_indices=(1, 2, 3)))
    assert isinstance(model, DAT) and len(model(torch.randn(1, 3, 64, 64))) == 3


@pytest.mark.parametrize(
    'kwargs, error, match',
    [
        (dict(arch='dat-x'), ValueError, r"Unknown DAT arch 'dat-x'; expected one of \['dat-t'"),
        (dict(arch=dict(version='v1', dims=[8] * 4)), ValueError, r"missing keys \['heads', 'groups', 'stage_spec'\]"),
        (dict(arch=dict(TINY['pp'], version='v3')), ValueError, r"arch\['version'\] must be one of"),
        (dict(arch=dict(TINY['pp'], stage_spec=['NX', 'N', 'N', 'N'])), ValueError, r'stage_spec\[0\] must be'),
        (dict(arch=dict(TINY['pp'], groups=[1, 1, 3, 2])), ValueError, r'groups\[2\]=3 must be >= 1 and divide'),
        (dict(arch=dict(TINY['pp'], colour='red')), ValueError, r"Unknown keys in custom DAT arch: \['colour'\]"),
        (dict(out_indices=(0, 4)), ValueError, r'out_indices must be increasing distinct ints in 0..3, got \(0, 4\)'),
        (dict(out_indices=(2, 1)), ValueError, r'out_indices must be increasing'),
        (dict(frozen_stages=5), ValueError, r'frozen_stages must be an int in -1..4, got 5'),
        (dict(drop_path_rate=1.5), ValueError, r'drop_path_rate must be a number in \[0, 1\), got 1.5'),
    ],
)
def test_construction_errors(kwargs, error, match):
    kwargs.setdefault('arch', TINY['pp'])
    with pytest.raises(error, match=match):
        DAT(**kwargs)


def test_input_errors():
    model = DAT(TINY['v1'])
    with pytest.raises(ValueError, match=r'expects images of shape \(B, 3, H, W\), got \(1, 4, 32, 32\)'):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r'expects images of shape \(B, 3, H, W\), got \(3, 32, 32\)'):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"parameters' dtype torch.float32 \(or autocast\), got torch.uint8"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r'at least 1x1 pixels, got \(1, 3, 0, 32\)'):
        model(torch.zeros(1, 3, 0, 32))


def _save_classifier(tmp_path, model, name='ckpt.pth'):
    state = {f'backbone.{k}': v for k, v in model.state_dict().items()}
    state['head.fc.weight'] = torch.zeros(10, model.num_features[-1])
    state['head.fc.bias'] = torch.zeros(10)
    path = tmp_path / name
    torch.save(dict(state_dict=state, meta=dict()), path)
    return path


def test_pretrained_init_cfg_loads_strictly_and_resizes_tables(tmp_path, capsys):
    source = DAT(TINY['pp'], out_indices=(3,))
    path = _save_classifier(tmp_path, source)
    model = DAT(TINY['pp'], img_size=320, init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    model.init_weights()
    torch.testing.assert_close(model.stages[1].blocks[0].attn.qkv.weight, source.stages[1].blocks[0].attn.qkv.weight)
    table = model.stages[0].blocks[1].attn.rpe_table
    assert table.shape == (1, 159, 159)
    torch.testing.assert_close(model.norm3.weight, source.norm3.weight)

    other = DAT(dict(TINY['pp'], dims=[16, 32, 64, 256]), out_indices=(3,))
    wrong = _save_classifier(tmp_path, other, 'wrong.pth')
    model = DAT(TINY['pp'], init_cfg=dict(type='Pretrained', checkpoint=str(wrong), prefix='backbone.'))
    with pytest.raises(ConversionError, match=r'does not fit .*\n.*shape \(256, 64, 3, 3\) != model \(128, 64, 3, 3\)'):
        model.init_weights()


@needs_shared
def test_pretrained_refuses_unconverted_checkpoint(tmp_path):
    path = tmp_path / 'orig.pth'
    torch.save(dict(model=load_golden('dat_pp_small')['state_dict']), path)
    model = DAT(TINY['pp'], init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    with pytest.raises(ConversionError, match='original DAT checkpoint; convert it first'):
        model.init_weights()


@needs_shared
def test_converter_cli(tmp_path):
    golden = load_golden('dat_pp_small')
    src = tmp_path / 'original.pth'
    torch.save(dict(model=golden['state_dict'], config=argparse.Namespace(name='dat_pp')), src)
    dst = tmp_path / 'converted.pth'
    cmd = [sys.executable, str(REPO / 'tools/model_converters/dat_official.py'), str(src), str(dst)]
    refused = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 1 and 'trust' in refused.stderr and not dst.exists()
    done = subprocess.run(cmd + ['--trust-checkpoint'], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert 'detected DAT ++ (pp)' in done.stdout and 'construction size 224x224' in done.stdout
    converted = torch.load(dst, weights_only=True)
    assert converted['meta']['dat']['kind'] == 'classifier'
    model = DAT(
        converted['meta']['dat']['arch'],
        out_indices=(3,),
        init_cfg=dict(type='Pretrained', checkpoint=str(dst), prefix='backbone.'),
    )
    model.init_weights()
    case = golden['cases']['x96']
    with torch.no_grad():
        logits = (
            model.eval()(case['input'])[0].mean((2, 3)) @ converted['state_dict']['head.fc.weight'].t()
            + converted['state_dict']['head.fc.bias']
        )
    torch.testing.assert_close(logits, case['logits'], atol=1e-4, rtol=1e-4)


@needs_shared
def test_infer_original_arch_of_golden():
    arch, img_size = infer_original_arch(load_golden('dat_v1_small')['state_dict'])
    assert arch['stage_spec'] == ['LS', 'LS', 'LD', 'LD'] and arch['groups'] == [0, 0, 2, 4] and img_size == (224, 224)


def test_non_finite_values_are_reported_with_their_block(monkeypatch):
    import projects.dat.models.dat as dat_module

    messages = []
    monkeypatch.setattr(dat_module, 'print_log', lambda msg, **kwargs: messages.append(msg))
    model = DAT(TINY['pp'], check_finite=True)
    with torch.no_grad():
        model.stages[2].blocks[1].attn.proj_out.bias[0] = float('inf')
    model.eval()(torch.randn(1, 3, 64, 64))
    assert messages == []  # no check (and no cost) outside training
    outs = model.train()(torch.randn(1, 3, 64, 64))
    assert not torch.isfinite(outs[-1]).all()
    assert messages == [
        'DAT: non-finite values in the backbone output, first produced by stages.2.blocks.1 (DeformableAttention)'
    ]


@pytest.mark.parametrize('length, size, halo', [(1, 1, 1), (7, 3, 1), (9, 3, 1), (10, 4, 2), (5, 8, 1), (6, 1, 0)])
def test_stripes_with_halo_cover_every_row_once(length, size, halo):
    stripes = stripes_with_halo(length, size, halo)
    assert [row for start, end, _, _ in stripes for row in range(start, end)] == list(range(length))
    for start, end, halo_start, halo_end in stripes:
        assert end - start == min(size, length - start)
        assert (halo_start, halo_end) == (max(0, start - halo), min(length, end + halo))
    with pytest.raises(ValueError, match='size >= 1'):
        stripes_with_halo(5, 0, 1)


@pytest.mark.parametrize('batch, height, width, stripe_rows', [(1, 9, 7, 2), (2, 8, 5, 3), (1, 5, 6, 1), (2, 4, 4, 9)])
def test_conv_ffn_in_stripes_equals_whole_maps(batch, height, width, stripe_rows, monkeypatch):
    from projects.dat.models import dat as dat_module

    torch.manual_seed(0)
    ffn = dat_module.ConvFFN(4).eval()
    x = torch.randn(batch, 4, height, width)
    # A stripe budget of `stripe_rows` rows of the 16-channel hidden map, and a cache of unknown size.
    monkeypatch.setattr(dat_module, 'FFN_STRIPE_BYTES', stripe_rows * batch * 16 * width * 4)
    monkeypatch.setattr(dat_module, 'cpu_last_level_cache_bytes', lambda: 0)
    with torch.no_grad():
        striped = ffn(x)
        whole = ffn._after_fc1(ffn.fc1(x))
    torch.testing.assert_close(striped, whole, rtol=1e-6, atol=1e-6)
    # With autograd the whole maps are used (the stripes' slices would cost their backward).
    assert torch.equal(ffn(x.requires_grad_()).detach(), whole)


@pytest.mark.parametrize(
    'cache_maps, stripes',
    [(None, 3), (1.5, 3), (2, 1), (8, 1)],  # None: the cache's size unknown
)
def test_conv_ffn_stripes_only_where_the_maps_exceed_the_cache(cache_maps, stripes, monkeypatch):
    """At inference the ConvFFN runs in stripes where fc1's output and the hidden activations do not
    fit in the last-level cache together, else (as with autograd) on the whole maps."""
    from projects.dat.models import dat as dat_module

    ffn = dat_module.ConvFFN(4).eval()
    x = torch.randn(1, 4, 9, 7)
    map_bytes = 16 * 9 * 7 * 4  # the 16-channel hidden map
    monkeypatch.setattr(dat_module, 'FFN_STRIPE_BYTES', 3 * 16 * 7 * 4)  # 3-row stripes
    cache = 0 if cache_maps is None else int(cache_maps * map_bytes)
    monkeypatch.setattr(dat_module, 'cpu_last_level_cache_bytes', lambda: cache)
    calls = []
    hidden = ffn._hidden
    monkeypatch.setattr(ffn, '_hidden', lambda y: calls.append(y.shape[2]) or hidden(y))
    with torch.no_grad():
        ffn(x)
    assert len(calls) == stripes


@pytest.mark.skipif(not torch_compat.HAS_CUSTOM_OPS, reason='torch.compile of the fast ops needs torch 2.4+')
def test_conv_ffn_stripe_choice_compiles_without_graph_breaks(monkeypatch):
    """torch.compile takes the cache's size as a constant instead of tracing the file reads."""
    from projects.dat.models import dat as dat_module

    monkeypatch.setattr(dat_module, 'FFN_STRIPE_BYTES', 3 * 16 * 7 * 4)
    ffn = dat_module.ConvFFN(4).eval()
    x = torch.randn(1, 4, 9, 7)
    with torch.no_grad():
        compiled = torch.compile(ffn, backend='aot_eager', fullgraph=True)(x)
        torch.testing.assert_close(compiled, ffn(x), rtol=1e-6, atol=1e-6)


def test_last_level_cache_size_from_sysfs(tmp_path):
    """The largest data or unified cache of a sysfs-like folder (instruction caches ignored); 0
    where there is none or it cannot be read."""
    from projects.dat.ops import chunking

    for index, (level, kind, size) in enumerate(
        [(1, 'Data', '48K'), (1, 'Instruction', '64K'), (3, 'Unified', '32M'), (2, 'Unified', '2048K')]
    ):
        folder = tmp_path / 'cache' / f'index{index}'
        folder.mkdir(parents=True)
        for name, value in (('level', level), ('type', kind), ('size', size)):
            (folder / name).write_text(f'{value}\n')
    (tmp_path / 'cache' / 'uevent').write_text('')  # sysfs has files beside the index folders
    assert chunking.read_last_level_cache_bytes(str(tmp_path / 'cache')) == 32 << 20
    assert chunking.read_last_level_cache_bytes(str(tmp_path / 'missing')) == 0
    (tmp_path / 'cache' / 'index2' / 'size').write_text('lots\n')
    assert chunking.read_last_level_cache_bytes(str(tmp_path / 'cache')) == 0
    assert chunking.parse_cache_size('491520K') == 491520 << 10 and chunking.parse_cache_size('512') == 512
    with pytest.raises(ValueError, match="a cache size such as '48K'"):
        chunking.parse_cache_size('32X')
