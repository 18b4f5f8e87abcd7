"""Layers of DAT++'s blocks that run faster than their plain PyTorch modules, with the same numbers.

- :class:`PointwiseConv2d`: a 1x1 conv computed as a matrix product over the channels of
  channels-last maps.
- :class:`GELU2d`: GELU of channels-last maps through their NHWC view.
- :func:`depthwise_conv_gelu`: ConvFFN's hidden layer ``GELU(y + DWConv(y))`` with the C++ CPU
  kernel of ``csrc/depthwise_conv_gelu.cpp`` where it applies (float32 on CPU): one pass over
  memory forward and one backward, and only ``y`` is kept for the backward pass.
  :func:`depthwise_conv_gelu_reference` is the same function composed of PyTorch's conv and GELU.

They agree with the plain modules to float32 round-off (``tests/test_layers.py``).
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernels, torch_compat


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` that multiplies channels-last maps as matrices.

    On CPU (torch 2.14, oneDNN) a 1x1 conv's backward pass on channels-last maps is markedly
    slower than the two matrix products of ``F.linear``'s backward on the same memory viewed as
    NHWC (the whole DAT-T++ forward+backward at 224@32: about -12 %). Channels-last maps (DAT++'s
    are: they come from LayerNorms over the NHWC view) are multiplied as ``(B * H * W, C)``
    matrices; others go to the conv. The parameters, their names and shapes are the conv's.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        bias (bool): Learn an additive bias. Defaults to True.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return super().forward(x)


class GELU2d(nn.GELU):
    """``nn.GELU`` for NCHW maps that runs on channels-last memory as a contiguous NHWC tensor.

    PyTorch's CPU GELU kernels (forward and backward) take about twice as long on a
    channels-last NCHW tensor as on the same memory viewed as a contiguous NHWC tensor (torch
    2.14); the maps of DAT++ are channels-last (they come from 1x1 convs on LayerNorm outputs).
    The values are the same, and so is the output's memory format.
    """

    def forward(self, x: Tensor) -> Tensor:
        return gelu_2d(x, self.approximate)


# torch 2.0 and 2.1 compute GELU's gradient wrongly when it comes with other strides than the
# input (pytorch/pytorch#112006); there, the gradient is copied into the input's layout first.
_GELU_GRAD_IN_INPUT_LAYOUT = torch_compat.gelu_backward_mishandles_strided_grad()


def _gelu(x: Tensor, approximate: str) -> Tensor:
    out = F.gelu(x, approximate=approximate)
    if _GELU_GRAD_IN_INPUT_LAYOUT and out.requires_grad:
        size, stride = out.size(), out.stride()  # not out itself: the hook would keep it alive

        def in_input_layout(grad: Tensor) -> Tensor:
            return grad if grad.stride() == stride else grad.new_empty_strided(size, stride).copy_(grad)

        out.register_hook(in_input_layout)
    return out


def gelu_2d(x: Tensor, approximate: str = 'none') -> Tensor:
    """``F.gelu`` of a map, through its NHWC view where it is channels-last (see :class:`GELU2d`)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return _gelu(x.permute(0, 2, 3, 1), approximate).permute(0, 3, 1, 2)
    return _gelu(x, approximate)


def _identity_folded(weight: Tensor) -> Tensor:
    """A depth-wise conv's ``(C, 1, k, k)`` weight with 1 added to every filter's centre tap."""
    kh, kw = weight.shape[-2:]
    identity = torch.zeros(kh * kw, dtype=weight.dtype, device=weight.device)
    identity[kh * kw // 2] = 1.0
    return weight + identity.view(kh, kw)


def depthwise_conv_plus_identity(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``x + conv(x)`` for a depth-wise, odd-kernel, stride-1 ``'same'`` conv, as one conv.

    Adding 1 to the centre tap of every filter folds the residual into the conv: the sum is
    the same up to float32 round-off, and neither the forward nor the backward pass makes a
    separate pass over ``x`` for the addition.

    Args:
        x (Tensor): ``(B, C, H, W)`` input.
        conv (nn.Conv2d): Depth-wise conv with ``C`` groups, an odd kernel, stride 1 and
            padding ``kernel // 2``.

    Returns:
        Tensor: ``x + conv(x)``.
    """
    return F.conv2d(x, _identity_folded(conv.weight), conv.bias, padding=conv.padding, groups=conv.groups)


def depthwise_conv_gelu_reference(y: Tensor, conv: nn.Conv2d) -> Tensor:
    """``GELU(y + conv(y))`` in PyTorch: ConvFFN's hidden layer (``conv`` as in
    :func:`depthwise_conv_plus_identity`)."""
    return gelu_2d(depthwise_conv_plus_identity(y, conv))


def _check_kernel_conv(conv: nn.Conv2d, y: Tensor):
    """The kernel computes a depth-wise, odd square kernel, stride-1, zero-padded 'same' conv."""
    channels, kernel = y.shape[1], conv.weight.shape[-1]
    if conv.weight.shape != (channels, 1, kernel, kernel) or kernel % 2 == 0:
        raise ValueError(f'expected a depth-wise conv weight ({channels}, 1, k, k) with an odd k for a '
                         f'{channels}-channel map, got {tuple(conv.weight.shape)}')
    same = dict(stride=(1, 1), dilation=(1, 1), padding=(kernel // 2, kernel // 2), padding_mode='zeros')
    given = {name: getattr(conv, name) for name in same}
    if given != same:
        raise ValueError(f"expected a 'same' conv ({same}), got {given}")


def _kernel_taps(weight: Tensor) -> Tensor:
    """The kernel's ``(k * k, C)`` taps: the identity-folded ``(C, 1, k, k)`` weight, tap-major."""
    return _identity_folded(weight).flatten(1).t().contiguous()


def _operator_kernels(y: Tensor, weight: Tensor, bias: Tensor):
    """The C++ kernels, after the checks that the fused operators rely on before they reach them
    (they may be called directly, as ``torch.ops.dat.*``)."""
    channels = y.shape[1] if y.dim() == 4 else -1
    kernel = weight.shape[-1] if weight.dim() == 4 else 0
    if (y.device.type != 'cpu' or y.dtype != torch.float32 or weight.shape != (channels, 1, kernel, kernel)
            or kernel % 2 == 0 or bias.shape != (channels,)):
        raise ValueError('dat::depthwise_conv_gelu expects a float32 CPU map y (B, C, H, W), a depth-wise weight '
                         f'(C, 1, k, k) with an odd k and a bias (C,); got y {tuple(y.shape)} {y.dtype} on {y.device}, '
                         f'weight {tuple(weight.shape)}, bias {tuple(bias.shape)}')
    kernels = cpu_kernels.load_kernels()
    if kernels is None:
        raise RuntimeError('dat::depthwise_conv_gelu needs the C++ CPU kernels, which are turned off or could not '
                           'be built (see the log); depthwise_conv_gelu() falls back to PyTorch by itself')
    return kernels


@torch_compat.custom_op('dat::depthwise_conv_gelu', mutates_args=())
def _depthwise_conv_gelu_op(y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    kernels = _operator_kernels(y, weight, bias)
    taps = _kernel_taps(weight)
    out = kernels.depthwise_conv_gelu_forward(y.permute(0, 2, 3, 1), taps, bias)
    return out.permute(0, 3, 1, 2)


@_depthwise_conv_gelu_op.register_fake
def _(y, weight, bias):
    return torch.empty_like(y)


@torch_compat.custom_op('dat::depthwise_conv_gelu_backward', mutates_args=())
def _depthwise_conv_gelu_backward_op(grad_out: Tensor, y: Tensor, weight: Tensor,
                                     bias: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    kernels = _operator_kernels(y, weight, bias)
    taps = _kernel_taps(weight)
    grad_y, grad_taps, grad_bias = kernels.depthwise_conv_gelu_backward(
        grad_out.permute(0, 2, 3, 1).contiguous(), y.permute(0, 2, 3, 1), taps, bias)
    return grad_y.permute(0, 3, 1, 2), grad_taps.t().reshape(weight.shape).contiguous(), grad_bias


@_depthwise_conv_gelu_backward_op.register_fake
def _(grad_out, y, weight, bias):
    return torch.empty_like(y), torch.empty_like(weight), torch.empty_like(bias)


def _depthwise_conv_gelu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _depthwise_conv_gelu_backward(ctx, grad_out):
    return _depthwise_conv_gelu_backward_op(grad_out, *ctx.saved_tensors)


_depthwise_conv_gelu_op.register_autograd(_depthwise_conv_gelu_backward,
                                          setup_context=_depthwise_conv_gelu_setup_context)


@torch_compat.assume_constant_result
def _kernels_available() -> bool:
    """Whether the C++ kernels load; torch.compile evaluates it once instead of tracing the
    loader (which compiles and logs)."""
    return cpu_kernels.load_kernels() is not None


def depthwise_conv_gelu(y: Tensor, conv: nn.Conv2d) -> Tensor:
    """``GELU(y + conv(y))``, ConvFFN's hidden layer; the same function as
    :func:`depthwise_conv_gelu_reference`.

    Runs the fused C++ kernel for float32 maps on CPU where the kernels are available (the map is
    made channels-last first if it is not), else the reference composition.

    Args:
        y (Tensor): ``(B, C, H, W)`` map.
        conv (nn.Conv2d): Depth-wise conv with ``C`` groups, an odd square kernel, stride 1,
            padding ``kernel // 2`` and a bias.

    Returns:
        Tensor: ``(B, C, H, W)``, channels-last where the kernel ran.
    """
    if (y.device.type != 'cpu' or y.dtype != torch.float32 or conv.bias is None
            or torch_compat.is_autocast_enabled('cpu') or not _kernels_available()):
        return depthwise_conv_gelu_reference(y, conv)
    _check_kernel_conv(conv, y)
    return _depthwise_conv_gelu_op(y.contiguous(memory_format=torch.channels_last), conv.weight, conv.bias)
