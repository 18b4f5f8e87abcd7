"""Loading our own (converted) pretrained weights into a DAT backbone, strictly.

:meth:`DAT.init_weights <projects.dat.models.dat.DAT.init_weights>` calls
:func:`load_pretrained_backbone` for ``init_cfg=dict(type='Pretrained', checkpoint=...)``.
Checkpoints of the original code are another layout: :mod:`projects.dat.converter` translates
them first (``tools/model_converters/dat_official.py``); this module only recognises them, to
say so. Files are read by the safe loaders of :mod:`projects.dat.checkpoint`, which import
nothing of the models.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from mmengine.logging import MMLogger
from mmengine.runner.checkpoint import CheckpointLoader
from torch import Tensor, nn

from ..checkpoint import extract_state_dict, load_from_http_weights_only, load_original_checkpoint

__all__ = ['ConversionError', 'is_original_state_dict', 'load_pretrained_backbone', 'resize_bias_table']

# Parameters whose shape follows the window or construction size; resized instead of refused.
_TABLE_KEYS = ('rpe_table', 'relative_position_bias_table', 'rpb')


def _heads_axis(key: str) -> int:
    """The heads axis of a bias table: ``relative_position_bias_table`` is ``((2w-1)^2, heads)``,
    ``rpe_table`` and ``rpb`` are ``(heads, Th, Tw)``."""
    return 1 if key.endswith('relative_position_bias_table') else 0


def _resizable_table(key: str, shape: torch.Size, model_shape: torch.Size) -> bool:
    """Whether a checkpoint's bias table of ``shape`` resizes to the model's: the same heads, only
    the positions differ."""
    if not key.endswith(_TABLE_KEYS) or len(shape) != len(model_shape):
        return False
    axis = _heads_axis(key)
    return shape[axis] == model_shape[axis]


class ConversionError(ValueError):
    """A checkpoint does not match the model it is converted to or loaded into."""


def is_original_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether ``state_dict`` is in the naming of the original code (with or without ``backbone.``).

    Args:
        state_dict: Weights.

    Returns:
        True if a key starts with the original stem or downsampling names (``patch_proj.``,
        ``down_projs.``), which no converted checkpoint has.
    """
    return any(k.split('backbone.', 1)[-1].startswith(('patch_proj.', 'down_projs.')) for k in state_dict)


def resize_bias_table(key: str, table: Tensor, shape: torch.Size) -> Tensor:
    """Resize a bias table to another window / construction size (bicubic, as the original).

    ``rpe_table`` ``(heads, Th, Tw)`` and ``rpb`` are resized as images;
    ``relative_position_bias_table`` ``((2w-1)^2, heads)`` as a ``(2w-1) x (2w-1)`` image
    per head.

    Args:
        key: The parameter's name (its last part tells the table's layout).
        table: The checkpoint's table, float.
        shape: The model's shape of the table.

    Returns:
        The table resized to ``shape``.
    """
    if key.endswith('relative_position_bias_table'):
        side, new_side = math.isqrt(table.shape[0]), math.isqrt(shape[0])
        grid = table.t().reshape(1, -1, side, side)
        return F.interpolate(grid, (new_side, new_side), mode='bicubic').reshape(-1, new_side * new_side).t()
    return F.interpolate(table[None], tuple(shape[1:]), mode='bicubic')[0]


def _load_checkpoint(checkpoint: str) -> dict[str, Tensor]:
    """The state dict of a converted checkpoint, loaded with ``weights_only=True``: URLs and named
    models by the loaders of :mod:`~projects.dat.checkpoint.url_loader`, local files by the safe
    loader; other storage (``s3://`` and the like) by mmengine's loaders, with ``torch.load``'s
    default (``weights_only=True`` from torch 2.6)."""
    if str(checkpoint).startswith(('http://', 'https://')):
        # Fully unpickled only for a URL under DAT_TRUSTED_CHECKPOINT_URLS.
        ckpt = load_from_http_weights_only(checkpoint, map_location='cpu')
    elif '://' in str(checkpoint):  # named models and other storage: mmengine's table of loaders (with ours)
        ckpt = CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu')
    else:  # local files get the clear errors of the safe loader
        ckpt = load_original_checkpoint(checkpoint)
    return extract_state_dict(ckpt)


def load_pretrained_backbone(
    model: nn.Module, checkpoint: str, prefix: str | None = 'backbone.', logger: MMLogger | None = None
) -> None:
    """Load converted weights into a DAT backbone strictly.

    Bias tables of another size (with the model's heads) are resized (bicubic) with a logged
    message; output norms absent from the checkpoint (a classifier has only ``norm3``) keep
    their initialisation, also logged. Anything else that is missing, unexpected or of another
    shape is an error.

    Args:
        model: The backbone (a :class:`~projects.dat.models.dat.DAT`).
        checkpoint: Path or URL of a converted checkpoint. Files are loaded with
            ``weights_only=True``; an ``http(s)://`` URL is fully unpickled only if it starts
            with a prefix in ``DAT_TRUSTED_CHECKPOINT_URLS`` (see
            :func:`projects.dat.checkpoint.load_from_http_weights_only`).
        prefix: Prefix of the backbone keys in the checkpoint; None or ``''`` for a checkpoint
            of the backbone alone. Defaults to ``'backbone.'``.
        logger: An mmengine logger, or None for ``print``.

    Raises:
        ConversionError: If the checkpoint is an original one (convert it first), has no key
            with ``prefix``, or does not fit the model (every problem is listed).
        CheckpointError: If the file cannot be read (see :mod:`projects.dat.checkpoint`).
    """
    log: Callable[[str], None] = logger.info if logger is not None else print
    state_dict = _load_checkpoint(checkpoint)
    if is_original_state_dict(state_dict):
        raise ConversionError(
            f'{checkpoint} is an original DAT checkpoint; convert it first with '
            'tools/model_converters/dat_official.py SRC DST'
        )
    if prefix:
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not state_dict:
            raise ConversionError(f'No key of {checkpoint} starts with prefix {prefix!r}')
    targets = model.state_dict()
    problems, loaded = [], {}
    for key, value in state_dict.items():
        if key not in targets:
            problems.append(f'unexpected key {key}')
        elif targets[key].shape != value.shape:
            if _resizable_table(key, value.shape, targets[key].shape):
                log(f'Resizing {key} from {tuple(value.shape)} to {tuple(targets[key].shape)} (bicubic)')
                loaded[key] = resize_bias_table(key, value.float(), targets[key].shape).to(value.dtype)
            else:
                hint = ' (bias tables resize over positions, not heads)' if key.endswith(_TABLE_KEYS) else ''
                problems.append(f'{key}: shape {tuple(value.shape)} != model {tuple(targets[key].shape)}{hint}')
        else:
            loaded[key] = value
    missing = [k for k in targets if k not in state_dict]
    fresh_norms = [k for k in missing if re.match(r'norm\d\.', k)]
    problems += [f'missing key {k}' for k in missing if k not in fresh_norms]
    if problems:
        raise ConversionError(
            f'Checkpoint {checkpoint} does not fit DAT(arch={model.arch_name!r}, '
            f'dims={model.num_features}):\n  ' + '\n  '.join(problems)
        )
    model.load_state_dict(loaded, strict=False)
    fresh = f'; newly initialised output norms: {sorted({k.split(".")[0] for k in fresh_norms})}' if fresh_norms else ''
    log(f'Loaded {len(loaded)} tensors from {checkpoint}{fresh}')
