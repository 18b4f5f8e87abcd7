"""DAT (CVPR 2022) and DAT++ backbones.

Papers:
    Xia et al., "Vision Transformer with Deformable Attention", CVPR 2022.
    Xia et al., "DAT++: Spatially Dynamic Vision Transformer with Deformable Attention",
    arXiv:2309.01430.

The file reads top-down: normalisation and feed-forward layers, the four attention blocks
(``L``/``S`` Swin windows, ``N`` neighbourhood, ``D`` deformable), the block and stage, the
backbone. The math of each attention lives in ``projects.dat.ops`` and the geometry in
``geometry.py``; the variant table and its checks in ``variants.py``, the loading of
pretrained weights in ``pretrained.py``.
"""

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmengine.logging import MMLogger, print_log
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmengine.registry import MODELS
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import (
    check_attn_impl,
    deformable_attention,
    depthwise_conv_gelu,
    depthwise_conv_gelu_linear,
    depthwise_conv_plus_identity,
    neighborhood_attention,
    sample_keys,
    strided_depthwise_conv,
    window_attention,
)
from ..ops.chunking import cpu_last_level_cache_bytes
from ..ops.torch_compat import is_autocast_enabled
from ..registration import register_class
from .geometry import (
    key_reference_points,
    offset_conv_padding,
    offset_scale,
    pad_to_at_least,
    pad_to_multiple,
    query_grid,
    relative_position_index,
    shapes_are_traced,
    shift_size_for,
    shifted_window_mask,
    stripes_with_halo,
    window_partition,
    window_reverse,
)
from .layers import DropPathResidual, GELU2d, PointwiseConv2d
from .pretrained import load_pretrained_backbone
from .variants import ARCH_ZOO, check_drop_path_rate, is_int, resolve_arch

# Hidden activations per stripe of the DAT++ feed-forward at inference (see ConvFFN).
FFN_STRIPE_BYTES = 1 << 22


def _fit_in_cache(t: Tensor, copies: int) -> bool:
    """Whether ``copies`` tensors of ``t``'s size fit in the CPU's last-level cache together (False
    where its size is unknown)."""
    cache = cpu_last_level_cache_bytes()
    return 0 < copies * t.numel() * t.element_size() <= cache


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW map (channels-last semantics)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def _run_hidden(fn, y: Tensor, recompute: bool) -> Tensor:
    """``fn(y)``; with ``recompute`` (and gradients) only ``y`` is stored for the backward pass.

    Non-reentrant checkpointing recomputes ``fn``'s ops in the backward pass and stops as soon
    as the tensors that backward needs are back, i.e. before ``fn``'s last layer.
    """
    if recompute and y.requires_grad:
        return cp.checkpoint(fn, y, use_reentrant=False)
    return fn(y)


class TokenMLP(nn.Module):
    """v1 feed-forward: ``Linear(C, rC) -> GELU -> Linear(rC, C)`` on every position.

    With ``recompute_hidden`` the GELU output is recomputed in the backward pass instead of
    stored (one of the two ``rC``-channel tensors); the results are the same.

    Args:
        dim (int): Channels.
        mlp_ratio (int): Hidden expansion.
        recompute_hidden (bool): Recompute the GELU in the backward pass. Defaults to False.
    """

    def __init__(self, dim: int, mlp_ratio: int = 4, recompute_hidden: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim * mlp_ratio)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim * mlp_ratio, dim)
        self.recompute_hidden = recompute_hidden

    def _after_fc1(self, y: Tensor) -> Tensor:
        return self.fc2(self.act(y))

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc1(x.permute(0, 2, 3, 1))
        return _run_hidden(self._after_fc1, y, self.recompute_hidden).permute(0, 3, 1, 2)


class ConvFFN(nn.Module):
    """DAT++ feed-forward: ``y = fc1(x); y = GELU(y + DWConv3x3(y)); out = fc2(y)``.

    Its three hidden ``4C``-channel tensors (``y``, the GELU input and the GELU output) are the
    largest activations of a DAT++ block. The hidden layer ``GELU(y + DWConv3x3(y))`` runs as one
    custom operator on CPU (float32; :func:`~projects.dat.ops.depthwise_conv_gelu`: a fused C++
    kernel where built with AVX2 or AVX-512, else oneDNN's conv and PyTorch's GELU), which keeps
    only ``y`` for the backward pass. With ``recompute_hidden`` only ``y`` is kept at all: the
    hidden layer is recomputed in the backward pass (not ``fc2``); on CPU (float32) the hidden
    layer and ``fc2`` then run as one operator whose backward pass recomputes the hidden layer
    once (:func:`~projects.dat.ops.depthwise_conv_gelu_linear`). The results are the same. Without
    autograd (inference) on CPU, where ``fc1``'s output and the hidden activations together are
    larger than the CPU's last-level cache, everything after ``fc1`` runs on stripes of rows of
    about :data:`FFN_STRIPE_BYTES` of hidden activations each, which stay in the cache instead of
    the whole maps going through memory one layer after the other (the same numbers to float32
    round-off: each stripe's conv reads its neighbour rows); where the two maps fit in the cache
    they stay there anyway, and the stripes only add the cost of their many small ops. Not while
    the forward pass is traced (:func:`~.geometry.shapes_are_traced`).

    Args:
        dim (int): Channels.
        mlp_ratio (int): Hidden expansion.
        recompute_hidden (bool): Recompute the hidden activations in the backward pass instead
            of storing them. Defaults to False.
        impl (str): Implementation of the hidden layer, one of
            :data:`~projects.dat.ops.ATTN_IMPLS` (see :func:`~projects.dat.ops.select_backend`):
            the fused kernel or PyTorch's conv and GELU. Defaults to ``'auto'``.
    """

    def __init__(self, dim: int, mlp_ratio: int = 4, recompute_hidden: bool = False, impl: str = 'auto'):
        super().__init__()
        hidden = dim * mlp_ratio
        self.impl = check_attn_impl(impl)
        self.fc1 = PointwiseConv2d(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = PointwiseConv2d(hidden, dim)
        self.recompute_hidden = recompute_hidden

    def _hidden(self, y: Tensor) -> Tensor:
        return depthwise_conv_gelu(y, self.dwconv, self.impl)

    def _after_fc1(self, y: Tensor) -> Tensor:
        return self.fc2(self._hidden(y))

    def _after_fc1_in_stripes(self, y: Tensor) -> Tensor:
        """:meth:`_after_fc1` stripe by stripe of rows (no autograd; CPU: a GPU has no cache to
        keep them in and would only launch more kernels)."""
        batch, hidden, height, width = y.shape
        rows = max(1, FFN_STRIPE_BYTES // (batch * hidden * width * y.element_size()))
        # A traced graph (ONNX export, torch.jit.trace, FLOP counting) gets the plain computation:
        # traced stripes would be fixed to the traced size, and a FLOP count would include the
        # halo rows each stripe's conv reads again.
        if rows >= height or y.device.type != 'cpu' or shapes_are_traced() or _fit_in_cache(y, copies=2):
            return self._after_fc1(y)
        out = torch.empty(
            batch,
            self.fc2.out_channels,
            height,
            width,
            dtype=y.dtype,
            device=y.device,
            memory_format=torch.channels_last,
        )
        for top, bottom, halo_top, halo_bottom in stripes_with_halo(height, rows, halo=1):
            # The conv's zero padding is right at the map's edges; inside, the halo rows are read
            # and the output rows next to the stripe's padding are dropped.
            hidden = self._hidden(y[:, :, halo_top:halo_bottom])
            out[:, :, top:bottom] = self.fc2(hidden[:, :, top - halo_top : bottom - halo_top])
        return out

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc1(x)
        if not (torch.is_grad_enabled() and y.requires_grad):
            return self._after_fc1_in_stripes(y)
        if self.recompute_hidden:
            return depthwise_conv_gelu_linear(y, self.dwconv, self.fc2, self.impl)
        return self._after_fc1(y)


class WindowAttention(nn.Module):
    """Swin window attention, plain (``L``) or shifted (``S``), of DAT v1.

    Maps that are not multiples of the window are zero-padded at the bottom/right and the
    shift mask is built for the padded map at run time (as mmdet's Swin does); at the
    construction size of the released models nothing is padded and the result equals the
    original.

    Args:
        dim (int): Channels.
        num_heads (int): Attention heads.
        window_size (int): Window side.
        shifted (bool): Roll the map by ``ceil(w / 2)`` before partitioning (the ``S`` block).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shifted: bool):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size_for(window_size) if shifted else 0
        self.scale = (dim // num_heads) ** -0.5
        self.proj_qkv = nn.Linear(dim, 3 * dim)
        self.proj_out = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.01)
        self.register_buffer('relative_position_index', relative_position_index(window_size), persistent=False)

    def extra_repr(self) -> str:
        return f'heads={self.num_heads}, window={self.window_size}, shift={self.shift_size}'

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        ws = self.window_size
        x, _, _ = pad_to_multiple(x, ws)
        hp, wp = x.shape[-2:]
        x = x.permute(0, 2, 3, 1)
        mask = None
        if self.shift_size:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
            mask = shifted_window_mask(hp, wp, ws, self.shift_size, x.device).to(x.dtype)
        windows = window_partition(x, ws)
        n = ws * ws
        qkv = self.proj_qkv(windows).reshape(-1, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1)
        out = window_attention(q * self.scale, k, v, bias, mask)
        out = self.proj_out(out.transpose(1, 2).reshape(-1, n, c))
        x = window_reverse(out, ws, hp, wp)
        if self.shift_size:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return x[:, :h, :w].permute(0, 3, 1, 2)


class NeighborhoodAttention(nn.Module):
    """Neighbourhood attention (``N`` block of DAT++), NATTEN semantics.

    A map smaller than the kernel is zero-padded at the bottom/right before ``qkv`` (the
    padded positions are real keys carrying the ``qkv`` bias) and cropped afterwards.

    Args:
        dim (int): Channels.
        num_heads (int): Attention heads.
        kernel_size (int): Neighbourhood size. Defaults to 7.
        impl (str): Implementation of the attention, one of :data:`~projects.dat.ops.ATTN_IMPLS`
            (see :func:`~projects.dat.ops.select_backend`). Defaults to ``'auto'``.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, impl: str = 'auto'):
        super().__init__()
        self.impl = check_attn_impl(impl)
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        trunc_normal_(self.rpb, std=0.02)

    def extra_repr(self) -> str:
        return f'heads={self.num_heads}, kernel={self.kernel_size}'

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = x.permute(0, 2, 3, 1)
        x = pad_to_at_least(x, self.kernel_size)
        hp, wp = x.shape[1:3]
        qkv = self.qkv(x).reshape(b, hp, wp, 3, self.num_heads, c // self.num_heads)
        # Views of the one qkv buffer, which the C++ kernels read in place (and whose gradient
        # the three gradients are stacked into, along the same axis).
        q, k, v = (t.permute(0, 3, 1, 2, 4) for t in qkv.unbind(3))
        out = neighborhood_attention(q, k, v, self.rpb, self.kernel_size, self.impl, scale=self.scale)
        out = out.permute(0, 2, 3, 1, 4).reshape(b, hp, wp, c)[:, :h, :w]
        return self.proj(out).permute(0, 3, 1, 2)


class OffsetNetwork(nn.Sequential):
    """The offset network of a ``D`` block: depth-wise conv (stride: the key stride), LayerNorm,
    GELU and a 1x1 conv to two offsets, on the queries of each offset group with weights shared
    by the groups.

    The layers are those of the original's ``nn.Sequential`` (their parameters keep its names,
    ``0`` to ``3``), run as functions: a depth-wise conv treats every channel alone, so the groups
    go through one conv over all ``C`` channels with the kernel repeated per group, which reads the
    channels-last queries in place, and the rest runs on the channels-last result viewed as
    ``(B, Hk, Wk, groups, C / groups)``. The per-group maps ``(B * groups, C / groups, H, W)`` of
    the original are a view that convolutions copy first, forward and backward. The same values.

    Args:
        group_dim (int): Channels of one group.
        kernel_size (int): Kernel of the depth-wise conv.
        stride (int): Its stride, the key stride.
    """

    def __init__(self, group_dim: int, kernel_size: int, stride: int):
        super().__init__(
            nn.Conv2d(
                group_dim,
                group_dim,
                kernel_size,
                stride,
                offset_conv_padding(kernel_size, stride),
                groups=group_dim,
            ),
            LayerNorm2d(group_dim),
            GELU2d(),
            PointwiseConv2d(group_dim, 2, bias=False),
        )

    def forward(self, q: Tensor, num_groups: int, impl: str = 'auto') -> Tensor:
        """The offsets of every group's keys.

        Args:
            q (Tensor): ``(B, C, H, W)`` projected queries; group ``i`` owns channels
                ``[i * C / groups, (i + 1) * C / groups)``.
            num_groups (int): Offset groups.
            impl (str): Implementation of the depth-wise conv, one of
                :data:`~projects.dat.ops.ATTN_IMPLS` (:func:`~projects.dat.ops.strided_depthwise_conv`:
                ``F.conv2d``, or its operator whose weight gradient is faster on CPU). Defaults to
                ``'auto'``.

        Returns:
            Tensor: ``(B * groups, Hk, Wk, 2)`` offsets, in the order of the 1x1 conv's outputs.
        """
        conv, norm, act, proj = self
        b, c = q.shape[:2]
        y = strided_depthwise_conv(
            q,
            conv.weight.repeat(num_groups, 1, 1, 1),
            conv.bias.repeat(num_groups),
            conv.stride[0],
            conv.padding[0],
            impl,
        )
        hk, wk = y.shape[-2:]
        y = y.permute(0, 2, 3, 1).reshape(b, hk, wk, num_groups, c // num_groups)
        y = F.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        offset = F.linear(F.gelu(y, approximate=act.approximate), proj.weight.flatten(1))  # (B, Hk, Wk, groups, 2)
        return offset.permute(0, 3, 1, 2, 4).reshape(b * num_groups, hk, wk, 2)


class DeformableAttention(nn.Module):
    """Deformable multi-head attention (``D`` block), v1 or DAT++.

    Queries attend to ``Hk x Wk`` keys sampled from the input at positions that an offset
    network predicts from the queries, with a deformable relative position bias read from
    ``rpe_table``. It computes what ``DAttentionBaseline`` of the original code computes
    (LeapLabTHU/DAT, ``models/dat_blocks.py``; papers: arXiv 2201.00520 and 2309.01430).

    Args:
        dim (int): Channels.
        num_heads (int): Attention heads.
        num_groups (int): Offset groups; each owns ``dim / groups`` channels and
            ``heads / groups`` heads.
        key_stride (int): Stride of the offset network, i.e. of the key grid.
        offset_kernel (int): Kernel of the offset network's depth-wise conv.
        table_size (tuple[int, int]): Map size ``(Hq0, Wq0)`` at the construction image size;
            the bias table has shape ``(heads, 2 Hq0 - 1, 2 Wq0 - 1)``.
        version (str): ``'v1'`` (tanh-bounded offsets, centred grids) or ``'pp'`` (clamped
            positions, corner-aligned query grid).
        offset_range_factor (float): v1 only: offsets are ``tanh(o) * factor / Hk``.
        impl (str): Implementation of the attention, one of :data:`~projects.dat.ops.ATTN_IMPLS`
            (see :func:`~projects.dat.ops.select_backend`). Defaults to ``'auto'``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_groups: int,
        key_stride: int,
        offset_kernel: int,
        table_size: tuple[int, int],
        version: str,
        offset_range_factor: float = 2.0,
        impl: str = 'auto',
    ):
        super().__init__()
        self.impl = check_attn_impl(impl)
        group_dim = dim // num_groups
        self.num_heads = num_heads
        self.num_groups = num_groups
        self.key_stride = key_stride
        self.offset_kernel = offset_kernel
        self.version = version
        self.offset_range_factor = offset_range_factor
        self.proj_q = PointwiseConv2d(dim, dim)
        self.proj_k = PointwiseConv2d(dim, dim)
        self.proj_v = PointwiseConv2d(dim, dim)
        self.proj_out = PointwiseConv2d(dim, dim)
        self.conv_offset = OffsetNetwork(group_dim, offset_kernel, key_stride)
        self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * table_size[0] - 1, 2 * table_size[1] - 1))
        trunc_normal_(self.rpe_table, std=0.01)

    def extra_repr(self) -> str:
        return (
            f'heads={self.num_heads}, groups={self.num_groups}, key_stride={self.key_stride}, '
            f'offset_kernel={self.offset_kernel}, version={self.version}, '
            f'table={tuple(self.rpe_table.shape[1:])}'
        )

    def sampling_positions(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Key positions predicted from the queries, and the key grid's reference points.

        Args:
            q (Tensor): ``(B, C, H, W)`` projected queries.

        Returns:
            tuple: ``pos`` ``(B * groups, Hk, Wk, 2)`` and ``ref`` ``(Hk, Wk, 2)``, both
            normalised with the last axis ``(y, x)``.
        """
        offset = self.conv_offset(q, self.num_groups, self.impl)
        hk, wk = offset.shape[1:3]
        ref = key_reference_points(hk, wk, self.version, q.dtype, q.device)
        if self.version == 'v1':
            offset = offset.tanh().mul(offset_scale(hk, wk, q.device)).mul(self.offset_range_factor)
            pos = offset + ref
        else:
            pos = (offset + ref).clamp(-1.0, 1.0)
        return pos, ref

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.proj_q(x)
        if is_autocast_enabled(x.device.type):  # positions and bias coordinates stay float32
            with torch.autocast(x.device.type, enabled=False):
                pos, ref = self.sampling_positions(q.float())
        else:
            pos, ref = self.sampling_positions(q)
        hk, wk = pos.shape[1:3]
        pos = pos.reshape(-1, hk * wk, 2)
        sampled = sample_keys(x, pos, self.num_groups, self.impl)
        k = self.proj_k(sampled).reshape(b, c, hk * wk)
        v = self.proj_v(sampled).reshape(b, c, hk * wk)
        query_coords = query_grid(h, w, self.version, pos.dtype, q.device)  # separable: (H,) x (W,)
        out = deformable_attention(
            q,
            k,
            v,
            pos,
            query_coords[:, 0, 0],
            query_coords[0, :, 1],
            self.rpe_table,
            self.num_groups,
            self.impl,
        )
        return self.proj_out(out)


class DATBlock(nn.Module):
    """One transformer block: ``[x += LPU(x)]; x += DP(attn(LN(x))); x += DP(FFN(LN(x)))``.

    Args:
        attn (nn.Module): The block's attention (window, neighbourhood or deformable).
        dim (int): Channels.
        version (str): ``'v1'`` (token MLP, no LPU) or ``'pp'`` (ConvFFN and the local
            perception unit, a depth-wise 3x3 conv).
        mlp_ratio (int): FFN expansion.
        drop_path (float): Stochastic depth rate of both residual branches.
        recompute_ffn (bool): The FFN's ``recompute_hidden``.
        impl (str): The ConvFFN's ``impl`` (DAT++). Defaults to ``'auto'``.
    """

    def __init__(
        self,
        attn: nn.Module,
        dim: int,
        version: str,
        mlp_ratio: int = 4,
        drop_path: float = 0.0,
        recompute_ffn: bool = False,
        impl: str = 'auto',
    ):
        super().__init__()
        self.lpu = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if version == 'pp' else None
        self.norm1 = LayerNorm2d(dim)
        self.attn = attn
        self.norm2 = LayerNorm2d(dim)
        if version == 'pp':
            self.mlp = ConvFFN(dim, mlp_ratio, recompute_ffn, impl)
        else:
            self.mlp = TokenMLP(dim, mlp_ratio, recompute_ffn)
        self.residual = DropPathResidual(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        if self.lpu is not None:
            x = depthwise_conv_plus_identity(x, self.lpu)
        x = self.residual(x, self.attn(self.norm1(x)))
        return self.residual(x, self.mlp(self.norm2(x)))


class Downsample(nn.Sequential):
    """Stride-2 patch merging between stages: conv then LayerNorm.

    v1 uses a 2x2 conv (odd maps are zero-padded at the bottom/right first, as Swin's patch
    merging does); DAT++ a 3x3 conv with padding 1.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        version (str): ``'v1'`` or ``'pp'``.
    """

    def __init__(self, in_channels: int, out_channels: int, version: str):
        conv = (
            nn.Conv2d(in_channels, out_channels, 2, 2, bias=False)
            if version == 'v1'
            else nn.Conv2d(in_channels, out_channels, 3, 2, 1, bias=False)
        )
        super().__init__()
        self.conv = conv
        self.norm = LayerNorm2d(out_channels)
        self.pad_to = 2 if version == 'v1' else 1

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(pad_to_multiple(x, self.pad_to)[0]))


class Stem(nn.Module):
    """Stride-4 stem: v1 a 4x4 patch conv + LN (inputs padded to a multiple of 4); DAT++
    two stride-2 3x3 convs with LN and GELU between them.

    Args:
        out_channels (int): Stem width (``dims[0]``).
        version (str): ``'v1'`` or ``'pp'``.
        in_channels (int): Image channels. Defaults to 3.
    """

    def __init__(self, out_channels: int, version: str, in_channels: int = 3):
        super().__init__()
        self.version = version
        if version == 'v1':
            self.conv = nn.Conv2d(in_channels, out_channels, 4, 4)
            self.norm = LayerNorm2d(out_channels)
        else:
            self.conv1 = nn.Conv2d(in_channels, out_channels // 2, 3, 2, 1)
            self.norm1 = LayerNorm2d(out_channels // 2)
            self.act = GELU2d()
            self.conv2 = nn.Conv2d(out_channels // 2, out_channels, 3, 2, 1)
            self.norm2 = LayerNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        # On channels-last memory the convs' outputs already have the layout the LayerNorms read
        # (NHWC); from NCHW images each conv's output would be copied to it, forward and backward
        # (twice the stem's time on CPU at detection sizes, the same values).
        if self.version == 'v1':
            return self.norm(self.conv(pad_to_multiple(x, 4)[0].contiguous(memory_format=torch.channels_last)))
        x = x.contiguous(memory_format=torch.channels_last)
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class DATStage(nn.Module):
    """A stage: the optional downsampling that enters it, then its blocks.

    Args:
        blocks (list[nn.Module]): The stage's blocks.
        downsample (nn.Module, optional): Patch merging applied first (stages 1-3).
        with_cp (bool): Recompute each block's activations in the backward pass.
    """

    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None = None, with_cp: bool = False):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)
        self.with_cp = with_cp

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            if self.with_cp and x.requires_grad:
                x = cp.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class DAT(BaseModule):
    """DAT / DAT++ backbone for classification, detection and segmentation.

    A stem (stride 4), then four stages of blocks with patch merging between them; each
    requested stage output passes its own LayerNorm (``norm{i}``) and is returned as an NCHW
    map (strides 4, 8, 16, 32). Block types per stage are given by ``stage_spec``: ``L``/``S``
    Swin (shifted) windows, ``N`` neighbourhood attention, ``D`` deformable attention.

    Args:
        arch (str | dict): A name of :attr:`arch_zoo` (``'dat-t'``, ``'dat-s'``, ``'dat-b'``,
            ``'dat-b-384'``, ``'datpp-t'``, ``'datpp-s'``, ``'datpp-b'``) or a dict with the
            keys of a zoo entry (``version``, ``dims``, ``heads``, ``groups``, ``stage_spec``;
            optional ``window_size``, ``key_strides``, ``offset_kernels``,
            ``offset_range_factor``, ``neighborhood_size``, ``mlp_ratio``, ``drop_path_rate``).
        out_indices (Sequence[int]): Stages whose outputs are returned. Defaults to (0, 1, 2, 3).
        drop_path_rate (float, optional): Stochastic depth, linearly increasing over blocks.
            Defaults to the variant's rate (None).
        with_cp (bool): Activation checkpointing per block. Defaults to False.
        recompute_ffn (bool): Keep only the first hidden tensor of each FFN for the backward
            pass and recompute the rest but the last layer (DAT++: depth-wise conv and GELU;
            v1: the GELU): less training memory for a little more time, measured in
            ``docs/benchmarks.md``. Has no effect with ``with_cp`` (whole
            blocks are recomputed then) or without gradients. Defaults to True.
        frozen_stages (int): As mmdet's Swin: -1 freezes nothing, ``k >= 0`` freezes the stem
            and stages ``0 .. k-1`` (with their output norms). Defaults to -1.
        norm_eval (bool): Keep normalisation layers in eval mode during training (as mmdet's
            backbones). DAT's norms are LayerNorms, which hold no running statistics.
            Defaults to False.
        img_size (int | tuple[int, int]): Construction image size; it fixes the shapes of the
            deformable bias tables (224 for the released ImageNet weights, 384 for the 384
            fine-tunes). Defaults to 224.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=..., prefix='backbone.')``
            loads a converted checkpoint strictly, resizing bias tables of another size. A
            ``Pretrained`` config must name its ``checkpoint`` and come alone (a dict, not in a
            list, where mmengine would load it non-strictly); other init configs are mmengine's.
        attn_impl (str): Implementation of the ``N`` and ``D`` attention blocks and of DAT++'s
            ConvFFN hidden layer: ``'auto'`` (the fast, memory-lean one wherever it is available,
            else the reference), ``'fast'``, ``'reference'`` (the straightforward one),
            ``'pytorch'`` or ``'cpu-kernel'`` (the fast one without or with the C++ CPU kernels);
            :func:`~projects.dat.ops.select_backend` tells which runs where. All compute the same
            function. :func:`~projects.dat.set_attn_impl` switches a built model.
            Defaults to ``'auto'``.
        check_finite (bool): After every forward pass in training mode, check that the
            returned maps are finite; if not, re-run the images module by module
            (:meth:`locate_non_finite`) and log a warning naming the first module (stem,
            downsampling or block) whose output is not finite, e.g. ``DAT: non-finite values in
            the backbone output, first produced by stages.2.blocks.1 (DeformableAttention)``.
            The check costs one device synchronisation per training step on GPU, so it is off
            by default; switch it on to find where a diverging run first overflows.
            Defaults to False.
    """

    # Name (canonical or alias) -> settings of the released variants (see variants.py).
    arch_zoo = ARCH_ZOO

    def __init__(
        self,
        arch: str | dict = 'datpp-t',
        out_indices: int | Sequence[int] = (0, 1, 2, 3),
        drop_path_rate: float | None = None,
        with_cp: bool = False,
        recompute_ffn: bool = True,
        frozen_stages: int = -1,
        norm_eval: bool = False,
        img_size: int | tuple[int, int] = 224,
        init_cfg: dict | list[dict] | None = None,
        attn_impl: str = 'auto',
        check_finite: bool = False,
    ):
        _check_init_cfg(init_cfg)
        super().__init__(init_cfg=init_cfg)
        self.attn_impl = check_attn_impl(attn_impl)
        self.arch_settings = resolve_arch(arch)
        # What messages call the variant: its name, or the custom settings' version.
        self.arch_name = arch.lower() if isinstance(arch, str) else f'custom {arch["version"]}'
        s = self.arch_settings
        self.version = s['version']
        self.out_indices = tuple(_check_out_indices(out_indices))
        if not is_int(frozen_stages) or not -1 <= frozen_stages <= 4:
            raise ValueError(f'frozen_stages must be an int in -1..4, got {frozen_stages!r}')
        self.frozen_stages = frozen_stages
        for name, value in (
            ('with_cp', with_cp),
            ('recompute_ffn', recompute_ffn),
            ('norm_eval', norm_eval),
            ('check_finite', check_finite),
        ):
            if not isinstance(value, bool):
                raise TypeError(f'{name} must be a bool (True or False), got {value!r}')
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.recompute_ffn = recompute_ffn
        self.check_finite = check_finite
        img_h, img_w = _check_img_size(img_size)
        self.img_size = (img_h, img_w)
        if drop_path_rate is None:
            drop_path_rate = s['drop_path_rate']
        else:
            check_drop_path_rate(drop_path_rate, 'drop_path_rate')
        self.drop_path_rate = float(drop_path_rate)

        dims = s['dims']
        self.num_features = list(dims)
        depths = [len(spec) for spec in s['stage_spec']]
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stem = Stem(dims[0], self.version)
        self.stages = nn.ModuleList()
        for i, spec in enumerate(s['stage_spec']):
            table_size = (img_h // 4 // 2**i, img_w // 4 // 2**i)
            blocks = []
            for j, kind in enumerate(spec):
                attn = self._make_attention(kind, i, table_size)
                blocks.append(
                    DATBlock(
                        attn,
                        dims[i],
                        self.version,
                        s['mlp_ratio'],
                        rates[sum(depths[:i]) + j],
                        recompute_ffn=recompute_ffn and not with_cp,
                        impl=self.attn_impl,
                    )
                )
            downsample = Downsample(dims[i - 1], dims[i], self.version) if i > 0 else None
            self.stages.append(DATStage(blocks, downsample, with_cp))
        for i in self.out_indices:
            self.add_module(f'norm{i}', LayerNorm2d(dims[i]))
        self._freeze_stages()

    def _make_attention(self, kind: str, stage: int, table_size: tuple[int, int]) -> nn.Module:
        s = self.arch_settings
        dim, heads = s['dims'][stage], s['heads'][stage]
        if kind in 'LS':
            return WindowAttention(dim, heads, s['window_size'], shifted=kind == 'S')
        if kind == 'N':
            return NeighborhoodAttention(dim, heads, s['neighborhood_size'], self.attn_impl)
        return DeformableAttention(
            dim,
            heads,
            s['groups'][stage],
            s['key_strides'][stage],
            s['offset_kernels'][stage],
            table_size,
            self.version,
            s['offset_range_factor'],
            self.attn_impl,
        )

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Return the normalised outputs of the stages in ``out_indices``.

        Args:
            x (Tensor): ``(B, 3, H, W)`` images, any size of at least 1x1.

        Returns:
            tuple[Tensor]: One contiguous ``(B, dims[i], H_i, W_i)`` map per index in
            ``out_indices``.
        """
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f'DAT expects images of shape (B, 3, H, W), got {tuple(x.shape)}')
        if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f'DAT expects non-empty images of at least 1x1 pixels, got {tuple(x.shape)}')
        weight = self.stem.norm.weight if self.version == 'v1' else self.stem.norm1.weight
        if x.dtype != weight.dtype and not is_autocast_enabled(x.device.type):
            raise ValueError(f"DAT expects images of the parameters' dtype {weight.dtype} (or autocast), got {x.dtype}")
        images = x
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                # Contiguous NCHW: ops such as mmcv's CPU RoIAlign read raw memory as NCHW and
                # would scramble the channels-last views the norms return.
                outs.append(getattr(self, f'norm{i}')(x).contiguous())
        # One synchronising check per training step (hence opt-in); the search for the culprit
        # runs only when it fails.
        if self.check_finite and self.training and not torch.stack([o.isfinite().all() for o in outs]).all():
            print_log(
                f'DAT: non-finite values in the backbone output, first produced by {self.locate_non_finite(images)}',
                logger='current',
                level=logging.WARNING,
            )
        return tuple(outs)

    @torch.no_grad()
    def locate_non_finite(self, x: Tensor) -> str:
        """Name the first module (stem, downsampling or block) whose output is not finite.

        Re-runs the forward pass without gradients, checking after every module.

        Args:
            x (Tensor): The images of the failing forward pass.

        Returns:
            str: e.g. ``'stages.2.blocks.3 (DeformableAttention)'`` or ``'the input images'``.
        """
        if not x.isfinite().all():
            return 'the input images'
        steps = [('stem', self.stem)]
        for i, stage in enumerate(self.stages):
            if stage.downsample is not None:
                steps.append((f'stages.{i}.downsample', stage.downsample))
            steps += [(f'stages.{i}.blocks.{j} ({type(b.attn).__name__})', b) for j, b in enumerate(stage.blocks)]
        for name, module in steps:
            x = module(x)
            if not x.isfinite().all():
                return name
        return 'no module when re-run (a non-deterministic overflow)'

    def init_weights(self) -> None:
        """Load a ``Pretrained`` init_cfg strictly (see :func:`load_pretrained_backbone`)."""
        if isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained':
            load_pretrained_backbone(
                self,
                self.init_cfg['checkpoint'],
                prefix=self.init_cfg.get('prefix'),
                logger=MMLogger.get_current_instance(),
            )
            self._is_init = True
            return
        super().init_weights()

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        frozen = [self.stem] + [self.stages[i] for i in range(self.frozen_stages)]
        frozen += [getattr(self, f'norm{i}') for i in range(self.frozen_stages) if i in self.out_indices]
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'DAT':
        """Set the training mode, keeping frozen stages (and norms, with norm_eval) in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, (_BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                    module.eval()
        return self


def _check_img_size(img_size: int | tuple[int, int]) -> tuple[int, int]:
    pair = (img_size, img_size) if isinstance(img_size, int) else img_size
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or any(not is_int(v) or v < 32 for v in pair):
        raise ValueError(
            f'img_size must be an int or an (H, W) pair of ints >= 32 (one pixel per '
            f'stage-3 bias-table cell), got {img_size!r}'
        )
    return tuple(pair)


def _check_out_indices(out_indices: int | Sequence[int]) -> list[int]:
    given = out_indices
    if is_int(out_indices):
        out_indices = [out_indices]
    if not isinstance(out_indices, (list, tuple)):
        raise ValueError(f'out_indices must be an int or a sequence of increasing distinct ints in 0..3, got {given!r}')
    out_indices = list(out_indices)
    if (
        not out_indices
        or any(not is_int(i) or not 0 <= i <= 3 for i in out_indices)
        or out_indices != sorted(set(out_indices))
    ):
        raise ValueError(f'out_indices must be increasing distinct ints in 0..3, got {given!r}')
    return out_indices


def _check_init_cfg(init_cfg: dict | list[dict] | None) -> None:
    """A ``Pretrained`` init_cfg must name its checkpoint, and come alone (as a dict).

    :meth:`DAT.init_weights` loads a ``Pretrained`` dict strictly; in a list, mmengine's generic
    loader would load it instead, non-strictly and without resizing the bias tables.
    """
    if init_cfg is None:
        return
    if isinstance(init_cfg, (list, tuple)):
        if any(isinstance(c, dict) and c.get('type') == 'Pretrained' for c in init_cfg):
            raise ValueError(
                'DAT loads a Pretrained init_cfg strictly only when it is given alone, as a dict: '
                "init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.'); "
                f'got a list {init_cfg!r}'
            )
        return
    if not isinstance(init_cfg, dict):
        raise TypeError(f'init_cfg must be a dict, a list of dicts or None, got {type(init_cfg).__name__} {init_cfg!r}')
    if init_cfg.get('type') != 'Pretrained':
        return
    checkpoint = init_cfg.get('checkpoint')
    if not isinstance(checkpoint, (str, os.PathLike)) or not str(checkpoint):
        raise ValueError(
            'A Pretrained init_cfg needs checkpoint=<path or URL of a converted checkpoint>, e.g. '
            "init_cfg=dict(type='Pretrained', checkpoint='checkpoints/datpp-t_in1k_converted.pth', "
            f"prefix='backbone.'); got {init_cfg!r}"
        )
    prefix = init_cfg.get('prefix')
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"init_cfg['prefix'] must be a str such as 'backbone.' or None, got {prefix!r}")


# Registration only adds the name; a name taken by anything else raises KeyError (no override).
register_class(MODELS, DAT)
