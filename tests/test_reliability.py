"""Reliability (issue 8): distributed runs that agree with single-process ones and end when a
worker dies, clear errors for wrong dataset paths and annotation files
(:mod:`projects.dat.data_checks`), and for checkpoints of another variant or version.

The crash-safe checkpoint part of the issue is tested in ``tests/test_checkpoint.py``, the
backbone's own argument checks in ``tests/test_backbone.py``, random inputs in
``tests/test_fuzz.py``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

import projects.dat  # noqa: F401  (allow-list for torch.load of mmengine checkpoints)
from projects.dat import DAT, data_checks
from projects.dat.checkpoint import atomic_save
from projects.dat.converter import ConversionError, convert_original_state_dict
from projects.dat.data_checks import AnnotationFormatError, DatasetPathError, check_dataset_paths
from projects.dat.models.geometry import relative_position_index, shift_size_for, shifted_window_mask
from projects.dat.synthetic import make_ade20k, make_coco, make_imagenet

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / 'tools'
FIXTURES = Path(__file__).resolve().parent / 'fixtures'
OFFICIAL_KEYS = REPO.parent / 'shared' / 'reference' / 'official_keys'
needs_keys = pytest.mark.skipif(not OFFICIAL_KEYS.is_dir(), reason='../shared/reference not present')

CLS_CONFIG = FIXTURES / 'tiny_dat_cls.py'
KILL_CONFIG = FIXTURES / 'tiny_dat_cls_kill.py'
KILL_WRITE_CONFIG = FIXTURES / 'tiny_dat_cls_kill_write.py'
IMAGENET_CONFIG = REPO / 'configs/classification/datpp-t_8xb128_in1k.py'
ADE_CONFIG = REPO / 'configs/segmentation/upernet/upernet_datpp-t_8xb2-160k_ade20k-512x512.py'
COCO_CONFIG = REPO / 'configs/detection/mask_rcnn/mask-rcnn_datpp-t_fpn_1x_coco.py'
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


# ---------------------------------------------------------------------------------------------
# Distributed: two processes equal one, and a dead worker ends the job
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _env() -> dict:
    """One thread per process (the runs are compared and share 2 cores), the test hooks
    importable, torch's default weights_only loading."""
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(_free_port()), OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join([str(REPO), str(FIXTURES), env.get('PYTHONPATH', '')])
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)
    return env


def _run(cmd: list, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` in its own process group; kill the whole group if it outlives ``timeout``."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f'{cmd[:3]} still running after {timeout} s:\n{out[-3000:]}') from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, ''), time.monotonic() - start


@pytest.fixture(scope='module')
def tiny_imagenet(tmp_path_factory) -> Path:
    """4 classes x 2 training images of 32x32, listed class by class in meta/train.txt."""
    root = tmp_path_factory.mktemp('tiny_imagenet')
    make_imagenet(str(root), num_train=2, num_val=1, size=(32, 32), progress=False)
    return root


def _train_args(work_dir: Path, root: Path, *options: str) -> list:
    return ['--work-dir', work_dir, '--cfg-options', f'train_dataloader.dataset.data_root={root}', *options]


def _losses(work_dir: Path, rank: int) -> list:
    return json.loads((work_dir / f'losses_rank{rank}.json').read_text())


def test_two_processes_match_one_process_with_the_same_total_batch(tiny_imagenet, tmp_path):
    """2 processes x batch 1 (gloo, DDP) against 1 process x batch 2, 4 SGD steps.

    The same samples meet in each step: without shuffling, DefaultSampler gives rank r the
    samples r, r + 2, ..., and one process with batch 2 takes 0-1, 2-3, .... DDP averages the
    gradients over the ranks, which for the mean cross-entropy is the gradient of batch 2.
    mmengine logs rank 0's loss only (``parse_losses`` does not all-reduce), so each rank
    records its own loss (``RecordRankLossHook``): the mean over the ranks must equal the
    single process's batch loss. Tolerance 1e-5: only the order of float sums differs.
    """
    single, dist = tmp_path / 'single', tmp_path / 'dist'
    proc, _ = _run(
        [
            sys.executable,
            TOOLS / 'train.py',
            CLS_CONFIG,
            *_train_args(single, tiny_imagenet, 'train_dataloader.batch_size=2'),
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    proc, _ = _run(['bash', TOOLS / 'dist_train.sh', CLS_CONFIG, 2, *_train_args(dist, tiny_imagenet)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]

    batch_loss = _losses(single, 0)
    rank0, rank1 = _losses(dist, 0), _losses(dist, 1)
    assert len(batch_loss) == len(rank0) == len(rank1) == 4
    assert not (single / 'losses_rank1.json').exists()
    for step, (loss, a, b) in enumerate(zip(batch_loss, rank0, rank1, strict=True)):
        assert (a + b) / 2 == pytest.approx(loss, abs=1e-5), f'step {step}'
    assert any(abs(a - b) > 1e-3 for a, b in zip(rank0, rank1, strict=True))  # the ranks saw different images

    for step in (2, 4):
        ours = torch.load(single / f'iter_{step}.pth')['state_dict']
        theirs = torch.load(dist / f'iter_{step}.pth')['state_dict']
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(theirs[key], ours[key], rtol=0, atol=1e-5, msg=f'{key} at {step}')
    early = torch.load(single / 'iter_2.pth')['state_dict']
    assert not torch.equal(early['head.fc.weight'], ours['head.fc.weight'])  # the weights moved


@pytest.mark.parametrize('rank', [1, 0])
def test_a_killed_worker_ends_the_job(tiny_imagenet, tmp_path, rank):
    """Worker ``rank`` SIGKILLs itself when iteration 2 starts; the other one then waits in
    DDP's gradient all-reduce. torchrun's agent sees the dead worker, stops the other one and
    exits non-zero: the job ends in seconds instead of waiting for the gloo timeout (30 min)."""
    work_dir = tmp_path / 'killed'
    proc, elapsed = _run(
        [
            'bash',
            TOOLS / 'dist_train.sh',
            KILL_CONFIG,
            2,
            *_train_args(work_dir, tiny_imagenet, f'custom_hooks.1.rank={rank}'),
        ],
        timeout=180,
    )
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert elapsed < 120, f'the job took {elapsed:.0f} s to end'
    assert re.search(rf'rank\s*: {rank} .*\n.*exitcode\s*: -9 .*\(SIGKILL\)', proc.stdout), proc.stdout[-3000:]
    assert len(_losses(work_dir, rank)) == 2  # it died at the start of the third iteration
    # The checkpoint written before the death is complete and is the one to resume from.
    assert sorted(p.name for p in work_dir.glob('iter_*.pth')) == ['iter_2.pth']
    assert (work_dir / 'last_checkpoint').read_text().endswith('iter_2.pth')
    assert torch.load(work_dir / 'iter_2.pth')['meta']['iter'] == 2
    for r in (0, 1):
        pid = int((work_dir / f'pid_rank{r}').read_text())
        with pytest.raises(ProcessLookupError):  # no worker outlives the job
            os.kill(pid, 0)


@pytest.mark.parametrize('hook', ['AtomicCheckpointHook', 'CheckpointHook'])
def test_sigkill_while_writing_a_checkpoint_then_resume(tiny_imagenet, tmp_path, hook):
    """tools/train.py with the checkpoint hook our configs switch on, killed (SIGKILL) half-way
    through writing iter_3.pth with max_keep_ckpts=1: iter_2.pth and last_checkpoint are intact
    and --resume finishes the run. mmengine's own CheckpointHook (the control) has deleted
    iter_2.pth before writing, so there is nothing to resume from."""
    work_dir = tmp_path / 'run'
    options = ['default_hooks.checkpoint.type=CheckpointHook'] if hook == 'CheckpointHook' else []
    train = [sys.executable, TOOLS / 'train.py', KILL_WRITE_CONFIG]
    proc, _ = _run([*train, *_train_args(work_dir, tiny_imagenet, *options)], timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:]
    assert (work_dir / 'last_checkpoint').read_text().endswith('iter_2.pth')
    resume = [*train, '--resume', *_train_args(work_dir, tiny_imagenet, *options, 'custom_hooks.1.name=None')]
    if hook == 'CheckpointHook':
        assert not (work_dir / 'iter_2.pth').exists()
        proc, _ = _run(resume, timeout=300)
        assert proc.returncode != 0 and 'iter_2.pth can not be found' in proc.stdout, proc.stdout[-3000:]
        return
    assert sorted(p.name for p in work_dir.glob('iter_*.pth')) == ['iter_2.pth']
    assert torch.load(work_dir / 'iter_2.pth')['meta']['iter'] == 2
    (leftover,) = [p for p in work_dir.iterdir() if '.tmp-' in p.name]  # the half-written file
    assert leftover.name.startswith('.iter_3.pth.tmp-') and leftover.stat().st_mode & 0o777 == 0o600
    proc, _ = _run(resume, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert 'resumed' in proc.stdout.lower(), proc.stdout[-3000:]
    assert sorted(p.name for p in work_dir.glob('iter_*.pth')) == ['iter_4.pth']
    assert torch.load(work_dir / 'iter_4.pth')['meta']['iter'] == 4
    assert len(_losses(work_dir, 0)) == 2  # iterations 3 and 4 only: it did not start again


# ---------------------------------------------------------------------------------------------
# Dataset paths and annotation files (projects.dat.data_checks)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def base_configs() -> dict:
    return {
        name: Config.fromfile(path)
        for name, path in [('imagenet', IMAGENET_CONFIG), ('ade20k', ADE_CONFIG), ('coco', COCO_CONFIG)]
    }


@pytest.fixture(scope='module')
def synthetic_roots(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp('datasets')
    make_imagenet(str(base / 'imagenet'), num_train=1, num_val=1, size=(32, 32), progress=False)
    make_ade20k(str(base / 'ade20k'), num_train=1, num_val=1, size=(32, 32), progress=False)
    make_coco(str(base / 'coco'), num_train=1, num_val=1, size=(32, 32), progress=False)
    return {name: base / name for name in ('imagenet', 'ade20k', 'coco')}


@pytest.fixture
def dataset(base_configs, synthetic_roots, tmp_path):
    """``dataset(name)``: the real config pointed at a fresh copy of the synthetic set."""

    def make(name: str, root: Path | None = None):
        if root is None:
            root = tmp_path / name
            while root.exists():
                root = root.with_name(root.name + '_')
            shutil.copytree(synthetic_roots[name], root)
        cfg = copy.deepcopy(base_configs[name])
        for key in LOADERS:
            cfg[key].dataset.data_root = str(root) + '/'
        if name == 'coco':
            for key in ('val_evaluator', 'test_evaluator'):
                cfg[key].ann_file = str(root / 'annotations/instances_val2017.json')
        return cfg, root

    return make


@pytest.mark.parametrize(
    'name, expected',
    [
        (
            'imagenet',
            {
                "train_dataloader.dataset.data_prefix (from split='train')": 'train',
                'val_dataloader.dataset.data_root': '',
            },
        ),
        (
            'ade20k',
            {
                'train_dataloader.dataset.data_prefix.img_path': 'images/training',
                'val_dataloader.dataset.data_prefix.seg_map_path': 'annotations/validation',
            },
        ),
        (
            'coco',
            {
                'train_dataloader.dataset.ann_file': 'annotations/instances_train2017.json',
                'test_dataloader.dataset.data_prefix.img': 'val2017/',
                'val_evaluator.ann_file': 'annotations/instances_val2017.json',
            },
        ),
    ],
)
def test_valid_synthetic_datasets_pass(dataset, name, expected):
    cfg, root = dataset(name)
    checked = dict(check_dataset_paths(cfg))
    for key, relative in expected.items():
        assert os.path.normpath(checked[key]) == os.path.normpath(root / relative), key


def test_missing_data_root(dataset, tmp_path):
    cfg, _ = dataset('imagenet', root=tmp_path / 'no_imagenet')
    with pytest.raises(
        DatasetPathError,
        match=(
            r'train_dataloader\.dataset\.data_root \(also val_dataloader\.dataset\.data_root, '
            r"test_dataloader\.dataset\.data_root\): '.*/no_imagenet/' does not exist; expected "
            r'the root folder of the ImageNet dataset there\n(?s:.*)--cfg-options '
            r'train_dataloader\.dataset\.data_root='
        ),
    ) as info:
        check_dataset_paths(cfg)
    assert isinstance(info.value, FileNotFoundError)
    assert str(info.value).startswith('1 dataset path(s) of the config are wrong')


def test_missing_imagenet_split_folder(dataset):
    cfg, root = dataset('imagenet')
    shutil.rmtree(root / 'val')
    with pytest.raises(
        DatasetPathError,
        match=(
            r"val_dataloader\.dataset\.data_prefix \(from split='val'\) \(also test_dataloader.*\): "
            r"'.*/val' \(data_root '.*' \+ 'val'\) does not exist; expected a folder of images of "
            r'ImageNet \(ImageNet layout: <split>/<class>/<image> or meta/<split>\.txt\)'
        ),
    ) as info:
        check_dataset_paths(cfg)
    assert 'train_dataloader' not in str(info.value)
    assert check_dataset_paths(cfg, ('train_dataloader',))  # train alone is fine


def test_missing_ade20k_folders(dataset):
    cfg, root = dataset('ade20k')
    shutil.rmtree(root / 'annotations/validation')
    shutil.rmtree(root / 'images/training')
    with pytest.raises(
        DatasetPathError,
        match=(
            r'(?s)^2 dataset path.*train_dataloader\.dataset\.data_prefix\.img_path: '
            r"'.*/images/training' \(data_root .*\) does not exist; expected a folder of images of "
            r'ADE20KDataset there\n  val_dataloader\.dataset\.data_prefix\.seg_map_path \(also '
            r"test_dataloader\.dataset\.data_prefix\.seg_map_path\): '.*/annotations/validation' .*"
            r'expected a folder of segmentation label maps of ADE20KDataset'
        ),
    ):
        check_dataset_paths(cfg)


def test_missing_coco_annotation_files(dataset):
    cfg, root = dataset('coco')
    (root / 'annotations/instances_train2017.json').unlink()
    (root / 'annotations/instances_val2017.json').unlink()
    with pytest.raises(
        DatasetPathError,
        match=(
            r"(?s)train_dataloader\.dataset\.ann_file: '.*/annotations/instances_train2017\.json' "
            r"\(data_root '.*/' \+ 'annotations/instances_train2017\.json'\) does not exist; "
            r'expected a COCO annotation JSON file for CocoDataset there\n'
            r'  val_dataloader\.dataset\.ann_file \(also val_evaluator\.ann_file, '
            r'test_dataloader\.dataset\.ann_file, test_evaluator\.ann_file\): '
            r"'.*/annotations/instances_val2017\.json' .* does not exist"
        ),
    ):
        check_dataset_paths(cfg)
    # Found before the first validation, not after the first training epoch.
    cfg, root = dataset('coco')
    cfg.val_evaluator.ann_file = str(root / 'annotations/val_typo.json')
    with pytest.raises(
        DatasetPathError,
        match=(
            r"^1 dataset path.*\n  val_evaluator\.ann_file: '.*/val_typo\.json' does not exist; "
            r'expected a COCO annotation JSON file for CocoMetric there\n'
        ),
    ):
        check_dataset_paths(cfg, ('train_dataloader', 'val_dataloader'))


@pytest.mark.parametrize(
    'content, match',
    [
        (json.dumps([{'id': 1}, {'id': 2}]), r'got a JSON file holding a list of 2 items'),
        (
            json.dumps({'info': {}, 'labels': []}),
            r"got a JSON object with the keys \['info', 'labels'\] "
            r"\(missing \['images', 'annotations', 'categories'\]\)",
        ),
        (json.dumps({'images': {}, 'annotations': [], 'categories': []}), r"each a list; got \{'images': 'dict'\}"),
        ('images: [] # YAML, not JSON', r'got a file that is not valid JSON \(JSONDecodeError'),
        (b'\xff\xd8\xff\xe0 a JPEG', r'got a file that is not valid JSON \(UnicodeDecodeError'),
        ('"instances"', r'got a JSON file holding a string'),
    ],
    ids=['list', 'other-keys', 'images-not-a-list', 'yaml', 'binary', 'string'],
)
def test_annotation_file_that_is_not_coco(dataset, content, match):
    cfg, root = dataset('coco')
    path = root / 'annotations/instances_train2017.json'
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(
        AnnotationFormatError,
        match=(
            r"^train_dataloader\.dataset\.ann_file: '.*/instances_train2017\.json' is not a COCO "
            r"annotation file: expected a COCO JSON object with the keys \['images', "
            r"'annotations', 'categories'\].*" + match
        ),
    ) as info:
        check_dataset_paths(cfg)
    assert isinstance(info.value, ValueError)


def test_coco_image_info_without_annotations(dataset):
    """test-dev's image_info files have no 'annotations': fine for a test_mode dataset and a
    format_only metric, not for a metric that evaluates."""
    cfg, root = dataset('coco')
    path = root / 'annotations/instances_val2017.json'
    data = json.loads(path.read_text())
    del data['annotations']
    path.write_text(json.dumps(data))
    cfg.val_evaluator.format_only = cfg.test_evaluator.format_only = True
    assert cfg.val_dataloader.dataset.test_mode
    check_dataset_paths(cfg)
    cfg.val_evaluator.format_only = False
    with pytest.raises(AnnotationFormatError, match=r"^val_evaluator\.ann_file: .*\(missing \['annotations'\]\)"):
        check_dataset_paths(cfg)
    cfg.val_dataloader.dataset.test_mode = False
    with pytest.raises(AnnotationFormatError, match=r"^val_dataloader\.dataset\.ann_file: .*missing \['annotations'\]"):
        check_dataset_paths(cfg)


def test_dataset_wrappers(dataset):
    cfg, root = dataset('coco')
    inner = cfg.train_dataloader.dataset
    broken = copy.deepcopy(inner)
    broken.ann_file = 'annotations/missing.json'
    cfg.train_dataloader.dataset = dict(
        type='ConcatDataset', datasets=[inner, dict(type='RepeatDataset', times=2, dataset=broken)]
    )
    with pytest.raises(
        DatasetPathError,
        match=(
            r"train_dataloader\.dataset\.datasets\[1\]\.dataset\.ann_file: '.*/annotations/missing\.json'"
            r'(?s:.*)--cfg-options train_dataloader\.dataset\.datasets\[1\]\.dataset\.data_root='
        ),
    ):
        check_dataset_paths(cfg)
    cfg.train_dataloader.dataset.datasets.pop()
    checked = dict(check_dataset_paths(cfg))
    assert 'train_dataloader.dataset.datasets[0].ann_file' in checked


def test_remote_and_self_downloading_datasets_are_skipped(dataset, tmp_path):
    cfg, _ = dataset('coco', root=tmp_path / 'absent')
    for key in LOADERS:
        cfg[key].dataset.data_root = 's3://bucket/coco/'
    cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = 's3://bucket/coco/annotations/val.json'
    assert check_dataset_paths(cfg) == []

    cfg, _ = dataset('coco', root=tmp_path / 'absent')
    cfg.val_evaluator = cfg.test_evaluator = None
    for key in LOADERS:
        cfg[key].dataset.backend_args = dict(backend='petrel')
    assert check_dataset_paths(cfg) == []

    cifar = dict(
        default_scope='mmpretrain',
        train_dataloader=dict(dataset=dict(type='CIFAR10', data_root=str(tmp_path / 'cifar'), split='train')),
    )
    assert check_dataset_paths(cifar) == []  # CIFAR10 downloads itself by default
    cifar['train_dataloader']['dataset']['download'] = False
    with pytest.raises(DatasetPathError, match=r"train_dataloader\.dataset\.data_root: '.*/cifar' does not exist"):
        check_dataset_paths(cifar)


def test_absolute_prefix_ignores_data_root(dataset, tmp_path):
    cfg, root = dataset('coco')
    elsewhere = tmp_path / 'images_elsewhere'
    shutil.copytree(root / 'train2017', elsewhere)
    cfg.train_dataloader.dataset.data_prefix = dict(img=str(elsewhere))
    assert dict(check_dataset_paths(cfg))['train_dataloader.dataset.data_prefix.img'] == str(elsewhere)
    shutil.rmtree(elsewhere)
    with pytest.raises(DatasetPathError, match=rf"data_prefix\.img: '{re.escape(str(elsewhere))}' does not exist"):
        check_dataset_paths(cfg)


def test_file_and_folder_mixed_up(dataset):
    cfg, root = dataset('coco')
    (root / 'annotations/instances_train2017.json').unlink()
    (root / 'annotations/instances_train2017.json').mkdir()
    cfg.val_dataloader.dataset.data_root = str(root / 'annotations/instances_val2017.json')
    with pytest.raises(
        DatasetPathError,
        match=(
            r"(?s)train_dataloader\.dataset\.ann_file: '.*/instances_train2017\.json' is a folder; expected a "
            r"COCO annotation JSON file for CocoDataset\n  val_dataloader\.dataset\.data_root: '.*' is a file"
        ),
    ):
        check_dataset_paths(cfg)


def test_large_annotation_files_are_scanned_not_parsed(dataset, monkeypatch):
    monkeypatch.setattr(data_checks, '_FULL_PARSE_LIMIT', 100)
    cfg, root = dataset('coco')
    assert (root / 'annotations/instances_train2017.json').stat().st_size > 100
    check_dataset_paths(cfg)  # the synthetic files have all three keys
    path = root / 'annotations/instances_train2017.json'
    path.write_text(json.dumps({'images': [], 'padding': 'x' * 200}))
    with pytest.raises(
        AnnotationFormatError,
        match=(r"got a \d+-byte JSON file in which the keys \['annotations', 'categories'\] do not occur"),
    ):
        check_dataset_paths(cfg)
    path.write_text(json.dumps([{'images': 1}] * 50))
    with pytest.raises(AnnotationFormatError, match=r'got a file that does not start with "\{"'):
        check_dataset_paths(cfg)


def test_loader_selection(dataset, tmp_path):
    cfg, root = dataset('coco')
    cfg.train_dataloader.dataset.data_root = str(tmp_path / 'no_train_data')
    checked = check_dataset_paths(cfg, ('test_dataloader',))  # what tools/test.py needs
    assert {key.split('.')[0] for key, _ in checked} == {'test_dataloader', 'test_evaluator'}
    with pytest.raises(DatasetPathError, match='no_train_data'):
        check_dataset_paths(cfg, ('train_dataloader', 'val_dataloader'))
    with pytest.raises(ValueError, match=r"loaders must be among .*, got \['train'\]"):
        check_dataset_paths(cfg, ('train',))


# ---------------------------------------------------------------------------------------------
# Checkpoints of another variant or version
# ---------------------------------------------------------------------------------------------


def _fake_original(key_file: str) -> dict:
    """An original checkpoint's weights in the released shapes (read from the test data's key lists)."""
    state_dict = {}
    for line in (OFFICIAL_KEYS / f'{key_file}.txt').read_text().splitlines():
        m = re.match(r'(\S+) \(([\d, ]*)\)', line)
        if not m or line.startswith('#'):
            continue
        shape = tuple(int(s) for s in m[2].split(',') if s.strip())
        if m[1].endswith('relative_position_index'):
            state_dict[m[1]] = relative_position_index(7)
        elif m[1].endswith('attn_mask'):
            side = math.isqrt(shape[0]) * 7
            state_dict[m[1]] = shifted_window_mask(side, side, 7, shift_size_for(7))
        else:
            state_dict[m[1]] = torch.zeros(shape)
    return state_dict


def _converted_file(tmp_path: Path, key_file: str) -> Path:
    """What ``tools/model_converters/dat_official.py`` writes for this released checkpoint."""
    converted, info = convert_original_state_dict(_fake_original(key_file))
    path = tmp_path / f'{key_file}_converted.pth'
    atomic_save(dict(state_dict=converted, meta=dict(dat=info)), path)
    return path


@needs_keys
def test_datpp_t_checkpoint_into_datpp_s(tmp_path):
    path = _converted_file(tmp_path, 'dat_pp_tiny')
    model = DAT('datpp-s', out_indices=(3,), init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    with pytest.raises(
        ConversionError,
        match=(
            r'(?s)does not fit DAT\(arch=\'datpp-s\', dims=\[96, 192, 384, 768\]\):\n'
            r'  stem\.conv1\.weight: shape \(32, 3, 3, 3\) != model \(48, 3, 3, 3\)\n.*'
            r'norm3\.weight: shape \(512,\) != model \(768,\)'
        ),
    ):
        model.init_weights()


@needs_keys
def test_converted_v1_checkpoint_into_datpp_config(tmp_path):
    path = _converted_file(tmp_path, 'dat_tiny')
    model = DAT('datpp-t', out_indices=(3,), init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.'))
    with pytest.raises(
        ConversionError,
        match=(
            r'(?s)does not fit DAT\(arch=\'datpp-t\', dims=\[64, 128, 256, 512\]\).*'
            r'unexpected key stem\.conv\.weight.*'
            r'unexpected key stages\.0\.blocks\.0\.attn\.relative_position_bias_table.*'
            r'missing key stem\.conv1\.weight.*missing key stages\.0\.blocks\.0\.lpu\.weight'
        ),
    ):
        model.init_weights()


def test_pretrained_bias_tables_of_other_heads_are_refused(tmp_path):
    # Stage 2 with 4 heads instead of 2: its tables would resize over their positions only and
    # then fail load_state_dict; they are listed with the checkpoint's other problems instead.
    arch = dict(version='pp', dims=[16, 32, 64, 128], heads=[1, 2, 2, 4], groups=[1, 1, 2, 2])
    arch['stage_spec'] = ['ND', 'N', 'ND', 'DD']
    source = DAT(arch, out_indices=(3,)).state_dict()
    path = tmp_path / 'ckpt.pth'
    torch.save(dict(state_dict={f'backbone.{k}': v for k, v in source.items()}), path)
    init_cfg = dict(type='Pretrained', checkpoint=str(path), prefix='backbone.')
    model = DAT(dict(arch, heads=[1, 2, 4, 4]), out_indices=(3,), init_cfg=init_cfg)
    with pytest.raises(ConversionError) as info:
        model.init_weights()
    tables = ['stages.2.blocks.0.attn.rpb', 'stages.2.blocks.1.attn.rpe_table']
    assert str(info.value).splitlines()[1:] == [
        f'  {key}: shape {tuple(source[key].shape)} != model {tuple(model.state_dict()[key].shape)} '
        '(bias tables resize over positions, not heads)'
        for key in tables
    ]
    assert [source[key].shape[0] for key in tables] == [2, 2]


def test_pretrained_prefix_that_matches_nothing(tmp_path):
    source = DAT(
        dict(
            version='pp',
            dims=[16, 32, 64, 128],
            heads=[1, 2, 2, 4],
            groups=[1, 1, 2, 2],
            stage_spec=['ND', 'N', 'ND', 'DD'],
        ),
        out_indices=(3,),
    )
    path = tmp_path / 'ckpt.pth'
    torch.save(dict(state_dict={f'backbone.{k}': v for k, v in source.state_dict().items()}), path)
    model = DAT(
        source.arch_settings,
        out_indices=(3,),
        init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='model.backbone.'),
    )
    with pytest.raises(ConversionError, match=r"No key of .*ckpt\.pth starts with prefix 'model\.backbone\.'"):
        model.init_weights()
