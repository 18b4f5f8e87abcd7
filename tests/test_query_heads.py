"""Tests of the DAT++ configs with query-based heads (issue 21): DINO (4- and 5-scale) and
Mask2Former (COCO instance and panoptic, ADE20K semantic).

- Each config equals the mmdet / mmseg config it follows, field by field, except the lines
  that put the DAT++ backbone in (backbone, its channels into the neck or head, the
  optimiser's backbone keys, our import, runner and checkpoint hook).
- Every config's model builds; the channels of the backbone outputs it uses reach
  ChannelMapper / the pixel decoder (a forward through the neck proves it); the metafile's
  parameter counts are those of the built models.
- The optimiser: every backbone parameter at 0.1 x lr, no weight decay on the backbone's norms
  and bias tables, weight decay on its other weights; every other parameter exactly as the
  toolbox's config sets it.
- One reduced copy per head family (DINO, Mask2Former instance, Mask2Former semantic), derived
  from the full DAT-T++ config by the changes listed in ``REDUCTIONS`` (each with its reason;
  a test checks that nothing else differs), trains for a few iterations on the synthetic
  COCO / ADE20K datasets (``projects/dat/synthetic.py``) with finite losses and is evaluated
  with the configs' own metric (CocoMetric, IoUMetric).
- Panoptic: panopticapi, which mmdet's panoptic annotation loading and metric import, is not
  served by any package registry here; the panoptic models run a training step and a
  prediction on samples made in memory, and the file loading and the metric run only where
  panopticapi is installed.
"""

import copy
import importlib.util
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mmengine.config import Config, ConfigDict
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from test_configs import DIMS, NO_DECAY_KEYS, QUERY_HEADS, _cpu_model_cfg, build_model, check_backbone, load, task_of

from projects.dat.synthetic import ADE20K_CLASSES, COCO_CLASSES, make_ade20k, make_coco

REPO = Path(__file__).resolve().parents[1]

# The toolbox config each one follows (for the head, the data, the optimiser and the schedule).
FOLLOWS = {
    'dino-4scale_datpp-t_8xb2-12e_coco.py': 'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py',
    'dino-4scale_datpp-s_8xb2-12e_coco.py': 'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py',
    'dino-4scale_datpp-t_8xb2-24e_coco.py': 'mmdet::dino/dino-4scale_r50_8xb2-24e_coco.py',
    'dino-4scale_datpp-s_8xb2-24e_coco.py': 'mmdet::dino/dino-4scale_r50_8xb2-24e_coco.py',
    'dino-5scale_datpp-t_8xb2-12e_coco.py': 'mmdet::dino/dino-5scale_swin-l_8xb2-12e_coco.py',
    'dino-5scale_datpp-s_8xb2-12e_coco.py': 'mmdet::dino/dino-5scale_swin-l_8xb2-12e_coco.py',
    'mask2former_datpp-t_8xb2-lsj-50e_coco.py': 'mmdet::mask2former/mask2former_r50_8xb2-lsj-50e_coco.py',
    'mask2former_datpp-s_8xb2-lsj-50e_coco.py': 'mmdet::mask2former/mask2former_r50_8xb2-lsj-50e_coco.py',
    'mask2former_datpp-t_8xb2-lsj-50e_coco-panoptic.py': (
        'mmdet::mask2former/mask2former_r50_8xb2-lsj-50e_coco-panoptic.py'
    ),
    'mask2former_datpp-s_8xb2-lsj-50e_coco-panoptic.py': (
        'mmdet::mask2former/mask2former_r50_8xb2-lsj-50e_coco-panoptic.py'
    ),
    'mask2former_datpp-t_8xb2-160k_ade20k-512x512.py': 'mmseg::mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py',
    'mask2former_datpp-s_8xb2-160k_ade20k-512x512.py': 'mmseg::mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py',
    'mask2former_datpp-b_8xb2-160k_ade20k-640x640.py': (
        'mmseg::mask2former/mask2former_swin-b-in1k-384x384-pre_8xb2-160k_ade20k-640x640.py'
    ),
}
# What our configs change in the config they follow (dotted paths; a path covers its subtree).
OUR_LINES = (
    'custom_imports',
    'runner_type',
    'default_hooks.checkpoint.type',
    'model.backbone',
    'model.neck.in_channels',
    'model.panoptic_head.in_channels',
    'model.decode_head.in_channels',
    'optim_wrapper.paramwise_cfg.custom_keys',
    # the backbone keys come from configs/_base_/datpp_query_heads.py
    'datpp_depths',
    'datpp_backbone_no_decay',
    'datpp_backbone_keys',
    'datpp_mask2former_keys',
    # mmdet's DINO says base_batch_size only; ours says enable=False as all our configs (the default)
    'auto_scale_lr.enable',
    # the panoptic PNG folders that mmdet's Mask2Former instance config keeps and never reads
    'train_dataloader.dataset.data_prefix.seg',
    'val_dataloader.dataset.data_prefix.seg',
    'test_dataloader.dataset.data_prefix.seg',
)
# The Swin-L weights that mmdet's 5-scale config names as a top-level variable (its backbone's).
FOLLOWED_BACKBONE_LINES = ('pretrained',)


def head_family(name: str) -> str:
    return QUERY_HEADS[name][2]


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
    """A config tree as {dotted path: leaf}; list items are numbered."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: tree}
    flat = {}
    for key, value in items:
        path = f'{prefix}.{key}' if prefix else str(key)
        sub = flatten(value, path)
        flat.update(sub if sub else {path: value})  # keep empty dicts and lists as leaves
    return flat


def differing_paths(a: dict, b: dict) -> set[str]:
    fa, fb = flatten(a), flatten(b)
    return {k for k in fa.keys() | fb.keys() if fa.get(k, '<absent>') != fb.get(k, '<absent>')}


def covered(path: str, prefixes) -> bool:
    return any(path == p or path.startswith(p + '.') for p in prefixes)


@cache
def followed(name: str) -> Config:
    """The toolbox config ``name`` follows, read from the installed package's ``.mim/configs``."""
    package, relative = FOLLOWS[name].split('::')
    return Config.fromfile(Path(importlib.util.find_spec(package).origin).parent / '.mim' / 'configs' / relative)


def mmdet_or_mmseg_dict(cfg: Config) -> dict:
    """The config as a plain dict, without the scope markers mmengine adds to ``mm*::`` bases."""

    def strip(tree):
        if isinstance(tree, dict):
            return {k: strip(v) for k, v in tree.items() if k != '_scope_'}
        if isinstance(tree, (list, tuple)):
            return [strip(v) for v in tree]
        return tree

    return strip(cfg.to_dict())


# ---------------------------------------------------------------------------------------------
# Recipes: the followed config, except our lines
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('name', sorted(QUERY_HEADS))
def test_config_is_the_followed_one_with_a_datpp_backbone(name):
    arch, drop_path, family = QUERY_HEADS[name]
    cfg = load(name)
    reference = followed(name)
    allowed = OUR_LINES + (FOLLOWED_BACKBONE_LINES if 'swin' in FOLLOWS[name] else ())
    extra = sorted(
        p for p in differing_paths(mmdet_or_mmseg_dict(cfg), mmdet_or_mmseg_dict(reference)) if not covered(p, allowed)
    )
    assert not extra, f'{name} differs from {FOLLOWS[name]} beyond the DAT++ lines: {extra[:10]}'

    # our lines
    imports = ['projects.dat', 'mmdet.models'] if family == 'mask2former-semantic' else ['projects.dat']
    assert cfg.custom_imports == dict(imports=imports, allow_failed_imports=False)
    assert cfg.runner_type == 'DATRunner' and cfg.default_hooks.checkpoint.type == 'AtomicCheckpointHook'
    five_scale = name.startswith('dino-5scale')
    out_indices = (1, 2, 3) if name.startswith('dino-4scale') else (0, 1, 2, 3)
    check_backbone(cfg.model.backbone, arch, drop_path, True, out_indices)
    channels = [DIMS[arch][i] for i in out_indices]
    if family == 'dino':
        assert cfg.model.neck.type == 'ChannelMapper' and cfg.model.neck.in_channels == channels
        assert cfg.model.neck.num_outs == cfg.model.get('num_feature_levels', 4) == (5 if five_scale else 4)
    elif family == 'mask2former-semantic':
        assert cfg.model.decode_head.in_channels == channels
    else:
        assert cfg.model.panoptic_head.in_channels == channels
    keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
    reference_keys = reference.optim_wrapper.paramwise_cfg.get('custom_keys', {})
    assert keys['backbone'] == dict(lr_mult=0.1, decay_mult=1.0)
    assert reference_keys['backbone']['lr_mult'] == 0.1
    # the followed config's keys outside the backbone are kept, a Swin base's backbone keys go
    for key, rule in reference_keys.items():
        if key in ('query_embed', 'query_feat', 'level_embed'):
            assert keys[key] == rule
    assert not {'absolute_pos_embed', 'relative_position_bias_table', 'backbone.patch_embed.norm'} & set(keys)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def _neck_inputs(model, image_size: int = 64) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model.backbone(torch.zeros(1, 3, image_size, image_size)))


def _same_model_groups() -> list[tuple[str, ...]]:
    """The configs grouped by equal ``model`` settings (the 12- and 24-epoch DINO configs share
    theirs): one build checks a group."""
    groups: dict[str, list[str]] = {}
    for name in sorted(QUERY_HEADS):
        groups.setdefault(repr(load(name).model.to_dict()), []).append(name)
    return [tuple(names) for names in groups.values()]


@pytest.mark.parametrize(
    'names', _same_model_groups(), ids=lambda names: '+'.join(n.removesuffix('.py') for n in names)
)
def test_model_builds_and_backbone_channels_reach_the_neck(names):
    name = names[0]
    arch, drop_path, family = QUERY_HEADS[name]
    model = build_model(name)
    backbone = model.backbone
    assert type(backbone).__name__ == 'DAT' and backbone.num_features == DIMS[arch]
    assert math.isclose(backbone.drop_path_rate, drop_path) and backbone.with_cp
    model.eval()
    features = _neck_inputs(model)
    channels = [f.shape[1] for f in features]
    if family == 'dino':
        assert [conv.conv.in_channels for conv in model.neck.convs] == channels
        with torch.no_grad():
            levels = model.neck(tuple(features))
        assert len(levels) == model.num_feature_levels
        strides = [64 // level.shape[-1] for level in levels]
        assert strides == ([4, 8, 16, 32, 64] if len(levels) == 5 else [8, 16, 32, 64])
    else:
        head = model.decode_head if family == 'mask2former-semantic' else model.panoptic_head
        decoder = head.pixel_decoder
        # strides 8-32 into the deformable encoder (last first), stride 4 into the lateral conv
        assert [conv.conv.in_channels for conv in decoder.input_convs] == channels[:0:-1]
        assert decoder.lateral_convs[0].conv.in_channels == channels[0]
        with torch.no_grad():
            mask_features, multi_scale = decoder(features)
        assert mask_features.shape[1] == head.pixel_decoder.mask_feature.out_channels
        assert len(multi_scale) == head.num_transformer_feat_level
    # the metafile lists the parameters of this model, for every config of the group
    meta = yaml.safe_load((REPO / 'configs' / task_of(name) / 'metafile.yml').read_text())
    for config in names:
        (entry,) = [m for m in meta['Models'] if m['Name'] + '.py' == config]
        assert entry['Metadata']['Parameters'] == sum(p.numel() for p in model.parameters()), config
        assert 'Results' not in entry and 'Converted From' not in entry  # nothing published or released


def _param_rules(model, optim_wrapper_cfg: ConfigDict, scope: str) -> dict[str, tuple[float, float]]:
    """{parameter name: (lr, weight decay)} of the optimiser a config builds for ``model``."""
    ow_cfg = copy.deepcopy(optim_wrapper_cfg)
    with DefaultScope.overwrite_default_scope(scope):
        optim_wrapper = build_optim_wrapper(model, ow_cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    rules = {}
    for group in optim_wrapper.optimizer.param_groups:
        for p in group['params']:
            rules[names[id(p)]] = (group['lr'], group['weight_decay'])
    assert len(rules) == len(names)
    return rules


# One config per followed toolbox config family (the others share their optim_wrapper).
OPTIMISER_CASES = [
    'dino-4scale_datpp-t_8xb2-12e_coco.py',
    'mask2former_datpp-t_8xb2-lsj-50e_coco-panoptic.py',
    'mask2former_datpp-t_8xb2-160k_ade20k-512x512.py',
    'mask2former_datpp-b_8xb2-160k_ade20k-640x640.py',
]


@pytest.mark.parametrize('name', OPTIMISER_CASES)
def test_optimiser_rules(name):
    cfg = load(name)
    scope = 'mmseg' if task_of(name) == 'segmentation' else 'mmdet'
    model = build_model(name, reduced_model_cfg(name))  # same parameter names, fewer of them
    ours = _param_rules(model, cfg.optim_wrapper, scope)
    toolbox = _param_rules(model, followed(name).optim_wrapper, scope)
    lr, wd = cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.optimizer.weight_decay
    no_decay_modules = {
        n for n, m in model.backbone.named_modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))
    }
    seen = {'rpe_table': 0, 'rpb': 0, 'norm': 0, 'conv_offset': 0}
    for param_name, (param_lr, param_wd) in ours.items():
        if not param_name.startswith('backbone.'):
            assert (param_lr, param_wd) == toolbox[param_name], param_name
            continue
        assert math.isclose(param_lr, 0.1 * lr), param_name
        module = param_name.removeprefix('backbone.').rsplit('.', 1)[0]
        table = param_name.rsplit('.', 1)[-1] in ('rpe_table', 'rpb')
        if table or module in no_decay_modules:
            assert param_wd == 0.0, f'{param_name} is weight-decayed'
            seen[next(k for k in seen if k in param_name)] += 1
        else:
            assert param_wd == wd, param_name
    assert all(seen.values()), seen
    assert all(
        any(key in n for key in NO_DECAY_KEYS) or 'conv_offset' in n
        for n, (_, w) in ours.items()
        if n.startswith('backbone.') and w == 0.0
    )


# ---------------------------------------------------------------------------------------------
# Reduced copies
# ---------------------------------------------------------------------------------------------
# The demo's reduced DAT++ (configs/demo): the DAT-T++ block pattern at a fraction of its size.
DEMO_ARCH = dict(
    version='pp', dims=[32, 64, 128, 256], heads=[1, 2, 4, 8], groups=[1, 1, 2, 4], stage_spec=['ND', 'ND', 'ND', 'DD']
)
# Every image size of a full config times this: 1024 LSJ crops -> 128, 512 crops -> 64,
# DINO's 480..800 short sides -> 60..100.
SIZE_FACTOR = 1 / 8
SIZE_KEYS = ('scale', 'scales', 'crop_size', 'size', 'max_size', 'image_size')
ADE_CLASSES = 5  # make_ade20k's default: the first 5 ADE20K classes
NUM_ITERS = 4  # the fewest that show finite losses over several steps on CPU
# The full config each family's reduced copy is derived from.
REDUCED_FROM = {
    'dino': 'dino-4scale_datpp-t_8xb2-12e_coco.py',
    'mask2former-instance': 'mask2former_datpp-t_8xb2-lsj-50e_coco.py',
    'mask2former-panoptic': 'mask2former_datpp-t_8xb2-lsj-50e_coco-panoptic.py',
    'mask2former-semantic': 'mask2former_datpp-t_8xb2-160k_ade20k-512x512.py',
}
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


@dataclass(frozen=True)
class Reduction:
    """A line in which a reduced copy differs from its full config, and why."""

    path: str
    value: Any
    why: str


def _backbone(head_in_channels: str, outputs: slice) -> list[Reduction]:
    return [
        Reduction('model.backbone.arch', DEMO_ARCH, 'the demo DAT++: seconds per iteration on CPU'),
        Reduction('model.backbone.with_cp', False, 'checkpointing trades time for memory, changes no number'),
        Reduction('model.backbone.init_cfg', None, 'no ImageNet weights in the tests'),
        Reduction(head_in_channels, DEMO_ARCH['dims'][outputs], "the demo DAT++'s channels"),
    ]


def _mask2former_head(head: str) -> list[Reduction]:
    return [
        Reduction(f'model.{head}.num_queries', 20, 'a few objects per 128 px image'),
        Reduction(f'model.{head}.transformer_decoder.num_layers', 3, 'one decoder layer per feature level'),
        Reduction(f'model.{head}.pixel_decoder.encoder.num_layers', 1, 'CPU seconds'),
    ]


def _classes(paths: tuple[str, ...], weight_path: str, num_classes: int) -> list[Reduction]:
    why = "the synthetic dataset's classes"
    return [
        *[Reduction(path, num_classes, why) for path in paths],
        # the full configs' weights: 1 per class, 0.1 for "no object"
        Reduction(weight_path, [1.0] * num_classes + [0.1], why),
    ]


def _data(root: str, classes: tuple[str, ...], coco: bool) -> list[Reduction]:
    lines = [Reduction('randomness', dict(seed=0), 'a fixed seed')]
    for loader in LOADERS:
        lines += [
            Reduction(f'{loader}.dataset.data_root', root, 'the synthetic dataset (same layout)'),
            Reduction(f'{loader}.dataset.metainfo', dict(classes=classes), "the synthetic dataset's classes"),
            Reduction(f'{loader}.num_workers', 0, 'loading in the test process: 2 cores'),
            Reduction(f'{loader}.persistent_workers', False, 'goes with num_workers=0'),
        ]
    if coco:
        ann_file = f'{root}annotations/instances_val2017.json'
        lines += [
            Reduction(f'{name}.ann_file', ann_file, 'the synthetic dataset')
            for name in ('val_evaluator', 'test_evaluator')
        ]
    return lines


def reductions(family: str, root: str) -> list[Reduction]:
    """Every line in which the reduced copy of ``family`` differs from its full config, but for
    the image sizes (all times ``SIZE_FACTOR``)."""
    coco = tuple(COCO_CLASSES)
    schedule = f'the schedule over {NUM_ITERS} iterations, the steps at the same fractions'
    train_cfg = dict(type='IterBasedTrainLoop', max_iters=NUM_ITERS, val_interval=NUM_ITERS)
    loop = Reduction('train_cfg', train_cfg, f'{NUM_ITERS} iterations, evaluated once at the end')
    dataset = _data(root, coco, coco=True)
    if family == 'dino':
        return [
            *_backbone('model.neck.in_channels', slice(1, 4)),
            Reduction('model.bbox_head.num_classes', len(coco), "the synthetic dataset's classes"),
            Reduction('model.num_queries', 100, 'a few objects per image; still 3 x 100 = max_per_img candidates'),
            Reduction('model.dn_cfg.group_cfg.num_dn_queries', 20, 'scaled with the queries'),
            Reduction('model.encoder.num_layers', 1, 'CPU seconds'),
            Reduction('model.decoder.num_layers', 2, 'CPU seconds; 2 keep the refinement between layers'),
            loop,
            Reduction('param_scheduler.0.by_epoch', False, schedule),
            Reduction('param_scheduler.0.end', NUM_ITERS, schedule),
            Reduction('param_scheduler.0.milestones', [NUM_ITERS * 11 // 12], schedule),
            *dataset,
        ]
    if family in ('mask2former-instance', 'mask2former-panoptic'):
        panoptic = family == 'mask2former-panoptic'
        lines = [
            *_backbone('model.panoptic_head.in_channels', slice(0, 4)),
            *_mask2former_head('panoptic_head'),
            Reduction('model.test_cfg.max_per_image', 20, 'the queries'),
        ]
        if not panoptic:  # the panoptic model keeps COCO's 80 + 53 classes (samples made in memory)
            things = (
                'num_things_classes',
                'num_classes',
                'model.panoptic_head.num_things_classes',
                'model.panoptic_fusion_head.num_things_classes',
            )
            lines += [
                *_classes(things, 'model.panoptic_head.loss_cls.class_weight', len(coco)),
                loop,
                Reduction('param_scheduler.end', NUM_ITERS, schedule),
                Reduction(
                    'param_scheduler.milestones', [NUM_ITERS * 327778 // 368750, NUM_ITERS * 355092 // 368750], schedule
                ),
                *dataset,
            ]
        return lines
    if family == 'mask2former-semantic':
        return [
            *_backbone('model.decode_head.in_channels', slice(0, 4)),
            *_mask2former_head('decode_head'),
            *_classes(
                ('num_classes', 'model.decode_head.num_classes'), 'model.decode_head.loss_cls.class_weight', ADE_CLASSES
            ),
            loop,
            Reduction('param_scheduler.0.end', NUM_ITERS, schedule),
            *_data(root, ADE20K_CLASSES[:ADE_CLASSES], coco=False),
        ]
    raise ValueError(f'no reduced copy for {family!r}')


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, last = path.split('.')
    for key in parents:
        tree = tree[int(key)] if isinstance(tree, list) else tree[key]
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value


def _scaled(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_scaled(v) for v in value)
    return round(value * SIZE_FACTOR) if isinstance(value, int) else value


def _scale_sizes(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _scaled(v) if k in SIZE_KEYS else _scale_sizes(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_scale_sizes(v) for v in tree)
    return tree


def reduced_config(family: str, root: str = 'data/synthetic/') -> Config:
    """The reduced copy of the family's full DAT-T++ config: its image sizes times
    ``SIZE_FACTOR`` and the lines of ``reductions``."""
    full = load(REDUCED_FROM[family])
    tree = _scale_sizes(full.to_dict())
    for line in reductions(family, root):
        _set(tree, line.path, copy.deepcopy(line.value))
    # The runner logs and dumps its config; formatting these large configs with yapf took about
    # half of each training test's time (the dump stays valid Python, unformatted).
    return Config(tree, format_python_code=False)


def reduced_model_cfg(name: str) -> ConfigDict:
    return _cpu_model_cfg(reduced_config(QUERY_HEADS[name][2]))


@pytest.mark.parametrize('family', sorted(REDUCED_FROM))
def test_reduced_copy_differs_only_where_it_says_why(family):
    full = mmdet_or_mmseg_dict(load(REDUCED_FROM[family]))
    reduced = mmdet_or_mmseg_dict(reduced_config(family))
    lines = reductions(family, 'data/synthetic/')
    assert all(line.why for line in lines)
    assert len({line.path for line in lines}) == len(lines), 'a line is listed twice'
    flat_full, flat_reduced = flatten(full), flatten(reduced)
    for path in sorted(differing_paths(full, reduced)):
        if covered(path, [line.path for line in lines]):
            continue
        # otherwise an image size, scaled by SIZE_FACTOR
        key = next(part for part in reversed(path.split('.')) if not part.isdigit())
        assert key in SIZE_KEYS, f'{family}: {path} differs without a reason'
        assert flat_reduced[path] == round(flat_full[path] * SIZE_FACTOR), path
    # what the recipe is made of stays: optimiser, losses, matching, augmentation types
    for path in ('optim_wrapper', 'model.data_preprocessor.mean', 'model.data_preprocessor.std'):
        assert flatten(full).keys() >= {p for p in flatten(reduced) if p.startswith(path)}
        assert {k: v for k, v in flat_full.items() if k.startswith(path)} == {
            k: v for k, v in flat_reduced.items() if k.startswith(path)
        }


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('coco')
    make_coco(str(root), num_train=8, num_val=4, size=(128, 128), seed=0, progress=False)
    return root


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('ade')
    make_ade20k(str(root), num_train=8, num_val=2, size=(64, 64), num_classes=ADE_CLASSES, seed=0, progress=False)
    return root


def _losses(runner) -> list[float]:
    history = runner.message_hub.get_scalar('train/loss')
    return [float(v) for v in history.data[0]]


# family: (dataset fixture, metric keys the real evaluator reports)
TRAINING_CASES = {
    'dino': ('coco_root', ('coco/bbox_mAP', 'coco/bbox_mAP_50')),
    'mask2former-instance': ('coco_root', ('coco/bbox_mAP', 'coco/segm_mAP')),
    'mask2former-semantic': ('ade_root', ('mIoU', 'aAcc')),
}


@pytest.mark.parametrize('family', sorted(TRAINING_CASES))
def test_reduced_copy_trains_and_is_evaluated(family, request, tmp_path):
    from mmengine.registry import RUNNERS

    fixture, metric_keys = TRAINING_CASES[family]
    root = request.getfixturevalue(fixture)
    cfg = reduced_config(family, f'{root}/')
    cfg.work_dir = str(tmp_path / 'work')
    runner = RUNNERS.build(cfg)
    runner.train()
    losses = _losses(runner)
    assert len(losses) == NUM_ITERS and all(math.isfinite(v) for v in losses), losses
    metrics = runner.test()
    for key in metric_keys:
        assert key in metrics and math.isfinite(metrics[key]), (key, metrics)


# ---------------------------------------------------------------------------------------------
# Panoptic
# ---------------------------------------------------------------------------------------------
def _panoptic_samples(shapes: list[tuple[int, int]], seed: int) -> dict:
    """COCO-panoptic-like samples in memory: 3 thing instances, and a stuff class (80 + i) on
    each image's upper and another on its lower half."""
    from mmdet.testing import demo_mm_inputs
    from mmengine.structures import PixelData

    torch.manual_seed(seed)
    batch = demo_mm_inputs(
        batch_size=len(shapes),
        image_shapes=[(3, h, w) for h, w in shapes],
        num_items=[3] * len(shapes),
        num_classes=80,
        with_mask=True,
    )
    for i, (sample, (h, w)) in enumerate(zip(batch['data_samples'], shapes, strict=True)):
        sem = torch.full((1, h, w), 80 + i, dtype=torch.long)
        sem[:, h // 2 :] = 100 + i
        sample.gt_sem_seg = PixelData(sem_seg=sem)
    return batch


def test_panoptic_training_step_and_prediction_in_memory():
    """panopticapi, which LoadPanopticAnnotations and CocoPanopticMetric import, is not
    installable here: the model runs on samples made in memory."""
    name = REDUCED_FROM['mask2former-panoptic']
    cfg = load(name)
    model_cfg = reduced_model_cfg(name)
    model_cfg.backbone.drop_path_rate = 0.0
    torch.manual_seed(0)
    model = build_model(name, model_cfg)
    model.init_weights()
    assert (model.panoptic_head.num_things_classes, model.panoptic_head.num_stuff_classes) == (80, 53)
    ow_cfg = copy.deepcopy(cfg.optim_wrapper)
    with DefaultScope.overwrite_default_scope('mmdet'):
        optim_wrapper = build_optim_wrapper(model, ow_cfg)
    model.train()
    losses = model.train_step(_panoptic_samples([(128, 128), (96, 128)], 0), optim_wrapper)
    assert losses and all(math.isfinite(float(v)) for v in losses.values()), losses
    model.eval()
    with torch.no_grad():
        (result,) = model.test_step(_panoptic_samples([(100, 120)], 1))
    panoptic = result.pred_panoptic_seg.sem_seg
    assert tuple(panoptic.shape) == (1, 100, 120)
    # ids: class + instance * INSTANCE_OFFSET; stuff keeps its class, VOID is num_classes
    assert int(panoptic.min()) >= 0
    assert 'pred_instances' in result  # instance_on, as the base


def test_panoptic_loading_and_metric_need_panopticapi():
    """Where panopticapi is missing, building the config's panoptic loading and metric fails with
    mmdet's message, which names the install command of the configs' comments and README."""
    from mmdet.registry import METRICS, TRANSFORMS

    cfg = load(REDUCED_FROM['mask2former-panoptic'])
    (loading,) = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == 'LoadPanopticAnnotations']
    metric = cfg.val_evaluator[0]
    assert metric.type == 'CocoPanopticMetric'
    if importlib.util.find_spec('panopticapi') is not None:
        pytest.skip("panopticapi is installed: the real loading and metric run in mmdet's own tests")
    install = 'pip install git+https://github.com/cocodataset/panopticapi.git'
    with DefaultScope.overwrite_default_scope('mmdet'):
        with pytest.raises(ImportError, match='panopticapi is not installed') as error:
            TRANSFORMS.build(loading)
        assert install in str(error.value).replace('\n', '')
        with pytest.raises(RuntimeError, match='panopticapi is not installed'):
            METRICS.build(metric)
