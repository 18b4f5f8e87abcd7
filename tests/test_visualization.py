"""Deformable-points visualiser and the inspection helpers behind it."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.tiny_archs import TINY
from PIL import Image

from projects.dat import DAT
from projects.dat.models.dat import DeformableAttention
from projects.dat.models.inspection import deformable_attention_maps, record_sampling_points

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    'vis_deformable_points', REPO / 'tools/visualization/vis_deformable_points.py'
)
vis = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vis)


def _tiny(version):
    torch.manual_seed(0)
    model = DAT(TINY[version]).eval()
    # Offsets of a freshly initialised model are tiny; make them visible.
    for m in model.modules():
        if isinstance(m, DeformableAttention):
            torch.nn.init.normal_(m.conv_offset[-1].weight, std=0.5)
    return model


def _check_png(path, min_size=(300, 600)):
    assert path.is_file() and path.stat().st_size > 10_000
    with Image.open(path) as img:
        assert img.format == 'PNG'
        assert img.height >= min_size[0] and img.width >= min_size[1]


@pytest.mark.parametrize('version', ['v1', 'pp'])
def test_writes_png_for_a_tiny_random_model(version, tmp_path):
    model = _tiny(version)
    image = torch.randn(3, 96, 128)
    out = vis.visualize_deformable_points(
        model,
        image,
        None,
        (40, 70),
        str(tmp_path / 'a' / 'p.png'),
        title='tiny model, random weights',
    )
    _check_png(Path(out))
    # Every deformable block, named with or without the backbone prefix and .attn suffix.
    names = list(vis.deformable_blocks(model))
    assert names[0] == 'stages.0.blocks.1.attn' if version == 'pp' else 'stages.2.blocks.1.attn'
    out = vis.visualize_deformable_points(
        model,
        image[None],
        'backbone.' + names[0][: -len('.attn')],
        None,
        str(tmp_path / 'first.png'),
        groups=[0],
    )
    _check_png(Path(out))


def test_accepts_a_classifier_with_display_image(tmp_path):
    from mmengine.registry import DefaultScope
    from mmpretrain.models import GlobalAveragePooling, ImageClassifier, LinearClsHead
    from mmpretrain.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = ImageClassifier(
            backbone=_tiny('pp'),
            neck=GlobalAveragePooling(),
            head=LinearClsHead(num_classes=3, in_channels=128),
        )
    model.train()
    picture = vis.random_image(64, 80, seed=1)
    tensor = vis.to_tensor(picture, vis.IMAGENET_MEAN, vis.IMAGENET_STD)
    out = vis.visualize_deformable_points(
        model,
        tensor,
        'stages.3.blocks.0.attn',
        (10, 70),
        str(tmp_path / 'cls.png'),
        display_image=picture,
    )
    _check_png(Path(out))
    assert model.backbone.training  # the mode is restored


@pytest.mark.parametrize('version', ['v1', 'pp'])
@pytest.mark.parametrize('size', [(64, 64), (96, 136)])
def test_attention_maps_reproduce_the_block(version, size):
    """softmax(logits) @ v of the inspection equals the block's own output; positions equal
    what the backbone records."""
    model = _tiny(version)
    captured = {}
    for name, m in model.named_modules():
        if isinstance(m, DeformableAttention):
            m.register_forward_pre_hook(lambda mod, args, name=name: captured.__setitem__(name, args[0]))
            m.proj_v.register_forward_hook(lambda mod, i, o, name=name: captured.__setitem__(name + '.v', o))
            m.proj_out.register_forward_pre_hook(
                lambda mod, args, name=name: captured.__setitem__(name + '.out', args[0])
            )
    with torch.no_grad(), record_sampling_points(model) as records:
        model(torch.randn(1, 3, *size))
    for name, module in vis.deformable_blocks(model).items():
        x, v, expected = captured[name], captured[name + '.v'], captured[name + '.out']
        b, c, h, w = x.shape
        maps = deformable_attention_maps(module, x)
        assert maps.feature_size == (h, w)
        assert maps.attention.shape == (
            1,
            module.num_heads,
            h * w,
            maps.positions.shape[2] * maps.positions.shape[3],
        )
        torch.testing.assert_close(maps.attention.sum(-1), torch.ones(1, module.num_heads, h * w))
        torch.testing.assert_close(maps.positions, records[name]['positions'])
        torch.testing.assert_close(maps.references, records[name]['references'])
        d = c // module.num_heads
        out = torch.einsum('bhmn,bhdn->bhdm', maps.attention, v.reshape(b, module.num_heads, d, -1))
        torch.testing.assert_close(out.reshape(b, c, h, w), expected, rtol=1e-5, atol=1e-5)
        # A chosen subset of queries gives the matching rows.
        some = torch.tensor([[0, 0], [h - 1, w - 1], [h // 2, 1]])
        sub = deformable_attention_maps(module, x, some)
        rows = some[:, 0] * w + some[:, 1]
        torch.testing.assert_close(sub.attention, maps.attention[:, :, rows])
        assert sub.group_attention().shape == (1, module.num_groups, 3, maps.attention.shape[-1])


def test_normalised_to_pixels():
    # -1 and +1 are the centres of the first and last cells of a stride-8 map of 4 cells.
    pts = vis.normalised_to_pixels(torch.tensor([[-1.0, 1.0]]), (4, 4), (32, 32))
    np.testing.assert_allclose(pts, [[3.5, 27.5]])
    pts = vis.normalised_to_pixels(torch.tensor([0.0, 0.0]), (1, 1), (32, 48))
    np.testing.assert_allclose(pts, [15.5, 23.5])


def test_errors(tmp_path):
    model = _tiny('pp')
    image = torch.randn(3, 64, 64)
    with pytest.raises(ValueError, match='is not a deformable attention block of this model'):
        vis.visualize_deformable_points(model, image, 'stages.0.blocks.0.attn', None, str(tmp_path / 'x.png'))
    with pytest.raises(ValueError, match='query must be'):
        vis.visualize_deformable_points(model, image, None, (64, 3), str(tmp_path / 'x.png'))
    with pytest.raises(ValueError, match='image_tensor must be'):
        vis.visualize_deformable_points(model, image[:2], None, None, str(tmp_path / 'x.png'))
    with pytest.raises(ValueError, match='groups must be in 0..1'):
        vis.visualize_deformable_points(model, image, None, None, str(tmp_path / 'x.png'), groups=[2])
    with pytest.raises(TypeError, match='expected a DAT backbone'):
        vis.visualize_deformable_points(torch.nn.Linear(2, 2), image, None, None, str(tmp_path / 'x.png'))
    module = model.stages[3].blocks[0].attn
    with pytest.raises(ValueError, match='queries must be'):
        deformable_attention_maps(module, torch.randn(1, 128, 2, 2), torch.tensor([[2, 0]]))
    with pytest.raises(ValueError, match=r'x must be \(B, 128, H, W\)'):
        deformable_attention_maps(module, torch.randn(1, 64, 2, 2))
    with pytest.raises(TypeError, match='expected a DeformableAttention'):
        deformable_attention_maps(model.stages[0].blocks[0].attn, torch.randn(1, 16, 8, 8))


def test_cli_random_and_image(tmp_path, capsys):
    out = tmp_path / 'cli.png'
    vis.main(
        [
            '--random',
            '--arch',
            'datpp-t',
            '--size',
            '64',
            '96',
            '--query',
            '10',
            '90',
            '--out',
            str(out),
        ]
    )
    _check_png(out)
    assert f'wrote {out}' in capsys.readouterr().out
    photo = tmp_path / 'photo.jpg'
    Image.fromarray(vis.random_image(50, 70, seed=3)).save(photo)
    vis.main(
        [
            str(photo),
            '--arch',
            'dat-t',
            '--size',
            '112',
            '--block',
            'stages.2.blocks.1',
            '--out',
            str(tmp_path / 'v1.png'),
        ]
    )
    _check_png(tmp_path / 'v1.png')
    with pytest.raises(SystemExit):
        vis.main(['--arch', 'dat-t'])
    assert 'give an image path or --random' in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match='does not exist'):
        vis.main([str(tmp_path / 'nope.jpg'), '--arch', 'dat-t'])
