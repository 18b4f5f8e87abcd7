"""Safe loading and crash-safe writing of checkpoints; none of it changes a function or method of mmengine.

One module per job, everything importable from ``projects.dat.checkpoint``:

- :mod:`~projects.dat.checkpoint.allowlist`: the objects that mmengine writes into its
  checkpoints, allow-listed for ``torch.load(weights_only=True)``
  (:func:`register_mmengine_safe_globals`, called by ``import projects.dat``);
- :mod:`~projects.dat.checkpoint.loading`: local files read with ``weights_only=True``, refusing
  code unless the caller trusts the file, with a :class:`CheckpointError` that says what is
  wrong with a bad file; the released DAT checkpoints (:func:`load_original_checkpoint`) and
  the weights in a loaded checkpoint (:func:`extract_state_dict`);
- :mod:`~projects.dat.checkpoint.url_loader`: ``http://`` and ``https://`` checkpoints, and
  those that mmengine's named schemes (``torchvision://``, ``open-mmlab://``, ``mmcls://``, ...)
  stand for, loaded with ``weights_only=True`` unless their URL is trusted
  (:func:`load_from_http_weights_only`, :func:`load_from_named_weights_only`, registered in
  mmengine's ``CheckpointLoader`` by :func:`register_safe_url_loader`, called by
  ``import projects.dat``);
- :mod:`~projects.dat.checkpoint.atomic`: writes that replace a file all at once or not at all
  (:func:`atomic_open`), used by :mod:`projects.dat.hooks` and the converter.
"""

from .allowlist import CheckedHistoryBuffer, mmengine_safe_globals, register_mmengine_safe_globals
from .atomic import STALE_TMP_SECONDS, atomic_open, atomic_save, atomic_write_bytes
from .loading import CheckpointError, UntrustedCheckpointError, extract_state_dict, load_original_checkpoint
from .url_loader import (
    TRUSTED_URLS_ENV,
    is_trusted_url,
    load_from_http_weights_only,
    load_from_named_weights_only,
    register_safe_url_loader,
    trusted_url_prefixes,
)

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
    'load_from_named_weights_only',
    'load_original_checkpoint',
    'mmengine_safe_globals',
    'register_mmengine_safe_globals',
    'register_safe_url_loader',
    'trusted_url_prefixes',
]
