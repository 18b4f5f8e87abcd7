"""Loading ``http://`` and ``https://`` checkpoints with ``weights_only=True``.

mmengine's own URL loader (``mmengine.runner.checkpoint.load_from_http``) ends in
``torch.hub.load_state_dict_from_url`` with ``weights_only=False``, so a served file can run code when it is loaded.
:func:`register_safe_url_loader` registers :func:`load_from_http_weights_only` for these
schemes through mmengine's ``CheckpointLoader.register_scheme``; it downloads as mmengine does
(torch.hub's cache folder ``<torch hub dir>/checkpoints``, progress bar on a terminal) and loads
with ``weights_only=True``. A file that holds other objects is refused with a
:class:`CheckpointError` that names them, unless its URL starts with one of the prefixes in the
environment variable ``DAT_TRUSTED_CHECKPOINT_URLS`` (:data:`TRUSTED_URLS_ENV`,
comma-separated). This covers ``init_cfg=dict(type='Pretrained', checkpoint='https://...')``,
``load_from``, ``--resume`` from a URL and ``mmengine.runner.load_checkpoint`` of any model.

mmengine's named schemes, ``torchvision://`` (``modelzoo://``), ``open-mmlab://``
(``openmmlab://``) and ``mmcls://``, look a name up in a table of URLs and call mmengine's
``load_from_http`` directly, not through the table of loaders; :func:`load_from_named_weights_only`
replaces them, looking the name up in the same tables and downloading through
:func:`load_from_http_weights_only`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import os.path as osp
import re
import sys
from typing import Any
from urllib.parse import urlparse

import torch
from mmengine.logging import print_log

from .loading import CheckpointError, UntrustedCheckpointError, load_refusing_code

__all__ = [
    'TRUSTED_URLS_ENV',
    'is_trusted_url',
    'load_from_http_weights_only',
    'load_from_named_weights_only',
    'register_safe_url_loader',
    'trusted_url_prefixes',
]

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
        return load_refusing_code(cached_file, map_location, trusted, refusal)
    except UntrustedCheckpointError:
        raise
    except CheckpointError as error:
        raise CheckpointError(f'{filename}: {error}; delete {cached_file} to download it again') from error


def _url_folder(url: str) -> str:
    """``url`` up to its last ``/`` (the folder the file is served from)."""
    return url[: url.rindex('/') + 1]


# mmengine's schemes that name a checkpoint in one of its tables of URLs.
NAMED_SCHEMES = ('torchvision://', 'modelzoo://', 'open-mmlab://', 'openmmlab://', 'mmcls://')


def load_from_named_weights_only(filename: str, map_location: Any = None) -> Any:
    """mmengine's loader of its named schemes (:data:`NAMED_SCHEMES`), downloading through
    :func:`load_from_http_weights_only`.

    The name is looked up as mmengine does, with its warnings for deprecated names: torchvision's
    model URLs for ``torchvision://`` and ``modelzoo://``; mmengine's table of OpenMMLab models
    for ``open-mmlab://`` and ``openmmlab://`` (a name that maps to a file under mmengine's home,
    not a URL, is left to mmengine's loader, which reads local files with ``torch.load``'s
    default); mmpretrain's for ``mmcls://``, whose checkpoints keep only the backbone's weights,
    without the ``backbone.`` prefix.

    Args:
        filename: ``<scheme>://<name>``.
        map_location: Passed to ``torch.load``. Defaults to None.

    Returns:
        The loaded checkpoint.

    Raises:
        KeyError: If the table has no such name.
        UntrustedCheckpointError: As :func:`load_from_http_weights_only`.
    """
    from mmengine.runner import checkpoint as mmengine_checkpoint

    scheme, name = filename.split('://', 1)
    if scheme in ('torchvision', 'modelzoo'):
        if scheme == 'modelzoo':
            print_log('modelzoo:// is deprecated; use torchvision://', logger='current', level=logging.WARNING)
        return load_from_http_weights_only(mmengine_checkpoint.get_torchvision_models()[name], map_location)
    if scheme == 'mmcls':
        checkpoint = load_from_http_weights_only(mmengine_checkpoint.get_mmcls_models()[name], map_location)
        return mmengine_checkpoint._process_mmcls_checkpoint(checkpoint)
    current = mmengine_checkpoint.get_deprecated_model_names().get(name, name)
    if current != name:
        message = f'{scheme}://{name} is deprecated in favour of {scheme}://{current}'
        print_log(message, logger='current', level=logging.WARNING)
    url = mmengine_checkpoint.get_external_models()[current]
    if url.startswith(('http://', 'https://')):
        return load_from_http_weights_only(url, map_location)
    return mmengine_checkpoint.load_from_openmmlab(filename, map_location)


def register_safe_url_loader() -> None:
    """Make mmengine load ``http://`` and ``https://`` checkpoints, and those of its named
    schemes, with ``weights_only=True``.

    Registers :func:`load_from_http_weights_only` for both prefixes and
    :func:`load_from_named_weights_only` for :data:`NAMED_SCHEMES` through
    ``mmengine.runner.CheckpointLoader.register_scheme``, replacing mmengine's loaders (which
    unpickle everything) in its table of loaders; mmengine's functions themselves are left as they
    are. Idempotent; called by ``import projects.dat``.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    CheckpointLoader.register_scheme(prefixes=('http://', 'https://'), loader=load_from_http_weights_only, force=True)
    CheckpointLoader.register_scheme(prefixes=NAMED_SCHEMES, loader=load_from_named_weights_only, force=True)
