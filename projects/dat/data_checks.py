"""Early, clear errors for dataset paths and annotation files named in a config.

The toolboxes fail late and obscurely on a wrong dataset path: mmpretrain's ``ImageNet``
raises ``FileNotFoundError`` from deep inside ``os.scandir``, mmseg silently builds an empty
dataset from a missing folder, and mmdet only notices that an annotation file is not COCO
when pycocotools indexes it (``KeyError: 'images'``) -- and a missing ``CocoMetric``
annotation file is only found after the first training epoch. :func:`check_dataset_paths`
resolves every local path of the dataloaders' datasets (and their evaluators) the way
mmengine's ``BaseDataset`` does, before anything is built, and raises

- :class:`DatasetPathError` (a ``FileNotFoundError``) listing every missing file or folder
  with the config key that names it, the resolved path and what should be there;
- :class:`AnnotationFormatError` (a ``ValueError``) for an annotation file of a COCO-style
  dataset (mmdet ``CocoDataset`` and subclasses) or ``CocoMetric`` that is not a COCO JSON.

:class:`~projects.dat.runner.DATRunner` (``runner_type='DATRunner'`` in our configs) runs these
checks at the start of ``train``, ``val`` and ``test``, through ``tools/train.py``,
``tools/test.py`` and the toolboxes' own scripts that ``mim`` runs.

Only local paths are checked: URLs (``s3://``, ``http://``, ``petrel://`` ...), datasets read
through a non-local ``backend_args`` backend or a ``path_mapping``, and datasets that download
themselves (``download=True``, e.g. CIFAR) are skipped.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import os.path as osp
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ['DatasetPathError', 'AnnotationFormatError', 'check_dataset_paths']

DATALOADER_KEYS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
# The evaluator that goes with each dataloader (its ann_file is checked too).
_EVALUATOR_OF = {'val_dataloader': 'val_evaluator', 'test_dataloader': 'test_evaluator'}
# Keys of dataset wrappers (RepeatDataset, ClassBalancedDataset, MultiImageMixDataset,
# KFoldDataset: ``dataset``; ConcatDataset: ``datasets``).
_WRAPPED_KEYS = ('dataset', 'datasets')
_COCO_KEYS = ('images', 'annotations', 'categories')
# COCO annotation files above this size are checked by scanning for the top-level keys
# instead of parsing them (instances_train2017.json is 448 MB and mmdet parses it anyway).
_FULL_PARSE_LIMIT = 64 * 1024 * 1024
_PREFIX_WHAT = {
    'img': 'a folder of images',
    'img_path': 'a folder of images',
    'seg': 'a folder of segmentation maps',
    'seg_map_path': 'a folder of segmentation label maps',
}


class DatasetPathError(FileNotFoundError):
    """A dataset file or folder named in the config does not exist."""


class AnnotationFormatError(ValueError):
    """An annotation file exists but is not in the format its dataset or metric reads."""


def _is_remote(path: str) -> bool:
    return '://' in path or path.startswith(('s3:', 'petrel:', 'openmmlab:', 'http:'))


def _join(root: str | None, path: str) -> str:
    """mmengine's rule: a relative path is joined to a non-empty ``data_root``."""
    if root and not osp.isabs(path):
        return osp.join(root, path)
    return path


def _dataset_class(ds_cfg: Mapping, default_scope: str | None) -> type | None:
    """The class a dataset config builds, looked up in its toolbox's registry (or None)."""
    kind = ds_cfg.get('type')
    if isinstance(kind, type):
        return kind
    if not isinstance(kind, str):
        return None
    scope = ds_cfg.get('_scope_') or default_scope
    if '.' in kind:
        scope = kind.split('.', 1)[0]
    if not scope:
        return None
    try:
        registry = importlib.import_module(f'{scope}.registry').DATASETS
        return registry.get(kind)
    except Exception:  # an unknown scope or type: the Runner reports those itself
        return None


def _mro_names(cls: type | None) -> list[str]:
    return [c.__name__ for c in inspect.getmro(cls)] if cls is not None else []


def _downloads_itself(ds_cfg: Mapping, cls: type | None) -> bool:
    if 'download' in ds_cfg:
        return bool(ds_cfg['download'])
    if cls is None:
        return False
    try:
        param = inspect.signature(cls.__init__).parameters.get('download')
    except (TypeError, ValueError):
        return False
    return param is not None and bool(param.default)


def _walk_datasets(node: Any, key: str) -> Iterator[tuple[str, Mapping]]:
    """Yield ``(config key, dataset config)`` for a dataset config and what it wraps."""
    if isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            yield from _walk_datasets(item, f'{key}[{i}]')
        return
    if not isinstance(node, Mapping):
        return
    wrapped = [k for k in _WRAPPED_KEYS if k in node]
    if wrapped:
        for k in wrapped:
            yield from _walk_datasets(node[k], f'{key}.{k}')
    else:
        yield key, node


class _Checker:
    """Collects missing paths and format problems over all datasets of a config."""

    def __init__(self, default_scope: str | None) -> None:
        self.default_scope = default_scope
        # path -> [config keys naming it, what was expected, how it was resolved]
        self.missing: dict[str, list] = {}
        self.problems: list[str] = []
        self.checked: list[tuple[str, str]] = []
        self.coco_files: list[tuple[str, str, bool]] = []

    def exists(self, key: str, path: str, what: str, detail: str = '') -> bool:
        """Record a missing ``path``; return whether it exists."""
        self.checked.append((key, path))
        if osp.exists(path):
            return True
        if path in self.missing:
            self.missing[path][0].append(key)
        else:
            self.missing[path] = [[key], what, detail]
        return False

    def messages(self) -> list[str]:
        lines = []
        for path, (keys, what, detail) in self.missing.items():
            also = f' (also {", ".join(keys[1:])})' if len(keys) > 1 else ''
            lines.append(f'{keys[0]}{also}: {path!r}{detail} does not exist; expected {what} there')
        return lines + self.problems

    def dataset(self, key: str, ds: Mapping) -> None:
        backend = ds.get('backend_args') or ds.get('file_client_args') or {}
        if backend.get('backend', 'local') not in ('local', 'disk') or backend.get('path_mapping'):
            return
        cls = _dataset_class(ds, self.default_scope)
        if _downloads_itself(ds, cls):
            return
        name = ds.get('type') if isinstance(ds.get('type'), str) else getattr(cls, '__name__', '?')
        mro = _mro_names(cls) or [str(name)]
        root = ds.get('data_root') or ''
        if not isinstance(root, str) or _is_remote(root):
            return
        if root and not self.exists(f'{key}.data_root', root, f'the root folder of the {name} dataset'):
            return  # everything below it is missing too
        if root and not osp.isdir(root):
            self.problems.append(f'{key}.data_root: {root!r} is a file; expected the root folder of the {name} dataset')
            return

        ann_file = ds.get('ann_file') or ''
        prefix = ds.get('data_prefix', '')
        prefix_from_split = False
        if 'ImageNet' in mro and ds.get('split') and prefix == '':
            # mmpretrain's ImageNet reads the folder named after the split.
            prefix, prefix_from_split = ds['split'], True
        if isinstance(prefix, str):
            prefix = {'img_path': prefix} if prefix else {}
        is_coco = 'CocoDataset' in mro

        if isinstance(ann_file, str) and ann_file and not _is_remote(ann_file):
            path = _join(root, ann_file)
            what = f'a COCO annotation JSON file for {name}' if is_coco else f'the annotation file of {name}'
            detail = f' (data_root {root!r} + {ann_file!r})' if path != ann_file else ''
            if self.exists(f'{key}.ann_file', path, what, detail):
                if osp.isdir(path):
                    self.problems.append(f'{key}.ann_file: {path!r} is a folder; expected {what}')
                elif is_coco:
                    self.coco_files.append((f'{key}.ann_file', path, not ds.get('test_mode', False)))
        if not isinstance(prefix, Mapping):
            return
        for sub, value in prefix.items():
            if not isinstance(value, str) or not value or _is_remote(value):
                continue
            path = _join(root, value)
            sub_key = f'{key}.data_prefix (from split={value!r})' if prefix_from_split else f'{key}.data_prefix.{sub}'
            what = f'{_PREFIX_WHAT.get(sub, "a folder")} of {name}'
            if prefix_from_split:
                what += ' (ImageNet layout: <split>/<class>/<image> or meta/<split>.txt)'
            detail = f' (data_root {root!r} + {value!r})' if path != value else ''
            self.exists(sub_key, path, what, detail)

    def evaluator(self, key: str, node: Any) -> None:
        if isinstance(node, (list, tuple)):
            for i, item in enumerate(node):
                self.evaluator(f'{key}[{i}]', item)
            return
        if not isinstance(node, Mapping):
            return
        ann_file = node.get('ann_file')
        if not isinstance(ann_file, str) or not ann_file or _is_remote(ann_file):
            return
        backend = node.get('backend_args') or {}
        if backend.get('backend', 'local') not in ('local', 'disk') or backend.get('path_mapping'):
            return
        kind = str(node.get('type', ''))
        is_coco = 'Coco' in kind
        what = f'a COCO annotation JSON file for {kind}' if is_coco else f'the annotation file of {kind}'
        if self.exists(f'{key}.ann_file', ann_file, what) and is_coco and osp.isfile(ann_file):
            self.coco_files.append((f'{key}.ann_file', ann_file, not node.get('format_only', False)))


def check_coco_annotation(path: str, key: str = 'ann_file', need_annotations: bool = True) -> None:
    """Check that ``path`` is a COCO JSON: an object with ``images`` and ``categories``
    lists (and ``annotations``, unless ``need_annotations`` is False, as for test-dev's
    ``image_info`` files).

    Args:
        path (str): The annotation file.
        key (str): The config key naming it, for the message. Defaults to 'ann_file'.
        need_annotations (bool): Require the ``annotations`` key. Defaults to True.

    Raises:
        AnnotationFormatError: If the file is not JSON, not an object, or lacks the keys.
    """
    required = [k for k in _COCO_KEYS if need_annotations or k != 'annotations']
    expected = f'a COCO JSON object with the keys {required}'
    prefix = f'{key}: {path!r} is not a COCO annotation file: expected {expected}'
    size = os.path.getsize(path)
    if size > _FULL_PARSE_LIMIT:
        found = _scan_top_level_keys(path, required)
        if found is None:
            raise AnnotationFormatError(f'{prefix}; got a file that does not start with "{{"')
        absent = [k for k in required if k not in found]
        if absent:
            raise AnnotationFormatError(
                f'{prefix}; got a {size}-byte JSON file in which the keys {absent} do not occur'
            )
        return
    try:
        with open(path, 'rb') as f:
            data = json.loads(f.read())
    except (UnicodeDecodeError, ValueError) as error:
        raise AnnotationFormatError(
            f'{prefix}; got a file that is not valid JSON ({type(error).__name__}: {error})'
        ) from None
    if not isinstance(data, dict):
        kind = {
            list: 'a list',
            str: 'a string',
            int: 'a number',
            float: 'a number',
            bool: 'a boolean',
            type(None): 'null',
        }.get(type(data), type(data).__name__)
        length = f' of {len(data)} items' if isinstance(data, list) else ''
        raise AnnotationFormatError(f'{prefix}; got a JSON file holding {kind}{length}')
    absent = [k for k in required if k not in data]
    if absent:
        keys = sorted(data)
        shown = keys[:20] + (['...'] if len(keys) > 20 else [])
        raise AnnotationFormatError(f'{prefix}; got a JSON object with the keys {shown} (missing {absent})')
    wrong = {k: type(data[k]).__name__ for k in required if not isinstance(data[k], list)}
    if wrong:
        raise AnnotationFormatError(f'{prefix}, each a list; got {wrong}')


def _scan_top_level_keys(path: str, keys: Sequence[str]) -> set | None:
    """Which of ``keys`` occur as ``"key"`` in a large JSON file (None: not an object)."""
    needles = {k: f'"{k}"'.encode() for k in keys}
    overlap = max(len(n) for n in needles.values())
    found, tail = set(), b''
    with open(path, 'rb') as f:
        first = True
        while chunk := f.read(8 * 1024 * 1024):
            if first:
                if not chunk.lstrip().startswith(b'{'):
                    return None
                first = False
            block = tail + chunk
            found.update(k for k, n in needles.items() if n in block)
            if len(found) == len(needles):
                break
            tail = block[-overlap:]
    return found


def check_dataset_paths(cfg: Mapping, loaders: Sequence[str] = DATALOADER_KEYS) -> list[tuple[str, str]]:
    """Check the local files and folders that the datasets of ``cfg`` will read.

    For each dataloader in ``loaders`` present in the config (and the evaluator that goes
    with it: ``val_evaluator`` for ``val_dataloader``, ``test_evaluator`` for
    ``test_dataloader``), every dataset config -- also inside ``dataset``/``datasets`` of
    wrappers such as ``RepeatDataset`` and ``ConcatDataset`` -- has its ``data_root``,
    ``ann_file`` and ``data_prefix`` entries resolved as mmengine's ``BaseDataset`` resolves
    them (relative paths are joined to a non-empty ``data_root``, then to the working
    directory), and must exist. mmpretrain's ``ImageNet`` with ``split`` reads the folder
    ``data_root/<split>``. Annotation files of mmdet COCO-style datasets and of ``CocoMetric``
    must be COCO JSON files.

    Args:
        cfg (Mapping): The full config (an mmengine ``Config`` or a dict).
        loaders (Sequence[str]): Which dataloaders to check. Training checks
            ``('train_dataloader', 'val_dataloader')``, testing ``('test_dataloader',)``
            (:class:`~projects.dat.runner.DATRunner`). Defaults to all three.

    Returns:
        list[tuple[str, str]]: ``(config key, resolved path)`` of every path checked.

    Raises:
        DatasetPathError: Listing every missing path: the config key, the resolved path and
            what was expected there.
        AnnotationFormatError: For the first COCO annotation file that is not COCO JSON.
        ValueError: If ``loaders`` names something other than a dataloader key.
    """
    unknown = [k for k in loaders if k not in DATALOADER_KEYS]
    if unknown:
        raise ValueError(f'loaders must be among {DATALOADER_KEYS}, got {unknown}')
    checker = _Checker(cfg.get('default_scope'))
    for loader_key in loaders:
        loader = cfg.get(loader_key)
        if not isinstance(loader, Mapping) or loader.get('dataset') is None:
            continue
        for key, ds in _walk_datasets(loader['dataset'], f'{loader_key}.dataset'):
            checker.dataset(key, ds)
        evaluator_key = _EVALUATOR_OF.get(loader_key)
        if evaluator_key and cfg.get(evaluator_key) is not None:
            checker.evaluator(evaluator_key, cfg.get(evaluator_key))
    lines = checker.messages()
    if lines:
        first = lines[0].split(' ', 1)[0].rstrip(':')
        option = (
            first
            if first.endswith('evaluator.ann_file')
            else re.sub(r'\.(data_root|ann_file|data_prefix.*)$', '', first) + '.data_root'
        )
        raise DatasetPathError(
            f'{len(lines)} dataset path(s) of the config are wrong (relative paths are taken '
            f'from the working directory {os.getcwd()!r}):\n  '
            + '\n  '.join(lines)
            + '\nPrepare the data there (tools/data/ has scripts; projects/dat/synthetic.py '
            f'writes small synthetic sets), or point the config at it, e.g. '
            f'--cfg-options {option}=/path/to/data'
        )
    seen = set()
    for key, path, need_annotations in checker.coco_files:
        if (path, need_annotations) not in seen:
            seen.add((path, need_annotations))
            check_coco_annotation(path, key, need_annotations)
    return checker.checked
