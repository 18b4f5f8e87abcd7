"""Neighbourhood attention (DAT++'s ``N`` blocks): the public entry and the fast operator.

:func:`neighborhood_attention` runs the reference math (:func:`~projects.dat.ops.reference.
neighborhood_attention_reference`) or the custom operator ``torch.ops.dat.neighborhood_attention``
(with a hand-written backward pass), as :func:`~projects.dat.ops.dispatch.select_backend`
decides.

On the ``cpu-kernel`` backend the C++ kernels (``csrc/neighborhood_attention.cpp``) visit each
query's k * k window exactly, forward and backward (a work item per query row forward; per (batch,
head) slice backward, or per segment of a slice's rows where there are fewer slices than threads).
On the ``pytorch`` backend the map is tiled: the queries are cut into Ty x Tx tiles
(:func:`neighborhood_tiles`); the windows of a tile's queries lie inside an Sy x Sx key region
(S = T + k - 1), so each tile is one dense (Ty Tx) x (Sy Sx) attention, two matrix products, in
which the keys outside a query's window get the bias -inf. Tiles are k queries wide (regions of
2k - 1 keys: about 3.4x the products of the k * k windows, at matrix-product speed); an axis no
longer than 2k is a single tile.
The operator takes q, k and v laid out (B, H, W, heads, d) with contiguous channels and rows W
pixels apart, in any other strides (the C++ kernels read the ``N`` block's qkv buffer in
place), and the logits' scale; it returns the output (and the gradients) contiguous
(B, H, W, heads, d), the layout of the projection that follows. The pytorch backend computes on
(B * heads, H * W, d) copies; its tile slots are numbered tile by tile, row-major in each tile.

On the ``gpu-kernel`` backend Triton kernels visit each query's window exactly, tile by tile of
pixels on the GPU (:mod:`~projects.dat.ops.gpu_kernels`), forward and backward.

Every backend keeps only q, k, v, the output and the log-sum-exp of each query; the backward
pass recomputes the probabilities (chunk by chunk of tile rows on the ``pytorch`` backend).
None ever holds the (HW, k * k, d) windows.
"""

import functools

import torch
from torch import Tensor

from . import cpu_kernels, gpu_kernels, torch_compat
from .chunking import default_chunk_elements
from .dispatch import attention_dtypes, select_backend
from .reference import neighborhood_attention_reference, neighborhood_starts

# Logits (batch x heads x tile queries x region keys) of one chunk of the pytorch backend on CPU
# (CUDA: see ops/chunking.py); the backward pass keeps about NEIGHBORHOOD_CHUNK_BUFFERS such
# buffers alive.
NEIGHBORHOOD_CHUNK_ELEMENTS = 1 << 22
NEIGHBORHOOD_CHUNK_BUFFERS = 3
# What computes the operators (the backends of ops/dispatch.py but the reference).
OPERATOR_BACKENDS = ('pytorch', 'cpu-kernel', 'gpu-kernel')


def neighborhood_tiles(
    length: int, kernel_size: int, tile: int, device: torch.device | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cut one axis of neighbourhood attention into query tiles with dense key regions.

    Tiles hold ``T = min(tile, length)`` consecutive queries and are all full: when ``T`` does
    not divide the axis, the last tile starts at ``length - T`` and overlaps the one before it.
    The windows of a tile's queries lie inside ``S = min(T + k - 1, length)`` consecutive keys
    (its key region), clamped border windows included, because window starts grow by at most
    one per query.

    Args:
        length (int): Axis length, at least ``kernel_size``.
        kernel_size (int): Odd neighbourhood size ``k``.
        tile (int): Queries per tile (at most).
        device (torch.device, optional): Output device.

    Returns:
        tuple: ``queries`` ``(nt, T)``, the query index of each tile slot; ``keys`` ``(nt, S)``,
        the key index of each region slot; ``bias`` ``(nt, T, S)``, the row of the ``2k - 1``
        bias table of each (query, key) pair, or -1 where the key is outside the query's window;
        ``slot`` ``(length,)``, the flat slot ``tile * T + offset`` that holds each query (its
        first tile).
    """
    size = min(tile, length)
    num_tiles = -(-length // size)
    tile_starts = torch.arange(num_tiles, device=device).mul_(size).clamp_(max=length - size)
    queries = tile_starts[:, None] + torch.arange(size, device=device)
    window_starts = neighborhood_starts(length, kernel_size, device)[queries]
    region = min(size + kernel_size - 1, length)
    region_starts = window_starts[:, 0].clamp(max=length - region)
    keys = region_starts[:, None] + torch.arange(region, device=device)
    offset = keys[:, None, :] - window_starts[:, :, None]
    bias = keys[:, None, :] - queries[:, :, None] + kernel_size - 1
    bias = bias.masked_fill_((offset < 0) | (offset >= kernel_size), -1)
    index = torch.arange(length, device=device)
    first_tile = (index // size).clamp_(max=num_tiles - 1)
    slot = first_tile * size + index - tile_starts[first_tile]
    return queries, keys, bias, slot


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

    def chunks(self, batch_heads: int, budget: int) -> list[tuple[int, int]]:
        """Ranges of tile rows holding at most ``budget`` logits (at least one row)."""
        per_row = batch_heads * self.tiles_x * self.tile_queries * self.region_keys
        rows = max(1, budget // per_row)
        return [(y0, min(y0 + rows, self.tiles_y)) for y0 in range(0, self.tiles_y, rows)]

    def slot_range(self, y0: int, y1: int) -> tuple[int, int]:
        """Range of the query slots (in :attr:`queries`) of tile rows ``y0:y1``."""
        per_row = self.tiles_x * self.tile_queries
        return y0 * per_row, y1 * per_row

    def key_range(self, y0: int, y1: int) -> tuple[int, int]:
        """Range of the region slots (in :attr:`keys`) of tile rows ``y0:y1``."""
        per_row = self.tiles_x * self.region_keys
        return y0 * per_row, y1 * per_row

    def bias_gradient(self, grad_logits: Tensor, heads: int, y0: int, y1: int) -> Tensor:
        """The gradient of the ``(heads, (2k - 1) ** 2)`` flat bias table from the logits'
        gradient of tile rows ``y0:y1``, summed over the batch.

        A pair's table entry is ``(by, bx)``, its row in each axis' table, so the sum over all
        pairs of an entry factorises into two matrix products with the axes' one-hot rows: over
        the batch, tile columns and x slots first, then over the tile rows and y slots. An
        ``index_add_`` of every pair into the few entries of the table instead makes millions of
        concurrent adds to the same addresses, which serialise on a GPU (most of the backward
        pass of DAT-T++'s ``N`` blocks on an H200, see docs/benchmarks.md). Pairs outside a
        window have no one-hot row (and a zero gradient: their probability is 0).

        Args:
            grad_logits (Tensor): ``(BH * tiles, Ty Tx, Sy Sx)`` of the chunk.
            heads (int): Heads of the table (BH is batch-major).
            y0 (int): First tile row.
            y1 (int): End tile row.

        Returns:
            Tensor: ``(heads, (2k - 1) ** 2)``.
        """
        (ty, sy), (tx, sx) = self.bias_y.shape[1:], self.bias_x.shape[1:]
        entries = torch.arange(self.table_width, device=grad_logits.device)
        # (Y Ty Sy, 2k - 1) and (X Tx Sx, 2k - 1); a row of -1 (outside the window) is all zeros.
        one_hot_y = (self.bias_y[y0:y1, :, :, None] == entries).to(grad_logits.dtype).flatten(0, 2)
        one_hot_x = (self.bias_x[:, :, :, None] == entries).to(grad_logits.dtype).flatten(0, 2)
        batch = grad_logits.shape[0] // (heads * (y1 - y0) * self.tiles_x)
        grad = grad_logits.view(batch, heads, y1 - y0, self.tiles_x, ty, tx, sy, sx)
        grad = grad.permute(1, 2, 4, 6, 0, 3, 5, 7).reshape(heads * one_hot_y.shape[0], -1)
        grad = torch.mm(grad, one_hot_x.repeat(batch, 1)).view(heads, one_hot_y.shape[0], -1)
        return torch.matmul(one_hot_y.T, grad).view(heads, -1)

    def bias_index(self, y0: int, y1: int) -> Tensor:
        """``(tiles, Ty Tx, Sy Sx)`` flat index into the padded table of tile rows ``y0:y1``;
        pairs outside a window index the table's last entry, -inf."""
        by = self.bias_y[y0:y1, None, :, None, :, None]
        bx = self.bias_x[None, :, None, :, None, :]
        index = by * self.table_width + bx
        index.masked_fill_((by < 0) | (bx < 0), self.table_width**2)
        return index.view(-1, self.tile_queries, self.region_keys)


@functools.lru_cache(maxsize=8)
def _plan(height: int, width: int, kernel_size: int, device: torch.device) -> _NeighborhoodPlan:
    """The tiling of a map size, built once per size and device: its indices take about 75 small
    ops, on a GPU as many kernel launches, where every call and its backward would build the same
    plan again (the blocks of a stage share their map size). Read-only: nothing writes into a
    plan's tensors."""
    return _NeighborhoodPlan(height, width, kernel_size, device)


def _heads_first(t: Tensor) -> Tensor:
    """``(B, H, W, heads, d)`` as ``(B * heads, H * W, d)``, the layout of the pytorch backend."""
    b, height, width, heads, d = t.shape
    return t.permute(0, 3, 1, 2, 4).reshape(b * heads, height * width, d)


def _pixels_first(t: Tensor, heads: int, height: int, width: int) -> Tensor:
    """``(B * heads, H * W, d)`` as a contiguous ``(B, H, W, heads, d)``, the operators' outputs."""
    bh, _, d = t.shape
    return t.view(bh // heads, heads, height, width, d).permute(0, 2, 3, 1, 4).contiguous()


def _tiled(
    q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int, scale: float
) -> tuple[_NeighborhoodPlan, Tensor, Tensor, Tensor, Tensor]:
    """What the forward and the backward operator of the pytorch backend share: the tiling,
    ``scale * q``, ``k`` and ``v`` laid out ``(BH, HW, d)``, and the flat bias table with -inf
    appended (``(heads, (2k - 1) ** 2 + 1)``, for the pairs outside a window)."""
    plan = _plan(q.shape[1], q.shape[2], kernel_size, q.device)
    qf, kf, vf = _heads_first(q * scale), _heads_first(k), _heads_first(v)
    heads = rpb.shape[0]
    table = torch.cat([rpb.reshape(heads, -1), rpb.new_full((heads, 1), float('-inf'))], dim=1)
    return plan, qf, kf, vf, table


def _chunk_logits(q: Tensor, k: Tensor, table: Tensor, plan: _NeighborhoodPlan, y0: int, y1: int):
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


def _check_op_inputs(q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int, chunk: int, backend: str):
    """The shapes and the backend that the operators (and the C++ kernels behind them) rely on; the
    operators check them themselves, since they may be called directly (``torch.ops.dat.*``)."""
    if backend not in OPERATOR_BACKENDS:
        raise ValueError(f'dat::neighborhood_attention backend must be one of {OPERATOR_BACKENDS}, got {backend!r}')
    table = 2 * kernel_size - 1
    valid = (
        q.dim() == 5
        and k.shape == q.shape
        and v.shape == q.shape
        and kernel_size > 0
        and kernel_size % 2 == 1
        and min(q.shape[1:3]) >= kernel_size
        and q.shape[3] > 0
        and rpb.shape == (q.shape[3], table, table)
        and chunk > 0
    )
    if not valid:
        raise ValueError(
            'dat::neighborhood_attention expects q, k, v (B, H, W, heads, d) with H, W >= kernel_size, an '
            'odd kernel_size > 0, heads > 0, rpb (heads, 2k - 1, 2k - 1) and chunk > 0; got '
            f'q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, rpb {tuple(rpb.shape)}, '
            f'kernel_size {kernel_size}, chunk {chunk}'
        )


def _check_gpu_kernel(q: Tensor):
    """Checks that the Triton kernels can run: float32 CUDA tensors (CPU ones in Triton's
    interpreter)."""
    gpu_kernels.check_inputs(
        'dat::neighborhood_attention',
        q.device,
        q.dtype == torch.float32,
        'float32 CUDA tensors',
        f'{q.dtype} on {q.device}',
    )


def _required_kernels(q: Tensor):
    """The C++ kernels, for an operator told to use them (float32 CPU inputs)."""
    if q.device.type != 'cpu' or q.dtype != torch.float32:
        raise ValueError(
            'dat::neighborhood_attention runs the C++ CPU kernels on float32 CPU inputs only; got '
            f'{q.dtype} on {q.device}'
        )
    return cpu_kernels.required_kernels(
        'dat::neighborhood_attention', 'neighborhood_attention() picks PyTorch by itself'
    )


@torch_compat.custom_op('dat::neighborhood_attention', mutates_args=())
def _neighborhood_attention_op(
    q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int, scale: float, chunk: int, backend: str
) -> tuple[Tensor, Tensor]:
    _check_op_inputs(q, k, v, rpb, kernel_size, chunk, backend)
    if backend == 'cpu-kernel':
        out, lse = _required_kernels(q).neighborhood_attention_forward(q, k, v, rpb, kernel_size, scale)
        return out, lse
    if backend == 'gpu-kernel':
        _check_gpu_kernel(q)
        return gpu_kernels.neighborhood_attention_forward(q, k, v, rpb, kernel_size, scale)
    plan, qf, kf, vf, table = _tiled(q, k, v, rpb, kernel_size, scale)
    bh, d = qf.shape[0], qf.shape[2]
    out_slots = q.new_empty(bh, plan.num_slots, d)
    lse_slots = q.new_empty(bh, plan.num_slots)
    for y0, y1 in plan.chunks(bh, chunk):
        logits, _, _, _, key_index, _ = _chunk_logits(qf, kf, table, plan, y0, y1)
        v_c = vf.index_select(1, key_index).view(logits.shape[0], plan.region_keys, d)
        row_max = logits.amax(dim=-1, keepdim=True)
        weights = logits.sub_(row_max).exp_()  # unnormalised; the output is divided instead
        row_sum = weights.sum(dim=-1, keepdim=True)
        s0, s1 = plan.slot_range(y0, y1)
        out_c = torch.bmm(weights, v_c).div_(row_sum)
        out_slots[:, s0:s1] = out_c.view(bh, s1 - s0, d)
        lse_slots[:, s0:s1] = row_sum.log_().add_(row_max).view(bh, s1 - s0)
    _, height, width, heads, _ = q.shape
    out = _pixels_first(out_slots.index_select(1, plan.slot), heads, height, width)
    return out, lse_slots.index_select(1, plan.slot)


@_neighborhood_attention_op.register_fake
def _(q, k, v, rpb, kernel_size, scale, chunk, backend):
    b, height, width, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(b * heads, height * width)


@torch_compat.custom_op('dat::neighborhood_attention_backward', mutates_args=())
def _neighborhood_attention_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Tensor,
    out: Tensor,
    lse: Tensor,
    kernel_size: int,
    scale: float,
    chunk: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_op_inputs(q, k, v, rpb, kernel_size, chunk, backend)
    b, height, width, heads, d = q.shape
    if grad_out.shape != q.shape or out.shape != q.shape or lse.shape != (b * heads, height * width):
        raise ValueError(
            f"dat::neighborhood_attention_backward expects grad_out and out of q's shape "
            f'{tuple(q.shape)} and lse {(b * heads, height * width)}; got grad_out '
            f'{tuple(grad_out.shape)}, out {tuple(out.shape)}, lse {tuple(lse.shape)}'
        )
    if backend == 'cpu-kernel':
        grad_q, grad_k, grad_v, grad_rpb_per_bh = _required_kernels(q).neighborhood_attention_backward(
            grad_out, q, k, v, rpb, out, lse, kernel_size, scale
        )
        return grad_q, grad_k, grad_v, grad_rpb_per_bh.view(-1, *rpb.shape).sum(0)
    if backend == 'gpu-kernel':
        _check_gpu_kernel(q)
        return gpu_kernels.neighborhood_attention_backward(grad_out, q, k, v, rpb, out, lse, kernel_size, scale)
    plan, qf, kf, vf, table = _tiled(q, k, v, rpb, kernel_size, scale)
    bh = qf.shape[0]
    grad_out, out = _heads_first(grad_out), _heads_first(out)
    # A query that two tiles hold gets its gradient through the tile of its slot only: in the
    # other tile its dO and D are zero, so its dS is zero.
    owned = torch.zeros(plan.num_slots, dtype=q.dtype, device=q.device).index_fill_(0, plan.slot, 1.0)
    delta = (grad_out * out).sum(-1)  # D = rowsum(dO * O), (BH, HW)
    grad_q_slots = q.new_empty(bh, plan.num_slots, d)
    grad_k = torch.zeros_like(kf)
    grad_v = torch.zeros_like(vf)
    grad_table = table.new_zeros(heads, plan.table_width**2)
    for y0, y1 in plan.chunks(bh, chunk):
        logits, q_c, k_c, query_index, key_index, _ = _chunk_logits(qf, kf, table, plan, y0, y1)
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
        grad_table += plan.bias_gradient(grad_logits, heads, y0, y1)
    grad_q = grad_q_slots.index_select(1, plan.slot).mul_(scale)
    grad_q, grad_k, grad_v = (_pixels_first(g, heads, height, width) for g in (grad_q, grad_k, grad_v))
    return grad_q, grad_k, grad_v, grad_table.view(rpb.shape)


@_neighborhood_attention_backward_op.register_fake
def _(grad_out, q, k, v, rpb, out, lse, kernel_size, scale, chunk, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), torch.empty_like(rpb)


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, kernel_size, scale, chunk, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rpb, out, lse)
    ctx.kernel_size, ctx.scale, ctx.chunk, ctx.backend = kernel_size, scale, chunk, backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, rpb, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v, grad_rpb = _neighborhood_attention_backward_op(
        grad_out.contiguous(), q, k, v, rpb, out, lse, ctx.kernel_size, ctx.scale, ctx.chunk, ctx.backend
    )
    return grad_q, grad_k, grad_v, grad_rpb, None, None, None, None


_neighborhood_attention_op.register_autograd(_backward, setup_context=_setup_context)


def neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rpb: Tensor,
    kernel_size: int,
    impl: str = 'auto',
    chunk_elements: int | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Neighbourhood attention (NATTEN semantics, dilation 1) with a relative position bias.

    Computes :func:`~projects.dat.ops.reference.neighborhood_attention_reference` with the
    backend that :func:`~projects.dat.ops.dispatch.select_backend` picks for ``impl``. The C++
    kernels compute it window by window (exactly ``k * k`` keys per query); the pytorch backend
    tile by tile as dense attentions over the tiles' key regions (matrix products), with the
    keys outside each query's window masked. Both save only ``q, k, v``, the output and each
    query's log-sum-exp, and the backward pass recomputes the probabilities, so memory never
    grows with ``HW * k * k * d`` (nor stores ``HW * k * k``). They compute in float32 (float64
    for float64 inputs) and return the input dtype. The C++ kernels read q, k and v in place
    where each pixel's channels are contiguous and the rows are ``W`` pixels apart (contiguous
    tensors, or views of one ``(B, H, W, 3, heads, d)`` buffer as the ``N`` block passes them),
    else a copy; the output's memory is laid out ``(B, H, W, heads, d)``.

    Args:
        q (Tensor): ``(B, heads, H, W, d)`` queries.
        k (Tensor): ``(B, heads, H, W, d)`` keys.
        v (Tensor): ``(B, heads, H, W, d)`` values.
        rpb (Tensor): ``(heads, 2k - 1, 2k - 1)`` relative position bias table.
        kernel_size (int): Neighbourhood size ``k`` (odd); H and W must be at least ``k``.
        impl (str): One of :data:`~projects.dat.ops.dispatch.ATTN_IMPLS`. Defaults to ``'auto'``.
        chunk_elements (int, optional): Logits per chunk of the pytorch backend. Defaults to
            :data:`NEIGHBORHOOD_CHUNK_ELEMENTS` on CPU and to a memory budget on CUDA
            (:func:`~projects.dat.ops.chunking.default_chunk_elements`).
        scale (float): What the queries are multiplied by before the products (the logits are
            ``(scale * q).k`` plus the bias; DAT++: ``d ** -0.5``). Defaults to 1.0 (``q``
            already scaled).

    Returns:
        Tensor: ``(B, heads, H, W, d)``.
    """
    dtype, acc = attention_dtypes(q, k, v)
    backend = select_backend(impl, q.device, acc, gpu_kernel=True)
    if backend == 'reference':  # checks nothing: shapes may be traced (ONNX export)
        return neighborhood_attention_reference(q if scale == 1.0 else q * scale, k, v, rpb, kernel_size)
    _, heads, h, w, _ = q.shape
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

    def pixels_last(t: Tensor) -> Tensor:
        t = t.to(acc).permute(0, 2, 3, 1, 4)  # (B, H, W, heads, d), as the operator takes it
        return t if t.stride(4) == 1 and t.stride(1) == w * t.stride(2) else t.contiguous()

    if chunk_elements is None:
        chunk_elements = default_chunk_elements(q.device, acc, NEIGHBORHOOD_CHUNK_ELEMENTS, NEIGHBORHOOD_CHUNK_BUFFERS)

    out, _ = _neighborhood_attention_op(
        pixels_last(q),
        pixels_last(k),
        pixels_last(v),
        rpb.to(acc).contiguous(),
        kernel_size,
        scale,
        chunk_elements,
        backend,
    )
    return out.permute(0, 3, 1, 2, 4).to(dtype)
