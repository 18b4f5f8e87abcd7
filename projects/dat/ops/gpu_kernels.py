"""The optional GPU kernels of deformable and neighbourhood attention, in Triton.

On CUDA the PyTorch path of :mod:`~projects.dat.ops.deformable` makes about a dozen passes over
every chunk of logits (the bias's gathers, the products, the softmax's steps, and backwards the
scatter-adds of the table's gradient): most of a D block's time on a GPU goes to them and to
launching their kernels. These kernels compute the same arithmetic the way flash attention does:

- :func:`deformable_attention_forward`: each program takes a block of queries of one head and,
  for each block of keys, computes ``scale * q.k`` (a matrix product), adds the bias (the
  bilinear read of the padded table at the tap indices and weights of
  :meth:`~projects.dat.ops.deformable._DeformableChunks.bias_taps`, interpolated in y first, then
  in x, as the PyTorch path and the C++ kernel do) and updates a running softmax and its product
  with ``v``; only the output and each query's log-sum-exp go to memory.
- :func:`deformable_attention_backward`: one kernel per block of keys (the gradients of k, v and
  the keys' table coordinates summed over every query in registers, the table's gradient added
  to memory tap by tap) and one per block of queries (the gradient of q); both recompute the
  probabilities from the log-sum-exp.
- :func:`neighborhood_attention_forward` and :func:`neighborhood_attention_backward`: the ``N``
  blocks' attention (:mod:`~projects.dat.ops.neighborhood`, whose PyTorch path computes dense
  tile-by-region products, about 3.4x the pairs, with their logits in memory, and adds the
  gradients of k and v with ``index_add_``). One program per tile of 8 x 8 pixels of a head visits
  the tile's pairs one window offset at a time: forward, a running softmax of its queries;
  backward, one kernel per tile of queries (the gradient of q, and of the bias table: one addition
  per tile and offset) and one per tile of keys (the gradients of k and v, over the queries whose
  windows hold them). They read q, k and v in place (any strides, contiguous channels) and compute
  in float32, as the operator does for every input dtype but float64.

The deformable kernels' products of float32 inputs run in IEEE float32 (no TF32), so they agree
with the PyTorch path to float32 round-off (the table's gradient is summed in whatever order the
additions to memory arrive, as the PyTorch path's scatter-adds on CUDA are); under autocast (half
inputs) the logits of the product are rounded to the inputs' dtype, as the PyTorch path's half
product returns them.

The kernels are opt-in until they have run on a GPU: ``DAT_GPU_KERNELS=1`` turns them on
(``tools/gpu_check.sh`` does, to test and time them). Triton is imported when a kernel is first
needed, never on ``import projects.dat``; where it is missing, :func:`available` is False and the
operators run in PyTorch. With ``TRITON_INTERPRET=1`` (set before Triton is imported)
Triton runs the kernels on CPU tensors, which is how the tests check them on a machine without a
GPU.
"""

import functools
import os

import torch
from torch import Tensor

ENV_SWITCH = 'DAT_GPU_KERNELS'
MIN_TRITON_MAJOR = 3
INTERPRET_SWITCH = 'TRITON_INTERPRET'

# Each deformable kernel's (queries, keys) per block and warps per program, whatever the map (a few
# compiled variants, not one per size). With 32 channels per head (every DAT and DAT++ variant)
# none spills registers on sm_90, for float32 or half inputs (tests/test_gpu_kernels.py compiles
# them); not yet timed on a GPU.
KERNEL_BLOCKS = dict(forward=(64, 32), backward_keys=(16, 64), backward_queries=(64, 32))
NUM_WARPS = 8
# The smallest channel block: the smallest side that Triton's products take.
MIN_BLOCK = 16
# The neighbourhood kernels' tile (rows, columns of pixels) and warps per program: none spills
# registers on sm_90 with 32 channels per head (8 warps: the forward kernel does); not yet timed on
# a GPU.
NEIGHBORHOOD_TILE = (8, 8)
NEIGHBORHOOD_NUM_WARPS = 4


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors)."""
    return os.environ.get(INTERPRET_SWITCH, '0') not in ('', '0')


@functools.cache
def _triton():
    """``(triton, triton.language)``, or None where Triton 3 or newer does not import (the kernels
    use its products' ``input_precision``; torch 2.1's Triton 2.1 lacks it)."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or a build that cannot load here
        return None
    return (triton, tl) if int(triton.__version__.split('.')[0]) >= MIN_TRITON_MAJOR else None


def triton_imports() -> bool:
    """Whether Triton 3 or newer imports here."""
    return _triton() is not None


def available() -> bool:
    """Whether the GPU kernels can run: ``DAT_GPU_KERNELS=1`` and Triton 3 or newer imports."""
    return os.environ.get(ENV_SWITCH, '0') == '1' and triton_imports()


def check_inputs(op: str, device: torch.device, dtypes_ok: bool, expected: str, given: str) -> None:
    """Raises where an operator told to use its GPU kernels cannot: its inputs are not on CUDA (on
    CPU outside Triton's interpreter) or not of the dtypes the kernels take, or the kernels are off.

    Args:
        op (str): The operator, e.g. ``'dat::deformable_attention'``.
        device (torch.device): Where its inputs are.
        dtypes_ok (bool): Whether their dtypes are what the kernels take.
        expected (str): What the kernels take, for the message.
        given (str): What was given, for the message.
    """
    if not (device.type == 'cuda' or (device.type == 'cpu' and interpreting())) or not dtypes_ok:
        raise ValueError(f'{op} runs its GPU kernels on {expected}; got {given}')
    if not available():
        raise RuntimeError(
            f'{op} was told to use its GPU kernels, which are not turned on ({ENV_SWITCH}=1) or Triton 3 or '
            f'newer does not import; {op.split("::")[-1]}() picks PyTorch by itself'
        )


@functools.cache
def _kernels():
    """The Triton kernels ``(forward, backward_keys, backward_queries)``; the first call imports
    Triton (and so compiles nothing yet: Triton compiles a kernel at its first launch per shape)."""
    from . import deformable_triton

    return deformable_triton.forward, deformable_triton.backward_keys, deformable_triton.backward_queries


@functools.cache
def _neighborhood_kernels():
    """The Triton kernels ``(forward, backward_queries, backward_keys)`` of neighbourhood attention."""
    from . import neighborhood_triton

    return neighborhood_triton.forward, neighborhood_triton.backward_queries, neighborhood_triton.backward_keys


def _common_constants(q: Tensor, d: int) -> dict:
    """The kernels' compile-time constants and launch options that follow the inputs: the channel
    block, IEEE float32 products for float32 inputs, half logits rounded as a half product
    returns them, and the warps."""
    return dict(
        BLOCK_D=max(MIN_BLOCK, 1 << max(0, d - 1).bit_length()),
        IEEE=q.dtype == torch.float32,
        ROUND_LOGITS=q.dtype != torch.float32,
        num_warps=NUM_WARPS,
    )


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
    block_m, block_n = KERNEL_BLOCKS['forward']
    forward, _, _ = _kernels()
    forward[(-(-queries // block_m), bg * heads)](
        q, k, v, table, iy, fy, ix, fx, out, lse,
        *q.stride(), *out.stride(),
        heads, d, queries, width, rows, num_keys, table.shape[2], table.shape[3], scale,
        BLOCK_M=block_m, BLOCK_N=block_n, **_common_constants(q, d),
    )  # fmt: skip
    return out, lse


def deformable_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor, scale: float,
    table: Tensor, iy: Tensor, fy: Tensor, ix: Tensor, fx: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients of :func:`deformable_attention_forward`, in two Triton kernels: one per block
    of keys (the gradients of k, v, the keys' table coordinates and the table) and one per block
    of queries (the gradient of q). Both recompute the probabilities from the log-sum-exp.

    Args:
        grad_out (Tensor): The output's gradient, q's shape, any dense layout.
        q, k, v, scale, table, iy, fy, ix, fx: As for :func:`deformable_attention_forward`.
        lse (Tensor): ``(BG, hg, rows * W)`` float32 log-sum-exp of the forward pass, contiguous.
        delta (Tensor): ``(BG, hg, rows * W)`` float32 ``rowsum(grad_out * out)``, contiguous.

    Returns:
        tuple: ``grad_q`` (laid out as q, in q's dtype); ``grad_k`` and ``grad_v`` (float32); the
        gradient of the padded tables ``(BG, hg, Th + 4, Tw + 4)`` and of each key's ``(y, x)``
        pixel coordinate in the table ``(BG, Ns, 2)``, summed over heads (float32).
    """
    bg, heads, d, queries = q.shape
    rows, width, num_keys = iy.shape[1], ix.shape[1], k.shape[-1]
    grad_q = torch.empty_like(q)
    grad_k = torch.empty(k.shape, dtype=torch.float32, device=k.device)
    grad_v = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    grad_table = torch.zeros(table.shape, dtype=torch.float32, device=table.device)
    grad_coords = torch.empty(bg, heads, num_keys, 2, dtype=torch.float32, device=q.device)
    _, backward_keys, backward_queries = _kernels()
    sizes = (heads, d, queries, width, rows, num_keys, table.shape[2], table.shape[3], scale)
    block_m, block_n = KERNEL_BLOCKS['backward_keys']
    backward_keys[(-(-num_keys // block_n), bg * heads)](
        q, k, v, grad_out, lse, delta, table, iy, fy, ix, fx, grad_k, grad_v, grad_table, grad_coords,
        *q.stride(), *grad_out.stride(), *sizes,
        BLOCK_M=block_m, BLOCK_N=block_n, **_common_constants(q, d),
    )  # fmt: skip
    block_m, block_n = KERNEL_BLOCKS['backward_queries']
    backward_queries[(-(-queries // block_m), bg * heads)](
        q, k, v, grad_out, lse, delta, table, iy, fy, ix, fx, grad_q,
        *q.stride(), *grad_out.stride(), *grad_q.stride(), *sizes,
        BLOCK_M=block_m, BLOCK_N=block_n, **_common_constants(q, d),
    )  # fmt: skip
    return grad_q, grad_k, grad_v, grad_table, grad_coords.sum(1)


def _neighborhood_launch(q: Tensor, k: Tensor, v: Tensor, kernel_size: int, scale: float):
    """What every neighbourhood kernel takes after its pointers (the strides of q, k and v, the sizes,
    the scale and the compile-time constants), and its grid."""
    b, height, width, heads, d = q.shape
    tile_h, tile_w = NEIGHBORHOOD_TILE
    tiles = -(-height // tile_h) * -(-width // tile_w)
    args = (*q.stride()[:4], *k.stride()[:4], *v.stride()[:4], heads, height, width, d, kernel_size, scale)
    constants = dict(
        TILE_H=tile_h,
        TILE_W=tile_w,
        BLOCK_D=1 << max(0, d - 1).bit_length(),
        num_warps=NEIGHBORHOOD_NUM_WARPS,
    )
    return (tiles, b * heads), args, constants


def _channels_contiguous(t: Tensor) -> Tensor:
    """``t`` where its channels (last axis) are contiguous, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def neighborhood_attention_forward(
    q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, kernel_size: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Neighbourhood attention's output and each query's log-sum-exp, in one Triton kernel.

    The contract of the C++ forward kernel (``csrc/neighborhood_attention.cpp``): the logits of a
    query and a key of its window are ``(scale * q).k`` plus the table's entry at their offset.

    Args:
        q (Tensor): ``(B, H, W, heads, d)`` float32 queries, any strides (a copy where the channels
            are not contiguous).
        k (Tensor): ``(B, H, W, heads, d)`` keys, as q.
        v (Tensor): ``(B, H, W, heads, d)`` values, as q.
        rpb (Tensor): ``(heads, 2k - 1, 2k - 1)`` float32 bias table.
        kernel_size (int): Window size ``k`` (odd, at most H and W).
        scale (float): Factor of the queries.

    Returns:
        tuple: The output, contiguous ``(B, H, W, heads, d)``, and the log-sum-exp
        ``(B * heads, H * W)``.
    """
    q, k, v = (_channels_contiguous(t) for t in (q, k, v))
    b, height, width, heads, d = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(b * heads, height * width, dtype=q.dtype, device=q.device)
    grid, args, constants = _neighborhood_launch(q, k, v, kernel_size, scale)
    forward, _, _ = _neighborhood_kernels()
    forward[grid](q, k, v, rpb.contiguous(), out, lse, *args, **constants)
    return out, lse


def neighborhood_attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, rpb: Tensor, out: Tensor, lse: Tensor, kernel_size: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients of :func:`neighborhood_attention_forward`, in two Triton kernels: one per tile
    of queries (the gradients of q and of the table) and one per tile of keys (those of k and v).
    Both recompute the probabilities from the log-sum-exp.

    Args:
        grad_out (Tensor): The output's gradient, ``(B, H, W, heads, d)``.
        q, k, v, rpb, kernel_size, scale: As for :func:`neighborhood_attention_forward`.
        out (Tensor): The forward pass's output.
        lse (Tensor): ``(B * heads, H * W)`` log-sum-exp of the forward pass.

    Returns:
        tuple: The gradients of q, k and v, contiguous ``(B, H, W, heads, d)``, and of the table.
    """
    q, k, v = (_channels_contiguous(t) for t in (q, k, v))
    grad_out = grad_out.contiguous()
    delta = (grad_out * out).sum(-1).contiguous()  # D = rowsum(dO * O), (B, H, W, heads)
    grad_q, grad_k, grad_v = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    grad_rpb = torch.zeros(rpb.shape, dtype=rpb.dtype, device=rpb.device)
    grid, args, constants = _neighborhood_launch(q, k, v, kernel_size, scale)
    rpb, lse = rpb.contiguous(), lse.contiguous()
    _, backward_queries, backward_keys = _neighborhood_kernels()
    backward_queries[grid](q, k, v, rpb, grad_out, lse, delta, grad_q, grad_rpb, *args, **constants)
    backward_keys[grid](q, k, v, rpb, grad_out, lse, delta, grad_k, grad_v, *args, **constants)
    return grad_q, grad_k, grad_v, grad_rpb
