"""Train a DAT detector, segmenter or classifier from a config.

The config's ``default_scope`` ('mmdet', 'mmseg' or 'mmpretrain') picks the toolbox; the
``custom_imports`` of our configs import ``projects.dat``. Examples::

    python tools/train.py configs/detection/mask_rcnn/mask-rcnn_datpp-t_fpn_1x_coco.py
    tools/dist_train.sh CONFIG 8 --amp          # torchrun, 8 processes
    python tools/train.py CONFIG --resume       # resume from the latest checkpoint

Without CUDA the same configs run on CPU (SyncBN -> BN, gloo for several processes). The runner
is the config's ``runner_type`` (ours: ``DATRunner``) or else ``DATRunner``, which checks the
dataset paths of ``train_dataloader`` and ``val_dataloader`` before any dataset is built
(:mod:`projects.dat.runner`).
"""

import argparse
import os.path as osp

from mmengine.config import Config, DictAction

from projects.dat.toolboxes import LAUNCHERS, build_runner, prepare


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a model of mmdet, mmseg or mmpretrain')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and checkpoints')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from this checkpoint, or (no value) from the latest checkpoint in the work dir',
    )
    parser.add_argument(
        '--amp',
        action='store_true',
        help='automatic mixed precision (AmpOptimWrapper, dynamic loss scale)',
    )
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the lr by the actual batch size over auto_scale_lr.base_batch_size',
    )
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, key=value (e.g. train_cfg.max_iters=10 model.backbone.with_cp=False)',
    )
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    # torch.distributed.launch passes --local-rank (torch >= 2.0) or --local_rank.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None)
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """The config with the command-line options applied."""
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        if cfg.optim_wrapper.get('type', 'OptimWrapper') == 'AmpOptimWrapper':
            print('AMP is already enabled in the config', flush=True)
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        scale = cfg.get('auto_scale_lr')
        if not scale or 'base_batch_size' not in scale:
            raise ValueError(
                f'--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=...) in the config, got {scale!r}'
            )
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    return cfg


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = build_config(args)
    prepare(cfg, args.launcher, args.local_rank)
    runner = build_runner(cfg)
    runner.train()


if __name__ == '__main__':
    main()
