"""What the operators use of PyTorch APIs newer than torch 2.0, with their fallbacks, and the
detection of a GELU gradient bug of torch 2.0 and 2.1 (:func:`gelu_backward_mishandles_strided_grad`).

The package supports torch >= 2.0 (most mmdet 3 / mmseg 1 environments run torch 2.0 or 2.1).
Where torch has the custom operator API (``torch.library.custom_op``, torch 2.4), the fast ops
are custom operators (``torch.ops.dat.*``: one opaque node for ``torch.compile``, checked by
``torch.library.opcheck``); on an older torch, :func:`custom_op` makes the same functions a plain
callable with the same ``register_fake`` / ``register_autograd`` methods, differentiated by a
``torch.autograd.Function`` over the same forward and backward functions, so the numbers are
the same.
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# torch.library.custom_op with register_fake and register_autograd (torch >= 2.4).
HAS_CUSTOM_OPS = hasattr(torch.library, 'custom_op') and hasattr(torch.library, 'register_fake')


class _AutogradOp(torch.autograd.Function):
    """Runs a :class:`PlainOp` forward and its registered backward (torch < 2.4)."""

    @staticmethod
    def forward(ctx, op: 'PlainOp', *args):
        output = op.function(*args)
        op.setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.plain_op.backward(ctx, *grads))


class PlainOp:
    """A function with the ``register_fake`` / ``register_autograd`` interface of the objects that
    ``torch.library.custom_op`` returns, for a torch that has no custom operators.

    Without autograd registered, it runs the function (as a custom operator does, outputs that
    do not require grad), and raises where a gradient would be needed, as a custom operator
    does; with it, a ``torch.autograd.Function`` runs the forward function, ``setup_context``
    and, backwards, the registered backward function.

    Args:
        name (str): The operator's name (``'namespace::name'``), for errors.
        function (Callable): The operator's forward function.
    """

    def __init__(self, name: str, function: Callable):
        self.name = name
        self.function = function
        self.backward: Callable | None = None
        self._setup_context: Callable | None = None

    def register_fake(self, fake: Callable) -> Callable:
        """Accepted and unused: a fake (meta) implementation serves only custom operators."""
        return fake

    def register_autograd(self, backward: Callable, setup_context: Callable):
        """Differentiate the function with ``backward(ctx, *grads)`` after ``setup_context(ctx, inputs, output)``."""
        self.backward = backward
        self._setup_context = setup_context

    def setup_context(self, ctx, inputs: Sequence[Any], output: Any):
        ctx.plain_op = self
        self._setup_context(ctx, inputs, output)

    def __call__(self, *args):
        needs_grad = torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)
        if not needs_grad:
            with torch.no_grad():
                return self.function(*args)
        if self.backward is None:
            raise RuntimeError(f'{self.name} has no autograd formula: it cannot be differentiated')
        return _AutogradOp.apply(self, *args)


def custom_op(name: str, mutates_args: Sequence[str] = ()) -> Callable[[Callable], Any]:
    """``torch.library.custom_op(name, mutates_args=...)`` where torch has it, else :class:`PlainOp`.

    Args:
        name (str): ``'namespace::name'``.
        mutates_args (Sequence[str]): Arguments the function writes to. Defaults to none.

    Returns:
        Callable: A decorator that makes a function the operator.
    """
    if HAS_CUSTOM_OPS:
        return torch.library.custom_op(name, mutates_args=mutates_args)
    return lambda function: PlainOp(name, function)


def assume_constant_result(function: Callable) -> Callable:
    """``torch.compiler.assume_constant_result`` where torch has it (2.1+), else ``function``
    unchanged (a torch without it has no ``torch.compile`` that the ops support)."""
    compiler = getattr(torch, 'compiler', None)
    decorator = getattr(compiler, 'assume_constant_result', None)
    return function if decorator is None else decorator(function)


def is_autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``'cpu'``, ``'cuda'``, ...).

    ``torch.is_autocast_enabled(device_type)`` (torch 2.4+), else the per-device functions of
    older torch (``torch.is_autocast_enabled()`` is CUDA's there).

    Args:
        device_type (str): A device type, as ``tensor.device.type``.

    Returns:
        bool: True where autocast is enabled for that device type.
    """
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no argument
        pass
    if device_type == 'cuda':
        return torch.is_autocast_enabled()
    per_device = getattr(torch, f'is_autocast_{device_type}_enabled', None)
    return bool(per_device()) if per_device is not None else False


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype autocast computes in on ``device_type`` (meaningful where it is enabled).

    ``torch.get_autocast_dtype(device_type)`` (torch 2.4+), else the per-device functions of
    older torch.

    Args:
        device_type (str): A device type, as ``tensor.device.type``.

    Returns:
        torch.dtype: e.g. ``torch.bfloat16``.
    """
    get_dtype = getattr(torch, 'get_autocast_dtype', None)
    if get_dtype is not None:
        return get_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == 'cuda' else torch.get_autocast_cpu_dtype()


def gelu_backward_mishandles_strided_grad() -> bool:
    """Whether this torch's CPU GELU backward returns wrong values (uninitialised memory) for a
    gradient whose strides differ from the input's, as torch 2.1 does (pytorch/pytorch#112006).

    Computed on a 12-element example: the gradient through a permuted gradient against the same
    through its contiguous copy.

    Returns:
        bool: True where the gradient of GELU must be given in its input's layout.
    """
    x = torch.linspace(-2.0, 2.0, 12).reshape(2, 2, 3).requires_grad_()
    grad = torch.arange(12.0).reshape(2, 2, 3).permute(1, 0, 2)
    (strided,) = torch.autograd.grad(F.gelu(x), x, grad)
    (dense,) = torch.autograd.grad(F.gelu(x), x, grad.contiguous())
    return not torch.equal(strided, dense)
