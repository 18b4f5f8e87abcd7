"""What the tools share to run configs of mmdetection, mmsegmentation and mmpretrain.

One entry point serves the three toolboxes: a config's ``default_scope`` picks the toolbox
whose modules are registered (:func:`register_scope_modules`). The toolboxes are optional
extras: the package reaches into one only by that scope name (here, and in
:mod:`projects.dat.data_checks` for the dataset classes), never by an import of its own.

- Launching (``tools/train.py``, ``tools/test.py``, ``tools/demo.py``): on machines without
  CUDA the config is adapted so that the same config runs on CPU, in one process or several
  (gloo): SyncBN becomes BN, mixed precision (``AmpOptimWrapper``, CUDA only in mmengine)
  becomes fp32, the ``nccl`` backend becomes ``gloo`` and the process group is started here,
  because mmengine's launcher calls ``torch.cuda.set_device`` (:func:`prepare`); the runner is
  the config's ``runner_type`` or :class:`~projects.dat.runner.DATRunner`
  (:func:`build_runner`).
- Building models without running them (``tools/analysis_tools``, ``tools/visualization``):
  the model of a config (:func:`build_config_model`), a model of a toolbox from a model config
  (:func:`build_toolbox_model`) and the data samples its ``mode='tensor'`` forward pass takes
  (:func:`dummy_data_sample`).
"""

from __future__ import annotations

import importlib
import os
import os.path as osp
import subprocess
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import RUNNERS, DefaultScope
from mmengine.runner import Runner
from torch import nn

__all__ = [
    'LAUNCHERS',
    'SCOPES',
    'adapt_to_device',
    'build_config_model',
    'build_runner',
    'build_toolbox_model',
    'dummy_data_sample',
    'init_cpu_dist',
    'prepare',
    'register_scope_modules',
    'replace_sync_bn',
]

SCOPES = ('mmdet', 'mmseg', 'mmpretrain')
LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')


def register_scope_modules(cfg: Config) -> str:
    """Register all modules of the toolbox named by ``cfg.default_scope`` and make it current.

    Args:
        cfg (Config): a config with ``default_scope`` in :data:`SCOPES`.

    Returns:
        str: the scope.

    Raises:
        ValueError: If ``default_scope`` is missing or not one of :data:`SCOPES`.
    """
    scope = cfg.get('default_scope')
    if scope not in SCOPES:
        raise ValueError(f'the config must set default_scope to one of {SCOPES}, got {scope!r}')
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=True)
    return scope


def replace_sync_bn(node: Any) -> int:
    """Replace every ``type='SyncBN'`` norm config by ``type='BN'`` in place.

    Args:
        node: a config (or any nested dict / list / tuple of it).

    Returns:
        int: the number of replacements.
    """
    count = 0
    if isinstance(node, dict):
        if node.get('type') in ('SyncBN', 'MMSyncBN'):
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += replace_sync_bn(value)
    return count


def adapt_to_device(cfg: Config, launcher: str) -> None:
    """Adapt ``cfg`` in place to a machine without CUDA (no change when CUDA is available).

    Without CUDA: SyncBN configs become BN (SyncBN needs CUDA, in one process or several),
    ``sync_bn`` is dropped, ``AmpOptimWrapper`` becomes a plain fp32 ``OptimWrapper``
    (mmengine's AMP wrapper refuses to run without an accelerator), and in distributed mode
    the ``nccl`` backend becomes ``gloo`` and the model wrapper gets no ``device_ids`` (DDP
    refuses them for CPU modules). Each change is announced with a warning.

    Args:
        cfg (Config): the full config.
        launcher (str): one of :data:`LAUNCHERS`.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f'launcher must be one of {LAUNCHERS}, got {launcher!r}')
    if torch.cuda.is_available():
        return
    mode = 'non-distributed' if launcher == 'none' else 'distributed (gloo)'
    replaced = replace_sync_bn(cfg._cfg_dict)
    if replaced:
        warnings.warn(
            f'CUDA is not available: {replaced} SyncBN config(s) replaced by BN for '
            f'{mode} CPU running (SyncBN needs CUDA).',
            stacklevel=2,
        )
    if cfg.get('sync_bn') is not None:
        warnings.warn(f'CUDA is not available: ignoring sync_bn={cfg.sync_bn!r}.', stacklevel=2)
        cfg.sync_bn = None
    optim_wrapper = cfg.get('optim_wrapper')
    if optim_wrapper is not None and optim_wrapper.get('type') == 'AmpOptimWrapper':
        warnings.warn(
            'CUDA is not available: mixed precision (AmpOptimWrapper) replaced by fp32 OptimWrapper.',
            stacklevel=2,
        )
        optim_wrapper['type'] = 'OptimWrapper'
        for key in ('loss_scale', 'dtype', 'use_fsdp'):
            optim_wrapper.pop(key, None)
    if launcher == 'none':
        return
    env_cfg = cfg.setdefault('env_cfg', {})
    dist_cfg = env_cfg.setdefault('dist_cfg', {})
    if dist_cfg.get('backend', 'nccl') == 'nccl':
        warnings.warn('CUDA is not available: using the gloo backend instead of nccl.', stacklevel=2)
        dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel',
        broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False),
    )
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper


def init_cpu_dist(cfg: Config, launcher: str) -> None:
    """Start the process group for CPU-only distributed running.

    mmengine's ``init_dist`` calls ``torch.cuda.set_device``, which fails without a GPU; the
    Runner skips its own initialisation when a group exists. Rank and world size come from
    torchrun (``pytorch``), slurm (``SLURM_*``; master from ``MASTER_ADDR`` or the first node
    of ``SLURM_NODELIST``, port from ``MASTER_PORT``/``PORT`` or 29500) or Open MPI
    (``OMPI_COMM_WORLD_*``).

    Args:
        cfg (Config): the config, already passed through :func:`adapt_to_device`.
        launcher (str): one of :data:`LAUNCHERS`; nothing happens for 'none', with CUDA, or
            when a process group exists.
    """
    if launcher == 'none' or torch.cuda.is_available() or torch_dist.is_initialized():
        return
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    backend = dist_cfg.pop('backend', 'gloo')
    timeout = dist_cfg.pop('timeout', None)
    if launcher == 'slurm':
        _export_env('RANK', os.environ['SLURM_PROCID'])
        _export_env('WORLD_SIZE', os.environ['SLURM_NTASKS'])
        _export_env('LOCAL_RANK', os.environ['SLURM_LOCALID'])
        if 'MASTER_ADDR' not in os.environ:
            nodes = subprocess.getoutput(f'scontrol show hostname {os.environ["SLURM_NODELIST"]}')
            os.environ['MASTER_ADDR'] = nodes.split()[0]
        _export_env('MASTER_PORT', os.environ.get('PORT', '29500'))
    elif launcher == 'mpi':
        _export_env('RANK', os.environ['OMPI_COMM_WORLD_RANK'])
        _export_env('WORLD_SIZE', os.environ['OMPI_COMM_WORLD_SIZE'])
        _export_env('LOCAL_RANK', os.environ['OMPI_COMM_WORLD_LOCAL_RANK'])
        _export_env('MASTER_ADDR', '127.0.0.1')
        _export_env('MASTER_PORT', '29500')
    for key in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        if key not in os.environ:
            raise RuntimeError(
                f'launcher {launcher!r} needs the environment variable {key}; '
                'start the script with tools/dist_train.sh (torchrun), srun or mpirun'
            )
    kwargs = dict(dist_cfg)
    if timeout is not None:
        kwargs['timeout'] = timedelta(seconds=timeout)
    torch_dist.init_process_group(
        backend=backend,
        rank=int(os.environ['RANK']),
        world_size=int(os.environ['WORLD_SIZE']),
        **kwargs,
    )


def _export_env(key: str, value: str) -> None:
    os.environ.setdefault(key, str(value))


def build_runner(cfg: Config) -> Runner:
    """The runner of ``cfg``: the one its ``runner_type`` names (our configs: ``DATRunner``), else
    ``DATRunner``, so that the dataset paths of any config are checked before the run uses them
    (see :mod:`projects.dat.runner`).

    Args:
        cfg (Config): the full config, passed through :func:`prepare`.

    Returns:
        Runner: the runner, not yet started.
    """
    from .runner import DATRunner

    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return DATRunner.from_cfg(cfg)


def prepare(cfg: Config, launcher: str, local_rank: int | None = None) -> str:
    """Everything ``train.py`` / ``test.py`` do before building the Runner.

    Args:
        cfg (Config): the full config (modified in place).
        launcher (str): one of :data:`LAUNCHERS`.
        local_rank (int, optional): ``--local-rank`` from old-style launchers; exported as
            ``LOCAL_RANK`` when that is not set.

    Returns:
        str: the toolbox scope.
    """
    if local_rank is not None:
        os.environ.setdefault('LOCAL_RANK', str(local_rank))
    cfg.launcher = launcher
    scope = register_scope_modules(cfg)
    adapt_to_device(cfg, launcher)
    init_cpu_dist(cfg, launcher)
    return scope


def build_config_model(config: str, cfg_options: dict | None = None) -> tuple[nn.Module, str, Config]:
    """Build the model of an mmdet / mmseg / mmpretrain config (no weights are loaded).

    SyncBN layers become BN (SyncBN needs a process group; the computation is the same in one
    process).

    Args:
        config (str): Config file path.
        cfg_options (dict, optional): Overrides, as ``--cfg-options``.

    Returns:
        tuple: The model, the config's scope and the config.

    Raises:
        FileNotFoundError: If ``config`` is not a file.
        ValueError: If the config's ``default_scope`` is not one of :data:`SCOPES`.
    """
    if not osp.isfile(config):
        raise FileNotFoundError(f'Config file {config!r} does not exist')
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if cfg.get('default_scope') not in SCOPES:
        raise ValueError(
            f'{config}: default_scope must be one of {SCOPES} to pick the toolbox, got {cfg.get("default_scope")!r}'
        )
    scope = register_scope_modules(cfg)
    replace_sync_bn(cfg.model)
    models = importlib.import_module(f'{scope}.registry').MODELS
    model = revert_sync_batchnorm(models.build(cfg.model))
    return model, scope, cfg


def build_toolbox_model(model_cfg: dict, scope: str) -> nn.Module:
    """Build a model config (e.g. ``dict(type='ImageClassifier', ...)``) from a toolbox's registry.

    The toolbox's modules are registered, without changing the current default scope; the
    model and what it builds inside (data preprocessor, losses) come from the toolbox's
    registry whatever scope an earlier config made current.

    Args:
        model_cfg (dict): The model's config.
        scope (str): One of :data:`SCOPES`.

    Returns:
        nn.Module: The model.

    Raises:
        ValueError: If ``scope`` is not one of :data:`SCOPES`.
    """
    if scope not in SCOPES:
        raise ValueError(f'scope must be one of {SCOPES}, got {scope!r}')
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=False)
    models = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        return models.build(model_cfg)


# The data sample class each toolbox's models take: (module, class name).
_DATA_SAMPLES = {
    'mmdet': ('mmdet.structures', 'DetDataSample'),
    'mmseg': ('mmseg.structures', 'SegDataSample'),
    'mmpretrain': ('mmpretrain.structures', 'DataSample'),
}


def dummy_data_sample(scope: str, height: int, width: int) -> Any:
    """A data sample without annotations for an unpadded, unscaled ``height x width`` input.

    What a toolbox's ``model(inputs, [sample], mode='tensor')`` needs to run (image, original,
    padded and batch shapes, scale factor 1).

    Args:
        scope (str): One of :data:`SCOPES`.
        height (int): Input height.
        width (int): Input width.

    Returns:
        The toolbox's data sample (``DetDataSample``, ``SegDataSample`` or ``DataSample``).

    Raises:
        ValueError: If ``scope`` is not one of :data:`SCOPES`.
    """
    if scope not in _DATA_SAMPLES:
        raise ValueError(f'scope must be one of {SCOPES}, got {scope!r}')
    module, name = _DATA_SAMPLES[scope]
    shape = (height, width)
    meta = dict(img_shape=shape, ori_shape=shape, pad_shape=shape, batch_input_shape=shape, scale_factor=(1.0, 1.0))
    return getattr(importlib.import_module(module), name)(metainfo=meta)
