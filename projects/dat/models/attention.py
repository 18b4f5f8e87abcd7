"""Attention math of DAT and DAT++, as functions apart from the modules that hold parameters.

Each attention has a straightforward *reference* implementation that follows the original
code operation by operation; it is the ground truth for the faster paths.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import neighborhood_indices


def window_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor,
                     mask: Optional[Tensor] = None) -> Tensor:
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


def neighborhood_attention_reference(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor,
                                     kernel_size: int) -> Tensor:
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


def deformable_attention_reference(q: Tensor, k: Tensor, v: Tensor, pos: Tensor,
                                   query_coords: Tensor, rpe_table: Tensor,
                                   num_groups: int) -> Tensor:
    """Deformable multi-head attention with the deformable relative position bias.

    Follows the original operation by operation: logits ``q.k * d ** -0.5``; the bias is a
    bilinear read (``align_corners=True``, zero padding) of each head's table at the
    displacement ``(query - key position) / 2``; softmax over keys. It stores the
    displacement ``(HW, Ns, 2)`` per group and the bias and attention ``(HW, Ns)`` per head.

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
    head_dim = c // heads
    num_keys = k.shape[-1]
    q = q.reshape(b * heads, head_dim, h * w)
    k = k.reshape(b * heads, head_dim, num_keys)
    v = v.reshape(b * heads, head_dim, num_keys)
    attn = torch.einsum('bcm,bcn->bmn', q, k).mul(head_dim ** -0.5)

    displacement = (query_coords.reshape(1, h * w, 1, 2) - pos.reshape(b * num_groups, 1, num_keys, 2)).mul(0.5)
    table = rpe_table[None].expand(b, -1, -1, -1).reshape(b * num_groups, heads // num_groups, *rpe_table.shape[1:])
    bias = F.grid_sample(table, displacement[..., (1, 0)], mode='bilinear', align_corners=True)
    attn = attn + bias.reshape(b * heads, h * w, num_keys)

    out = torch.einsum('bmn,bcn->bcm', attn.softmax(dim=2), v)
    return out.reshape(b, c, h, w)
