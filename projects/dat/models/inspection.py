"""Look inside the deformable attention blocks: sampling positions, reference points and the
attention weights of chosen queries, for visualisation, debugging and tests.

Nothing here re-implements a block, and nothing costs anything outside these functions: while
they run, each :class:`DeformableAttention` records what its own forward pass computes
(:meth:`DeformableAttention.sampling_positions` is wrapped for the duration, the projections
are read through forward hooks). :func:`record_sampling_points` records the positions of every
deformable block of a model; :func:`deformable_attention_maps` runs one block and also
computes the logits of chosen queries with
:func:`~projects.dat.ops.deformable_attention_logits`, the function the reference
attention itself uses; the tests check that ``softmax(logits) @ v`` reproduces the block's
output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops import deformable_attention_logits
from .dat import DeformableAttention
from .geometry import query_grid

__all__ = ['DeformableAttentionMaps', 'deformable_attention_maps', 'record_sampling_points']

# What a block computed: positions (B, groups, Hk, Wk, 2) and references (Hk, Wk, 2).
SamplingPoints = dict[str, Tensor]


@contextmanager
def _recording_sampling_positions(
    modules: dict[str, DeformableAttention], record: Callable[[str, SamplingPoints], None]
) -> Iterator[None]:
    """Within the context, every call of ``module.sampling_positions`` also calls
    ``record(name, dict(positions=..., references=...))`` with its detached results.

    The method is wrapped on the instances only (the class is untouched) and unwrapped on exit,
    also when the forward pass raises.
    """
    for name, module in modules.items():

        def sampling_positions(q: Tensor, name: str = name, module: DeformableAttention = module):
            pos, ref = type(module).sampling_positions(module, q)
            hk, wk = pos.shape[1:3]
            positions = pos.detach().reshape(-1, module.num_groups, hk, wk, 2)
            record(name, dict(positions=positions, references=ref.detach()))
            return pos, ref

        module.sampling_positions = sampling_positions
    try:
        yield
    finally:
        for module in modules.values():
            del module.sampling_positions


@contextmanager
def record_sampling_points(model: nn.Module) -> Iterator[dict[str, SamplingPoints]]:
    """Record the sampling positions and reference points of every deformable block of ``model``.

    Yields a dict filled by each forward pass run inside the context, keyed by module name
    (e.g. ``'stages.2.blocks.1.attn'``), each value ``dict(positions=(B, groups, Hk, Wk, 2),
    references=(Hk, Wk, 2))``, normalised to ``[-1, 1]`` with the last axis ``(y, x)``, in the
    dtype the block computes them in (float32 under autocast). A later forward pass replaces
    the values. Outside the context nothing is recorded.

    Args:
        model: A model holding :class:`DeformableAttention` modules (e.g. a ``DAT``).

    Yields:
        The records, filled as the forward passes run.
    """
    records: dict[str, SamplingPoints] = {}
    modules = {name: m for name, m in model.named_modules() if isinstance(m, DeformableAttention)}
    with _recording_sampling_positions(modules, records.__setitem__):
        yield records


@dataclass
class DeformableAttentionMaps:
    """What a deformable block did for one input.

    Attributes:
        positions (Tensor): ``(B, groups, Hk, Wk, 2)`` sampling positions, normalised to
            ``[-1, 1]``, last axis ``(y, x)``.
        references (Tensor): ``(Hk, Wk, 2)`` reference points (same convention).
        attention (Tensor): ``(B, heads, Nq, Hk * Wk)`` softmax weights of the chosen queries
            over their group's sampled keys (head ``h`` belongs to group
            ``h // (heads / groups)``).
        queries (Tensor): ``(Nq, 2)`` long ``(row, col)`` of the queries on the feature map.
        feature_size (tuple[int, int]): ``(H, W)`` of the block's input map.
        num_groups (int): Offset groups.
    """

    positions: Tensor
    references: Tensor
    attention: Tensor
    queries: Tensor
    feature_size: tuple[int, int]
    num_groups: int

    @property
    def num_heads(self) -> int:
        return self.attention.shape[1]

    def group_attention(self) -> Tensor:
        """Weights averaged over the heads of each group: ``(B, groups, Nq, Hk * Wk)``."""
        b, heads, nq, ns = self.attention.shape
        return self.attention.reshape(b, self.num_groups, heads // self.num_groups, nq, ns).mean(2)


@torch.no_grad()
def deformable_attention_maps(
    module: DeformableAttention, x: Tensor, queries: Tensor | None = None
) -> DeformableAttentionMaps:
    """Run ``module`` on ``x`` and return its positions, references and attention weights.

    Args:
        module (DeformableAttention): The block's attention (e.g.
            ``model.stages[2].blocks[1].attn``).
        x (Tensor): ``(B, C, H, W)`` input of the attention (after the block's ``norm1``).
        queries (Tensor, optional): ``(Nq, 2)`` integer ``(row, col)`` positions on the
            ``H x W`` map whose attention weights to return. Defaults to all positions in
            row-major order.

    Returns:
        DeformableAttentionMaps: See the class.

    Raises:
        TypeError: If ``module`` is not a :class:`DeformableAttention`.
        ValueError: For a badly shaped input or queries outside the map.
    """
    if not isinstance(module, DeformableAttention):
        raise TypeError(f'expected a DeformableAttention module, got {type(module).__name__}')
    if x.dim() != 4 or x.shape[1] != module.proj_q.in_channels:
        raise ValueError(f'x must be (B, {module.proj_q.in_channels}, H, W), got {tuple(x.shape)}')
    b, c, h, w = x.shape
    if queries is None:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
        queries = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    queries = torch.as_tensor(queries, dtype=torch.long).reshape(-1, 2).cpu()
    if queries.numel() == 0 or (queries < 0).any() or (queries[:, 0] >= h).any() or (queries[:, 1] >= w).any():
        raise ValueError(f'queries must be (row, col) pairs inside the {h}x{w} map, got {queries.tolist()}')

    captured: dict[str, Tensor] = {}
    points: dict[str, SamplingPoints] = {}
    hooks = [
        module.proj_q.register_forward_hook(lambda m, i, o: captured.__setitem__('q', o)),
        module.proj_k.register_forward_hook(lambda m, i, o: captured.__setitem__('k', o)),
    ]
    try:
        with _recording_sampling_positions({'block': module}, points.__setitem__):
            module(x)
    finally:
        for hook in hooks:
            hook.remove()
    if 'q' not in captured or 'k' not in captured or 'block' not in points:
        raise RuntimeError(
            'the deformable block did not call proj_q, proj_k and sampling_positions in its forward pass'
        )
    q, k = captured['q'], captured['k']
    pos, ref = points['block']['positions'], points['block']['references']
    hk, wk = pos.shape[2:4]

    index = (queries[:, 0] * w + queries[:, 1]).to(x.device)
    q_sel = q.reshape(b, c, h * w)[:, :, index]
    coords = query_grid(h, w, module.version, q.dtype, q.device).reshape(h * w, 2)[index]
    logits = deformable_attention_logits(
        q_sel,
        k.reshape(b, c, hk * wk),
        pos.reshape(-1, hk * wk, 2),
        coords,
        module.rpe_table,
        module.num_groups,
    )
    return DeformableAttentionMaps(
        positions=pos,
        references=ref,
        attention=logits.softmax(dim=-1),
        queries=queries,
        feature_size=(h, w),
        num_groups=module.num_groups,
    )
