"""Loading local checkpoint files with ``weights_only=True``, and the released DAT checkpoints.

:func:`load_refusing_code` reads a file with ``weights_only=True`` (tensors, containers,
numbers and the mmengine objects of :mod:`projects.dat.checkpoint.allowlist`) and runs full
unpickling, which can run code from the file, only for a caller that says the file is
trusted; it turns every low-level failure (missing, empty, truncated, not a torch.save file)
into a :class:`CheckpointError` that says what went wrong. The URL loader
(:mod:`projects.dat.checkpoint.url_loader`) reads its downloads through it.

The released DAT checkpoints hold extra pickled objects (a config object):
:func:`load_original_checkpoint` reads them through it, fully unpickling only with
``trusted=True`` (the converter's ``--trust-checkpoint``). :func:`extract_state_dict` picks the
weights out of a loaded checkpoint. Every failure is a :class:`CheckpointError`.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import os.path as osp
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import torch
from mmengine.logging import print_log

__all__ = [
    'CheckpointError',
    'UntrustedCheckpointError',
    'extract_state_dict',
    'load_original_checkpoint',
    'load_refusing_code',
]


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


_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_PROTO = 0x80  # first byte of a pickle of protocol >= 2 (torch's legacy format)
_UNSAFE_GLOBAL_RE = re.compile(r'GLOBAL (\S+) was not an allowed global')


def _check_file(path: str) -> bool:
    """Check ``path`` looks like a torch.save file; return whether it is a zip archive."""
    if not osp.exists(path):
        raise CheckpointError(f'checkpoint file not found: {path!r}')
    if not osp.isfile(path):
        raise CheckpointError(f'expected a checkpoint file, got a directory or special file: {path!r}')
    with builtins.open(path, 'rb') as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(
            f'checkpoint file {path!r} is empty (0 bytes): the download or copy was probably interrupted'
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


def load_refusing_code(path: str, map_location: Any, trusted: bool, refusal: Callable[[str], str]) -> Any:
    """``torch.load`` with ``weights_only=True``; full unpickling only if ``trusted``.

    Args:
        path: The local checkpoint file.
        map_location: Passed to ``torch.load``.
        trusted: Allow ``weights_only=False`` if the safe load refuses the file.
        refusal: Builds the error message from the names of the refused objects.

    Returns:
        The loaded object.

    Raises:
        UntrustedCheckpointError: If the file holds objects outside the allow-list and
            ``trusted`` is False (the message is ``refusal`` of their names).
        CheckpointError: If the file does not exist, is empty, truncated or not a torch.save
            file, or cannot be unpickled even when trusted.
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

    print_log(
        f'loading {path!r} with weights_only=False (trusted): full unpickling runs '
        f'code from the file; the safe load refused: {reason}',
        logger='current',
        level=logging.WARNING,
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


def load_original_checkpoint(path: str | os.PathLike, trusted: bool = False, map_location: Any = 'cpu') -> Any:
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

    return load_refusing_code(path, map_location, trusted, refusal)


def _as_state_dict(value: Any, where: str) -> dict[str, torch.Tensor]:
    """Check ``value`` is a non-empty mapping of names to tensors and return it as a dict."""
    if isinstance(value, torch.nn.Module):
        value = value.state_dict()
    if not isinstance(value, Mapping):
        raise CheckpointError(
            f'{where} should be a state dict (a mapping of parameter names to tensors), got {type(value).__name__}'
        )
    if not value:
        raise CheckpointError(f'{where} is empty: the checkpoint holds no weights')
    bad = [k for k, v in value.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        shown = ', '.join(f'{k!r}: {type(value[k]).__name__}' for k in bad[:5])
        more = f' and {len(bad) - 5} more' if len(bad) > 5 else ''
        raise CheckpointError(
            f'{where} should map parameter names to tensors, but {len(bad)} entries do not ({shown}{more})'
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
            f'expected a checkpoint dict with the weights under "model" or "state_dict", got {type(ckpt).__name__}'
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
