"""Layers of DAT's blocks that run faster than their plain PyTorch modules, with the same numbers
and the same parameters.

- :class:`PointwiseConv2d`: a 1x1 conv computed as a matrix product over the channels of
  channels-last maps (:func:`~projects.dat.ops.pointwise_conv_2d`).
- :class:`GELU2d`: GELU of channels-last maps through their NHWC view
  (:func:`~projects.dat.ops.gelu_2d`).
- :class:`DropPathResidual`: a residual connection with stochastic depth, the branch scaled and
  added in one op.

They agree with the plain modules to float32 round-off (``tests/test_layers.py``);
``docs/benchmarks.md`` measures what they save.
"""

import torch
from torch import Tensor, nn

from ..ops import gelu_2d, pointwise_conv_2d


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` that multiplies channels-last maps as matrices.

    Channels-last maps (DAT++'s are: they come from LayerNorms over the NHWC view) are
    multiplied as ``(B * H * W, C)`` matrices, whose backward pass is faster on CPU than the
    conv's (:func:`~projects.dat.ops.pointwise_conv_2d`); others go to the conv. The parameters,
    their names and shapes are the conv's.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        bias (bool): Learn an additive bias. Defaults to True.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return pointwise_conv_2d(x, self.weight, self.bias)


class GELU2d(nn.GELU):
    """``nn.GELU`` for NCHW maps that runs on channels-last memory as a contiguous NHWC tensor.

    PyTorch's CPU GELU kernels (forward and backward) are slower on a channels-last NCHW tensor
    than on the same memory viewed as a contiguous NHWC tensor; the maps of DAT++ are
    channels-last (they come from 1x1 convs on LayerNorm outputs). The values are the same, and
    so is the output's memory format.
    """

    def forward(self, x: Tensor) -> Tensor:
        return gelu_2d(x, self.approximate)


class DropPathResidual(nn.Module):
    """``x + DropPath(branch)``: a residual connection whose branch is dropped per sample while
    training (stochastic depth).

    As timm's ``DropPath`` (the original's) computes it: each sample's branch is multiplied by a
    factor drawn per sample, ``1 / (1 - drop_prob)`` with probability ``1 - drop_prob``, else 0.
    The product is added to ``x`` in the same op (``torch.addcmul``), which reads the branch
    once; the branch's gradient is one product. mmcv's ``DropPath`` and the addition after it
    divide, multiply and add in three passes over the map, forward, and multiply and divide
    backward. Evaluating, or with ``drop_prob=0``, it is ``x + branch``.

    Args:
        drop_prob (float): Probability of dropping a sample's branch. Defaults to 0.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'

    def forward(self, x: Tensor, branch: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x + branch
        keep = 1.0 - self.drop_prob
        # Drawn in float32 (torch 2.1 has no CPU bernoulli_ for float16), divided in the branch's dtype.
        kept = torch.empty((branch.shape[0],) + (1,) * (branch.dim() - 1), device=branch.device).bernoulli_(keep)
        factor = kept.to(branch.dtype).div_(keep)
        return torch.addcmul(x, branch, factor)
