"""Tests of the synthetic dataset generators (``projects/dat/synthetic.py``).

- Same arguments give byte-identical files; image ``i`` does not depend on the number of
  images; another seed gives other images.
- The COCO annotations are consistent: boxes and polygons inside the image, the polygon's
  mask (rasterised by pycocotools) matches the stored box and area, categories as declared.
- Each dataset loads through its toolbox's own dataset class with the demo configs'
  pipelines: mmdet ``CocoDataset``, mmseg ``ADE20KDataset`` (``reduce_zero_label``, the
  150-class and the 5-class metainfo), mmpretrain ``ImageNet`` (meta files) and
  ``CustomDataset`` (folders).
- Bad arguments raise errors that say what was expected; the CLI writes the same files.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from projects.dat.synthetic import (
    ADE20K_CLASSES,
    COCO_CLASSES,
    FORMATS,
    IMAGENET_CLASSES,
    make_ade20k,
    make_coco,
    make_dataset,
    make_imagenet,
)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / 'configs' / 'demo'


def _digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob('*'))
        if p.is_file()
    }


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('coco')
    make_coco(str(root), num_train=12, num_val=4, size=(96, 128), seed=3, progress=False)
    return root


@pytest.fixture(scope='module')
def ade_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('ade')
    make_ade20k(str(root), num_train=6, num_val=3, size=(64, 80), seed=1, progress=False)
    return root


@pytest.fixture(scope='module')
def imagenet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('imagenet')
    make_imagenet(str(root), num_train=3, num_val=2, size=(48, 48), seed=2, progress=False)
    return root


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kind', ['coco', 'ade20k', 'imagenet'])
def test_deterministic(kind, tmp_path):
    kwargs = dict(num_train=3, num_val=2, size=(48, 64), seed=7, progress=False)
    make_dataset(kind, str(tmp_path / 'a'), **kwargs)
    make_dataset(kind, str(tmp_path / 'b'), **kwargs)
    make_dataset(kind, str(tmp_path / 'c'), **{**kwargs, 'seed': 8})
    a, b, c = (_digest(tmp_path / n) for n in 'abc')
    assert a == b and len(a) > 4
    images = [k for k in a if k.lower().endswith(('.jpg', '.jpeg'))]
    assert images and all(a[k] != c[k] for k in images)


def test_rerun_overwrites_same_files(tmp_path):
    kwargs = dict(num_train=2, num_val=1, size=(48, 48), seed=0, progress=False)
    make_coco(str(tmp_path), **kwargs)
    first = _digest(tmp_path)
    make_coco(str(tmp_path), **kwargs)
    assert _digest(tmp_path) == first


def test_noise_changes_pixels_not_annotations(tmp_path):
    for noise in (0, 12):
        make_coco(str(tmp_path / str(noise)), num_train=2, num_val=1, size=(48, 48), noise=noise, progress=False)
    for split in ('train', 'val'):
        a, b = (
            json.loads((tmp_path / n / 'annotations' / f'instances_{split}2017.json').read_text())
            for n in '0 12'.split()
        )
        assert a['annotations'] == b['annotations'] and a['images'] == b['images']
    flat = np.asarray(Image.open(tmp_path / '0' / 'train2017' / '000000000000.jpg'), dtype=np.float32)
    noisy = np.asarray(Image.open(tmp_path / '12' / 'train2017' / '000000000000.jpg'), dtype=np.float32)
    assert np.abs(noisy - flat).mean() > 3


def test_image_does_not_depend_on_count(tmp_path):
    make_coco(str(tmp_path / 'few'), num_train=2, num_val=1, size=(64, 64), progress=False)
    make_coco(str(tmp_path / 'many'), num_train=5, num_val=3, size=(64, 64), progress=False)
    for name in ('train2017/000000000001.jpg', 'val2017/000000000000.jpg'):
        assert (tmp_path / 'few' / name).read_bytes() == (tmp_path / 'many' / name).read_bytes()


@pytest.mark.parametrize('kind', sorted(FORMATS))
def test_unset_sizes_take_the_format_defaults(kind):
    fmt = FORMATS[kind]
    dataset = fmt(num_train=None, num_val=2, size=None)
    assert (dataset.num_train, dataset.num_val) == (fmt.NUM_TRAIN, 2)
    assert (dataset.height, dataset.width) == fmt.SIZE


def test_progress_counts_every_image(tmp_path):
    totals, steps = [], []

    def progress(total, enabled):
        totals.append(total)
        return lambda: steps.append(1)

    dataset = FORMATS['imagenet'](num_train=2, num_val=1, size=(32, 32))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr('projects.dat.synthetic._progress', progress)
        dataset.write(str(tmp_path))
    assert totals == [len(IMAGENET_CLASSES) * 3] and len(steps) == totals[0]


# ---------------------------------------------------------------------------------------------
# Content
# ---------------------------------------------------------------------------------------------
def test_coco_annotations_consistent(coco_root):
    from pycocotools.coco import COCO

    for split, count in (('train', 12), ('val', 4)):
        ann_file = coco_root / 'annotations' / f'instances_{split}2017.json'
        coco = COCO(str(ann_file))
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(COCO_CLASSES)
        assert len(coco.getImgIds()) == count
        per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
        assert min(per_image) >= 1 and max(per_image) <= 4
        for ann in coco.loadAnns(coco.getAnnIds()):
            img = coco.loadImgs(ann['image_id'])[0]
            assert (img['height'], img['width']) == (96, 128)
            x, y, w, h = ann['bbox']
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 96 and w >= 4 and h >= 4
            poly = np.asarray(ann['segmentation'][0]).reshape(-1, 2)
            assert poly[:, 0].min() >= 0 and poly[:, 0].max() <= 128
            assert poly[:, 1].min() >= 0 and poly[:, 1].max() <= 96
            mask = coco.annToMask(ann).astype(bool)
            ys, xs = np.nonzero(mask)
            # pycocotools' rasteriser and PIL's differ by a pixel or two along the outline
            # (most at the sharp tips of triangles)
            assert abs(mask.sum() - ann['area']) <= 0.1 * ann['area'] + 2 * (w + h)
            assert abs(xs.min() - x) <= 2.5 and abs(xs.max() + 1 - (x + w)) <= 2.5
            assert abs(ys.min() - y) <= 2.5 and abs(ys.max() + 1 - (y + h)) <= 2.5
            assert ann['iscrowd'] == 0
        ids = [a['id'] for a in coco.loadAnns(coco.getAnnIds())]
        assert len(set(ids)) == len(ids)


def test_coco_objects_have_their_class_colour(coco_root):
    """The class is visible: the mean colour inside each mask is nearest to its class's."""
    from pycocotools.coco import COCO

    from projects.dat.synthetic import SHAPES

    coco = COCO(str(coco_root / 'annotations' / 'instances_train2017.json'))
    palette = np.asarray([SHAPES[c] for c in COCO_CLASSES], dtype=np.float32)
    for ann in coco.loadAnns(coco.getAnnIds()):
        img = coco.loadImgs(ann['image_id'])[0]
        pixels = np.asarray(Image.open(coco_root / 'train2017' / img['file_name']))
        mean = pixels[coco.annToMask(ann).astype(bool)].reshape(-1, 3).mean(0)
        assert np.argmin(((palette - mean) ** 2).sum(1)) == ann['category_id'] - 1


def test_ade20k_label_maps(ade_root):
    images = sorted((ade_root / 'images' / 'training').glob('*.jpg'))
    labels = sorted((ade_root / 'annotations' / 'training').glob('*.png'))
    assert len(images) == len(labels) == 6
    assert [p.stem for p in images] == [p.stem for p in labels]
    seen = set()
    for path in labels:
        label = np.asarray(Image.open(path))
        assert label.shape == (64, 80) and label.dtype == np.uint8
        assert set(np.unique(label)) <= set(range(6))
        assert 0 in label  # the 'other' blob, ignored under reduce_zero_label
        seen |= set(np.unique(label).tolist())
    assert {1, 2} <= seen and seen & {3, 4, 5}


def test_ade20k_classes_are_ade_names():
    from mmseg.datasets import ADE20KDataset

    assert ADE20K_CLASSES == ADE20KDataset.METAINFO['classes'][: len(ADE20K_CLASSES)]


def test_imagenet_layout(imagenet_root):
    for split, per_class in (('train', 3), ('val', 2)):
        lines = (imagenet_root / 'meta' / f'{split}.txt').read_text().split('\n')[:-1]
        assert len(lines) == per_class * len(IMAGENET_CLASSES)
        for line in lines:
            rel, label = line.split()
            assert rel.split('/')[0] == IMAGENET_CLASSES[int(label)]
            assert (imagenet_root / split / rel).is_file()


# ---------------------------------------------------------------------------------------------
# Loading through the toolboxes' dataset classes and pipelines
# ---------------------------------------------------------------------------------------------
def _pipeline(config: str, loader: str):
    from mmengine.config import Config

    cfg = Config.fromfile(str(DEMO / config))
    return cfg[loader].dataset.pipeline, cfg


def test_loads_as_mmdet_coco(coco_root):
    from mmdet.datasets import CocoDataset
    from mmdet.utils import register_all_modules

    register_all_modules()
    for loader, split, count in (('train_dataloader', 'train', 12), ('test_dataloader', 'val', 4)):
        pipeline, cfg = _pipeline('mask-rcnn_datpp-demo_fpn_synthetic-coco.py', loader)
        dataset = CocoDataset(
            data_root=str(coco_root),
            metainfo=dict(classes=COCO_CLASSES),
            ann_file=f'annotations/instances_{split}2017.json',
            data_prefix=dict(img=f'{split}2017/'),
            pipeline=pipeline,
            test_mode=split == 'val',
        )
        assert len(dataset) == count
        item = dataset[0]
        inputs, sample = item['inputs'], item['data_samples']
        assert inputs.shape[0] == 3 and max(inputs.shape[1:]) == cfg.img_scale[0]
        gt = sample.gt_instances
        assert 1 <= len(gt) <= 4 and len(gt.masks) == len(gt)
        assert set(gt.labels.tolist()) <= {0, 1, 2}
        boxes = getattr(gt.bboxes, 'tensor', gt.bboxes)
        assert (boxes[:, 2:] > boxes[:, :2]).all()


def test_loads_as_mmseg_ade20k(ade_root):
    from mmseg.datasets import ADE20KDataset
    from mmseg.utils import register_all_modules

    register_all_modules()
    pipeline, cfg = _pipeline('upernet_datpp-demo_synthetic-ade20k.py', 'train_dataloader')
    # 5 classes of the demo config: ids 1..5 -> 0..4, 'other' -> 255
    dataset = ADE20KDataset(
        data_root=str(ade_root),
        metainfo=dict(classes=cfg.classes),
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=pipeline,
    )
    assert len(dataset) == 6
    for i in range(len(dataset)):
        item = dataset[i]
        seg = item['data_samples'].gt_sem_seg.data
        # crops of at most crop_size (smaller scales are padded by the data preprocessor)
        assert seg.shape[-2:] == item['inputs'].shape[-2:]
        assert all(s <= c for s, c in zip(seg.shape[-2:], cfg.crop_size, strict=True))
        assert set(seg.unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    # the full 150-class ADE20K metainfo reads the same files
    test_pipeline, _ = _pipeline('upernet_datpp-demo_synthetic-ade20k.py', 'test_dataloader')
    full = ADE20KDataset(
        data_root=str(ade_root),
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline,
    )
    assert len(full) == 3 and len(full.metainfo['classes']) == 150
    raw = np.asarray(
        Image.open(ade_root / 'annotations' / 'validation' / f'{Path(full[0]["data_samples"].img_path).stem}.png')
    )
    seg = full[0]['data_samples'].gt_sem_seg.data[0].numpy()
    assert seg.shape == raw.shape  # 64x80 fits the 128x64 test scale unchanged
    np.testing.assert_array_equal(seg, np.where(raw == 0, 255, raw.astype(np.int64) - 1))


def test_loads_as_mmpretrain_imagenet(imagenet_root):
    from mmpretrain.datasets import CustomDataset, ImageNet
    from mmpretrain.utils import register_all_modules

    register_all_modules()
    pipeline, cfg = _pipeline('datpp-demo_synthetic-imagenet.py', 'train_dataloader')
    by_meta = ImageNet(
        data_root=str(imagenet_root),
        split='train',
        metainfo=dict(classes=IMAGENET_CLASSES),
        pipeline=pipeline,
    )
    by_folder = CustomDataset(data_root=str(imagenet_root), data_prefix='val', pipeline=pipeline)
    assert len(by_meta) == 3 * len(IMAGENET_CLASSES)
    assert len(by_folder) == 2 * len(IMAGENET_CLASSES)
    assert tuple(by_folder.metainfo['classes']) == IMAGENET_CLASSES
    for dataset in (by_meta, by_folder):
        labels = [int(dataset.get_data_info(i)['gt_label']) for i in range(len(dataset))]
        paths = [dataset.get_data_info(i)['img_path'] for i in range(len(dataset))]
        assert all(Path(p).parent.name == IMAGENET_CLASSES[label] for p, label in zip(paths, labels, strict=True))
        item = dataset[0]
        assert tuple(item['inputs'].shape) == (3, cfg.img_size, cfg.img_size)


# ---------------------------------------------------------------------------------------------
# Errors and CLI
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    'call, match',
    [
        (lambda d: make_coco(d, size=(16, 64)), r'size must be \(height, width\) with both >= 32'),
        (lambda d: make_coco(d, num_train=0), 'num_train must be an integer >= 1'),
        (
            lambda d: make_coco(d, classes=('circle', 'hexagon')),
            'classes must be at least 1 of',
        ),
        (lambda d: make_ade20k(d, num_classes=1), 'num_classes must be in 2..8, got 1'),
        (lambda d: make_imagenet(d, classes=('triangle', 'circle')), 'classes must be sorted'),
        (lambda d: make_dataset('voc', d), "dataset kind must be one of .* got 'voc'"),
        (lambda d: make_imagenet(d, noise=-1), r'noise must be a number in \[0, 100\]'),
    ],
)
def test_bad_arguments(call, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        call(str(tmp_path))


def test_cli_matches_api(tmp_path):
    make_imagenet(str(tmp_path / 'api'), num_train=2, num_val=1, size=(40, 40), seed=5, progress=False)
    subprocess.run(
        [
            sys.executable,
            str(REPO / 'tools' / 'data' / 'make_synthetic.py'),
            'imagenet',
            str(tmp_path / 'cli'),
            '--num-train',
            '2',
            '--num-val',
            '1',
            '--size',
            '40',
            '40',
            '--seed',
            '5',
            '--no-progress',
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    assert _digest(tmp_path / 'api') == _digest(tmp_path / 'cli')
