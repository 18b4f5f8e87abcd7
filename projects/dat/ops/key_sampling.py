"""The ``D`` blocks' key sampling: the public entry and the operator.

:func:`sample_keys` reads each offset group's keys bilinearly from the input map at their
positions: :func:`~projects.dat.ops.reference.sample_keys_reference` (``F.grid_sample``, as the
original) or the custom operator ``torch.ops.dat.sample_keys``, computed by the C++ kernel of
``csrc/key_sampling.cpp``, where :func:`~projects.dat.ops.dispatch.select_backend` picks the
``cpu-kernel`` backend.

``F.grid_sample`` takes a ``(B * groups, C / groups, H, W)`` map: DAT++'s maps are channels-last,
so at a batch above 1 that reshape copies the map (and its gradient) first, and its backward pass
writes the map's gradient in the contiguous layout, which autograd then copies into the map's
channels-last one. The kernel reads and writes the channels-last map in place (each key's pixels
are rows of ``C / groups`` contiguous channels) and returns the keys channels-last, as the key and
value projections read them (``docs/benchmarks.md``, "The D blocks' key sampling").
"""

import torch
from torch import Tensor

from . import cpu_kernels, torch_compat
from .cpu_kernels import nhwc
from .dispatch import select_backend
from .reference import sample_keys_reference


def _check_operator_inputs(x: Tensor, pos: Tensor, num_groups: int) -> None:
    """The checks that the operator relies on (it may be called directly, as ``torch.ops.dat.*``)."""
    b, c = x.shape[:2] if x.dim() == 4 else (-1, -1)
    if (
        x.dim() != 4
        or num_groups < 1
        or c % num_groups
        or pos.dim() != 3
        or pos.shape[0] != b * num_groups
        or pos.shape[2] != 2
        or x.device.type != 'cpu'
        or pos.device.type != 'cpu'
        or x.dtype != torch.float32
        or pos.dtype != torch.float32
    ):
        raise ValueError(
            'dat::sample_keys expects a float32 CPU map x (B, C, H, W), positions (B * groups, N, 2) '
            f'and a number of groups that divides C; got x {tuple(x.shape)} {x.dtype} on {x.device}, '
            f'pos {tuple(pos.shape)} {pos.dtype} on {pos.device}, groups {num_groups}'
        )


def _kernels():
    return cpu_kernels.required_kernels('dat::sample_keys', 'sample_keys() falls back to F.grid_sample by itself')


def _keys_as_map(keys: Tensor) -> Tensor:
    """``(B, N, C)`` keys as the ``(B, C, 1, N)`` channels-last map the projections take."""
    b, n, c = keys.shape
    return keys.view(b, 1, n, c).permute(0, 3, 1, 2)


@torch_compat.custom_op('dat::sample_keys', mutates_args=())
def _sample_keys_op(x: Tensor, pos: Tensor, num_groups: int) -> Tensor:
    _check_operator_inputs(x, pos, num_groups)
    keys = _kernels().sample_keys_forward(nhwc(x.contiguous(memory_format=torch.channels_last)), pos, num_groups)
    return _keys_as_map(keys)


@_sample_keys_op.register_fake
def _(x, pos, num_groups):
    return _keys_as_map(x.new_empty(x.shape[0], pos.shape[1], x.shape[1]))


@torch_compat.custom_op('dat::sample_keys_backward', mutates_args=())
def _sample_keys_backward_op(grad_out: Tensor, x: Tensor, pos: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    _check_operator_inputs(x, pos, num_groups)
    b, c, _, n = grad_out.shape
    grad_x, grad_pos = _kernels().sample_keys_backward(
        nhwc(grad_out).reshape(b, n, c).contiguous(),
        nhwc(x.contiguous(memory_format=torch.channels_last)),
        pos,
        num_groups,
    )
    return grad_x.permute(0, 3, 1, 2), grad_pos


@_sample_keys_backward_op.register_fake
def _(grad_out, x, pos, num_groups):
    return torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(pos)


def _setup_context(ctx, inputs, output):
    x, pos, num_groups = inputs
    ctx.save_for_backward(x, pos)
    ctx.num_groups = num_groups


def _backward(ctx, grad_out):
    x, pos = ctx.saved_tensors
    grad_x, grad_pos = _sample_keys_backward_op(grad_out, x, pos, ctx.num_groups)
    return grad_x, grad_pos, None


_sample_keys_op.register_autograd(_backward, setup_context=_setup_context)


def sample_keys(x: Tensor, pos: Tensor, num_groups: int, impl: str = 'auto') -> Tensor:
    """Each group's keys read bilinearly from ``x`` at their positions; the same function as
    :func:`~projects.dat.ops.reference.sample_keys_reference`.

    Runs the operator ``dat::sample_keys`` (the C++ kernel, on the map's channels-last memory)
    where :func:`~projects.dat.ops.dispatch.select_backend` picks the ``cpu-kernel`` backend for
    ``impl`` and ``pos``'s dtype (float32 positions on CPU; ``x`` is cast to it, as the reference
    casts it), else ``F.grid_sample``.

    Args:
        x (Tensor): ``(B, C, H, W)`` map; group ``i`` owns channels
            ``[i * C / groups, (i + 1) * C / groups)``.
        pos (Tensor): ``(B * groups, Ns, 2)`` key positions, normalised (-1 and 1 at the centres
            of the first and last pixels), ``(y, x)``.
        num_groups (int): Number of offset groups.
        impl (str): One of :data:`~projects.dat.ops.dispatch.ATTN_IMPLS`. Defaults to ``'auto'``.

    Returns:
        Tensor: ``(B, C, 1, Ns)`` keys in ``pos``'s dtype, channels-last where the operator ran.
    """
    if select_backend(impl, x.device, pos.dtype) != 'cpu-kernel':
        return sample_keys_reference(x, pos, num_groups)
    # Channels-last here, so that a map in another layout is converted once (the operator saves
    # its input for the backward pass, which reads the same layout).
    x = x.to(pos.dtype).contiguous(memory_format=torch.channels_last)
    return _sample_keys_op(x, pos.contiguous(), num_groups)
