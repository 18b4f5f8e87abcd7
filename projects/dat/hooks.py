"""``AtomicCheckpointHook``: mmengine's ``CheckpointHook`` with crash-safe writes.

mmengine writes a checkpoint as ``CheckpointHook`` -> ``Runner.save_checkpoint`` ->
``mmengine.runner.checkpoint.save_checkpoint``, which serialises into memory and hands the
bytes to the file backend's ``put``; for a local folder that is ``LocalBackend.put``, which
opens the target with ``'wb'`` (truncating it) and writes. ``CheckpointHook`` writes
``last_checkpoint`` (the file ``--resume`` reads) with a plain ``open(path, 'w')`` too, and it
deletes the oldest checkpoint (``max_keep_ckpts``) and the previous best one (``save_best``)
*before* writing the new one. A crash or a full disk in between leaves a truncated file where
the previous checkpoint was, and with ``max_keep_ckpts=1`` no checkpoint at all.

:class:`AtomicCheckpointHook` is a ``CheckpointHook`` that a config switches on::

    default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))

(merged into the toolbox's ``default_hooks``, so ``interval``, ``max_keep_ckpts`` etc. are
kept; every config of this repository does it). For a local ``out_dir`` it writes the
checkpoint files through :class:`AtomicLocalBackend` (passed to mmengine as
``backend_args=dict(backend='dat_atomic_local')``) and ``last_checkpoint`` through
:func:`projects.dat.checkpoint.atomic_open`, and it deletes outdated checkpoints only after the
new one and ``last_checkpoint`` are written; if saving fails they are kept. The price is that
the disk briefly holds one checkpoint more than ``max_keep_ckpts`` (atomic replacement needs
room for the old and the new file anyway). Nothing of mmengine is changed: runs that use
mmengine's ``CheckpointHook`` behave as before.
"""

from __future__ import annotations

import os
import os.path as osp
from pathlib import Path
from typing import Any

from mmengine.dist import is_main_process
from mmengine.fileio import get_file_backend, register_backend
from mmengine.fileio.backends import LocalBackend
from mmengine.fileio.backends.registry_utils import backends as _file_backends
from mmengine.hooks import CheckpointHook
from mmengine.registry import HOOKS

from .checkpoint import atomic_open, atomic_write_bytes
from .registration import is_reloaded, register_class

__all__ = ['ATOMIC_BACKEND_NAME', 'AtomicCheckpointHook', 'AtomicLocalBackend']

# Name of AtomicLocalBackend in mmengine's file backends (``backend_args=dict(backend=...)``).
ATOMIC_BACKEND_NAME = 'dat_atomic_local'


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend whose writes replace the target atomically.

    ``put`` and ``put_text`` write through :func:`projects.dat.checkpoint.atomic_open`; reading,
    listing and removing are ``LocalBackend``'s. Registered in mmengine's file backends as
    ``'dat_atomic_local'`` (:data:`ATOMIC_BACKEND_NAME`) without a URI prefix, so it is used
    only where ``backend_args`` names it.
    """

    def put(self, obj: bytes, filepath: str | Path) -> None:
        """Write ``obj`` to ``filepath`` atomically, creating its folder if needed.

        Args:
            obj: The bytes to write.
            filepath: The file to replace.
        """
        atomic_write_bytes(obj, filepath)

    def put_text(self, obj: str, filepath: str | Path, encoding: str = 'utf-8') -> None:
        """Write the text ``obj`` to ``filepath`` atomically, creating its folder if needed.

        Args:
            obj: The text to write.
            filepath: The file to replace.
            encoding: Text encoding. Defaults to ``'utf-8'``.
        """
        with atomic_open(filepath, 'w', encoding=encoding) as f:
            f.write(obj)


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


class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` whose local checkpoints survive a crash or a full disk mid-write.

    Takes exactly ``CheckpointHook``'s arguments and saves the same files at the same times.
    The differences (see the module docstring): for a local ``out_dir`` (``backend_args``
    None or ``dict(backend='local')``, no ``file_client_args``), checkpoint files and
    ``last_checkpoint`` are replaced atomically, and outdated checkpoints (``max_keep_ckpts``,
    the previous best of ``save_best``) are deleted only after the new checkpoint has been
    written. For other storage (e.g. ``backend_args=dict(backend='petrel')``) the files are
    written as ``CheckpointHook`` writes them, with a warning; deletions still wait for the
    new checkpoint.

    Args:
        *args: Positional arguments of ``mmengine.hooks.CheckpointHook``.
        **kwargs: Keyword arguments of ``mmengine.hooks.CheckpointHook``.
    """

    # Set by before_train: whether checkpoints go through AtomicLocalBackend.
    writes_atomically = False

    def before_train(self, runner: Any) -> None:
        """Prepare the output folder as ``CheckpointHook`` does, and choose the atomic backend.

        Args:
            runner: The runner of the training process.
        """
        super().before_train(runner)
        local = self.file_client_args is None and self.backend_args in (None, {}, {'backend': 'local'})
        self.writes_atomically = local and type(self.file_backend) is LocalBackend
        if self.writes_atomically:
            # Instance state of this hook only: runner.save_checkpoint(backend_args=...) then
            # reaches AtomicLocalBackend.put through mmengine's get_file_backend.
            self.backend_args = {'backend': ATOMIC_BACKEND_NAME}
            self.file_backend = get_file_backend(self.out_dir, backend_args=self.backend_args)
        else:
            runner.logger.warning(
                f'AtomicCheckpointHook: {self.out_dir} is written through '
                f'{type(self.file_backend).__name__} (file_client_args={self.file_client_args}, '
                f'backend_args={self.backend_args}), not atomically: atomic writes are for local '
                'folders without file_client_args; outdated checkpoints are still deleted only '
                'after the new one is written'
            )

    def _save_checkpoint_with_step(self, runner: Any, step: int, meta: dict) -> None:
        """``CheckpointHook._save_checkpoint_with_step`` with the deletion after the save.

        The same bookkeeping of ``keep_ckpt_ids`` (updated in the message hub before the save,
        so that the checkpoint records it), the same files; ``last_checkpoint`` is replaced
        atomically for a local folder, and the checkpoint that falls out of ``max_keep_ckpts``
        is deleted last.

        Args:
            runner: The runner of the training process.
            step: The epoch or iteration the checkpoint is named after.
            meta: Passed to ``runner.save_checkpoint``.
        """
        outdated = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
            # _save_checkpoint and _save_best_checkpoint may both save the same step.
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                outdated = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids', list(self.keep_ckpt_ids))

        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)

        runner.save_checkpoint(
            self.out_dir,
            ckpt_filename,
            self.file_client_args,
            save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler,
            meta=meta,
            by_epoch=self.by_epoch,
            backend_args=self.backend_args,
            **self.args,
        )

        # As in CheckpointHook: with model-parallel-like training the other ranks took part
        # in gathering the state above; only the main process writes and deletes files.
        if not is_main_process():
            return
        save_file = osp.join(runner.work_dir, 'last_checkpoint')
        if self.writes_atomically:
            with atomic_open(save_file, 'w') as f:
                f.write(self.last_ckpt)
        else:
            with open(save_file, 'w') as f:
                f.write(self.last_ckpt)
        if outdated is not None:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(outdated))
            if path != self.last_ckpt:
                if self.file_backend.isfile(path):
                    self.file_backend.remove(path)
                elif self.file_backend.isdir(path):  # checkpoints saved by DeepSpeed are folders
                    self.file_backend.rmtree(path)

    def _save_best_checkpoint(self, runner: Any, metrics: dict) -> None:
        """``CheckpointHook._save_best_checkpoint`` with the previous best deleted after the save.

        Args:
            runner: The runner of the training process.
            metrics: Evaluation results of all metrics.
        """
        backend = self.file_backend
        deferred = _DeferredRemovalBackend(backend)
        self.file_backend = deferred
        try:
            super()._save_best_checkpoint(runner, metrics)
        finally:
            self.file_backend = backend
        # The new checkpoints are written; never delete a path that was just (re)written.
        written = [
            self.last_ckpt,
            getattr(self, 'best_ckpt_path', None),
            *getattr(self, 'best_ckpt_path_dict', {}).values(),
        ]
        deferred.flush({os.fspath(p) for p in written if p is not None})


# Registration only adds names; a name taken by anything else raises KeyError (no override).
if _file_backends.get(ATOMIC_BACKEND_NAME) is not AtomicLocalBackend:
    register_backend(
        ATOMIC_BACKEND_NAME,
        AtomicLocalBackend,
        force=is_reloaded(_file_backends.get(ATOMIC_BACKEND_NAME), AtomicLocalBackend),
    )
register_class(HOOKS, AtomicCheckpointHook)
