"""DAT and DAT++ backbones for mmdetection 3, mmsegmentation 1 and mmpretrain 1.

Importing this package registers names and makes checkpoint loading safer; it changes no
function or method of mmengine or of the toolboxes:

- the backbone ``DAT`` in mmengine's root ``MODELS`` registry (so ``type='DAT'`` works in the
  configs of all three toolboxes);
- the hook ``AtomicCheckpointHook`` in mmengine's root ``HOOKS`` registry and its file backend
  ``'dat_atomic_local'`` (crash-safe checkpoint writes for configs that name the hook, see
  :mod:`projects.dat.hooks`);
- the runner ``DATRunner`` in mmengine's root ``RUNNERS`` registry (``runner_type='DATRunner'``
  in our configs: it checks the dataset paths before a run uses them, see
  :mod:`projects.dat.runner`);
- the objects that mmengine writes into its checkpoints on torch's allow-list for
  ``torch.load(weights_only=True)`` (torch >= 2.5; see
  :func:`projects.dat.checkpoint.register_mmengine_safe_globals`);
- loaders for ``http://`` and ``https://`` checkpoints and for mmengine's named models
  (``torchvision://``, ``open-mmlab://``, ``mmcls://``, ...) in mmengine's ``CheckpointLoader``
  that load with ``weights_only=True`` unless the URL starts with a prefix listed in the
  environment variable ``DAT_TRUSTED_CHECKPOINT_URLS`` (see
  :func:`projects.dat.checkpoint.load_from_http_weights_only`).
"""

from .checkpoint import register_mmengine_safe_globals, register_safe_url_loader
from .hooks import AtomicCheckpointHook
from .models import DAT
from .models.attn_impl import set_attn_impl
from .runner import DATRunner

__version__ = '0.3.0'

register_mmengine_safe_globals()
register_safe_url_loader()

__all__ = ['DAT', 'AtomicCheckpointHook', 'DATRunner', 'set_attn_impl', '__version__']
