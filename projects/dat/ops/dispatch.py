"""Which implementation of an operator runs: one rule for every operator.

Each operator entry (:func:`~projects.dat.ops.deformable_attention`,
:func:`~projects.dat.ops.neighborhood_attention`, :func:`~projects.dat.ops.depthwise_conv_gelu`,
:func:`~projects.dat.ops.sample_keys`, :func:`~projects.dat.ops.strided_depthwise_conv`) takes
an implementation ``impl`` (the backbone's ``attn_impl``, one of :data:`ATTN_IMPLS`) and asks
:func:`select_backend` which backend (one of :data:`BACKENDS`) computes it:

=============== ================ ====================== ====================== ===========
``impl``        ONNX export, or  CPU, compute dtype     CUDA, compute dtype    otherwise
                device not CPU / float32, C++ kernels   float32, the operator
                CUDA             built                  has a GPU kernel, on
                                                        (DAT_GPU_KERNELS=1)
=============== ================ ====================== ====================== ===========
``reference``   reference        reference              reference              reference
``auto``        reference        cpu-kernel             gpu-kernel             pytorch
``fast``        error            cpu-kernel             gpu-kernel             pytorch
``pytorch``     error            pytorch                pytorch                pytorch
``cpu-kernel``  error            cpu-kernel             error                  error
=============== ================ ====================== ====================== ===========

- ``reference``: the plain PyTorch functions of :mod:`~projects.dat.ops.reference`, which follow
  the original code operation by operation (the ground truth; what ONNX exports).
- ``pytorch``: the memory-lean custom operators (``torch.ops.dat.*``) computed in PyTorch.
- ``cpu-kernel``: the same operators computed by the C++ CPU kernels
  (:mod:`~projects.dat.ops.cpu_kernels`; ``DAT_CPU_KERNELS=0`` turns them off).
- ``gpu-kernel``: the same operators computed by Triton kernels on CUDA
  (:mod:`~projects.dat.ops.gpu_kernels`; deformable and neighbourhood attention), where
  ``DAT_GPU_KERNELS=1`` turns them on (opt-in until they have run on a GPU), except under
  ``torch.use_deterministic_algorithms(True)``: they sum the tables' gradients in no fixed order.

The compute dtype is what the operator computes its softmax (or conv) in: float32 for float32,
float16 and bfloat16 attention inputs, float64 for float64 ones, and for the convs (the ConvFFN
hidden layer, the offset network's conv) the autocast dtype under autocast
(:func:`conv_compute_dtype`). Custom operators have no ONNX symbolic, hence the
reference during export.
"""

import torch

from . import cpu_kernels, gpu_kernels, torch_compat

ATTN_IMPLS = ('auto', 'fast', 'reference', 'pytorch', 'cpu-kernel')
BACKENDS = ('reference', 'pytorch', 'cpu-kernel', 'gpu-kernel')


def check_attn_impl(impl: str) -> str:
    """Return ``impl`` if it is one of :data:`ATTN_IMPLS`, else raise a ValueError saying so."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {impl!r}')
    return impl


@torch_compat.assume_constant_result
def cpu_kernels_available() -> bool:
    """Whether the C++ kernels load; torch.compile evaluates it once instead of tracing the
    loader (which compiles and logs)."""
    return cpu_kernels.load_kernels() is not None


@torch_compat.assume_constant_result
def gpu_kernels_available() -> bool:
    """Whether the Triton kernels can run (:func:`~projects.dat.ops.gpu_kernels.available`), a
    constant for torch.compile as :func:`cpu_kernels_available` is."""
    return gpu_kernels.available()


def attention_dtypes(*tensors: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """The dtype of the attention inputs together (half types stay half) and the dtype the
    positions, bias and softmax are computed in (float64 for float64 inputs, else float32).

    Args:
        *tensors (Tensor): The attention inputs (q, k, v).

    Returns:
        tuple: ``(input dtype, compute dtype)``.
    """
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype, torch.float64 if dtype == torch.float64 else torch.float32


def conv_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a conv of ``x`` computes in: the autocast dtype where autocast is on for ``x``'s
    device (its convs cast their inputs), else ``x``'s dtype."""
    device_type = x.device.type
    if torch_compat.is_autocast_enabled(device_type):
        return torch_compat.autocast_dtype(device_type)
    return x.dtype


def select_backend(impl: str, device: torch.device, compute_dtype: torch.dtype, gpu_kernel: bool = False) -> str:
    """The backend that computes an operator (see the table of this module).

    Args:
        impl (str): One of :data:`ATTN_IMPLS`.
        device (torch.device): The device of the operator's inputs.
        compute_dtype (torch.dtype): The dtype the operator computes in; the C++ and GPU
            kernels compute float32.
        gpu_kernel (bool): Whether the operator has a GPU kernel. Defaults to False.

    Returns:
        str: One of :data:`BACKENDS`.

    Raises:
        RuntimeError: Where ``impl`` names a backend that cannot run these inputs.
    """
    check_attn_impl(impl)
    if impl == 'reference':
        return 'reference'
    if device.type not in ('cpu', 'cuda') or torch.onnx.is_in_onnx_export():
        if impl == 'auto':
            return 'reference'
        raise RuntimeError(
            f'attn_impl={impl!r} is not available on device {device.type!r} or during ONNX export; '
            "use attn_impl='auto' to fall back to the reference path"
        )
    if impl == 'pytorch':
        return 'pytorch'
    kernel_applies = device.type == 'cpu' and compute_dtype == torch.float32
    if kernel_applies and cpu_kernels_available():
        return 'cpu-kernel'
    if impl == 'cpu-kernel':
        reason = (
            'they are turned off or could not be built (see the log)'
            if kernel_applies
            else (f'they compute float32 on CPU, got {compute_dtype} on {device.type!r}')
        )
        raise RuntimeError(
            f"attn_impl='cpu-kernel' cannot run the C++ CPU kernels here: {reason}; use "
            "attn_impl='fast' to fall back to PyTorch"
        )
    # The GPU kernels add the tables' gradients with atomic adds, in no fixed order: where PyTorch
    # was asked for deterministic algorithms, its operators run instead.
    if (
        gpu_kernel
        and device.type == 'cuda'
        and compute_dtype == torch.float32
        and not torch.are_deterministic_algorithms_enabled()
        and gpu_kernels_available()
    ):
        return 'gpu-kernel'
    return 'pytorch'
