"""End-to-end CPU demo: train and evaluate a DAT++ Mask R-CNN on synthetic shapes.

Steps (each prints its progress):

1. write a synthetic COCO-format dataset (circles, rectangles, triangles; see
   ``projects/dat/synthetic.py``) into ``OUT/data``;
2. evaluate the untrained model (COCO bbox + segm AP), as a baseline;
3. train ``configs/demo/mask-rcnn_datpp-demo_fpn_synthetic-coco.py`` (the real DAT++ Mask
   R-CNN config with a reduced backbone, 160x160 images) and evaluate it the same way;
4. save pictures: ground truth | detections on validation images, the loss curve, and the
   deformable sampling points of the backbone;
5. write ``OUT/report.md`` and ``OUT/metrics.json``.

Usage::

    python tools/demo.py                     # about 10 minutes on 2 CPU cores
    python tools/demo.py --iters 100 --out-dir outputs/demo_quick

Re-running replaces the previous outputs.
"""

import argparse
import copy
import json
import math
import os
import os.path as osp
import shutil
import subprocess
import sys
import time

import numpy as np
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.runner import Runner

from projects.dat.synthetic import COCO_CLASSES, make_coco
from projects.dat.toolboxes import prepare

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))

DEFAULT_CONFIG = osp.join(ROOT, 'configs', 'demo', 'mask-rcnn_datpp-demo_fpn_synthetic-coco.py')
POINTS_TOOL = osp.join(ROOT, 'tools', 'visualization', 'vis_deformable_points.py')
METRIC_KEYS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'segm_mAP', 'segm_mAP_50', 'segm_mAP_75')


def log(msg: str) -> None:
    print(f'[demo] {msg}', flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default=DEFAULT_CONFIG, help='demo config')
    parser.add_argument(
        '--out-dir',
        default=osp.join(ROOT, 'outputs', 'demo'),
        help='where data, checkpoints, pictures and the report go (replaced on every run)',
    )
    parser.add_argument(
        '--iters',
        type=int,
        default=None,
        help="training iterations (default: the config's max_iters)",
    )
    parser.add_argument('--num-train', type=int, default=200, help='synthetic training images')
    parser.add_argument('--num-val', type=int, default=50, help='synthetic validation images')
    parser.add_argument('--num-pictures', type=int, default=8, help='validation images drawn with their detections')
    parser.add_argument('--seed', type=int, default=0, help='data and training seed')
    args = parser.parse_args(argv)
    for name in ('iters', 'num_train', 'num_val'):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f'--{name.replace("_", "-")} must be >= 1, got {value}')
    return args


def build_config(args: argparse.Namespace, data_root: str, work_dir: str) -> Config:
    """The demo config pointed at the generated data, with validation left to ``test()``."""
    cfg = Config.fromfile(args.config)
    if args.iters is not None:
        cfg.train_cfg.max_iters = args.iters
        cfg.default_hooks.checkpoint.interval = args.iters
        ends = [s for s in cfg.param_scheduler if s.get('type') == 'MultiStepLR']
        for sched in ends:
            sched.end = args.iters
            sched.milestones = [int(args.iters * 0.8)]
    data_root = data_root.rstrip('/') + '/'
    for loader in (cfg.train_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = data_root
    cfg.test_evaluator.ann_file = osp.join(data_root, 'annotations', 'instances_val2017.json')
    # Evaluate once, after training, through runner.test() (whose metrics come back to us).
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.train_cfg.pop('val_interval', None)
    cfg.work_dir = work_dir
    cfg.randomness = dict(seed=args.seed)
    cfg.default_hooks.visualization = dict(type='DetVisualizationHook')
    cfg.visualizer.pop('name', None)  # one visualizer per runner, named after its experiment
    prepare(cfg, 'none')
    return cfg


def coco_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(metrics[f'coco/{k}']) for k in METRIC_KEYS if f'coco/{k}' in metrics}


def evaluate_untrained(cfg: Config) -> dict[str, float]:
    """COCO metrics of the model as initialised for training (same seed, no training)."""
    cfg = copy.deepcopy(cfg)
    cfg.experiment_name = f'untrained_{time.strftime("%Y%m%d_%H%M%S")}'
    runner = Runner.from_cfg(cfg)
    runner.model.init_weights()
    return coco_metrics(runner.test())


def read_losses(log_dir: str) -> list[dict]:
    """The logged training scalars (``vis_data/scalars.json``) of one run."""
    path = osp.join(log_dir, 'vis_data', 'scalars.json')
    if not osp.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if 'loss' in r and 'iter' in r]


def save_loss_curve(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    iters = [r['iter'] for r in rows]
    for key in ('loss', 'loss_rpn_cls', 'loss_cls', 'loss_bbox', 'loss_mask'):
        if all(key in r for r in rows):
            ax.plot(iters, [r[key] for r in rows], label=key, lw=2 if key == 'loss' else 1)
    ax.set_xlabel('iteration')
    ax.set_ylabel('loss')
    ax.set_title('DAT++ Mask R-CNN on synthetic shapes')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_detections(runner: Runner, out_dir: str, num: int) -> list[str]:
    """Draw ground truth | predictions (score >= 0.5) for the first ``num`` val images."""
    import mmcv

    os.makedirs(out_dir, exist_ok=True)
    dataset = runner.test_dataloader.dataset
    visualizer = runner.visualizer  # the config's DetLocalVisualizer
    visualizer.dataset_meta = dataset.metainfo
    model = runner.model
    model.eval()
    paths, tiles = [], []
    for idx in range(min(num, len(dataset))):
        with torch.no_grad():
            sample = model.test_step(pseudo_collate([dataset[idx]]))[0]
        image = mmcv.imread(sample.img_path, channel_order='rgb')
        name = osp.splitext(osp.basename(sample.img_path))[0]
        path = osp.join(out_dir, f'{name}.png')
        visualizer.add_datasample(name, image, sample, draw_gt=True, draw_pred=True, pred_score_thr=0.5, out_file=path)
        tiles.append(mmcv.imread(path))  # BGR, as mmcv.imwrite expects
        paths.append(path)
    if tiles:
        cols = 2
        rows = math.ceil(len(tiles) / cols)
        h, w = tiles[0].shape[:2]
        grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
        for i, tile in enumerate(tiles):
            r, c = divmod(i, cols)
            grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile[:h, :w]
        grid_path = osp.join(osp.dirname(out_dir), 'detections_grid.png')
        mmcv.imwrite(grid, grid_path, auto_mkdir=True)
        paths.insert(0, grid_path)
    return paths


def save_sampling_points(config: str, checkpoint: str, image: str, out_dir: str, size: tuple) -> list[str]:
    """Deformable sampling points via ``tools/visualization/vis_deformable_points.py``.

    One picture for the deformable block of stage 1 and one for the last block (stage 3).
    """
    if not osp.exists(POINTS_TOOL):
        log(f'skipping the sampling-point pictures: {osp.relpath(POINTS_TOOL, ROOT)} is missing')
        return []
    paths = []
    for block in ('stages.1.blocks.1.attn', 'stages.3.blocks.1.attn'):
        out = osp.join(out_dir, f'sampling_points_{block.replace(".", "_")}.png')
        cmd = [
            sys.executable,
            POINTS_TOOL,
            image,
            '--config',
            config,
            '--checkpoint',
            checkpoint,
            '--block',
            block,
            '--size',
            *map(str, size),
            '--out',
            out,
        ]
        log('  ' + ' '.join(osp.relpath(c, ROOT) if osp.isabs(c) else c for c in cmd))
        subprocess.run(cmd, check=True, cwd=ROOT)
        paths.append(out)
    return paths


def write_report(path: str, info: dict) -> None:
    m_u, m_t = info['metrics_untrained'], info['metrics_trained']
    lines = [
        '# DAT++ Mask R-CNN demo on synthetic shapes (CPU)',
        '',
        f'Generated by `python tools/demo.py` on {info["date"]} '
        f'({info["threads"]} torch threads, torch {torch.__version__}).',
        '',
        '## Setup',
        '',
        f'- config: `{info["config"]}`',
        f'- backbone: DAT++ `{info["arch"]}`, {info["params_backbone"] / 1e6:.2f}M parameters '
        f'(whole detector {info["params_total"] / 1e6:.2f}M), trained from scratch',
        f'- data: synthetic COCO, {info["num_train"]} train / {info["num_val"]} val images of '
        f'{info["img_size"]}, classes {", ".join(COCO_CLASSES)}',
        f'- training: {info["iters"]} iterations, batch {info["batch_size"]}, {info["optimizer"]}',
        '',
        '## Time',
        '',
        f'- data generation: {info["time_data"]:.1f} s',
        f'- untrained evaluation: {info["time_eval_untrained"]:.1f} s',
        f'- training: {info["time_train"]:.1f} s ({info["time_train"] / info["iters"]:.2f} s/iter)',
        f'- trained evaluation: {info["time_eval_trained"]:.1f} s',
        f'- total: {info["time_total"]:.1f} s',
        '',
        '## Loss',
        '',
    ]
    if info['losses']:
        first, last = info['losses'][0], info['losses'][-1]
        lines.append(
            f'- iteration {first["iter"]}: loss {first["loss"]:.3f}; iteration '
            f'{last["iter"]}: loss {last["loss"]:.3f} (logged means over '
            f'{info["log_window"]} iterations)'
        )
    else:
        lines.append('- no training loss was logged')
    lines += [
        '',
        '## COCO metrics on the validation images',
        '',
        '| model | ' + ' | '.join(METRIC_KEYS) + ' |',
        '|---|' + '---|' * len(METRIC_KEYS),
    ]
    for name, m in (('untrained', m_u), ('trained', m_t)):
        lines.append(f'| {name} | ' + ' | '.join(f'{m.get(k, float("nan")):.3f}' for k in METRIC_KEYS) + ' |')
    lines += ['', '## Pictures', '']
    lines += [f'- `{osp.relpath(p, osp.dirname(path))}`' for p in info['pictures']]
    lines += ['', f'Checkpoint: `{osp.relpath(info["checkpoint"], osp.dirname(path))}`', '']
    with open(path, 'w') as f:
        f.write('\n'.join(lines))


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    out_dir = osp.abspath(args.out_dir)
    data_root = osp.join(out_dir, 'data')
    work_dir = osp.join(out_dir, 'work_dir')
    pictures_dir = osp.join(out_dir, 'pictures')
    for path in (data_root, work_dir, pictures_dir):
        shutil.rmtree(path, ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)

    log(f'1/5 writing {args.num_train} + {args.num_val} synthetic COCO images to {data_root}')
    cfg = Config.fromfile(args.config)
    img_size = tuple(cfg.get('img_scale', (160, 160)))
    t0 = time.time()
    make_coco(data_root, num_train=args.num_train, num_val=args.num_val, size=img_size, seed=args.seed)
    print(flush=True)
    time_data = time.time() - t0

    cfg = build_config(args, data_root, work_dir)
    iters = cfg.train_cfg.max_iters
    log('2/5 evaluating the untrained model (baseline)')
    t0 = time.time()
    metrics_untrained = evaluate_untrained(cfg)
    time_eval_untrained = time.time() - t0
    log(f'untrained: {metrics_untrained}')

    log(f'3/5 training for {iters} iterations (batch {cfg.train_dataloader.batch_size})')
    cfg_train = copy.deepcopy(cfg)
    cfg_train.experiment_name = f'train_{time.strftime("%Y%m%d_%H%M%S")}'
    runner = Runner.from_cfg(cfg_train)
    t0 = time.time()
    runner.train()
    time_train = time.time() - t0
    t0 = time.time()
    metrics_trained = coco_metrics(runner.test())
    time_eval_trained = time.time() - t0
    log(f'trained: {metrics_trained}')
    checkpoint = osp.join(work_dir, f'iter_{iters}.pth')

    log('4/5 saving pictures')
    pictures = save_detections(runner, osp.join(pictures_dir, 'detections'), args.num_pictures)
    losses = read_losses(runner.log_dir)
    if losses:
        save_loss_curve(losses, osp.join(pictures_dir, 'loss_curve.png'))
        pictures.append(osp.join(pictures_dir, 'loss_curve.png'))
    first_val = runner.test_dataloader.dataset[0]['data_samples'].img_path
    pictures += save_sampling_points(osp.abspath(args.config), checkpoint, first_val, pictures_dir, img_size)

    log('5/5 writing the report')
    model = runner.model
    info = dict(
        date=time.strftime('%Y-%m-%d %H:%M'),
        threads=torch.get_num_threads(),
        config=osp.relpath(osp.abspath(args.config), ROOT),
        arch=json.dumps(cfg.model.backbone.arch)
        if isinstance(cfg.model.backbone.arch, dict)
        else cfg.model.backbone.arch,
        params_backbone=sum(p.numel() for p in model.backbone.parameters()),
        params_total=sum(p.numel() for p in model.parameters()),
        num_train=args.num_train,
        num_val=args.num_val,
        img_size=f'{img_size[0]}x{img_size[1]}',
        iters=iters,
        batch_size=cfg.train_dataloader.batch_size,
        optimizer=f'{cfg.optim_wrapper.optimizer.type} lr {cfg.optim_wrapper.optimizer.lr}',
        time_data=time_data,
        time_eval_untrained=time_eval_untrained,
        time_train=time_train,
        time_eval_trained=time_eval_trained,
        time_total=time.time() - t_start,
        losses=losses,
        log_window=cfg.log_processor.get('window_size', 10),
        metrics_untrained=metrics_untrained,
        metrics_trained=metrics_trained,
        pictures=pictures,
        checkpoint=checkpoint,
    )
    write_report(osp.join(out_dir, 'report.md'), info)
    with open(osp.join(out_dir, 'metrics.json'), 'w') as f:
        json.dump({k: v for k, v in info.items() if k != 'losses'}, f, indent=2)
    log(
        f'done in {info["time_total"]:.0f} s: bbox AP {metrics_untrained.get("bbox_mAP", 0):.3f} '
        f'(untrained) -> {metrics_trained.get("bbox_mAP", 0):.3f} (trained); '
        f'report: {osp.join(out_dir, "report.md")}'
    )
    return info


if __name__ == '__main__':
    main()
