"""Conversion of the original DAT / DAT++ checkpoints into this package's layout.

The original code names tensors ``patch_proj.*``, ``down_projs.i.*``,
``stages.i.layer_norms.{2b,2b+1}.norm.*``, ``stages.i.attns.b.*``, ``stages.i.mlps.b.*``,
``stages.i.local_perception_units.b.*``, ``cls_norm.norm.*`` and ``cls_head.*`` (module names
of ``models/dat.py`` in LeapLabTHU/DAT); its mmdet 2.x / mmseg 0.x checkpoints
(LeapLabTHU/DAT-Detection, LeapLabTHU/DAT-Segmentation) add ``backbone.``
and the output norms ``backbone.norms.i.norm.*``. :func:`convert_original_state_dict` maps
them onto :class:`~projects.dat.models.DAT` names, using every source tensor exactly once and
filling every target tensor, or stops with a list of what is wrong.

Only foreign layouts are translated here; loading converted weights into a backbone is the
backbone's business (:mod:`projects.dat.models.pretrained`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import Tensor

from .models.dat import DAT
from .models.geometry import relative_position_index, shift_size_for, shifted_window_mask
from .models.pretrained import ConversionError
from .models.variants import ARCH_ZOO, CANONICAL_ARCHS, match_arch_name, resolve_arch

__all__ = [
    'ConversionError',
    'convert_original_state_dict',
    'group_keys',
    'infer_original_arch',
    'original_key',
    'rename_original_key',
]


# Original name pattern -> our name, per version. Applied to backbone keys without prefix.
_COMMON_RENAMES = [
    (r'^down_projs\.(\d+)\.0\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.conv.'),
    (r'^down_projs\.(\d+)\.1\.norm\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.norm.'),
    (
        r'^stages\.(\d+)\.layer_norms\.(\d+)\.norm\.',
        lambda m: f'stages.{m[1]}.blocks.{int(m[2]) // 2}.norm{int(m[2]) % 2 + 1}.',
    ),
    (
        r'^stages\.(\d+)\.attns\.(\d+)\.conv_offset\.1\.norm\.',
        lambda m: f'stages.{m[1]}.blocks.{m[2]}.attn.conv_offset.1.',
    ),
    (r'^stages\.(\d+)\.attns\.(\d+)\.', lambda m: f'stages.{m[1]}.blocks.{m[2]}.attn.'),
    (r'^stages\.(\d+)\.local_perception_units\.(\d+)\.', lambda m: f'stages.{m[1]}.blocks.{m[2]}.lpu.'),
    (r'^stages\.(\d+)\.mlps\.(\d+)\.chunk\.linear(\d)\.', lambda m: f'stages.{m[1]}.blocks.{m[2]}.mlp.fc{m[3]}.'),
    (r'^stages\.(\d+)\.mlps\.(\d+)\.linear(\d)\.0\.', lambda m: f'stages.{m[1]}.blocks.{m[2]}.mlp.fc{m[3]}.'),
    (r'^stages\.(\d+)\.mlps\.(\d+)\.dwc\.', lambda m: f'stages.{m[1]}.blocks.{m[2]}.mlp.dwconv.'),
    (r'^norms\.(\d+)\.norm\.', lambda m: f'norm{m[1]}.'),
    (r'^cls_norm\.norm\.', lambda m: 'norm3.'),
]
# Stem tensor prefixes, original -> ours (plain prefixes: both directions are derived from them).
_STEM_PREFIXES = {
    'v1': [('patch_proj.0.', 'stem.conv.'), ('patch_proj.1.norm.', 'stem.norm.')],
    'pp': [
        ('patch_proj.0.', 'stem.conv1.'),
        ('patch_proj.1.norm.', 'stem.norm1.'),
        ('patch_proj.3.', 'stem.conv2.'),
        ('patch_proj.4.norm.', 'stem.norm2.'),
    ],
}


def _prefix_renames(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Regex rules ``(pattern, replacement)`` that replace each plain prefix ``a`` by ``b``
    (the replacements hold no backslash)."""
    return [('^' + re.escape(a), b) for a, b in pairs]


_STEM_RENAMES = {version: _prefix_renames(pairs) for version, pairs in _STEM_PREFIXES.items()}
# Derived buffers of the original v1 code: checked against ours, then dropped.
_DERIVED_BUFFERS = ('relative_position_index', 'attn_mask')


def rename_original_key(key: str, version: str) -> str:
    """Our name for an original backbone tensor name (without ``backbone.``)."""
    for pattern, repl in _STEM_RENAMES[version] + _COMMON_RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


# Our name pattern -> original name, per version: the inverse of the renames above, to name
# missing tensors as the user's checkpoint names them.
_INVERSE_STEM_RENAMES = {
    version: _prefix_renames([(ours, orig) for orig, ours in pairs]) for version, pairs in _STEM_PREFIXES.items()
}
_INVERSE_MLP_RENAMES = {'v1': r'stages.\1.mlps.\2.chunk.linear\3.', 'pp': r'stages.\1.mlps.\2.linear\3.0.'}
_INVERSE_COMMON_RENAMES = [
    (r'^stages\.(\d+)\.downsample\.conv\.', lambda m: f'down_projs.{int(m[1]) - 1}.0.'),
    (r'^stages\.(\d+)\.downsample\.norm\.', lambda m: f'down_projs.{int(m[1]) - 1}.1.norm.'),
    (
        r'^stages\.(\d+)\.blocks\.(\d+)\.norm([12])\.',
        lambda m: f'stages.{m[1]}.layer_norms.{2 * int(m[2]) + int(m[3]) - 1}.norm.',
    ),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.attn\.conv_offset\.1\.', r'stages.\1.attns.\2.conv_offset.1.norm.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.attn\.', r'stages.\1.attns.\2.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.lpu\.', r'stages.\1.local_perception_units.\2.'),
    (r'^stages\.(\d+)\.blocks\.(\d+)\.mlp\.dwconv\.', r'stages.\1.mlps.\2.dwc.'),
]


def original_key(key: str, version: str, classifier: bool) -> str:
    """The original name of one of our backbone tensor names (the inverse of :func:`rename_original_key`).

    Args:
        key (str): Our name, without ``backbone.``.
        version (str): ``'v1'`` or ``'pp'``.
        classifier (bool): ImageNet checkpoints name the last output norm ``cls_norm``, dense
            ones ``norms.3``.

    Returns:
        str: The original name (without ``backbone.``), or ``key`` if it has none.
    """
    if classifier and key.startswith('norm3.'):
        return 'cls_norm.norm.' + key[len('norm3.') :]
    rules = (
        _INVERSE_STEM_RENAMES[version]
        + _INVERSE_COMMON_RENAMES
        + [
            (r'^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc(\d)\.', _INVERSE_MLP_RENAMES[version]),
            (r'^norm(\d)\.', r'norms.\1.norm.'),
        ]
    )
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def group_keys(keys: Sequence[str]) -> list[str]:
    """List tensor names compactly and completely: names that differ only in one index share a line.

    ``stages.2.attns.1.proj_q.weight``, ``stages.2.attns.3.proj_q.weight`` and their biases
    become ``stages.2.attns.{1, 3}.proj_q.{weight, bias}``-style lines: keys are split into
    module, index and rest (``stages.2.attns``, ``1``, ``proj_q.weight``), and the indices that
    miss the same set of rests share one line.

    Args:
        keys (Sequence[str]): Tensor names, in the order to list them.

    Returns:
        list[str]: One line per group, in the order of each group's first key.
    """
    rests: dict[tuple[str, int | None], list[str]] = {}
    for key in keys:
        match = re.match(r'^(stages\.\d+\.[a-z_]+|[a-z_]+)\.(\d+)\.(.+)$', key)
        if match:
            module, index, rest = match[1], int(match[2]), match[3]
        else:
            module, _, rest = key.rpartition('.')
            index = None
        rests.setdefault((module, index), []).append(rest)
    groups: dict[tuple[str, tuple[str, ...]], list[int | None]] = {}
    for (module, index), names in rests.items():
        groups.setdefault((module, tuple(names)), []).append(index)

    def braces(items: list[str]) -> str:
        return items[0] if len(items) == 1 else '{' + ', '.join(items) + '}'

    lines = []
    for (module, names), indices in groups.items():
        parts = [module] if module else []
        if indices != [None]:
            parts.append(braces([str(i) for i in indices]))
        parts.append(braces(list(names)))
        lines.append('.'.join(parts))
    return lines


def is_original_state_dict(state_dict: dict[str, Tensor]) -> bool:
    """True for weights in the original naming (with or without ``backbone.``)."""
    return any(k.split('backbone.', 1)[-1].startswith(('patch_proj.', 'down_projs.')) for k in state_dict)


def infer_original_arch(state_dict: dict[str, Tensor]) -> tuple[dict, tuple[int, int]]:
    """Read version, widths, heads, groups, block pattern and construction size from weights.

    Each setting is read from the first of several tensors that tell it, so a checkpoint that
    lacks some tensors is still read (the conversion then lists what is missing). Settings that
    no present tensor tells (e.g. a stage without any tensor) are taken from the released
    variant that fits all present tensors, if exactly one does.

    Args:
        state_dict (dict): Original backbone weights, without the ``backbone.`` prefix.

    Returns:
        tuple: a custom-arch dict for :class:`DAT` and the construction image size (H, W).

    Raises:
        ConversionError: When the checkpoint is not in the original naming, or a setting can be
            read neither from its tensors nor from a released variant; the message says which.
    """
    try:
        arch, img_size = _infer_original_arch(state_dict)
        resolve_arch(arch)
    except ConversionError:
        raise
    except (KeyError, IndexError, ValueError, TypeError) as error:
        raise ConversionError(
            f'Cannot read the DAT layout from this checkpoint: {type(error).__name__}: {error}'
        ) from error
    return arch, img_size


_ORIGINAL_KEY = re.compile(
    r'^(patch_proj|down_projs|cls_norm|norms)\.|'
    r'^stages\.\d+\.(attns|mlps|layer_norms|local_perception_units)\.\d+\.'
)
# Tensors under ``stages.i.attns.b.`` that tell a block's type.
_BLOCK_MARKERS = {
    'D': ('rpe_table', 'conv_offset.', 'proj_q.', 'proj_k.', 'proj_v.'),
    'N': ('rpb', 'qkv.', 'proj.'),
    'L': ('relative_position_bias_table', 'relative_position_index', 'proj_qkv.', 'attn_mask'),
}


def _first_size(state_dict: dict[str, Tensor], candidates: Sequence[tuple[str, int]]) -> int | None:
    """Size ``dim`` of the first ``(key, dim)`` of ``candidates`` whose tensor is present."""
    for key, dim in candidates:
        value = state_dict.get(key)
        if isinstance(value, Tensor) and value.dim() > dim:
            return int(value.shape[dim])
    return None


def _stage_width(state_dict: dict[str, Tensor], i: int, version: str) -> int | None:
    """``dims[i]`` from the first tensor present that tells it."""
    candidates = []
    if i:
        candidates += [
            (f'down_projs.{i - 1}.0.weight', 0),
            (f'down_projs.{i - 1}.1.norm.weight', 0),
            (f'down_projs.{i - 1}.1.norm.bias', 0),
        ]
    elif version == 'pp':
        candidates += [('patch_proj.3.weight', 0), ('patch_proj.4.norm.weight', 0), ('patch_proj.4.norm.bias', 0)]
    else:
        candidates += [('patch_proj.0.weight', 0), ('patch_proj.1.norm.weight', 0), ('patch_proj.1.norm.bias', 0)]
    if i < 3:
        candidates.append((f'down_projs.{i}.0.weight', 1))
    candidates += [(f'norms.{i}.norm.weight', 0), (f'norms.{i}.norm.bias', 0)]
    if i == 3:
        candidates += [('cls_norm.norm.weight', 0), ('cls_norm.norm.bias', 0), ('cls_head.weight', 1)]
    pattern = re.compile(rf'stages\.{i}\.(layer_norms\.\d+\.norm|local_perception_units\.\d+)\.(weight|bias)$')
    candidates += [(k, 0) for k in state_dict if pattern.match(k)]
    size = _first_size(state_dict, candidates)
    if size is None and i == 0 and version == 'pp':  # the first stem conv has half the width
        half = _first_size(
            state_dict,
            [
                ('patch_proj.0.weight', 0),
                ('patch_proj.1.norm.weight', 0),
                ('patch_proj.1.norm.bias', 0),
                ('patch_proj.3.weight', 1),
            ],
        )
        size = None if half is None else 2 * half
    return size


def _infer_original_arch(state_dict: dict[str, Tensor]) -> tuple[dict, tuple[int, int]]:
    """:func:`infer_original_arch` without the translation of lookup errors."""
    if not any(_ORIGINAL_KEY.match(k) for k in state_dict):
        raise ConversionError(
            'Not an original DAT checkpoint: no tensor is named as in the original code '
            '(patch_proj.*, down_projs.*, stages.i.attns.b.*, ...); '
            f'first keys: {list(state_dict)[:5]}'
        )
    pp_key = re.compile(
        r'^patch_proj\.[34]\.|'
        r'^stages\.\d+\.(local_perception_units\.|mlps\.\d+\.(dwc|linear\d\.0)\.)'
    )
    version = 'pp' if any(pp_key.match(k) for k in state_dict) else 'v1'
    dims = [_stage_width(state_dict, i, version) for i in range(4)]
    heads: list[int | None] = [None] * 4
    groups: list[int | None] = [None] * 4
    kinds: list[list[str | None]] = [[] for _ in range(4)]
    window_size, img_size = None, None
    has_masks = any(k.endswith('attn_mask') for k in state_dict)
    for i in range(4):
        indices = set()
        for key in state_dict:
            match = re.match(rf'stages\.{i}\.(attns|mlps|local_perception_units|layer_norms)\.(\d+)\.', key)
            if match:
                indices.add(int(match[2]) // (2 if match[1] == 'layer_norms' else 1))
        for b in range(max(indices) + 1 if indices else 0):
            prefix = f'stages.{i}.attns.{b}.'
            names = [k[len(prefix) :] for k in state_dict if k.startswith(prefix)]
            kind = next(
                (
                    kind
                    for kind, markers in _BLOCK_MARKERS.items()
                    if any(n == m or (m.endswith('.') and n.startswith(m)) for n in names for m in markers)
                ),
                None,
            )
            if kind == 'D':
                heads[i] = heads[i] or _first_size(state_dict, [(prefix + 'rpe_table', 0)])
                group_dim = _first_size(
                    state_dict,
                    [
                        (prefix + 'conv_offset.0.weight', 0),
                        (prefix + 'conv_offset.0.bias', 0),
                        (prefix + 'conv_offset.1.norm.weight', 0),
                        (prefix + 'conv_offset.1.norm.bias', 0),
                        (prefix + 'conv_offset.3.weight', 1),
                    ],
                )
                if group_dim and dims[i] and groups[i] is None:
                    groups[i] = dims[i] // group_dim
                if prefix + 'rpe_table' in state_dict:
                    table = state_dict[prefix + 'rpe_table']
                    stride = 4 * 2**i
                    img_size = ((table.shape[1] + 1) // 2 * stride, (table.shape[2] + 1) // 2 * stride)
            elif kind == 'N':
                heads[i] = heads[i] or _first_size(state_dict, [(prefix + 'rpb', 0)])
            elif kind == 'L':
                table = state_dict.get(prefix + 'relative_position_bias_table')
                if table is not None:
                    n, heads[i] = table.shape
                    window_size = (math.isqrt(n) + 1) // 2
                # The released files hold the shift mask of every 'S' block; without it the
                # v1 pattern alternates L, S.
                shifted = prefix + 'attn_mask' in state_dict or (not has_masks and b % 2 == 1)
                kind = 'S' if shifted else 'L'
            kinds[i].append(kind)
        if kinds[i] and None not in kinds[i] and 'D' not in kinds[i]:
            groups[i] = 0
    window_size = _fill_from_variants(version, dims, heads, groups, kinds, window_size)
    arch = dict(
        version=version,
        dims=dims,
        heads=heads,
        groups=groups,
        stage_spec=[''.join(k) for k in kinds],
        window_size=window_size,
    )
    return arch, img_size or (224, 224)


def _fill_from_variants(
    version: str,
    dims: list[int | None],
    heads: list[int | None],
    groups: list[int | None],
    kinds: list[list[str | None]],
    window_size: int | None,
) -> int:
    """Fill the settings no tensor told (None, or a stage without blocks) from the released variants
    that fit every known setting, where they all agree; raise if something stays unknown.

    Returns:
        int: The window size (v1's Swin windows; 7 where no tensor or variant tells it).
    """

    def fits(variant: dict) -> bool:
        if variant['version'] != version or window_size not in (None, variant['window_size']):
            return False
        for i in range(4):
            spec = variant['stage_spec'][i]
            if any(
                known is not None and known != variant[key][i]
                for key, known in (('dims', dims[i]), ('heads', heads[i]), ('groups', groups[i]))
            ):
                return False
            if kinds[i] and (
                len(kinds[i]) != len(spec) or any(k is not None and k != s for k, s in zip(kinds[i], spec, strict=True))
            ):
                return False
        return True

    fitting = [ARCH_ZOO[name] for name in CANONICAL_ARCHS if fits(ARCH_ZOO[name])]
    problems = []

    def fill(values: list, key: str, i: int, what: str) -> None:
        options = {v[key][i] for v in fitting}
        if len(options) == 1:
            values[i] = options.pop()
        else:
            problems.append(what)

    for i in range(4):
        if dims[i] is None:
            fill(
                dims,
                'dims',
                i,
                f'dims[{i}]: no down_projs.{i - 1}.*, stages.{i}.layer_norms.* or other tensor '
                f'of width dims[{i}] is present'
                if i
                else 'dims[0]: no patch_proj.*, stages.0.layer_norms.* or other tensor of width dims[0] is present',
            )
        if not kinds[i] or None in kinds[i]:
            options = {v['stage_spec'][i] for v in fitting}
            if len(options) == 1:
                kinds[i] = list(options.pop())
            elif not kinds[i]:
                problems.append(f'stage_spec[{i}]: no tensor of stage {i} (stages.{i}.*) is present')
            else:
                unknown = [b for b, k in enumerate(kinds[i]) if k is None]
                problems.append(
                    f'stage_spec[{i}]: no attention tensor of block(s) {unknown} '
                    f'(stages.{i}.attns.b.*) is present, so their type (L, S, N or D) is unknown'
                )
        if heads[i] is None:
            fill(
                heads,
                'heads',
                i,
                f'heads[{i}]: no bias table (rpe_table, rpb or relative_position_bias_table) of stage {i} is present',
            )
        if groups[i] is None:
            fill(groups, 'groups', i, f'groups[{i}]: no conv_offset.* tensor of a D block of stage {i} is present')
    if problems:
        raise ConversionError(
            'Cannot read the DAT layout from this checkpoint, and no released variant fits '
            'the tensors that are present:\n  ' + '\n  '.join(problems)
        )
    if window_size is None:
        options = {v['window_size'] for v in fitting}
        window_size = options.pop() if len(options) == 1 else 7
    return window_size


def _check_derived_buffer(key: str, value: Tensor, window: int) -> str | None:
    """Compare an original derived buffer with ours; return a problem description or None."""
    if key.endswith('relative_position_index'):
        expected = relative_position_index(window)
    else:  # attn_mask of a shifted block: (num_windows, w*w, w*w) of a square map
        side = math.isqrt(value.shape[0]) * window
        expected = shifted_window_mask(side, side, window, shift_size_for(window))
    if value.shape != expected.shape or not torch.equal(value.to(expected.dtype), expected):
        return f'{key}: derived buffer differs from the one this model computes'
    return None


def convert_original_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
    """Convert original weights (ImageNet classifier or mmdet 2.x / mmseg 0.x model).

    ImageNet checkpoints become an mmpretrain ``ImageClassifier`` state dict
    (``backbone.*``, ``backbone.norm3.*`` from ``cls_norm``, ``head.fc.*`` from ``cls_head``);
    dense-prediction checkpoints keep their neck/head keys and get ``backbone.norm{i}.*``.

    Args:
        state_dict (dict): The original weights.

    Returns:
        tuple: the converted state dict, and ``info`` with ``version``, ``arch`` (zoo name or
        settings dict), ``img_size`` and ``kind`` (``'classifier'`` or ``'dense'``).

    Raises:
        ConversionError: When a source tensor is left unused or used twice, a shape differs, or
            tensors are missing (listed by their original names, grouped); the message lists
            every problem.
    """
    dense = any(k.startswith('backbone.') for k in state_dict)
    backbone_src = (
        {k[len('backbone.') :]: v for k, v in state_dict.items() if k.startswith('backbone.')}
        if dense
        else {k: v for k, v in state_dict.items() if not k.startswith('cls_head.')}
    )
    arch, img_size = infer_original_arch(backbone_src)
    name = match_arch_name(arch)
    if dense:
        norm_keys = (re.match(r'norms\.(\d+)\.norm\.', k) for k in backbone_src)
        out_indices = tuple(sorted({int(m[1]) for m in norm_keys if m}))
    else:
        out_indices = (3,)
    model = DAT(arch=name or arch, out_indices=out_indices or (0, 1, 2, 3), img_size=img_size)
    targets = model.state_dict()

    problems: list[str] = []
    converted: dict[str, Tensor] = {}
    offered = set()  # targets some source tensor was renamed to (filled, or of the wrong shape)
    for key, value in backbone_src.items():
        if key.endswith(_DERIVED_BUFFERS):
            problem = _check_derived_buffer(key, value, arch['window_size'])
            if problem:
                problems.append(problem)
            continue
        new = rename_original_key(key, arch['version'])
        offered.add(new)
        if new not in targets:
            problems.append(f'unused source tensor {key} (-> {new}, no such parameter)')
        elif new in converted:
            problems.append(f'{new} filled twice (again from {key})')
        elif targets[new].shape != value.shape:
            problems.append(f'{key} -> {new}: shape {tuple(value.shape)} != expected {tuple(targets[new].shape)}')
        else:
            converted[new] = value
    missing = [original_key(k, arch['version'], classifier=not dense) for k in targets if k not in offered]
    if not dense:
        missing += [k for k in ('cls_head.weight', 'cls_head.bias') if k not in state_dict]
    if missing:
        layout = f'the {name} layout' if name else f'this custom {arch["version"]} layout'
        problems.append(
            f'the checkpoint lacks {len(missing)} of the {len(targets) + (0 if dense else 2)} tensors of '
            f'{layout} (as read from the tensors present)'
            + (" (names after 'backbone.')" if dense else '')
            + ':\n    '
            + '\n    '.join(group_keys(missing))
        )
    if problems:
        raise ConversionError('Conversion failed:\n  ' + '\n  '.join(problems))

    result = {f'backbone.{k}': v for k, v in converted.items()}
    if dense:
        result.update({k: v for k, v in state_dict.items() if not k.startswith('backbone.')})
    else:
        head = {k: v for k, v in state_dict.items() if k.startswith('cls_head.')}
        if set(head) != {'cls_head.weight', 'cls_head.bias'}:
            raise ConversionError(f'Expected cls_head.weight and cls_head.bias, got {sorted(head)}')
        result['head.fc.weight'] = head['cls_head.weight']
        result['head.fc.bias'] = head['cls_head.bias']
    info = dict(
        version=arch['version'],
        arch=name or arch,
        img_size=list(img_size),
        kind='dense' if dense else 'classifier',
        out_indices=list(out_indices),
    )
    return result, info
