"""Safe loading and crash-safe writing of checkpoints.

Four concerns live here; none of them changes a function or method of mmengine.

**Loading mmengine checkpoints with ``weights_only=True``.** torch >= 2.6 loads with
``weights_only=True`` by default, and mmengine 0.10.7 calls ``torch.load`` without a
``weights_only`` argument (``mmengine.runner.checkpoint.load_from_local`` and friends, reached
by ``Runner.resume``, ``load_from`` and ``Runner.load_checkpoint``, i.e. ``--resume`` and
``tools/test.py``). Its checkpoints hold more than tensors: the message hub stores
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

**Loading from ``http://`` and ``https://``.** mmengine's own URL loader
(``mmengine.runner.checkpoint.load_from_http``) ends in ``torch.hub.load_state_dict_from_url``
with ``weights_only=False``, so a served file can run code when it is loaded.
:func:`register_safe_url_loader` registers :func:`load_from_http_weights_only` for these
schemes through mmengine's ``CheckpointLoader.register_scheme``; it downloads as mmengine does
(torch.hub's cache folder ``<torch hub dir>/checkpoints``, progress bar on a terminal) and loads
with ``weights_only=True``. A file that holds other objects is refused with a
:class:`CheckpointError` that names them, unless its URL starts with one of the prefixes in the
environment variable ``DAT_TRUSTED_CHECKPOINT_URLS`` (:data:`TRUSTED_URLS_ENV`,
comma-separated). This covers ``init_cfg=dict(type='Pretrained', checkpoint='https://...')``,
``load_from``, ``--resume`` from a URL and ``mmengine.runner.load_checkpoint`` of any model.

**Crash-safe writing.** :func:`atomic_open` writes into a temporary file next to the target
(created with mode ``0o600``), flushes and fsyncs it, gives it the target's permission bits,
``os.replace``-s it over the target and fsyncs the directory: readers see the old file or the
new one, never a mix. ``projects.dat.hooks.AtomicCheckpointHook`` writes mmengine checkpoints
this way when a config names it. A process killed while writing leaves a hidden
``.<name>.tmp-<pid>-<8 hex digits>`` file next to the target (the target is untouched); the
next successful write in that folder removes such files once they are older than
:data:`STALE_TMP_SECONDS` (a younger one may still be written by another process).

**Original DAT checkpoints.** The released files hold extra pickled objects (a config
object). :func:`load_original_checkpoint` tries ``weights_only=True`` first and refuses to run
arbitrary unpickling unless the caller says the file is trusted; :func:`extract_state_dict`
picks the weights out of the loaded dict. Every failure is a :class:`CheckpointError`.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import logging
import os
import os.path as osp
import pickle
import re
import secrets
import stat
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any
from urllib.parse import urlparse

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

__all__ = [
    'STALE_TMP_SECONDS',
    'TRUSTED_URLS_ENV',
    'CheckedHistoryBuffer',
    'CheckpointError',
    'UntrustedCheckpointError',
    'atomic_open',
    'atomic_save',
    'atomic_write_bytes',
    'extract_state_dict',
    'is_trusted_url',
    'load_from_http_weights_only',
    'load_original_checkpoint',
    'mmengine_safe_globals',
    'register_mmengine_safe_globals',
    'register_safe_url_loader',
    'trusted_url_prefixes',
]

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, untrusted or holds no weights.

    Raised by :func:`load_original_checkpoint`, :func:`load_from_http_weights_only` and
    :func:`extract_state_dict`; the message says what was expected, what was found and, where
    there is one, what to do about it.
    """


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint holds pickled objects that only full unpickling (which runs code) can load.

    The message names the objects and says how to declare the file's source trusted.
    """


def _warn(message: str) -> None:
    try:
        from mmengine.logging import print_log
    except ImportError:  # pragma: no cover - mmengine is a dependency
        logger.warning(message)
    else:
        print_log(message, logger='current', level=logging.WARNING)


# ---------------------------------------------------------------------------------------------
# Allow-list for torch.load(weights_only=True)
# ---------------------------------------------------------------------------------------------

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
            f'a HistoryBuffer state holds {sorted(expected)}; this one has unknown keys {unknown} '
            f'and lacks {missing}'
        )
    methods = state.get('statistics_methods', {})
    if not isinstance(methods, dict):
        raise _refuse(f'HistoryBuffer statistics_methods must be a dict, got {type(methods).__name__}')
    for name, method in methods.items():
        if name not in _HISTORY_BUFFER_STATISTICS or method is not HistoryBuffer.__dict__[name]:
            allowed = ', '.join(f"'{n}': HistoryBuffer.{n}" for n in sorted(_HISTORY_BUFFER_STATISTICS))
            raise _refuse(
                f'HistoryBuffer statistics method {name!r}: {method!r} is refused; a checkpoint may '
                f'only hold mmengine\'s own ({allowed}), which are shared by every buffer'
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
            f"{len(state['_log_history'])} and {len(state['_count_history'])}"
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


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


# Age after which a leftover temporary file counts as abandoned: a write in progress keeps its
# file's modification time fresh.
STALE_TMP_SECONDS = 3600

# The temporary files of atomic_open: '.<target name>.tmp-<pid>-<8 hex digits>'.
_TMP_NAME_RE = re.compile(r'\..+\.tmp-\d+-[0-9a-f]{8}', re.DOTALL)


def _tmp_name(name: str) -> str:
    return f'.{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}'


def _user_id() -> int | None:
    """This process's user id, or None where the OS has none (Windows)."""
    return os.getuid() if hasattr(os, 'getuid') else None


def _remove_stale_tmp_files(directory: str) -> None:
    """Delete abandoned temporary files of :func:`atomic_open` in ``directory``.

    Only regular files (not symlinks) named like ours, owned by this user and not modified for
    :data:`STALE_TMP_SECONDS` are deleted.
    """
    uid = _user_id()
    try:
        entries = [e for e in os.scandir(directory) if _TMP_NAME_RE.fullmatch(e.name)]
    except OSError:
        return
    now = time.time()
    for entry in entries:
        with contextlib.suppress(OSError):  # gone already, or not ours to delete
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode) or (uid is not None and info.st_uid != uid):
                continue
            if now - info.st_mtime > STALE_TMP_SECONDS:
                os.unlink(entry.path)
                _warn(f'removed {entry.path}, an abandoned temporary file of an interrupted write')


def _fsync_directory(directory: str) -> None:
    """Flush a directory entry change (the rename) to disk where the OS supports it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without widening it even for a moment."""
    with contextlib.suppress(OSError, ValueError):
        with builtins.open('/proc/self/status', encoding='ascii') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    # Reading the umask means setting it; the stricter 0o077 in between never widens the
    # permissions of a file that another thread creates meanwhile.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _private_opener(path: str, flags: int) -> int:
    """``open`` opener: create ``path`` (never an existing file or symlink) with mode 0o600."""
    return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = 'wb', encoding: str | None = None
) -> Iterator[IO]:
    """Open ``path`` for writing so that it is replaced all at once or not at all.

    Writes go to a new temporary file in the same directory, created with mode ``0o600`` so
    that nobody else can read a half-written file. When the ``with`` block ends normally it
    is flushed and fsynced, given the permission bits of the existing file (or
    ``0o666 & ~umask`` for a new one, what ``open`` would give), renamed over ``path``
    (``os.replace``) and the directory is fsynced. If the block raises, the temporary file is
    removed and ``path`` is left as it was. A symlink at ``path`` is followed: the file it
    points to is replaced. After a successful write, abandoned temporary files of earlier
    writes in the directory are removed (see :func:`_remove_stale_tmp_files`).

    Args:
        path: The file to write.
        mode: ``'wb'`` or ``'w'`` (text). Defaults to ``'wb'``.
        encoding: Text encoding for ``mode='w'``; defaults to UTF-8 there.

    Yields:
        The open temporary file.

    Raises:
        ValueError: If ``mode`` is not ``'w'`` or ``'wb'``.
    """
    if mode not in ('w', 'wb'):
        raise ValueError(f"atomic_open supports mode 'w' or 'wb', got {mode!r}")
    if mode == 'w' and encoding is None:
        encoding = 'utf-8'
    target = osp.realpath(os.fspath(path))
    directory, name = osp.split(target)
    os.makedirs(directory, exist_ok=True)
    tmp = osp.join(directory, _tmp_name(name))
    f = builtins.open(tmp, mode.replace('w', 'x'), encoding=encoding, opener=_private_opener)
    try:
        try:
            yield f
            f.flush()
            try:
                final_mode = os.stat(target).st_mode & 0o777
            except FileNotFoundError:
                final_mode = 0o666 & ~_umask()
            if hasattr(os, 'fchmod'):
                os.fchmod(f.fileno(), final_mode)
            else:  # pragma: no cover - Windows
                os.chmod(tmp, final_mode)
            os.fsync(f.fileno())
        finally:
            f.close()
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)
    _remove_stale_tmp_files(directory)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`).

    Args:
        data: The bytes to write.
        path: The file to replace.
    """
    with atomic_open(path, 'wb') as f:
        f.write(data)


def atomic_save(obj: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    Args:
        obj: What to save.
        path: The file to replace.
        **kwargs: Passed on to ``torch.save``.
    """
    with atomic_open(path, 'wb') as f:
        torch.save(obj, f, **kwargs)


# ---------------------------------------------------------------------------------------------
# Original DAT checkpoints
# ---------------------------------------------------------------------------------------------

_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_PROTO = 0x80  # first byte of a pickle of protocol >= 2 (torch's legacy format)
_UNSAFE_GLOBAL_RE = re.compile(r'GLOBAL (\S+) was not an allowed global')

def _check_file(path: str) -> bool:
    """Check ``path`` looks like a torch.save file; return whether it is a zip archive."""
    if not osp.exists(path):
        raise CheckpointError(f'checkpoint file not found: {path!r}')
    if not osp.isfile(path):
        raise CheckpointError(
            f'expected a checkpoint file, got a directory or special file: {path!r}'
        )
    with builtins.open(path, 'rb') as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(
            f'checkpoint file {path!r} is empty (0 bytes): the download or '
            'copy was probably interrupted'
        )
    if head.startswith(_ZIP_MAGIC):
        try:
            is_zip = zipfile.is_zipfile(path)
        except (zipfile.BadZipFile, OSError, ValueError):
            is_zip = False
        if not is_zip:
            raise CheckpointError(
                f'checkpoint file {path!r} is truncated or corrupted: it starts like a '
                f'torch.save zip archive but its end is missing ({osp.getsize(path)} bytes); '
                'download or copy it again'
            )
        return True
    if head[0] == _PICKLE_PROTO:
        return False
    raise CheckpointError(
        f'{path!r} is not a PyTorch checkpoint: expected a torch.save file (a zip archive '
        f"starting with b'PK' or a legacy pickle starting with 0x80), but it starts with "
        f'{head!r}'
    )


def _unsafe_globals(path: str, is_zip: bool, error: Exception) -> list[str]:
    """Names of the globals that stopped a weights_only load (best effort)."""
    if is_zip:
        with contextlib.suppress(Exception):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    # Legacy-format files cannot be scanned by torch; the error names the first global.
    return _UNSAFE_GLOBAL_RE.findall(str(error))


def _read_error(path: str, is_zip: bool, error: Exception) -> CheckpointError:
    """Turn a low-level read error into a CheckpointError that says what went wrong."""
    text = str(error)
    if isinstance(error, EOFError) or 'truncated' in text or 'central directory' in text:
        return CheckpointError(
            f'checkpoint file {path!r} is truncated or corrupted ({type(error).__name__}: '
            f'{text.splitlines()[0] if text else "unexpected end of data"}); download or copy '
            'it again'
        )
    if not is_zip and 'magic number' in text:
        return CheckpointError(
            f'{path!r} is not a PyTorch checkpoint: it is a pickle, but not one written by '
            'torch.save (no torch magic number)'
        )
    kind = 'zip archive' if is_zip else 'pickle'
    return CheckpointError(
        f'could not read {path!r} as a PyTorch checkpoint ({kind}): '
        f'{type(error).__name__}: {text.splitlines()[0] if text else ""}'
    )


def _load_refusing_code(path: str, map_location: Any, trusted: bool, refusal: Callable[[str], str]) -> Any:
    """``torch.load`` with ``weights_only=True``; full unpickling only if ``trusted``.

    Args:
        path: The local checkpoint file.
        map_location: Passed to ``torch.load``.
        trusted: Allow ``weights_only=False`` if the safe load refuses the file.
        refusal: Builds the error message from the names of the refused objects.

    Returns:
        The loaded object.

    Raises:
        CheckpointError: See :func:`load_original_checkpoint`.
    """
    is_zip = _check_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path, is_zip, error)
        if not unsafe and 'Weights only load failed' not in str(error):
            raise _read_error(path, is_zip, error) from error
        if not trusted:
            found = ', '.join(unsafe) if unsafe else f'(not identified: {str(error).splitlines()[0]})'
            raise UntrustedCheckpointError(refusal(found)) from error
        reason = ', '.join(unsafe) if unsafe else str(error).splitlines()[0]
    except Exception as error:  # a corrupt file can fail anywhere inside torch.load
        raise _read_error(path, is_zip, error) from error

    _warn(
        f'loading {path!r} with weights_only=False (trusted): full unpickling runs '
        f'code from the file; the safe load refused: {reason}'
    )
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except ModuleNotFoundError as error:
        raise CheckpointError(
            f'{path!r} pickles an object of module {error.name!r}, which is not installed; '
            f'install it (e.g. `pip install {error.name}`) to load this file'
        ) from error
    except Exception as error:  # a corrupt file can fail anywhere inside torch.load
        raise _read_error(path, is_zip, error) from error


def load_original_checkpoint(
    path: str | os.PathLike, trusted: bool = False, map_location: Any = 'cpu'
) -> Any:
    """Load a released (original-code) DAT checkpoint, refusing unsafe unpickling by default.

    The file is first read with ``weights_only=True`` (tensors, containers, numbers, the
    mmengine objects of :func:`mmengine_safe_globals`). Released DAT files also hold a pickled
    config object; reading those needs full unpickling, which can run arbitrary code, so it
    happens only with ``trusted=True`` (the converter CLI's ``--trust-checkpoint``).

    Args:
        path: The checkpoint file.
        trusted: Allow full unpickling (``weights_only=False``) if the safe load refuses the
            file. Only for files from a source you trust. Defaults to False.
        map_location: Passed to ``torch.load``. Defaults to ``'cpu'``.

    Returns:
        The loaded object (normally a dict; see :func:`extract_state_dict`).

    Raises:
        UntrustedCheckpointError: If the file holds objects outside the allow-list and
            ``trusted`` is False (the message names them).
        CheckpointError: If the file does not exist, is empty, truncated or not a torch.save
            file, or cannot be unpickled even when trusted.
    """
    path = os.fspath(path)

    def refusal(found: str) -> str:
        return (
            f'{path!r} holds pickled objects besides tensors, which torch.load('
            f'weights_only=True) refuses: {found}. Loading them runs code from the file '
            'and must only be done for files from a trusted source (such as the official '
            'DAT release). To opt in, call load_original_checkpoint(path, trusted=True) '
            'or pass --trust-checkpoint to the converter.'
        )

    return _load_refusing_code(path, map_location, trusted, refusal)


# ---------------------------------------------------------------------------------------------
# http:// and https:// checkpoints
# ---------------------------------------------------------------------------------------------

# Environment variable: comma-separated URL prefixes whose files may be fully unpickled.
TRUSTED_URLS_ENV = 'DAT_TRUSTED_CHECKPOINT_URLS'


def trusted_url_prefixes(value: str | None = None) -> list[str]:
    """The URL prefixes of ``DAT_TRUSTED_CHECKPOINT_URLS`` (:data:`TRUSTED_URLS_ENV`).

    A prefix without a path (``https://host``) means the whole server and is read as
    ``https://host/``, so that it does not also match ``https://host.example.org/...``.

    Args:
        value: The variable's value; None reads it from the environment.

    Returns:
        The prefixes, in the given order (empty entries skipped).

    Raises:
        ValueError: If an entry is not an ``http://`` or ``https://`` URL with a host.
    """
    if value is None:
        value = os.environ.get(TRUSTED_URLS_ENV, '')
    prefixes = []
    for entry in (e.strip() for e in value.split(',')):
        if not entry:
            continue
        parts = urlparse(entry)
        if parts.scheme not in ('http', 'https') or not parts.netloc:
            raise ValueError(
                f'{TRUSTED_URLS_ENV} holds comma-separated URL prefixes starting with http:// or '
                f'https:// and a host, e.g. https://example.org/models/; got the entry {entry!r}'
            )
        prefixes.append(entry if parts.path or parts.query else entry + '/')
    return prefixes


# '.' or '..' path segments, also percent-encoded: a server may resolve them out of a prefix.
_DOT_SEGMENT_RE = re.compile(r'(^|/)(\.|%2e){1,2}(/|$)', re.IGNORECASE)


def is_trusted_url(url: str, value: str | None = None) -> bool:
    """Whether ``url`` may be fully unpickled: it starts with a prefix of ``DAT_TRUSTED_CHECKPOINT_URLS``.

    The match is plain ``str.startswith`` against each prefix of :func:`trusted_url_prefixes`
    (end a prefix with ``/`` to mean a folder), and a URL with ``.`` or ``..`` path segments is
    never trusted (the server could resolve them to a path outside the prefix).

    Args:
        url: The checkpoint URL.
        value: The variable's value; None reads it from the environment.

    Returns:
        Whether the URL is trusted.

    Raises:
        ValueError: If the variable holds an entry that is not an http(s) URL.
    """
    prefixes = trusted_url_prefixes(value)
    if _DOT_SEGMENT_RE.search(urlparse(url).path):
        return False
    return any(url.startswith(prefix) for prefix in prefixes)


def _download(url: str, model_dir: str | None, progress: bool, trusted: bool) -> str:
    """Download ``url`` into torch.hub's cache (as mmengine and torch.hub do); return the file.

    torch.hub names a cached file after the URL's last component only, so files of two URLs
    with the same name share it. That is harmless for ``weights_only`` loads; a file that is
    to be fully unpickled (``trusted``) must come from its own URL, so it is kept in a folder
    of its own, ``by_url/<first 16 hex digits of the URL's SHA-256>/``.
    """
    if model_dir is None:
        model_dir = osp.join(torch.hub.get_dir(), 'checkpoints')
    filename = osp.basename(urlparse(url).path)
    if not filename:
        raise CheckpointError(f'cannot download {url!r}: the URL does not end in a file name')
    if trusted:
        model_dir = osp.join(model_dir, 'by_url', hashlib.sha256(url.encode()).hexdigest()[:16])
    os.makedirs(model_dir, exist_ok=True)
    cached_file = osp.join(model_dir, filename)
    if not osp.exists(cached_file):
        sys.stdout.write(f'Downloading: "{url}" to {cached_file}\n')
        torch.hub.download_url_to_file(url, cached_file, None, progress=progress)
    return cached_file


def load_from_http_weights_only(
    filename: str, map_location: Any = None, model_dir: str | None = None, progress: bool | None = None
) -> Any:
    """mmengine's ``http://`` / ``https://`` checkpoint loader, loading with ``weights_only=True``.

    Registered by :func:`register_safe_url_loader` in place of mmengine's ``load_from_http``,
    whose ``torch.hub.load_state_dict_from_url`` unpickles everything. The file is downloaded
    like there (once, into ``<torch hub dir>/checkpoints``; in a distributed run rank 0 first,
    then the others from the cache) and loaded with ``weights_only=True`` and the allow-list of
    :func:`register_mmengine_safe_globals`. A file that holds other pickled objects is refused,
    unless the URL starts with a prefix listed in ``DAT_TRUSTED_CHECKPOINT_URLS``; then it is
    fully unpickled, with a warning. Files of trusted URLs are cached in a folder of their own
    (``<torch hub dir>/checkpoints/by_url/<hash of the URL>/``), so that a file of the same
    name downloaded from an untrusted URL is never taken for them.

    Args:
        filename: The ``http://`` or ``https://`` URL.
        map_location: Passed to ``torch.load``. Defaults to None.
        model_dir: Download folder; None for torch.hub's. Defaults to None.
        progress: Show a progress bar; None shows it when stdin is a terminal (as mmengine
            does). Defaults to None.

    Returns:
        The loaded checkpoint.

    Raises:
        UntrustedCheckpointError: If the file holds objects outside the allow-list and its URL
            is not trusted (the message names them and says how to opt in).
        CheckpointError: If the file is not a readable torch.save file.
        ValueError: If ``DAT_TRUSTED_CHECKPOINT_URLS`` holds an entry that is not a URL.
    """
    from mmengine.dist import get_dist_info

    if progress is None:
        progress = os.isatty(0)
    trusted = is_trusted_url(filename)
    rank, world_size = get_dist_info()
    if rank == 0:
        cached_file = _download(filename, model_dir, progress, trusted)
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            cached_file = _download(filename, model_dir, progress, trusted)

    def refusal(found: str) -> str:
        return (
            f'{filename} (downloaded to {cached_file}) holds pickled objects besides tensors, which '
            f'torch.load(weights_only=True) refuses: {found}. Unpickling them runs code from the '
            'file, so projects.dat does not do it for a URL unless you trust its source. To opt '
            f'in, add a prefix of this URL to the environment variable {TRUSTED_URLS_ENV} '
            f'(comma-separated URL prefixes, e.g. {TRUSTED_URLS_ENV}={_url_folder(filename)}), or '
            'download the file and check it yourself.'
        )

    try:
        return _load_refusing_code(cached_file, map_location, trusted, refusal)
    except UntrustedCheckpointError:
        raise
    except CheckpointError as error:
        raise CheckpointError(
            f'{filename}: {error}; delete {cached_file} to download it again'
        ) from error


def _url_folder(url: str) -> str:
    """``url`` up to its last ``/`` (the folder the file is served from)."""
    return url[: url.rindex('/') + 1]


def register_safe_url_loader() -> None:
    """Make mmengine load ``http://`` and ``https://`` checkpoints with ``weights_only=True``.

    Registers :func:`load_from_http_weights_only` through
    ``mmengine.runner.CheckpointLoader.register_scheme`` for both prefixes, replacing mmengine's
    ``load_from_http`` (which unpickles everything) in its table of loaders; the function
    ``load_from_http`` itself is left as it is. Idempotent; called by ``import projects.dat``.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes=('http://', 'https://'), loader=load_from_http_weights_only, force=True)


def _as_state_dict(value: Any, where: str) -> dict[str, torch.Tensor]:
    """Check ``value`` is a non-empty mapping of names to tensors and return it as a dict."""
    if isinstance(value, torch.nn.Module):
        value = value.state_dict()
    if not isinstance(value, Mapping):
        raise CheckpointError(
            f'{where} should be a state dict (a mapping of parameter names to '
            f'tensors), got {type(value).__name__}'
        )
    if not value:
        raise CheckpointError(f'{where} is empty: the checkpoint holds no weights')
    bad = [k for k, v in value.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        shown = ', '.join(f'{k!r}: {type(value[k]).__name__}' for k in bad[:5])
        more = f' and {len(bad) - 5} more' if len(bad) > 5 else ''
        raise CheckpointError(
            f'{where} should map parameter names to tensors, but {len(bad)} '
            f'entries do not ({shown}{more})'
        )
    return dict(value)


def extract_state_dict(ckpt: Any) -> dict[str, torch.Tensor]:
    """Pick the model weights out of a loaded checkpoint.

    Looks for ``ckpt['model']`` (released ImageNet files), then ``ckpt['state_dict']``
    (mmdet/mmseg/mmengine files); a dict whose values are all tensors is taken as the state
    dict itself. A pickled ``nn.Module`` under those keys gives its ``state_dict()``.

    Args:
        ckpt: What :func:`load_original_checkpoint` (or ``torch.load``) returned.

    Returns:
        ``{parameter name: tensor}`` in the stored order.

    Raises:
        CheckpointError: If ``ckpt`` is not a mapping, holds neither key (the message lists its
            top-level keys), or the chosen entry is not a non-empty mapping of names to tensors.
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f'expected a checkpoint dict with the weights under "model" or '
            f'"state_dict", got {type(ckpt).__name__}'
        )
    for key in ('model', 'state_dict'):
        if key in ckpt:
            return _as_state_dict(ckpt[key], f'checkpoint[{key!r}]')
    if ckpt and all(isinstance(k, str) and torch.is_tensor(v) for k, v in ckpt.items()):
        return dict(ckpt)
    keys = ', '.join(repr(k) for k in list(ckpt)[:20]) or '(none)'
    more = f' ... ({len(ckpt)} keys)' if len(ckpt) > 20 else ''
    raise CheckpointError(
        f'no state dict in the checkpoint: expected the weights under "model" '
        f'or "state_dict" (or a plain name -> tensor dict), found the '
        f'top-level keys {keys}{more}'
    )
