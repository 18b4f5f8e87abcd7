"""Small deterministic synthetic datasets in the real COCO, ADE20K and ImageNet formats.

They let the demo, the tests and a new user exercise the whole train/test pipeline of the
three toolboxes without downloading anything. The images hold filled shapes (circles,
rectangles, triangles, diamonds) whose class is given by both their shape and their colour,
on noisy, shaded backgrounds, so a detector, a segmenter or a classifier can actually learn
them in a few hundred iterations on a CPU.

Every image is drawn from its own random generator seeded with ``(seed, split, index)``: the
same arguments always give the same files, and image ``i`` of a split does not change when
the number of images does.

Layouts written (the ones the toolboxes' dataset classes read):

- COCO (mmdet ``CocoDataset``)::

    OUT/train2017/000000000000.jpg ...
    OUT/val2017/000000000000.jpg ...
    OUT/annotations/instances_train2017.json, instances_val2017.json

- ADE20K (mmseg ``ADE20KDataset``; ``reduce_zero_label`` semantics: 0 = other/ignored,
  classes are ADE20K ids 1..K, i.e. the first K ADE20K classes)::

    OUT/images/training/*.jpg, OUT/images/validation/*.jpg
    OUT/annotations/training/*.png, OUT/annotations/validation/*.png   (uint8 index maps)

- ImageNet (mmpretrain ``ImageNet`` / ``CustomDataset``)::

    OUT/train/<class>/*.JPEG, OUT/val/<class>/*.JPEG
    OUT/meta/train.txt, OUT/meta/val.txt   ("<class>/<file> <label>" per line)
"""

from __future__ import annotations

import json
import math
import os
import os.path as osp
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    'SHAPES',
    'COCO_CLASSES',
    'ADE20K_CLASSES',
    'IMAGENET_CLASSES',
    'FORMATS',
    'SyntheticShapes',
    'SyntheticCoco',
    'SyntheticADE20K',
    'SyntheticImageNet',
    'make_coco',
    'make_ade20k',
    'make_imagenet',
    'make_dataset',
    'render_shape_polygon',
]

# Shape kinds and the base colour (RGB) that goes with each; a class is a (shape, colour) pair.
SHAPES: dict[str, tuple[int, int, int]] = {
    'circle': (220, 50, 50),
    'rectangle': (40, 190, 60),
    'triangle': (50, 90, 230),
    'diamond': (235, 200, 40),
}
# Classes of the synthetic COCO set (category ids 1..3 in this order).
COCO_CLASSES: tuple[str, ...] = ('circle', 'rectangle', 'triangle')
# The first ADE20K classes; the synthetic label maps use their ADE20K ids (1-based).
ADE20K_CLASSES: tuple[str, ...] = (
    'wall',
    'building',
    'sky',
    'floor',
    'tree',
    'ceiling',
    'road',
    'bed ',
)
# Classes (and folder names, sorted as mmpretrain sorts folders) of the synthetic ImageNet set.
IMAGENET_CLASSES: tuple[str, ...] = ('circle', 'diamond', 'rectangle', 'triangle')

_SPLIT_IDS = {'train': 0, 'val': 1}
# Colours of the ADE20K-style stuff/thing classes (index = ADE id - 1).
_ADE_COLOURS = (
    (150, 140, 120),
    (90, 110, 160),
    (220, 50, 50),
    (40, 190, 60),
    (50, 90, 230),
    (235, 200, 40),
    (180, 60, 200),
    (60, 200, 200),
)


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')


def _check_noise(noise: float) -> None:
    if not isinstance(noise, (int, float)) or not 0 <= noise <= 100:
        raise ValueError(f'noise must be a number in [0, 100] (grey levels), got {noise!r}')


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(not isinstance(s, (int, np.integer)) or s < 32 for s in size):
        raise ValueError(f'size must be (height, width) with both >= 32, got {tuple(size)}')
    return int(size[0]), int(size[1])


def _progress(total: int, enabled: bool) -> Callable[[], None]:
    """Return a function that advances a progress bar of ``total`` steps (or does nothing)."""
    if not enabled or total == 0:
        return lambda: None
    from mmengine.utils import ProgressBar

    bar = ProgressBar(total)
    return bar.update


def _background(rng: np.random.Generator, height: int, width: int, noise: float) -> np.ndarray:
    """A low-saturation, linearly shaded background with pixel noise, float32 HxWx3."""
    base = rng.uniform(60, 190)
    tint = rng.uniform(-20, 20, size=3)
    gy, gx = rng.uniform(-40, 40, size=2)
    ys = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :, None]
    img = base + tint[None, None, :] + gy * ys + gx * xs
    img = img + rng.normal(0, noise, size=(height, width, 3))
    return img.astype(np.float32)


def render_shape_polygon(
    kind: str, cx: float, cy: float, radius: float, angle: float, aspect: float = 1.0
) -> list[tuple[float, float]]:
    """Vertices (x, y) of a shape centred at (cx, cy).

    Args:
        kind (str): one of ``SHAPES`` ('circle', 'rectangle', 'triangle', 'diamond').
        cx (float): centre x in pixels.
        cy (float): centre y in pixels.
        radius (float): half of the shape's extent in pixels.
        angle (float): rotation in radians (ignored for circles).
        aspect (float): width/height ratio of rectangles and diamonds. Defaults to 1.0.

    Returns:
        list[tuple[float, float]]: the polygon's vertices (a circle has 32).
    """
    if kind == 'circle':
        ts = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        return [(cx + radius * math.cos(t), cy + radius * math.sin(t)) for t in ts]
    if kind == 'rectangle':
        hw = radius * min(1.0, aspect)
        hh = radius * min(1.0, 1.0 / aspect)
        local = [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)]
    elif kind == 'triangle':
        local = [(radius * math.cos(t), radius * math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif kind == 'diamond':
        hw = radius * min(1.0, aspect)
        hh = radius * min(1.0, 1.0 / aspect)
        local = [(0.0, -hh), (hw, 0.0), (0.0, hh), (-hw, 0.0)]
    else:
        raise ValueError(f'shape kind must be one of {sorted(SHAPES)}, got {kind!r}')
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in local]


def _rasterize(polygon: Sequence[tuple[float, float]], height: int, width: int) -> np.ndarray:
    """Boolean HxW mask of a polygon."""
    canvas = Image.new('L', (width, height), 0)
    ImageDraw.Draw(canvas).polygon([(float(x), float(y)) for x, y in polygon], fill=1)
    return np.asarray(canvas, dtype=bool)


def _paint(img: np.ndarray, mask: np.ndarray, colour: Sequence[float], rng: np.random.Generator, noise: float) -> None:
    """Fill ``mask`` of ``img`` with ``colour`` jittered per object plus mild pixel noise."""
    jitter = rng.uniform(-25, 25, size=3)
    col = np.clip(np.asarray(colour, dtype=np.float32) + jitter, 0, 255)
    pixel_noise = rng.normal(0, noise, size=(int(mask.sum()), 3))
    img[mask] = col[None, :] + pixel_noise


def _place_objects(
    rng: np.random.Generator, height: int, width: int, num: int, min_frac: float, max_frac: float
) -> list[tuple[float, float, float]]:
    """Up to ``num`` non-overlapping discs (cx, cy, r) inside the image, by rejection."""
    placed: list[tuple[float, float, float]] = []
    side = min(height, width)
    for _ in range(num * 30):
        if len(placed) == num:
            break
        r = rng.uniform(min_frac, max_frac) * side / 2
        cx = rng.uniform(r + 1, width - r - 1)
        cy = rng.uniform(r + 1, height - r - 1)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 2) ** 2 for x, y, q in placed):
            placed.append((cx, cy, r))
    return placed


def _save_image(img: np.ndarray, path: str) -> None:
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=95)


def _coco_image(
    rng: np.random.Generator,
    height: int,
    width: int,
    classes: Sequence[str],
    max_objects: int,
    noise: float,
) -> tuple[np.ndarray, list[dict]]:
    img = _background(rng, height, width, noise)
    num = int(rng.integers(1, max_objects + 1))
    objects = []
    for cx, cy, r in _place_objects(rng, height, width, num, 0.18, 0.55):
        label = int(rng.integers(len(classes)))
        kind = classes[label]
        polygon = render_shape_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi), rng.uniform(0.6, 1.6))
        mask = _rasterize(polygon, height, width)
        if mask.sum() < 16:
            continue
        _paint(img, mask, SHAPES[kind], rng, noise / 2)
        ys, xs = np.nonzero(mask)
        x0, y0 = float(xs.min()), float(ys.min())
        x1, y1 = float(xs.max() + 1), float(ys.max() + 1)
        flat = [round(min(max(v, 0.0), lim), 2) for x, y in polygon for v, lim in ((x, width), (y, height))]
        objects.append(
            dict(
                category_id=label + 1,
                bbox=[x0, y0, x1 - x0, y1 - y0],
                area=float(mask.sum()),
                segmentation=[flat],
                iscrowd=0,
            )
        )
    return img, objects


class SyntheticShapes(ABC):
    """A small dataset of shapes in one toolbox's format: what the three formats share.

    A subclass sets the format's default sizes (``NUM_TRAIN``, ``NUM_VAL``, ``SIZE``) and writes
    one split; this class checks the arguments, seeds one generator per image and drives the
    splits and the progress bar.

    Args:
        num_train (int, optional): images of the training split (per class where the format has
            a folder per class). Defaults to the format's ``NUM_TRAIN``.
        num_val (int, optional): images of the validation split, likewise. Defaults to the
            format's ``NUM_VAL``.
        size (Sequence[int], optional): image (height, width), both >= 32. Defaults to the
            format's ``SIZE``.
        seed (int): base random seed. Defaults to 0.
        noise (float): standard deviation of the background's pixel noise (grey levels, 0 to
            100); objects get half of it. Defaults to 12.0.
    """

    NUM_TRAIN: ClassVar[int]
    NUM_VAL: ClassVar[int]
    SIZE: ClassVar[tuple[int, int]]

    def __init__(
        self,
        num_train: int | None = None,
        num_val: int | None = None,
        size: Sequence[int] | None = None,
        seed: int = 0,
        noise: float = 12.0,
    ) -> None:
        self.num_train = self.NUM_TRAIN if num_train is None else num_train
        self.num_val = self.NUM_VAL if num_val is None else num_val
        _check_positive('num_train', self.num_train)
        _check_positive('num_val', self.num_val)
        self.height, self.width = _check_size(self.SIZE if size is None else size)
        _check_noise(noise)
        self.seed = seed
        self.noise = noise

    def write(self, out_dir: str, progress: bool = True) -> dict[str, str]:
        """Write the training and the validation split.

        Args:
            out_dir (str): dataset root (created; existing files of the same names are replaced).
            progress (bool): show a progress bar. Defaults to True.

        Returns:
            dict[str, str]: per split ('train', 'val'), the file or folder a toolbox config names
            (see the subclass).
        """
        step = _progress(self.images_per_sample() * (self.num_train + self.num_val), progress)
        return {
            split: self.write_split(out_dir, split, count, step)
            for split, count in (('train', self.num_train), ('val', self.num_val))
        }

    def images_per_sample(self) -> int:
        """How many images one unit of ``num_train``/``num_val`` stands for (1, or the classes)."""
        return 1

    def rng(self, split: str, *index: int) -> np.random.Generator:
        """The generator of one image: seeded with (seed, split, index), so that an image does
        not depend on how many others are written."""
        return np.random.default_rng([self.seed, _SPLIT_IDS[split], *index])

    @abstractmethod
    def write_split(self, out_dir: str, split: str, count: int, step: Callable[[], None]) -> str:
        """Write ``count`` samples of ``split``, call ``step`` after each image, return its path."""


def _check_classes(classes: Sequence[str], minimum: int) -> None:
    unknown = [c for c in classes if c not in SHAPES]
    if unknown or len(classes) < minimum:
        raise ValueError(f'classes must be at least {minimum} of {sorted(SHAPES)}, got {tuple(classes)}')


class SyntheticCoco(SyntheticShapes):
    """COCO instances (mmdet ``CocoDataset``): shapes with boxes and polygon masks.

    ``write`` returns the annotation files, ``OUT/annotations/instances_{train,val}2017.json``.

    Args:
        classes (Sequence[str]): shape kinds used as categories (ids 1..K in this order), each
            from ``SHAPES``. Defaults to ``COCO_CLASSES``.
        max_objects (int): at most this many objects per image (at least 1). Defaults to 4.
        **kwargs: the arguments of ``SyntheticShapes``; 64 training and 16 validation images
            of 160x160 unless given.
    """

    NUM_TRAIN, NUM_VAL, SIZE = 64, 16, (160, 160)

    def __init__(self, classes: Sequence[str] = COCO_CLASSES, max_objects: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_classes(classes, 1)
        _check_positive('max_objects', max_objects)
        self.classes = tuple(classes)
        self.max_objects = max_objects

    def write_split(self, out_dir: str, split: str, count: int, step: Callable[[], None]) -> str:
        img_dir = osp.join(out_dir, f'{split}2017')
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
        images, annotations = [], []
        for idx in range(count):
            img, objects = _coco_image(
                self.rng(split, idx), self.height, self.width, self.classes, self.max_objects, self.noise
            )
            file_name = f'{idx:012d}.jpg'
            _save_image(img, osp.join(img_dir, file_name))
            images.append(dict(id=idx, file_name=file_name, height=self.height, width=self.width))
            for obj in objects:
                annotations.append(dict(id=len(annotations) + 1, image_id=idx, **obj))
            step()
        categories = [dict(id=i + 1, name=c, supercategory='shape') for i, c in enumerate(self.classes)]
        ann_path = osp.join(out_dir, 'annotations', f'instances_{split}2017.json')
        with open(ann_path, 'w') as f:
            json.dump(
                dict(
                    info=dict(description=f'synthetic shapes, seed {self.seed}'),
                    licenses=[],
                    images=images,
                    annotations=annotations,
                    categories=categories,
                ),
                f,
            )
        return ann_path


def _ade_image(
    rng: np.random.Generator, height: int, width: int, num_classes: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    """A scene: class 1 above a random horizon, class 2 below, shapes of classes 3..K,
    and a few grey 'other' (label 0) blobs."""
    img = _background(rng, height, width, noise)
    label = np.zeros((height, width), dtype=np.uint8)
    horizon = int(rng.uniform(0.3, 0.7) * height)
    for ade_id, rows in ((1, slice(0, horizon)), (2, slice(horizon, height))):
        region = np.zeros((height, width), dtype=bool)
        region[rows] = True
        _paint(img, region, _ADE_COLOURS[ade_id - 1], rng, noise / 2)
        label[region] = ade_id
    kinds = list(SHAPES)
    num = int(rng.integers(1, 5))
    for k, (cx, cy, r) in enumerate(_place_objects(rng, height, width, num + 1, 0.15, 0.5)):
        if k == 0:  # one 'other' blob per image, labelled 0 (ignored with reduce_zero_label)
            ade_id, colour = 0, (128, 128, 128)
        elif num_classes >= 3:
            ade_id = int(rng.integers(3, num_classes + 1))
            colour = _ADE_COLOURS[(ade_id - 1) % len(_ADE_COLOURS)]
        else:
            break
        kind = kinds[(ade_id - 1) % len(kinds)] if ade_id else 'diamond'
        mask = _rasterize(
            render_shape_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi), rng.uniform(0.6, 1.6)),
            height,
            width,
        )
        _paint(img, mask, colour, rng, noise / 2)
        label[mask] = ade_id
    return img, label


class SyntheticADE20K(SyntheticShapes):
    """ADE20K semantic segmentation (mmseg ``ADE20KDataset``).

    Label maps are uint8 PNGs with 0 = other (ignored under ``reduce_zero_label=True``) and
    ADE20K ids 1..K (``ADE20K_CLASSES[:K]``): class 1 fills the top of each scene, class 2
    the bottom, classes 3..K are shapes. ``write`` returns the image folders,
    ``OUT/images/{training,validation}``.

    Args:
        num_classes (int): K, between 2 and ``len(ADE20K_CLASSES)``. Defaults to 5.
        **kwargs: the arguments of ``SyntheticShapes``; 32 training and 8 validation images
            of 128x128 unless given.
    """

    NUM_TRAIN, NUM_VAL, SIZE = 32, 8, (128, 128)

    def __init__(self, num_classes: int = 5, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 2 <= num_classes <= len(ADE20K_CLASSES):
            raise ValueError(f'num_classes must be in 2..{len(ADE20K_CLASSES)}, got {num_classes}')
        self.num_classes = num_classes

    def write_split(self, out_dir: str, split: str, count: int, step: Callable[[], None]) -> str:
        folder = dict(train='training', val='validation')[split]
        img_dir = osp.join(out_dir, 'images', folder)
        ann_dir = osp.join(out_dir, 'annotations', folder)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for idx in range(count):
            img, label = _ade_image(self.rng(split, idx), self.height, self.width, self.num_classes, self.noise)
            name = f'ADE_{folder[0:5]}_{idx:08d}'
            _save_image(img, osp.join(img_dir, name + '.jpg'))
            Image.fromarray(label).save(osp.join(ann_dir, name + '.png'))
            step()
        return img_dir


class SyntheticImageNet(SyntheticShapes):
    """ImageNet-style classification (mmpretrain ``ImageNet``): one shape per image.

    ``num_train`` and ``num_val`` count images per class. ``write`` returns the annotation
    lists, ``OUT/meta/{train,val}.txt``.

    Args:
        classes (Sequence[str]): shape kinds used as classes (label = position), at least 2,
            each from ``SHAPES``, sorted (mmpretrain labels folders in sorted order).
            Defaults to ``IMAGENET_CLASSES``.
        **kwargs: the arguments of ``SyntheticShapes``; 16 training and 4 validation images per
            class of 64x64 unless given.
    """

    NUM_TRAIN, NUM_VAL, SIZE = 16, 4, (64, 64)

    def __init__(self, classes: Sequence[str] = IMAGENET_CLASSES, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_classes(classes, 2)
        if sorted(classes) != list(classes):
            raise ValueError(
                f'classes must be sorted (folder order defines the labels in mmpretrain), got {tuple(classes)}'
            )
        self.classes = tuple(classes)

    def images_per_sample(self) -> int:
        return len(self.classes)

    def write_split(self, out_dir: str, split: str, count: int, step: Callable[[], None]) -> str:
        height, width = self.height, self.width
        lines = []
        for label, kind in enumerate(self.classes):
            os.makedirs(osp.join(out_dir, split, kind), exist_ok=True)
            for idx in range(count):
                rng = self.rng(split, label, idx)
                img = _background(rng, height, width, self.noise)
                r = rng.uniform(0.25, 0.45) * min(height, width)
                cx = rng.uniform(r, width - r)
                cy = rng.uniform(r, height - r)
                polygon = render_shape_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi), rng.uniform(0.7, 1.4))
                _paint(img, _rasterize(polygon, height, width), SHAPES[kind], rng, self.noise / 2)
                rel = f'{kind}/{split}_{idx:06d}.JPEG'
                _save_image(img, osp.join(out_dir, split, rel))
                lines.append(f'{rel} {label}')
                step()
        os.makedirs(osp.join(out_dir, 'meta'), exist_ok=True)
        meta = osp.join(out_dir, 'meta', f'{split}.txt')
        with open(meta, 'w') as f:
            f.write('\n'.join(lines) + '\n')
        return meta


# The formats by the names the CLI and ``make_dataset`` take.
FORMATS: dict[str, type[SyntheticShapes]] = dict(coco=SyntheticCoco, ade20k=SyntheticADE20K, imagenet=SyntheticImageNet)


def make_dataset(kind: str, out_dir: str, progress: bool = True, **kwargs) -> dict[str, str]:
    """Write a synthetic dataset of one of ``FORMATS``.

    Args:
        kind (str): 'coco', 'ade20k' or 'imagenet'.
        out_dir (str): dataset root (created; existing files of the same names are replaced).
        progress (bool): show a progress bar. Defaults to True.
        **kwargs: the arguments of the format's class (``SyntheticCoco``, ``SyntheticADE20K``,
            ``SyntheticImageNet``).

    Returns:
        dict[str, str]: what the format's ``write`` returns.
    """
    if kind not in FORMATS:
        raise ValueError(f'dataset kind must be one of {sorted(FORMATS)}, got {kind!r}')
    return FORMATS[kind](**kwargs).write(out_dir, progress)


def make_coco(out_dir: str, progress: bool = True, **kwargs) -> dict[str, str]:
    """``make_dataset('coco', ...)``: the arguments of ``SyntheticCoco``; returns the annotation files."""
    return make_dataset('coco', out_dir, progress, **kwargs)


def make_ade20k(out_dir: str, progress: bool = True, **kwargs) -> dict[str, str]:
    """``make_dataset('ade20k', ...)``: the arguments of ``SyntheticADE20K``; returns the image folders."""
    return make_dataset('ade20k', out_dir, progress, **kwargs)


def make_imagenet(out_dir: str, progress: bool = True, **kwargs) -> dict[str, str]:
    """``make_dataset('imagenet', ...)``: the arguments of ``SyntheticImageNet``; returns the annotation lists."""
    return make_dataset('imagenet', out_dir, progress, **kwargs)
