"""FLOPs tool: the papers' numbers for every variant, closed forms of the attention cores,
the extra op handlers, config models of the three toolboxes, and errors."""

import importlib.util
import inspect
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fixtures.tiny_archs import TINY
from torch import nn

from projects.dat import DAT
from projects.dat import ops as attention_ops
from projects.dat.flops import (
    PAPER_COMPLEXITY,
    analyze_complexity,
    attention_impl,
    deformable_attention_macs,
    einsum_macs,
    neighborhood_attention_macs,
    sdpa_macs,
    window_attention_macs,
)
from projects.dat.models.dat import (
    DeformableAttention,
    NeighborhoodAttention,
    WindowAttention,
)
from projects.dat.models.geometry import query_grid
from projects.dat.models.inspection import record_sampling_points
from projects.dat.models.variants import CANONICAL_ARCHS

REPO = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location('get_flops', REPO / 'tools/analysis_tools/get_flops.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


get_flops = _load_tool()


@pytest.mark.parametrize('arch', [a for a in CANONICAL_ARCHS if PAPER_COMPLEXITY[a][2] == 224])
def test_paper_numbers_at_224(arch, tmp_path, capsys):
    """The CLI reproduces the published params (to the two decimals) and GMACs (within 1 %)."""
    out = tmp_path / 'flops.json'
    get_flops.main(['--arch', arch, '--json', str(out)])
    (result,) = json.loads(out.read_text())
    params_m, flops_g, _ = PAPER_COMPLEXITY[arch]
    assert round(result['params'] / 1e6, 2) == params_m
    assert abs(result['flops'] / 1e9 / flops_g - 1) < 0.01, result['flops']
    assert result['input_shape'] == [224, 224]
    assert result['suspicious_ops'] == {}
    assert result['paper'] == dict(params_m=params_m, flops_g=flops_g)
    table = capsys.readouterr().out
    assert f'| {arch} ' in table and f'{result["flops"] / 1e9:.2f}' in table


def test_params_of_the_384_model():
    model = get_flops.build_arch_model('dat-b-384', img_size=384)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == PAPER_COMPLEXITY['dat-b-384'][0]


@pytest.mark.parametrize('version', ['v1', 'pp'])
@pytest.mark.parametrize('size', [(96, 96), (100, 137)])
def test_attention_cores_match_closed_forms(version, size):
    """Traced MACs of every attention module's products equal the closed forms."""
    model = DAT(TINY[version]).eval()
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, (DeformableAttention, NeighborhoodAttention, WindowAttention)):
            m.register_forward_pre_hook(lambda mod, args, name=name: shapes.__setitem__(name, args[0].shape))
    with record_sampling_points(model) as records:
        result = analyze_complexity(model, torch.randn(1, 3, *size))
    assert len(shapes) == sum(len(s) for s in TINY[version]['stage_spec'])
    for name, (_, dim, h, w) in shapes.items():
        module = model.get_submodule(name)
        ops = result.by_module_and_operator[name]
        if isinstance(module, DeformableAttention):
            hk, wk = records[name]['positions'].shape[2:4]
            assert ops['einsum'] == deformable_attention_macs(h, w, hk, wk, dim), name
            # Sampling x and reading the bias table: 4 per output element of grid_sample.
            assert ops['grid_sampler'] == 4 * (dim * hk * wk + module.num_heads * h * w * hk * wk)
        elif isinstance(module, NeighborhoodAttention):
            assert ops['einsum'] == neighborhood_attention_macs(h, w, module.kernel_size, dim), name
        else:
            assert ops['matmul'] == window_attention_macs(h, w, module.window_size, dim), name


def test_matmul_convention_leaves_out_norms_and_sampling():
    model = DAT(TINY['pp']).eval()
    x = torch.randn(1, 3, 64, 64)
    paper, matmul = analyze_complexity(model, x), analyze_complexity(model, x, convention='matmul')
    assert paper.by_operator['layer_norm'] > 0 and paper.by_operator['grid_sampler'] > 0
    assert set(matmul.by_operator) <= {'conv', 'linear', 'einsum', 'matmul'}
    assert paper.flops - matmul.flops == paper.by_operator['layer_norm'] + paper.by_operator['grid_sampler']
    with pytest.raises(ValueError, match='convention must be one of'):
        analyze_complexity(model, x, convention='fvcore')


class _Attention(nn.Module):
    """One attention written three ways, as a fast path might."""

    def __init__(self, impl):
        super().__init__()
        self.impl = impl

    def forward(self, q, k, v, bias):
        if self.impl == 'einsum':
            attn = torch.einsum('bhmd,bhnd->bhmn', q, k) + bias
            return torch.einsum('bhmn,bhnd->bhmd', attn.softmax(-1), v)
        if self.impl == 'baddbmm':
            attn = torch.baddbmm(bias.flatten(0, 1), q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2))
            return torch.bmm(attn.softmax(-1), v.flatten(0, 1))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def test_attention_handlers_agree():
    b, h, m, n, d = 2, 3, 50, 17, 8
    inputs = (
        torch.randn(b, h, m, d),
        torch.randn(b, h, n, d),
        torch.randn(b, h, n, d),
        torch.randn(b, h, m, n),
    )
    expected = 2 * b * h * m * n * d
    for impl in ('einsum', 'baddbmm', 'sdpa'):
        result = analyze_complexity(_Attention(impl), inputs)
        assert result.flops == expected, impl
        assert not result.suspicious_ops
    assert sdpa_macs((b, h, m, d), (b, h, n, d), (b, h, n, 2 * d)) == b * h * m * n * 3 * d


def test_einsum_macs():
    assert einsum_macs('bcm,bcn->bmn', [(2, 4, 5), (2, 4, 7)]) == 2 * 4 * 5 * 7
    assert einsum_macs('b h n d, b h n k d -> b h n k', [(1, 2, 3, 4), (1, 2, 3, 5, 4)]) == 2 * 3 * 4 * 5
    assert einsum_macs('ij,jk->ik', [(1, 3), (3, 6)]) == 18
    with pytest.raises(ValueError, match='two-operand equation'):
        einsum_macs('ij,jk,kl->il', [(1, 2), (2, 3)])
    with pytest.raises(ValueError, match='does not match shape'):
        einsum_macs('ij,jk->ik', [(1, 2, 3), (2, 3)])


def test_attention_impl_switch_is_restored():
    model = nn.Sequential(nn.Linear(2, 2), NeighborhoodAttention(8, 2, 3, impl='fast'))
    with attention_impl(model, 'reference') as switched:
        assert switched == 1 and model[1].impl == 'reference'
    assert model[1].impl == 'fast'
    with attention_impl(model, None) as switched:
        assert switched == 0 and model[1].impl == 'fast'


_FAST_IMPLS = [i for i in getattr(attention_ops, 'ATTN_IMPLS', ()) if i != 'reference']
_HAS_SWITCH = 'attn_impl' in inspect.signature(DAT.__init__).parameters


@pytest.mark.skipif(not _FAST_IMPLS or not _HAS_SWITCH, reason='DAT has no attn_impl switch yet')
@pytest.mark.parametrize('impl', _FAST_IMPLS or ['none'])
def test_fast_attention_path_counts_like_the_reference(impl):
    """Counting the configured (fast) path gives the reference path's numbers, op by op.

    The 1x1 convs (PointwiseConv2d) of channels-last maps run, and count, as ``linear``, of
    others as ``conv``; the fast key sampling returns channels-last keys where ``grid_sample``
    returns contiguous ones, so the key and value projections move from one to the other.
    """
    model = DAT(TINY['pp'], attn_impl=impl).eval()
    reference = get_flops.count_model(model, (96, 128), attn='reference')
    configured = get_flops.count_model(model, (96, 128), attn=None)
    assert reference['attn_modules_switched'] > 0
    assert configured['suspicious_ops'] == {}

    def pointwise_merged(by_operator):
        merged = Counter(by_operator)
        merged['conv and linear'] = merged.pop('conv', 0) + merged.pop('linear', 0)
        return merged

    assert pointwise_merged(configured['by_operator']) == pointwise_merged(reference['by_operator'])


class _Deformable(nn.Module):
    def __init__(self, fast):
        super().__init__()
        self.fast = fast

    def forward(self, q, k, v, pos, table):
        coords = query_grid(q.shape[2], q.shape[3], 'pp')
        if self.fast:
            return attention_ops.deformable_attention(
                q, k, v, pos, coords[:, 0, 0], coords[0, :, 1], table, num_groups=2
            )
        return attention_ops.deformable_attention_reference(q, k, v, pos, coords.reshape(-1, 2), table, num_groups=2)


@pytest.mark.skipif(
    not hasattr(attention_ops, 'deformable_attention'),
    reason='no fused deformable attention op yet',
)
@pytest.mark.parametrize('convention', ['paper', 'matmul'])
def test_fused_deformable_op_counts_like_the_reference(convention):
    b, c, h, w, num_keys, heads = 2, 64, 10, 12, 15, 4
    args = (
        torch.randn(b, c, h, w),
        torch.randn(b, c, num_keys),
        torch.randn(b, c, num_keys),
        torch.rand(b * 2, num_keys, 2) * 2 - 1,
        torch.randn(heads, 19, 23),
    )
    reference = analyze_complexity(_Deformable(False), args, convention)
    fused = analyze_complexity(_Deformable(True), args, convention)
    assert fused.by_operator == reference.by_operator
    assert reference.by_operator['einsum'] == deformable_attention_macs(h, w, 1, num_keys, c, batch=b)


def test_classifier_config_matches_arch():
    cfg = str(REPO / 'configs/classification/datpp-t_8xb128_in1k.py')
    from_config = get_flops.main([cfg, '--shape', '64'])[0]
    from_arch = get_flops.main(['--arch', 'datpp-t', '--shape', '64'])[0]
    assert from_config['params'] == from_arch['params']
    assert from_config['flops'] == from_arch['flops']
    assert from_arch['paper'] is None  # not the paper's input size


def test_detector_config():
    """A two-stage detector (data samples with image metas); the input is padded to 32."""
    config = str(REPO / 'configs/detection/mask_rcnn/mask-rcnn_datpp-t_fpn_1x_coco.py')
    # Few proposals keep the RoI heads cheap; the counting path is the same.
    (result,) = get_flops.main([config, '--shape', '120', '150', '--cfg-options', 'model.test_cfg.rpn.max_per_img=10'])
    assert result['input_shape'] == [128, 160]
    assert result['suspicious_ops'] == {}
    assert result['by_operator']['einsum'] > 0 and result['by_operator']['conv'] > 0


def test_segmentor_config_and_backbone_only():
    config = str(REPO / 'configs/segmentation/upernet/upernet_dat-t_8xb2-160k_ade20k-512x512.py')
    (result,) = get_flops.main([config, '--shape', '64', '96'])
    assert result['input_shape'] == [64, 96]
    assert result['suspicious_ops'] == {}
    (backbone,) = get_flops.main([config, '--shape', '64', '96', '--backbone-only'])
    assert 0 < backbone['params'] < result['params'] and 0 < backbone['flops'] < result['flops']
    # The auxiliary head is training-only: counted in neither number.
    model, _, _ = get_flops.build_config_model(config)
    aux = sum(p.numel() for p in model.auxiliary_head.parameters())
    assert result['params'] == sum(p.numel() for p in model.parameters()) - aux


def test_backbone_only_arch():
    (result,) = get_flops.main(['--arch', 'datpp-t', '--backbone-only', '--shape', '64', '96'])
    classifier = sum(p.numel() for p in get_flops.build_arch_model('datpp-t', 224).parameters())
    head = 512 * 1000 + 1000
    norms = 2 * (64 + 128 + 256)  # norm0..norm2 exist only in the dense-task backbone
    assert result['params'] == classifier - head + norms
    assert result['input_shape'] == [64, 96]


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--arch', 'dat-xl'], "Unknown --arch 'dat-xl'"),
        (['--arch', 'dat-t', '--shape', '1', '2', '3'], '--shape takes one or two positive ints'),
        (['--arch', 'dat-t', '--shape', '0'], '--shape takes one or two positive ints'),
        ([], 'give either --arch'),
    ],
)
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        get_flops.main(argv)
    assert message in capsys.readouterr().err


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        get_flops.build_config_model(str(tmp_path / 'missing.py'))
    bad = tmp_path / 'no_scope.py'
    bad.write_text("model = dict(type='DAT')\n")
    with pytest.raises(ValueError, match='default_scope must be one of'):
        get_flops.build_config_model(str(bad))


def test_window_closed_form_pads():
    assert window_attention_macs(14, 15, 7, 32) == 2 * 14 * 21 * 49 * 32
    assert neighborhood_attention_macs(3, 9, 7, 8) == 2 * 7 * 9 * 49 * 8
    assert deformable_attention_macs(2, 3, 4, 5, 6, batch=2) == 2 * 2 * 6 * 20 * 6
    assert math.isclose(PAPER_COMPLEXITY['datpp-t'][1], 4.29)


def test_inference_stripes_of_the_conv_ffn_are_counted_once(monkeypatch):
    """At inference on CPU the ConvFFN runs in stripes of rows whose convs read their neighbour
    rows again; a traced forward pass takes the whole maps, so the count is the math's."""
    from projects.dat.models import dat as dat_module

    batch, dim, height, width = 2, 4, 9, 7
    ffn = dat_module.ConvFFN(dim).eval()
    monkeypatch.setattr(dat_module, 'FFN_STRIPE_BYTES', 2 * batch * 4 * dim * width * 4)  # 2-row stripes
    monkeypatch.setattr(dat_module, 'cpu_last_level_cache_bytes', lambda: 0)  # size unknown: stripes
    counted = analyze_complexity(ffn, torch.randn(batch, dim, height, width)).by_operator
    hidden_pixels = batch * 4 * dim * height * width
    # The 3x3 depth-wise conv without halo rows, fc1 and fc2 (as convs or, channels-last, as linear).
    assert counted['conv'] + counted['linear'] == hidden_pixels * (9 + 2 * dim)
