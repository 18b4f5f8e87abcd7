"""Pure geometry helpers of DAT and DAT++: reference points, query grids, windows, indices.

Every function here is small, stateless and tested on its own. Coordinates follow the
original implementation: normalised to ``[-1, 1]`` with the last axis ordered ``(y, x)``.

Sizes may be traced: while ``torch.onnx.export`` (the TorchScript exporter) or ``torch.jit.trace``
records the model, a size read from ``x.shape`` is a 0-dim tensor, and only arithmetic on it stays
a function of the input size in the recorded graph; a Python ``if`` on it, or ``torch.tensor`` of
it, is recorded as the constant of the example input. The functions that the backbone calls with
such sizes (:func:`pad_to_multiple`, :func:`pad_to_at_least`, :func:`window_partition`,
:func:`window_reverse`, :func:`shifted_window_mask`, :func:`offset_scale`) therefore compute
with tensor arithmetic only, so that one exported graph serves every input size.
"""

import math

import torch
from torch import Tensor


def _normalised_centres(length: int, divisor: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(i + 0.5) / divisor * 2 - 1`` for ``i in range(length)``, as the original computes it."""
    # The cast is a no-op in PyTorch; the TorchScript ONNX exporter can write linspace as float64
    # whatever its dtype (seen at a constant length), which GridSample of ONNX Runtime refuses.
    centres = torch.linspace(0.5, length - 0.5, length, dtype=dtype, device=device).to(dtype)
    return centres.div_(divisor).mul_(2.0).sub_(1.0)


def key_reference_points(
    height: int, width: int, version: str, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> Tensor:
    """Reference points of a deformable block's key grid.

    v1 places key ``i`` at ``(i + 0.5) / Hk * 2 - 1`` (cell centres). DAT++ divides by
    ``Hk - 1`` instead, so its last point lies beyond +1 (kept on purpose: the clamp of the
    sampling positions takes care of it). A single-point axis has coordinate 0 in DAT++,
    where the original (``DAttentionBaseline._get_ref_points`` in ``models/dat_blocks.py`` of
    LeapLabTHU/DAT) divides by zero and returns NaN.

    Args:
        height (int): Key grid height ``Hk``.
        width (int): Key grid width ``Wk``.
        version (str): ``'v1'`` or ``'pp'``.
        dtype (torch.dtype): Output dtype. Defaults to float32.
        device (torch.device, optional): Output device.

    Returns:
        Tensor: ``(Hk, Wk, 2)`` points, last axis ``(y, x)``.
    """
    if version == 'v1':
        ys = _normalised_centres(height, height, dtype, device)
        xs = _normalised_centres(width, width, dtype, device)
    else:
        ys = (
            _normalised_centres(height, height - 1.0, dtype, device)
            if height > 1
            else torch.zeros(1, dtype=dtype, device=device)
        )
        xs = (
            _normalised_centres(width, width - 1.0, dtype, device)
            if width > 1
            else torch.zeros(1, dtype=dtype, device=device)
        )
    return torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1)


def query_grid(
    height: int, width: int, version: str, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> Tensor:
    """Normalised coordinates of every query position, used by the relative position bias.

    v1 uses the cell centres of :func:`key_reference_points`; DAT++ uses the pixel corners
    ``i / (H - 1) * 2 - 1`` (0 for a single row or column).

    Args:
        height (int): Feature map height ``H``.
        width (int): Feature map width ``W``.
        version (str): ``'v1'`` or ``'pp'``.
        dtype (torch.dtype): Output dtype. Defaults to float32.
        device (torch.device, optional): Output device.

    Returns:
        Tensor: ``(H, W, 2)`` coordinates, last axis ``(y, x)``.
    """
    if version == 'v1':
        return key_reference_points(height, width, 'v1', dtype, device)

    def corners(length: int) -> Tensor:
        if length == 1:
            return torch.zeros(1, dtype=dtype, device=device)
        return torch.arange(length, dtype=dtype, device=device).div_(length - 1.0).mul_(2.0).sub_(1.0)

    return torch.stack(torch.meshgrid(corners(height), corners(width), indexing='ij'), dim=-1)


def offset_conv_padding(kernel_size: int, stride: int) -> int:
    """Padding of the offset network's strided depth-wise conv (0 when kernel equals stride)."""
    return 0 if kernel_size == stride else kernel_size // 2


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """Split a channels-last map into non-overlapping windows.

    Args:
        x (Tensor): ``(B, H, W, C)`` with H and W multiples of ``window_size``.
        window_size (int): Window side.

    Returns:
        Tensor: ``(B * num_windows, window_size ** 2, C)``, windows in row-major order.
    """
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: Tensor, window_size: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, ws * ws, C)`` -> ``(B, H, W, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, height // window_size, width // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window_size: int) -> Tensor:
    """Swin's index into the ``((2w - 1) ** 2, heads)`` bias table for every query-key pair.

    Returns:
        Tensor: ``(w * w, w * w)`` long tensor.
    """
    axis = torch.arange(window_size)
    coords = torch.stack(torch.meshgrid(axis, axis, indexing='ij')).flatten(1)  # 2, w*w
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window_size - 1)
    return relative[..., 0] * (2 * window_size - 1) + relative[..., 1]


def shifted_window_mask(
    height: int | Tensor, width: int | Tensor, window_size: int, shift_size: int, device: torch.device | None = None
) -> Tensor:
    """Swin's attention mask for a map rolled by ``-shift_size``: -100 across regions, else 0.

    After the roll, each axis holds three regions, ``[0, L - ws)``, ``[L - ws, L - shift)`` and
    ``[L - shift, L)``; a position's label is its row region times 3 plus its column region,
    and pairs of positions in one window with different labels are masked. The labels are
    computed by comparisons with ``L`` rather than written into slices, so a traced ``L``
    stays a variable of the exported graph.

    Args:
        height (int | Tensor): Height of the (padded) map, a multiple of ``window_size``.
        width (int | Tensor): Width of the (padded) map, a multiple of ``window_size``.
        window_size (int): Window side.
        shift_size (int): Roll applied before partitioning, ``1 <= shift_size <= window_size``.
        device (torch.device, optional): Output device.

    Returns:
        Tensor: ``(num_windows, ws * ws, ws * ws)`` float32 mask.
    """

    def regions(length: int | Tensor) -> Tensor:
        index = torch.arange(length, device=device)
        return (index >= length - window_size).long() + (index >= length - shift_size).long()

    labels = regions(height)[:, None] * 3 + regions(width)[None, :]
    labels = window_partition(labels[None, :, :, None], window_size).squeeze(-1)  # nW, ws*ws
    different = labels.unsqueeze(1) != labels.unsqueeze(2)
    return torch.zeros(different.shape, device=device).masked_fill(different, -100.0)


def shapes_are_traced() -> bool:
    """Whether the running forward pass is being recorded with traced sizes (``torch.jit.trace``,
    ``torch.onnx.export``), where a size-dependent Python branch would become a constant."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, int | Tensor, int | Tensor]:
    """Zero-pad the bottom/right of an NCHW map so that H and W are multiples of ``multiple``.

    Eager calls skip the pad when nothing is missing; traced calls (:func:`shapes_are_traced`)
    always pad, by amounts computed from the traced sizes (a zero pad returns the map), so
    that the recorded graph pads every input size as an eager call would.

    Args:
        x (Tensor): ``(..., H, W)`` map.
        multiple (int): What H and W are padded to a multiple of.

    Returns:
        tuple: the padded map, and the bottom and right padding.
    """
    pad_b = (multiple - x.shape[-2] % multiple) % multiple
    pad_r = (multiple - x.shape[-1] % multiple) % multiple
    if shapes_are_traced() or pad_b or pad_r:
        x = torch.nn.functional.pad(x, (0, pad_r, 0, pad_b))
    return x, pad_b, pad_r


def pad_to_at_least(x: Tensor, size: int) -> Tensor:
    """Zero-pad the bottom/right of a channels-last ``(B, H, W, C)`` map to at least ``size x size``.

    Eager calls pad only what is missing (nothing for a map of at least ``size``); traced calls
    (:func:`shapes_are_traced`) always pad, by ``max(0, size - H)`` computed on the traced
    size, so that the recorded graph pads every input size as an eager call would.

    Args:
        x (Tensor): ``(B, H, W, C)`` map.
        size (int): Smallest height and width of the result.

    Returns:
        Tensor: ``(B, max(H, size), max(W, size), C)``.
    """
    height, width = x.shape[1:3]
    if shapes_are_traced():
        pad_b = (size - _size_tensor(height)).clamp(min=0)
        pad_r = (size - _size_tensor(width)).clamp(min=0)
        return torch.nn.functional.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    pad_b, pad_r = max(0, size - height), max(0, size - width)
    if pad_b or pad_r:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    return x


def _size_tensor(size: int | Tensor) -> Tensor:
    """A size as a tensor; a traced size (already a 0-dim tensor) is passed on as it is, so that
    it stays a variable of the recorded graph."""
    return size if isinstance(size, Tensor) else torch.tensor(size)


def offset_scale(key_height: int | Tensor, key_width: int | Tensor, device: torch.device | None = None) -> Tensor:
    """``(2,)`` float32 tensor ``[1 / Hk, 1 / Wk]``: the v1 offset range per key cell.

    The reciprocals are computed in float64 and rounded to float32, as ``torch.tensor([1.0 / Hk,
    1.0 / Wk])`` of the original does, but from tensors, so traced sizes stay variables.

    Args:
        key_height (int | Tensor): Key grid height ``Hk``.
        key_width (int | Tensor): Key grid width ``Wk``.
        device (torch.device, optional): Output device.

    Returns:
        Tensor: ``(2,)`` float32, ``(y, x)``: the last axis of the offsets.
    """
    if not isinstance(key_height, Tensor) and not isinstance(key_width, Tensor):
        # Filled on the device: a tensor of host values would be a copy, which waits for a GPU.
        # fill_ rounds each float64 reciprocal to float32, as the original's tensor does.
        scale = torch.full((2,), 1.0 / key_height, dtype=torch.float32, device=device)
        scale[1:].fill_(1.0 / key_width)
        return scale
    sizes = torch.stack([_size_tensor(key_height), _size_tensor(key_width)])
    # float64 on the CPU, where the sizes are (some devices, such as MPS, have no float64).
    return sizes.to(torch.float64).reciprocal().to(device=device, dtype=torch.float32)


def stripes_with_halo(length: int, size: int, halo: int) -> list[tuple[int, int, int, int]]:
    """Cut ``range(length)`` into stripes of ``size`` (the last one shorter), each with the
    ``halo`` neighbours on both sides that exist.

    Returns:
        list[tuple]: ``(start, end, halo_start, halo_end)`` per stripe, with ``halo_start =
        max(0, start - halo)`` and ``halo_end = min(length, end + halo)``.
    """
    if length < 1 or size < 1 or halo < 0:
        raise ValueError(f'expected length >= 1, size >= 1 and halo >= 0, got {length}, {size}, {halo}')
    return [
        (start, min(start + size, length), max(0, start - halo), min(length, start + size + halo))
        for start in range(0, length, size)
    ]


def shift_size_for(window_size: int) -> int:
    """Shift of the v1 'S' block: ``ceil(w / 2)`` as in the original (4 for 7, 6 for 12)."""
    return math.ceil(window_size / 2)
