"""ONNX export of DAT and DAT++ (``tools/deployment/pytorch2onnx.py``).

- One exported file per model runs at every size: the full-size DAT-T and DAT-T++ backbones,
  exported with free height and width at 224x224, match PyTorch in ONNX Runtime (CPU) at
  224x224, 512x832 and 200x328, and their mmpretrain classifiers at 224x224 and 200x328: for
  every output ``max|onnx - torch| / max|torch| <= 1e-4``. The weights are random, with the
  offset networks and bias tables scaled up so that the sampling positions move by whole
  cells and the biases matter (at the initial scale a size-dependent mistake in them would hide
  below the tolerance).
- The export path in PyTorch: the geometry helpers that the exporter records with traced sizes
  (padding, shifted-window mask, v1 offset scale) equal their eager results, and a DAT-T graph
  traced at 224 computes what the eager model computes at other sizes.
- The attention switch: the graph has the reference attention (GridSample nodes of the
  deformable sampling and bias, no custom operator), while eager ``'auto'`` runs the custom
  operators; an ``attn_impl='fast'`` model stops the export with an error saying why.
- The tool's command line: a run with ``--dynamic --verify --json``, and its errors.
"""

import importlib.util
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from projects.dat import DAT
from projects.dat.models.geometry import (
    offset_scale,
    pad_to_at_least,
    pad_to_multiple,
    shifted_window_mask,
    window_partition,
)
from projects.dat.models.variants import resolve_arch

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / 'tools' / 'deployment' / 'pytorch2onnx.py'
TOLERANCE = 1e-4
HAS_ONNX = importlib.util.find_spec('onnx') is not None and importlib.util.find_spec('onnxruntime') is not None
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="needs onnx and onnxruntime (pip install '.[deploy]')")
# DAT-T and DAT-T++ with one block pair per stage (DAT-T: every v1 block type, padding at 200x328).
SMALL_V1 = {**resolve_arch('dat-t'), 'stage_spec': ['LS', 'LS', 'LD', 'LD']}
SMALL_PP_T = {**resolve_arch('datpp-t'), 'stage_spec': ['ND', 'ND', 'ND', 'DD']}
# A small DAT++ with every block type, for the tests of the switch.
SMALL_PP = dict(
    version='pp', dims=[32, 64, 64, 64], heads=[1, 2, 2, 2], groups=[1, 1, 1, 1], stage_spec=['ND', 'D', 'N', 'D']
)


def _load_tool():
    spec = importlib.util.spec_from_file_location('_dat_tools_pytorch2onnx', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _pronounce(model: nn.Module, seed: int = 0) -> nn.Module:
    """Scale up the offset networks' last layers and the bias tables of ``model``'s backbone."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith('conv_offset.3.weight'):  # offsets of about one key cell (v1: tanh of ~1)
                param.copy_(torch.randn(param.shape, generator=generator) * param.shape[1] ** -0.5 * 2)
            elif name.endswith(('rpe_table', 'relative_position_bias_table', '.rpb')):
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def _relative_errors(rows: list[dict]) -> dict[str, float]:
    return {f'{row["size"]} {row["output"]}': row['relative'] for row in rows}


# ------------------------------------------------------------------- the export path in PyTorch


def _slice_built_mask(height: int, width: int, window_size: int, shift_size: int) -> torch.Tensor:
    """Swin's mask as Swin builds it (labels written into slices), the reference of the test."""
    region = torch.zeros(1, height, width, 1)
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for hs in slices:
        for ws in slices:
            region[:, hs, ws, :] = label
            label += 1
    labels = window_partition(region, window_size).squeeze(-1)
    mask = labels.unsqueeze(1) - labels.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


@pytest.mark.parametrize('window_size, shift_size', [(7, 4), (12, 6), (3, 2), (2, 1), (1, 1)])
def test_shifted_window_mask_equals_swins_construction(window_size, shift_size):
    for rows in (1, 2, 5):
        for cols in (1, 3):
            height, width = rows * window_size, cols * window_size
            mask = shifted_window_mask(height, width, window_size, shift_size)
            expected = _slice_built_mask(height, width, window_size, shift_size)
            assert mask.dtype == expected.dtype and torch.equal(mask, expected), (height, width)


def _trace(function, example: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        return torch.jit.trace(function, example, check_trace=False)


def test_traced_geometry_follows_the_input_size():
    """Traced at a size that needs no padding, the helpers pad, mask and scale at other sizes
    exactly as eager calls do (the padding to at least 9 is traced at 14x21, where it adds nothing)."""

    def geometry(x: torch.Tensor):
        padded, _, _ = pad_to_multiple(x, 7)
        height, width = padded.shape[-2:]
        at_least = pad_to_at_least(x.permute(0, 2, 3, 1), 9)
        return padded, shifted_window_mask(height, width, 7, 4), offset_scale(height, width), at_least

    traced = _trace(geometry, torch.randn(1, 2, 14, 21))
    for height, width in [(14, 21), (13, 15), (50, 82), (3, 8), (9, 4)]:
        x = torch.randn(1, 2, height, width)
        for got, expected in zip(traced(x), geometry(x), strict=True):
            assert got.shape == expected.shape and torch.equal(got, expected), (height, width)


def test_offset_scale_rounds_as_the_original():
    for height, width in [(1, 1), (7, 14), (13, 21), (56, 123), (97, 3)]:
        expected = torch.tensor([1.0 / height, 1.0 / width])
        assert torch.equal(offset_scale(height, width), expected)


def test_traced_dat_v1_equals_eager_at_other_sizes():
    """The v1 graph recorded at 224 (padding, shifted windows, offset scale as functions of the
    size) computes in PyTorch what the eager model computes at sizes that need padding. DAT-T's
    widths with one L/S and one L/D pair per stage: the ONNX tests below run the full DAT-T."""
    torch.manual_seed(0)
    model = _pronounce(DAT(SMALL_V1)).eval()
    with torch.no_grad():
        traced = _trace(model, torch.randn(1, 3, 224, 224))
        for height, width in [(200, 328), (96, 160)]:
            x = torch.randn(1, 3, height, width)
            for got, expected in zip(traced(x), model(x), strict=True):
                assert got.shape == expected.shape
                assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), (height, width)


# ------------------------------------------------------------------------------- ONNX Runtime


@pytest.fixture(scope='module')
def onnx_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp('onnx')


@needs_onnx
@pytest.mark.parametrize('arch', ['dat-t', 'datpp-t'])
def test_backbone_runs_at_three_sizes_in_onnxruntime(arch, onnx_dir):
    torch.manual_seed(0)
    model, names, shape, _ = tool.build_model(None, arch, None)
    _pronounce(model)
    path = str(onnx_dir / f'{arch}.onnx')
    tool.export_onnx(model, path, names, shape, dynamic=True)
    operators = tool.check_onnx(path)
    rows = tool.compare_with_onnxruntime(model, path, names, [(224, 224, 1), (512, 832, 1), (200, 328, 1)])
    assert [row['shape'][1:] for row in rows if row['output'] == 'feat3'] == [
        [768 if arch == 'dat-t' else 512, *s] for s in ([7, 7], [16, 26], [7, 11])
    ]
    errors = _relative_errors(rows)
    assert len(errors) == 12 and max(errors.values()) <= TOLERANCE, errors
    # The reference deformable attention: one GridSample samples the keys, one reads the bias.
    blocks = sum(spec.count('D') for spec in model.arch_settings['stage_spec'])
    assert operators['GridSample'] == 2 * blocks


@needs_onnx
@pytest.mark.parametrize('config, arch', [('dat-t_8xb128_in1k.py', SMALL_V1), ('datpp-t_8xb128_in1k.py', SMALL_PP_T)])
def test_classifier_runs_at_other_sizes_in_onnxruntime(config, arch, onnx_dir):
    """The classifiers of ``configs/classification`` with fewer blocks (the full backbones are
    exported above; this checks the pooling and head in the graph at a third of the time)."""
    torch.manual_seed(0)
    config = str(REPO / 'configs' / 'classification' / config)
    model, names, shape, what = tool.build_model(config, None, None, {'model.backbone.arch': dict(arch, _delete_=True)})
    assert names == ['logits'] and shape == (224, 224) and 'classifier' in what
    _pronounce(model)
    path = str(onnx_dir / f'{arch["version"]}_classifier.onnx')
    tool.export_onnx(model, path, names, shape, dynamic=True)
    tool.check_onnx(path)
    rows = tool.compare_with_onnxruntime(model, path, names, [(224, 224, 1), (200, 328, 2)])
    assert [row['shape'] for row in rows] == [[1, 1000], [2, 1000]]
    errors = _relative_errors(rows)
    assert max(errors.values()) <= TOLERANCE, errors


@needs_onnx
def test_export_runs_the_reference_attention(onnx_dir):
    """``'auto'`` runs the custom operators in eager mode and the reference attention during
    export; ``'fast'`` cannot be exported and says so."""
    model = DAT(SMALL_PP, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(x)
    eager_ops = {event.name for event in profile.events() if event.name.startswith('dat::')}
    assert {'dat::deformable_attention', 'dat::neighborhood_attention'} <= eager_ops

    path = str(onnx_dir / 'small_auto.onnx')
    tool.export_onnx(model, path, ['feat0', 'feat1', 'feat2', 'feat3'], (64, 64))
    operators = tool.check_onnx(path)  # raises on a node outside the standard ONNX domain
    assert operators['GridSample'] == 2 * 3
    assert (
        max(
            _relative_errors(
                tool.compare_with_onnxruntime(model, path, ['feat0', 'feat1', 'feat2', 'feat3'], [(64, 64, 1)])
            ).values()
        )
        <= TOLERANCE
    )

    fast = DAT(SMALL_PP, img_size=64, attn_impl='fast').eval()
    with pytest.raises(RuntimeError, match="attn_impl='fast' is not available .*during ONNX export"):
        tool.export_onnx(fast, str(onnx_dir / 'small_fast.onnx'), ['feat0', 'feat1', 'feat2', 'feat3'], (64, 64))


# ---------------------------------------------------------------------------------- the tool


@needs_onnx
def test_cli_exports_checks_and_reports(tmp_path):
    out, report = tmp_path / 'demo.onnx', tmp_path / 'demo.json'
    config = REPO / 'configs' / 'demo' / 'datpp-demo_synthetic-imagenet.py'
    proc = subprocess.run(
        [
            sys.executable,
            str(TOOL),
            str(config),
            '--out',
            str(out),
            '--dynamic',
            '--verify',
            '--verify-shapes',
            '96x128',
            '2x64x80',
            '--json',
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for step in ('[1/4] building', '[2/4] exporting at 1x64x64', '[3/4] onnx.checker', '[4/4] ONNX Runtime'):
        assert step in proc.stdout
    result = json.loads(report.read_text())
    assert result['dynamic'] is True and result['export_shape'] == [1, 64, 64] and out.is_file()
    assert [row['size'] for row in result['checks']] == ['1x64x64', '1x96x128', '2x64x80']
    assert all(row['relative'] <= TOLERANCE and row['output'] == 'logits' for row in result['checks'])
    assert result['operators']['GridSample'] == 2 * 5


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--out', 'x.onnx'], 'either CONFIG or --arch'),
        (['--arch', 'dat-xl', '--out', 'x.onnx'], r"Unknown .*arch 'dat-xl'; expected one of \['dat-t'"),
        (['--arch', 'dat-t', '--out', 'x.onnx', '--opset', '15'], r'--opset must be in 16\.\.20'),
        (['--arch', 'dat-t', '--out', 'x.onnx', '--verify', '--verify-shapes', '200x328'], 'needs --dynamic'),
        (['--arch', 'dat-t', '--out', 'x.onnx', '--dynamic', '--verify-shapes', '200x328'], 'needs --verify'),
        (
            ['--arch', 'dat-t', '--out', 'x.onnx', '--dynamic', '--verify', '--verify-shapes', '200*328'],
            'must be HxW or BxHxW',
        ),
        (['--arch', 'dat-t', '--out', 'x.onnx', '--verify', '--batch', '0'], '--batch must be at least 1'),
        (
            ['--arch', 'dat-t', '--out', 'x.onnx', '--checkpoint', 'missing.pth'],
            "--checkpoint 'missing.pth' is not a file",
        ),
        (['--arch', 'dat-t', '--out', 'no/such/folder/x.onnx'], 'does not exist'),
    ],
)
def test_cli_errors_say_what_was_expected(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('pytorch2onnx: error: ') and re.search(message, err), err
