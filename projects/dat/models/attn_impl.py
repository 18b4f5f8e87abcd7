"""The one public way to switch the operator implementation of a built model."""

from torch import nn

from ..ops import check_attn_impl
from .dat import DAT, ConvFFN, DeformableAttention, NeighborhoodAttention

# The modules whose forward pass calls an operator entry with their ``impl``.
_SWITCHED = (ConvFFN, DeformableAttention, NeighborhoodAttention)


def set_attn_impl(model: nn.Module, impl: str | dict[str, str]) -> dict[str, str]:
    """Switch the implementation (``attn_impl``) of every DAT backbone and block in ``model``.

    The blocks that call an operator (neighbourhood and deformable attention, ConvFFN) take the
    new implementation at their next forward pass; a :class:`DAT` records it in ``attn_impl``.

    Args:
        model (nn.Module): A :class:`DAT`, a model that holds one (a detector, a segmentor, a
            classifier), or a block.
        impl (str | dict[str, str]): One of :data:`~projects.dat.ops.ATTN_IMPLS` for every such
            module, or ``{module name: implementation}`` as an earlier call returned, to restore.

    Returns:
        dict[str, str]: The implementation each switched module had before, by its name in
        ``model.named_modules()``; empty where ``model`` holds no DAT module.

    Raises:
        ValueError: For an unknown implementation, or a name that is not a switched module.
    """
    switched = {name: m for name, m in model.named_modules() if isinstance(m, (DAT, *_SWITCHED))}
    if isinstance(impl, str):
        impl = dict.fromkeys(switched, check_attn_impl(impl))
    unknown = sorted(set(impl) - set(switched))
    if unknown:
        raise ValueError(
            f'set_attn_impl: {unknown} are not DAT modules of this model (DAT, ConvFFN, '
            f'DeformableAttention, NeighborhoodAttention); they are {sorted(switched)}'
        )
    previous = {}
    for name, value in impl.items():
        module = switched[name]
        attribute = 'attn_impl' if isinstance(module, DAT) else 'impl'
        previous[name] = getattr(module, attribute)
        setattr(module, attribute, check_attn_impl(value))
    return previous
