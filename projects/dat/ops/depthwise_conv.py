"""The offset network's depth-wise conv with a stride: the public entry and its operator.

:func:`strided_depthwise_conv` runs ``F.conv2d`` (the reference) or the custom operator
``torch.ops.dat.strided_depthwise_conv``, the same conv with a faster backward pass on CPU: where
the stride is above 1, a gradient is needed, and :func:`~projects.dat.ops.dispatch.select_backend`
picks any backend but the reference on CPU in float32.

For a strided depth-wise conv, oneDNN's weight gradient takes 10-25x its forward pass, and it
computes the bias gradient with it (asked for the bias gradient alone, it takes as long). The
operator's backward asks oneDNN for the input gradient only, sums the output's gradient for the
bias, and computes the weight gradient as a conv: of the input with the output's gradient as the
kernel, dilated by the stride (:func:`strided_depthwise_weight_gradient`), 3-9x as fast as
oneDNN's. With stride 1 oneDNN's own backward is the faster one (``docs/benchmarks.md``,
"Residuals with stochastic depth, and the offset network's conv backward").
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import torch_compat
from .dispatch import conv_compute_dtype, select_backend


def strided_depthwise_weight_gradient(
    x: Tensor, grad_out: Tensor, kernel_size: int, stride: int, padding: int
) -> Tensor:
    """The weight gradient of the depth-wise conv ``F.conv2d(x, w, stride=stride, padding=padding,
    groups=C)`` with a ``kernel_size`` square kernel, computed as convs.

    ``grad_w[c, i, j] = sum over samples, y, x of grad_out[c, y, x] * x_padded[c, stride * y + i,
    stride * x + j]``: for each sample, the depth-wise conv of the input (padded alike) with the
    output's gradient as the kernel, dilated by ``stride``, whose first ``kernel_size`` rows and
    columns are the gradient (the others belong to taps past the kernel).

    Args:
        x (Tensor): ``(B, C, H, W)`` input of the conv.
        grad_out (Tensor): ``(B, C, Ho, Wo)`` gradient of its output.
        kernel_size (int): The conv's kernel side.
        stride (int): Its stride.
        padding (int): Its zero padding on every side.

    Returns:
        Tensor: ``(C, 1, kernel_size, kernel_size)``.
    """
    channels = x.shape[1]
    grad_weight = None
    for sample, grad in zip(x.split(1), grad_out, strict=True):  # a batch would mix the samples' channels
        taps = F.conv2d(sample, grad.unsqueeze(1), None, 1, padding, stride, channels)[0, :, :kernel_size, :kernel_size]
        grad_weight = taps if grad_weight is None else grad_weight + taps
    return grad_weight.unsqueeze(1)


def _check_operator_inputs(x: Tensor, weight: Tensor, bias: Tensor) -> None:
    channels = x.shape[1] if x.dim() == 4 else -1
    kernel = weight.shape[-1] if weight.dim() == 4 else 0
    if weight.shape != (channels, 1, kernel, kernel) or bias.shape != (channels,):
        raise ValueError(
            'dat::strided_depthwise_conv expects a map x (B, C, H, W), a depth-wise weight (C, 1, k, k) '
            f'and a bias (C,); got x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}'
        )


@torch_compat.custom_op('dat::strided_depthwise_conv', mutates_args=())
def _strided_depthwise_conv_op(x: Tensor, weight: Tensor, bias: Tensor, stride: int, padding: int) -> Tensor:
    _check_operator_inputs(x, weight, bias)
    return F.conv2d(x, weight, bias, stride, padding, groups=x.shape[1])


@_strided_depthwise_conv_op.register_fake
def _(x, weight, bias, stride, padding):
    return F.conv2d(x, weight, bias, stride, padding, groups=x.shape[1])


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.stride, ctx.padding = stride, padding


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    stride, padding = ctx.stride, ctx.padding
    grad_x = torch.ops.aten.convolution_backward(
        grad_out,
        x,
        weight,
        None,
        [stride, stride],
        [padding, padding],
        [1, 1],
        False,
        [0, 0],
        weight.shape[0],
        [True, False, False],
    )[0]
    grad_weight = strided_depthwise_weight_gradient(x, grad_out, weight.shape[-1], stride, padding)
    return grad_x, grad_weight, grad_out.sum((0, 2, 3)), None, None


_strided_depthwise_conv_op.register_autograd(_backward, setup_context=_setup_context)


def strided_depthwise_conv(
    x: Tensor, weight: Tensor, bias: Tensor, stride: int, padding: int, impl: str = 'auto'
) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, groups=C)``, a depth-wise conv with a square
    kernel, stride and padding (the offset network's).

    Runs the operator ``dat::strided_depthwise_conv`` (the same conv; its weight gradient
    computed as a conv, see the module docstring) where the stride is above 1, a gradient is
    needed and :func:`~projects.dat.ops.dispatch.select_backend` picks any backend but
    ``reference`` for ``impl`` on CPU in float32, not under autocast; else ``F.conv2d``.

    Args:
        x (Tensor): ``(B, C, H, W)`` map.
        weight (Tensor): ``(C, 1, k, k)`` depth-wise weight.
        bias (Tensor): ``(C,)``.
        stride (int): Stride in both directions.
        padding (int): Zero padding on every side.
        impl (str): One of :data:`~projects.dat.ops.dispatch.ATTN_IMPLS`. Defaults to ``'auto'``.

    Returns:
        Tensor: ``(B, C, Ho, Wo)``.
    """
    # The operator is F.conv2d but for its backward pass: without gradients, F.conv2d itself.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))
    compute_dtype = conv_compute_dtype(x)
    runs_operator = (
        needs_grad
        and stride > 1
        and x.device.type == 'cpu'
        and compute_dtype == torch.float32
        and select_backend(impl, x.device, compute_dtype) != 'reference'
    )
    if not runs_operator:
        return F.conv2d(x, weight, bias, stride, padding, groups=x.shape[1])
    return _strided_depthwise_conv_op(x, weight, bias, stride, padding)
