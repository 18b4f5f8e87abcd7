"""Attention math of DAT and DAT++, as functions apart from the modules that hold parameters.

Each attention has a straightforward *reference* implementation that follows the original
code operation by operation; it is the ground truth for the faster paths.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels, torch_compat
from .geometry import neighborhood_indices, neighborhood_tiles


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


def deformable_attention_logits(q: Tensor, k: Tensor, pos: Tensor, query_coords: Tensor,
                                rpe_table: Tensor, num_groups: int) -> Tensor:
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
        raise ValueError(f'query_coords must be ({num_queries}, 2) for {num_queries} queries, '
                         f'got {tuple(query_coords.shape)}')
    logits = torch.einsum('bcm,bcn->bmn', q.reshape(b * heads, head_dim, num_queries),
                          k.reshape(b * heads, head_dim, num_keys)).mul(head_dim ** -0.5)
    displacement = (query_coords.reshape(1, num_queries, 1, 2)
                    - pos.reshape(b * num_groups, 1, num_keys, 2)).mul(0.5)
    table = rpe_table[None].expand(b, -1, -1, -1).reshape(b * num_groups, heads // num_groups, *rpe_table.shape[1:])
    bias = F.grid_sample(table, displacement[..., (1, 0)], mode='bilinear', align_corners=True)
    return (logits + bias.reshape(b * heads, num_queries, num_keys)).reshape(b, heads, num_queries, num_keys)


def deformable_attention_reference(q: Tensor, k: Tensor, v: Tensor, pos: Tensor,
                                   query_coords: Tensor, rpe_table: Tensor,
                                   num_groups: int) -> Tensor:
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


# --------------------------------------------------------------------------------------------
# Fast paths
# --------------------------------------------------------------------------------------------
#
# Both fast attentions are custom operators (``torch.ops.dat.*``) with a hand-written backward
# pass, so that autograd saves only what the backward really needs and ``torch.compile`` sees
# one opaque node per attention instead of hundreds of small ones. On a torch without custom
# operators (before 2.4) the same functions run as autograd functions (``torch_compat``). They run anywhere plain
# PyTorch runs (CPU, CUDA); ``attn_impl='auto'`` falls back to the reference functions only
# where custom operators are not wanted (ONNX export).

ATTN_IMPLS = ('auto', 'fast', 'reference')

# Elements of one chunk of logits (queries x keys x heads) processed at a time by the fast
# deformable attention; the forward pass keeps about 3 such buffers alive, the backward 6.
DEFORMABLE_CHUNK_ELEMENTS = 1 << 20
# Logits (batch x heads x tile queries x region keys) of one chunk of the fast neighbourhood
# attention; the backward pass keeps about 3 such buffers alive.
NEIGHBORHOOD_CHUNK_ELEMENTS = 1 << 22


def check_attn_impl(attn_impl: str) -> str:
    """Validate an ``attn_impl`` switch (``'auto'``, ``'fast'`` or ``'reference'``)."""
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}')
    return attn_impl


def use_fast_attention(attn_impl: str, x: Tensor) -> bool:
    """Whether a block runs its fast attention for this input.

    ``'reference'`` never does; ``'auto'`` does except during ONNX export (custom operators
    have no ONNX symbolic) and on devices other than CPU and CUDA; ``'fast'`` always does and
    raises where the fast path is not available.

    Args:
        attn_impl (str): The block's switch.
        x (Tensor): The block's input.

    Returns:
        bool: True for the fast path.
    """
    if attn_impl == 'reference':
        return False
    supported = x.device.type in ('cpu', 'cuda') and not torch.onnx.is_in_onnx_export()
    if attn_impl == 'fast' and not supported:
        raise RuntimeError(f"attn_impl='fast' is not available on device {x.device.type!r} or during ONNX "
                           "export; use attn_impl='auto' to fall back to the reference path")
    return supported


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    """Common dtype of the attention inputs; half types stay half, the rest float32/float64."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ----------------------------------------------------------------------- deformable attention
#
# Shapes inside the operator, with BG = batch * groups, hg = heads per group, M = HW:
#   q (BG, hg, d, M), k and v (BG, hg, d, Ns), pos (BG, Ns, 2) float32, table (heads, Th, Tw).
# The bias of query (r, c) and key n is the bilinear read (align_corners=True, zero padding) of
# the head's table at pixel coordinates iy(r, n), ix(c, n): the y coordinate depends on the
# query row only and the x coordinate on the query column only. Per chunk of query rows:
#   1. R[b, h, r, t, n]: table column t interpolated in y at iy(r, n)       (rows x Tw x Ns)
#   2. bias[b, h, r, c, n]: R interpolated in x at ix(c, n)                 (rows x W x Ns)
# so no displacement tensor exists and the table is read with 2 + 2 gathers. The table is
# zero-padded by 2 on each side and coordinates are clamped to [-2, size], so that the taps
# floor(i) and floor(i) + 1 always exist and out-of-table taps read zeros, as grid_sample's
# zero padding does. A coordinate whose two taps are both outside the table (below -1 or at
# least size, clamped or not) reads two zeros and so gets no gradient, as in grid_sample: no
# mask of the clamped coordinates is needed, and the gradients of the key positions can be
# summed per key as they are computed.
# Each chunk's softmax (and its gradient) is a _DeformableSoftmax in PyTorch, or, in float32 on
# CPU, a _DeformableSoftmaxKernel: the same arithmetic in one C++ pass per query.


def _table_coordinates(query: Tensor, key: Tensor, size: int) -> Tuple[Tensor, Tensor]:
    """Pixel coordinates in a padded table of the displacement ``(query - key) / 2``.

    Args:
        query (Tensor): ``(L,)`` normalised query coordinates along one axis.
        key (Tensor): ``(BG, Ns)`` normalised key positions along the same axis.
        size (int): Table size along the axis.

    Returns:
        tuple: ``index`` ``(BG, L, Ns)`` long, the index of the first tap in the table padded
        by 2 on each side; ``frac`` ``(BG, L, Ns)``, the weight of the second tap.
    """
    coord = ((query[None, :, None] - key[:, None, :]) * 0.5 + 1.0) * 0.5 * (size - 1)
    clamped = coord.clamp(-2.0, float(size))
    # A NaN position must not reach the integer conversion (whose result would be arbitrary): its
    # first tap becomes the padding's first column, and its weight stays NaN, so that its bias
    # is NaN as the position is. Finite coordinates are unchanged.
    floor = clamped.floor().nan_to_num_(nan=-2.0)
    frac = clamped - floor
    index = floor.to(torch.long) + 2
    return index, frac


def _deformable_chunks(bg: int, heads_per_group: int, height: int, width: int, num_keys: int,
                       budget: int) -> List[Tuple[int, int, int, int]]:
    """Split ``(BG, rows)`` into chunks of at most ``budget`` logits (at least one row)."""
    per_row = heads_per_group * width * num_keys
    per_item = per_row * height
    if per_item <= budget:
        items = max(1, budget // per_item)
        return [(b, min(b + items, bg), 0, height) for b in range(0, bg, items)]
    rows = max(1, budget // per_row)
    return [(b, b + 1, r, min(r + rows, height)) for b in range(bg) for r in range(0, height, rows)]


class _Workspace:
    """Buffers reused from chunk to chunk, so that a chunk allocates (and page-faults) nothing."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers = {}

    def memo(self, key: Tuple, make) -> Tensor:
        """``make()``, computed once per ``key`` (for what every chunk of the same batch-groups shares)."""
        if key not in self.buffers:
            self.buffers[key] = make()
        return self.buffers[key]

    def __call__(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, zero: bool = False) -> Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = self.buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
        out = buffer[:numel].view(shape)
        return out.zero_() if zero else out


class _DeformableSoftmax:
    """The softmax of one chunk's logits ``scale * q.k + bias`` and its gradient, in PyTorch.

    Builds the bias from the padded table (rows interpolated in y once, then read in x with
    gathers) and keeps what its backward needs. :class:`_DeformableSoftmaxKernel` has the same
    methods and results.

    Args:
        table_t (Tensor): ``(nb, hg, Tw + 4, Th + 4)`` padded tables, transposed (x major).
        iy (Tensor): ``(nb, rows, Ns)`` padded row index of the first y tap.
        fy (Tensor): ``(nb, rows, Ns)`` weight of the second y tap.
        ix (Tensor): ``(nb, W, Ns)`` padded column index of the first x tap.
        fx (Tensor): ``(nb, W, Ns)`` weight of the second x tap.
        ws (_Workspace): Buffers to reuse.
    """

    def __init__(self, table_t: Tensor, iy: Tensor, fy: Tensor, ix: Tensor, fx: Tensor, ws: _Workspace):
        nb, hg, tw_pad, th_pad = table_t.shape
        rows, ns = iy.shape[1:]
        width = ix.shape[1]
        self.ws = ws
        self.fy = fy[:, None, None]
        self.fx = fx[:, None, None]
        # Rows interpolated in y, laid out (nb, hg, Tw + 4, rows, Ns).
        shape = (nb, hg, tw_pad, rows, ns)
        self.y_index = iy[:, None, None].expand(shape)
        table_rows = table_t[:, :, :, None].expand(nb, hg, tw_pad, rows, th_pad)
        top = torch.gather(table_rows, 4, self.y_index, out=ws('top', shape, table_t.dtype))
        self.row_diff = torch.gather(table_rows[..., 1:], 4, self.y_index, out=ws('row_diff', shape, table_t.dtype))
        self.row_diff.sub_(top)
        self.rows_interp = top.addcmul_(self.row_diff, self.fy)
        self.x_index = ix[:, None, None].expand(nb, hg, rows, width, ns)
        self.diff = ws('diff', (nb, hg, rows, width, ns), table_t.dtype)

    def logits(self, q_c: Tensor, k_c: Tensor, scale: float) -> Tensor:
        """``scale * q.k + bias``, ``(nb * hg, rows * W, Ns)`` in the workspace, from the chunk's
        ``q_c`` ``(nb * hg, d, rows * W)`` and ``k_c`` ``(nb * hg, d, Ns)``."""
        out = self.ws('logits', self.diff.shape, self.diff.dtype)
        # The bias, and bias(x1) - bias(x0) (kept for the backward pass).
        source = self.rows_interp.transpose(2, 3)  # (nb, hg, rows, Tw + 4, Ns)
        torch.gather(source, 3, self.x_index, out=out)
        torch.gather(source[:, :, :, 1:], 3, self.x_index, out=self.diff)
        self.diff.sub_(out)
        out.addcmul_(self.diff, self.fx)
        out = out.view(q_c.shape[0], q_c.shape[2], k_c.shape[2])
        if q_c.dtype == out.dtype:
            return out.baddbmm_(q_c.transpose(1, 2), k_c, alpha=scale)
        return out.add_(torch.bmm(q_c.transpose(1, 2), k_c), alpha=scale)

    def softmax_(self, q_c: Tensor, k_c: Tensor, scale: float, lse: Tensor) -> Tensor:
        """The chunk's probabilities ``(nb * hg, rows * W, Ns)``; writes each query's log-sum-exp
        into ``lse`` ``(nb, hg, rows * W)``."""
        logits = self.logits(q_c, k_c, scale)
        row_max = logits.amax(dim=-1, keepdim=True)
        weights = logits.sub_(row_max).exp_()
        row_sum = weights.sum(dim=-1, keepdim=True)
        torch.add(row_sum.log(), row_max, out=lse.view_as(row_sum))
        return weights.div_(row_sum)

    def recompute_(self, q_c: Tensor, k_c: Tensor, scale: float, lse: Tensor) -> Tensor:
        """The probabilities of :meth:`softmax_`, recomputed from its ``lse``."""
        logits = self.logits(q_c, k_c, scale)
        return logits.sub_(lse.reshape(*logits.shape[:2], 1)).exp_()

    def backward_(self, grad: Tensor, probs: Tensor, delta: Tensor, grad_coords: Tensor,
                  grad_table_t: Tensor) -> Tensor:
        """Turn ``grad`` = dP into dS = P * (dP - D) in place, and accumulate the gradients of the
        keys' table coordinates and of the tables from it.

        Args:
            grad (Tensor): ``(nb * hg, rows * W, Ns)`` dP = dO.v on entry.
            probs (Tensor): The chunk's probabilities.
            delta (Tensor): ``(nb, hg, rows * W)`` D = rowsum(dO * O).
            grad_coords (Tensor): ``(nb, Ns, 2)`` accumulator of the gradient of each key's
                ``(y, x)`` pixel coordinate in the table (of the bias it read at all queries).
            grad_table_t (Tensor): ``(nb, hg, Tw + 4, Th + 4)`` accumulator of the table gradient.

        Returns:
            Tensor: ``grad``, now dS.
        """
        grad_s = grad.sub_(delta.reshape(*grad.shape[:2], 1)).mul_(probs)
        nb, hg, tw_pad, rows, ns = shape = self.rows_interp.shape
        grad_bias = grad_s.view(self.diff.shape)
        diff = self.diff
        grad_coords[..., 1] += diff.mul_(grad_bias).sum((1, 2, 3))
        grad_rows = self.ws('grad_rows', shape, grad.dtype, zero=True)
        grad_rows_x = grad_rows.transpose(2, 3)
        torch.mul(grad_bias, self.fx, out=diff)
        grad_rows_x[:, :, :, 1:].scatter_add_(3, self.x_index, diff)
        torch.sub(grad_bias, diff, out=diff)
        grad_rows_x.scatter_add_(3, self.x_index, diff)
        # rows_interp = top + fy * (bottom - top)
        grad_coords[..., 0] += self.row_diff.mul_(grad_rows).sum((1, 2, 3))
        grad_bottom = torch.mul(grad_rows, self.fy, out=self.ws('grad_bottom', shape, grad.dtype))
        grad_top = grad_rows.sub_(grad_bottom)
        index = self.y_index.reshape(nb, hg, tw_pad, rows * ns)
        grad_table_t.scatter_add_(3, index, grad_top.view(nb, hg, tw_pad, rows * ns))
        grad_table_t[..., 1:].scatter_add_(3, index, grad_bottom.view(nb, hg, tw_pad, rows * ns))
        return grad_s


class _DeformableSoftmaxKernel:
    """:class:`_DeformableSoftmax` computed by the C++ kernels (float32 on CPU,
    ``csrc/deformable_attention.cpp``): after the product ``q.k``, one pass adds the bias (read
    on the fly), takes the softmax and, backwards, dS and the bias gradients; the same methods.

    Args:
        kernels (module): :func:`cpu_kernels.load_kernels`.
        table (Tensor): ``(nb, hg, Th + 4, Tw + 4)`` padded tables, y major.
        iy, fy, ix, fx (Tensor): As for :class:`_DeformableSoftmax`, the indices ``iy`` and
            ``ix`` int32.
        x_taps (Tensor): ``(nb, Ns, 2)`` int32, the lowest and the highest padded column that the
            x taps of each key reach (``ix.amin(1)`` and ``ix.amax(1) + 1``).
        ws (_Workspace): Buffers to reuse.
    """

    def __init__(self, kernels, table: Tensor, iy: Tensor, fy: Tensor, ix: Tensor, fx: Tensor, x_taps: Tensor,
                 ws: _Workspace):
        self.kernels = kernels
        self.args = (table, *(t.contiguous() for t in (iy, fy, ix, fx)), x_taps)
        self.ws = ws
        nb, hg = table.shape[:2]
        self.shape = (nb, hg, iy.shape[1], ix.shape[1], iy.shape[2])  # (nb, hg, rows, W, Ns)

    def _products(self, q_c: Tensor, k_c: Tensor) -> Tensor:
        out = self.ws('logits', (q_c.shape[0], q_c.shape[2], k_c.shape[2]), torch.float32)
        if q_c.dtype == out.dtype:
            return torch.bmm(q_c.transpose(1, 2), k_c, out=out)
        return out.copy_(torch.bmm(q_c.transpose(1, 2), k_c))

    def softmax_(self, q_c: Tensor, k_c: Tensor, scale: float, lse: Tensor) -> Tensor:
        """As :meth:`_DeformableSoftmax.softmax_` (``lse`` contiguous)."""
        probs = self._products(q_c, k_c)
        self.kernels.deformable_softmax(probs.view(self.shape), scale, *self.args, lse)
        return probs

    def recompute_(self, q_c: Tensor, k_c: Tensor, scale: float, lse: Tensor) -> Tensor:
        """As :meth:`_DeformableSoftmax.recompute_` (``lse`` contiguous)."""
        probs = self._products(q_c, k_c)
        self.kernels.deformable_probabilities(probs.view(self.shape), scale, *self.args, lse)
        return probs

    def backward_(self, grad: Tensor, probs: Tensor, delta: Tensor, grad_coords: Tensor,
                  grad_table_t: Tensor) -> Tensor:
        """As :meth:`_DeformableSoftmax.backward_` (``delta`` contiguous)."""
        nb, hg, _, _, ns = self.shape
        dtype = grad.dtype
        grad_coords_heads = self.ws('grad_coords_heads', (nb, hg, ns, 2), dtype, zero=True)
        grad_table = self.ws('grad_table', self.args[0].shape, dtype, zero=True)
        self.kernels.deformable_softmax_backward(grad.view(self.shape), probs.view(self.shape), delta, *self.args,
                                                 grad_table, grad_coords_heads)
        grad_table_t += grad_table.transpose(-1, -2)
        grad_coords += grad_coords_heads.sum(1)
        return grad


def _cpu_kernels(t: Tensor):
    """The C++ kernels where they apply (``t`` float32 on CPU) and are available, else None."""
    if t.device.type != 'cpu' or t.dtype != torch.float32:
        return None
    return cpu_kernels.load_kernels()


def _deformable_setup(pos: Tensor, query_y: Tensor, query_x: Tensor, table: Tensor, num_groups: int):
    th, tw = table.shape[-2:]
    iy, fy = _table_coordinates(query_y, pos[..., 0], th)
    ix, fx = _table_coordinates(query_x, pos[..., 1], tw)
    table_t = F.pad(table, (2, 2, 2, 2)).transpose(-1, -2)  # heads, Tw + 4, Th + 4
    table_t = table_t.reshape(num_groups, -1, tw + 4, th + 4)
    return iy, fy, ix, fx, table_t


def _group_tables(table_t: Tensor, b0: int, b1: int) -> Tensor:
    num_groups = table_t.shape[0]
    index = torch.arange(b0, b1, device=table_t.device) % num_groups
    return table_t.index_select(0, index)


def _chunk_softmax(table_t: Tensor, iy: Tensor, fy: Tensor, ix: Tensor, fx: Tensor, ws: _Workspace, b0: int,
                   b1: int, r0: int, r1: int):
    """The softmax of one chunk (query rows ``r0:r1`` of batch-groups ``b0:b1``): a
    :class:`_DeformableSoftmaxKernel` where the C++ kernels run, else a :class:`_DeformableSoftmax`;
    shared by the forward and the backward operator."""
    kernels = _cpu_kernels(table_t)
    if kernels is None:
        return _DeformableSoftmax(_group_tables(table_t, b0, b1), iy[b0:b1, r0:r1], fy[b0:b1, r0:r1], ix[b0:b1],
                                  fx[b0:b1], ws)
    table = ws.memo(('table', b0, b1), lambda: _group_tables(table_t, b0, b1).transpose(-1, -2).contiguous())
    # The kernels read int32 indices (half the memory traffic of int64 on the per-query stream).
    ix_c = ws.memo(('ix', b0, b1), lambda: ix[b0:b1].to(torch.int32))
    x_taps = ws.memo(('x_taps', b0, b1), lambda: torch.stack([ix_c.amin(1), ix_c.amax(1) + 1], -1))
    return _DeformableSoftmaxKernel(kernels, table, iy[b0:b1, r0:r1].to(torch.int32), fy[b0:b1, r0:r1], ix_c,
                                    fx[b0:b1], x_taps, ws)


def _check_deformable_op_inputs(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, query_y: Tensor, query_x: Tensor,
                                table: Tensor, num_groups: int, chunk: int):
    """The shapes that the deformable operators (and the C++ kernels behind them) rely on; the
    operators check them themselves, since they may be called directly (``torch.ops.dat.*``)."""
    valid = q.dim() == 4 and k.dim() == 4 and table.dim() == 3 and num_groups > 0 and chunk > 0
    if valid:
        bg, hg, d, m = q.shape
        ns = k.shape[-1]
        valid = (k.shape == (bg, hg, d, ns) and v.shape == k.shape and pos.shape == (bg, ns, 2)
                 and query_y.dim() == 1 and query_x.dim() == 1 and query_y.numel() * query_x.numel() == m
                 and hg > 0 and table.shape[0] == hg * num_groups and bg % num_groups == 0
                 and min(table.shape[1:]) > 0)
    if not valid:
        raise ValueError('dat::deformable_attention expects q (BG, hg, d, H * W), k and v (BG, hg, d, Ns), pos '
                         '(BG, Ns, 2), query_y (H,), query_x (W,), a table (hg * groups, Th, Tw), groups > 0 dividing '
                         f'BG, hg > 0 and chunk > 0; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, '
                         f'pos {tuple(pos.shape)}, query_y {tuple(query_y.shape)}, query_x {tuple(query_x.shape)}, '
                         f'table {tuple(table.shape)}, groups {num_groups}, chunk {chunk}')


@torch_compat.custom_op('dat::deformable_attention', mutates_args=())
def _deformable_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    query_y: Tensor,
    query_x: Tensor,
    table: Tensor,
    num_groups: int,
    chunk: int,
) -> Tuple[Tensor, Tensor]:
    _check_deformable_op_inputs(q, k, v, pos, query_y, query_x, table, num_groups, chunk)
    bg, hg, d, m = q.shape
    height, width, ns = query_y.shape[0], query_x.shape[0], k.shape[-1]
    scale = d**-0.5
    acc = table.dtype
    iy, fy, ix, fx, table_t = _deformable_setup(pos, query_y, query_x, table, num_groups)
    out = torch.empty_like(q)
    lse = torch.empty(bg, hg, m, dtype=acc, device=q.device)
    ws = _Workspace(q.device)
    for b0, b1, r0, r1 in _deformable_chunks(bg, hg, height, width, ns, chunk):
        nb, rows = b1 - b0, r1 - r0
        c0, c1 = r0 * width, r1 * width
        q_c = q[b0:b1, :, :, c0:c1].reshape(nb * hg, d, rows * width)
        k_c = k[b0:b1].reshape(nb * hg, d, ns)
        lse_c = ws('lse', (nb, hg, rows * width), acc)
        probs = _chunk_softmax(table_t, iy, fy, ix, fx, ws, b0, b1, r0, r1).softmax_(q_c, k_c, scale, lse_c)
        out_c = torch.bmm(v[b0:b1].reshape(nb * hg, d, ns), probs.to(v.dtype).transpose(1, 2))
        out[b0:b1, :, :, c0:c1] = out_c.view(nb, hg, d, rows * width)
        lse[b0:b1, :, c0:c1] = lse_c
    return out, lse


@_deformable_attention_op.register_fake
def _(q, k, v, pos, query_y, query_x, table, num_groups, chunk):
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[1], q.shape[3], dtype=table.dtype)


@torch_compat.custom_op('dat::deformable_attention_backward', mutates_args=())
def _deformable_attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, pos: Tensor,
                                      query_y: Tensor, query_x: Tensor, table: Tensor, out: Tensor, lse: Tensor,
                                      num_groups: int, chunk: int
                                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_deformable_op_inputs(q, k, v, pos, query_y, query_x, table, num_groups, chunk)
    if grad_out.shape != q.shape or out.shape != q.shape or lse.shape != (*q.shape[:2], q.shape[3]):
        raise ValueError(f'dat::deformable_attention_backward expects grad_out and out of q\'s shape {tuple(q.shape)} '
                         f'and lse {(*q.shape[:2], q.shape[3])}; got grad_out {tuple(grad_out.shape)}, '
                         f'out {tuple(out.shape)}, lse {tuple(lse.shape)}')
    bg, hg, d, m = q.shape
    height, width, ns = query_y.shape[0], query_x.shape[0], k.shape[-1]
    th, tw = table.shape[-2:]
    scale = d ** -0.5
    acc = table.dtype
    iy, fy, ix, fx, table_t = _deformable_setup(pos, query_y, query_x, table, num_groups)
    grad_out = grad_out.contiguous()
    # D = rowsum(dO * O): the softmax backward term, (BG, hg, M).
    delta = (grad_out.to(acc) * out.to(acc)).sum(2)
    grad_q = torch.empty_like(q)
    grad_k = torch.zeros(k.shape, dtype=acc, device=k.device)
    grad_v = torch.zeros(v.shape, dtype=acc, device=v.device)
    grad_coords = torch.zeros(bg, ns, 2, dtype=acc, device=q.device)  # of the keys' (y, x) table coordinates
    grad_table_t = torch.zeros(bg, hg, tw + 4, th + 4, dtype=acc, device=q.device)
    ws = _Workspace(q.device)
    for b0, b1, r0, r1 in _deformable_chunks(bg, hg, height, width, ns, chunk):
        nb, rows = b1 - b0, r1 - r0
        c0, c1 = r0 * width, r1 * width
        q_c = q[b0:b1, :, :, c0:c1].reshape(nb * hg, d, rows * width)
        k_c = k[b0:b1].reshape(nb * hg, d, ns)
        v_c = v[b0:b1].reshape(nb * hg, d, ns)
        do_c = grad_out[b0:b1, :, :, c0:c1].reshape(nb * hg, d, rows * width)
        softmax = _chunk_softmax(table_t, iy, fy, ix, fx, ws, b0, b1, r0, r1)
        probs = softmax.recompute_(q_c, k_c, scale, lse[b0:b1, :, c0:c1].contiguous())
        probs_v = probs.to(v.dtype)
        grad_v[b0:b1].view(nb * hg, d, ns).add_(torch.bmm(do_c.to(v.dtype), probs_v).to(acc))
        del probs_v
        # dP = dO v^T, then dS = P * (dP - D)
        grad_logits = ws('grad_logits', (nb * hg, rows * width, ns), acc)
        if v.dtype == acc:
            torch.bmm(do_c.transpose(1, 2), v_c, out=grad_logits)
        else:
            grad_logits.copy_(torch.bmm(do_c.transpose(1, 2).to(v.dtype), v_c))
        grad_logits = softmax.backward_(grad_logits, probs, delta[b0:b1, :, c0:c1].contiguous(), grad_coords[b0:b1],
                                        grad_table_t[b0:b1])
        del probs
        grad_s = grad_logits.to(q.dtype)
        grad_q_c = torch.bmm(k_c, grad_s.transpose(1, 2)).mul_(scale)
        grad_q[b0:b1, :, :, c0:c1] = grad_q_c.view(nb, hg, d, rows * width)
        grad_k[b0:b1].view(nb * hg, d, ns).add_(torch.bmm(q_c, grad_s).to(acc), alpha=scale)
        del grad_s
    # Pixel coordinate = ((q - p) / 2 + 1) / 2 * (size - 1): d coord / d p = -(size - 1) / 4.
    grad_pos = grad_coords * grad_coords.new_tensor([-(th - 1) / 4.0, -(tw - 1) / 4.0])
    grad_table = grad_table_t.view(-1, num_groups, hg, tw + 4, th + 4).sum(0)
    grad_table = grad_table.reshape(-1, tw + 4, th + 4).transpose(-1, -2)[:, 2:th + 2, 2:tw + 2].contiguous()
    return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), grad_pos, grad_table


@_deformable_attention_backward_op.register_fake
def _(grad_out, q, k, v, pos, query_y, query_x, table, out, lse, num_groups, chunk):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(pos),
            torch.empty_like(table))


def _deformable_setup_context(ctx, inputs, output):
    q, k, v, pos, query_y, query_x, table, num_groups, chunk = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, pos, query_y, query_x, table, out, lse)
    ctx.num_groups, ctx.chunk = num_groups, chunk


def _deformable_backward(ctx, grad_out, grad_lse):
    q, k, v, pos, query_y, query_x, table, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v, grad_pos, grad_table = _deformable_attention_backward_op(
        grad_out, q, k, v, pos, query_y, query_x, table, out, lse, ctx.num_groups, ctx.chunk)
    return grad_q, grad_k, grad_v, grad_pos, None, None, grad_table, None, None


_deformable_attention_op.register_autograd(_deformable_backward, setup_context=_deformable_setup_context)


def deformable_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, query_y: Tensor, query_x: Tensor,
                         rpe_table: Tensor, num_groups: int, chunk_elements: Optional[int] = None) -> Tensor:
    """Fast deformable multi-head attention; same result as :func:`deformable_attention_reference`.

    The bias is a 4-tap bilinear read of the table at coordinates separable in y and x,
    computed chunk by chunk of query rows together with the logits; the forward pass saves
    only ``q, k, v``, the positions, the output and the log-sum-exp of each query (no
    ``HW x Ns`` tensor), and the backward pass recomputes each chunk. Positions, bias and
    softmax are computed in float32; the products with q, k and v run in their dtype (half
    under AMP).

    Args:
        q (Tensor): ``(B, C, H, W)`` projected queries; heads are contiguous channel blocks.
        k (Tensor): ``(B, C, Ns)`` projected keys of the sampled points.
        v (Tensor): ``(B, C, Ns)`` projected values of the sampled points.
        pos (Tensor): ``(B * groups, Ns, 2)`` key positions, normalised, ``(y, x)``.
        query_y (Tensor): ``(H,)`` normalised query row coordinates.
        query_x (Tensor): ``(W,)`` normalised query column coordinates.
        rpe_table (Tensor): ``(heads, Th, Tw)`` bias table; group ``i`` owns heads
            ``[i * heads / groups, (i + 1) * heads / groups)``.
        num_groups (int): Number of offset groups.
        chunk_elements (int, optional): Logits per chunk. Defaults to
            :data:`DEFORMABLE_CHUNK_ELEMENTS`.

    Returns:
        Tensor: ``(B, C, H, W)`` attention output before the output projection, in the
        dtype of ``q``, ``k`` and ``v``.
    """
    b, c, h, w = q.shape
    heads = rpe_table.shape[0]
    num_keys = k.shape[-1]
    if (k.shape != (b, c, num_keys) or v.shape != k.shape or pos.shape != (b * num_groups, num_keys, 2)
            or query_y.shape != (h,) or query_x.shape != (w,) or c % heads or heads % num_groups):
        raise ValueError('deformable_attention expects q (B, C, H, W), k and v (B, C, Ns), pos (B * groups, Ns, 2), '
                         'query_y (H,), query_x (W,) and a table (heads, Th, Tw) with heads dividing C and groups '
                         f'dividing heads; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, '
                         f'pos {tuple(pos.shape)}, query_y {tuple(query_y.shape)}, query_x {tuple(query_x.shape)}, '
                         f'table {tuple(rpe_table.shape)}, groups {num_groups}')
    dtype = _float_dtype(q, k, v)
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # positions, bias and softmax
    hg, d = heads // num_groups, c // heads
    out, _ = _deformable_attention_op(
        q.to(dtype).reshape(b * num_groups, hg, d, h * w).contiguous(),
        k.to(dtype).reshape(b * num_groups, hg, d, num_keys).contiguous(),
        v.to(dtype).reshape(b * num_groups, hg, d, num_keys).contiguous(),
        pos.to(acc).contiguous(), query_y.to(acc).contiguous(), query_x.to(acc).contiguous(),
        rpe_table.to(acc).contiguous(), num_groups, chunk_elements or DEFORMABLE_CHUNK_ELEMENTS)
    return out.view(b, c, h, w)


# -------------------------------------------------------------------- neighbourhood attention
#
# float32 on CPU: the C++ kernels (csrc/neighborhood_attention.cpp) visit each query's k * k
# window exactly, forward and backward, and keep the same q, k, v, output and log-sum-exp.
# Elsewhere (CUDA, float64, or without the kernels) the PyTorch path below runs.
# Tiled: the queries are cut into Ty x Tx tiles (geometry.neighborhood_tiles); the windows of a
# tile's queries lie inside an Sy x Sx key region (S = T + k - 1), so each tile is one dense
# (Ty Tx) x (Sy Sx) attention, two matrix products, in which the keys outside a query's window
# get the bias -inf. Tiles are k queries wide (regions of 2k - 1 keys: about 3.4x the products of
# the k * k windows, at matrix-product speed); an axis no longer than 2k is a single tile.
# Inside the operator q, k and v are (B * heads, H, W, d); tile slots are numbered tile by
# tile, row-major in each tile.
# The forward pass keeps only q, k, v, the output and the log-sum-exp of each query; the
# backward pass recomputes each chunk's probabilities from them. Neither pass ever holds the
# (HW, k * k, d) windows, and the logits exist one chunk of tile rows at a time.

class _NeighborhoodPlan:
    """The tiling of an ``H x W`` map for a ``k x k`` neighbourhood, as flat indices.

    Args:
        height (int): Map height, at least ``kernel_size``.
        width (int): Map width, at least ``kernel_size``.
        kernel_size (int): Odd neighbourhood size ``k``.
        device (torch.device): Where the indices live.
    """

    def __init__(self, height: int, width: int, kernel_size: int, device: torch.device):
        def axis(length: int):
            tile = length if length <= 2 * kernel_size else kernel_size
            return neighborhood_tiles(length, kernel_size, tile, device)

        qy, ky, self.bias_y, slot_y = axis(height)
        qx, kx, self.bias_x, slot_x = axis(width)
        self.tiles_y, ty = qy.shape
        self.tiles_x, tx = qx.shape
        self.tile_queries, self.region_keys = ty * tx, ky.shape[1] * kx.shape[1]
        self.num_slots = self.tiles_y * self.tiles_x * self.tile_queries
        self.queries = (qy[:, None, :, None] * width + qx[None, :, None, :]).reshape(-1)
        self.keys = (ky[:, None, :, None] * width + kx[None, :, None, :]).reshape(-1)
        tile = (slot_y // ty)[:, None] * self.tiles_x + (slot_x // tx)[None, :]
        self.slot = (tile * self.tile_queries + (slot_y % ty)[:, None] * tx + (slot_x % tx)[None, :]).reshape(-1)
        self.table_width = 2 * kernel_size - 1

    def chunks(self, batch_heads: int, budget: int) -> List[Tuple[int, int]]:
        """Ranges of tile rows holding at most ``budget`` logits (at least one row)."""
        per_row = batch_heads * self.tiles_x * self.tile_queries * self.region_keys
        rows = max(1, budget // per_row)
        return [(y0, min(y0 + rows, self.tiles_y)) for y0 in range(0, self.tiles_y, rows)]

    def slot_range(self, y0: int, y1: int) -> Tuple[int, int]:
        """Range of the query slots (in :attr:`queries`) of tile rows ``y0:y1``."""
        per_row = self.tiles_x * self.tile_queries
        return y0 * per_row, y1 * per_row

    def key_range(self, y0: int, y1: int) -> Tuple[int, int]:
        """Range of the region slots (in :attr:`keys`) of tile rows ``y0:y1``."""
        per_row = self.tiles_x * self.region_keys
        return y0 * per_row, y1 * per_row

    def bias_index(self, y0: int, y1: int) -> Tensor:
        """``(tiles, Ty Tx, Sy Sx)`` flat index into the padded table of tile rows ``y0:y1``;
        pairs outside a window index the table's last entry, -inf."""
        by = self.bias_y[y0:y1, None, :, None, :, None]
        bx = self.bias_x[None, :, None, :, None, :]
        index = by * self.table_width + bx
        index.masked_fill_((by < 0) | (bx < 0), self.table_width**2)
        return index.view(-1, self.tile_queries, self.region_keys)


def _neighborhood_chunk_logits(q: Tensor, k: Tensor, table: Tensor, plan: _NeighborhoodPlan, y0: int, y1: int):
    """Logits ``q.k + bias`` of tile rows ``y0:y1``; shared by the forward and backward operator.

    Args:
        q (Tensor): ``(BH, HW, d)`` queries (scaled).
        k (Tensor): ``(BH, HW, d)`` keys.
        table (Tensor): ``(heads, (2k - 1) ** 2 + 1)`` flat bias table with -inf appended.
        plan (_NeighborhoodPlan): The tiling.
        y0 (int): First tile row.
        y1 (int): End tile row.

    Returns:
        tuple: ``logits`` ``(BH * tiles, Ty Tx, Sy Sx)``, the chunk's ``q`` ``(BH * tiles, Ty Tx, d)``,
        ``k`` ``(BH * tiles, Sy Sx, d)``, query and key indices and the bias index.
    """
    bh, _, d = q.shape
    heads = table.shape[0]
    s0, s1 = plan.slot_range(y0, y1)
    k0, k1 = plan.key_range(y0, y1)
    query_index, key_index = plan.queries[s0:s1], plan.keys[k0:k1]
    bias_index = plan.bias_index(y0, y1)
    tiles = bias_index.shape[0]
    q_c = q.index_select(1, query_index).view(bh * tiles, plan.tile_queries, d)
    k_c = k.index_select(1, key_index).view(bh * tiles, plan.region_keys, d)
    logits = torch.bmm(q_c, k_c.transpose(1, 2))
    logits.view(-1, heads, bias_index.numel()).add_(table.index_select(1, bias_index.view(-1)))
    return logits, q_c, k_c, query_index, key_index, bias_index


def _padded_bias_table(rpb: Tensor) -> Tensor:
    """``(heads, (2k - 1) ** 2 + 1)``: the flat table with -inf appended (for masked pairs)."""
    heads = rpb.shape[0]
    return torch.cat([rpb.reshape(heads, -1), rpb.new_full((heads, 1), float('-inf'))], dim=1)


def _check_neighborhood_op_inputs(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int, chunk: int):
    """The shapes that the neighbourhood operators (and the C++ kernels behind them) rely on; the
    operators check them themselves, since they may be called directly (``torch.ops.dat.*``)."""
    table = 2 * kernel_size - 1
    valid = (q.dim() == 4 and k.shape == q.shape and v.shape == q.shape and kernel_size > 0 and kernel_size % 2 == 1
             and min(q.shape[1:3]) >= kernel_size and rpb.dim() == 3 and rpb.shape[1:] == (table, table)
             and rpb.shape[0] > 0 and q.shape[0] % rpb.shape[0] == 0 and chunk > 0)
    if not valid:
        raise ValueError('dat::neighborhood_attention expects q, k, v (BH, H, W, d) with H, W >= kernel_size, an odd '
                         'kernel_size > 0, rpb (heads, 2k - 1, 2k - 1) with heads > 0 dividing BH and chunk > 0; got '
                         f'q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, rpb {tuple(rpb.shape)}, '
                         f'kernel_size {kernel_size}, chunk {chunk}')


@torch_compat.custom_op('dat::neighborhood_attention', mutates_args=())
def _neighborhood_attention_op(
    q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int, chunk: int
) -> Tuple[Tensor, Tensor]:
    _check_neighborhood_op_inputs(q, k, v, rpb, kernel_size, chunk)
    kernels = _cpu_kernels(q)
    if kernels is not None:
        out, lse = kernels.neighborhood_attention_forward(q, k, v, rpb, kernel_size)
        return out, lse
    bh, height, width, d = q.shape
    plan = _NeighborhoodPlan(height, width, kernel_size, q.device)
    qf, kf, vf = (t.view(bh, height * width, d) for t in (q, k, v))
    table = _padded_bias_table(rpb)
    out_slots = q.new_empty(bh, plan.num_slots, d)
    lse_slots = q.new_empty(bh, plan.num_slots)
    for y0, y1 in plan.chunks(bh, chunk):
        logits, _, _, _, key_index, _ = _neighborhood_chunk_logits(qf, kf, table, plan, y0, y1)
        v_c = vf.index_select(1, key_index).view(logits.shape[0], plan.region_keys, d)
        row_max = logits.amax(dim=-1, keepdim=True)
        weights = logits.sub_(row_max).exp_()  # unnormalised; the output is divided instead
        row_sum = weights.sum(dim=-1, keepdim=True)
        s0, s1 = plan.slot_range(y0, y1)
        out_c = torch.bmm(weights, v_c).div_(row_sum)
        out_slots[:, s0:s1] = out_c.view(bh, s1 - s0, d)
        lse_slots[:, s0:s1] = row_sum.log_().add_(row_max).view(bh, s1 - s0)
    out = out_slots.index_select(1, plan.slot).view(q.shape)
    return out, lse_slots.index_select(1, plan.slot)


@_neighborhood_attention_op.register_fake
def _(q, k, v, rpb, kernel_size, chunk):
    bh, height, width, _ = q.shape
    return torch.empty_like(q), q.new_empty(bh, height * width)


@torch_compat.custom_op('dat::neighborhood_attention_backward', mutates_args=())
def _neighborhood_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, out: Tensor, lse: Tensor, kernel_size: int,
    chunk: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_neighborhood_op_inputs(q, k, v, rpb, kernel_size, chunk)
    if grad_out.shape != q.shape or out.shape != q.shape or lse.shape != (q.shape[0], q.shape[1] * q.shape[2]):
        raise ValueError(f'dat::neighborhood_attention_backward expects grad_out and out of q\'s shape '
                         f'{tuple(q.shape)} and lse {(q.shape[0], q.shape[1] * q.shape[2])}; got grad_out '
                         f'{tuple(grad_out.shape)}, out {tuple(out.shape)}, lse {tuple(lse.shape)}')
    heads = rpb.shape[0]
    kernels = _cpu_kernels(q)
    if kernels is not None:
        grad_q, grad_k, grad_v, grad_rpb_per_bh = kernels.neighborhood_attention_backward(
            grad_out, q, k, v, rpb, out, lse, kernel_size)
        return grad_q, grad_k, grad_v, grad_rpb_per_bh.view(-1, *rpb.shape).sum(0)
    bh, height, width, d = q.shape
    plan = _NeighborhoodPlan(height, width, kernel_size, q.device)
    qf, kf, vf = (t.view(bh, height * width, d) for t in (q, k, v))
    grad_out = grad_out.reshape(bh, height * width, d)
    table = _padded_bias_table(rpb)
    # A query that two tiles hold gets its gradient through the tile of its slot only: in the
    # other tile its dO and D are zero, so its dS is zero.
    owned = torch.zeros(plan.num_slots, dtype=q.dtype, device=q.device).index_fill_(0, plan.slot, 1.0)
    delta = (grad_out * out.view(bh, height * width, d)).sum(-1)  # D = rowsum(dO * O), (BH, HW)
    grad_q_slots = q.new_empty(bh, plan.num_slots, d)
    grad_k = torch.zeros_like(kf)
    grad_v = torch.zeros_like(vf)
    grad_table = torch.zeros_like(table)
    for y0, y1 in plan.chunks(bh, chunk):
        logits, q_c, k_c, query_index, key_index, bias_index = _neighborhood_chunk_logits(
            qf, kf, table, plan, y0, y1)
        s0, s1 = plan.slot_range(y0, y1)
        n = logits.shape[0]
        owned_c = owned[s0:s1]
        v_c = vf.index_select(1, key_index).view(n, plan.region_keys, d)
        do_c = grad_out.index_select(1, query_index).mul_(owned_c[:, None]).view(n, plan.tile_queries, d)
        delta_c = delta.index_select(1, query_index).mul_(owned_c).view(n, plan.tile_queries, 1)
        probs = logits.sub_(lse.index_select(1, query_index).view(n, plan.tile_queries, 1)).exp_()
        grad_v.index_add_(1, key_index, torch.bmm(probs.transpose(1, 2), do_c).view(bh, -1, d))
        # dS = P * (dP - D), dP = dO v^T
        grad_logits = torch.bmm(do_c, v_c.transpose(1, 2)).sub_(delta_c).mul_(probs)
        del probs, logits
        grad_q_slots[:, s0:s1] = torch.bmm(grad_logits, k_c).view(bh, s1 - s0, d)
        grad_k.index_add_(1, key_index, torch.bmm(grad_logits.transpose(1, 2), q_c).view(bh, -1, d))
        grad_bias = grad_logits.view(-1, heads, bias_index.numel()).sum(0)  # summed over the batch
        grad_table.index_add_(1, bias_index.view(-1), grad_bias)
    grad_q = grad_q_slots.index_select(1, plan.slot).view(q.shape)
    grad_rpb = grad_table[:, :-1].reshape(rpb.shape).contiguous()  # strides as the fake's
    return grad_q, grad_k.view(k.shape), grad_v.view(v.shape), grad_rpb


@_neighborhood_attention_backward_op.register_fake
def _(grad_out, q, k, v, rpb, out, lse, kernel_size, chunk):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(rpb)


def _neighborhood_setup_context(ctx, inputs, output):
    q, k, v, rpb, kernel_size, chunk = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rpb, out, lse)
    ctx.kernel_size, ctx.chunk = kernel_size, chunk


def _neighborhood_backward(ctx, grad_out, grad_lse):
    q, k, v, rpb, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v, grad_rpb = _neighborhood_attention_backward_op(
        grad_out.contiguous(), q, k, v, rpb, out, lse, ctx.kernel_size, ctx.chunk
    )
    return grad_q, grad_k, grad_v, grad_rpb, None, None


_neighborhood_attention_op.register_autograd(_neighborhood_backward, setup_context=_neighborhood_setup_context)


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int,
                           chunk_elements: Optional[int] = None) -> Tensor:
    """Fast neighbourhood attention; same result as :func:`neighborhood_attention_reference`.

    In float32 on CPU the C++ kernels compute it window by window (exactly ``k * k`` keys per
    query); elsewhere, or without the kernels, tile by tile as dense attentions over the tiles'
    key regions (matrix products), with the keys outside each query's window masked. Both save
    only ``q, k, v``, the output and each query's log-sum-exp, and the backward pass recomputes
    the probabilities, so memory never grows with ``HW * k * k * d`` (nor stores
    ``HW * k * k``). Computes in float32 (float64 for float64 inputs) and returns the input dtype.

    Args:
        q (Tensor): ``(B, heads, H, W, d)`` queries, already scaled by ``d ** -0.5``.
        k (Tensor): ``(B, heads, H, W, d)`` keys.
        v (Tensor): ``(B, heads, H, W, d)`` values.
        rpb (Tensor): ``(heads, 2k - 1, 2k - 1)`` relative position bias table.
        kernel_size (int): Neighbourhood size ``k`` (odd); H and W must be at least ``k``.
        chunk_elements (int, optional): Logits per chunk. Defaults to
            :data:`NEIGHBORHOOD_CHUNK_ELEMENTS`.

    Returns:
        Tensor: ``(B, heads, H, W, d)``.
    """
    b, heads, h, w, d = q.shape
    if (
        k.shape != q.shape
        or v.shape != q.shape
        or kernel_size % 2 == 0
        or h < kernel_size
        or w < kernel_size
        or rpb.shape != (heads, 2 * kernel_size - 1, 2 * kernel_size - 1)
    ):
        raise ValueError(
            'neighborhood_attention expects q, k, v (B, heads, H, W, d) with H, W >= kernel_size, an odd '
            f'kernel_size and rpb (heads, 2k - 1, 2k - 1); got q {tuple(q.shape)}, k {tuple(k.shape)}, '
            f'v {tuple(v.shape)}, rpb {tuple(rpb.shape)}, kernel_size {kernel_size}'
        )
    dtype = _float_dtype(q, k, v)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def batch_heads(t: Tensor) -> Tensor:
        return t.to(acc).reshape(b * heads, h, w, d).contiguous()

    out, _ = _neighborhood_attention_op(batch_heads(q), batch_heads(k), batch_heads(v), rpb.to(acc).contiguous(),
                                        kernel_size, chunk_elements or NEIGHBORHOOD_CHUNK_ELEMENTS)
    return out.view(b, heads, h, w, d).to(dtype)
