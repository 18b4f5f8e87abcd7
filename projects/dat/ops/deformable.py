"""Deformable attention (DAT's ``D`` blocks): the public entry and the fast operator.

:func:`deformable_attention` runs the reference math (:func:`~projects.dat.ops.reference.
deformable_attention_reference`) or the custom operator ``torch.ops.dat.deformable_attention``,
as :func:`~projects.dat.ops.dispatch.select_backend` decides. The operator has a hand-written
backward pass, so that autograd saves only what the backward really needs and
``torch.compile`` sees one opaque node instead of hundreds of small ones; on a torch without
custom operators (before 2.4) the same functions run as an autograd function
(:mod:`~projects.dat.ops.torch_compat`).

Shapes inside the operator, with BG = batch * groups, hg = heads per group, M = HW:
q (BG, hg, d, M), k and v (BG, hg, d, Ns), pos (BG, Ns, 2) float32, table (heads, Th, Tw); q may
be any dense permutation in memory (the view of channels-last queries has a unit stride over d),
and the output and q's gradient take its layout.
The bias of query (r, c) and key n is the bilinear read (align_corners=True, zero padding) of
the head's table at pixel coordinates iy(r, n), ix(c, n): the y coordinate depends on the
query row only and the x coordinate on the query column only. Per chunk of query rows:

1. R[b, h, r, t, n]: table column t interpolated in y at iy(r, n)       (rows x Tw x Ns)
2. bias[b, h, r, c, n]: R interpolated in x at ix(c, n)                 (rows x W x Ns)

so no displacement tensor exists and the table is read with 2 + 2 gathers. The table is
zero-padded by 2 on each side and coordinates are clamped to [-2, size], so that the taps
floor(i) and floor(i) + 1 always exist and out-of-table taps read zeros, as grid_sample's
zero padding does. A coordinate whose two taps are both outside the table (below -1 or at
least size, clamped or not) reads two zeros and so gets no gradient, as in grid_sample: no
mask of the clamped coordinates is needed, and the gradients of the key positions can be
summed per key as they are computed.

Each chunk's logits, softmax and gradients go through a :class:`_TableBiasSoftmax`. The
forward pass keeps only q, k, v, the positions, the output and each query's log-sum-exp; the
backward pass recomputes each chunk's probabilities from them. On the ``cpu-kernel`` backend the
C++ kernels (``csrc/deformable_attention.cpp``) compute the same arithmetic in one pass per query
row and head instead, forward (q.k, bias, softmax and the product with v for a block of queries
while its logits are in the cache) and backward; they keep a block of logits per thread, so the
chunk size does not apply to them. On the ``gpu-kernel`` backend Triton kernels compute the same
arithmetic block by block on the GPU (:mod:`~projects.dat.ops.gpu_kernels`), forward and backward.
"""

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernels, gpu_kernels, torch_compat
from .chunking import default_chunk_elements
from .dispatch import attention_dtypes, select_backend
from .reference import deformable_attention_reference

# Elements of one chunk of logits (queries x keys x heads) processed at a time on CPU (sized for
# its caches; CUDA: see ops/chunking.py); the forward pass keeps about 3 such buffers alive, the
# backward DEFORMABLE_CHUNK_BUFFERS.
DEFORMABLE_CHUNK_ELEMENTS = 1 << 20
DEFORMABLE_CHUNK_BUFFERS = 6
# What computes the operators (the backends of ops/dispatch.py but the reference).
OPERATOR_BACKENDS = ('pytorch', 'cpu-kernel', 'gpu-kernel')


def _table_coordinates(query: Tensor, key: Tensor, size: int) -> tuple[Tensor, Tensor]:
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


def _chunk_ranges(
    bg: int, heads_per_group: int, height: int, width: int, num_keys: int, budget: int
) -> list[tuple[int, int, int, int]]:
    """Split ``(BG, rows)`` into ``(b0, b1, r0, r1)`` chunks of at most ``budget`` logits (at
    least one row)."""
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

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, zero: bool = False) -> Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = self.buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
        out = buffer[:numel].view(shape)
        return out.zero_() if zero else out


class _TableBiasSoftmax:
    """One chunk's logits ``scale * q.k + bias`` with the bias read from the padded tables, their
    softmax and its gradient (also of the key coordinates and the tables), in PyTorch.

    Builds the bias from the padded table (rows interpolated in y once, then read in x with
    gathers) and keeps what its backward needs.

    Args:
        table_t (Tensor): ``(nb, hg, Tw + 4, Th + 4)`` padded tables, transposed (x major).
        iy (Tensor): ``(nb, rows, Ns)`` padded row index of the first y tap.
        fy (Tensor): ``(nb, rows, Ns)`` weight of the second y tap.
        ix (Tensor): ``(nb, W, Ns)`` padded column index of the first x tap.
        fx (Tensor): ``(nb, W, Ns)`` weight of the second x tap.
        workspace (_Workspace): Buffers to reuse.
    """

    def __init__(self, table_t: Tensor, iy: Tensor, fy: Tensor, ix: Tensor, fx: Tensor, workspace: _Workspace):
        nb, hg, tw_pad, th_pad = table_t.shape
        rows, ns = iy.shape[1:]
        width = ix.shape[1]
        self.workspace = workspace
        self.fy = fy[:, None, None]
        self.fx = fx[:, None, None]
        # Rows interpolated in y, laid out (nb, hg, Tw + 4, rows, Ns).
        shape = (nb, hg, tw_pad, rows, ns)
        self.y_index = iy[:, None, None].expand(shape)
        table_rows = table_t[:, :, :, None].expand(nb, hg, tw_pad, rows, th_pad)
        top = torch.gather(table_rows, 4, self.y_index, out=workspace('top', shape, table_t.dtype))
        self.row_diff = torch.gather(
            table_rows[..., 1:], 4, self.y_index, out=workspace('row_diff', shape, table_t.dtype)
        )
        self.row_diff.sub_(top)
        self.rows_interp = top.addcmul_(self.row_diff, self.fy)
        self.x_index = ix[:, None, None].expand(nb, hg, rows, width, ns)
        self.diff = workspace('diff', (nb, hg, rows, width, ns), table_t.dtype)

    def logits(self, q_c: Tensor, k_c: Tensor, scale: float) -> Tensor:
        """``scale * q.k + bias``, ``(nb * hg, rows * W, Ns)`` in the workspace, from the chunk's
        ``q_c`` ``(nb * hg, d, rows * W)`` and ``k_c`` ``(nb * hg, d, Ns)``."""
        out = self.workspace('logits', self.diff.shape, self.diff.dtype)
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

    def backward_(
        self, grad: Tensor, probs: Tensor, delta: Tensor, grad_coords: Tensor, grad_table_t: Tensor
    ) -> Tensor:
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
        grad_rows = self.workspace('grad_rows', shape, grad.dtype, zero=True)
        grad_rows_x = grad_rows.transpose(2, 3)
        torch.mul(grad_bias, self.fx, out=diff)
        grad_rows_x[:, :, :, 1:].scatter_add_(3, self.x_index, diff)
        torch.sub(grad_bias, diff, out=diff)
        grad_rows_x.scatter_add_(3, self.x_index, diff)
        # rows_interp = top + fy * (bottom - top)
        grad_coords[..., 0] += self.row_diff.mul_(grad_rows).sum((1, 2, 3))
        grad_bottom = torch.mul(grad_rows, self.fy, out=self.workspace('grad_bottom', shape, grad.dtype))
        grad_top = grad_rows.sub_(grad_bottom)
        index = self.y_index.reshape(nb, hg, tw_pad, rows * ns)
        grad_table_t.scatter_add_(3, index, grad_top.view(nb, hg, tw_pad, rows * ns))
        grad_table_t[..., 1:].scatter_add_(3, index, grad_bottom.view(nb, hg, tw_pad, rows * ns))
        return grad_s


class _Chunk(NamedTuple):
    """Batch-groups ``b0:b1`` and query columns ``c0:c1`` of the flattened ``H * W`` queries
    (rows ``r0:r1``)."""

    b0: int
    b1: int
    r0: int
    r1: int
    c0: int
    c1: int


class _DeformableChunks:
    """What the forward and the backward operator share: the checked inputs, the table
    coordinates of every key, the padded tables and, on the PyTorch path, the chunks and each
    chunk's softmax.

    Args:
        q, k, v, pos, query_y, query_x, table, num_groups, chunk: The operator's inputs.
        backend (str): One of :data:`OPERATOR_BACKENDS`. ``'cpu-kernel'`` loads the C++ kernels
            (:attr:`kernels`), which the operators then run instead of the chunks;
            ``'gpu-kernel'`` checks that the Triton kernels can run these inputs; only
            ``'pytorch'`` sets up the chunks.
    """

    def __init__(
        self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, query_y: Tensor, query_x: Tensor, table: Tensor,
        num_groups: int, chunk: int, backend: str,
    ):  # fmt: skip
        # The shapes that the operators (and the C++ kernels behind them) rely on; the operators
        # check them themselves, since they may be called directly (torch.ops.dat.*).
        valid = q.dim() == 4 and k.dim() == 4 and table.dim() == 3 and num_groups > 0 and chunk > 0
        if valid:
            bg, hg, d, m = q.shape
            ns = k.shape[-1]
            valid = (
                k.shape == (bg, hg, d, ns)
                and v.shape == k.shape
                and pos.shape == (bg, ns, 2)
                and query_y.dim() == 1
                and query_x.dim() == 1
                and query_y.numel() * query_x.numel() == m
                and hg > 0
                and table.shape[0] == hg * num_groups
                and bg % num_groups == 0
                and min(table.shape[1:]) > 0
            )
        if not valid:
            raise ValueError(
                'dat::deformable_attention expects q (BG, hg, d, H * W), k and v (BG, hg, d, Ns), pos '
                '(BG, Ns, 2), query_y (H,), query_x (W,), a table (hg * groups, Th, Tw), groups > 0 dividing '
                f'BG, hg > 0 and chunk > 0; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, '
                f'pos {tuple(pos.shape)}, query_y {tuple(query_y.shape)}, query_x {tuple(query_x.shape)}, '
                f'table {tuple(table.shape)}, groups {num_groups}, chunk {chunk}'
            )
        if backend not in OPERATOR_BACKENDS:
            raise ValueError(f'dat::deformable_attention backend must be one of {OPERATOR_BACKENDS}, got {backend!r}')
        self.kernels = _required_kernels(table) if backend == 'cpu-kernel' else None
        if backend == 'gpu-kernel':
            _check_gpu_kernel(q, table)
        self.bg, self.hg, self.d, self.m = q.shape
        self.height, self.width, self.num_keys = query_y.shape[0], query_x.shape[0], k.shape[-1]
        self.table_size = th, tw = table.shape[-2:]
        self.scale = self.d**-0.5
        self.acc = table.dtype
        self.iy, self.fy = _table_coordinates(query_y, pos[..., 0], th)
        self.ix, self.fx = _table_coordinates(query_x, pos[..., 1], tw)
        # Padded tables (groups, hg, Th + 4, Tw + 4): y major for the kernels, x major (transposed)
        # for the chunks' gathers.
        self.padded_tables = F.pad(table, (2, 2, 2, 2)).reshape(num_groups, -1, th + 4, tw + 4)
        if backend == 'pytorch':
            self.table_t = self.padded_tables.transpose(-1, -2)
            self.workspace = _Workspace(q.device)
            self.ranges = _chunk_ranges(self.bg, self.hg, self.height, self.width, self.num_keys, chunk)

    def __iter__(self) -> Iterator[_Chunk]:
        for b0, b1, r0, r1 in self.ranges:
            yield _Chunk(b0, b1, r0, r1, r0 * self.width, r1 * self.width)

    def queries(self, t: Tensor, c: _Chunk) -> Tensor:
        """The chunk's ``(nb * hg, d, rows * W)`` slice of a ``(BG, hg, d, M)`` tensor."""
        return t[c.b0 : c.b1, :, :, c.c0 : c.c1].reshape((c.b1 - c.b0) * self.hg, self.d, c.c1 - c.c0)

    def keys(self, t: Tensor, c: _Chunk) -> Tensor:
        """The chunk's ``(nb * hg, d, Ns)`` view of a ``(BG, hg, d, Ns)`` tensor."""
        return t[c.b0 : c.b1].reshape((c.b1 - c.b0) * self.hg, self.d, self.num_keys)

    def _group_tables(self, tables: Tensor, b0: int, b1: int) -> Tensor:
        """The ``(groups, ...)`` tables of batch-groups ``b0 .. b1 - 1`` (batch-group b has group
        b % groups), as a new tensor."""
        index = torch.arange(b0, b1, device=tables.device) % tables.shape[0]
        return tables.index_select(0, index)

    def softmax(self, c: _Chunk) -> _TableBiasSoftmax:
        """The chunk's :class:`_TableBiasSoftmax`."""
        b0, b1, r0, r1 = c.b0, c.b1, c.r0, c.r1
        return _TableBiasSoftmax(
            self._group_tables(self.table_t, b0, b1),
            self.iy[b0:b1, r0:r1],
            self.fy[b0:b1, r0:r1],
            self.ix[b0:b1],
            self.fx[b0:b1],
            self.workspace,
        )

    def bias_taps(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The bias inputs of the C++ and GPU kernels, for every batch-group.

        Returns:
            tuple: ``(table, iy, fy, ix, fx)``: the padded tables ``(BG, hg, Th + 4, Tw + 4)`` y
            major, and the tap indices (int32: half the memory traffic of int64 on the per-query
            stream) and weights.
        """
        table = self._group_tables(self.padded_tables, 0, self.bg)
        return table, self.iy.to(torch.int32), self.fy, self.ix.to(torch.int32), self.fx

    def kernel_bias(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The bias inputs of the C++ kernels: :meth:`bias_taps` and ``x_taps``, the lowest and
        highest padded column that the x taps of each key reach, ``(BG, Ns, 2)`` int32."""
        table, iy, fy, ix, fx = self.bias_taps()
        x_taps = torch.stack([ix.amin(1), ix.amax(1) + 1], -1)
        return table, iy, fy, ix, fx, x_taps


def _required_kernels(table: Tensor):
    """The C++ kernels, for an operator told to use them (float32 tables on CPU)."""
    if table.device.type != 'cpu' or table.dtype != torch.float32:
        raise ValueError(
            'dat::deformable_attention runs the C++ CPU kernels on a float32 CPU table only; got '
            f'{table.dtype} on {table.device}'
        )
    return cpu_kernels.required_kernels('dat::deformable_attention', 'deformable_attention() picks PyTorch by itself')


def _check_gpu_kernel(q: Tensor, table: Tensor):
    """Checks that the Triton kernels can run: CUDA tensors (CPU ones in Triton's interpreter),
    half or float32 queries and a float32 table."""
    gpu_kernels.check_inputs(
        'dat::deformable_attention',
        q.device,
        q.dtype in (torch.float32, torch.float16, torch.bfloat16) and table.dtype == torch.float32,
        'CUDA tensors, float32 or half queries and a float32 table',
        f'{q.dtype} queries on {q.device} and a {table.dtype} table',
    )


def _dense(t: Tensor) -> Tensor:
    """``t`` where its elements fill its memory without gaps or overlaps, its axes in any order (the
    C++ kernels read and write queries so, e.g. channels-last maps), else a contiguous copy."""
    expected = 1
    for size, stride in sorted((p for p in zip(t.shape, t.stride(), strict=True) if p[0] != 1), key=lambda p: p[1]):
        if stride != expected:
            return t.contiguous()
        expected *= size
    return t


def _position_and_table_gradients(
    grad_coords: Tensor, grad_table: Tensor, table_size: tuple[int, int], num_groups: int
) -> tuple[Tensor, Tensor]:
    """The gradients of the positions and of the table from those of the keys' pixel coordinates
    ``(BG, Ns, 2)`` (scaled in place into the positions') and of each batch-group's padded tables
    ``(BG, hg, Th + 4, Tw + 4)``."""
    th, tw = table_size
    # Pixel coordinate = ((q - p) / 2 + 1) / 2 * (size - 1): d coord / d p = -(size - 1) / 4, a
    # scalar per axis (a tensor of them would be a copy from the host, which waits for a GPU).
    grad_pos = grad_coords
    grad_pos[..., 0].mul_(-(th - 1) / 4.0)
    grad_pos[..., 1].mul_(-(tw - 1) / 4.0)
    grad_table = grad_table.reshape(-1, num_groups, *grad_table.shape[1:]).sum(0)
    grad_table = grad_table.reshape(-1, th + 4, tw + 4)[:, 2 : th + 2, 2 : tw + 2].contiguous()
    return grad_pos, grad_table


@torch_compat.custom_op('dat::deformable_attention', mutates_args=())
def _deformable_attention_op(
    q: Tensor, k: Tensor, v: Tensor, pos: Tensor, query_y: Tensor, query_x: Tensor, table: Tensor, num_groups: int,
    chunk: int, backend: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    chunks = _DeformableChunks(q, k, v, pos, query_y, query_x, table, num_groups, chunk, backend)
    if backend == 'gpu-kernel':
        k, v = (t.to(q.dtype).contiguous() for t in (k, v))
        return gpu_kernels.deformable_attention_forward(_dense(q), k, v, chunks.scale, *chunks.bias_taps())
    if chunks.kernels is not None:  # float32 products (half inputs under CPU autocast are converted)
        q32, k32, v32 = _dense(q.to(torch.float32)), k.to(torch.float32).contiguous(), v.to(torch.float32).contiguous()
        out, lse = chunks.kernels.deformable_attention_forward(q32, k32, v32, chunks.scale, *chunks.kernel_bias())
        return out.to(q.dtype), lse
    hg = chunks.hg
    out = torch.empty_like(q)
    lse = torch.empty(chunks.bg, hg, chunks.m, dtype=chunks.acc, device=q.device)
    for c in chunks:
        nb = c.b1 - c.b0
        q_c, k_c = chunks.queries(q, c), chunks.keys(k, c)
        lse_c = chunks.workspace('lse', (nb, hg, c.c1 - c.c0), chunks.acc)
        probs = chunks.softmax(c).softmax_(q_c, k_c, chunks.scale, lse_c)
        out_c = torch.bmm(chunks.keys(v, c), probs.to(v.dtype).transpose(1, 2))
        out[c.b0 : c.b1, :, :, c.c0 : c.c1] = out_c.view(nb, hg, chunks.d, c.c1 - c.c0)
        lse[c.b0 : c.b1, :, c.c0 : c.c1] = lse_c
    return out, lse


@_deformable_attention_op.register_fake
def _(q, k, v, pos, query_y, query_x, table, num_groups, chunk, backend):
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[1], q.shape[3], dtype=table.dtype)


@torch_compat.custom_op('dat::deformable_attention_backward', mutates_args=())
def _deformable_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, query_y: Tensor, query_x: Tensor, table: Tensor,
    out: Tensor, lse: Tensor, num_groups: int, chunk: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    chunks = _DeformableChunks(q, k, v, pos, query_y, query_x, table, num_groups, chunk, backend)
    if grad_out.shape != q.shape or out.shape != q.shape or lse.shape != (*q.shape[:2], q.shape[3]):
        raise ValueError(
            f"dat::deformable_attention_backward expects grad_out and out of q's shape {tuple(q.shape)} "
            f'and lse {(*q.shape[:2], q.shape[3])}; got grad_out {tuple(grad_out.shape)}, '
            f'out {tuple(out.shape)}, lse {tuple(lse.shape)}'
        )
    bg, hg, d, acc, ns = chunks.bg, chunks.hg, chunks.d, chunks.acc, chunks.num_keys
    th, tw = chunks.table_size
    scale = chunks.scale
    if backend == 'gpu-kernel':
        # D = rowsum(dO * O), the softmax backward term, (BG, hg, M).
        delta = (grad_out.to(acc) * out.to(acc)).sum(2)
        grad_q, grad_k, grad_v, grad_table, grad_coords = gpu_kernels.deformable_attention_backward(
            _dense(grad_out), _dense(q), *(t.to(q.dtype).contiguous() for t in (k, v)), lse.contiguous(), delta,
            scale, *chunks.bias_taps(),
        )  # fmt: skip
        grad_pos, grad_table = _position_and_table_gradients(grad_coords, grad_table, chunks.table_size, num_groups)
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), grad_pos, grad_table
    if chunks.kernels is not None:
        grad_q, grad_k, grad_v, grad_table, grad_coords = chunks.kernels.deformable_attention_backward(
            *(_dense(t.to(torch.float32)) for t in (grad_out, q)),
            *(t.to(torch.float32).contiguous() for t in (k, v)),
            lse.contiguous(),
            scale,
            *chunks.kernel_bias(),
        )
        grad_pos, grad_table = _position_and_table_gradients(grad_coords, grad_table, chunks.table_size, num_groups)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), grad_pos, grad_table
    grad_out = grad_out.contiguous()
    # D = rowsum(dO * O): the softmax backward term, (BG, hg, M).
    delta = (grad_out.to(acc) * out.to(acc)).sum(2)
    grad_q = torch.empty_like(q)
    grad_k = torch.zeros(k.shape, dtype=acc, device=k.device)
    grad_v = torch.zeros(v.shape, dtype=acc, device=v.device)
    grad_coords = torch.zeros(bg, ns, 2, dtype=acc, device=q.device)  # of the keys' (y, x) table coordinates
    grad_table_t = torch.zeros(bg, hg, tw + 4, th + 4, dtype=acc, device=q.device)
    for c in chunks:
        nb, queries = c.b1 - c.b0, c.c1 - c.c0
        q_c, k_c, v_c = chunks.queries(q, c), chunks.keys(k, c), chunks.keys(v, c)
        do_c = chunks.queries(grad_out, c)
        softmax = chunks.softmax(c)
        probs = softmax.recompute_(q_c, k_c, scale, lse[c.b0 : c.b1, :, c.c0 : c.c1].contiguous())
        probs_v = probs.to(v.dtype)
        grad_v[c.b0 : c.b1].view(nb * hg, d, ns).add_(torch.bmm(do_c.to(v.dtype), probs_v).to(acc))
        del probs_v
        # dP = dO v^T, then dS = P * (dP - D)
        grad_logits = chunks.workspace('grad_logits', (nb * hg, queries, ns), acc)
        if v.dtype == acc:
            torch.bmm(do_c.transpose(1, 2), v_c, out=grad_logits)
        else:
            grad_logits.copy_(torch.bmm(do_c.transpose(1, 2).to(v.dtype), v_c))
        grad_logits = softmax.backward_(
            grad_logits,
            probs,
            delta[c.b0 : c.b1, :, c.c0 : c.c1].contiguous(),
            grad_coords[c.b0 : c.b1],
            grad_table_t[c.b0 : c.b1],
        )
        del probs
        grad_s = grad_logits.to(q.dtype)
        grad_q_c = torch.bmm(k_c, grad_s.transpose(1, 2)).mul_(scale)
        grad_q[c.b0 : c.b1, :, :, c.c0 : c.c1] = grad_q_c.view(nb, hg, d, queries)
        grad_k[c.b0 : c.b1].view(nb * hg, d, ns).add_(torch.bmm(q_c, grad_s).to(acc), alpha=scale)
        del grad_s
    grad_pos, grad_table = _position_and_table_gradients(
        grad_coords, grad_table_t.transpose(-1, -2), chunks.table_size, num_groups
    )
    return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), grad_pos, grad_table


@_deformable_attention_backward_op.register_fake
def _(grad_out, q, k, v, pos, query_y, query_x, table, out, lse, num_groups, chunk, backend):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(pos),
        torch.empty_like(table),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, pos, query_y, query_x, table, num_groups, chunk, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, pos, query_y, query_x, table, out, lse)
    ctx.num_groups, ctx.chunk, ctx.backend = num_groups, chunk, backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, pos, query_y, query_x, table, out, lse = ctx.saved_tensors
    grad_q, grad_k, grad_v, grad_pos, grad_table = _deformable_attention_backward_op(
        grad_out, q, k, v, pos, query_y, query_x, table, out, lse, ctx.num_groups, ctx.chunk, ctx.backend
    )
    return grad_q, grad_k, grad_v, grad_pos, None, None, grad_table, None, None, None


_deformable_attention_op.register_autograd(_backward, setup_context=_setup_context)


def deformable_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    query_y: Tensor,
    query_x: Tensor,
    rpe_table: Tensor,
    num_groups: int,
    impl: str = 'auto',
    chunk_elements: int | None = None,
) -> Tensor:
    """Deformable multi-head attention with the deformable relative position bias.

    Computes :func:`~projects.dat.ops.reference.deformable_attention_reference` (for the
    queries of the grid ``query_y x query_x``) with the backend that
    :func:`~projects.dat.ops.dispatch.select_backend` picks for ``impl``. The fast backends
    compute the bias, a 4-tap bilinear read of the table at coordinates separable in y and x,
    chunk by chunk of query rows together with the logits; the forward pass saves only
    ``q, k, v``, the positions, the output and the log-sum-exp of each query (no ``HW x Ns``
    tensor), and the backward pass recomputes each chunk. Positions, bias and softmax are
    computed in float32 (float64 for float64 inputs); the products with q, k and v run in their
    dtype (half under AMP), except on the C++ kernels, which compute them in float32.

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
        impl (str): One of :data:`~projects.dat.ops.dispatch.ATTN_IMPLS`. Defaults to ``'auto'``.
        chunk_elements (int, optional): Logits per chunk of the fast backends. Defaults to
            :data:`DEFORMABLE_CHUNK_ELEMENTS` on CPU and to a memory budget on CUDA
            (:func:`~projects.dat.ops.chunking.default_chunk_elements`).

    Returns:
        Tensor: ``(B, C, H, W)`` attention output before the output projection, in the
        dtype of ``q``, ``k`` and ``v``, channels-last where ``q`` is (so that the output
        projection reads it in place; the FLOP counters then see the same layers on every path).
    """
    b, c, h, w = q.shape
    dtype, acc = attention_dtypes(q, k, v)  # acc: positions, bias and softmax
    backend = select_backend(impl, q.device, acc, gpu_kernel=True)
    channels_last = q.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if backend == 'reference':  # checks nothing: shapes may be traced (ONNX export)
        query_coords = torch.stack(torch.meshgrid(query_y, query_x, indexing='ij'), dim=-1).reshape(h * w, 2)
        return deformable_attention_reference(q, k, v, pos, query_coords, rpe_table, num_groups).contiguous(
            memory_format=layout
        )
    heads = rpe_table.shape[0]
    num_keys = k.shape[-1]
    if (
        k.shape != (b, c, num_keys)
        or v.shape != k.shape
        or pos.shape != (b * num_groups, num_keys, 2)
        or query_y.shape != (h,)
        or query_x.shape != (w,)
        or c % heads
        or heads % num_groups
    ):
        raise ValueError(
            'deformable_attention expects q (B, C, H, W), k and v (B, C, Ns), pos (B * groups, Ns, 2), '
            'query_y (H,), query_x (W,) and a table (heads, Th, Tw) with heads dividing C and groups '
            f'dividing heads; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, '
            f'pos {tuple(pos.shape)}, query_y {tuple(query_y.shape)}, query_x {tuple(query_x.shape)}, '
            f'table {tuple(rpe_table.shape)}, groups {num_groups}'
        )
    hg, d = heads // num_groups, c // heads
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(q.device, acc, DEFORMABLE_CHUNK_ELEMENTS, DEFORMABLE_CHUNK_BUFFERS)
    # Channels-last queries (the D block's) stay so: the operator computes query-major and returns
    # its output in q's layout, which the output projection then reads in place. A batch of
    # several groups cannot be viewed (BG, hg, d, HW): it is copied, and so is the output.
    q = q.to(dtype)
    if not channels_last:
        q = q.contiguous()
    out, _ = _deformable_attention_op(
        q.reshape(b * num_groups, hg, d, h * w),
        k.to(dtype).reshape(b * num_groups, hg, d, num_keys).contiguous(),
        v.to(dtype).reshape(b * num_groups, hg, d, num_keys).contiguous(),
        pos.to(acc).contiguous(),
        query_y.to(acc).contiguous(),
        query_x.to(acc).contiguous(),
        rpe_table.to(acc).contiguous(),
        num_groups,
        chunk_elements,
        backend,
    )
    return out.view(b, c, h, w).contiguous(memory_format=layout)
