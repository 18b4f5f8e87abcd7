"""Conversion of the original DAT / DAT++ checkpoints, and strict loading of converted ones.

The original code names tensors ``patch_proj.*``, ``down_projs.i.*``,
``stages.i.layer_norms.{2b,2b+1}.norm.*``, ``stages.i.attns.b.*``, ``stages.i.mlps.b.*``,
``stages.i.local_perception_units.b.*``, ``cls_norm.norm.*`` and ``cls_head.*`` (see
``shared/reference/official_keys``); its mmdet 2.x / mmseg 0.x checkpoints add ``backbone.``
and the output norms ``backbone.norms.i.norm.*``. :func:`convert_original_state_dict` maps
them onto :class:`~projects.dat.models.DAT` names, using every source tensor exactly once and
filling every target tensor, or stops with a list of what is wrong.
"""
import math
import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .models.dat import CANONICAL_ARCHS, DAT, resolve_arch
from .models.geometry import relative_position_index, shift_size_for, shifted_window_mask


class ConversionError(ValueError):
    """A checkpoint does not match the model it is converted to or loaded into."""


# Original name pattern -> our name, per version. Applied to backbone keys without prefix.
_COMMON_RENAMES = [
    (r'^down_projs\.(\d+)\.0\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.conv.'),
    (r'^down_projs\.(\d+)\.1\.norm\.', lambda m: f'stages.{int(m[1]) + 1}.downsample.norm.'),
    (r'^stages\.(\d+)\.layer_norms\.(\d+)\.norm\.',
     lambda m: f'stages.{m[1]}.blocks.{int(m[2]) // 2}.norm{int(m[2]) % 2 + 1}.'),
    (r'^stages\.(\d+)\.attns\.(\d+)\.conv_offset\.1\.norm\.',
     lambda m: f'stages.{m[1]}.blocks.{m[2]}.attn.conv_offset.1.'),
    (r'^stages\.(\d+)\.attns\.(\d+)\.', lambda m: f'stages.{m[1]}.blocks.{m[2]}.attn.'),
    (r'^stages\.(\d+)\.local_perception_units\.(\d+)\.', lambda m: f'stages.{m[1]}.blocks.{m[2]}.lpu.'),
    (r'^stages\.(\d+)\.mlps\.(\d+)\.chunk\.linear(\d)\.', lambda m: f'stages.{m[1]}.blocks.{m[2]}.mlp.fc{m[3]}.'),
    (r'^stages\.(\d+)\.mlps\.(\d+)\.linear(\d)\.0\.', lambda m: f'stages.{m[1]}.blocks.{m[2]}.mlp.fc{m[3]}.'),
    (r'^stages\.(\d+)\.mlps\.(\d+)\.dwc\.', lambda m: f'stages.{m[1]}.blocks.{m[2]}.mlp.dwconv.'),
    (r'^norms\.(\d+)\.norm\.', lambda m: f'norm{m[1]}.'),
    (r'^cls_norm\.norm\.', lambda m: 'norm3.'),
]
_STEM_RENAMES = {
    'v1': [(r'^patch_proj\.0\.', 'stem.conv.'), (r'^patch_proj\.1\.norm\.', 'stem.norm.')],
    'pp': [(r'^patch_proj\.0\.', 'stem.conv1.'), (r'^patch_proj\.1\.norm\.', 'stem.norm1.'),
           (r'^patch_proj\.3\.', 'stem.conv2.'), (r'^patch_proj\.4\.norm\.', 'stem.norm2.')],
}
# Derived buffers of the original v1 code: checked against ours, then dropped.
_DERIVED_BUFFERS = ('relative_position_index', 'attn_mask')


def rename_original_key(key: str, version: str) -> str:
    """Our name for an original backbone tensor name (without ``backbone.``)."""
    for pattern, repl in _STEM_RENAMES[version] + _COMMON_RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def is_original_state_dict(state_dict: Dict[str, Tensor]) -> bool:
    """True for weights in the original naming (with or without ``backbone.``)."""
    return any(k.split('backbone.', 1)[-1].startswith(('patch_proj.', 'down_projs.')) for k in state_dict)


def infer_original_arch(state_dict: Dict[str, Tensor]) -> Tuple[dict, Tuple[int, int]]:
    """Read version, widths, heads, groups, block pattern and construction size from weights.

    Args:
        state_dict (dict): Original backbone weights, without the ``backbone.`` prefix.

    Returns:
        tuple: a custom-arch dict for :class:`DAT` and the construction image size (H, W).

    Raises:
        ConversionError: When a tensor that tells the layout is missing or badly shaped.
    """
    try:
        arch, img_size = _infer_original_arch(state_dict)
        resolve_arch(arch)
    except ConversionError:
        raise
    except (KeyError, IndexError, ValueError, TypeError) as error:
        raise ConversionError(f'Cannot read the DAT layout from this checkpoint: {type(error).__name__}: '
                              f'{error}') from error
    return arch, img_size


def _infer_original_arch(state_dict: Dict[str, Tensor]) -> Tuple[dict, Tuple[int, int]]:
    """:func:`infer_original_arch` without the translation of lookup errors."""
    if 'patch_proj.0.weight' not in state_dict:
        raise ConversionError('Not an original DAT checkpoint: no patch_proj.0.weight '
                              f'(first keys: {list(state_dict)[:5]})')
    version = 'pp' if 'patch_proj.3.weight' in state_dict else 'v1'
    dims = [state_dict['patch_proj.0.weight'].shape[0] * (2 if version == 'pp' else 1)]
    dims += [state_dict[f'down_projs.{i}.0.weight'].shape[0] for i in range(3)]
    heads, groups, spec, img_size = [0] * 4, [0] * 4, [''] * 4, None
    window_size = 7
    for i in range(4):
        blocks = sorted({int(m[1]) for k in state_dict if (m := re.match(rf'stages\.{i}\.attns\.(\d+)\.', k))})
        for b in blocks:
            prefix = f'stages.{i}.attns.{b}.'
            if prefix + 'rpe_table' in state_dict:
                table = state_dict[prefix + 'rpe_table']
                heads[i] = table.shape[0]
                groups[i] = dims[i] // state_dict[prefix + 'conv_offset.0.weight'].shape[0]
                stride = 4 * 2 ** i
                img_size = ((table.shape[1] + 1) // 2 * stride, (table.shape[2] + 1) // 2 * stride)
                spec[i] += 'D'
            elif prefix + 'rpb' in state_dict:
                heads[i] = state_dict[prefix + 'rpb'].shape[0]
                spec[i] += 'N'
            elif prefix + 'relative_position_bias_table' in state_dict:
                n, heads[i] = state_dict[prefix + 'relative_position_bias_table'].shape
                window_size = (math.isqrt(n) + 1) // 2
                # The released files hold the shift mask of every 'S' block; without it the
                # v1 pattern alternates L, S.
                shifted = prefix + 'attn_mask' in state_dict or (
                    not any(k.endswith('attn_mask') for k in state_dict) and b % 2 == 1)
                spec[i] += 'S' if shifted else 'L'
            else:
                raise ConversionError(f'Cannot tell the block type of {prefix[:-1]}')
    arch = dict(version=version, dims=dims, heads=heads, groups=groups, stage_spec=spec, window_size=window_size)
    return arch, img_size or (224, 224)


def match_arch_name(arch: dict) -> Optional[str]:
    """The released variant (``'dat-t'``, ..., ``'datpp-b'``) with these settings, if any."""
    for name in CANONICAL_ARCHS:
        settings = DAT.arch_zoo[name]
        if all(settings[k] == v for k, v in arch.items()):
            return name
    return None


def _check_derived_buffer(key: str, value: Tensor, window: int) -> Optional[str]:
    """Compare an original derived buffer with ours; return a problem description or None."""
    if key.endswith('relative_position_index'):
        expected = relative_position_index(window)
    else:  # attn_mask of a shifted block: (num_windows, w*w, w*w) of a square map
        side = math.isqrt(value.shape[0]) * window
        expected = shifted_window_mask(side, side, window, shift_size_for(window))
    if value.shape != expected.shape or not torch.equal(value.to(expected.dtype), expected):
        return f'{key}: derived buffer differs from the one this model computes'
    return None


def convert_original_state_dict(state_dict: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], dict]:
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
        ConversionError: When a source tensor is left unused or used twice, a target tensor
            is not filled, or a shape differs; the message lists every problem.
    """
    dense = any(k.startswith('backbone.') for k in state_dict)
    backbone_src = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')} \
        if dense else {k: v for k, v in state_dict.items() if not k.startswith('cls_head.')}
    arch, img_size = infer_original_arch(backbone_src)
    name = match_arch_name(arch)
    if dense:
        norm_keys = (re.match(r'norms\.(\d+)\.norm\.weight', k) for k in backbone_src)
        out_indices = tuple(sorted(int(m[1]) for m in norm_keys if m))
    else:
        out_indices = (3,)
    model = DAT(arch=name or arch, out_indices=out_indices or (0, 1, 2, 3), img_size=img_size)
    targets = model.state_dict()

    problems: List[str] = []
    converted: Dict[str, Tensor] = {}
    for key, value in backbone_src.items():
        if key.endswith(_DERIVED_BUFFERS):
            problem = _check_derived_buffer(key, value, arch['window_size'])
            if problem:
                problems.append(problem)
            continue
        new = rename_original_key(key, arch['version'])
        if new not in targets:
            problems.append(f'unused source tensor {key} (-> {new}, no such parameter)')
        elif new in converted:
            problems.append(f'{new} filled twice (again from {key})')
        elif targets[new].shape != value.shape:
            problems.append(f'{key} -> {new}: shape {tuple(value.shape)} != expected {tuple(targets[new].shape)}')
        else:
            converted[new] = value
    problems += [f'target tensor {k} not filled' for k in targets if k not in converted]
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
    info = dict(version=arch['version'], arch=name or arch, img_size=list(img_size),
                kind='dense' if dense else 'classifier', out_indices=list(out_indices))
    return result, info


def resize_bias_table(key: str, table: Tensor, shape: torch.Size) -> Tensor:
    """Resize a bias table to another window / construction size (bicubic, as the original).

    ``rpe_table`` ``(heads, Th, Tw)`` and ``rpb`` are resized as images;
    ``relative_position_bias_table`` ``((2w-1)^2, heads)`` as a ``(2w-1) x (2w-1)`` image
    per head.
    """
    if key.endswith('relative_position_bias_table'):
        side, new_side = math.isqrt(table.shape[0]), math.isqrt(shape[0])
        grid = table.t().reshape(1, -1, side, side)
        return F.interpolate(grid, (new_side, new_side), mode='bicubic').reshape(-1, new_side * new_side).t()
    return F.interpolate(table[None], tuple(shape[1:]), mode='bicubic')[0]


_TABLE_KEYS = ('rpe_table', 'relative_position_bias_table', 'rpb')


def load_pretrained_backbone(model: DAT, checkpoint: str, prefix: Optional[str] = 'backbone.',
                             logger=None) -> None:
    """Load converted weights into a DAT backbone strictly.

    Bias tables of another shape are resized (bicubic) with a logged message; output norms
    absent from the checkpoint (a classifier has only ``norm3``) keep their initialisation,
    also logged. Anything else that is missing, unexpected or of another shape is an error.

    Args:
        model (DAT): The backbone.
        checkpoint (str): Path or URL of a converted checkpoint.
        prefix (str, optional): Prefix of the backbone keys in the checkpoint.
        logger: An mmengine logger, or None for ``print``.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    from .checkpoint import extract_state_dict, load_original_checkpoint

    log = logger.info if logger is not None else print
    if '://' in str(checkpoint):
        ckpt = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    else:  # local files get the clear errors of the safe loader (weights_only stays on)
        ckpt = load_original_checkpoint(checkpoint)
    state_dict = extract_state_dict(ckpt)
    if is_original_state_dict(state_dict):
        raise ConversionError(f'{checkpoint} is an original DAT checkpoint; convert it first with '
                              'tools/model_converters/dat_official.py SRC DST')
    if prefix:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise ConversionError(f'No key of {checkpoint} starts with prefix {prefix!r}')
    targets = model.state_dict()
    problems, loaded = [], {}
    for key, value in state_dict.items():
        if key not in targets:
            problems.append(f'unexpected key {key}')
        elif targets[key].shape != value.shape:
            if key.endswith(_TABLE_KEYS) and value.dim() == targets[key].dim():
                log(f'Resizing {key} from {tuple(value.shape)} to {tuple(targets[key].shape)} (bicubic)')
                loaded[key] = resize_bias_table(key, value.float(), targets[key].shape).to(value.dtype)
            else:
                problems.append(f'{key}: shape {tuple(value.shape)} != model {tuple(targets[key].shape)}')
        else:
            loaded[key] = value
    missing = [k for k in targets if k not in loaded]
    fresh_norms = [k for k in missing if re.match(r'norm\d\.', k)]
    problems += [f'missing key {k}' for k in missing if k not in fresh_norms]
    if problems:
        raise ConversionError(f'Checkpoint {checkpoint} does not fit DAT(arch={model.arch_name!r}, '
                              f'dims={model.num_features}):\n  ' + '\n  '.join(problems))
    model.load_state_dict(loaded, strict=False)
    log(f'Loaded {len(loaded)} tensors from {checkpoint}'
        + (f'; newly initialised output norms: {sorted({k.split(".")[0] for k in fresh_norms})}'
           if fresh_norms else ''))
