"""``DATRunner``: the dataset paths of a run are checked before it uses them, through our tools and
through the toolboxes' own train / test scripts (what ``mim train`` / ``mim test`` run).

The runs with a wrong path stop before any dataset is built or checkpoint is loaded, so these
tests are short; the end-to-end runs on correct synthetic data (``tests/test_tools.py``) check
that the same runner still trains and tests.
"""

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mmengine.config import Config

from projects.dat.data_checks import DatasetPathError
from projects.dat.runner import DATRunner
from projects.dat.synthetic import make_imagenet

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / 'tools'
DEMO = REPO / 'configs' / 'demo'
CONFIGS = {
    'mmdet': DEMO / 'mask-rcnn_datpp-demo_fpn_synthetic-coco-tiny.py',
    'mmseg': DEMO / 'upernet_datpp-demo_synthetic-ade20k.py',
    'mmpretrain': DEMO / 'datpp-demo_synthetic-imagenet.py',
}


def _load_tool(name: str):
    """Import ``tools/<name>.py`` under a private module name (``test`` is a stdlib package)."""
    spec = importlib.util.spec_from_file_location(f'_dat_runner_tools_{name}', TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _missing_pattern(loader: str, missing: Path) -> str:
    """The line of the DatasetPathError that names ``loader``'s missing data_root."""
    return rf"{loader}\.dataset\.data_root( \(also [^)]*\))?: '{re.escape(str(missing))}/' does not exist"


def _missing_root_options(missing: Path, loaders) -> list:
    return [f'{loader}.dataset.data_root={missing}/' for loader in loaders]


@pytest.mark.parametrize('scope', ['mmengine', 'mmdet', 'mmseg', 'mmpretrain'])
def test_every_toolbox_registry_finds_the_runner(scope):
    registry = importlib.import_module(f'{scope}.registry').RUNNERS
    assert registry.get('DATRunner') is DATRunner


def test_every_config_names_the_runner():
    paths = sorted(p for p in (REPO / 'configs').rglob('*.py') if '_base_' not in p.parts)
    assert len(paths) >= 47  # 8 classification, 23 detection, 12 segmentation, 4 demo
    wrong = {str(p.relative_to(REPO)): Config.fromfile(str(p)).get('runner_type') for p in paths}
    assert {path: kind for path, kind in wrong.items() if kind != 'DATRunner'} == {}


def test_train_py_stops_on_a_missing_data_root(tmp_path):
    train = _load_tool('train')
    missing = tmp_path / 'no_such_coco'
    options = _missing_root_options(missing, ('train_dataloader', 'val_dataloader'))
    with pytest.raises(DatasetPathError, match=_missing_pattern('train_dataloader', missing)):
        train.main([str(CONFIGS['mmdet']), '--work-dir', str(tmp_path / 'work'), '--cfg-options', *options])
    assert not list((tmp_path / 'work').glob('*.pth'))


def test_train_py_checks_a_config_without_runner_type(tmp_path):
    """Any config run with tools/train.py is checked: without a runner_type it gets DATRunner."""
    config = tmp_path / 'no_runner_type.py'
    config.write_text(f"_base_ = '{CONFIGS['mmpretrain']}'\n")
    cfg = Config.fromfile(str(config))
    cfg.pop('runner_type')
    cfg.dump(str(config))
    assert 'runner_type' not in Config.fromfile(str(config))
    train = _load_tool('train')
    missing = tmp_path / 'no_such_imagenet'
    with pytest.raises(DatasetPathError, match=_missing_pattern('train_dataloader', missing)):
        train.main(
            [
                str(config),
                '--work-dir',
                str(tmp_path / 'work'),
                '--cfg-options',
                *_missing_root_options(missing, ('train_dataloader', 'val_dataloader')),
            ]
        )


def test_test_py_checks_the_test_data_before_the_checkpoint(tmp_path):
    test = _load_tool('test')
    missing = tmp_path / 'no_such_imagenet'
    with pytest.raises(DatasetPathError, match=_missing_pattern('test_dataloader', missing)):
        test.main(
            [
                str(CONFIGS['mmpretrain']),
                str(tmp_path / 'no_such_checkpoint.pth'),
                '--work-dir',
                str(tmp_path / 'work'),
                '--cfg-options',
                *_missing_root_options(missing, ('test_dataloader',)),
            ]
        )


def test_test_py_needs_only_the_test_data(tmp_path):
    """A test run does not need the training set: it gets past the check to the checkpoint."""
    root = tmp_path / 'imagenet'
    make_imagenet(str(root), num_train=1, num_val=1, size=(32, 32), progress=False)
    test = _load_tool('test')
    checkpoint = tmp_path / 'no_such_checkpoint.pth'
    options = [
        f'test_dataloader.dataset.data_root={root}/',
        *_missing_root_options(tmp_path / 'no_such_train_set', ('train_dataloader', 'val_dataloader')),
        # mmengine reuses the logger, and so the log file, of an earlier runner with the same
        # experiment name; names are made to the second, so a runner built in the same second
        # by the test before would take this run's log.
        f'experiment_name={tmp_path.name}',
    ]
    with pytest.raises(FileNotFoundError, match='no_such_checkpoint') as error:
        test.main(
            [
                str(CONFIGS['mmpretrain']),
                str(checkpoint),
                '--work-dir',
                str(tmp_path / 'work'),
                '--cfg-options',
                *options,
            ]
        )
    assert not isinstance(error.value, DatasetPathError)
    log = '\n'.join(p.read_text() for p in (tmp_path / 'work').glob('*/*.log'))
    assert 'DATRunner: checked 2 dataset path(s) of test_dataloader: all exist' in log


def _toolbox_script(scope: str, name: str) -> Path:
    root = Path(importlib.util.find_spec(scope).origin).parent
    return root / '.mim' / 'tools' / f'{name}.py'


def _run_outside_repo(cmd, tmp_path, timeout=240) -> subprocess.CompletedProcess:
    """Run as mim does: outside the repository, ``projects.dat`` from the installed package."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['PATH'] = f'{Path(sys.executable).parent}{os.pathsep}{env.get("PATH", "")}'
    env.setdefault('OMP_NUM_THREADS', '1')
    cwd = tmp_path / 'elsewhere'
    cwd.mkdir()
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_mim_train_stops_on_a_missing_data_root(tmp_path):
    missing = tmp_path / 'no_such_coco'
    mim = Path(sys.executable).parent / 'mim'
    proc = _run_outside_repo(
        [
            mim,
            'train',
            'mmdet',
            CONFIGS['mmdet'],
            '--gpus',
            '0',
            '--work-dir',
            tmp_path / 'work',
            '--cfg-options',
            *_missing_root_options(missing, ('train_dataloader',)),
        ],
        tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert 'projects.dat.data_checks.DatasetPathError' in output or 'DatasetPathError:' in output, output[-3000:]
    assert re.search(_missing_pattern('train_dataloader', missing), output), output[-3000:]


@pytest.mark.parametrize(
    'scope, script, loader',
    [
        ('mmseg', 'train', 'train_dataloader'),
        ('mmpretrain', 'train', 'val_dataloader'),
        ('mmdet', 'test', 'test_dataloader'),
        ('mmpretrain', 'test', 'test_dataloader'),
    ],
)
def test_toolbox_scripts_stop_on_a_missing_data_root(scope, script, loader, tmp_path):
    """The toolboxes' own tools/train.py and tools/test.py, as ``mim train|test SCOPE`` runs them."""
    missing = tmp_path / 'no_such_data'
    args = [str(tmp_path / 'no_such_checkpoint.pth')] if script == 'test' else []
    proc = _run_outside_repo(
        [
            sys.executable,
            _toolbox_script(scope, script),
            CONFIGS[scope],
            *args,
            '--work-dir',
            tmp_path / 'work',
            '--cfg-options',
            *_missing_root_options(missing, (loader,)),
        ],
        tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert 'DatasetPathError' in output, output[-3000:]
    assert re.search(_missing_pattern(loader, missing), output), output[-3000:]
