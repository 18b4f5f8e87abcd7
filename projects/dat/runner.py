"""``DATRunner``: mmengine's ``Runner`` that checks the dataset paths of a run before using them.

The toolboxes fail late and obscurely on a wrong dataset path (see
:mod:`projects.dat.data_checks`). Our configs name this runner::

    runner_type = 'DATRunner'

and every training or test script that honours ``runner_type`` builds it: ours
(``tools/train.py``, ``tools/test.py``, ``tools/dist_*.sh``, ``tools/slurm_*.sh``) and the
toolboxes' own ``tools/train.py`` (mmdet, mmseg, mmpretrain) and ``tools/test.py`` (mmdet,
mmpretrain), which ``mim train`` / ``mim test`` run: they call ``RUNNERS.build(cfg)`` when the
config has a ``runner_type``. (mmseg 1.2's ``tools/test.py`` always builds mmengine's
``Runner``, so ``mim test mmseg`` runs without these checks.)

:meth:`DATRunner.train`, :meth:`DATRunner.val` and :meth:`DATRunner.test` first run
:func:`~projects.dat.data_checks.check_dataset_paths` on the dataloaders (and evaluators) that
they are about to use -- training checks ``train_dataloader`` and ``val_dataloader``, testing
only ``test_dataloader`` -- so a wrong path stops the run with a
:class:`~projects.dat.data_checks.DatasetPathError` or
:class:`~projects.dat.data_checks.AnnotationFormatError` before any dataset is built or any
weights are loaded (the model itself is constructed by ``Runner.__init__``, before it is known
whether the run trains or tests). Everything else is mmengine's ``Runner``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .data_checks import check_dataset_paths
from .registration import register_class

__all__ = ['DATRunner', 'TRAIN_LOADERS', 'VAL_LOADERS', 'TEST_LOADERS']

# The dataloaders (with their evaluators) each entry point reads.
TRAIN_LOADERS = ('train_dataloader', 'val_dataloader')
VAL_LOADERS = ('val_dataloader',)
TEST_LOADERS = ('test_dataloader',)


class DATRunner(Runner):
    """mmengine's ``Runner``, checking the dataset paths of ``train``, ``val`` and ``test`` first.

    Built from a config with ``runner_type='DATRunner'`` (``RUNNERS.build(cfg)``) or with
    :meth:`Runner.from_cfg`; its arguments are ``Runner``'s. See :mod:`projects.dat.runner`.
    """

    def check_dataset_paths(self, loaders: Sequence[str]) -> list:
        """Check the local files and folders that the dataloaders ``loaders`` will read.

        Dataloaders given as built objects rather than configs are skipped, as are loaders the
        runner does not have.

        Args:
            loaders (Sequence[str]): Among ``'train_dataloader'``, ``'val_dataloader'`` and
                ``'test_dataloader'``.

        Returns:
            list[tuple[str, str]]: ``(config key, resolved path)`` of every path checked.

        Raises:
            DatasetPathError: Listing every missing path.
            AnnotationFormatError: For a COCO annotation file that is not COCO JSON.
        """
        scope = getattr(self.default_scope, 'scope_name', None) or self.cfg.get('default_scope')
        config = dict(
            default_scope=scope,
            train_dataloader=self._train_dataloader,
            val_dataloader=self._val_dataloader,
            test_dataloader=self._test_dataloader,
            val_evaluator=self._val_evaluator,
            test_evaluator=self._test_evaluator,
        )
        config = {
            key: value
            for key, value in config.items()
            if key == 'default_scope'
            or isinstance(value, Mapping)
            or (key.endswith('evaluator') and isinstance(value, (list, tuple)))
        }
        checked = check_dataset_paths(config, loaders)
        self.logger.info(f'DATRunner: checked {len(checked)} dataset path(s) of {", ".join(loaders)}: all exist')
        return checked

    def train(self):
        """Check the paths of ``train_dataloader`` and ``val_dataloader``, then ``Runner.train``."""
        self.check_dataset_paths(TRAIN_LOADERS)
        return super().train()

    def val(self) -> dict:
        """Check the paths of ``val_dataloader``, then ``Runner.val``."""
        self.check_dataset_paths(VAL_LOADERS)
        return super().val()

    def test(self) -> dict:
        """Check the paths of ``test_dataloader``, then ``Runner.test``."""
        self.check_dataset_paths(TEST_LOADERS)
        return super().test()


# Registration only adds the name; a name taken by anything else raises KeyError (no override).
register_class(RUNNERS, DATRunner)
