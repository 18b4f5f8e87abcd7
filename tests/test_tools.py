"""Tests of the training / testing entry points (issue 6).

End to end, on CPU, with the tiny demo configs (``configs/demo``) and synthetic data:

- ``tools/dist_train.sh CONFIG 2``: two processes with the gloo backend (SyncBN -> BN, no
  device ids), a checkpoint at the end;
- ``mim train mmdet CONFIG`` started outside the repository: mmdet's own train script finds
  ``projects.dat`` through the config's ``custom_imports`` (the editable install);
- ``tools/test.py`` on the checkpoint mim wrote (loaded with ``weights_only=True`` through
  the allow-list of ``projects.dat.checkpoint``), with ``--out`` and ``--show-dir``;
- mmseg: ``tools/train.py`` with the heads' SyncBN turned into BN, then ``tools/test.py
  --tta --out DIR``;
- mmpretrain: a 30-iteration training run lowers the loss.

Each of these runs builds the configs' ``DATRunner``, which checks the dataset paths first
(``tests/test_runner.py`` has the runs that stop on a wrong path).

And in-process, the glue itself: config adaptation, argument handling, clear errors, and the
command lines of the slurm scripts (with a stand-in ``srun``).
"""

import importlib.util
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from projects.dat import toolboxes
from projects.dat.synthetic import make_ade20k, make_coco, make_imagenet

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / 'tools'
DEMO = REPO / 'configs' / 'demo'
DET_CONFIG = DEMO / 'mask-rcnn_datpp-demo_fpn_synthetic-coco-tiny.py'
SEG_CONFIG = DEMO / 'upernet_datpp-demo_synthetic-ade20k.py'
CLS_CONFIG = DEMO / 'datpp-demo_synthetic-imagenet.py'
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason='tests the CPU-only adaptation')


def _load_tool(name: str):
    """Import ``tools/<name>.py`` under a private module name (``test`` is a stdlib package)."""
    spec = importlib.util.spec_from_file_location(f'_dat_tools_{name}', TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tool = _load_tool('train')
test_tool = _load_tool('test')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run(cmd, cwd=REPO, env=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env.setdefault('OMP_NUM_THREADS', '1')
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}'
    return proc


def _logs(work_dir: Path) -> str:
    return '\n'.join(p.read_text() for p in sorted(work_dir.glob('*/*.log')))


def _scalars(work_dir: Path) -> list:
    (path,) = work_dir.glob('*/vis_data/scalars.json')
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _det_options(root: Path) -> list:
    ann = root / 'annotations' / 'instances_val2017.json'
    return [
        f'{loader}.dataset.data_root={root}/' for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
    ] + [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']


def _data_root_options(root: Path) -> list:
    return [
        f'{loader}.dataset.data_root={root}/' for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
    ]


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('coco')
    make_coco(str(root), num_train=8, num_val=4, size=(64, 64), progress=False)
    return root


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def test_dist_train_two_cpu_processes(coco_root, tmp_path):
    work_dir = tmp_path / 'dist'
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(_free_port()))
    proc = _run(
        [
            'bash',
            TOOLS / 'dist_train.sh',
            DET_CONFIG,
            2,
            '--work-dir',
            work_dir,
            '--cfg-options',
            *_det_options(coco_root),
        ],
        env=env,
    )
    assert (work_dir / 'iter_2.pth').is_file()
    log = _logs(work_dir)
    assert 'Distributed launcher: pytorch' in log and 'Distributed training: True' in log
    assert 'coco/bbox_mAP' in log  # the validation at the end ran across both processes
    if not torch.cuda.is_available():
        assert 'using the gloo backend instead of nccl' in proc.stderr


@pytest.fixture(scope='module')
def mim_work_dir(coco_root, tmp_path_factory) -> Path:
    """``mim train mmdet`` from outside the repository, on the installed package."""
    work_dir = tmp_path_factory.mktemp('mim')
    mim = Path(sys.executable).parent / 'mim'
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['PATH'] = f'{Path(sys.executable).parent}{os.pathsep}{env.get("PATH", "")}'
    cwd = tmp_path_factory.mktemp('elsewhere')
    check = subprocess.run(
        [sys.executable, '-c', 'import projects.dat'],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, (
        f'projects.dat is not importable outside the repository; install it with `make env`:\n{check.stderr[-2000:]}'
    )
    _run(
        [
            mim,
            'train',
            'mmdet',
            DET_CONFIG,
            '--gpus',
            '0',
            '--work-dir',
            work_dir,
            '--cfg-options',
            *_det_options(coco_root),
        ],
        cwd=cwd,
        env=env,
    )
    return work_dir


def test_mim_train_outside_repo(mim_work_dir):
    assert (mim_work_dir / 'iter_2.pth').is_file()
    log = _logs(mim_work_dir)
    assert re.search(r"imports=\[\s*'projects\.dat',?\s*\]", log)  # the dumped config
    assert "type='DAT'" in log
    assert 'coco/bbox_mAP' in log
    # mmdet's train script built the configs' DATRunner, which checked the data first
    assert re.search(r'DATRunner: checked \d+ dataset path\(s\) of train_dataloader, val_dataloader: all exist', log)


def test_test_py_on_mim_checkpoint(mim_work_dir, coco_root, tmp_path):
    checkpoint = mim_work_dir / 'iter_2.pth'
    out = tmp_path / 'results.pkl'
    _run(
        [
            sys.executable,
            TOOLS / 'test.py',
            DET_CONFIG,
            checkpoint,
            '--work-dir',
            tmp_path,
            '--out',
            out,
            '--show-dir',
            tmp_path / 'vis',
            '--cfg-options',
            *_det_options(coco_root),
        ]
    )
    log = _logs(tmp_path)
    assert re.search(r'DATRunner: checked \d+ dataset path\(s\) of test_dataloader: all exist', log)
    assert f'Load checkpoint from {checkpoint}' in log
    assert 'coco/bbox_mAP' in log and 'coco/segm_mAP' in log
    with open(out, 'rb') as f:
        results = pickle.load(f)
    assert len(results) == 4 and all('pred_instances' in r for r in results)
    assert len(list((tmp_path / 'vis').glob('*.jpg'))) == 4


def test_segmentation_train_and_tta_test(tmp_path):
    root = tmp_path / 'ade'
    make_ade20k(str(root), num_train=4, num_val=2, size=(64, 64), progress=False)
    work_dir = tmp_path / 'seg'
    options = _data_root_options(root) + [
        'train_cfg.max_iters=4',
        'train_cfg.val_interval=4',
        'default_hooks.checkpoint.interval=4',
    ]
    proc = _run(
        [
            sys.executable,
            TOOLS / 'train.py',
            SEG_CONFIG,
            '--work-dir',
            work_dir,
            '--cfg-options',
            *options,
        ]
    )
    if not torch.cuda.is_available():
        # decode head, auxiliary head and the base's top-level norm_cfg
        assert '3 SyncBN config(s) replaced by BN' in proc.stderr
    assert "norm_cfg=dict(requires_grad=True, type='BN')" in _logs(work_dir)
    assert (work_dir / 'iter_4.pth').is_file()
    out = tmp_path / 'pred'
    _run(
        [
            sys.executable,
            TOOLS / 'test.py',
            SEG_CONFIG,
            work_dir / 'iter_4.pth',
            '--tta',
            '--out',
            out,
            '--work-dir',
            tmp_path / 'seg_test',
            '--cfg-options',
            *_data_root_options(root),
        ]
    )
    assert 'mIoU' in _logs(tmp_path / 'seg_test')
    assert len(list(out.glob('*.png'))) == 2


def test_short_classification_training_lowers_loss(tmp_path):
    root = tmp_path / 'imagenet'
    make_imagenet(str(root), num_train=16, num_val=4, size=(64, 64), progress=False)
    work_dir = tmp_path / 'cls'
    _run(
        [
            sys.executable,
            TOOLS / 'train.py',
            CLS_CONFIG,
            '--work-dir',
            work_dir,
            '--cfg-options',
            *_data_root_options(root),
        ]
    )
    rows = _scalars(work_dir)
    losses = [r['loss'] for r in rows if 'loss' in r]
    assert len(losses) == 6  # 30 iterations, mean over every 5
    assert losses[-1] < 0.6 * losses[0], losses
    (accuracy,) = [r['accuracy/top1'] for r in rows if 'accuracy/top1' in r]
    assert accuracy > 25.0  # 4 balanced classes: chance is 25 %


def test_roi_features_do_not_depend_on_memory_layout():
    """The detector's RoI features are those of its neck maps, whatever their memory layout."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    cfg = Config.fromfile(str(DET_CONFIG))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model).eval()
    rois = torch.tensor([[0, 4.0, 6.0, 40.0, 50.0], [1, 10.0, 0.0, 60.0, 30.0]])
    with torch.no_grad():
        feats = model.neck(model.backbone(torch.randn(2, 3, 64, 64)))
        extractor = model.roi_head.bbox_roi_extractor
        as_given = extractor(feats[: extractor.num_inputs], rois)
        contiguous = extractor(tuple(f.contiguous() for f in feats[: extractor.num_inputs]), rois)
    torch.testing.assert_close(as_given, contiguous)


# ---------------------------------------------------------------------------------------------
# The glue, in process
# ---------------------------------------------------------------------------------------------
def test_replace_sync_bn_nested():
    cfg = dict(
        a=dict(type='SyncBN', requires_grad=True),
        b=[dict(norm_cfg=dict(type='MMSyncBN')), (dict(type='BN'), dict(type='GN'))],
        c='SyncBN',
    )
    assert toolboxes.replace_sync_bn(cfg) == 2
    assert cfg['a'] == dict(type='BN', requires_grad=True)
    assert cfg['b'][0]['norm_cfg']['type'] == 'BN' and cfg['c'] == 'SyncBN'


@NO_CUDA
def test_adapt_to_device_distributed_cpu():
    cfg = Config(
        dict(
            model=dict(head=dict(norm_cfg=dict(type='SyncBN'))),
            sync_bn='torch',
            optim_wrapper=dict(
                type='AmpOptimWrapper',
                loss_scale='dynamic',
                dtype='float16',
                optimizer=dict(type='AdamW'),
            ),
            env_cfg=dict(dist_cfg=dict(backend='nccl')),
        )
    )
    with pytest.warns(UserWarning) as record:
        toolboxes.adapt_to_device(cfg, 'pytorch')
    messages = ' '.join(str(w.message) for w in record)
    for text in (
        '1 SyncBN config(s) replaced by BN for distributed (gloo)',
        'sync_bn',
        'AmpOptimWrapper',
        'gloo backend instead of nccl',
    ):
        assert text in messages
    assert cfg.model.head.norm_cfg.type == 'BN' and cfg.sync_bn is None
    assert dict(cfg.optim_wrapper) == dict(type='OptimWrapper', optimizer=dict(type='AdamW'))
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg.device_ids is None
    assert cfg.model_wrapper_cfg.type == 'MMDistributedDataParallel'


@NO_CUDA
def test_adapt_to_device_single_cpu_keeps_backend():
    cfg = Config(dict(model=dict(norm_cfg=dict(type='SyncBN')), env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    with pytest.warns(UserWarning, match='for non-distributed CPU running'):
        toolboxes.adapt_to_device(cfg, 'none')
    assert cfg.model.norm_cfg.type == 'BN'
    assert cfg.env_cfg.dist_cfg.backend == 'nccl' and 'model_wrapper_cfg' not in cfg


def test_adapt_to_device_nothing_to_do_is_silent():
    cfg = Config(dict(model=dict(norm_cfg=dict(type='BN')), optim_wrapper=dict(type='OptimWrapper')))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        toolboxes.adapt_to_device(cfg, 'none')
    assert cfg.model.norm_cfg.type == 'BN'


def test_bad_scope_and_launcher():
    with pytest.raises(ValueError, match=r"default_scope to one of .* got 'mmocr'"):
        toolboxes.register_scope_modules(Config(dict(default_scope='mmocr')))
    with pytest.raises(ValueError, match=r'default_scope to one of .* got None'):
        toolboxes.register_scope_modules(Config(dict()))
    with pytest.raises(ValueError, match="launcher must be one of .* got 'ray'"):
        toolboxes.adapt_to_device(Config(dict()), 'ray')


def test_train_options():
    args = train_tool.parse_args([str(DET_CONFIG), '--amp', '--resume', '--cfg-options', 'train_cfg.max_iters=7'])
    cfg = train_tool.build_config(args)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper' and cfg.optim_wrapper.loss_scale == 'dynamic'
    assert cfg.resume is True and cfg.load_from is None and cfg.train_cfg.max_iters == 7
    assert cfg.work_dir == os.path.join('./work_dirs', DET_CONFIG.stem)
    args = train_tool.parse_args(
        [
            str(DET_CONFIG),
            '--resume',
            'x.pth',
            '--auto-scale-lr',
            '--work-dir',
            'w',
            '--local-rank',
            '3',
        ]
    )
    cfg = train_tool.build_config(args)
    assert cfg.resume is True and cfg.load_from == 'x.pth' and cfg.work_dir == 'w'
    assert cfg.auto_scale_lr.enable is True and args.local_rank == 3
    args = train_tool.parse_args([str(DET_CONFIG), '--auto-scale-lr', '--cfg-options', 'auto_scale_lr=None'])
    with pytest.raises(ValueError, match='--auto-scale-lr needs auto_scale_lr'):
        train_tool.build_config(args)


def test_test_options():
    cfg = Config.fromfile(str(DET_CONFIG))
    test_tool.enable_visualization(cfg, 'mmdet', False, 'vis', 0.5)
    hook = cfg.default_hooks.visualization
    assert hook.draw is True and hook.test_out_dir == 'vis' and hook.wait_time == 0.5
    test_tool.add_output(cfg, 'mmdet', 'r.pkl')
    assert cfg.test_evaluator[-1] == dict(type='DumpDetResults', out_file_path='r.pkl')
    with pytest.raises(ValueError, match=r'--out must be a .pkl or .pickle file for mmdet'):
        test_tool.add_output(cfg, 'mmdet', 'r.json')
    with pytest.raises(ValueError, match='--tta needs tta_model and tta_pipeline'):
        test_tool.enable_tta(cfg)
    seg = Config.fromfile(str(SEG_CONFIG))
    test_tool.enable_visualization(seg, 'mmseg', False, 'vis', 2)
    assert seg.default_hooks.visualization.draw is True and seg.visualizer.save_dir == 'vis'
    test_tool.add_output(seg, 'mmseg', 'pred')
    assert seg.test_evaluator.output_dir == 'pred' and seg.test_evaluator.keep_results
    test_tool.enable_tta(seg)
    assert seg.model.type == 'SegTTAModel' and seg.model.module.type == 'EncoderDecoder'
    assert seg.test_dataloader.dataset.pipeline[1].type == 'TestTimeAug'
    cls = Config.fromfile(str(CLS_CONFIG))
    test_tool.enable_visualization(cls, 'mmpretrain', False, 'vis', 2)
    assert cls.default_hooks.visualization.enable is True
    assert cls.default_hooks.visualization.out_dir == 'vis'
    test_tool.add_output(cls, 'mmpretrain', 'r.pkl')
    assert cls.test_evaluator[-1] == dict(type='DumpResults', out_file_path='r.pkl')


@pytest.mark.parametrize(
    'script, nargs',
    [('dist_train.sh', 2), ('dist_test.sh', 3), ('slurm_train.sh', 4), ('slurm_test.sh', 4)],
)
def test_scripts_usage(script, nargs):
    proc = subprocess.run(['bash', str(TOOLS / script)], capture_output=True, text=True)
    assert proc.returncode == 2 and 'usage:' in proc.stderr
    assert os.access(TOOLS / script, os.X_OK)


def test_slurm_command_lines(tmp_path):
    """The slurm scripts call srun with the job settings and the train/test tool."""
    fake = tmp_path / 'srun'
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$SRUN_LOG"\n')
    fake.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f'{tmp_path}{os.pathsep}{os.environ["PATH"]}',
        GPUS='16',
        GPUS_PER_NODE='8',
        CPUS_PER_TASK='4',
        SRUN_ARGS='--quotatype=auto',
        SRUN_LOG=str(tmp_path / 'args.txt'),
        PYTHON='python3',
    )
    subprocess.run(
        ['bash', str(TOOLS / 'slurm_train.sh'), 'part', 'job', 'cfg.py', 'wd', '--amp'],
        env=env,
        check=True,
    )
    args = (tmp_path / 'args.txt').read_text().split('\n')[:-1]
    assert args == [
        '-p',
        'part',
        '--job-name=job',
        '--gres=gpu:8',
        '--ntasks=16',
        '--ntasks-per-node=8',
        '--cpus-per-task=4',
        '--kill-on-bad-exit=1',
        '--quotatype=auto',
        'python3',
        '-u',
        str(TOOLS / 'train.py'),
        'cfg.py',
        '--work-dir=wd',
        '--launcher=slurm',
        '--amp',
    ]
    subprocess.run(
        ['bash', str(TOOLS / 'slurm_test.sh'), 'part', 'job', 'cfg.py', 'ck.pth', '--tta'],
        env=env,
        check=True,
    )
    args = (tmp_path / 'args.txt').read_text().split('\n')[:-1]
    assert args[-7:] == [
        'python3',
        '-u',
        str(TOOLS / 'test.py'),
        'cfg.py',
        'ck.pth',
        '--launcher=slurm',
        '--tta',
    ]


def test_demo_configs_inherit_the_real_ones():
    """The demo configs change sizes, not the recipe's structure (and keep our import)."""
    pairs = [
        (
            DEMO / 'mask-rcnn_datpp-demo_fpn_synthetic-coco.py',
            '../detection/mask_rcnn/mask-rcnn_datpp-t_fpn_1x_coco.py',
        ),
        (SEG_CONFIG, '../segmentation/upernet/upernet_datpp-t_8xb2-160k_ade20k-512x512.py'),
        (CLS_CONFIG, '../classification/datpp-t_8xb128_in1k.py'),
    ]
    for path, base in pairs:
        assert f"_base_ = '{base}'" in path.read_text()
        cfg = Config.fromfile(str(path))
        assert cfg.custom_imports.imports == ['projects.dat']
        assert cfg.model.backbone.type == 'DAT' and cfg.model.backbone.arch['version'] == 'pp'
        assert cfg.optim_wrapper.type == 'OptimWrapper'
        assert not cfg.model.backbone.get('with_cp', False)
