"""Safe loading and crash-safe saving of checkpoints.

Three concerns live here.

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

- ``mmengine.logging.history_buffer.HistoryBuffer``;
- ``builtins.getattr`` -- allow-listed as a guarded stand-in that only resolves
  ``HistoryBuffer.{min,max,mean,current}`` and refuses everything else, because a real
  ``getattr`` would let a malicious file reach any attribute of any object;
- ``numpy.ndarray``, ``numpy.dtype``, ``numpy._core.multiarray._reconstruct``,
  ``numpy._core.multiarray.scalar`` (and their numpy 1.x names ``numpy.core.multiarray.*``);
- the numeric ``numpy.dtypes.*DType`` classes (they never appear by name in the pickle, but
  the unpickler sets the state of the dtype objects it rebuilds, which it only does for
  allow-listed types). Object, string, void and datetime dtypes are not allowed.

**Crash-safe saving.** mmengine writes a checkpoint as ``CheckpointHook`` ->
``Runner.save_checkpoint`` -> ``mmengine.runner.checkpoint.save_checkpoint``, which
serialises into memory and hands the bytes to the file backend's ``put``; for local paths that
is ``LocalBackend.put``, which opens the target with ``'wb'`` (truncating it) and writes. A
crash or a full disk in between leaves a truncated file where the previous checkpoint was.
:func:`install_atomic_checkpoint_save` applies three small patches, each undone by
:func:`uninstall_atomic_checkpoint_save`:

1. ``LocalBackend.put`` writes through :func:`atomic_open`: a temporary file in the same
   directory, flushed and fsynced, then ``os.replace``-d over the target (and the directory
   fsynced). Readers see the old file or the new one, never a mix. This covers every local
   checkpoint mmengine writes (also FileClient-based ``file_client_args`` and
   FlexibleRunner strategies), without touching ``save_checkpoint`` itself, which other
   modules import by name.
2. ``CheckpointHook`` writes ``last_checkpoint`` (the file ``--resume`` reads) with a plain
   ``open(path, 'w')``; the module-level name ``open`` of ``mmengine.hooks.checkpoint_hook``
   is shadowed by a function that sends write modes to :func:`atomic_open` and everything else
   to the built-in ``open``.
3. ``CheckpointHook`` deletes the oldest checkpoint (``max_keep_ckpts``) and the previous best
   checkpoint (``save_best``) *before* writing the new one, so with ``max_keep_ckpts=1`` a
   failed save would leave no checkpoint at all. ``_save_checkpoint_with_step`` and
   ``_save_best_checkpoint`` are wrapped so that these deletions are postponed until the new
   checkpoint has been written; if saving fails they do not happen. The price is that the
   disk briefly holds one checkpoint more than ``max_keep_ckpts`` (atomic replacement needs
   room for the old and new file anyway).

A custom hook or runner would need every config to opt in (and mmdet/mmseg/mmpretrain
configs name ``CheckpointHook`` in their bases), so patching the three spots above is the
least invasive way to protect every run that imports ``projects.dat``. A process killed while
writing leaves a hidden ``.<name>.tmp-*`` file next to the target (the target is untouched);
the next successful write of the same target removes such files once they are older than
:data:`STALE_TMP_SECONDS` (a younger one may still be written by another process).

**Original DAT checkpoints.** The released files hold extra pickled objects (a config
object). :func:`load_original_checkpoint` tries ``weights_only=True`` first and refuses to run
arbitrary unpickling unless the caller says the file is trusted; :func:`extract_state_dict`
picks the weights out of the loaded dict. Every failure is a :class:`CheckpointError`.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import logging
import os
import os.path as osp
import pickle
import re
import secrets
import stat
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

import torch

__all__ = [
    'CheckpointError',
    'atomic_open',
    'atomic_save',
    'atomic_write_bytes',
    'extract_state_dict',
    'install_atomic_checkpoint_save',
    'load_original_checkpoint',
    'mmengine_safe_globals',
    'register_mmengine_safe_globals',
    'uninstall_atomic_checkpoint_save',
]


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, untrusted or holds no weights.

    Raised by :func:`load_original_checkpoint` and :func:`extract_state_dict`; the message
    says what was expected, what was found and, where there is one, what to do about it.
    """


# ---------------------------------------------------------------------------------------------
# Allow-list for torch.load(weights_only=True)
# ---------------------------------------------------------------------------------------------

# Statistics methods HistoryBuffer registers for itself; their functions are pickled as
# ``getattr(HistoryBuffer, name)`` in the buffer's state.
_HISTORY_BUFFER_STATISTICS = frozenset({'min', 'max', 'mean', 'current'})

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


def _history_buffer_getattr(obj: Any, name: str) -> Callable:
    """Guarded ``getattr`` for unpickling: resolves only HistoryBuffer's statistics methods.

    Args:
        obj: The object the pickle asks an attribute of.
        name: The attribute name.

    Returns:
        The function ``HistoryBuffer.<name>``.

    Raises:
        pickle.UnpicklingError: For any other object or attribute.
    """
    from mmengine.logging import HistoryBuffer

    if obj is HistoryBuffer and name in _HISTORY_BUFFER_STATISTICS:
        return getattr(HistoryBuffer, name)
    allowed = ', '.join(sorted(_HISTORY_BUFFER_STATISTICS))
    raise pickle.UnpicklingError(
        f'weights_only load: getattr({obj!r}, {name!r}) is not allowed; the allow-list of '
        f'projects.dat only resolves HistoryBuffer.{{{allowed}}}'
    )


def mmengine_safe_globals() -> list[Any]:
    """The objects mmengine 0.10.x writes into its checkpoints besides tensors.

    Returns:
        Entries for ``torch.serialization.add_safe_globals``: classes/functions, or
        ``(object, 'module.name')`` pairs where the name in the pickle differs from the
        object's own (numpy 1.x module names, the guarded ``getattr``).
    """
    import numpy as np
    from mmengine.logging import HistoryBuffer

    multiarray = (np._core if hasattr(np, '_core') else np.core).multiarray
    entries: list[Any] = [
        HistoryBuffer,
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


def register_mmengine_safe_globals() -> None:
    """Allow-list mmengine's checkpoint objects for ``torch.load(weights_only=True)``.

    Idempotent; called by ``import projects.dat``. After it, ``torch.load(path)`` with the
    default ``weights_only=True`` (and so ``Runner.resume``, ``load_from``,
    ``Runner.load_checkpoint``) reads mmengine checkpoints. See the module docstring for the
    list and why each entry is safe.
    """
    global _safe_globals_registered
    if _safe_globals_registered:
        return
    torch.serialization.add_safe_globals(mmengine_safe_globals())
    _safe_globals_registered = True


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


# Age after which a leftover temporary file of a target counts as abandoned: a write in
# progress keeps its file's modification time fresh.
STALE_TMP_SECONDS = 3600


def _remove_stale_tmp_files(directory: str, name: str) -> None:
    """Delete ``.<name>.tmp-*`` files in ``directory`` older than :data:`STALE_TMP_SECONDS`."""
    prefix = f'.{name}.tmp-'
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(prefix) and e.is_file(follow_symlinks=False)]
    except OSError:
        return
    now = time.time()
    for entry in entries:
        with contextlib.suppress(OSError):  # gone already, or not ours to delete
            if now - entry.stat(follow_symlinks=False).st_mtime > STALE_TMP_SECONDS:
                os.unlink(entry.path)
                logger.warning(f'removed {entry.path}, an abandoned temporary file of an interrupted write')


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


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = 'wb', encoding: str | None = None
) -> Iterator[IO]:
    """Open ``path`` for writing so that it is replaced all at once or not at all.

    Writes go to a temporary file in the same directory; when the ``with`` block ends
    normally it is flushed, fsynced and renamed over ``path`` (``os.replace``), and the
    directory is fsynced. If the block raises, the temporary file is removed and ``path`` is
    left as it was. A symlink at ``path`` is followed: the file it points to is replaced. An
    existing file keeps its permission bits; a new one gets the usual ``0o666 & ~umask``.

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
    tmp = osp.join(directory, f'.{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}')
    f = builtins.open(tmp, mode.replace('w', 'x'), encoding=encoding)
    try:
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)
    _remove_stale_tmp_files(directory, name)


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


# State of install_atomic_checkpoint_save: the originals it replaced, to undo the patches.
_originals: dict[str, Any] = {}


def _atomic_local_put(self: Any, obj: bytes, filepath: str | os.PathLike) -> None:
    """``LocalBackend.put`` with an atomic write (same contract, creates the directory)."""
    atomic_write_bytes(obj, filepath)


def _checkpoint_hook_open(file: Any, mode: str = 'r', *args: Any, **kwargs: Any) -> Any:
    """``open`` as seen by ``mmengine.hooks.checkpoint_hook``: writes become atomic."""
    if mode in ('w', 'wb') and not args and set(kwargs) <= {'encoding'}:
        return atomic_open(file, mode, **kwargs)
    return builtins.open(file, mode, *args, **kwargs)


class _DeferredRemovalBackend:
    """Proxy of a file backend that records ``remove``/``rmtree`` instead of doing them."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self._pending: list[tuple[str, Any]] = []

    def remove(self, filepath: Any) -> None:
        self._pending.append(('remove', filepath))

    def rmtree(self, dir_path: Any) -> None:
        self._pending.append(('rmtree', dir_path))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def flush(self, keep: set[str]) -> None:
        """Do the recorded deletions, except of paths in ``keep`` (just written)."""
        for action, path in self._pending:
            if os.fspath(path) in keep:
                continue
            if action == 'remove' and self._backend.isfile(path):
                self._backend.remove(path)
            elif action == 'rmtree' and self._backend.isdir(path):
                self._backend.rmtree(path)
        self._pending.clear()


def _remove_after_saving(method: Callable) -> Callable:
    """Wrap a ``CheckpointHook`` method so that its deletions follow its successful save."""

    @functools.wraps(method)
    def wrapper(self: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
        backend = self.file_backend
        proxy = _DeferredRemovalBackend(backend)
        self.file_backend = proxy
        try:
            result = method(self, runner, *args, **kwargs)
        finally:
            self.file_backend = backend
        # The new checkpoint is written; never delete a path that was just (re)written.
        written = [
            getattr(self, 'last_ckpt', None),
            getattr(self, 'best_ckpt_path', None),
            *getattr(self, 'best_ckpt_path_dict', {}).values(),
        ]
        proxy.flush({os.fspath(p) for p in written if p is not None})
        return result

    wrapper.__wrapped_by_projects_dat__ = True
    return wrapper


def install_atomic_checkpoint_save() -> None:
    """Make mmengine's local checkpoint writes crash-safe (idempotent).

    Patches ``LocalBackend.put``, the ``open`` used by ``CheckpointHook`` for
    ``last_checkpoint``, and the order of deletion in ``CheckpointHook`` (see the module
    docstring). Undo with :func:`uninstall_atomic_checkpoint_save`.
    """
    if _originals:
        return
    from mmengine.fileio.backends import LocalBackend
    from mmengine.hooks import CheckpointHook
    from mmengine.hooks import checkpoint_hook as hook_module

    _originals['LocalBackend.put'] = LocalBackend.__dict__['put']
    _originals['checkpoint_hook.open'] = hook_module.__dict__.get('open')
    for name in ('_save_checkpoint_with_step', '_save_best_checkpoint'):
        _originals[f'CheckpointHook.{name}'] = CheckpointHook.__dict__[name]

    LocalBackend.put = _atomic_local_put
    hook_module.open = _checkpoint_hook_open
    for name in ('_save_checkpoint_with_step', '_save_best_checkpoint'):
        setattr(CheckpointHook, name, _remove_after_saving(CheckpointHook.__dict__[name]))


def uninstall_atomic_checkpoint_save() -> None:
    """Restore what :func:`install_atomic_checkpoint_save` patched (no-op if not installed)."""
    if not _originals:
        return
    from mmengine.fileio.backends import LocalBackend
    from mmengine.hooks import CheckpointHook
    from mmengine.hooks import checkpoint_hook as hook_module

    LocalBackend.put = _originals['LocalBackend.put']
    if _originals['checkpoint_hook.open'] is None:
        hook_module.__dict__.pop('open', None)
    else:
        hook_module.open = _originals['checkpoint_hook.open']
    for name in ('_save_checkpoint_with_step', '_save_best_checkpoint'):
        setattr(CheckpointHook, name, _originals[f'CheckpointHook.{name}'])
    _originals.clear()


# ---------------------------------------------------------------------------------------------
# Original DAT checkpoints
# ---------------------------------------------------------------------------------------------

_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_PROTO = 0x80  # first byte of a pickle of protocol >= 2 (torch's legacy format)
_UNSAFE_GLOBAL_RE = re.compile(r'GLOBAL (\S+) was not an allowed global')

logger = logging.getLogger(__name__)


def _warn(message: str) -> None:
    try:
        from mmengine.logging import print_log
    except ImportError:  # pragma: no cover - mmengine is a dependency
        logger.warning(message)
    else:
        print_log(message, logger='current', level=logging.WARNING)


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
        CheckpointError: If the file does not exist, is empty, truncated or not a torch.save
            file, or holds objects outside the allow-list and ``trusted`` is False (the message
            names them), or cannot be unpickled even when trusted.
    """
    path = os.fspath(path)
    is_zip = _check_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _unsafe_globals(path, is_zip, error)
        if not unsafe and 'Weights only load failed' not in str(error):
            raise _read_error(path, is_zip, error) from error
        if not trusted:
            found = ', '.join(unsafe) if unsafe else '(not identified)'
            raise CheckpointError(
                f'{path!r} holds pickled objects besides tensors, which torch.load('
                f'weights_only=True) refuses: {found}. Loading them runs code from the file '
                'and must only be done for files from a trusted source (such as the official '
                'DAT release). To opt in, call load_original_checkpoint(path, trusted=True) '
                'or pass --trust-checkpoint to the converter.'
            ) from error
        reason = ', '.join(unsafe) if unsafe else str(error).splitlines()[0]
    except Exception as error:  # a corrupt file can fail anywhere inside torch.load
        raise _read_error(path, is_zip, error) from error

    _warn(
        f'loading {path!r} with weights_only=False (trusted=True): full unpickling runs '
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
