"""Draw where a deformable attention block of DAT / DAT++ looks.

Left panel: the block's reference points (the regular key grid) and, for every offset
group, an arrow from each reference point to the learned sampling position. Right panel:
for one query pixel, the attention weights over the sampled keys (averaged over the heads of
each group), shown by the size and colour of each key.

Examples::

    # a random image through DAT-T++ with random weights (the title says so)
    python tools/visualization/vis_deformable_points.py --random --arch datpp-t --out points.png
    # a photo through converted ImageNet weights, second deformable block of stage 2
    python tools/visualization/vis_deformable_points.py demo.jpg --arch datpp-t \\
        --checkpoint checkpoints/datpp-t_in1k_converted.pth --block stages.2.blocks.3.attn \\
        --query 100 140
    # the backbone of a detector config with its checkpoint, at a detection size
    python tools/visualization/vis_deformable_points.py demo.jpg --config CONFIG \\
        --checkpoint CKPT --size 512 768

The same drawing is available as :func:`visualize_deformable_points` for other tools.
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
from collections.abc import Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from projects.dat.models.dat import DAT, DeformableAttention  # noqa: E402
from projects.dat.models.inspection import deformable_attention_maps  # noqa: E402
from projects.dat.models.pretrained import load_pretrained_backbone  # noqa: E402
from projects.dat.toolboxes import build_config_model  # noqa: E402

# ImageNet statistics in RGB order (the default of the three toolboxes' configs).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def find_backbone(model: nn.Module) -> DAT:
    """The :class:`DAT` of a model: the model itself or its ``backbone``.

    Raises:
        TypeError: If neither is a DAT.
    """
    if isinstance(model, DAT):
        return model
    backbone = getattr(model, 'backbone', None)
    if isinstance(backbone, DAT):
        return backbone
    raise TypeError(
        f'expected a DAT backbone or a model whose .backbone is one, got '
        f'{type(model).__name__} (backbone: {type(backbone).__name__})'
    )


def deformable_blocks(backbone: DAT) -> dict:
    """``{name: module}`` of every deformable attention of the backbone, in forward order."""
    return {name: m for name, m in backbone.named_modules() if isinstance(m, DeformableAttention)}


def resolve_block(backbone: DAT, block_name: str | None) -> tuple[str, DeformableAttention]:
    """The deformable attention named ``block_name`` (relative to the backbone, with or
    without a ``backbone.`` prefix, the ``.attn`` suffix optional), or the last one.

    Raises:
        ValueError: If there is no such deformable block.
    """
    blocks = deformable_blocks(backbone)
    if not blocks:
        raise ValueError('the backbone has no deformable attention block')
    if block_name is None:
        return list(blocks.items())[-1]
    name = block_name[len('backbone.') :] if block_name.startswith('backbone.') else block_name
    for candidate in (name, name + '.attn'):
        if candidate in blocks:
            return candidate, blocks[candidate]
    raise ValueError(f'{block_name!r} is not a deformable attention block of this model; choose one of {list(blocks)}')


def normalised_to_pixels(points: Tensor, feature_size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """Map normalised ``(y, x)`` points of a feature map to image pixel ``(y, x)``.

    With ``align_corners=True`` -1 and +1 are the centres of the first and last feature
    cells; cell ``i`` of a stride-``s`` map is centred on pixel ``(i + 0.5) * s - 0.5``.

    Args:
        points (Tensor): ``(..., 2)`` normalised ``(y, x)``.
        feature_size (tuple[int, int]): ``(H, W)`` of the map.
        image_size (tuple[int, int]): ``(H, W)`` of the image.

    Returns:
        np.ndarray: ``(..., 2)`` pixel coordinates ``(y, x)``.
    """
    points = points.detach().cpu().double().numpy()
    out = np.empty_like(points)
    for axis in (0, 1):
        cells = (points[..., axis] + 1.0) / 2.0 * max(feature_size[axis] - 1, 0)
        stride = image_size[axis] / feature_size[axis]
        out[..., axis] = (cells + 0.5) * stride - 0.5
    return out


def _display_image(image: Tensor, display_image: np.ndarray | None) -> np.ndarray:
    if display_image is not None:
        display_image = np.asarray(display_image)
        if display_image.shape[:2] != tuple(image.shape[-2:]):
            raise ValueError(
                f'display_image is {display_image.shape[:2]}, the input tensor '
                f'{tuple(image.shape[-2:])}; they must have the same size'
            )
        return display_image
    img = image.detach().cpu().float()[0].permute(1, 2, 0).numpy()
    low, high = img.min(axis=(0, 1)), img.max(axis=(0, 1))
    return (img - low) / np.maximum(high - low, 1e-6)


@torch.no_grad()
def visualize_deformable_points(
    model: nn.Module,
    image_tensor: Tensor,
    block_name: str | None = None,
    query: Sequence[float] | None = None,
    out_path: str = 'deformable_points.png',
    display_image: np.ndarray | None = None,
    title: str | None = None,
    groups: Sequence[int] | None = None,
) -> str:
    """Draw the reference points, sampling positions and one query's attention weights of
    a deformable block, and save the figure as a PNG.

    Args:
        model (nn.Module): A :class:`DAT`, or a classifier / detector / segmentor whose
            ``backbone`` is one.
        image_tensor (Tensor): ``(3, H, W)`` or ``(1, 3, H, W)`` model input (normalised).
        block_name (str, optional): Deformable attention to draw, e.g.
            ``'stages.2.blocks.1.attn'``. Defaults to the last one.
        query (Sequence[float], optional): ``(y, x)`` of the query in image pixels.
            Defaults to the image centre.
        out_path (str): PNG to write. Defaults to ``'deformable_points.png'``.
        display_image (np.ndarray, optional): ``(H, W, 3)`` image to draw on (uint8 or
            floats in [0, 1]); defaults to the input tensor stretched to [0, 1].
        title (str, optional): Figure title (e.g. the model and whether its weights are
            random).
        groups (Sequence[int], optional): Offset groups to draw. Defaults to all.

    Returns:
        str: ``out_path``.
    """
    if image_tensor.dim() == 3:
        image_tensor = image_tensor[None]
    if image_tensor.dim() != 4 or image_tensor.shape[:2] != (1, 3):
        raise ValueError(f'image_tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image_tensor.shape)}')
    backbone = find_backbone(model)
    name, module = resolve_block(backbone, block_name)
    img_h, img_w = image_tensor.shape[-2:]
    query = (img_h / 2, img_w / 2) if query is None else tuple(float(v) for v in query)
    if len(query) != 2 or not (0 <= query[0] < img_h and 0 <= query[1] < img_w):
        raise ValueError(f'query must be (y, x) inside the {img_h}x{img_w} image, got {query}')
    group_ids = list(range(module.num_groups)) if groups is None else list(groups)
    if not group_ids or any(g not in range(module.num_groups) for g in group_ids):
        raise ValueError(f'groups must be in 0..{module.num_groups - 1} for {name}, got {groups}')

    captured = {}
    hook = module.register_forward_pre_hook(lambda m, args: captured.__setitem__('x', args[0]))
    was_training = backbone.training
    backbone.eval()
    try:
        device = next(backbone.parameters()).device
        backbone(image_tensor.to(device))
    finally:
        hook.remove()
        backbone.train(was_training)
    x = captured['x']
    feat_h, feat_w = x.shape[-2:]
    row = min(int(query[0] * feat_h / img_h), feat_h - 1)
    col = min(int(query[1] * feat_w / img_w), feat_w - 1)
    maps = deformable_attention_maps(module, x, torch.tensor([[row, col]]))

    image_size = (img_h, img_w)
    refs = normalised_to_pixels(maps.references, maps.feature_size, image_size).reshape(-1, 2)
    pos = normalised_to_pixels(maps.positions[0], maps.feature_size, image_size)  # g, Hk, Wk, 2
    pos = pos.reshape(module.num_groups, -1, 2)
    weights = maps.group_attention()[0, :, 0].cpu().numpy()  # g, Ns
    query_px = ((row + 0.5) * img_h / feat_h - 0.5, (col + 0.5) * img_w / feat_w - 0.5)
    background = _display_image(image_tensor, display_image)

    aspect = img_w / img_h
    fig, axes = plt.subplots(1, 2, figsize=(2 * 5.2 * aspect + 1.2, 5.6), constrained_layout=True)
    colours = plt.get_cmap('tab10' if module.num_groups <= 10 else 'tab20')
    ax = axes[0]
    ax.imshow(background, alpha=0.55)
    ax.scatter(
        refs[:, 1],
        refs[:, 0],
        s=14,
        facecolors='none',
        edgecolors='black',
        linewidths=0.8,
        label='reference points',
        zorder=3,
    )
    for g in group_ids:
        colour = colours(g % colours.N)
        delta = pos[g] - refs
        ax.quiver(
            refs[:, 1],
            refs[:, 0],
            delta[:, 1],
            delta[:, 0],
            angles='xy',
            scale_units='xy',
            scale=1,
            color=colour,
            width=0.004,
            headwidth=4,
            headlength=5,
            alpha=0.9,
            zorder=4,
        )
        ax.scatter(
            pos[g][:, 1],
            pos[g][:, 0],
            s=8,
            color=colour,
            zorder=5,
            label=f'group {g}' if len(group_ids) <= 8 else None,
        )
    ax.set_title(f'sampling positions ({len(group_ids)} of {module.num_groups} groups)', fontsize=10)
    ax.legend(
        loc='upper center',
        bbox_to_anchor=(0.5, -0.01),
        ncol=min(len(group_ids) + 1, 5),
        fontsize=7,
        frameon=False,
    )

    ax = axes[1]
    ax.imshow(background, alpha=0.45)
    shown_pos = np.concatenate([pos[g] for g in group_ids])
    shown_w = np.concatenate([weights[g] for g in group_ids])
    order = np.argsort(shown_w)  # heaviest on top
    peak = max(float(shown_w.max()), 1e-12)
    points = ax.scatter(
        shown_pos[order, 1],
        shown_pos[order, 0],
        c=shown_w[order],
        cmap='viridis',
        vmin=0.0,
        vmax=peak,
        s=8 + 160 * shown_w[order] / peak,
        edgecolors='white',
        linewidths=0.4,
        zorder=4,
    )
    ax.scatter(
        [query_px[1]],
        [query_px[0]],
        marker='*',
        s=260,
        color='red',
        edgecolors='white',
        linewidths=1.0,
        zorder=6,
        label=f'query (y={query[0]:.0f}, x={query[1]:.0f}): map cell ({row}, {col})',
    )
    fig.colorbar(
        points,
        ax=ax,
        fraction=0.046,
        pad=0.02,
        label="attention weight (mean over the group's heads)",
    )
    ax.set_title('attention of the query over the sampled keys', fontsize=10)
    ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.01), fontsize=7, frameon=False)

    # DAT++ puts the last reference row/column beyond the map (the original
    # ``DAttentionBaseline._get_ref_points`` divides by Hk - 1, LeapLabTHU/DAT): widen the
    # view to every drawn point and outline the image.
    drawn = np.concatenate([refs, pos.reshape(-1, 2)])
    low = np.minimum(drawn.min(0), (-0.5, -0.5)) - 0.02 * img_h
    high = np.maximum(drawn.max(0), (img_h - 0.5, img_w - 0.5)) + 0.02 * img_h
    for ax in axes:
        ax.add_patch(plt.Rectangle((-0.5, -0.5), img_w, img_h, fill=False, edgecolor='black', linewidth=0.8))
        ax.set_xlim(low[1], high[1])
        ax.set_ylim(high[0], low[0])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    hk, wk = maps.positions.shape[2:4]
    heading = (
        f'{name}: {feat_h}x{feat_w} queries, {hk}x{wk} keys per group, '
        f'{module.num_heads} heads / {module.num_groups} groups'
    )
    fig.suptitle(heading if not title else f'{title}\n{heading}', fontsize=11)
    out_dir = osp.dirname(osp.abspath(out_path))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(out_path, dpi=150)
    plt.close(fig)
    return out_path


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------
def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A synthetic RGB image (smooth shaded background with a few filled shapes), uint8."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = rng.uniform(60, 200, size=3)
    slope = rng.uniform(-60, 60, size=(2, 3))
    img = base + yy[..., None] * slope[0] + xx[..., None] * slope[1] + rng.normal(0, 6, (height, width, 3))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(4):
        cy, cx = rng.uniform(0.15, 0.85) * height, rng.uniform(0.15, 0.85) * width
        r = rng.uniform(0.08, 0.2) * min(height, width)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        box = [cx - r, cy - r, cx + r, cy + r]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return np.asarray(canvas)


def load_image(path: str, size: tuple[int, int] | None) -> np.ndarray:
    """Read an RGB image, resized to ``size`` ``(H, W)`` if given."""
    from PIL import Image

    if not osp.isfile(path):
        raise FileNotFoundError(f'image {path!r} does not exist')
    img = Image.open(path).convert('RGB')
    if size is not None:
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    return np.asarray(img)


def to_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float], bgr: bool = False) -> Tensor:
    """``(H, W, 3)`` uint8 RGB -> normalised ``(1, 3, H, W)`` float tensor."""
    x = torch.from_numpy(np.array(image, dtype=np.float32))
    if bgr:
        x = x.flip(-1)
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    return x.permute(2, 0, 1)[None]


def build_from_config(config: str, checkpoint: str | None) -> tuple[nn.Module, dict]:
    """A model of an mmpretrain / mmdet / mmseg config, with its checkpoint loaded strictly.

    Returns:
        tuple: The model and its ``data_preprocessor`` settings (mean, std, channel order).
    """
    from mmengine.runner import load_checkpoint

    model, scope, cfg = build_config_model(config)
    if checkpoint:
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    pre = cfg.model.get('data_preprocessor') or {}
    # mmdet / mmseg load BGR images and convert them when bgr_to_rgb is set; mmpretrain
    # uses to_rgb. Our images are RGB: feed BGR only when the model was trained on BGR.
    rgb = pre.get('bgr_to_rgb', pre.get('to_rgb', scope == 'mmpretrain'))
    return model, dict(mean=pre.get('mean', IMAGENET_MEAN), std=pre.get('std', IMAGENET_STD), bgr=not rgb)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Draw the sampling points and attention of a DAT deformable attention block',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('image', nargs='?', help='image file (or use --random)')
    parser.add_argument('--random', action='store_true', help='use a synthetic image')
    parser.add_argument('--arch', help='DAT variant (e.g. datpp-t), with an optional --checkpoint')
    parser.add_argument('--config', help='mmpretrain / mmdet / mmseg config of the model')
    parser.add_argument('--checkpoint', help='weights; without it the weights are random')
    parser.add_argument(
        '--prefix',
        default='backbone.',
        help='--arch: prefix of the backbone keys in the checkpoint',
    )
    parser.add_argument('--block', help='deformable attention, e.g. stages.2.blocks.1.attn (default: the last one)')
    parser.add_argument(
        '--query',
        type=float,
        nargs=2,
        metavar=('Y', 'X'),
        help='query pixel (default: the image centre)',
    )
    parser.add_argument(
        '--size',
        type=int,
        nargs='+',
        default=[224],
        help='resize the image to S or H W pixels (default 224)',
    )
    parser.add_argument('--groups', type=int, nargs='+', help='offset groups to draw (default all)')
    parser.add_argument('--seed', type=int, default=0, help='seed of --random and random weights')
    parser.add_argument('--out', default='deformable_points.png', help='PNG to write')
    args = parser.parse_args(argv)
    if bool(args.image) == args.random:
        parser.error('give an image path or --random (not both)')
    if bool(args.arch) == bool(args.config):
        parser.error('give either --arch NAME or --config CONFIG')
    if len(args.size) not in (1, 2) or any(s <= 0 for s in args.size):
        parser.error(f'--size takes one or two positive ints (S or H W), got {args.size}')
    args.size = (args.size[0], args.size[0]) if len(args.size) == 1 else tuple(args.size)
    return args


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.config:
        model, pre = build_from_config(args.config, args.checkpoint)
        source = osp.splitext(osp.basename(args.config))[0]
    else:
        img_size = 384 if args.arch.lower().endswith('-384') else 224
        model = DAT(args.arch, img_size=img_size)
        if args.checkpoint:
            load_pretrained_backbone(model, args.checkpoint, prefix=args.prefix or None)
        pre = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, bgr=False)
        source = args.arch
    weights = (
        f'weights: {osp.basename(args.checkpoint)}'
        if args.checkpoint
        else f'RANDOM weights (seed {args.seed}), no checkpoint'
    )
    if args.random:
        image, image_name = random_image(*args.size, seed=args.seed), 'synthetic image'
    else:
        image, image_name = load_image(args.image, args.size), osp.basename(args.image)
    tensor = to_tensor(image, pre['mean'], pre['std'], pre['bgr'])
    title = f'{source}, {weights}, {image_name}'
    out = visualize_deformable_points(
        model,
        tensor,
        args.block,
        args.query,
        args.out,
        display_image=image,
        title=title,
        groups=args.groups,
    )
    print(f'wrote {out}')
    return out


if __name__ == '__main__':
    main()
