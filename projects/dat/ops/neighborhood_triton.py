"""The Triton kernels of neighbourhood attention (:mod:`~projects.dat.ops.gpu_kernels` launches them
and says what they compute). Importing this module imports Triton: only
:mod:`~projects.dat.ops.gpu_kernels` does, on first use.

Shapes: q, k, v ``(B, H, W, heads, d)`` with contiguous channels and any other strides (passed
in); grad_out, the output and the gradients of q, k and v contiguous ``(B, H, W, heads, d)``; lse
``(B * heads, H * W)``; delta ``(B, H, W, heads)``; the bias table and its gradient
``(heads, 2k - 1, 2k - 1)``, contiguous. Everything float32. Programs run over
``(tiles, B * heads)``, a tile being ``TILE_H x TILE_W`` pixels of one head (its queries, or in
:func:`backward_keys` its keys).

A kernel visits its tile's pairs offset by offset: at offset ``(dy, dx)`` each query is paired
with the key ``(dy, dx)`` away, and the pair counts where that key lies in the query's ``k x k``
window (NATTEN's windows, shifted inwards at the borders). Every pair of an offset has the same
bias, the table's entry ``(dy + k - 1, dx + k - 1)``, so the table's gradient takes one addition
to memory per tile and offset (adding every pair's instead would make millions of additions to
the table's few addresses, which serialise on a GPU). A tile visits only the offsets that some
pair of it has: 49 for ``k = 7`` away from the borders. The products are per pair, ``d``
multiply-adds, not matrix products.
"""

import triton
import triton.language as tl


@triton.jit
def window_start(c, length, kernel_size):
    """The first row (or column) of the window of the query in row (or column) ``c``."""
    return tl.minimum(tl.maximum(c - kernel_size // 2, 0), length - kernel_size)


@triton.jit
def tile_of_program(heads, height, width, d, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's image b, head h, the rows and columns of its tile's pixels, which of them lie
    in the map, the channels' offsets and the ``(TILE_H * TILE_W, BLOCK_D)`` mask of the tile."""
    tile, bh = tl.program_id(0), tl.program_id(1)
    tiles_x = tl.cdiv(width, TILE_W)
    offs = tl.arange(0, TILE_H * TILE_W)
    y = (tile // tiles_x) * TILE_H + offs // TILE_W
    x = (tile % tiles_x) * TILE_W + offs % TILE_W
    valid = (y < height) & (x < width)
    offs_d = tl.arange(0, BLOCK_D)
    return bh // heads, bh % heads, y, x, valid, offs_d, valid[:, None] & (offs_d < d)[None, :]


@triton.jit
def pair_counts(query_y, query_x, key_y, key_x, height, width, kernel_size):
    """Whether each key lies in its query's window, the query in the map."""
    start_y = window_start(query_y, height, kernel_size)
    start_x = window_start(query_x, width, kernel_size)
    inside = (query_y >= 0) & (query_y < height) & (query_x >= 0) & (query_x < width)
    in_y = (key_y >= start_y) & (key_y < start_y + kernel_size)
    return inside & in_y & (key_x >= start_x) & (key_x < start_x + kernel_size)


@triton.jit
def offset_range(lowest, highest, valid, kernel_size):
    """The offsets ``[first, end)`` of a tile: from the lowest to the highest of its valid pixels'."""
    first = tl.min(tl.where(valid, lowest, kernel_size), 0)
    last = tl.max(tl.where(valid, highest, -kernel_size), 0)
    return first, last + 1


@triton.jit
def query_offsets(query, length, kernel_size, valid):
    """A tile of queries' offsets along one axis: each query's window, relative to it."""
    start = window_start(query, length, kernel_size) - query
    return offset_range(start, start + kernel_size - 1, valid, kernel_size)


@triton.jit
def key_offsets(key, length, kernel_size, valid):
    """A tile of keys' offsets along one axis: key minus query, over the queries whose windows
    hold each key, ``first`` to ``last``: those within ``k // 2`` of it, and where it is within
    ``k - 1`` of the map's start (end) also every query before (after) them, whose windows are
    shifted inwards."""
    radius = kernel_size // 2
    first = tl.where(key - kernel_size + 1 <= 0, 0, key - kernel_size + 1 + radius)
    last = tl.where(key >= length - kernel_size, length - 1, key + radius)
    return offset_range(key - last, key - first, valid, kernel_size)


@triton.jit
def pixels(stride_b, stride_y, stride_x, stride_h, b, h, y, x):
    """Where head h's channels of pixels ``(y, x)`` of image b start, in a tensor of these strides."""
    return b * stride_b + h * stride_h + y * stride_y + x * stride_x


@triton.jit
def dense_pixels(heads, height, width, d, b, h, y, x):
    """:func:`pixels` of a contiguous ``(B, H, W, heads, d)`` tensor."""
    return pixels(height * width * heads * d, width * heads * d, heads * d, d, b, h, y, x)


@triton.jit
def head_pixels(heads, height, width, b, h, y, x):
    """Where pixels ``(y, x)`` of image b and head h lie in a ``(B * heads, H * W)`` tensor (lse)."""
    return ((b * heads + h) * height + y) * width + x


@triton.jit
def load_channels(ptr, pixel, offs_d, mask):
    """The ``(TILE_H * TILE_W, BLOCK_D)`` channels of a tile's pixels (from :func:`pixels`)."""
    return tl.load(ptr + pixel[:, None] + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def table_entry(h, dy, dx, kernel_size):
    """The flat index, in the ``(heads, 2k - 1, 2k - 1)`` table, of head h's bias of offset
    ``(dy, dx)``."""
    table = 2 * kernel_size - 1
    return (h * table + dy + kernel_size - 1) * table + dx + kernel_size - 1


@triton.jit
def softmax_backward(q, k, v, grad_out, bias, lse, delta, pair):
    """A block of pairs' probabilities P, recomputed from each query's log-sum-exp, and the
    logits' gradient dS = P * (dO.v - D)."""
    probs = tl.where(pair, tl.exp(tl.sum(q * k, 1) + bias - lse), 0.0)
    return probs, probs * (tl.sum(grad_out * v, 1) - delta)


@triton.jit
def keys_at_offset(
    k_ptr, v_ptr,
    k_stride_b, k_stride_y, k_stride_x, k_stride_h,
    v_stride_b, v_stride_y, v_stride_x, v_stride_h,
    b, h, qy, qx, dy, dx, height, width, d, kernel_size, offs_d,
):  # fmt: skip
    """A tile of queries' pairs at offset ``(dy, dx)``: which count, the channels of k and v of
    their keys, and their entry in the table (:func:`table_entry`)."""
    ky, kx = qy + dy, qx + dx
    pair = pair_counts(qy, qx, ky, kx, height, width, kernel_size)
    key_block = pair[:, None] & (offs_d < d)[None, :]
    k = load_channels(k_ptr, pixels(k_stride_b, k_stride_y, k_stride_x, k_stride_h, b, h, ky, kx), offs_d, key_block)
    v = load_channels(v_ptr, pixels(v_stride_b, v_stride_y, v_stride_x, v_stride_h, b, h, ky, kx), offs_d, key_block)
    return pair, k, v, table_entry(h, dy, dx, kernel_size)


@triton.jit
def load_queries(
    q_ptr, grad_out_ptr, lse_ptr, delta_ptr,
    q_stride_b, q_stride_y, q_stride_x, q_stride_h,
    heads, height, width, d, b, h, y, x, scale, offs_d, valid,
):  # fmt: skip
    """What the backward kernels read of the queries at pixels ``(y, x)`` (where ``valid``):
    ``scale * q``, the output's gradient dO, the log-sum-exp and ``D = rowsum(dO * O)``."""
    block = valid[:, None] & (offs_d < d)[None, :]
    q = load_channels(q_ptr, pixels(q_stride_b, q_stride_y, q_stride_x, q_stride_h, b, h, y, x), offs_d, block)
    dense = dense_pixels(heads, height, width, d, b, h, y, x)
    grad_out = load_channels(grad_out_ptr, dense, offs_d, block)
    lse = tl.load(lse_ptr + head_pixels(heads, height, width, b, h, y, x), mask=valid, other=0.0)
    delta = tl.load(delta_ptr + dense // d, mask=valid, other=0.0)
    return q * scale, grad_out, lse, delta


@triton.jit
def forward(
    q_ptr, k_ptr, v_ptr, rpb_ptr, out_ptr, lse_ptr,
    q_stride_b, q_stride_y, q_stride_x, q_stride_h,
    k_stride_b, k_stride_y, k_stride_x, k_stride_h,
    v_stride_b, v_stride_y, v_stride_x, v_stride_h,
    heads, height, width, d, kernel_size, scale,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # A tile of queries: a running softmax over their windows, offset by offset.
    b, h, qy, qx, valid_q, offs_d, query_block = tile_of_program(heads, height, width, d, TILE_H, TILE_W, BLOCK_D)
    query = pixels(q_stride_b, q_stride_y, q_stride_x, q_stride_h, b, h, qy, qx)
    q = load_channels(q_ptr, query, offs_d, query_block) * scale
    running_max = tl.full([TILE_H * TILE_W], float('-inf'), tl.float32)
    running_sum = tl.zeros([TILE_H * TILE_W], tl.float32)
    acc = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    first_y, end_y = query_offsets(qy, height, kernel_size, valid_q)
    first_x, end_x = query_offsets(qx, width, kernel_size, valid_q)
    for dy in range(first_y, end_y):
        for dx in range(first_x, end_x):
            pair, k, v, entry = keys_at_offset(
                k_ptr, v_ptr, k_stride_b, k_stride_y, k_stride_x, k_stride_h,
                v_stride_b, v_stride_y, v_stride_x, v_stride_h,
                b, h, qy, qx, dy, dx, height, width, d, kernel_size, offs_d,
            )  # fmt: skip
            logits = tl.where(pair, tl.sum(q * k, 1) + tl.load(rpb_ptr + entry), float('-inf'))
            new_max = tl.maximum(running_max, logits)
            # Queries with no pair yet keep a maximum of -inf; shifting them by 0 keeps their sums 0.
            # A NaN logit makes its query's sum, and so its output, NaN, as on the other paths.
            shift = tl.where(new_max == float('-inf'), 0.0, new_max)
            rescale = tl.exp(running_max - shift)
            weights = tl.exp(logits - shift)
            running_sum = running_sum * rescale + weights
            acc = acc * rescale[:, None] + weights[:, None] * v
            running_max = new_max
    # Pixels of the tile outside the map have no pair (and are not stored).
    running_sum = tl.where(valid_q, running_sum, 1.0)
    dense_query = dense_pixels(heads, height, width, d, b, h, qy, qx)
    tl.store(out_ptr + dense_query[:, None] + offs_d[None, :], acc / running_sum[:, None], mask=query_block)
    tl.store(lse_ptr + head_pixels(heads, height, width, b, h, qy, qx), running_max + tl.log(running_sum), mask=valid_q)


@triton.jit
def backward_queries(
    q_ptr, k_ptr, v_ptr, rpb_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_q_ptr, grad_rpb_ptr,
    q_stride_b, q_stride_y, q_stride_x, q_stride_h,
    k_stride_b, k_stride_y, k_stride_x, k_stride_h,
    v_stride_b, v_stride_y, v_stride_x, v_stride_h,
    heads, height, width, d, kernel_size, scale,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # A tile of queries: dQ = scale * the sum of dS k over each window, and the table's gradient,
    # the sum of dS over the tile's pairs of each offset.
    b, h, qy, qx, valid_q, offs_d, query_block = tile_of_program(heads, height, width, d, TILE_H, TILE_W, BLOCK_D)
    q, grad_out, lse, delta = load_queries(
        q_ptr, grad_out_ptr, lse_ptr, delta_ptr, q_stride_b, q_stride_y, q_stride_x, q_stride_h,
        heads, height, width, d, b, h, qy, qx, scale, offs_d, valid_q,
    )  # fmt: skip
    grad_q = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    first_y, end_y = query_offsets(qy, height, kernel_size, valid_q)
    first_x, end_x = query_offsets(qx, width, kernel_size, valid_q)
    for dy in range(first_y, end_y):
        for dx in range(first_x, end_x):
            pair, k, v, entry = keys_at_offset(
                k_ptr, v_ptr, k_stride_b, k_stride_y, k_stride_x, k_stride_h,
                v_stride_b, v_stride_y, v_stride_x, v_stride_h,
                b, h, qy, qx, dy, dx, height, width, d, kernel_size, offs_d,
            )  # fmt: skip
            _, grad_logits = softmax_backward(q, k, v, grad_out, tl.load(rpb_ptr + entry), lse, delta, pair)
            grad_q += grad_logits[:, None] * k
            tl.atomic_add(grad_rpb_ptr + entry, tl.sum(grad_logits, 0))
    dense_query = dense_pixels(heads, height, width, d, b, h, qy, qx)
    tl.store(grad_q_ptr + dense_query[:, None] + offs_d[None, :], grad_q * scale, mask=query_block)


@triton.jit
def backward_keys(
    q_ptr, k_ptr, v_ptr, rpb_ptr, grad_out_ptr, lse_ptr, delta_ptr, grad_k_ptr, grad_v_ptr,
    q_stride_b, q_stride_y, q_stride_x, q_stride_h,
    k_stride_b, k_stride_y, k_stride_x, k_stride_h,
    v_stride_b, v_stride_y, v_stride_x, v_stride_h,
    heads, height, width, d, kernel_size, scale,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # A tile of keys against the queries whose windows hold them: dK = the sum of dS * scale q and
    # dV = the sum of P dO over those queries.
    b, h, ky, kx, valid_k, offs_d, key_block = tile_of_program(heads, height, width, d, TILE_H, TILE_W, BLOCK_D)
    k = load_channels(k_ptr, pixels(k_stride_b, k_stride_y, k_stride_x, k_stride_h, b, h, ky, kx), offs_d, key_block)
    v = load_channels(v_ptr, pixels(v_stride_b, v_stride_y, v_stride_x, v_stride_h, b, h, ky, kx), offs_d, key_block)
    grad_k = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    grad_v = tl.zeros([TILE_H * TILE_W, BLOCK_D], tl.float32)
    first_y, end_y = key_offsets(ky, height, kernel_size, valid_k)
    first_x, end_x = key_offsets(kx, width, kernel_size, valid_k)
    for dy in range(first_y, end_y):
        for dx in range(first_x, end_x):
            qy, qx = ky - dy, kx - dx
            pair = valid_k & pair_counts(qy, qx, ky, kx, height, width, kernel_size)
            q, grad_out, lse, delta = load_queries(
                q_ptr, grad_out_ptr, lse_ptr, delta_ptr, q_stride_b, q_stride_y, q_stride_x, q_stride_h,
                heads, height, width, d, b, h, qy, qx, scale, offs_d, pair,
            )  # fmt: skip
            bias = tl.load(rpb_ptr + table_entry(h, dy, dx, kernel_size))
            probs, grad_logits = softmax_backward(q, k, v, grad_out, bias, lse, delta, pair)
            grad_v += probs[:, None] * grad_out
            grad_k += grad_logits[:, None] * q
    dense_key = dense_pixels(heads, height, width, d, b, h, ky, kx)[:, None] + offs_d[None, :]
    tl.store(grad_k_ptr + dense_key, grad_k, mask=key_block)
    tl.store(grad_v_ptr + dense_key, grad_v, mask=key_block)
