"""Where a training step's time goes: forward and backward time per module group, against MACs.

For each model spec (``benchmark.py``'s: ``datpp-t:fast``, ``swin-t``, ...; built and seeded by
:mod:`projects.dat.benchmarking`, as ``benchmark.py`` builds them) and input, one training step
as ``benchmark.py`` times it (train mode, the loss is ``benchmarking.training_loss``,
gradients of all parameters) runs under ``torch.profiler``; every forward and backward op is
attributed to a group, such as stage 2's ``D`` blocks' attention core or Swin-T's stage 2 FFN
linear layers, and each group gets

- its forward time: the time of the ops it calls (outermost ops only, inner ops are part of
  them);
- its backward time: the time of the autograd nodes its forward ops created (see below);
- its MACs: the forward pass's multiply-accumulates of its modules and ops,
  :func:`projects.dat.flops.analyze_complexity` with the papers' convention (what
  ``benchmark.py``'s MACs columns count), and ms per GMAC of forward+backward.

Groups (``GROUPS``): ``stem``, ``downsample`` (patch merging into a stage), ``norm`` (the
blocks' LayerNorms), ``attn proj`` (q/k/v/qkv and output projections), ``attn core`` (q.k, bias,
softmax, attn.v: DAT's fused operators, Swin's ``WindowMSA`` products and softmax), ``attn
layout`` (the rest of the attention modules' own ops: permutes, padding, window partition, roll,
shift masks, query grids, reference points), ``offset net`` and ``key sampling``
(``grid_sample`` or ``dat::sample_keys`` of the keys; DAT's ``D`` blocks), ``LPU`` (DAT++'s
local perception unit), ``FFN fc`` (the two linear / 1x1 layers), ``FFN hidden`` (DAT++:
depth-wise conv and GELU, fused; in a CPU training step with ``recompute_ffn`` also fc2, which
runs inside the operator ``dat::depthwise_conv_gelu_linear`` while its MACs count in ``FFN fc``;
Swin: GELU), ``residual`` (the blocks' additions and drop
path), ``output norms`` (the four output LayerNorms and the layout of the outputs), ``loss``;
and three that are no module's: ``Python between ops`` (forward: interpreter time between ops,
module calls and this tool's hooks), ``AccumulateGrad`` (backward: storing the parameters'
gradients) and ``autograd engine`` (backward: time between autograd nodes, and nodes no forward
op of the step created). Rows are per stage and block kind (DAT: ``N`` neighbourhood, ``D``
deformable; Swin: ``W`` windows, plain and shifted).

Method. Module forward pre- and post-hooks open and close a ``record_function`` scope named
after the module on every module, so each forward op's innermost module is its enclosing scope;
the op's group follows from that module's path and, for modules that run several kinds of
ops themselves (an attention module's fused core, key sampling and layout ops), from the
outermost op's name (:meth:`Grouping.classify`). Backward time is attributed through autograd's sequence
numbers: the profiler gives each forward op the sequence number of the autograd node it creates,
and the node's ``autograd::engine::evaluate_function`` event in the backward pass carries the
same number, so each node's time (its backward kernel, the accumulation of its gradient into
its inputs' buffers and, for DAT++'s ConvFFN, the recomputation of its hidden layer inside the
node that first needs it) goes to the group of the forward op that created it. On CPU the
backward pass runs on the calling thread; with ``--threads 1`` ops do not overlap, so the groups'
times add up to the step.

Limits. The profiler adds a fixed cost to every op (microseconds), which inflates groups of many
small ops (``attn layout``, ``residual``) more than groups of few large ones; every round also
times the step without profiler and hooks, and the tables give both (``overhead``). The groups
are exact for the fast paths, whose attention cores are single operators; on the ``reference``
path the cores are plain PyTorch ops in the attention modules' own scopes, where the time of the
``D`` blocks' bias read (a ``grid_sample``) counts as ``key sampling`` and that of the softmax as
``attn layout`` (their MACs are grouped right). Each group's and op's median is taken on its own,
so the medians need not add up exactly to the median step. Swin-T's
patch merging ends a stage; it is shown in the stage it feeds, as DAT's ``Downsample`` is.

Protocol: the models are built once; ``--warmup`` rounds run one step of each model without the
profiler; then each of ``--repeats`` rounds runs, model after model, one plain step (timed) and
one profiled step, so that a change of machine load affects all models alike. Tables show
medians over the rounds; ratios compare each model with the first one. Memory: all models live in
one process (DAT-T++ and Swin-T at 1344x800 need about 3 GiB each for a step).

Examples::

    python tools/analysis_tools/profile_layers.py --models swin-t datpp-t:fast --inputs 512x832@1 \\
        --warmup 1 --repeats 3 --threads 1 --json docs/bench/cpu_profile_layers_512x832.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from projects.dat import DAT, benchmarking
from projects.dat.flops import analyze_complexity

GROUPS = (
    'stem',
    'downsample',
    'norm',
    'attn proj',
    'attn core',
    'attn layout',
    'offset net',
    'key sampling',
    'LPU',
    'FFN fc',
    'FFN hidden',
    'residual',
    'output norms',
    'loss',
    'Python between ops',
    'AccumulateGrad',
    'autograd engine',
)
# Groups that are no module's time.
OVERHEAD_GROUPS = ('Python between ops', 'AccumulateGrad', 'autograd engine')

SCOPE_PREFIX = 'module::'
FORWARD_SCOPE = 'profile_layers::forward'
BACKWARD_SCOPE = 'profile_layers::backward'
PHASES = (FORWARD_SCOPE, BACKWARD_SCOPE)
NODE_PREFIX = 'autograd::engine::evaluate_function: '

# (block-relative module path, op-name pattern or None for any op, group); the first match wins.
# Op names are the profiler's (``aten::grid_sampler``, ``dat::sample_keys``) or flops.py's
# op types (``grid_sampler``, ``einsum``), so that one table groups both times and MACs.
DAT_BLOCK_RULES = (
    (r'', r'conv', 'LPU'),  # depthwise_conv_plus_identity(x, self.lpu): the LPU runs in the block's scope
    (r'', None, 'residual'),
    (r'residual', None, 'residual'),
    (r'norm[12]', None, 'norm'),
    (r'attn', r'deformable_attention|neighborhood_attention|einsum', 'attn core'),
    (r'attn', r'grid_sampler|sample_keys', 'key sampling'),
    (r'attn', None, 'attn layout'),
    (r'attn\.(proj_[qkv]|proj_out|qkv|proj)', None, 'attn proj'),
    (r'attn\.conv_offset(\..*)?', None, 'offset net'),
    (r'mlp\.fc[12]', None, 'FFN fc'),
    (r'mlp(\..*)?', None, 'FFN hidden'),
)
SWIN_BLOCK_RULES = (
    (r'', None, 'residual'),
    (r'norm[12]', None, 'norm'),
    (r'attn', None, 'attn layout'),
    (r'attn\.drop', None, 'residual'),
    (r'attn\.w_msa(\.softmax|\.attn_drop)?', None, 'attn core'),
    (r'attn\.w_msa\.(qkv|proj|proj_drop)', None, 'attn proj'),
    (r'ffn(\.gamma2|\.dropout_layer)?', None, 'residual'),
    (r'ffn\.layers\.0\.1', None, 'FFN hidden'),
    (r'ffn\.layers(\..*)?', None, 'FFN fc'),
)
# The JSON keeps each op's median self time per group and phase where it is at least MIN_OP_MS, under the key
# 'stage|kind|group|phase|op' (one line each: a step has thousands of smaller ones).
MIN_OP_MS = 1.0
OP_KEY_SEPARATOR = '|'
# The columns a table sums the groups by (format_table's ``by``).
TABLE_FIELDS = {'group': ('group',), 'stage+group': ('stage', 'group'), 'stage+kind+group': ('stage', 'kind', 'group')}
BLOCK_PATH = re.compile(r'stages\.(\d+)\.blocks\.(\d+)(?:\.(.*))?')
STAGE_PART = re.compile(r'stages\.(\d+)\.(downsample)(\..*)?|stages\.(\d+)')
OUTPUT_NORM = re.compile(r'norm(\d)')


def _match_rules(rules: Sequence[tuple], rest: str, op: str) -> str | None:
    for path, op_pattern, group in rules:
        if re.fullmatch(path, rest) and (op_pattern is None or re.search(op_pattern, op)):
            return group
    return None


class Grouping:
    """Which group, stage and block kind a module's op belongs to, for one model.

    Args:
        model (nn.Module): A :class:`~projects.dat.DAT` or mmdet's ``SwinTransformer`` (not
            ``benchmarking.TimmSwinT``, whose module paths differ).

    Raises:
        ValueError: For another model.
    """

    def __init__(self, model: nn.Module):
        self.is_dat = isinstance(model, DAT)
        if self.is_dat:
            self.stage_spec = model.arch_settings['stage_spec']
            self.rules = DAT_BLOCK_RULES
        elif type(model).__name__ == 'SwinTransformer':
            self.stage_spec = None
            self.rules = SWIN_BLOCK_RULES
        else:
            raise ValueError(f'profile_layers groups DAT and mmdet SwinTransformer modules, not {type(model).__name__}')

    def classify(self, path: str | None, op: str) -> tuple[str, str, str]:
        """The ``(stage, kind, group)`` of an op called by the module at ``path`` itself.

        Args:
            path (str, optional): The innermost module's path in the model (``''``: the model
                itself; None: outside the model, i.e. the loss).
            op (str): The op's name (profiler) or op type (flops.py).

        Returns:
            tuple: stage (``'stem'``, ``'0'``-``'3'``, ``'-'``), block kind (``'N'``, ``'D'``,
            ``'W'`` or ``'-'``) and group; group ``'other'`` where no rule matches.
        """
        if path is None:
            return '-', '-', 'loss'
        block = BLOCK_PATH.fullmatch(path)
        if block:
            stage, index, rest = int(block[1]), int(block[2]), block[3] or ''
            kind = self.stage_spec[stage][index] if self.is_dat else 'W'
            return str(stage), kind, _match_rules(self.rules, rest, op) or 'other'
        if path == '' or OUTPUT_NORM.fullmatch(path):
            stage = OUTPUT_NORM.fullmatch(path)
            return (stage[1] if stage else '-'), '-', 'output norms'
        if path.split('.')[0] in ('stem', 'patch_embed', 'drop_after_pos'):
            return 'stem', '-', 'stem'
        part = STAGE_PART.fullmatch(path)
        if part and part[2]:
            # Swin's patch merging ends the stage before the one it feeds; DAT's starts it.
            stage = int(part[1]) + (0 if self.is_dat else 1)
            return str(stage), '-', 'downsample'
        if part:  # a stage's own ops (none in either model): its blocks' residual stream
            return part[4], '-', 'residual'
        return '-', '-', 'other'


@contextlib.contextmanager
def module_scopes(model: nn.Module) -> Iterator[None]:
    """Open a ``record_function`` scope ``module::<path>`` around every module's forward call."""
    handles = []
    stack: list[Any] = []

    def enter(name: str):
        def hook(module, args):
            scope = record_function(SCOPE_PREFIX + name)
            scope.__enter__()
            stack.append(scope)

        return hook

    def leave(module, args, output):
        stack.pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def train_step(model: nn.Module, run: Any, inputs: torch.Tensor) -> tuple[float, float]:
    """One training step as ``benchmark.py``'s; returns its forward and backward seconds.

    The forward part includes the loss (:func:`benchmarking.training_loss`).
    """
    t0 = time.perf_counter()
    with record_function(FORWARD_SCOPE):
        outputs = run(inputs)
        loss = benchmarking.training_loss(outputs)
    t1 = time.perf_counter()
    with record_function(BACKWARD_SCOPE):
        loss.backward()
    t2 = time.perf_counter()
    for p in model.parameters():
        p.grad = None
    return t1 - t0, t2 - t1


def _scope_and_top(event: Any) -> tuple[str | None, Any, str | None]:
    """The innermost module scope of an event (its path; None outside the model), its outermost
    op below that scope, and the phase scope it is in (None: neither)."""
    top, node = event, event.cpu_parent
    while node is not None and not node.name.startswith(SCOPE_PREFIX) and node.name not in PHASES:
        top, node = node, node.cpu_parent
    path = node.name[len(SCOPE_PREFIX) :] if node is not None and node.name.startswith(SCOPE_PREFIX) else None
    phase = node
    while phase is not None and phase.name not in PHASES:
        phase = phase.cpu_parent
    return path, top, None if phase is None else phase.name


def attribute(events: Sequence[Any], grouping: Grouping) -> dict[str, Any]:
    """Forward and backward milliseconds per ``(stage, kind, group)`` of one profiled step.

    Args:
        events (Sequence): ``torch.profiler.profile(...).events()`` of one :func:`train_step`
            under :func:`module_scopes`.
        grouping (Grouping): The model's grouping.

    Returns:
        dict: ``fwd`` and ``bwd``: ``{(stage, kind, group): ms}``; ``ops``: ``{(stage, kind,
        group, phase, op name): self ms}``, the time of each op itself (without the ops it calls;
        a fused operator's self time is its C++ kernels and Python); ``forward_ms`` and
        ``backward_ms``: the phases' wall times in the trace; ``unmatched_nodes``: backward nodes
        whose sequence number no forward op had (their time is in ``autograd engine``).
    """
    fwd: dict[tuple, float] = defaultdict(float)
    bwd: dict[tuple, float] = defaultdict(float)
    ops: dict[tuple, float] = defaultdict(float)
    node_group: dict[int, tuple] = {}
    phases = {e.name: e for e in events if e.name in PHASES}
    forward_op_ms = 0.0
    backward_events = []
    for e in events:
        if e.name.startswith(SCOPE_PREFIX) or e.name in phases:
            continue
        path, top, phase = _scope_and_top(e)
        if phase == FORWARD_SCOPE:
            key = grouping.classify(path, top.name)
            ops[(*key, 'fwd', e.name)] += e.self_cpu_time_total / 1e3
            if top is e:
                ms = e.time_range.elapsed_us() / 1e3
                fwd[key] += ms
                forward_op_ms += ms
            if e.sequence_nr >= 0:
                node_group[e.sequence_nr] = key
        elif phase == BACKWARD_SCOPE:
            backward_events.append(e)
    forward_ms = phases[FORWARD_SCOPE].time_range.elapsed_us() / 1e3
    backward_ms = phases[BACKWARD_SCOPE].time_range.elapsed_us() / 1e3
    fwd[('-', '-', 'Python between ops')] = forward_ms - forward_op_ms
    engine = ('-', '-', 'autograd engine')
    node_ms, unmatched = 0.0, 0
    for e in backward_events:
        # The outermost autograd node around the event (nodes run inside other nodes only with
        # reentrant checkpointing); events outside every node are the engine's.
        node, parent = None, e
        while parent is not None:
            if parent.name.startswith(NODE_PREFIX):
                node = parent
            parent = parent.cpu_parent
        key = engine if node is None else node_group.get(node.sequence_nr)
        if key is None and 'AccumulateGrad' in node.name:
            key = ('-', '-', 'AccumulateGrad')
        elif key is None:
            key = engine
            unmatched += node is e
        ops[(*key, 'bwd', e.name)] += e.self_cpu_time_total / 1e3
        if node is e:
            ms = e.time_range.elapsed_us() / 1e3
            node_ms += ms
            bwd[key] += ms
    bwd[engine] += backward_ms - node_ms
    return dict(
        fwd=dict(fwd),
        bwd=dict(bwd),
        ops=dict(ops),
        forward_ms=forward_ms,
        backward_ms=backward_ms,
        unmatched_nodes=unmatched,
    )


def group_macs(model: nn.Module, inputs: torch.Tensor, grouping: Grouping) -> tuple[dict[tuple, int], int]:
    """MACs of one forward pass per ``(stage, kind, group)``, and in all.

    Each module's own MACs (its count minus its children's) per op type are grouped as its
    ops' times are. The fused deformable operator is counted by flops.py as ``einsum`` (q.k,
    attn.v) plus 4 ``grid_sampler`` MACs per logit (the bias read); the ``D`` block's own
    ``grid_sampler`` MACs are both that and the key sampling, so the bias part (``einsum`` x 2
    / head dim) is moved to ``attn core``.
    """
    was_training = model.training
    model.eval()  # not chained: mmdet's SwinTransformer.train returns None
    complexity = analyze_complexity(model, inputs[:1], 'paper')
    model.train(was_training)
    if complexity.suspicious_ops:
        raise RuntimeError(f'uncounted ops that look like products: {dict(complexity.suspicious_ops)}')
    per_module = complexity.by_module_and_operator
    modules = dict(model.named_modules())
    macs: dict[tuple, int] = defaultdict(int)
    for path, module in modules.items():
        own = dict(per_module.get(path, {}))
        for child, _ in module.named_children():
            for op, n in per_module.get(f'{path}.{child}' if path else child, {}).items():
                own[op] = own.get(op, 0) - n
        if type(module).__name__ == 'DeformableAttention' and own.get('einsum'):
            head_dim = module.proj_q.out_channels // module.num_heads
            bias = own['einsum'] * 2 // head_dim
            own['grid_sampler'] -= bias
            macs[grouping.classify(path, 'einsum')] += bias
        for op, n in own.items():
            if n:
                macs[grouping.classify(path, op)] += n * inputs.shape[0]
    return dict(macs), complexity.flops * inputs.shape[0]


class ModelProfile:
    """A model, its input, its MACs per group and the measurements of its steps.

    Args:
        name (str): What the tables call it (a model spec).
        model (nn.Module): A DAT or mmdet ``SwinTransformer`` (see :class:`Grouping`).
        run (callable): ``run(inputs)`` returns the outputs (``benchmarking.build_model``'s).
        inputs (Tensor): The ``(B, 3, H, W)`` input.
        source (str): What the model is (``benchmarking.build_model``'s ``model_source``).
    """

    def __init__(self, name: str, model: nn.Module, run: Any, inputs: torch.Tensor, source: str):
        self.spec = name
        self.model, self.run, self.inputs, self.source = model, run, inputs, source
        self.grouping = Grouping(model)
        self.macs, self.total_macs = group_macs(model, inputs, self.grouping)
        model.train(True)
        self.plain: list[float] = []
        self.profiled: list[dict[str, Any]] = []

    @classmethod
    def from_spec(cls, spec: str, width: int, height: int, batch: int) -> ModelProfile:
        """The model and seeded input of a ``benchmark.py`` model spec, as ``benchmark.py`` builds them."""
        model, run, source, inputs = benchmarking.seeded_model_and_input(spec, width, height, batch)
        return cls(spec, model, run, inputs, source)

    def plain_step(self) -> float:
        """One step without profiler and hooks; returns its seconds."""
        forward, backward = train_step(self.model, self.run, self.inputs)
        return forward + backward

    def profiled_step(self) -> dict[str, Any]:
        """One step under the profiler; returns :func:`attribute`'s result and its wall seconds."""
        with module_scopes(self.model), profile(activities=[ProfilerActivity.CPU]) as prof:
            forward, backward = train_step(self.model, self.run, self.inputs)
        result = attribute(prof.events(), self.grouping)
        result['step_s'] = forward + backward
        return result

    def summary(self) -> dict[str, Any]:
        """Medians over the rounds: per group forward and backward ms and MACs; per op (at least
        :data:`MIN_OP_MS`) self ms; the step's times."""
        keys = sorted({k for r in self.profiled for phase in ('fwd', 'bwd') for k in r[phase]} | set(self.macs))
        groups = []
        for key in keys:
            fwd = statistics.median(r['fwd'].get(key, 0.0) for r in self.profiled)
            bwd = statistics.median(r['bwd'].get(key, 0.0) for r in self.profiled)
            stage, kind, group = key
            groups.append(dict(stage=stage, kind=kind, group=group, fwd_ms=fwd, bwd_ms=bwd, macs=self.macs.get(key, 0)))
        ops = {}
        for key in sorted({k for r in self.profiled for k in r['ops']}):
            self_ms = statistics.median(r['ops'].get(key, 0.0) for r in self.profiled)
            if self_ms >= MIN_OP_MS:
                ops[OP_KEY_SEPARATOR.join(key)] = round(self_ms, 2)
        return dict(
            model=self.spec,
            model_source=self.source,
            total_macs=self.total_macs,
            plain_step_ms=statistics.median(self.plain) * 1e3,
            profiled_step_ms=statistics.median(r['step_s'] for r in self.profiled) * 1e3,
            profiled_forward_ms=statistics.median(r['forward_ms'] for r in self.profiled),
            profiled_backward_ms=statistics.median(r['backward_ms'] for r in self.profiled),
            unmatched_nodes=max(r['unmatched_nodes'] for r in self.profiled),
            rounds=dict(
                plain_step_ms=[t * 1e3 for t in self.plain],
                profiled_step_ms=[r['step_s'] * 1e3 for r in self.profiled],
            ),
            groups=groups,
            ops=ops,
        )


def _sum_by(groups: Sequence[dict[str, Any]], key: Any) -> dict[Any, dict[str, float]]:
    sums: dict[Any, dict[str, float]] = defaultdict(lambda: dict(fwd_ms=0.0, bwd_ms=0.0, macs=0))
    for g in groups:
        s = sums[key(g)]
        for field in ('fwd_ms', 'bwd_ms', 'macs'):
            s[field] += g[field]
    return sums


def _order(key: tuple, fields: Sequence[str]) -> tuple:
    """Rows in the order stem, stages 0-3, the rest; kinds N, D, W; groups as in GROUPS."""
    ranks = dict(
        stage=lambda v: {'stem': -1, '-': 9}.get(v, int(v) if v.isdigit() else 8),
        kind=lambda v: 'NDW-'.find(v) % 4,
        group=lambda v: GROUPS.index(v) if v in GROUPS else len(GROUPS),
    )
    return tuple((ranks[f](v), v) for f, v in zip(fields, key, strict=True))


def _total_ms(value: dict[str, float] | None) -> float:
    return value['fwd_ms'] + value['bwd_ms'] if value else 0.0


def _cell(value: dict[str, float] | None, step_ms: float) -> list[str]:
    if value is None:
        return ['', '', '', '', '']
    total = value['fwd_ms'] + value['bwd_ms']
    gmacs = value['macs'] / 1e9
    per = f'{total / gmacs:.0f}' if value['macs'] else ''
    return [f'{value["fwd_ms"]:.0f}', f'{value["bwd_ms"]:.0f}', f'{100 * total / step_ms:.1f}', f'{gmacs:.2f}', per]


def format_table(summaries: Sequence[dict[str, Any]], by: str) -> str:
    """Markdown table of the models side by side, the groups summed ``by`` ``'group'``,
    ``'stage+group'`` or ``'stage+kind+group'``; ms are medians, % of the model's profiled step;
    the last column is each later model's fwd+bwd ms minus the first's.
    """
    fields = TABLE_FIELDS[by]
    sums = [_sum_by(s['groups'], lambda g: tuple(g[f] for f in fields)) for s in summaries]
    keys = sorted(set().union(*sums), key=lambda k: _order(k, fields))
    names = [s['model'] for s in summaries]
    header = [*fields]
    for name in names:
        header += [f'{name} fwd ms', 'bwd ms', '% step', 'GMACs', 'ms/GMAC']
    header += [f'{n} - {names[0]} ms' for n in names[1:]]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for key in keys:
        row = list(key)
        for s, summary in zip(sums, summaries, strict=True):
            row += _cell(s.get(key), summary['profiled_step_ms'])
        first = _total_ms(sums[0].get(key))
        row += [f'{_total_ms(s.get(key)) - first:+.0f}' for s in sums[1:]]
        lines.append('| ' + ' | '.join(row) + ' |')
    total = ['**step**'] + [''] * (len(fields) - 1)
    for summary in summaries:
        total += [
            f'{summary["profiled_forward_ms"]:.0f}',
            f'{summary["profiled_backward_ms"]:.0f}',
            '100',
            f'{summary["total_macs"] / 1e9:.2f}',
            f'{summary["profiled_step_ms"] / (summary["total_macs"] / 1e9):.0f}',
        ]
    total += [f'{s["profiled_step_ms"] - summaries[0]["profiled_step_ms"]:+.0f}' for s in summaries[1:]]
    lines.append('| ' + ' | '.join(total) + ' |')
    return '\n'.join(lines)


def format_top_ops(summary: dict[str, Any], count: int = 15) -> str:
    """The ``count`` largest ops of a model by self time, summed over the stages: which kernels
    a group's time is (median ms over the rounds, and % of the profiled step)."""
    sums: dict[tuple, float] = defaultdict(float)
    for key, self_ms in summary['ops'].items():
        _, kind, group, phase, op = key.split(OP_KEY_SEPARATOR)
        sums[(kind, group, phase, op)] += self_ms
    lines = [f'| {summary["model"]}: kind | group | phase | op | self ms | % step |', '|---|---|---|---|---|---|']
    for key, ms in sorted(sums.items(), key=lambda item: -item[1])[:count]:
        lines.append('| ' + ' | '.join(key) + f' | {ms:.0f} | {100 * ms / summary["profiled_step_ms"]:.1f} |')
    return '\n'.join(lines)


def format_steps(summaries: Sequence[dict[str, Any]]) -> str:
    """The steps' medians with and without the profiler, and the ratio to the first model."""
    lines = []
    for s in summaries:
        base = summaries[0]
        lines.append(
            f'{s["model"]} ({s["model_source"]}): step {s["plain_step_ms"]:.0f} ms without the profiler, '
            f'{s["profiled_step_ms"]:.0f} ms with it (overhead x{s["profiled_step_ms"] / s["plain_step_ms"]:.2f}); '
            f'{s["total_macs"] / 1e9:.2f} GMACs; time / first {s["plain_step_ms"] / base["plain_step_ms"]:.2f} '
            f'(profiled {s["profiled_step_ms"] / base["profiled_step_ms"]:.2f}), MACs / first '
            f'{s["total_macs"] / base["total_macs"]:.2f}'
        )
    return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Forward and backward time of a training step per module group, against the groups' MACs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        '--models', nargs='+', default=['swin-t', 'datpp-t:fast'], help="benchmark.py's specs: ARCH[:IMPL], swin-t"
    )
    parser.add_argument('--inputs', nargs='+', default=['512x832@1'], help='S@B or WxH@B')
    parser.add_argument('--warmup', type=int, default=1, help='rounds without profiler before the measured ones')
    parser.add_argument('--repeats', type=int, default=3, help='measured rounds (a plain and a profiled step each)')
    parser.add_argument('--threads', type=int, default=1, help='CPU threads (1: ops do not overlap)')
    parser.add_argument('--json', help='write the machine, the arguments and every round to this file')
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.repeats < 1:
        parser.error(f'--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}')
    try:
        for spec in args.models:
            name, _, checkpointing = benchmarking.parse_model_spec(spec)
            if name.endswith('.py') or checkpointing:
                parser.error(f'{spec!r}: profile_layers takes backbones without activation checkpointing')
        args.parsed_inputs = [benchmarking.parse_input_spec(s) for s in args.inputs]
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = benchmarking.machine_description('cpu', args.threads)
    print(f'Machine: {json.dumps(machine)}', flush=True)
    results = []
    for width, height, batch in args.parsed_inputs:
        label = f'{width}x{height}@{batch}'
        profiles = []
        for spec in args.models:
            t0 = time.perf_counter()
            profiles.append(ModelProfile.from_spec(spec, width, height, batch))
            print(f'[{label}] built {spec} and counted its MACs in {time.perf_counter() - t0:.0f} s', flush=True)
        for i in range(args.warmup + args.repeats):
            timed = i >= args.warmup
            done = []
            for p in profiles:
                seconds = p.plain_step()
                if timed:
                    p.plain.append(seconds)
                    result = p.profiled_step()
                    p.profiled.append(result)
                    done.append(f'{p.spec} {seconds * 1e3:.0f} ms (profiled {result["step_s"] * 1e3:.0f} ms)')
                else:
                    done.append(f'{p.spec} {seconds * 1e3:.0f} ms')
            kind = f'round {i - args.warmup + 1}/{args.repeats}' if timed else f'warm-up {i + 1}/{args.warmup}'
            print(f'[{label}] {kind}: ' + ', '.join(done), flush=True)
        summaries = [p.summary() for p in profiles]
        del profiles
        results.append(dict(input=label, models=summaries))
        print(f'\n[{label}] ' + format_steps(summaries))
        for by in ('group', 'stage+group'):
            print(f'\n{format_table(summaries, by)}', flush=True)
        for summary in summaries:
            print(f'\n{format_table([summary], "stage+kind+group")}', flush=True)
            print(f'\n{format_top_ops(summary)}', flush=True)
        if args.json:
            _write_json(args.json, machine, args, results)
    machine['load_average_end'] = list(os.getloadavg())
    if args.json:
        _write_json(args.json, machine, args, results)
    return results


def _write_json(path: str, machine: dict[str, Any], args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    """Write the results so far, whole or not at all (a temporary file renamed over ``path``)."""
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(dict(machine=machine, args=vars(args), results=results), f, indent=2)
    os.replace(tmp, path)


if __name__ == '__main__':
    main()
