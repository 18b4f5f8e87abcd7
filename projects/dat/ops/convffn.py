"""DAT++'s ConvFFN hidden layer ``GELU(y + DWConv(y))``: the public entries and the fused operators.

:func:`depthwise_conv_gelu` runs the PyTorch composition (:func:`~projects.dat.ops.reference.
depthwise_conv_gelu_reference`) or the custom operator ``torch.ops.dat.depthwise_conv_gelu``, as
:func:`~projects.dat.ops.dispatch.select_backend` decides. The operator keeps only ``y`` for the
backward pass, which recomputes the GELU's input; it computes with one of two methods, by the
build of the C++ kernels (:func:`runs_fused_kernel`):

- where the kernels are built in vector registers (AVX2 or AVX-512,
  :func:`~projects.dat.ops.cpu_kernels.simd_flags`): the kernel of ``csrc/depthwise_conv_gelu.cpp``,
  one pass over memory forward and one backward;
- in the compiler's baseline build (a CPU without AVX2): oneDNN's depth-wise conv and PyTorch's
  GELU in place on its output (backward: the conv again, GELU's gradient in place, the conv's
  backward), which reads and writes the map more often and, backward, allocates one map more
  than the kernel, but was the faster at every map measured where both ran without AVX2.

Measured on two 2-core CPUs with AVX-512, an Intel Xeon and an AMD EPYC (Zen 4)
(``docs/benchmarks.md``, "ConvFFN's hidden layer: the method by build"): at every hidden map of
DAT-T++ at 224@32, 512x832 and 1344x800, oneDNN's method took 1.2-2.05x the kernel's time
forward+backward on the Xeon (1.17-2.18x with torch and oneDNN limited to AVX2, against the AVX2
build), and DAT-T++'s training step took 2-5 % less with the kernel at 512x832 and 1344x800; with
both limited to their baseline, oneDNN's method took 0.53-0.92x the kernel's time. The layer has
no separate PyTorch fast path: the ``pytorch`` backend is the composition.

:func:`depthwise_conv_gelu_linear` runs the hidden layer and the 1x1 conv after it (ConvFFN's fc2)
as the operator ``torch.ops.dat.depthwise_conv_gelu_linear``, which keeps only ``y`` too: its
backward pass takes the hidden layer's gradient as the operator above does and, on the way, its
output for the 1x1 conv's weight gradient, instead of a forward pass of the hidden layer to
recompute it first (what activation checkpointing of the two would do).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from . import cpu_kernels, torch_compat
from .cpu_kernels import nhwc
from .dispatch import conv_compute_dtype, select_backend
from .reference import depthwise_conv_gelu_reference, identity_folded, pointwise_conv_2d


def runs_fused_kernel() -> bool:
    """Whether the operators compute with the C++ kernel (built in AVX2 or AVX-512 vectors), else
    with oneDNN's conv and PyTorch's GELU (the baseline build; see the module docstring)."""
    return cpu_kernels.simd_flags()[0] != 'baseline'


def _check_same_depthwise_conv(conv: nn.Conv2d, y: Tensor):
    """The kernel computes a depth-wise, odd square kernel, stride-1, zero-padded 'same' conv."""
    channels, kernel = y.shape[1], conv.weight.shape[-1]
    if conv.weight.shape != (channels, 1, kernel, kernel) or kernel % 2 == 0:
        raise ValueError(
            f'expected a depth-wise conv weight ({channels}, 1, k, k) with an odd k for a '
            f'{channels}-channel map, got {tuple(conv.weight.shape)}'
        )
    same = dict(stride=(1, 1), dilation=(1, 1), padding=(kernel // 2, kernel // 2), padding_mode='zeros')
    given = {name: getattr(conv, name) for name in same}
    if given != same:
        raise ValueError(f"expected a 'same' conv ({same}), got {given}")


def _check_pointwise_conv(fc: nn.Conv2d):
    """The operator with the layer after the hidden one computes that layer as a 1x1 conv (a matrix
    product over the channels)."""
    pointwise = dict(kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
    given = {name: getattr(fc, name, None) for name in pointwise}
    if given != pointwise:
        raise ValueError(f'expected a 1x1 conv after the hidden layer ({pointwise}), got {given}')


def _bias_or_zeros(conv: nn.Conv2d) -> Tensor:
    """The conv's bias, or zeros for a conv without one (the operators take a bias)."""
    return conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.weight.shape[0])


def _check_operator_inputs(y: Tensor, weight: Tensor, bias: Tensor) -> None:
    """The checks that the fused operators rely on (they may be called directly, as
    ``torch.ops.dat.*``)."""
    channels = y.shape[1] if y.dim() == 4 else -1
    kernel = weight.shape[-1] if weight.dim() == 4 else 0
    if (
        y.device.type != 'cpu'
        or y.dtype != torch.float32
        or weight.shape != (channels, 1, kernel, kernel)
        or kernel % 2 == 0
        or bias.shape != (channels,)
    ):
        raise ValueError(
            'dat::depthwise_conv_gelu expects a float32 CPU map y (B, C, H, W), a depth-wise weight '
            f'(C, 1, k, k) with an odd k and a bias (C,); got y {tuple(y.shape)} {y.dtype} on {y.device}, '
            f'weight {tuple(weight.shape)}, bias {tuple(bias.shape)}'
        )


def _fused_kernels():
    """The C++ kernels, or an error that says why there are none."""
    return cpu_kernels.required_kernels(
        'dat::depthwise_conv_gelu in AVX2 or AVX-512 vectors',
        'depthwise_conv_gelu() falls back to PyTorch by itself',
    )


def _kernel_taps(folded: Tensor) -> Tensor:
    """The kernel's ``(k * k, C)`` taps: the identity-folded ``(C, 1, k, k)`` weight, tap-major."""
    return folded.flatten(1).t().contiguous()


def _gelu_input(y: Tensor, folded: Tensor, bias: Tensor) -> Tensor:
    """``y + conv(y)`` with the conv's bias, by oneDNN (channels-last in, channels-last out)."""
    return F.conv2d(y, folded, bias, padding=folded.shape[-1] // 2, groups=folded.shape[0])


def _hidden_forward(y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``GELU(y + conv(y))`` by the method of the build (the operators' forward pass)."""
    folded = identity_folded(weight)
    if not runs_fused_kernel():
        z = _gelu_input(y, folded, bias)
        torch.ops.aten.gelu_(nhwc(z))  # in place: one map at a time, as in the kernel
        return z
    return _fused_kernels().depthwise_conv_gelu_forward(nhwc(y), _kernel_taps(folded), bias).permute(0, 3, 1, 2)


def _hidden_backward(
    grad_out: Tensor, y: Tensor, weight: Tensor, bias: Tensor, use_output: Callable[[Tensor], None] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``y``, ``weight`` and ``bias`` from the output's, by the method of the
    build (the operators' backward pass), recomputing the GELU's input.

    Args:
        grad_out, y, weight, bias: As the backward operator's.
        use_output (Callable, optional): Called with the recomputed output ``GELU(y + conv(y))``
            (channels-last) before the map it lies in is reused: the gradient of a layer that
            reads the output, without a forward pass to recompute it.
    """
    folded = identity_folded(weight)
    if not runs_fused_kernel():
        # The gradient in the input's layout (torch 2.1's GELU backward mishandles others), and
        # grad_z written over z: one map more than the kernel needs, not two.
        z = nhwc(_gelu_input(y, folded, bias))
        if use_output is not None:
            use_output(F.gelu(z).permute(0, 3, 1, 2))
        torch.ops.aten.gelu_backward.grad_input(nhwc(grad_out).contiguous(), z, grad_input=z)
        padding = [folded.shape[-1] // 2] * 2
        return torch.ops.aten.convolution_backward(
            z.permute(0, 3, 1, 2),
            y,
            folded,
            [bias.shape[0]],
            [1, 1],
            padding,
            [1, 1],
            False,
            [0, 0],
            folded.shape[0],
            [True, True, True],
        )
    grads = _fused_kernels().depthwise_conv_gelu_backward(
        nhwc(grad_out).contiguous(), nhwc(y), _kernel_taps(folded), bias, use_output is not None
    )
    if use_output is not None:
        use_output(grads[3].permute(0, 3, 1, 2))
    grad_y, grad_taps, grad_bias = grads[:3]
    return grad_y.permute(0, 3, 1, 2), grad_taps.t().reshape(weight.shape).contiguous(), grad_bias


@torch_compat.custom_op('dat::depthwise_conv_gelu', mutates_args=())
def _depthwise_conv_gelu_op(y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    _check_operator_inputs(y, weight, bias)
    return _hidden_forward(y, weight, bias)


@_depthwise_conv_gelu_op.register_fake
def _(y, weight, bias):
    return torch.empty_like(y)


@torch_compat.custom_op('dat::depthwise_conv_gelu_backward', mutates_args=())
def _depthwise_conv_gelu_backward_op(
    grad_out: Tensor, y: Tensor, weight: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    _check_operator_inputs(y, weight, bias)
    return _hidden_backward(grad_out, y, weight, bias)


@_depthwise_conv_gelu_backward_op.register_fake
def _(grad_out, y, weight, bias):
    return torch.empty_like(y), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    return _depthwise_conv_gelu_backward_op(grad_out, *ctx.saved_tensors)


_depthwise_conv_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def _check_linear_inputs(y: Tensor, fc_weight: Tensor, fc_bias: Tensor | None = None) -> None:
    """The 1x1 conv that reads the hidden layer: weight ``(C_out, C, 1, 1)`` and bias ``(C_out,)``
    (the backward operator has no bias)."""
    out_channels = fc_weight.shape[0] if fc_weight.dim() == 4 else -1
    bias_shape = (out_channels,) if fc_bias is None else fc_bias.shape
    if fc_weight.shape != (out_channels, y.shape[1], 1, 1) or bias_shape != (out_channels,):
        raise ValueError(
            'dat::depthwise_conv_gelu_linear expects a 1x1 conv weight (C_out, C, 1, 1) and bias (C_out,) for '
            f'a {y.shape[1]}-channel map; got weight {tuple(fc_weight.shape)}, bias {tuple(bias_shape)}'
        )


@torch_compat.custom_op('dat::depthwise_conv_gelu_linear', mutates_args=())
def _depthwise_conv_gelu_linear_op(
    y: Tensor, weight: Tensor, bias: Tensor, fc_weight: Tensor, fc_bias: Tensor
) -> Tensor:
    _check_operator_inputs(y, weight, bias)
    _check_linear_inputs(y, fc_weight, fc_bias)
    return pointwise_conv_2d(_hidden_forward(y, weight, bias), fc_weight, fc_bias)


@_depthwise_conv_gelu_linear_op.register_fake
def _(y, weight, bias, fc_weight, fc_bias):
    batch, _, height, width = y.shape
    return y.new_empty(batch, height, width, fc_weight.shape[0]).permute(0, 3, 1, 2)


@torch_compat.custom_op('dat::depthwise_conv_gelu_linear_backward', mutates_args=())
def _depthwise_conv_gelu_linear_backward_op(
    grad_out: Tensor, y: Tensor, weight: Tensor, bias: Tensor, fc_weight: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_operator_inputs(y, weight, bias)
    _check_linear_inputs(y, fc_weight)
    batch, channels, height, width = y.shape
    grad_rows = nhwc(grad_out).reshape(-1, fc_weight.shape[0])  # (B H W, C_out)
    grad_hidden = grad_rows.mm(fc_weight.flatten(1)).view(batch, height, width, channels).permute(0, 3, 1, 2)
    fc_grads = []

    def fc_weight_and_bias_gradients(hidden: Tensor):
        # As F.linear's backward computes them: the weight's as (input^T grad)^T.
        fc_grads.append(nhwc(hidden).reshape(-1, channels).t().mm(grad_rows).t().reshape(fc_weight.shape).contiguous())
        fc_grads.append(grad_rows.sum(0))

    grad_y, grad_weight, grad_bias = _hidden_backward(grad_hidden, y, weight, bias, fc_weight_and_bias_gradients)
    return grad_y, grad_weight, grad_bias, *fc_grads


@_depthwise_conv_gelu_linear_backward_op.register_fake
def _(grad_out, y, weight, bias, fc_weight):
    return (
        torch.empty_like(y),
        torch.empty_like(weight),
        torch.empty_like(bias),
        torch.empty_like(fc_weight),
        fc_weight.new_empty(fc_weight.shape[0]),
    )


def _setup_linear_context(ctx, inputs, output):
    y, weight, bias, fc_weight, _ = inputs
    ctx.save_for_backward(y, weight, bias, fc_weight)


def _linear_backward(ctx, grad_out):
    return _depthwise_conv_gelu_linear_backward_op(grad_out, *ctx.saved_tensors)


_depthwise_conv_gelu_linear_op.register_autograd(_linear_backward, setup_context=_setup_linear_context)


def depthwise_conv_gelu(y: Tensor, conv: nn.Conv2d, impl: str = 'auto') -> Tensor:
    """``GELU(y + conv(y))``, ConvFFN's hidden layer; the same function as
    :func:`~projects.dat.ops.reference.depthwise_conv_gelu_reference`.

    Runs the operator ``dat::depthwise_conv_gelu`` (the C++ kernel or oneDNN's conv and
    PyTorch's GELU by the kernels' build, see the module docstring; only ``y`` is kept for the
    backward pass) where :func:`~projects.dat.ops.dispatch.select_backend` picks the
    ``cpu-kernel`` backend for ``impl`` (float32 maps on CPU, not under autocast, whose conv
    computes in a half type; the map is made channels-last first if it is not), else the
    composition.

    Args:
        y (Tensor): ``(B, C, H, W)`` map.
        conv (nn.Conv2d): Depth-wise conv with ``C`` groups, an odd square kernel, stride 1 and
            padding ``kernel // 2``.
        impl (str): One of :data:`~projects.dat.ops.dispatch.ATTN_IMPLS`. Defaults to ``'auto'``.

    Returns:
        Tensor: ``(B, C, H, W)``, channels-last where the operator ran.
    """
    if select_backend(impl, y.device, conv_compute_dtype(y)) != 'cpu-kernel':
        return depthwise_conv_gelu_reference(y, conv)
    _check_same_depthwise_conv(conv, y)
    return _depthwise_conv_gelu_op(y.contiguous(memory_format=torch.channels_last), conv.weight, _bias_or_zeros(conv))


def depthwise_conv_gelu_linear(y: Tensor, conv: nn.Conv2d, fc: nn.Conv2d, impl: str = 'auto') -> Tensor:
    """``fc(GELU(y + conv(y)))``, ConvFFN after its first layer, keeping only ``y`` for the backward
    pass (ConvFFN's ``recompute_hidden``).

    Where :func:`~projects.dat.ops.dispatch.select_backend` picks the ``cpu-kernel`` backend for
    ``impl`` (as for :func:`depthwise_conv_gelu`), the operator ``dat::depthwise_conv_gelu_linear``:
    its backward pass recomputes the hidden layer once, in the pass that takes its gradient (the
    C++ kernel writes it out on the way; oneDNN's method takes it from the conv it runs anyway), and
    ``fc``'s gradients from it. Elsewhere the composition under activation checkpointing
    (``torch.utils.checkpoint``, non-reentrant), whose backward pass recomputes the hidden layer
    for ``fc`` first and the hidden layer's own backward its input again. The same numbers.

    Args:
        y (Tensor): ``(B, C, H, W)`` map (fc1's output).
        conv (nn.Conv2d): The depth-wise conv, as for :func:`depthwise_conv_gelu`.
        fc (nn.Conv2d): The 1x1 conv that follows (ConvFFN's fc2, a ``PointwiseConv2d``).
        impl (str): One of :data:`~projects.dat.ops.dispatch.ATTN_IMPLS`. Defaults to ``'auto'``.

    Returns:
        Tensor: ``(B, C_out, H, W)``, channels-last where the operator ran.
    """
    if select_backend(impl, y.device, conv_compute_dtype(y)) != 'cpu-kernel':
        return cp.checkpoint(lambda t: fc(depthwise_conv_gelu(t, conv, impl)), y, use_reentrant=False)
    _check_same_depthwise_conv(conv, y)
    _check_pointwise_conv(fc)
    y = y.contiguous(memory_format=torch.channels_last)
    return _depthwise_conv_gelu_linear_op(y, conv.weight, _bias_or_zeros(conv), fc.weight, _bias_or_zeros(fc))
