"""What ``torch.load(weights_only=True)`` may rebuild besides tensors: the objects of mmengine checkpoints.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10.7 calls
``torch.load`` without a ``weights_only`` argument (``mmengine.runner.checkpoint.load_from_local``
and friends, reached by ``Runner.resume``, ``load_from`` and ``Runner.load_checkpoint``, i.e.
``--resume`` and ``tools/test.py``). Its checkpoints hold more than tensors: the message hub stores
``mmengine.logging.HistoryBuffer`` objects (numpy arrays inside, plus a dict of statistics
methods pickled as ``getattr(HistoryBuffer, 'min')``) and numpy scalars such as the ETA and
``best_score``. :func:`register_mmengine_safe_globals` allow-lists exactly these objects, so
the default stays ``weights_only=True``; nothing here turns it off. The objects were found by
training an mmengine ``Runner`` and asking ``torch.serialization.get_unsafe_globals_in_checkpoint``
(see ``tests/test_checkpoint.py``):

- ``mmengine.logging.history_buffer.HistoryBuffer`` -- allow-listed under that name as
  :class:`CheckedHistoryBuffer`, which checks the state a file gives it and never touches the
  statistics methods that all buffers share (mmengine's own ``HistoryBuffer.__setstate__``
  adds the file's methods to the class-level ``_statistics_methods``), then becomes a plain
  ``HistoryBuffer``;
- ``builtins.getattr`` -- allow-listed as a guarded stand-in that only resolves
  ``HistoryBuffer.{min,max,mean,current}`` and refuses everything else, because a real
  ``getattr`` would let a malicious file reach any attribute of any object;
- ``numpy.ndarray``, ``numpy.dtype``, ``numpy._core.multiarray._reconstruct``,
  ``numpy._core.multiarray.scalar`` (and their numpy 1.x names ``numpy.core.multiarray.*``);
- the numeric ``numpy.dtypes.*DType`` classes (they never appear by name in the pickle, but
  the unpickler sets the state of the dtype objects it rebuilds, which it only does for
  allow-listed types). Object, string, void and datetime dtypes are not allowed.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

__all__ = ['CheckedHistoryBuffer', 'mmengine_safe_globals', 'register_mmengine_safe_globals']

# Statistics methods HistoryBuffer registers for itself; their functions are pickled as
# ``getattr(HistoryBuffer, name)`` in the buffer's state.
_HISTORY_BUFFER_STATISTICS = frozenset({'min', 'max', 'mean', 'current'})

# What HistoryBuffer.__getstate__ writes: its attributes plus the statistics methods.
_HISTORY_BUFFER_ATTRIBUTES = frozenset({'max_length', '_log_history', '_count_history'})

# numpy dtypes whose objects may be rebuilt. Sized names plus the C-type aliases, which are
# distinct classes on some platforms (e.g. ``LongLongDType`` next to ``Int64DType``).
_NUMERIC_DTYPE_NAMES = (
    'bool',
    'int8',
    'int16',
    'int32',
    'int64',
    'uint8',
    'uint16',
    'uint32',
    'uint64',
    'float16',
    'float32',
    'float64',
    'longdouble',
    'complex64',
    'complex128',
    'clongdouble',
    'byte',
    'ubyte',
    'short',
    'ushort',
    'intc',
    'uintc',
    'long',
    'ulong',
    'longlong',
    'ulonglong',
)

_safe_globals_registered = False


def _refuse(message: str) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(f'weights_only load: {message}')


class CheckedHistoryBuffer(HistoryBuffer):
    """``HistoryBuffer`` as the allow-list rebuilds it: the state a file gives is checked first.

    Allow-listed under the pickle name ``mmengine.logging.history_buffer.HistoryBuffer``, so
    ``torch.load(weights_only=True)`` creates this class for every buffer in a checkpoint and
    calls its :meth:`__setstate__`. mmengine's own ``HistoryBuffer.__setstate__`` copies the
    file's ``statistics_methods`` into ``HistoryBuffer._statistics_methods``, a dict shared by
    every buffer of the process, so a crafted file could replace ``mean`` by ``max`` for all
    of them. This one accepts only what mmengine writes (each statistics method under its own
    name, e.g. ``'mean': HistoryBuffer.mean``; numeric 1-D histories of equal length, a
    positive ``max_length``), refuses anything else, never touches the shared dict and turns
    the object into a plain ``HistoryBuffer``: what the load returns is mmengine's class.
    """

    def __setstate__(self, state: Any) -> None:
        """Check ``state`` and set it; the object becomes a ``HistoryBuffer``.

        Args:
            state: The ``__dict__`` that ``HistoryBuffer.__getstate__`` wrote.

        Raises:
            pickle.UnpicklingError: If ``state`` is not what mmengine writes.
        """
        attributes = _check_history_buffer_state(state)
        self.__class__ = HistoryBuffer
        self.__dict__.update(attributes)


def _check_history_buffer_state(state: Any) -> dict:
    """The attributes of a pickled ``HistoryBuffer`` state, checked (see :class:`CheckedHistoryBuffer`)."""
    if not isinstance(state, dict):
        raise _refuse(f'a HistoryBuffer state must be a dict, got {type(state).__name__}')
    expected = _HISTORY_BUFFER_ATTRIBUTES | {'statistics_methods'}
    unknown = sorted(map(repr, set(state) - expected))
    missing = sorted(_HISTORY_BUFFER_ATTRIBUTES - set(state))
    if unknown or missing:
        raise _refuse(
            f'a HistoryBuffer state holds {sorted(expected)}; this one has unknown keys {unknown} and lacks {missing}'
        )
    methods = state.get('statistics_methods', {})
    if not isinstance(methods, dict):
        raise _refuse(f'HistoryBuffer statistics_methods must be a dict, got {type(methods).__name__}')
    for name, method in methods.items():
        if name not in _HISTORY_BUFFER_STATISTICS or method is not HistoryBuffer.__dict__[name]:
            allowed = ', '.join(f"'{n}': HistoryBuffer.{n}" for n in sorted(_HISTORY_BUFFER_STATISTICS))
            raise _refuse(
                f'HistoryBuffer statistics method {name!r}: {method!r} is refused; a checkpoint may '
                f"only hold mmengine's own ({allowed}), which are shared by every buffer"
            )
    max_length = state['max_length']
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= 0:
        raise _refuse(f'HistoryBuffer max_length must be a positive int, got {max_length!r}')
    for name in ('_log_history', '_count_history'):
        history = state[name]
        if not isinstance(history, np.ndarray) or history.ndim != 1 or history.dtype.kind not in 'biuf':
            raise _refuse(f'HistoryBuffer {name} must be a 1-D numeric numpy array, got {history!r}')
    if len(state['_log_history']) != len(state['_count_history']):
        raise _refuse(
            f'HistoryBuffer _log_history and _count_history must have the same length, got '
            f'{len(state["_log_history"])} and {len(state["_count_history"])}'
        )
    return {key: state[key] for key in _HISTORY_BUFFER_ATTRIBUTES}


def _history_buffer_getattr(obj: Any, name: str) -> Callable:
    """Guarded ``getattr`` for unpickling: resolves only HistoryBuffer's statistics methods.

    Args:
        obj: The object the pickle asks an attribute of (``HistoryBuffer`` in the pickle is
            :class:`CheckedHistoryBuffer` during a load).
        name: The attribute name.

    Returns:
        The function ``HistoryBuffer.<name>``.

    Raises:
        pickle.UnpicklingError: For any other object or attribute.
    """
    if obj in (HistoryBuffer, CheckedHistoryBuffer) and name in _HISTORY_BUFFER_STATISTICS:
        return HistoryBuffer.__dict__[name]
    allowed = ', '.join(sorted(_HISTORY_BUFFER_STATISTICS))
    raise _refuse(
        f'getattr({obj!r}, {name!r}) is not allowed; the allow-list of projects.dat only '
        f'resolves HistoryBuffer.{{{allowed}}}'
    )


def mmengine_safe_globals() -> list[Any]:
    """The objects mmengine 0.10.x writes into its checkpoints besides tensors.

    Returns:
        Entries for ``torch.serialization.add_safe_globals``: classes/functions, or
        ``(object, 'module.name')`` pairs where the name in the pickle differs from the
        object's own (numpy 1.x module names, the checked ``HistoryBuffer``, the guarded
        ``getattr``).
    """
    multiarray = (np._core if hasattr(np, '_core') else np.core).multiarray
    entries: list[Any] = [
        (CheckedHistoryBuffer, 'mmengine.logging.history_buffer.HistoryBuffer'),
        np.ndarray,
        np.dtype,
        (_history_buffer_getattr, 'builtins.getattr'),
    ]
    # numpy 2.x pickles 'numpy._core.multiarray.*', numpy 1.x 'numpy.core.multiarray.*'.
    for module in ('numpy._core.multiarray', 'numpy.core.multiarray'):
        entries.append((multiarray._reconstruct, f'{module}._reconstruct'))
        entries.append((multiarray.scalar, f'{module}.scalar'))
    dtype_classes: list[type] = []
    for name in _NUMERIC_DTYPE_NAMES:
        cls = type(np.dtype(name))
        if cls not in dtype_classes:
            dtype_classes.append(cls)
    entries.extend(dtype_classes)
    return entries


def _torch_takes_named_safe_globals() -> bool:
    """Whether ``add_safe_globals`` exists and accepts ``(object, name)`` pairs (torch >= 2.5)."""
    return hasattr(torch.serialization, 'add_safe_globals') and torch.__version__ >= (2, 5)


def register_mmengine_safe_globals() -> bool:
    """Allow-list mmengine's checkpoint objects for ``torch.load(weights_only=True)``.

    Idempotent; called by ``import projects.dat``. After it, ``torch.load(path)`` with the
    default ``weights_only=True`` (and so ``Runner.resume``, ``load_from``,
    ``Runner.load_checkpoint``) reads mmengine checkpoints. See the module docstring for the
    list and why each entry is safe.

    On torch < 2.5 it does nothing and returns False: torch 2.4 lacks the ``(object, name)``
    form the list needs, torch < 2.4 lacks ``add_safe_globals``. There ``torch.load`` defaults
    to ``weights_only=False`` (mmengine's loads work as they always did), while
    ``weights_only=True`` loads, such as :func:`load_from_http_weights_only`, accept tensors
    and plain containers only.

    Returns:
        Whether the allow-list is registered.
    """
    global _safe_globals_registered
    if not _safe_globals_registered and _torch_takes_named_safe_globals():
        torch.serialization.add_safe_globals(mmengine_safe_globals())
        _safe_globals_registered = True
    return _safe_globals_registered
