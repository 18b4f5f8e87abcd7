"""Evaluate a checkpoint of a DAT detector, segmenter or classifier.

The config's ``default_scope`` ('mmdet', 'mmseg' or 'mmpretrain') picks the toolbox.
Examples::

    python tools/test.py CONFIG CHECKPOINT
    python tools/test.py CONFIG CHECKPOINT --show-dir vis --out results.pkl
    python tools/test.py SEG_CONFIG CHECKPOINT --tta      # multi-scale + flip (tta_model)
    tools/dist_test.sh CONFIG CHECKPOINT 8

The runner is the config's ``runner_type`` (ours: ``DATRunner``) or else ``DATRunner``, which
checks the dataset paths of ``test_dataloader`` before the dataset is built or the checkpoint
is loaded (:mod:`projects.dat.runner`).

``--out``: mmdet and mmpretrain dump the predictions to a ``.pkl`` file; mmseg writes the
predicted label maps (PNG) into the given folder (its ``IoUMetric.output_dir``).
"""

import argparse
import os.path as osp

from mmengine.config import Config, ConfigDict, DictAction

from projects.dat.toolboxes import LAUNCHERS, build_runner, prepare


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test a model of mmdet, mmseg or mmpretrain')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save the evaluation logs and metrics')
    parser.add_argument(
        '--out',
        help='dump predictions: a .pkl file (mmdet, mmpretrain) or a folder of PNG label maps (mmseg)',
    )
    parser.add_argument('--show', action='store_true', help='show predictions in a window')
    parser.add_argument(
        '--show-dir',
        help='save pictures of the predictions into this folder (relative paths are inside work_dir/<timestamp>)',
    )
    parser.add_argument('--wait-time', type=float, default=2, help='seconds per shown image')
    parser.add_argument(
        '--tta',
        action='store_true',
        help="test-time augmentation with the config's tta_model and "
        'tta_pipeline (e.g. multi-scale + flip for segmentation)',
    )
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config settings, key=value')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None)
    return parser.parse_args(argv)


def enable_visualization(cfg: Config, scope: str, show: bool, show_dir, wait_time: float) -> None:
    """Switch on the toolbox's visualisation hook (``default_hooks.visualization``)."""
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise ValueError(
            '--show/--show-dir need default_hooks.visualization in the config '
            f'(the {scope} visualization hook), but the config has none'
        )
    hook['show'] = show
    hook['wait_time'] = wait_time
    if scope == 'mmpretrain':
        hook['enable'] = True
        if show_dir:
            hook['out_dir'] = show_dir
        return
    hook['draw'] = True
    if show_dir and scope == 'mmdet':
        hook['test_out_dir'] = show_dir
    elif show_dir:  # mmseg's hook saves through the visualizer's backends
        cfg.visualizer['save_dir'] = show_dir


def add_output(cfg: Config, scope: str, out: str) -> None:
    """Make the test loop dump its predictions (see the module docstring)."""
    if scope == 'mmseg':
        evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
        for evaluator in evaluators:
            evaluator['output_dir'] = out
            evaluator['keep_results'] = True
        return
    if not out.endswith(('.pkl', '.pickle')):
        raise ValueError(f'--out must be a .pkl or .pickle file for {scope}, got {out!r}')
    dump = dict(type='DumpDetResults' if scope == 'mmdet' else 'DumpResults', out_file_path=out)
    evaluators = cfg.test_evaluator
    cfg.test_evaluator = (list(evaluators) if isinstance(evaluators, (list, tuple)) else [evaluators]) + [dump]


def enable_tta(cfg: Config) -> None:
    """Wrap the model in ``cfg.tta_model`` and test with ``cfg.tta_pipeline``."""
    if 'tta_model' not in cfg or 'tta_pipeline' not in cfg:
        raise ValueError(
            '--tta needs tta_model and tta_pipeline in the config; '
            f'found tta_model={"tta_model" in cfg}, tta_pipeline={"tta_pipeline" in cfg}'
        )
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    scope = prepare(cfg, args.launcher, args.local_rank)
    if args.show or args.show_dir:
        enable_visualization(cfg, scope, args.show, args.show_dir, args.wait_time)
    if args.tta:
        enable_tta(cfg)
    if args.out is not None:
        add_output(cfg, scope, args.out)
    runner = build_runner(cfg)
    runner.test()


if __name__ == '__main__':
    main()
