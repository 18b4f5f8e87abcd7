"""DAT and DAT++ backbones for mmdetection 3, mmsegmentation 1 and mmpretrain 1.

Importing this package registers the backbone ``DAT`` in mmengine's root ``MODELS`` registry
(so ``type='DAT'`` works in the configs of all three toolboxes) and allow-lists the objects
that mmengine writes into its checkpoints for ``torch.load(weights_only=True)``, and makes
mmengine's local checkpoint writes atomic (see :mod:`projects.dat.checkpoint`).
"""
from .checkpoint import install_atomic_checkpoint_save, register_mmengine_safe_globals
from .models import DAT

__version__ = '0.1.0'

register_mmengine_safe_globals()
install_atomic_checkpoint_save()

__all__ = ['DAT', '__version__']
