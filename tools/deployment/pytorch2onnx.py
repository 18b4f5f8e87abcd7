"""Export a DAT / DAT++ backbone or classifier to ONNX, check the graph, and compare ONNX Runtime with PyTorch.

What is exported:

- ``--arch ARCH`` (``dat-t``, ``dat-s``, ``dat-b``, ``dat-b-384``, ``datpp-t``, ``datpp-s``,
  ``datpp-b`` or a long alias): the bare backbone ``DAT``, one output per stage
  (``feat0`` .. ``feat3``, strides 4 to 32); ``--checkpoint`` takes a converted checkpoint
  (``backbone.*`` keys, as ``tools/model_converters/dat_official.py`` writes them), loaded as
  ``init_cfg=dict(type='Pretrained', ...)`` loads it;
- ``CONFIG`` of mmpretrain (``configs/classification/*.py``, ``configs/demo/*imagenet.py``):
  the whole classifier, images to class scores (``logits``, before the softmax);
- ``CONFIG`` of mmdet or mmseg: the backbone of the detector or segmentor only (necks, heads
  and post-processing are not exported); ``--checkpoint`` takes the toolbox's checkpoint.

The input is ``input``, ``(B, 3, H, W)`` float32 images as the model's data preprocessor
leaves them (normalised, padded): the preprocessor itself is not part of the graph. The
attention runs its reference implementation in the graph (``attn_impl='auto'`` chooses it
during export; the C++ operators of the fast path have no ONNX form, and a model built with
``attn_impl='fast'`` stops the export with an error saying so). With ``--dynamic`` the batch,
height and width are free; without it the graph runs at the export size only.

The TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) records the forward
pass at ``--shape``; sizes inside the model stay functions of the input size (see
``projects/dat/models/geometry.py``). ``--verify`` is the judge of that: it runs ONNX Runtime
(CPU) at the export size and at every ``--verify-shapes`` size and prints, per output, the
largest absolute difference from PyTorch and that difference relative to the largest
``|torch|``; the exit status is 1 when a relative difference exceeds ``--tolerance``.

Examples::

    python tools/deployment/pytorch2onnx.py --arch datpp-t --out datpp-t.onnx --dynamic \\
        --verify --verify-shapes 224x224 512x832 200x328
    python tools/deployment/pytorch2onnx.py configs/classification/datpp-t_8xb128_in1k.py \\
        --checkpoint datpp-t_in1k_converted.pth --out datpp-t_cls.onnx --verify
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import re
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mmengine.config import DictAction
from torch import Tensor, nn

from projects.dat import DAT
from projects.dat.models.variants import CANONICAL_ARCHS, canonical_arch
from projects.dat.toolboxes import build_config_model

# GridSample (deformable sampling and bias) is an ONNX operator from opset 16; the
# TorchScript-based exporter writes opsets up to 20.
MIN_OPSET, MAX_OPSET = 16, 20
DEFAULT_OPSET = 17
INPUT_NAME = 'input'
# Export size of a detector's or segmentor's backbone when --shape is not given (the sizes at
# which the papers measure them, as tools/analysis_tools/get_flops.py).
DENSE_TASK_SHAPES = {'mmdet': (800, 1280), 'mmseg': (512, 2048)}
SHAPE_PATTERN = re.compile(r'^(?:(\d+)x)?(\d+)x(\d+)$')


class ClassifierScores(nn.Module):
    """An mmpretrain classifier from images to class scores (``mode='tensor'``), for export."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(images, mode='tensor')


def parse_size(text: str) -> tuple[int, int, int | None]:
    """``'HxW'`` or ``'BxHxW'`` -> ``(H, W, B or None)``.

    Raises:
        ValueError: For another format or a size below 1.
    """
    match = SHAPE_PATTERN.match(text)
    if match is None or any(int(g) < 1 for g in match.groups() if g is not None):
        raise ValueError(f'a size must be HxW or BxHxW with positive ints, e.g. 200x328 or 2x224x224, got {text!r}')
    batch, height, width = match.groups()
    return int(height), int(width), None if batch is None else int(batch)


def build_model(
    config: str | None, arch: str | None, checkpoint: str | None, cfg_options: dict | None = None
) -> tuple[nn.Module, list[str], tuple[int, int], str]:
    """The module to export, its output names, its default export size and a description.

    Args:
        config (str, optional): An mmpretrain, mmdet or mmseg config (exclusive with ``arch``).
        arch (str, optional): A DAT variant name: the bare backbone.
        checkpoint (str, optional): Weights to load (see the module docstring).
        cfg_options (dict, optional): Overrides of the config, as ``--cfg-options``.

    Returns:
        tuple: The module in eval mode, output names, ``(H, W)`` and what it is, in words.

    Raises:
        ValueError: For neither or both of ``config`` and ``arch``, an unknown arch, or a config
            whose model has no DAT backbone.
    """
    if (config is None) == (arch is None):
        raise ValueError('give either CONFIG or --arch ARCH (not both, not neither)')
    if arch is not None and cfg_options:
        raise ValueError('--cfg-options applies to a CONFIG, not to --arch')
    if arch is not None:
        name = canonical_arch(arch)
        img_size = 384 if name.endswith('-384') else 224
        init_cfg = None if checkpoint is None else dict(type='Pretrained', checkpoint=checkpoint, prefix='backbone.')
        model = DAT(name, img_size=img_size, init_cfg=init_cfg)
        if checkpoint is not None:
            model.init_weights()
        names = [f'feat{i}' for i in model.out_indices]
        return model.eval(), names, (img_size, img_size), f'{name} backbone'

    from mmengine.runner import load_checkpoint

    model, scope, _ = build_config_model(config, cfg_options)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    if not isinstance(getattr(model, 'backbone', None), DAT):
        raise ValueError(f'{config}: the model has no DAT backbone (got {type(getattr(model, "backbone", None))})')
    model.eval()
    if scope == 'mmpretrain':
        what = f'{scope} classifier ({type(model).__name__})'
        return ClassifierScores(model).eval(), ['logits'], tuple(model.backbone.img_size), what
    backbone = model.backbone
    names = [f'feat{i}' for i in backbone.out_indices]
    return (
        backbone,
        names,
        DENSE_TASK_SHAPES[scope],
        f'backbone of the {scope} {type(model).__name__} (only the backbone)',
    )


def _outputs(result: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [result] if isinstance(result, Tensor) else list(result)


def export_onnx(
    model: nn.Module,
    path: str,
    output_names: Sequence[str],
    shape: tuple[int, int],
    batch: int = 1,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
) -> list[str]:
    """Export ``model`` with the TorchScript-based exporter.

    The exporter records the model in eval mode and afterwards puts back the mode it found, so
    ``model`` is set to eval mode first (a module left in training mode would run stochastic
    depth after the export).

    Args:
        model (nn.Module): Returns one tensor or a tuple of them; set to eval mode.
        path (str): The ``.onnx`` file to write.
        output_names (Sequence[str]): One name per output.
        shape (tuple[int, int]): ``(H, W)`` of the example input.
        batch (int): Batch of the example input. Defaults to 1.
        dynamic (bool): Free batch, height and width (and the outputs' sizes). Defaults to False.
        opset (int): ONNX opset, :data:`MIN_OPSET` to :data:`MAX_OPSET`. Defaults to 17.

    Returns:
        list[str]: The distinct warnings the exporter gave (tracer warnings about Python values
        are expected: the checks at other sizes tell whether they mattered).

    Raises:
        ValueError: For an opset outside the supported range.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f'--opset must be in {MIN_OPSET}..{MAX_OPSET} (GridSample needs 16; the TorchScript-based exporter '
            f'writes up to {MAX_OPSET}), got {opset}'
        )
    model.eval()
    example = torch.randn(batch, 3, *shape)
    dynamic_axes = None
    if dynamic:
        dynamic_axes = {INPUT_NAME: {0: 'batch', 2: 'height', 3: 'width'}}
        for name in output_names:
            dynamic_axes[name] = {0: 'batch'} if name == 'logits' else {0: 'batch', 2: f'{name}_h', 3: f'{name}_w'}
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter('always')
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
        )
    return sorted({str(w.message).split('\n')[0] for w in caught})


def check_onnx(path: str) -> dict[str, int]:
    """Check the file with ``onnx.checker`` and count its operators.

    Returns:
        dict: Node count per operator type.

    Raises:
        onnx.checker.ValidationError: For an invalid model.
        ValueError: For a node outside the standard ONNX domain (a custom operator that ONNX
            Runtime would not know).
    """
    import onnx

    onnx.checker.check_model(path, full_check=True)
    counts: dict[str, int] = {}
    for node in onnx.load(path, load_external_data=False).graph.node:
        if node.domain not in ('', 'ai.onnx'):
            raise ValueError(f'{path}: node {node.name} is the custom operator {node.domain}::{node.op_type}')
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def compare_with_onnxruntime(
    model: nn.Module, path: str, output_names: Sequence[str], sizes: Sequence[tuple[int, int, int]], seed: int = 0
) -> list[dict[str, Any]]:
    """Run the ONNX file in ONNX Runtime (CPU) and ``model`` in PyTorch on the same random images.

    Args:
        model (nn.Module): The exported module (set to eval mode).
        path (str): The ONNX file.
        output_names (Sequence[str]): The outputs' names.
        sizes (Sequence[tuple[int, int, int]]): ``(H, W, B)`` of each check.
        seed (int): Seed of the images. Defaults to 0.

    Returns:
        list[dict]: Per size and output: ``size``, ``output``, ``shape``, ``max_abs`` (largest
        ``|onnx - torch|``), ``max_torch`` (largest ``|torch|``) and ``relative``
        (``max_abs / max_torch``).
    """
    import onnxruntime as ort

    model.eval()
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for height, width, batch in sizes:
        images = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = _outputs(model(images))
        got = session.run(list(output_names), {INPUT_NAME: images.numpy()})
        for name, reference, result in zip(output_names, expected, got, strict=True):
            reference = reference.numpy()
            if result.shape != reference.shape:
                raise ValueError(
                    f'{batch}x{height}x{width}: ONNX Runtime gives {name} of shape {result.shape}, '
                    f'PyTorch {reference.shape}'
                )
            max_abs = float(np.abs(result - reference).max())
            max_torch = float(np.abs(reference).max())
            rows.append(
                dict(
                    size=f'{batch}x{height}x{width}',
                    output=name,
                    shape=list(reference.shape),
                    max_abs=max_abs,
                    max_torch=max_torch,
                    relative=max_abs / max_torch if max_torch > 0 else max_abs,
                )
            )
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('config', nargs='?', help='mmpretrain classifier config, or mmdet / mmseg config (backbone)')
    parser.add_argument('--arch', help=f'export the bare backbone of a variant: {", ".join(CANONICAL_ARCHS)}')
    parser.add_argument('--checkpoint', help='weights to load (a converted checkpoint for --arch)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config settings, key=value')
    parser.add_argument('--out', required=True, help='the .onnx file to write')
    parser.add_argument(
        '--shape',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help="export size (default: the backbone's img_size for --arch and classifiers, 800 1280 for mmdet and "
        '512 2048 for mmseg configs)',
    )
    parser.add_argument('--batch', type=int, default=1, help='batch of the export and of the checks (default 1)')
    parser.add_argument('--dynamic', action='store_true', help='free batch, height and width')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET, help=f'ONNX opset (default {DEFAULT_OPSET})')
    parser.add_argument('--verify', action='store_true', help='compare ONNX Runtime (CPU) with PyTorch')
    parser.add_argument(
        '--verify-shapes',
        nargs='+',
        default=[],
        metavar='[B]xHxW',
        help='with --verify and --dynamic: further sizes to check, e.g. 512x832 200x328 2x224x224',
    )
    parser.add_argument(
        '--tolerance', type=float, default=1e-4, help='largest accepted max|onnx - torch| / max|torch| (default 1e-4)'
    )
    parser.add_argument('--json', help='write the export and check results to this JSON file')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        extra_sizes = [parse_size(text) for text in args.verify_shapes]
        if args.batch < 1:
            raise ValueError(f'--batch must be at least 1, got {args.batch}')
        if args.shape is not None and min(args.shape) < 1:
            raise ValueError(f'--shape takes two positive ints H W, got {args.shape}')
        if extra_sizes and not args.verify:
            raise ValueError('--verify-shapes needs --verify')
        if extra_sizes and not args.dynamic:
            raise ValueError('--verify-shapes needs --dynamic: a static graph runs at its export size only')
        if not MIN_OPSET <= args.opset <= MAX_OPSET:
            raise ValueError(f'--opset must be in {MIN_OPSET}..{MAX_OPSET} (GridSample needs 16), got {args.opset}')
        if args.checkpoint is not None and not osp.isfile(args.checkpoint):
            raise FileNotFoundError(f'--checkpoint {args.checkpoint!r} is not a file')
        out_dir = osp.dirname(osp.abspath(args.out))
        if not osp.isdir(out_dir):
            raise FileNotFoundError(f'--out {args.out!r}: the folder {out_dir} does not exist')

        print(f'[1/4] building {args.config or args.arch}', flush=True)
        model, output_names, default_shape, what = build_model(
            args.config, args.arch, args.checkpoint, args.cfg_options
        )
        shape = tuple(args.shape) if args.shape is not None else default_shape
        print(f'      {what}; outputs {", ".join(output_names)}', flush=True)

        print(
            f'[2/4] exporting at {args.batch}x{shape[0]}x{shape[1]} (opset {args.opset}, '
            f'{"dynamic batch, height and width" if args.dynamic else "static sizes"}) to {args.out}',
            flush=True,
        )
        start = time.perf_counter()
        export_warnings = export_onnx(model, args.out, output_names, shape, args.batch, args.dynamic, args.opset)
        export_s = time.perf_counter() - start
        size_mb = os.path.getsize(args.out) / 2**20
        print(f'      {export_s:.1f} s, {size_mb:.1f} MiB; {len(export_warnings)} distinct exporter warnings')
        for message in export_warnings:
            print(f'      warning: {message[:160]}')

        print('[3/4] onnx.checker', flush=True)
        op_counts = check_onnx(args.out)
        print(f'      valid; {sum(op_counts.values())} nodes, {len(op_counts)} operator types, no custom operators')

        rows: list[dict[str, Any]] = []
        failed = False
        if args.verify:
            sizes = [(shape[0], shape[1], args.batch)] + [(h, w, b or args.batch) for h, w, b in extra_sizes]
            print('[4/4] ONNX Runtime (CPU) against PyTorch, float32', flush=True)
            rows = compare_with_onnxruntime(model, args.out, output_names, sizes)
            for row in rows:
                verdict = 'ok' if row['relative'] <= args.tolerance else f'ABOVE {args.tolerance:g}'
                failed |= row['relative'] > args.tolerance
                print(
                    f'      {row["size"]:>12} {row["output"]:>6} {str(tuple(row["shape"])):>20}  '
                    f'max|diff| {row["max_abs"]:.3e}  max|diff|/max|torch| {row["relative"]:.3e}  {verdict}'
                )
        else:
            print('[4/4] no --verify: ONNX Runtime not run')
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f'pytorch2onnx: error: {error}', file=sys.stderr)
        return 2
    if args.json:
        report = dict(
            model=args.config or args.arch,
            description=what,
            checkpoint=args.checkpoint,
            out=args.out,
            export_shape=[args.batch, *shape],
            dynamic=args.dynamic,
            opset=args.opset,
            export_s=export_s,
            size_mib=size_mb,
            exporter_warnings=export_warnings,
            operators=op_counts,
            tolerance=args.tolerance,
            checks=rows,
            torch=torch.__version__,
        )
        with open(args.json, 'w') as f:
            json.dump(report, f, indent=2)
    if failed:
        print(f'pytorch2onnx: a difference exceeds --tolerance {args.tolerance:g}', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
