"""The Triton kernels of deformable attention (:mod:`~projects.dat.ops.gpu_kernels` launches them
and says what they compute). Importing this module imports Triton: only
:mod:`~projects.dat.ops.gpu_kernels` does, on first use.

Shapes, with BG = batch * groups, hg = heads per group (``heads`` here), M = rows * W queries:
q, grad_out, the output and grad_q ``(BG, hg, d, M)`` with any strides (passed in); k, v,
grad_k, grad_v ``(BG, hg, d, Ns)`` contiguous; the padded tables and their gradient
``(BG, hg, Th + 4, Tw + 4)`` contiguous; iy, fy ``(BG, rows, Ns)``; ix, fx ``(BG, W, Ns)``; lse and
delta ``(BG, hg, M)``. Programs run over ``(blocks, BG * hg)``.
"""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` accumulated in float32: IEEE float32 products for float32 blocks (no TF32)."""
    if IEEE:
        product = tl.dot(a, b, input_precision='ieee')
    else:
        product = tl.dot(a, b)
    return product


@triton.jit
def bias_taps(iy_ptr, fy_ptr, ix_ptr, fx_ptr, head_table, table_cols, row_taps, col_taps, offs_n, pair):
    """The table offset of each pair's top-left tap, the weights of the second taps and the
    four taps' values."""
    iy = tl.load(iy_ptr + row_taps + offs_n[None, :], mask=pair, other=0)
    fy = tl.load(fy_ptr + row_taps + offs_n[None, :], mask=pair, other=0.0)
    ix = tl.load(ix_ptr + col_taps + offs_n[None, :], mask=pair, other=0)
    fx = tl.load(fx_ptr + col_taps + offs_n[None, :], mask=pair, other=0.0)
    offset = iy * table_cols + ix
    top_left = tl.load(head_table + offset, mask=pair, other=0.0)
    top_right = tl.load(head_table + offset + 1, mask=pair, other=0.0)
    bottom_left = tl.load(head_table + offset + table_cols, mask=pair, other=0.0)
    bottom_right = tl.load(head_table + offset + table_cols + 1, mask=pair, other=0.0)
    return offset, fy, fx, top_left, top_right, bottom_left, bottom_right


@triton.jit
def logits_of(
    q, k, scale, fy, fx, top_left, top_right, bottom_left, bottom_right, IEEE: tl.constexpr, ROUND_LOGITS: tl.constexpr
):
    """``scale * q.k + bias`` of a block, and the bias's slope in x (its gradient by fx)."""
    products = dot(q, k, IEEE)
    if ROUND_LOGITS:
        products = products.to(q.dtype).to(tl.float32)
    left = top_left + (bottom_left - top_left) * fy
    right = top_right + (bottom_right - top_right) * fy
    return products * scale + (left + (right - left) * fx), right - left


@triton.jit
def query_block_offsets(block, d, queries, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """A block of queries: their offsets and the channels', which of them exist, and the
    ``(BLOCK_M, BLOCK_D)`` mask of the block's elements."""
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    valid_m = offs_m < queries
    valid_d = offs_d < d
    return offs_m, offs_d, valid_m, valid_d, valid_m[:, None] & valid_d[None, :]


@triton.jit
def tap_rows(b, offs_m, width, rows, num_keys):
    """Where each query's row of iy / fy (by its map row) and of ix / fx (by its column) starts."""
    return (b * rows + offs_m[:, None] // width) * num_keys, (b * width + offs_m[:, None] % width) * num_keys


@triton.jit
def load_queries(ptr, stride_b, stride_h, stride_m, stride_d, b, h, offs_m, offs_d, mask):
    """A ``(BLOCK_M, BLOCK_D)`` block of batch-group b's head h of a tensor laid out as q."""
    return tl.load(ptr + b * stride_b + h * stride_h + offs_m[:, None] * stride_m + offs_d[None, :] * stride_d,
                   mask=mask, other=0.0)  # fmt: skip


@triton.jit
def load_keys(ptr, head_keys, num_keys, offs_d, offs_n, mask):
    """A ``(BLOCK_D, BLOCK_N)`` block of a head's ``(d, Ns)`` keys or values."""
    return tl.load(ptr + head_keys + offs_d[:, None] * num_keys + offs_n[None, :], mask=mask, other=0.0)


@triton.jit
def load_query_rows(
    q_ptr, grad_out_ptr, lse_ptr, delta_ptr,
    q_stride_b, q_stride_h, q_stride_d, q_stride_m,
    grad_out_stride_b, grad_out_stride_h, grad_out_stride_d, grad_out_stride_m,
    b, h, bh, queries, offs_m, offs_d, query_block, valid_m,
):  # fmt: skip
    """What the backward pass reads of a block of queries: q, the output's gradient, and each
    query's log-sum-exp and ``D = rowsum(dO * O)``."""
    q = load_queries(q_ptr, q_stride_b, q_stride_h, q_stride_m, q_stride_d, b, h, offs_m, offs_d, query_block)
    grad_out = load_queries(
        grad_out_ptr, grad_out_stride_b, grad_out_stride_h, grad_out_stride_m, grad_out_stride_d,
        b, h, offs_m, offs_d, query_block,
    )  # fmt: skip
    lse = tl.load(lse_ptr + bh * queries + offs_m, mask=valid_m, other=0.0)
    delta = tl.load(delta_ptr + bh * queries + offs_m, mask=valid_m, other=0.0)
    return q, grad_out, lse, delta


@triton.jit
def softmax_backward(
    q, k, v, grad_out, lse, delta, scale, fy, fx, top_left, top_right, bottom_left, bottom_right, pair,
    IEEE: tl.constexpr, ROUND_LOGITS: tl.constexpr,
):  # fmt: skip
    """A block's probabilities P, recomputed from each query's log-sum-exp, the logits' gradient
    dS = P * (dO.v - D) and the bias's slope in x."""
    logits, x_slope = logits_of(q, k, scale, fy, fx, top_left, top_right, bottom_left, bottom_right, IEEE, ROUND_LOGITS)
    probs = tl.where(pair, tl.exp(logits - lse[:, None]), 0.0)
    grad_s = probs * (dot(grad_out, v, IEEE) - delta[:, None])
    return probs, grad_s, x_slope


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
    offs_m, offs_d, valid_m, valid_d, query_block = query_block_offsets(block, d, queries, BLOCK_M, BLOCK_D)
    q = load_queries(q_ptr, q_stride_b, q_stride_h, q_stride_m, q_stride_d, b, h, offs_m, offs_d, query_block)
    head_keys = bh * d * num_keys
    head_table = table_ptr + bh * table_rows * table_cols
    row_taps, col_taps = tap_rows(b, offs_m, width, rows, num_keys)
    running_max = tl.full([BLOCK_M], float('-inf'), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, num_keys, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < num_keys
        key_block = valid_d[:, None] & valid_n[None, :]
        k = load_keys(k_ptr, head_keys, num_keys, offs_d, offs_n, key_block)
        pair = valid_m[:, None] & valid_n[None, :]
        _, fy, fx, top_left, top_right, bottom_left, bottom_right = bias_taps(
            iy_ptr, fy_ptr, ix_ptr, fx_ptr, head_table, table_cols, row_taps, col_taps, offs_n, pair
        )
        logits, _ = logits_of(q, k, scale, fy, fx, top_left, top_right, bottom_left, bottom_right, IEEE, ROUND_LOGITS)
        logits = tl.where(valid_n[None, :], logits, float('-inf'))
        new_max = tl.maximum(running_max, tl.max(logits, 1))
        # A NaN logit makes its query's sum, and so its output, NaN, as on the PyTorch path.
        # Query rows past the end compute on zeros and are not stored.
        rescale = tl.exp(running_max - new_max)
        weights = tl.exp(logits - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(weights, 1)
        v = load_keys(v_ptr, head_keys, num_keys, offs_d, offs_n, key_block)
        acc = acc * rescale[:, None] + dot(weights.to(v.dtype), tl.trans(v), IEEE)
        running_max = new_max
    out = acc / running_sum[:, None]
    head_out = out_ptr + b * out_stride_b + h * out_stride_h
    tl.store(
        head_out + offs_m[:, None] * out_stride_m + offs_d[None, :] * out_stride_d,
        out.to(out_ptr.dtype.element_ty),
        mask=query_block,
    )
    tl.store(lse_ptr + bh * queries + offs_m, running_max + tl.log(running_sum), mask=valid_m)


@triton.jit
def backward_keys(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, table_ptr, iy_ptr, fy_ptr, ix_ptr, fx_ptr,
    grad_k_ptr, grad_v_ptr, grad_table_ptr, grad_coords_ptr,
    q_stride_b, q_stride_h, q_stride_d, q_stride_m,
    grad_out_stride_b, grad_out_stride_h, grad_out_stride_d, grad_out_stride_m,
    heads, d, queries, width, rows, num_keys, table_rows, table_cols, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, ROUND_LOGITS: tl.constexpr,
):  # fmt: skip
    # One block of keys of one head against every query: the gradients of k, v and the keys'
    # table coordinates are sums over the queries, kept in registers; the table's gradient
    # is added to memory (four taps per pair; heads and blocks share it).
    block, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    valid_n = offs_n < num_keys
    valid_d = offs_d < d
    key_block = valid_d[:, None] & valid_n[None, :]
    head_keys = bh * d * num_keys
    k = load_keys(k_ptr, head_keys, num_keys, offs_d, offs_n, key_block)
    v = load_keys(v_ptr, head_keys, num_keys, offs_d, offs_n, key_block)
    head_table = bh * table_rows * table_cols
    grad_k = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    grad_v = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    grad_y = tl.zeros([BLOCK_N], tl.float32)
    grad_x = tl.zeros([BLOCK_N], tl.float32)
    for m0 in range(0, queries, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        valid_m = offs_m < queries
        q, grad_out, lse, delta = load_query_rows(
            q_ptr, grad_out_ptr, lse_ptr, delta_ptr,
            q_stride_b, q_stride_h, q_stride_d, q_stride_m,
            grad_out_stride_b, grad_out_stride_h, grad_out_stride_d, grad_out_stride_m,
            b, h, bh, queries, offs_m, offs_d, valid_m[:, None] & valid_d[None, :], valid_m,
        )  # fmt: skip
        pair = valid_m[:, None] & valid_n[None, :]
        row_taps, col_taps = tap_rows(b, offs_m, width, rows, num_keys)
        offset, fy, fx, top_left, top_right, bottom_left, bottom_right = bias_taps(
            iy_ptr, fy_ptr, ix_ptr, fx_ptr, table_ptr + head_table, table_cols, row_taps, col_taps, offs_n, pair
        )
        probs, grad_s, x_slope = softmax_backward(
            q, k, v, grad_out, lse, delta, scale, fy, fx, top_left, top_right, bottom_left, bottom_right, pair,
            IEEE, ROUND_LOGITS,
        )  # fmt: skip
        grad_v += dot(tl.trans(grad_out), probs.to(grad_out.dtype), IEEE)
        grad_k += dot(tl.trans(q), grad_s.to(q.dtype), IEEE)
        # The bias backwards: x taps first (g0, g1), then y, as the PyTorch path computes it.
        g1 = grad_s * fx
        g0 = grad_s - g1
        grad_x += tl.sum(grad_s * x_slope, 0)
        grad_y += tl.sum((bottom_left - top_left) * g0 + (bottom_right - top_right) * g1, 0)
        bottom0 = g0 * fy
        bottom1 = g1 * fy
        taps = grad_table_ptr + head_table + offset
        tl.atomic_add(taps, g0 - bottom0, mask=pair)
        tl.atomic_add(taps + 1, g1 - bottom1, mask=pair)
        tl.atomic_add(taps + table_cols, bottom0, mask=pair)
        tl.atomic_add(taps + table_cols + 1, bottom1, mask=pair)
    key_offsets = head_keys + offs_d[:, None] * num_keys + offs_n[None, :]
    tl.store(grad_k_ptr + key_offsets, grad_k * scale, mask=key_block)
    tl.store(grad_v_ptr + key_offsets, grad_v, mask=key_block)
    coords = grad_coords_ptr + (bh * num_keys + offs_n) * 2
    tl.store(coords, grad_y, mask=valid_n)
    tl.store(coords + 1, grad_x, mask=valid_n)


@triton.jit
def backward_queries(
    q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, table_ptr, iy_ptr, fy_ptr, ix_ptr, fx_ptr, grad_q_ptr,
    q_stride_b, q_stride_h, q_stride_d, q_stride_m,
    grad_out_stride_b, grad_out_stride_h, grad_out_stride_d, grad_out_stride_m,
    grad_q_stride_b, grad_q_stride_h, grad_q_stride_d, grad_q_stride_m,
    heads, d, queries, width, rows, num_keys, table_rows, table_cols, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr, ROUND_LOGITS: tl.constexpr,
):  # fmt: skip
    # One block of queries of one head against every key: dQ = scale * dS.K.
    block, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // heads, bh % heads
    offs_m, offs_d, valid_m, valid_d, query_block = query_block_offsets(block, d, queries, BLOCK_M, BLOCK_D)
    q, grad_out, lse, delta = load_query_rows(
        q_ptr, grad_out_ptr, lse_ptr, delta_ptr,
        q_stride_b, q_stride_h, q_stride_d, q_stride_m,
        grad_out_stride_b, grad_out_stride_h, grad_out_stride_d, grad_out_stride_m,
        b, h, bh, queries, offs_m, offs_d, query_block, valid_m,
    )  # fmt: skip
    head_keys = bh * d * num_keys
    head_table = table_ptr + bh * table_rows * table_cols
    row_taps, col_taps = tap_rows(b, offs_m, width, rows, num_keys)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, num_keys, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < num_keys
        key_block = valid_d[:, None] & valid_n[None, :]
        k = load_keys(k_ptr, head_keys, num_keys, offs_d, offs_n, key_block)
        v = load_keys(v_ptr, head_keys, num_keys, offs_d, offs_n, key_block)
        pair = valid_m[:, None] & valid_n[None, :]
        _, fy, fx, top_left, top_right, bottom_left, bottom_right = bias_taps(
            iy_ptr, fy_ptr, ix_ptr, fx_ptr, head_table, table_cols, row_taps, col_taps, offs_n, pair
        )
        _, grad_s, _ = softmax_backward(
            q, k, v, grad_out, lse, delta, scale, fy, fx, top_left, top_right, bottom_left, bottom_right, pair,
            IEEE, ROUND_LOGITS,
        )  # fmt: skip
        acc += dot(grad_s.to(k.dtype), tl.trans(k), IEEE)
    head_grad_q = grad_q_ptr + b * grad_q_stride_b + h * grad_q_stride_h
    tl.store(
        head_grad_q + offs_m[:, None] * grad_q_stride_m + offs_d[None, :] * grad_q_stride_d,
        (acc * scale).to(grad_q_ptr.dtype.element_ty),
        mask=query_block,
    )
