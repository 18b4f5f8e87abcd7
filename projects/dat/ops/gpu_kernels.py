"""The optional GPU kernel of deformable attention's forward pass, in Triton.

On CUDA the PyTorch path of :mod:`~projects.dat.ops.deformable` makes about a dozen passes over
every chunk of logits (the bias's gathers, the products, the softmax's steps): most of a D block's
forward time on a GPU goes to them and to launching their kernels. :func:`deformable_attention_forward`
computes the same arithmetic in one kernel, the way flash attention does: each program takes a
block of queries of one head, and for each block of keys computes ``scale * q.k`` (a matrix
product), adds the bias (the bilinear read of the padded table at the tap indices and weights of
:meth:`~projects.dat.ops.deformable._DeformableChunks.bias_taps`, interpolated in y first, then
in x, as the PyTorch path and the C++ kernel do), and updates a running softmax and its product
with ``v``; only the output and each query's log-sum-exp go to memory. The backward pass stays
the PyTorch path's, which recomputes the probabilities from that log-sum-exp.

Products of float32 inputs run in IEEE float32 (no TF32), so the kernel agrees with the PyTorch
path to float32 round-off; under autocast (half inputs) the logits of the product are rounded to
the inputs' dtype, as the PyTorch path's half product returns them.

Triton is imported when a kernel is first needed, never on ``import projects.dat``; where it is
missing, :func:`available` is False and the operators run in PyTorch. ``DAT_GPU_KERNELS=0``
turns the kernel off (to compare). With ``TRITON_INTERPRET=1`` (set before the first use) Triton
runs the kernel on CPU tensors, which is how the tests check it on a machine without a GPU.
"""

import functools
import os

import torch
from torch import Tensor

ENV_SWITCH = 'DAT_GPU_KERNELS'
INTERPRET_SWITCH = 'TRITON_INTERPRET'

# Queries and keys per block of a program; 16 is the smallest side Triton's products take.
BLOCK_QUERIES = 64
BLOCK_KEYS = 32
MIN_BLOCK = 16


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors)."""
    return os.environ.get(INTERPRET_SWITCH, '0') not in ('', '0')


@functools.cache
def _triton():
    """``(triton, triton.language)``, or None where Triton does not import."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or a build that cannot load here
        return None
    return triton, tl


def available() -> bool:
    """Whether the GPU kernel can run: Triton imports and ``DAT_GPU_KERNELS`` is not ``0``."""
    return os.environ.get(ENV_SWITCH, '1') != '0' and _triton() is not None


@functools.cache
def _forward_kernel():
    """The Triton forward kernel, defined (and so compiled) on first use."""
    triton, tl = _triton()

    @triton.jit
    def forward(
        q_ptr, k_ptr, v_ptr, table_ptr, iy_ptr, fy_ptr, ix_ptr, fx_ptr, out_ptr, lse_ptr,
        q_stride_b, q_stride_h, q_stride_d, q_stride_m,
        out_stride_b, out_stride_h, out_stride_d, out_stride_m,
        heads, d, queries, width, rows, num_keys, table_rows, table_cols, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr, ROUND_LOGITS: tl.constexpr,
    ):  # fmt: skip
        block, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        valid_m = offs_m < queries
        valid_d = offs_d < d
        query_row, query_col = offs_m // width, offs_m % width
        head_q = q_ptr + b * q_stride_b + h * q_stride_h
        q = tl.load(
            head_q + offs_m[:, None] * q_stride_m + offs_d[None, :] * q_stride_d,
            mask=valid_m[:, None] & valid_d[None, :],
            other=0.0,
        )
        head_keys = bh * d * num_keys
        head_table = table_ptr + bh * table_rows * table_cols
        row_taps = (b * rows + query_row[:, None]) * num_keys
        col_taps = (b * width + query_col[:, None]) * num_keys
        running_max = tl.full([BLOCK_M], float('-inf'), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, num_keys, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid_n = offs_n < num_keys
            k = tl.load(
                k_ptr + head_keys + offs_d[:, None] * num_keys + offs_n[None, :],
                mask=valid_d[:, None] & valid_n[None, :],
                other=0.0,
            )
            if IEEE:
                products = tl.dot(q, k, input_precision='ieee')
            else:
                products = tl.dot(q, k)
            if ROUND_LOGITS:
                products = products.to(q_ptr.dtype.element_ty).to(tl.float32)
            pair = valid_m[:, None] & valid_n[None, :]
            iy = tl.load(iy_ptr + row_taps + offs_n[None, :], mask=pair, other=0)
            fy = tl.load(fy_ptr + row_taps + offs_n[None, :], mask=pair, other=0.0)
            ix = tl.load(ix_ptr + col_taps + offs_n[None, :], mask=pair, other=0)
            fx = tl.load(fx_ptr + col_taps + offs_n[None, :], mask=pair, other=0.0)
            top = head_table + iy * table_cols + ix
            top_left = tl.load(top, mask=pair, other=0.0)
            top_right = tl.load(top + 1, mask=pair, other=0.0)
            bottom_left = tl.load(top + table_cols, mask=pair, other=0.0)
            bottom_right = tl.load(top + table_cols + 1, mask=pair, other=0.0)
            left = top_left + (bottom_left - top_left) * fy
            right = top_right + (bottom_right - top_right) * fy
            logits = products * scale + (left + (right - left) * fx)
            logits = tl.where(valid_n[None, :], logits, float('-inf'))
            new_max = tl.maximum(running_max, tl.max(logits, 1))
            # A NaN logit makes its query's sum, and so its output, NaN, as on the PyTorch path.
            # Query rows past the end compute on zeros and are not stored.
            rescale = tl.exp(running_max - new_max)
            weights = tl.exp(logits - new_max[:, None])
            running_sum = running_sum * rescale + tl.sum(weights, 1)
            v = tl.load(
                v_ptr + head_keys + offs_n[:, None] + offs_d[None, :] * num_keys,
                mask=valid_n[:, None] & valid_d[None, :],
                other=0.0,
            )
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision='ieee')
            else:
                acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v)
            running_max = new_max
        out = acc / running_sum[:, None]
        head_out = out_ptr + b * out_stride_b + h * out_stride_h
        tl.store(
            head_out + offs_m[:, None] * out_stride_m + offs_d[None, :] * out_stride_d,
            out.to(out_ptr.dtype.element_ty),
            mask=valid_m[:, None] & valid_d[None, :],
        )
        tl.store(lse_ptr + bh * queries + offs_m, running_max + tl.log(running_sum), mask=valid_m)

    return forward


def _block(size: int, largest: int) -> int:
    """The block side for ``size`` elements: a power of two between :data:`MIN_BLOCK` and ``largest``."""
    return max(MIN_BLOCK, min(largest, 1 << max(0, size - 1).bit_length()))


def deformable_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, scale: float, table: Tensor, iy: Tensor, fy: Tensor, ix: Tensor, fx: Tensor
) -> tuple[Tensor, Tensor]:
    """Deformable attention's output and each query's log-sum-exp, in one Triton kernel.

    The contract of the C++ forward kernel (``csrc/deformable_attention.cpp``), without its
    ``x_taps``: the bias of query ``(r, c)`` and key ``n`` is the bilinear read of the head's
    padded table at rows ``iy[r, n]``, ``iy[r, n] + 1`` (weight ``fy``) and columns ``ix[c, n]``,
    ``ix[c, n] + 1`` (weight ``fx``), which must lie inside the table.

    Args:
        q (Tensor): ``(BG, hg, d, rows * W)`` queries, any dense layout (the output takes it).
        k (Tensor): ``(BG, hg, d, Ns)`` keys, contiguous, in q's dtype.
        v (Tensor): ``(BG, hg, d, Ns)`` values, contiguous, in q's dtype.
        scale (float): Factor of ``q.k``.
        table (Tensor): ``(BG, hg, Th + 4, Tw + 4)`` padded tables, float32, contiguous.
        iy (Tensor): ``(BG, rows, Ns)`` int32 first y tap; ``fy`` its float32 weight of the second.
        fy (Tensor): See ``iy``.
        ix (Tensor): ``(BG, W, Ns)`` int32 first x tap; ``fx`` its float32 weight of the second.
        fx (Tensor): See ``ix``.

    Returns:
        tuple: The output ``(BG, hg, d, rows * W)`` laid out as ``q``, in q's dtype, and the
        float32 log-sum-exp ``(BG, hg, rows * W)``.
    """
    bg, heads, d, queries = q.shape
    rows, width, num_keys = iy.shape[1], ix.shape[1], k.shape[-1]
    out = torch.empty_like(q)
    lse = torch.empty(bg, heads, queries, dtype=torch.float32, device=q.device)
    block_m = _block(queries, BLOCK_QUERIES)
    grid = (-(-queries // block_m), bg * heads)
    _forward_kernel()[grid](
        q, k, v, table, iy, fy, ix, fx, out, lse,
        *q.stride(), *out.stride(),
        heads, d, queries, width, rows, num_keys, table.shape[2], table.shape[3], scale,
        BLOCK_M=block_m, BLOCK_N=_block(num_keys, BLOCK_KEYS), BLOCK_D=_block(d, 1 << 30),
        IEEE=q.dtype == torch.float32, ROUND_LOGITS=q.dtype != torch.float32,
    )  # fmt: skip
    return out, lse
