"""The published DAT / DAT++ variants, their names, and the checks of custom settings.

A variant is a dict of settings: ``version`` (``'v1'``: DAT, CVPR 2022, arXiv 2201.00520;
``'pp'``: DAT++, arXiv 2309.01430), the per-stage ``dims``, ``heads``, ``groups`` (offset
groups of the ``D`` blocks, 0 for stages without), ``stage_spec`` (one block letter per block:
``L``/``S`` Swin windows, plain or shifted, ``N`` neighbourhood, ``D`` deformable),
``key_strides`` and ``offset_kernels`` (the offset network of the ``D`` blocks), and
``window_size``, ``offset_range_factor``, ``neighborhood_size``, ``mlp_ratio``,
``drop_path_rate``. The released models' settings are those of the original code
(LeapLabTHU/DAT).

:data:`ARCH_ZOO` maps the seven canonical names (:data:`CANONICAL_ARCHS`) and their long
aliases (:data:`ARCH_ALIASES`) to their settings; :func:`resolve_arch` turns a name or a custom
dict into checked settings, which is what :class:`~projects.dat.models.dat.DAT` builds from.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = [
    'ARCH_ALIASES',
    'ARCH_ZOO',
    'BLOCK_TYPES',
    'CANONICAL_ARCHS',
    'VERSIONS',
    'canonical_arch',
    'check_drop_path_rate',
    'is_int',
    'match_arch_name',
    'resolve_arch',
]

VERSIONS = ('v1', 'pp')
BLOCK_TYPES = 'LSND'


def _variant(
    version: str,
    dims: Sequence[int],
    heads: Sequence[int],
    groups: Sequence[int],
    stage_spec: Sequence[str],
    drop_path_rate: float,
    window_size: int = 7,
) -> dict[str, Any]:
    """The settings of a variant: the given ones plus the defaults of its ``version``."""
    strides = (1, 1, 1, 1) if version == 'v1' else (8, 4, 2, 1)
    return dict(
        version=version,
        dims=list(dims),
        heads=list(heads),
        groups=list(groups),
        stage_spec=list(stage_spec),
        drop_path_rate=drop_path_rate,
        window_size=window_size,
        key_strides=list(strides),
        offset_kernels=[9, 7, 5, 3],
        offset_range_factor=2.0 if version == 'v1' else None,
        neighborhood_size=7,
        mlp_ratio=4,
    )


_V1_T = ['LS', 'LS', 'LD' * 3, 'LD']
_V1_S = ['LS', 'LS', 'LD' * 9, 'LD']
_PP = ['ND', 'ND' * 2, 'ND' * 9, 'DD']

_RELEASED = {
    'dat-t': _variant('v1', [96, 192, 384, 768], [3, 6, 12, 24], [0, 0, 3, 6], _V1_T, 0.2),
    'dat-s': _variant('v1', [96, 192, 384, 768], [3, 6, 12, 24], [0, 0, 3, 6], _V1_S, 0.3),
    'dat-b': _variant('v1', [128, 256, 512, 1024], [4, 8, 16, 32], [0, 0, 4, 8], _V1_S, 0.5),
    'dat-b-384': _variant('v1', [128, 256, 512, 1024], [4, 8, 16, 32], [0, 0, 4, 8], _V1_S, 0.5, window_size=12),
    'datpp-t': _variant('pp', [64, 128, 256, 512], [2, 4, 8, 16], [1, 2, 4, 8], _PP, 0.2),
    'datpp-s': _variant('pp', [96, 192, 384, 768], [3, 6, 12, 24], [1, 2, 3, 6], _PP, 0.4),
    'datpp-b': _variant('pp', [128, 256, 512, 1024], [4, 8, 16, 32], [2, 4, 8, 16], _PP, 0.7),
}

#: The names of the released variants, DAT then DAT++, small to large.
CANONICAL_ARCHS = tuple(_RELEASED)

#: Long name -> canonical name.
ARCH_ALIASES = {
    'dat-tiny': 'dat-t',
    'dat-small': 'dat-s',
    'dat-base': 'dat-b',
    'dat-base-384': 'dat-b-384',
    'datpp-tiny': 'datpp-t',
    'datpp-small': 'datpp-s',
    'datpp-base': 'datpp-b',
}

#: Every name (canonical and alias) -> the variant's settings (an alias shares its variant's dict).
ARCH_ZOO = {
    **_RELEASED,
    **{alias: _RELEASED[name] for alias, name in ARCH_ALIASES.items()},
}

_REQUIRED_ARCH_KEYS = ('version', 'dims', 'heads', 'groups', 'stage_spec')
_PER_STAGE_KEYS = ('dims', 'heads', 'groups', 'stage_spec', 'key_strides', 'offset_kernels')


def canonical_arch(name: str) -> str:
    """The canonical name of a variant name or alias, any case (``'DAT-Tiny'`` -> ``'dat-t'``).

    Args:
        name: A key of :data:`ARCH_ZOO`, in any case.

    Returns:
        The name in :data:`CANONICAL_ARCHS`.

    Raises:
        ValueError: For a name that is not in :data:`ARCH_ZOO`.
    """
    key = name.lower()
    if key not in ARCH_ZOO:
        raise ValueError(
            f'Unknown DAT arch {name!r}; expected one of {list(CANONICAL_ARCHS)} '
            '(or their long aliases such as dat-tiny) or a dict of settings'
        )
    return ARCH_ALIASES.get(key, key)


def match_arch_name(arch: dict[str, Any]) -> str | None:
    """The released variant whose settings include ``arch``'s, if any.

    Args:
        arch: Settings, possibly only some keys of a variant (e.g. as read from a checkpoint).

    Returns:
        The first name of :data:`CANONICAL_ARCHS` whose settings agree with every key of
        ``arch``, or None.
    """
    for name in CANONICAL_ARCHS:
        settings = ARCH_ZOO[name]
        if all(settings[k] == v for k, v in arch.items()):
            return name
    return None


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool`` (``True`` is an ``int`` to Python, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_drop_path_rate(rate: Any, name: str) -> None:
    """Raise a ValueError unless ``rate`` is a number in ``[0, 1)``.

    Args:
        rate: The stochastic depth rate.
        name: What the message calls it (``'drop_path_rate'``, ``"arch['drop_path_rate']"``).
    """
    if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
        raise ValueError(f'{name} must be a number in [0, 1), got {rate!r}')


def resolve_arch(arch: str | dict[str, Any]) -> dict[str, Any]:
    """Settings of a named variant, or a validated copy of a custom settings dict.

    Args:
        arch: A name of :data:`ARCH_ZOO` (any case), or a dict with at least ``version``,
            ``dims``, ``heads``, ``groups`` and ``stage_spec``; the other keys default to the
            version's values.

    Returns:
        A new dict with every key of a variant.

    Raises:
        ValueError: For an unknown name, missing or unknown keys, or settings of the wrong
            kind or range (each message names the key, what it expects and what it got).
        TypeError: If ``arch`` is neither a str nor a dict.
    """
    if isinstance(arch, str):
        return copy.deepcopy(ARCH_ZOO[canonical_arch(arch)])
    if not isinstance(arch, dict):
        raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}')
    missing = [k for k in _REQUIRED_ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f'Custom DAT arch is missing keys {missing}; it needs {list(_REQUIRED_ARCH_KEYS)}')
    version = arch['version']
    if not isinstance(version, str) or version not in VERSIONS:
        raise ValueError(f"arch['version'] must be one of {VERSIONS}, got {version!r}")
    # The variant's defaults for the optional keys; the per-stage values all come from ``arch``.
    settings = _variant(version, [], [], [], [], 0.0)
    unknown = set(arch) - set(settings)
    if unknown:
        raise ValueError(f'Unknown keys in custom DAT arch: {sorted(unknown)}; known: {sorted(settings)}')
    settings.update(copy.deepcopy(arch))
    _check_arch_settings(settings)
    return settings


def _check_arch_settings(settings: dict[str, Any]) -> None:
    """Raise a ValueError naming the first setting of the wrong kind or range."""
    for key in _PER_STAGE_KEYS:
        if not isinstance(settings[key], (list, tuple)) or len(settings[key]) != 4:
            raise ValueError(f"arch['{key}'] must be a list of 4 entries (one per stage), got {settings[key]!r}")
    positive = {k: settings[k] for k in ('dims', 'heads', 'key_strides', 'offset_kernels')}
    positive.update({k: [settings[k]] for k in ('window_size', 'mlp_ratio')})
    for key, values in positive.items():
        if any(not is_int(v) or v < 1 for v in values):
            raise ValueError(f"arch['{key}'] must hold positive ints, got {settings[key]!r}")
    if settings['version'] == 'pp' and settings['dims'][0] % 2:
        raise ValueError(
            "arch['dims'][0] must be even for DAT++ (the stem's first conv has dims[0] / 2 channels), "
            f'got {settings["dims"][0]}'
        )
    size = settings['neighborhood_size']
    if not is_int(size) or size < 1 or size % 2 == 0:
        raise ValueError(
            "arch['neighborhood_size'] must be an odd positive int (the neighbourhood is centred "
            f'on its query), got {size!r}'
        )
    if any(not is_int(g) or g < 0 for g in settings['groups']):
        raise ValueError(
            f"arch['groups'] must hold ints >= 0 (0 for stages without D blocks), got {settings['groups']!r}"
        )
    check_drop_path_rate(settings['drop_path_rate'], "arch['drop_path_rate']")
    factor = settings['offset_range_factor']
    if settings['version'] == 'v1':
        if not isinstance(factor, numbers.Real) or isinstance(factor, bool) or not 0.0 < factor < math.inf:
            raise ValueError(
                "arch['offset_range_factor'] must be a finite number > 0 for v1 (offsets are "
                f'tanh(o) * factor / key-grid size; the released models use 2.0), got {factor!r}'
            )
    elif factor is not None:
        raise ValueError(
            "arch['offset_range_factor'] applies to v1 only (DAT++ clamps the sampling positions "
            f"to the map instead); leave it out or None for version 'pp', got {factor!r}"
        )
    stages = zip(settings['dims'], settings['heads'], settings['groups'], settings['stage_spec'], strict=True)
    for i, (dim, heads, groups, spec) in enumerate(stages):
        if not isinstance(spec, str) or not spec or any(kind not in BLOCK_TYPES for kind in spec):
            raise ValueError(
                f'stage_spec[{i}] must be a non-empty string of the block letters '
                f"{list(BLOCK_TYPES)}, one per block (e.g. 'ND' or 'LS'), got {spec!r}"
            )
        if dim % heads:
            raise ValueError(f'dims[{i}]={dim} must be divisible by heads[{i}]={heads}')
        if 'D' in spec and (groups < 1 or heads % groups or dim % groups):
            raise ValueError(f'groups[{i}]={groups} must be >= 1 and divide heads[{i}]={heads} and dims[{i}]={dim}')
