"""Crash-safe writing: a file is replaced by its complete new version or not at all.

:func:`atomic_open` writes into a temporary file next to the target (created with mode
``0o600``), flushes and fsyncs it, gives it the target's permission bits,
``os.replace``-s it over the target and fsyncs the directory: readers see the old file or the
new one, never a mix. ``projects.dat.hooks.AtomicCheckpointHook`` writes mmengine checkpoints
this way when a config names it. A process killed while writing leaves a hidden
``.<name>.tmp-<pid>-<8 hex digits>`` file next to the target (the target is untouched); the
next successful write in that folder removes such files once they are older than
:data:`STALE_TMP_SECONDS` (a younger one may still be written by another process).
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import os.path as osp
import re
import secrets
import stat
import time
from collections.abc import Iterator
from typing import IO, Any

import torch
from mmengine.logging import print_log

__all__ = ['STALE_TMP_SECONDS', 'atomic_open', 'atomic_save', 'atomic_write_bytes']

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
                print_log(
                    f'removed {entry.path}, an abandoned temporary file of an interrupted write',
                    logger='current',
                    level=logging.WARNING,
                )


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
def atomic_open(path: str | os.PathLike, mode: str = 'wb', encoding: str | None = None) -> Iterator[IO]:
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
