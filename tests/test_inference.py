"""Inference through the three toolboxes' own inferencers, on our configs.

The README shows ``DetInferencer`` (mmdet), ``MMSegInferencer`` (mmseg) and
``ImageClassificationInferencer`` (mmpretrain) on a config of this repository and a
checkpoint; these tests make the same calls. Each uses a reduced DAT++ demo config
(``configs/demo/``, which inherits the real DAT-T++ config of its task), a checkpoint of
randomly initialised weights written to a temporary folder, and one synthetic image from
``projects/dat/synthetic.py``. They check that:

- the weights the inferencer runs are exactly those of the checkpoint (``weights=`` /
  ``pretrained=`` really loads them, with the class names saved in its ``meta``);
- the result has the documented structure: boxes, scores, labels and one mask per box for
  the detector; a label map of the input image's size for the segmenter; class
  probabilities that sum to 1 for the classifier.

Random weights say nothing about accuracy (the demo, ``make demo``, trains a detector).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from projects.dat.synthetic import make_ade20k, make_coco, make_imagenet

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / 'configs' / 'demo'
DET_CONFIG = DEMO / 'mask-rcnn_datpp-demo_fpn_synthetic-coco.py'
SEG_CONFIG = DEMO / 'upernet_datpp-demo_synthetic-ade20k.py'
CLS_CONFIG = DEMO / 'datpp-demo_synthetic-imagenet.py'


def _save_random_checkpoint(config: Path, scope: str, path: Path, classes: tuple[str, ...]) -> dict:
    """Build the config's model with random weights, save it as an mmengine checkpoint.

    Args:
        config (Path): config file.
        scope (str): the toolbox's registry scope ('mmdet', 'mmseg' or 'mmpretrain').
        path (Path): where to write the checkpoint.
        classes (tuple[str, ...]): class names stored as ``meta['dataset_meta']``.

    Returns:
        dict: the saved state dict (name -> tensor).
    """
    cfg = Config.fromfile(str(config))
    registry = {
        'mmdet': 'mmdet.registry',
        'mmseg': 'mmseg.registry',
        'mmpretrain': 'mmpretrain.registry',
    }[scope]
    models = __import__(registry, fromlist=['MODELS']).MODELS
    torch.manual_seed(1234)
    with DefaultScope.overwrite_default_scope(scope):
        model = models.build(cfg.model)
    model.init_weights()
    # Move every weight away from its initial value, so that a model the inferencer built but
    # failed to load into cannot equal the checkpoint by chance (e.g. zero-initialised biases).
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(dict(state_dict=state_dict, meta=dict(dataset_meta=dict(classes=classes))), path)
    return state_dict


def _assert_same_weights(model: torch.nn.Module, saved: dict) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(saved), sorted(set(loaded) ^ set(saved))[:5]
    different = [k for k, v in saved.items() if not torch.equal(loaded[k].cpu(), v)]
    assert not different, f'weights not loaded from the checkpoint: {different[:5]}'


def test_det_inferencer_runs_our_mask_rcnn_config(tmp_path):
    from mmdet.apis import DetInferencer

    classes = ('circle', 'rectangle', 'triangle')
    make_coco(str(tmp_path / 'coco'), num_train=1, num_val=1, size=(120, 176), progress=False)
    image = tmp_path / 'coco' / 'val2017' / '000000000000.jpg'
    checkpoint = tmp_path / 'det.pth'
    saved = _save_random_checkpoint(DET_CONFIG, 'mmdet', checkpoint, classes)

    inferencer = DetInferencer(model=str(DET_CONFIG), weights=str(checkpoint), device='cpu')
    _assert_same_weights(inferencer.model, saved)
    assert tuple(inferencer.model.dataset_meta['classes']) == classes

    result = inferencer(str(image), no_save_vis=True, return_datasamples=True)
    (sample,) = result['predictions']
    instances = sample.pred_instances
    assert len(instances) > 0, 'random weights still score boxes above the 0.05 threshold'
    assert instances.bboxes.shape == (len(instances), 4)
    assert instances.scores.shape == instances.labels.shape == (len(instances),)
    assert ((instances.scores >= 0) & (instances.scores <= 1)).all()
    assert ((instances.labels >= 0) & (instances.labels < len(classes))).all()
    # boxes and masks in the coordinates of the input image (120 high, 176 wide)
    assert tuple(sample.ori_shape) == (120, 176)
    boxes = instances.bboxes
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 176).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 120).all()
    assert instances.masks.shape == (len(instances), 120, 176)
    assert instances.masks.dtype == torch.bool

    # the plain-python form the README prints
    plain = inferencer(str(image), no_save_vis=True)['predictions'][0]
    assert set(plain) >= {'labels', 'scores', 'bboxes', 'masks'}
    assert len(plain['bboxes']) == len(plain['scores']) == len(plain['masks']) == len(instances)


def test_mmseg_inferencer_runs_our_upernet_config(tmp_path):
    from mmseg.apis import MMSegInferencer

    classes = ('wall', 'building', 'sky', 'floor', 'tree')
    make_ade20k(str(tmp_path / 'ade'), num_train=1, num_val=1, size=(72, 104), progress=False)
    image = next((tmp_path / 'ade' / 'images' / 'validation').glob('*.jpg'))
    checkpoint = tmp_path / 'seg.pth'
    saved = _save_random_checkpoint(SEG_CONFIG, 'mmseg', checkpoint, classes)

    inferencer = MMSegInferencer(model=str(SEG_CONFIG), weights=str(checkpoint), device='cpu')
    _assert_same_weights(inferencer.model, saved)  # SyncBN turned into BN keeps the names
    assert tuple(inferencer.model.dataset_meta['classes']) == classes

    seg_map = inferencer(str(image))['predictions']
    assert isinstance(seg_map, np.ndarray)
    assert seg_map.shape == (72, 104)  # the input image's size, not the 128x64 test scale
    assert seg_map.min() >= 0 and seg_map.max() < len(classes)


def test_image_classification_inferencer_runs_our_config(tmp_path):
    from mmpretrain.apis import ImageClassificationInferencer

    classes = ('circle', 'diamond', 'rectangle', 'triangle')
    make_imagenet(str(tmp_path / 'imagenet'), num_train=1, num_val=1, progress=False)
    image = next((tmp_path / 'imagenet' / 'val' / 'circle').glob('*.JPEG'))
    checkpoint = tmp_path / 'cls.pth'
    saved = _save_random_checkpoint(CLS_CONFIG, 'mmpretrain', checkpoint, classes)

    # mmpretrain's inferencer builds its pipeline in the current default scope, which mmdet's and
    # mmseg's inferencers set to theirs: name its scope, as the README does.
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        inferencer = ImageClassificationInferencer(model=str(CLS_CONFIG), pretrained=str(checkpoint), device='cpu')
        (result,) = inferencer(str(image))
    _assert_same_weights(inferencer.model, saved)

    scores = result['pred_scores']
    assert scores.shape == (len(classes),)
    assert (scores >= 0).all() and scores.sum() == pytest.approx(1.0, abs=1e-5)
    assert result['pred_label'] == int(np.argmax(scores))
    assert result['pred_score'] == pytest.approx(float(scores.max()))
    assert result['pred_class'] == classes[result['pred_label']]
