"""The models, inputs and machine record that the analysis tools share.

``tools/analysis_tools/benchmark.py`` times models and ``tools/analysis_tools/profile_layers.py``
profiles them; both name a model by a spec and an input by a size and batch, parsed and built
here, so that the two compare the same models (see ``benchmark.py --help`` for the specs):

- ``ARCH[:IMPL][:cp]``: a DAT backbone of ``DAT.arch_zoo`` with ``attn_impl`` IMPL;
- ``swin-t``: mmdet's Swin-T backbone of its Swin-T Mask R-CNN config, or timm's where mmdet
  cannot be imported (:class:`TimmSwinT`);
- ``CONFIG.py[:IMPL][:cp|nocp]``: the whole model of a toolbox config in ``mode='tensor'``.
"""

from __future__ import annotations

import os
import os.path as osp
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models.attn_impl import set_attn_impl
from .models.dat import DAT
from .ops import ATTN_IMPLS, gpu_kernels
from .toolboxes import build_config_model, build_toolbox_model, dummy_data_sample

__all__ = [
    'SWIN_T',
    'IMPLS',
    'parse_model_spec',
    'parse_input_spec',
    'training_loss',
    'run_step',
    'TimmSwinT',
    'build_swin_t',
    'build_model',
    'seeded_model_and_input',
    'allocator_settings',
    'checkout_description',
    'machine_description',
]

# Spec names of the implementations: attn_impl's values, and the name earlier runs used for 'pytorch'.
IMPL_ALIASES = {'fast-pytorch': 'pytorch'}
IMPLS = (*ATTN_IMPLS, *IMPL_ALIASES)
CHECKPOINTING = {'cp': True, 'nocp': False}

# mmdet configs/swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py, without the pretrained init.
SWIN_T = dict(
    type='SwinTransformer',
    embed_dims=96,
    depths=[2, 2, 6, 2],
    num_heads=[3, 6, 12, 24],
    window_size=7,
    mlp_ratio=4,
    qkv_bias=True,
    qk_scale=None,
    drop_rate=0.0,
    attn_drop_rate=0.0,
    drop_path_rate=0.2,
    patch_norm=True,
    out_indices=(0, 1, 2, 3),
    with_cp=False,
    convert_weights=True,
)


def parse_model_spec(spec: str) -> tuple[str, str | None, bool | None]:
    """``'datpp-t:fast'`` -> ``('datpp-t', 'fast', None)``; ``'datpp-t:reference:cp'`` ->
    ``('datpp-t', 'reference', True)``; ``'swin-t'`` -> ``('swin-t', None, None)``.

    The optional third field is ``cp`` (activation checkpointing on) or ``nocp`` (off); without
    it a DAT backbone runs without checkpointing and a config keeps its own ``with_cp``.

    Raises:
        ValueError: For an unknown model, implementation or checkpointing field.
    """
    name, *fields = spec.split(':')
    if len(fields) > 2:
        raise ValueError(f'Model spec {spec!r} has more than three fields; expected NAME[:IMPL][:cp|nocp]')
    impl = fields[0] if fields and fields[0] else None
    checkpointing = fields[1] if len(fields) == 2 else None
    if impl is not None and impl not in IMPLS:
        raise ValueError(f'Unknown attention implementation {impl!r} in model spec {spec!r}; expected one of {IMPLS}')
    if checkpointing is not None and checkpointing not in CHECKPOINTING:
        raise ValueError(
            f'Unknown checkpointing field {checkpointing!r} in model spec {spec!r}; expected one of '
            f'{tuple(CHECKPOINTING)}'
        )
    if name == 'swin-t':
        if fields:
            raise ValueError(f'swin-t takes no attention implementation or checkpointing field, got {spec!r}')
    elif name.endswith('.py'):
        if not osp.isfile(name):
            raise ValueError(f'Config file {name!r} of model spec {spec!r} does not exist')
    elif name.lower() not in DAT.arch_zoo:
        raise ValueError(
            f'Unknown model {name!r} in spec {spec!r}; expected a DAT arch '
            f'({", ".join(sorted(DAT.arch_zoo))}), swin-t or a config file (.py)'
        )
    return name, impl, None if checkpointing is None else CHECKPOINTING[checkpointing]


def parse_input_spec(spec: str) -> tuple[int, int, int]:
    """``'224@32'`` -> ``(224, 224, 32)``; ``'1344x800@1'`` -> ``(1344, 800, 1)`` (W, H, B).

    Raises:
        ValueError: For another format or non-positive numbers.
    """
    try:
        size, _, batch = spec.partition('@')
        width, _, height = size.lower().partition('x')
        w, h, b = int(width), int(height or width), int(batch or 1)
    except ValueError:
        w = h = b = 0
    if min(w, h, b) <= 0:
        raise ValueError(f'Input spec must be S@B or WxH@B with positive ints (e.g. 224@32, 1344x800@1), got {spec!r}')
    return w, h, b


def _tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) output: a tensor, or dicts, lists and tuples of them, in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensor_leaves(item)]
    return []


def training_loss(outputs: Any) -> torch.Tensor:
    """The loss a timed or profiled training step backpropagates: the sum over every output
    tensor (float32) of the mean of its elements, each weighted by its channel's (dim 1's) place
    on a ramp from 1 to 2, so that every output gets a gradient that differs across channels.

    With equal weights, the input gradient of a LayerNorm before the outputs (as in DAT's and
    Swin's backbones, whose norms are initialised to equal weights) is zero in exact arithmetic,
    and the backward pass would carry round-off in place of gradients.
    """
    return sum(_channel_weighted_mean(t.float()) for t in _tensor_leaves(outputs))


def _channel_weighted_mean(t: torch.Tensor) -> torch.Tensor:
    if t.dim() < 2:
        return t.mean()
    ramp = torch.linspace(1.0, 2.0, t.size(1), device=t.device)
    return (t * ramp.view(-1, *([1] * (t.dim() - 2)))).mean()


def run_step(model: nn.Module, run: Any, inputs: torch.Tensor, backward: bool, amp: bool) -> None:
    """One iteration as the tools time and profile it: ``run(inputs)`` with gradients where
    ``backward`` and under autocast where ``amp`` (fp16 on CUDA, bf16 elsewhere), then the
    :func:`training_loss`'s backward pass and the parameters' gradients dropped; on CUDA the
    device is synchronised, so that the iteration's wall time is its work.

    Args:
        model (nn.Module): The model whose gradients are dropped.
        run (callable): The callable to time (:func:`build_model`).
        inputs (Tensor): Its input.
        backward (bool): Forward and backward pass, else the forward pass without gradients.
        amp (bool): Autocast.
    """
    device = inputs.device
    amp_dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    with torch.set_grad_enabled(backward), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
        outputs = run(inputs)
    if backward:
        training_loss(outputs).backward()
        for p in model.parameters():
            p.grad = None
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class TimmSwinT(nn.Module):
    """Swin-T from timm with the outputs of mmdet's backbone: the four stages' maps, each through a
    LayerNorm, NCHW.

    timm's ``swin_tiny_patch4_window7_224`` has mmdet's Swin-T architecture (patch 4, window 7,
    depths 2-2-6-2, 3-6-12-24 heads, 96-768 channels). ``strict_img_size=False`` takes any input
    size (maps padded to whole windows, shift masks built for each input, as mmdet does) and
    ``always_partition=True`` keeps window 7 and shift 3 in every stage, also where a map is a
    single window (mmdet does not shrink them either). mmdet adds a LayerNorm to each output; so
    does this module. For where mmdet cannot be imported (its models import mmcv's compiled ops).
    """

    def __init__(self):
        super().__init__()
        import timm

        self.body = timm.create_model(
            'swin_tiny_patch4_window7_224',
            pretrained=False,
            features_only=True,
            strict_img_size=False,
            always_partition=True,
            drop_path_rate=SWIN_T['drop_path_rate'],
        )
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for channels in self.body.feature_info.channels())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # timm's Swin features are NHWC; mmdet's backbone returns contiguous NCHW maps.
        return tuple(norm(f).permute(0, 3, 1, 2).contiguous() for norm, f in zip(self.norms, self.body(x), strict=True))


def build_swin_t() -> tuple[nn.Module, str]:
    """Swin-T with the settings of mmdet's Swin-T Mask R-CNN backbone: mmdet's
    ``SwinTransformer``, or :class:`TimmSwinT` where mmdet cannot be imported.

    Returns:
        tuple: The model and what it is (``model_source`` of the results).

    Raises:
        ImportError: Where neither mmdet nor timm can be imported.
    """
    try:
        return build_toolbox_model(SWIN_T, 'mmdet'), 'mmdet SwinTransformer'
    except ImportError as exc:
        mmdet_error = f'{type(exc).__name__}: {exc}'
    try:
        import timm
    except ImportError as exc:
        raise ImportError(f'swin-t needs mmdet ({mmdet_error}) or timm ({type(exc).__name__}: {exc})') from exc
    source = f'timm {timm.__version__} swin_tiny_patch4_window7_224 (mmdet could not be imported: {mmdet_error})'
    return TimmSwinT(), source


def build_model(spec: str, height: int, width: int) -> tuple[nn.Module, Any, str]:
    """The module to time, a function ``run(inputs)`` returning its output, and what was built.

    Args:
        spec (str): A model spec (see the module docstring).
        height (int): Input height (whole models: the data samples' image shape).
        width (int): Input width.

    Returns:
        tuple: the model, the callable to time, and the model's source (``model_source`` of the
        results: for ``swin-t`` whether mmdet's or timm's Swin-T was built).
    """
    name, impl, with_cp = parse_model_spec(spec)
    impl = IMPL_ALIASES.get(impl, impl)
    if name == 'swin-t':
        model, source = build_swin_t()
        return model, model, source
    if not name.endswith('.py'):
        model = DAT(name, attn_impl=impl or 'auto', with_cp=bool(with_cp))
        return model, model, f'projects.dat DAT {name}'

    model, scope, _ = build_config_model(name, None if with_cp is None else {'model.backbone.with_cp': with_cp})
    if impl is not None:
        set_attn_impl(model, impl)
    if scope == 'mmseg' and getattr(model, 'auxiliary_head', None) is not None:
        model.auxiliary_head = None  # training-only head, not part of the tensor-mode graph

    def run(inputs: torch.Tensor) -> Any:
        samples = None if scope == 'mmpretrain' else [dummy_data_sample(scope, height, width) for _ in inputs]
        return model(inputs, samples, mode='tensor')

    return model, run, f'{scope} {type(model).__name__} of {name}'


def seeded_model_and_input(spec: str, width: int, height: int, batch: int, device: str = 'cpu') -> tuple:
    """The model of a spec and a random input, seeded: the same weights and input in every process.

    Returns:
        tuple: the model (on ``device``), the callable to time and what the model is (see
        :func:`build_model`), and the ``(batch, 3, height, width)`` input.
    """
    torch.manual_seed(0)
    model, run, source = build_model(spec, height, width)
    model.to(device)
    return model, run, source, torch.randn(batch, 3, height, width, device=device)


def allocator_settings() -> dict[str, str]:
    """How this process's freed memory goes back to the OS: the environment that sets it (a
    preloaded allocator, glibc's ``MALLOC_*`` tunables) and the kernel's transparent huge pages.

    On CPU a large tensor that the allocator hands back to the OS is faulted in page by page when
    the next one takes its place (glibc maps every allocation above its mmap threshold, at most
    32 MiB, afresh): at detection sizes that changed a training step's time by a fifth and its
    spread between rounds several times over (docs/benchmarks.md, "Page faults"). Timings are
    comparable only with the same settings, so every result records them.

    Returns:
        dict: the variables that are set (``LD_PRELOAD``, ``GLIBC_TUNABLES`` and names with
        ``MALLOC`` in them), and ``transparent_hugepage``: the kernel's mode where it says.
    """
    settings = {
        name: value
        for name, value in sorted(os.environ.items())
        if name in ('LD_PRELOAD', 'GLIBC_TUNABLES') or 'MALLOC' in name
    }
    try:
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
            settings['transparent_hugepage'] = f.read().split('[', 1)[1].split(']', 1)[0]
    except (OSError, IndexError):
        pass
    return settings


def memory_total_mib() -> float | None:
    """The machine's memory (``MemTotal``) in MiB, or None where /proc/meminfo is not readable."""
    try:
        with open('/proc/meminfo') as f:
            return int(f.readline().split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None


def checkout_description(root: str | Path | None = None) -> dict[str, Any] | None:
    """The git commit of the checkout that this package runs from, and how many of its files
    differ from that commit; None where the package is not run from the top of a git checkout
    (e.g. installed in site-packages, or git not installed).

    Args:
        root (str | Path, optional): The checkout to describe; default: the one holding
            ``projects/dat``.
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(['git', '-C', str(root), *args], capture_output=True, text=True, check=True).stdout

    try:
        # A checkout above root (a virtual environment inside the user's own repository) is not ours.
        if Path(git('rev-parse', '--show-toplevel').strip()).resolve() != root.resolve():
            return None
        return dict(
            commit=git('rev-parse', 'HEAD').strip(), changed_files=len(git('status', '--porcelain').splitlines())
        )
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_description(device: str, threads: int) -> dict[str, Any]:
    """CPU / GPU, memory, software versions, load and the checkout's commit, for the record."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    info = dict(
        cpu=cpu,
        logical_cpus=os.cpu_count(),
        threads=threads,
        python=platform.python_version(),
        torch=torch.__version__,
        platform=platform.platform(),
    )
    memory_mib = memory_total_mib()
    if memory_mib is not None:
        info['memory_gib'] = round(memory_mib / 1024, 1)
    try:
        info['load_average'] = list(os.getloadavg())
    except OSError:
        pass
    info['allocator'] = allocator_settings()
    info['git'] = checkout_description()
    if device.startswith('cuda') and torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name(torch.device(device))
        info['cuda'] = torch.version.cuda
        # Whether the fast path's deformable and neighbourhood attention run in their Triton kernels (opt-in).
        info['gpu_kernels'] = gpu_kernels.available()
    return info
