"""The reference math of every operator of DAT and DAT++, in plain PyTorch.

Each function follows the original code (LeapLabTHU/DAT) operation by operation; they are the
ground truth against which the fast paths are tested, what ``attn_impl='reference'`` runs, and
what ONNX exports. Where no faster path exists (window attention, the local perception unit,
GELU) they are also what every implementation runs.

- :func:`window_attention`: Swin window attention (DAT's ``L`` and ``S`` blocks).
- :func:`neighborhood_attention_reference`: neighbourhood attention (DAT++'s ``N`` blocks), with
  the geometry of its windows (:func:`neighborhood_starts`, :func:`neighborhood_indices`).
- :func:`deformable_attention_reference`: deformable attention with the deformable relative
  position bias (``D`` blocks); :func:`deformable_attention_logits` for any set of queries;
  :func:`sample_keys_reference`, the ``D`` blocks' bilinear read of their keys.
- :func:`depthwise_conv_gelu_reference`: DAT++'s ConvFFN hidden layer ``GELU(y + DWConv(y))``,
  composed of :func:`depthwise_conv_plus_identity` and :func:`gelu_2d`.
- :func:`pointwise_conv_2d`: a 1x1 conv, as a matrix product over the channels of channels-last
  maps.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import torch_compat

# ----------------------------------------------------------------------------- window attention


def window_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, mask: Tensor | None = None) -> Tensor:
    """Swin window attention with a relative position bias and an optional shift mask.

    Args:
        q (Tensor): ``(B * nW, heads, N, d)`` queries, already scaled by ``d ** -0.5``.
        k (Tensor): ``(B * nW, heads, N, d)`` keys.
        v (Tensor): ``(B * nW, heads, N, d)`` values.
        bias (Tensor): ``(heads, N, N)`` relative position bias.
        mask (Tensor, optional): ``(nW, N, N)`` additive mask of a shifted window layout.

    Returns:
        Tensor: ``(B * nW, heads, N, d)``.
    """
    attn = q @ k.transpose(-2, -1) + bias.unsqueeze(0)
    if mask is not None:
        num_windows, n, _ = mask.shape
        attn = attn.view(-1, num_windows, attn.shape[1], n, n) + mask[None, :, None]
        attn = attn.view(-1, attn.shape[2], n, n)
    return attn.softmax(dim=-1) @ v


# ----------------------------------------------------------------------- neighbourhood attention


def neighborhood_starts(length: int, kernel_size: int, device: torch.device | None = None) -> Tensor:
    """First key index of each query's neighbourhood along one axis.

    The window of query ``i`` starts at ``clamp(i - k // 2, 0, length - k)``: it shifts at the
    border instead of being cut (NATTEN's semantics, dilation 1).

    Args:
        length (int): Axis length, at least ``kernel_size``.
        kernel_size (int): Odd neighbourhood size.
        device (torch.device, optional): Output device.

    Returns:
        Tensor: ``(length,)`` long tensor.
    """
    idx = torch.arange(length, device=device)
    return (idx - kernel_size // 2).clamp(0, length - kernel_size)


def neighborhood_indices(length: int, kernel_size: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Key indices and bias-table indices of every query's neighbourhood along one axis.

    Args:
        length (int): Axis length, at least ``kernel_size``.
        kernel_size (int): Odd neighbourhood size ``k``.
        device (torch.device, optional): Output device.

    Returns:
        tuple: ``keys`` ``(length, k)``, the key index of each window slot, and ``bias``
        ``(length, k)``, the row of the ``2k - 1`` bias table for that query-key pair
        (``key - query + k - 1``).
    """
    starts = neighborhood_starts(length, kernel_size, device)
    keys = starts[:, None] + torch.arange(kernel_size, device=device)
    bias = keys - torch.arange(length, device=device)[:, None] + kernel_size - 1
    return keys, bias


def neighborhood_attention_reference(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int) -> Tensor:
    """Neighbourhood attention (NATTEN semantics, dilation 1) by gathering every window.

    Query ``(i, j)`` attends to the ``k x k`` keys whose window starts at
    ``clamp(i - k // 2, 0, H - k)`` (and the same for ``j``); key ``(i', j')`` gets the bias
    ``rpb[:, i' - i + k - 1, j' - j + k - 1]``. This path stores ``H * W * k * k * d``
    gathered keys and values.

    Args:
        q (Tensor): ``(B, heads, H, W, d)`` queries, already scaled by ``d ** -0.5``.
        k (Tensor): ``(B, heads, H, W, d)`` keys.
        v (Tensor): ``(B, heads, H, W, d)`` values.
        rpb (Tensor): ``(heads, 2k - 1, 2k - 1)`` relative position bias table.
        kernel_size (int): Neighbourhood size ``k``; H and W must be at least ``k``.

    Returns:
        Tensor: ``(B, heads, H, W, d)``.
    """
    b, heads, h, w, d = q.shape
    keys_y, bias_y = neighborhood_indices(h, kernel_size, q.device)
    keys_x, bias_x = neighborhood_indices(w, kernel_size, q.device)
    key_index = (keys_y[:, None, :, None] * w + keys_x[None, :, None, :]).reshape(h * w, -1)
    k_win = k.reshape(b, heads, h * w, d)[:, :, key_index]  # B, heads, HW, k*k, d
    v_win = v.reshape(b, heads, h * w, d)[:, :, key_index]
    bias = rpb[:, bias_y[:, None, :, None], bias_x[None, :, None, :]].reshape(heads, h * w, -1)
    attn = torch.einsum('bhnd,bhnkd->bhnk', q.reshape(b, heads, h * w, d), k_win) + bias
    out = torch.einsum('bhnk,bhnkd->bhnd', attn.softmax(dim=-1), v_win)
    return out.reshape(b, heads, h, w, d)


# -------------------------------------------------------------------------- deformable attention


def sample_keys_reference(x: Tensor, pos: Tensor, num_groups: int) -> Tensor:
    """Each group's keys read from a map at their positions, as the original samples them.

    A bilinear read (``F.grid_sample``, ``align_corners=True``, zero padding) of each group's
    channels at its key positions.

    Args:
        x (Tensor): ``(B, C, H, W)`` map; group ``i`` owns channels
            ``[i * C / groups, (i + 1) * C / groups)``.
        pos (Tensor): ``(B * groups, Ns, 2)`` key positions, normalised, ``(y, x)``.
        num_groups (int): Number of offset groups.

    Returns:
        Tensor: ``(B, C, 1, Ns)`` sampled keys, in ``pos``'s dtype.
    """
    b, c, h, w = x.shape
    sampled = F.grid_sample(
        x.reshape(b * num_groups, c // num_groups, h, w).to(pos.dtype),
        pos.unsqueeze(1).flip(-1),  # (x, y), grid_sample's order
        mode='bilinear',
        align_corners=True,
    )
    return sampled.reshape(b, c, 1, pos.shape[1])


def deformable_attention_logits(
    q: Tensor, k: Tensor, pos: Tensor, query_coords: Tensor, rpe_table: Tensor, num_groups: int
) -> Tensor:
    """Logits of deformable attention (before the softmax) for any set of queries.

    ``q.k * d ** -0.5`` plus the bias read bilinearly (``align_corners=True``, zero padding)
    from each head's table at the displacement ``(query - key position) / 2``, operation by
    operation as the original. It stores the displacement ``(Nq, Ns, 2)`` per group and the
    bias ``(Nq, Ns)`` per head.

    Args:
        q (Tensor): ``(B, C, Nq)`` projected queries; heads are contiguous channel blocks.
        k (Tensor): ``(B, C, Ns)`` projected keys of the sampled points.
        pos (Tensor): ``(B * groups, Ns, 2)`` key positions, normalised, ``(y, x)``.
        query_coords (Tensor): ``(Nq, 2)`` normalised query coordinates, ``(y, x)``.
        rpe_table (Tensor): ``(heads, Th, Tw)`` bias table; group ``i`` owns heads
            ``[i * heads / groups, (i + 1) * heads / groups)``.
        num_groups (int): Number of offset groups.

    Returns:
        Tensor: ``(B, heads, Nq, Ns)`` logits.
    """
    b, c, num_queries = q.shape
    heads = rpe_table.shape[0]
    head_dim = c // heads
    num_keys = k.shape[-1]
    if query_coords.shape != (num_queries, 2):
        raise ValueError(
            f'query_coords must be ({num_queries}, 2) for {num_queries} queries, got {tuple(query_coords.shape)}'
        )
    logits = torch.einsum(
        'bcm,bcn->bmn', q.reshape(b * heads, head_dim, num_queries), k.reshape(b * heads, head_dim, num_keys)
    ).mul(head_dim**-0.5)
    displacement = (query_coords.reshape(1, num_queries, 1, 2) - pos.reshape(b * num_groups, 1, num_keys, 2)).mul(0.5)
    table = rpe_table[None].expand(b, -1, -1, -1).reshape(b * num_groups, heads // num_groups, *rpe_table.shape[1:])
    bias = F.grid_sample(table, displacement[..., (1, 0)], mode='bilinear', align_corners=True)
    return (logits + bias.reshape(b * heads, num_queries, num_keys)).reshape(b, heads, num_queries, num_keys)


def deformable_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, pos: Tensor, query_coords: Tensor, rpe_table: Tensor, num_groups: int
) -> Tensor:
    """Deformable multi-head attention with the deformable relative position bias.

    Follows the original operation by operation: logits ``q.k * d ** -0.5``; the bias is a
    bilinear read (``align_corners=True``, zero padding) of each head's table at the
    displacement ``(query - key position) / 2`` (:func:`deformable_attention_logits`); softmax
    over keys. It stores the displacement ``(HW, Ns, 2)`` per group and the bias and attention
    ``(HW, Ns)`` per head.

    Args:
        q (Tensor): ``(B, C, H, W)`` projected queries; heads are contiguous channel blocks.
        k (Tensor): ``(B, C, Ns)`` projected keys of the sampled points.
        v (Tensor): ``(B, C, Ns)`` projected values of the sampled points.
        pos (Tensor): ``(B * groups, Ns, 2)`` key positions, normalised, ``(y, x)``.
        query_coords (Tensor): ``(H * W, 2)`` normalised query coordinates, ``(y, x)``.
        rpe_table (Tensor): ``(heads, Th, Tw)`` bias table; group ``i`` owns heads
            ``[i * heads / groups, (i + 1) * heads / groups)``.
        num_groups (int): Number of offset groups.

    Returns:
        Tensor: ``(B, C, H, W)`` attention output before the output projection.
    """
    b, c, h, w = q.shape
    heads = rpe_table.shape[0]
    logits = deformable_attention_logits(q.reshape(b, c, h * w), k, pos, query_coords, rpe_table, num_groups)
    v = v.reshape(b * heads, c // heads, -1)
    out = torch.einsum('bmn,bcn->bcm', logits.reshape(b * heads, h * w, -1).softmax(dim=2), v)
    return out.reshape(b, c, h, w)


# ------------------------------------------------------------------- ConvFFN hidden layer, LPU

# torch 2.0 and 2.1 compute GELU's gradient wrongly when it comes with other strides than the
# input (pytorch/pytorch#112006); there, the gradient is copied into the input's layout first.
_GELU_GRAD_IN_INPUT_LAYOUT = torch_compat.gelu_backward_mishandles_strided_grad()


def _gelu(x: Tensor, approximate: str) -> Tensor:
    out = F.gelu(x, approximate=approximate)
    if _GELU_GRAD_IN_INPUT_LAYOUT and out.requires_grad:
        size, stride = out.size(), out.stride()  # not out itself: the hook would keep it alive

        def in_input_layout(grad: Tensor) -> Tensor:
            return grad if grad.stride() == stride else grad.new_empty_strided(size, stride).copy_(grad)

        out.register_hook(in_input_layout)
    return out


def gelu_2d(x: Tensor, approximate: str = 'none') -> Tensor:
    """``F.gelu`` of a map, through its NHWC view where it is channels-last.

    PyTorch's CPU GELU kernels (forward and backward) are slower on a channels-last NCHW
    tensor than on the same memory viewed as a contiguous NHWC tensor (``docs/benchmarks.md``
    measures the layers); the values are the same, and so is the output's memory format.

    Args:
        x (Tensor): Any tensor; a ``(B, C, H, W)`` channels-last map goes through its NHWC view.
        approximate (str): As ``F.gelu``'s. Defaults to ``'none'``.

    Returns:
        Tensor: ``GELU(x)``.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return _gelu(x.permute(0, 2, 3, 1), approximate).permute(0, 3, 1, 2)
    return _gelu(x, approximate)


def pointwise_conv_2d(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A 1x1 conv of a map (stride 1, no padding), through its NHWC view where it is channels-last.

    On CPU (oneDNN) a 1x1 conv's backward pass on channels-last maps is slower than the two
    matrix products of ``F.linear``'s backward on the same memory viewed as NHWC, so a
    channels-last map is multiplied as a ``(B * H * W, C)`` matrix; others go to ``F.conv2d``.
    The values are the same to float32 round-off, and so is the output's memory format.

    Args:
        x (Tensor): Any input of ``F.conv2d``; a ``(B, C, H, W)`` channels-last map goes through
            its NHWC view.
        weight (Tensor): ``(C_out, C, 1, 1)`` conv weight.
        bias (Tensor, optional): ``(C_out,)``. Defaults to None.

    Returns:
        Tensor: ``(B, C_out, H, W)``.
    """
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias)


def identity_folded(weight: Tensor) -> Tensor:
    """A depth-wise conv's ``(C, 1, k, k)`` weight with 1 added to every filter's centre tap."""
    kh, kw = weight.shape[-2:]
    # Made on the weight's device: an item set from Python would be a copy from the host, which
    # waits for a GPU to finish its queue.
    centre = torch.arange(kh * kw, device=weight.device) == kh * kw // 2
    return weight + centre.to(weight.dtype).view(kh, kw)


def depthwise_conv_plus_identity(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``x + conv(x)`` for a depth-wise, odd-kernel, stride-1 ``'same'`` conv, as one conv.

    Adding 1 to the centre tap of every filter folds the residual into the conv: the sum is
    the same up to float32 round-off, and neither the forward nor the backward pass makes a
    separate pass over ``x`` for the addition. DAT++'s local perception unit is this function.

    Args:
        x (Tensor): ``(B, C, H, W)`` input.
        conv (nn.Conv2d): Depth-wise conv with ``C`` groups, an odd kernel, stride 1 and
            padding ``kernel // 2``.

    Returns:
        Tensor: ``x + conv(x)``.
    """
    return F.conv2d(x, identity_folded(conv.weight), conv.bias, padding=conv.padding, groups=conv.groups)


def depthwise_conv_gelu_reference(y: Tensor, conv: nn.Conv2d) -> Tensor:
    """``GELU(y + conv(y))`` in PyTorch: ConvFFN's hidden layer (``conv`` as in
    :func:`depthwise_conv_plus_identity`).

    Args:
        y (Tensor): ``(B, C, H, W)`` map.
        conv (nn.Conv2d): The depth-wise conv.

    Returns:
        Tensor: ``(B, C, H, W)``.
    """
    return gelu_2d(depthwise_conv_plus_identity(y, conv))
