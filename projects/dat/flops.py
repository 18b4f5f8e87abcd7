"""Counting the FLOPs of DAT models as the DAT and DAT++ papers do.

The papers report multiply-accumulates counted by fvcore's jit tracer with its default op
handlers. Measured on our port, that convention reproduces every published number at 224
to the printed digits (DAT-T 4.59G ... DAT-B++ 16.56G): it counts

- convolutions, linear layers and every matrix product (``matmul``, ``bmm``, ``einsum``)
  as one MAC per multiply-add, biases not counted;
- LayerNorm as 5 per element, bilinear ``grid_sample`` as 4 per output element and
  adaptive average pooling as 1 per input element;
- nothing for softmax, GELU, element-wise arithmetic and indexing.

Leaving the norms and ``grid_sample`` out (``convention='matmul'``) lowers the totals by
0.35-0.72 % at 224 (measured for the seven variants).

mmengine's :class:`~mmengine.analysis.FlopAnalyzer` (a port of fvcore's) provides the tracer.
This module spells out the convention's op table (:func:`flop_handles`), adding handlers for
attention products fvcore does not know (``aten::baddbmm``,
``aten::scaled_dot_product_attention``, our fused ``dat::deformable_attention``,
``dat::neighborhood_attention``, ``dat::depthwise_conv_gelu`` and ``dat::sample_keys``, counted
like the reference ops they replace) and an exact ``aten::einsum`` handler that needs no numpy work
arrays. It also holds the closed-form MACs of the three attention cores of DAT, against which
the traced counts are tested. Ops that are not counted but look like products are reported
(:attr:`Complexity.suspicious_ops`) instead of being skipped silently.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import (
    Handle,
    addmm_flop_jit,
    batchnorm_flop_jit,
    bmm_flop_jit,
    conv_flop_jit,
    einsum_flop_jit,
    elementwise_flop_counter,
    get_shape,
    linear_flop_jit,
    matmul_flop_jit,
    norm_flop_counter,
)
from torch import Tensor, nn

from .models.attn_impl import set_attn_impl

__all__ = [
    'PAPER_COMPLEXITY',
    'CONVENTIONS',
    'Complexity',
    'analyze_complexity',
    'attention_impl',
    'einsum_macs',
    'sdpa_macs',
    'deformable_attention_macs',
    'window_attention_macs',
    'neighborhood_attention_macs',
    'flop_handles',
]

# Published (params in M, GMACs, input side) of the ImageNet classifiers (1000-class head),
# from the papers' ImageNet-1K results (DAT: arXiv 2201.00520; DAT++: arXiv 2309.01430).
PAPER_COMPLEXITY: dict[str, tuple[float, float, int]] = {
    'dat-t': (28.32, 4.59, 224),
    'dat-s': (49.70, 9.01, 224),
    'dat-b': (87.88, 15.79, 224),
    'dat-b-384': (88.18, 49.77, 384),
    'datpp-t': (23.96, 4.29, 224),
    'datpp-s': (53.13, 9.43, 224),
    'datpp-b': (93.69, 16.56, 224),
}

CONVENTIONS = ('paper', 'matmul')

# Unsupported ops whose name suggests they carry multiply-accumulates: seeing one means
# the count is too low, so it is reported rather than silently skipped.
_MAC_OP_HINTS = ('mm', 'matmul', 'conv', 'einsum', 'linear', 'attention', 'dot', 'mv')


# ---------------------------------------------------------------------------------------
# Closed-form MACs of the attention cores (the products q.k and attn.v only).
# ---------------------------------------------------------------------------------------
def deformable_attention_macs(
    height: int, width: int, key_height: int, key_width: int, dim: int, batch: int = 1
) -> int:
    """MACs of ``q.k`` and ``attn.v`` in a deformable block: ``2 * B * HW * Ns * C``.

    Args:
        height (int): Feature map height ``H`` (number of query rows).
        width (int): Feature map width ``W``.
        key_height (int): Key grid height ``Hk``.
        key_width (int): Key grid width ``Wk``.
        dim (int): Channels ``C`` (heads times head dim).
        batch (int): Batch size. Defaults to 1.

    Returns:
        int: Multiply-accumulates.
    """
    return 2 * batch * height * width * key_height * key_width * dim


def window_attention_macs(height: int, width: int, window_size: int, dim: int, batch: int = 1) -> int:
    """MACs of ``q.k`` and ``attn.v`` in a Swin window block.

    The map is padded to a multiple of the window, so every padded position is a query
    that attends to ``window_size ** 2`` keys.

    Args:
        height (int): Feature map height.
        width (int): Feature map width.
        window_size (int): Window side.
        dim (int): Channels.
        batch (int): Batch size. Defaults to 1.

    Returns:
        int: Multiply-accumulates.
    """
    padded_h = math.ceil(height / window_size) * window_size
    padded_w = math.ceil(width / window_size) * window_size
    return 2 * batch * padded_h * padded_w * window_size**2 * dim


def neighborhood_attention_macs(height: int, width: int, kernel_size: int, dim: int, batch: int = 1) -> int:
    """MACs of ``q.k`` and ``attn.v`` in a neighbourhood block: ``2 * B * HW * k * k * C``.

    Args:
        height (int): Feature map height ``H``; a map smaller than the kernel is padded up to it.
        width (int): Feature map width ``W``, padded likewise.
        kernel_size (int): Neighbourhood size ``k``: every query attends to ``k * k`` keys.
        dim (int): Channels ``C`` (heads times head dim).
        batch (int): Batch size. Defaults to 1.

    Returns:
        int: Multiply-accumulates.
    """
    return 2 * batch * max(height, kernel_size) * max(width, kernel_size) * kernel_size**2 * dim


# ---------------------------------------------------------------------------------------
# Jit handles.
# ---------------------------------------------------------------------------------------
def einsum_macs(equation: str, shapes: Sequence[Sequence[int]]) -> int:
    """MACs of a two-operand einsum without ellipsis: the product of all index sizes.

    Args:
        equation (str): e.g. ``'bcm,bcn->bmn'``.
        shapes (Sequence[Sequence[int]]): The two operand shapes.

    Returns:
        int: Multiply-accumulates.

    Raises:
        ValueError: If the equation has not two operands, holds an ellipsis, or does not
            match the shapes.
    """
    equation = equation.replace(' ', '')
    inputs = equation.split('->')[0].split(',')
    if len(inputs) != 2 or len(shapes) != 2 or '.' in equation:
        raise ValueError(
            f'einsum_macs expects a two-operand equation without ellipsis and two '
            f'shapes, got {equation!r} with {len(shapes)} shapes'
        )
    sizes: dict[str, int] = {}
    for letters, shape in zip(inputs, shapes, strict=True):
        if len(letters) != len(shape):
            raise ValueError(f'einsum operand {letters!r} does not match shape {list(shape)}')
        for letter, size in zip(letters, shape, strict=True):
            # Broadcast dimensions of size 1 take the other operand's size.
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    return math.prod(sizes.values())


def _einsum_flop_jit(inputs: list[Any], outputs: list[Any]) -> int | Any:
    equation = inputs[0].toIValue()
    shapes = [get_shape(v) for v in inputs[1].node().inputs()]
    if len(shapes) == 2 and '.' not in equation and all(s is not None for s in shapes):
        return einsum_macs(equation, shapes)
    return einsum_flop_jit(inputs, outputs)  # mmengine's general (numpy path) counter


def sdpa_macs(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """MACs of scaled dot-product attention: ``q.k`` plus ``attn.v``.

    Args:
        q_shape (Sequence[int]): ``(..., L, E)`` queries.
        k_shape (Sequence[int]): ``(..., S, E)`` keys.
        v_shape (Sequence[int]): ``(..., S, Ev)`` values.

    Returns:
        int: ``prod(...) * L * S * (E + Ev)``, the batch dims taken from the queries
        (which also covers grouped-query attention).
    """
    *batch, length, embed = q_shape
    num_keys, value_dim = k_shape[-2], v_shape[-1]
    return math.prod(batch) * length * num_keys * (embed + value_dim)


def _sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int | Any:
    return sdpa_macs(*(get_shape(v) for v in inputs[:3]))


def _baddbmm_flop_jit(inputs: list[Any], outputs: list[Any]) -> int | Any:
    # aten::baddbmm(self, batch1, batch2, beta, alpha): the bias add is not counted.
    b, n, m = get_shape(inputs[1])
    return b * n * m * get_shape(inputs[2])[-1]


def _fused_deformable_counter(count_bias: bool) -> Handle:
    """Handle of the fast path's fused op ``dat::deformable_attention``.

    Its inputs are ``q (BG, hg, d, M)``, ``k`` and ``v (BG, hg, d, Ns)``, ... It is counted
    under the names of the reference ops it fuses, so both paths give the same break-down:
    ``einsum`` for ``q.k`` and ``attn.v`` and, with ``count_bias``, ``grid_sampler`` (4 per
    logit) for the bilinear read of the bias table.
    """

    def handle(inputs: list[Any], outputs: list[Any]) -> Counter:
        bg, hg, d, m = get_shape(inputs[0])
        num_keys = get_shape(inputs[1])[-1]
        counts = Counter({'einsum': 2 * bg * hg * d * m * num_keys})
        if count_bias:
            counts['grid_sampler'] = 4 * bg * hg * m * num_keys
        return counts

    return handle


def _fused_neighborhood_flop_jit(inputs: list[Any], outputs: list[Any]) -> Counter:
    """Handle of the fast path's op ``dat::neighborhood_attention``.

    Its inputs are ``q``, ``k``, ``v`` laid out ``(B, H, W, heads, d)``, ``rpb``,
    ``kernel_size``, the queries' scale, the chunk size and the backend; counted as the
    reference's two einsums (``q.k`` and ``attn.v`` over ``k * k`` keys), not the products the
    tiles or kernels really compute.
    """
    kernel_size = inputs[4].toIValue()
    return Counter({'einsum': 2 * math.prod(get_shape(inputs[0])) * kernel_size**2})


def _fused_depthwise_conv_gelu_flop_jit(inputs: list[Any], outputs: list[Any]) -> Counter:
    """Handle of the fused ConvFFN hidden layer ``dat::depthwise_conv_gelu``.

    Its inputs are ``y (B, C, H, W)`` and the depth-wise weight ``(C, 1, k, k)``; counted as the
    reference's depth-wise ``conv`` (``k * k`` per output element; the GELU is not counted).
    """
    batch, channels, h, w = get_shape(inputs[0])
    kh, kw = get_shape(inputs[1])[-2:]
    return Counter({'conv': batch * channels * h * w * kh * kw})


def _sample_keys_flop_jit(inputs: list[Any], outputs: list[Any]) -> Counter:
    """Handle of the key sampling op ``dat::sample_keys``: counted as the reference's
    ``grid_sampler`` (4 per output element, one per bilinear tap)."""
    return Counter({'grid_sampler': 4 * math.prod(get_shape(outputs[0]))})


def flop_handles(convention: str = 'paper') -> dict[str, Handle]:
    """The complete table of op handlers of a convention.

    Args:
        convention (str): ``'paper'``: fvcore's default table (what the papers used), with
            exact handlers for ``einsum`` and handlers for ``baddbmm`` and
            ``scaled_dot_product_attention`` added; ``'matmul'``: only convolutions and
            matrix products.

    Returns:
        dict: ``{op_name: handle}``; ops not in the table are not counted.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f'convention must be one of {CONVENTIONS}, got {convention!r}')
    handles: dict[str, Handle] = {
        'aten::_convolution': conv_flop_jit,
        'aten::linear': linear_flop_jit,
        'aten::addmm': addmm_flop_jit,
        'aten::mm': matmul_flop_jit,
        'aten::matmul': matmul_flop_jit,
        'aten::bmm': bmm_flop_jit,
        'aten::baddbmm': _baddbmm_flop_jit,
        'aten::einsum': _einsum_flop_jit,
        'aten::scaled_dot_product_attention': _sdpa_flop_jit,
        'dat::deformable_attention': _fused_deformable_counter(count_bias=convention == 'paper'),
        'dat::neighborhood_attention': _fused_neighborhood_flop_jit,
        'dat::depthwise_conv_gelu': _fused_depthwise_conv_gelu_flop_jit,
    }
    if convention == 'paper':
        handles.update(
            {
                'aten::batch_norm': batchnorm_flop_jit,
                'aten::group_norm': norm_flop_counter(2),
                'aten::layer_norm': norm_flop_counter(2),
                'aten::instance_norm': norm_flop_counter(1),
                'aten::upsample_nearest2d': elementwise_flop_counter(0, 1),
                'aten::upsample_bilinear2d': elementwise_flop_counter(0, 4),
                'aten::adaptive_avg_pool2d': elementwise_flop_counter(1, 0),
                'aten::grid_sampler': elementwise_flop_counter(0, 4),  # bilinear: 4 taps
                'dat::sample_keys': _sample_keys_flop_jit,
            }
        )
    return handles


# ---------------------------------------------------------------------------------------
# Analysis.
# ---------------------------------------------------------------------------------------
@dataclass
class Complexity:
    """Result of :func:`analyze_complexity`.

    Attributes:
        flops (int): Multiply-accumulates of one forward pass.
        params (int): Parameters of the model.
        by_operator (Counter): MACs per op type (``'conv'``, ``'linear'``, ``'einsum'``, ...).
        by_module (Counter): MACs per module name (``''`` is the whole model).
        by_module_and_operator (dict): ``{module name: Counter of op type}``.
        suspicious_ops (Counter): Uncounted ops whose names suggest multiply-accumulates
            (the total is too low if this is not empty).
        analyzer (FlopAnalyzer): The analyzer, e.g. for mmengine's tables.
    """

    flops: int
    params: int
    by_operator: Counter
    by_module: Counter
    by_module_and_operator: dict[str, Counter]
    suspicious_ops: Counter = field(default_factory=Counter)
    analyzer: FlopAnalyzer | None = None


@contextmanager
def attention_impl(model: nn.Module, impl: str | None) -> Iterator[int]:
    """Temporarily switch the DAT modules of ``model`` to ``impl`` (:func:`set_attn_impl`).

    FLOPs are a property of the math: counting the reference path gives the papers'
    convention whatever fast kernel a model is configured with.

    Args:
        model (nn.Module): The model.
        impl (str, optional): Implementation to count with; None changes nothing.

    Yields:
        int: The number of modules switched.
    """
    previous = set_attn_impl(model, impl) if impl else {}
    try:
        yield len(previous)
    finally:
        if previous:
            set_attn_impl(model, previous)


def analyze_complexity(model: nn.Module, inputs: Tensor | tuple[Any, ...], convention: str = 'paper') -> Complexity:
    """Trace one forward pass of ``model`` and count its MACs and parameters.

    Args:
        model (nn.Module): The model; called as ``model(*inputs)``. Put it in eval mode.
        inputs (Tensor | tuple): Its inputs.
        convention (str): See :func:`flop_handles`. Defaults to ``'paper'``.

    Returns:
        Complexity: Totals and break-downs.

    Raises:
        RuntimeError: If the model cannot be traced by ``torch.jit.trace`` (e.g. a
            FlexAttention kernel); count the reference attention path instead.
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    handles = flop_handles(convention)
    analyzer = FlopAnalyzer(model, inputs)
    analyzer.clear_op_handles()
    analyzer.set_op_handle(**handles)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # jit tracer and deprecation warnings
            flops = analyzer.total()
    except Exception as exc:  # the tracer raises many types
        raise RuntimeError(
            f'torch.jit.trace could not trace {type(model).__name__}: {exc}. Count the '
            "reference attention path (attn_impl='reference') instead."
        ) from exc
    unsupported = analyzer.unsupported_ops()
    suspicious = Counter(
        {op: n for op, n in unsupported.items() if any(h in op.split('::')[-1] for h in _MAC_OP_HINTS)}
    )
    return Complexity(
        flops=int(flops),
        params=sum(p.numel() for p in model.parameters()),
        by_operator=analyzer.by_operator(),
        by_module=analyzer.by_module(),
        by_module_and_operator=analyzer.by_module_and_operator(),
        suspicious_ops=suspicious,
        analyzer=analyzer,
    )
