"""Parameters and FLOPs (multiply-accumulates) of DAT models, as the DAT / DAT++ papers count.

Two ways to name a model:

- ``--arch NAME [NAME ...]`` (``dat-t``, ``dat-s``, ``dat-b``, ``dat-b-384``, ``datpp-t``,
  ``datpp-s``, ``datpp-b``, their long aliases, or ``all``): the ImageNet classifier of the
  papers (backbone, LN, global average pooling, 1000-class linear head), or with
  ``--backbone-only`` the dense-task backbone (four outputs with their norms);
- ``CONFIG [CONFIG ...]``: a classifier, detector or segmentor config of mmpretrain, mmdet
  or mmseg (the config's ``default_scope`` picks the toolbox). The inference graph is
  counted (``mode='tensor'``): a segmentor's auxiliary head is left out of both counts.

FLOPs are multiply-accumulates counted by tracing one forward pass with the op handlers of
``projects/dat/flops.py``; by default with the papers' convention (fvcore's defaults:
norms and bilinear sampling counted, softmax and element-wise ops not; see that module)
and with the reference attention path (``attn_impl='reference'`` on models that have the
switch), so the count does not depend on the kernel a model is configured with. For a named
arch at its paper size the table compares with the published numbers.

Examples::

    python tools/analysis_tools/get_flops.py --arch all
    python tools/analysis_tools/get_flops.py --arch datpp-t --backbone-only --shape 800 1344
    python tools/analysis_tools/get_flops.py \
        configs/detection/mask_rcnn/mask-rcnn_datpp-t_fpn_1x_coco.py
    python tools/analysis_tools/get_flops.py CONFIG --shape 512 2048 --json flops.json
"""

from __future__ import annotations

import argparse
import json
import math
import os.path as osp
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from mmengine.config import DictAction
from torch import nn

from projects.dat.flops import CONVENTIONS, PAPER_COMPLEXITY, analyze_complexity, attention_impl
from projects.dat.models.dat import DAT
from projects.dat.models.variants import ARCH_ZOO, CANONICAL_ARCHS, canonical_arch
from projects.dat.toolboxes import build_config_model, build_toolbox_model, dummy_data_sample

# Input size per toolbox when --shape is not given (the papers' measuring sizes:
# 1280x800 for COCO detectors, 512x2048 for ADE20K segmentors).
DEFAULT_SHAPES = {'mmpretrain': (224, 224), 'mmdet': (800, 1280), 'mmseg': (512, 2048)}


def build_arch_model(arch: str, img_size: int, backbone_only: bool = False, num_classes: int = 1000) -> nn.Module:
    """The papers' ImageNet classifier of a variant, or its dense-task backbone.

    Args:
        arch (str): Variant name.
        img_size (int): Construction size of the bias tables.
        backbone_only (bool): Return ``DAT`` with the four outputs and norms.
        num_classes (int): Classes of the linear head.

    Returns:
        nn.Module: An mmpretrain ``ImageClassifier`` or a ``DAT``.
    """
    if backbone_only:
        return DAT(arch, img_size=img_size)
    classifier = dict(
        type='ImageClassifier',
        backbone=dict(type='DAT', arch=arch, out_indices=(3,), img_size=img_size),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=num_classes, in_channels=ARCH_ZOO[arch]['dims'][-1]),
    )
    return build_toolbox_model(classifier, 'mmpretrain')


def padded_shape(model: nn.Module, shape: Sequence[int]) -> tuple[int, int]:
    """The input size after the model's data preprocessor pads it (``pad_size_divisor``)."""
    divisor = getattr(getattr(model, 'data_preprocessor', None), 'pad_size_divisor', 1) or 1
    return tuple(int(math.ceil(s / divisor) * divisor) for s in shape)


def count_model(
    model: nn.Module,
    shape: Sequence[int],
    scope: str | None = None,
    convention: str = 'paper',
    attn: str | None = 'reference',
) -> dict[str, Any]:
    """Count the parameters and MACs of one forward pass at ``shape``.

    Args:
        model (nn.Module): A ``DAT``, or a model of mmpretrain / mmdet / mmseg.
        shape (Sequence[int]): ``(H, W)`` of the (preprocessed) input.
        scope (str, optional): The toolbox of a config model; None for a ``DAT`` or a
            classifier built by :func:`build_arch_model`.
        convention (str): ``'paper'`` or ``'matmul'`` (see ``projects/dat/flops.py``).
        attn (str, optional): ``attn_impl`` to count with; None keeps the model's.

    Returns:
        dict: ``params``, ``flops``, ``input_shape``, ``by_operator``, ``suspicious_ops``,
        ``attn_modules_switched`` and the ``complexity`` object.
    """
    model.eval()
    height, width = shape
    inputs = torch.randn(1, 3, height, width)
    original_forward = None
    if scope == 'mmseg' and getattr(model, 'auxiliary_head', None) is not None:
        model.auxiliary_head = None  # training-only
    if scope is not None or hasattr(model, 'data_preprocessor'):
        original_forward = model.forward
        samples = None if scope in (None, 'mmpretrain') else [dummy_data_sample(scope, height, width)]
        model.forward = partial(original_forward, data_samples=samples, mode='tensor')
    try:
        with attention_impl(model, attn) as switched:
            result = analyze_complexity(model, inputs, convention)
    finally:
        if original_forward is not None:
            model.forward = original_forward
    return dict(
        params=result.params,
        flops=result.flops,
        input_shape=[height, width],
        by_operator=dict(result.by_operator),
        suspicious_ops=dict(result.suspicious_ops),
        attn_modules_switched=switched,
        complexity=result,
    )


def parse_shape(values: Sequence[int] | None) -> tuple[int, int] | None:
    """``[S]`` -> ``(S, S)``, ``[H, W]`` -> ``(H, W)``, None -> None.

    Raises:
        ValueError: For other lengths or non-positive sizes.
    """
    if values is None:
        return None
    if len(values) not in (1, 2) or any(v <= 0 for v in values):
        raise ValueError(f'--shape takes one or two positive ints (S or H W), got {list(values)}')
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Parameters and FLOPs (multiply-accumulates) of DAT models',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('configs', nargs='*', help='config files of mmpretrain, mmdet or mmseg')
    parser.add_argument('--arch', nargs='+', help=f'variants: {", ".join(CANONICAL_ARCHS)} or all')
    parser.add_argument(
        '--shape',
        type=int,
        nargs='+',
        help='input size, S or H W (default: 224, 384 for *-384 archs, '
        '800 1280 for mmdet and 512 2048 for mmseg configs)',
    )
    parser.add_argument(
        '--img-size',
        type=int,
        help='--arch only: construction size of the deformable bias tables (default 384 for *-384 archs, else 224)',
    )
    parser.add_argument(
        '--backbone-only',
        action='store_true',
        help='count the backbone alone (with --arch: the dense-task backbone with its four output norms)',
    )
    parser.add_argument('--num-classes', type=int, default=1000, help='--arch: head classes')
    parser.add_argument(
        '--convention',
        choices=CONVENTIONS,
        default='paper',
        help="'paper': fvcore defaults as the papers (norms and grid_sample "
        "counted); 'matmul': only convolutions and matrix products",
    )
    parser.add_argument(
        '--attn-impl',
        default='reference',
        help="attention path to count ('reference', the default, gives the "
        "papers' convention); 'model' keeps the configured one",
    )
    parser.add_argument(
        '--show-modules',
        type=int,
        metavar='DEPTH',
        default=0,
        help='also print the per-module table of mmengine down to this depth',
    )
    parser.add_argument('--json', metavar='PATH', help='also write the results as JSON')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config settings, key=value')
    args = parser.parse_args(argv)
    if bool(args.arch) == bool(args.configs):
        parser.error('give either --arch NAME ... or one or more config files')
    try:
        args.shape = parse_shape(args.shape)
    except ValueError as exc:
        parser.error(str(exc))
    if args.arch:
        names = list(CANONICAL_ARCHS) if [a.lower() for a in args.arch] == ['all'] else args.arch
        unknown = [a for a in names if a.lower() not in ARCH_ZOO]
        if unknown:
            parser.error(
                f'Unknown --arch {unknown[0]!r}; expected one of {list(CANONICAL_ARCHS)}, '
                "their long aliases (e.g. 'dat-tiny') or 'all'"
            )
        args.arch = [canonical_arch(a) for a in names]
    return args


def _fmt(value: float | None, digits: int) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of results (paper columns where a published number applies)."""
    header = ['model', 'input', 'params (M)', 'GMACs', 'paper params', 'paper GMACs', 'diff']
    lines = [header]
    for r in rows:
        paper = r.get('paper') or {}
        diff = f'{100 * (r["flops"] / 1e9 / paper["flops_g"] - 1):+.2f}%' if paper else '-'
        lines.append(
            [
                r['name'],
                'x'.join(map(str, r['input_shape'])),
                f'{r["params"] / 1e6:.2f}',
                f'{r["flops"] / 1e9:.2f}',
                _fmt(paper.get('params_m'), 2),
                _fmt(paper.get('flops_g'), 2),
                diff,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ['| ' + ' | '.join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + ' |' for line in lines]
    out.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
    return '\n'.join(out)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Count every requested model, printing progress to stderr.

    Returns:
        list[dict]: One JSON-ready result per model.
    """
    jobs = [('arch', a) for a in args.arch] if args.arch else [('config', c) for c in args.configs]
    attn = None if args.attn_impl == 'model' else args.attn_impl
    results = []
    for index, (kind, target) in enumerate(jobs, 1):
        start = time.time()
        print(f'[{index}/{len(jobs)}] {target}: building and tracing ...', file=sys.stderr, flush=True)
        paper = None
        if kind == 'arch':
            img_size = args.img_size or (384 if target.endswith('-384') else 224)
            shape = args.shape or (img_size, img_size)
            model, scope = (
                build_arch_model(target, img_size, args.backbone_only, args.num_classes),
                None,
            )
            name = target + (' (backbone)' if args.backbone_only else '')
            published = PAPER_COMPLEXITY.get(target)
            if (
                published
                and not args.backbone_only
                and args.num_classes == 1000
                and args.convention == 'paper'
                and shape == (published[2], published[2])
            ):
                paper = dict(params_m=published[0], flops_g=published[1])
        else:
            model, scope, cfg = build_config_model(target, args.cfg_options)
            default = DEFAULT_SHAPES[scope]
            if scope == 'mmpretrain' and cfg.model.get('backbone', {}).get('img_size'):
                size = cfg.model.backbone.img_size  # e.g. 384 for the 384 fine-tunes
                default = (size, size) if isinstance(size, int) else tuple(size)
            shape = padded_shape(model, args.shape or default)
            name = osp.splitext(osp.basename(target))[0]
            if args.backbone_only:
                model, scope, name = model.backbone, None, name + ' (backbone)'
        count = count_model(model, shape, scope, args.convention, attn)
        if args.show_modules:
            from mmengine.analysis.print_helper import complexity_stats_table

            print(
                complexity_stats_table(
                    count['complexity'].analyzer,
                    max_depth=args.show_modules,
                    show_param_shapes=False,
                )
            )
        count.pop('complexity')
        if attn not in (None, 'reference') and not count['attn_modules_switched']:
            print(
                f'WARNING: {name} has no attn_impl switch; --attn-impl {attn} had no effect',
                file=sys.stderr,
            )
        if count['suspicious_ops']:
            print(
                f'WARNING: {name}: ops not counted that may carry MACs: {count["suspicious_ops"]}',
                file=sys.stderr,
            )
        results.append(
            dict(
                name=name,
                source=target,
                convention=args.convention,
                attn_impl=args.attn_impl,
                paper=paper,
                seconds=round(time.time() - start, 1),
                **count,
            )
        )
        print(
            f'[{index}/{len(jobs)}] {target}: {count["params"] / 1e6:.2f}M params, '
            f'{count["flops"] / 1e9:.2f} GMACs ({time.time() - start:.1f}s)',
            file=sys.stderr,
            flush=True,
        )
    return results


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    results = run(args)
    print(format_table(results))
    print(
        f'\nFLOPs are multiply-accumulates ({args.convention} convention, attention path: '
        f'{args.attn_impl}); parameters include every module counted.'
    )
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)
        print(f'results written to {args.json}')
    return results


if __name__ == '__main__':
    main()
