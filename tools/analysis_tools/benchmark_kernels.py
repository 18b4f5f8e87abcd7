"""Time a DAT backbone's attention operators alone, backend by backend, at the arguments the
backbone gives them; on a GPU, also the Triton kernels' block sizes.

A DAT++ forward pass calls ``dat::deformable_attention`` once per ``D`` block and
``dat::neighborhood_attention`` once per ``N`` block. This tool runs one forward pass of the
backbone (train mode, with gradients, as a training step runs it) at ``--input`` and records
those calls' arguments, one call per distinct set of shapes (the blocks of a stage share theirs)
with the number of calls that share it. Then it times each recorded call alone with each of
``--backends`` (the operators' ``pytorch``, ``cpu-kernel`` and ``gpu-kernel`` backends), forward
(no gradients) and forward+backward (the gradients of every input that has one, from a fixed
random output gradient), medians of ``--repeats`` after ``--warmup`` (CUDA synchronised), and
compares each backend's output and gradients with those of the first backend.

``--tune`` also times the GPU kernels at the block sizes of :data:`TUNING` (after every call has
run at the launchers' own, so that a run stopped early keeps the comparison of the backends).
Each setting replaces constants of :mod:`projects.dat.ops.gpu_kernels` in this process for its
measurements and restores them after. ``--time-limit-s`` stops starting measurements after that
time (the JSON's ``not_measured`` counts what was left).

Reports per call and setting the milliseconds and the differences of the output and of each
gradient from the first backend's (relative to their magnitudes: :data:`AGREEMENT`), and per
operator and setting the time of one forward pass and of one training step (each call's time
times its count), and per operator the fastest setting of each backend that agrees with the first
(:func:`fastest_settings`). The JSON (``--json``) is rewritten after every measurement; a setting
that fails (an error or a kernel that does not compile) is recorded with its error, and the run
goes on.

Example (``tools/gpu_check.py``'s ``kernels`` step)::

    DAT_GPU_KERNELS=1 python tools/analysis_tools/benchmark_kernels.py --arch datpp-t \\
        --input 1344x800@1 --device cuda --backends pytorch gpu-kernel --tune --json kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from projects.dat import benchmarking
from projects.dat.ops import BACKENDS, gpu_kernels

# The recorded operators (their overload packets' names) and what the tool calls them.
OPS = {'dat.deformable_attention': 'deformable', 'dat.neighborhood_attention': 'neighborhood'}
# The operators' tensor arguments, in order (the tensors whose gradients are compared).
ARG_NAMES = {
    'deformable': ('q', 'k', 'v', 'pos', 'query_y', 'query_x', 'table'),
    'neighborhood': ('q', 'k', 'v', 'rpb'),
}
# Arguments without a gradient: the deformable op's query coordinates (a fixed grid).
NO_GRADIENT = {'deformable': ('query_y', 'query_x')}
# A backend agrees with the first where no output or gradient differs by more than AGREEMENT times
# the larger of that tensor's largest magnitude (in the first backend's result) and FLOOR times the
# largest magnitude of all of them: some gradients are zero in exact arithmetic (with one key, all
# but v's), and what they hold is the round-off of terms that cancel, at the scale of the others.
AGREEMENT = 1e-4
FLOOR = 1e-2
# Block sizes and warps of the GPU kernels that --tune times besides the launchers' own
# (gpu_kernels' constants they replace). With 32 channels per head and float32 none spills
# registers on sm_90 (Triton 3 and its ptxas, compiled without a GPU, as tests/test_gpu_kernels.py
# does); larger blocks do.
TUNING = {
    'deformable': (
        dict(KERNEL_BLOCKS=dict(forward=(32, 32), backward_keys=(32, 32), backward_queries=(32, 64))),
        dict(KERNEL_BLOCKS=dict(forward=(16, 64), backward_keys=(16, 32), backward_queries=(16, 64))),
        dict(KERNEL_BLOCKS=dict(forward=(16, 32), backward_keys=(16, 32), backward_queries=(16, 32)), NUM_WARPS=4),
    ),
    'neighborhood': (
        dict(NEIGHBORHOOD_TILE=(4, 8)),
        dict(NEIGHBORHOOD_TILE=(4, 16)),
        dict(NEIGHBORHOOD_TILE=(8, 16), NEIGHBORHOOD_NUM_WARPS=8),
    ),
}


@dataclass
class Call:
    """One recorded operator call: its positional arguments (tensors detached, the backend last)
    and how many calls of one forward pass have its shapes."""

    op: str
    args: list[Any]
    count: int = 1

    def describe(self) -> str:
        q, k = self.args[0], self.args[1]
        return f'{self.op} q {tuple(q.shape)} k {tuple(k.shape)}'

    def summary(self) -> dict[str, Any]:
        q, k = self.args[0], self.args[1]
        return dict(op=self.op, count=self.count, q=list(q.shape), q_stride=list(q.stride()), k=list(k.shape))


def _signature(op: str, args: Sequence[Any]) -> tuple:
    """What makes two calls the same measurement: the operator, its tensors' shapes, strides and
    dtypes and its other arguments, the backend aside."""
    return (op,) + tuple((tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args[:-1])


class _Recorder(TorchDispatchMode):
    """Records the calls of :data:`OPS` that pass through it, one per signature."""

    def __init__(self):
        super().__init__()
        self.calls: dict[tuple, Call] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = OPS.get(str(func.overloadpacket))
        if op is not None:
            key = _signature(op, args)
            if key in self.calls:
                self.calls[key].count += 1
            else:
                self.calls[key] = Call(op, [a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        return func(*args, **(kwargs or {}))


def record_calls(arch: str, width: int, height: int, batch: int, device: str) -> list[Call]:
    """The attention calls of one forward pass of the ``arch`` backbone (seeded weights and input,
    as ``benchmark.py`` builds them), in the order of their first call.

    Args:
        arch (str): A ``DAT.arch_zoo`` name.
        width (int): Input width.
        height (int): Input height.
        batch (int): Images per batch.
        device (str): Where the backbone runs.
    """
    model, run, _, inputs = benchmarking.seeded_model_and_input(arch, width, height, batch, device)
    model.train()
    with _Recorder() as recorder:
        run(inputs)
    return list(recorder.calls.values())


def _operator(op: str):
    return getattr(torch.ops.dat, f'{op}_attention').default


def _inputs(call: Call, backend: str, with_grad: bool) -> tuple[list[Any], list[torch.Tensor]]:
    """The call's arguments for ``backend`` and the tensors to differentiate: every floating-point
    tensor but :data:`NO_GRADIENT`'s, as leaves of their own (the neighbourhood op's q, k and v
    stay views of one buffer)."""
    args, leaves = list(call.args[:-1]), []
    if with_grad:
        for i, name in enumerate(ARG_NAMES[call.op]):
            if args[i].is_floating_point() and name not in NO_GRADIENT.get(call.op, ()):
                args[i] = args[i].detach().requires_grad_()
                leaves.append(args[i])
    return args + [backend], leaves


def result_names(op: str) -> list[str]:
    """The names of what :func:`measure` returns: the output, then the inputs' gradients."""
    return ['out'] + [f'grad_{n}' for n in ARG_NAMES[op] if n not in NO_GRADIENT.get(op, ())]


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(call: Call, backend: str, warmup: int, repeats: int) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Times one call with one backend, forward and forward+backward.

    Returns:
        tuple: ``{'fwd_ms': ..., 'fwd_bwd_ms': ...}`` and the output followed by the gradients of
        the last forward+backward run (:func:`result_names`).
    """
    op = _operator(call.op)
    device = call.args[0].device
    args, _ = _inputs(call, backend, with_grad=False)

    def forward():
        with torch.no_grad():
            op(*args)

    grad_args, leaves = _inputs(call, backend, with_grad=True)
    # An untimed call: it gives the output gradient's shape, and a kernel's compilation (Triton
    # compiles at the first launch) stays out of the timed calls even without --warmup.
    with torch.no_grad():
        out = op(*args)[0]
    generator = torch.Generator(device=device).manual_seed(0)
    grad_out = torch.randn(out.shape, generator=generator, device=device, dtype=out.dtype)
    results: list[torch.Tensor] = []

    def forward_backward():
        out = op(*grad_args)[0]
        results[:] = [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]

    times = dict(
        fwd_ms=_median_ms(forward, device, warmup, repeats),
        fwd_bwd_ms=_median_ms(forward_backward, device, warmup, repeats),
    )
    return times, results


def differences(results: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> list[float]:
    """Per pair of corresponding tensors, their largest absolute difference relative to the larger
    of the reference tensor's largest magnitude and :data:`FLOOR` times that of all reference
    tensors (see :data:`AGREEMENT`)."""
    magnitudes = [b.abs().max().item() for b in reference]
    floor = FLOOR * max(magnitudes, default=0.0)
    return [
        (a.float() - b.float()).abs().max().item() / (max(m, floor) or 1.0)
        for a, b, m in zip(results, reference, magnitudes, strict=True)
    ]


class Setting:
    """Replaces constants of :mod:`projects.dat.ops.gpu_kernels` while it is entered.

    Args:
        constants (dict): Names and values, e.g. ``{'NEIGHBORHOOD_TILE': (4, 8)}``; empty for the
            launchers' own.
    """

    def __init__(self, constants: dict[str, Any]):
        unknown = [name for name in constants if not hasattr(gpu_kernels, name)]
        if unknown:
            raise ValueError(f'Expected constants of projects.dat.ops.gpu_kernels, got {unknown}')
        self.constants = constants
        self.saved: dict[str, Any] = {}

    def __enter__(self):
        self.saved = {name: getattr(gpu_kernels, name) for name in self.constants}
        for name, value in self.constants.items():
            setattr(gpu_kernels, name, value)
        return self

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            setattr(gpu_kernels, name, value)

    def label(self) -> str:
        return ' '.join(f'{name}={value}' for name, value in self.constants.items()) or 'default'


class Report:
    """Everything measured so far, written as JSON after every measurement.

    Args:
        path (str, optional): The JSON file; None writes nothing.
        meta (dict): What else the JSON holds (the machine, the arguments).
        calls (Sequence[Call]): The measured calls (rows name them by index).
    """

    def __init__(self, path: str | None, meta: dict[str, Any], calls: Sequence[Call]):
        self.path = path
        self.meta = meta
        self.calls = [call.summary() for call in calls]
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.write()

    def totals(self) -> list[dict[str, Any]]:
        """Per operator, backend and setting: one forward pass and one training step, where every
        call of the operator was measured."""
        calls_per_op: dict[str, int] = {}
        for c in self.calls:
            calls_per_op[c['op']] = calls_per_op.get(c['op'], 0) + 1
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for row in self.rows:
            if 'error' not in row:
                groups.setdefault((row['op'], row['backend'], row['setting']), []).append(row)
        totals = []
        for (op, backend, setting), rows in groups.items():
            if len(rows) < calls_per_op[op]:
                continue
            counts = [self.calls[r['call']]['count'] for r in rows]
            totals.append(
                dict(
                    op=op,
                    backend=backend,
                    setting=setting,
                    fwd_ms=round(sum(n * r['fwd_ms'] for n, r in zip(counts, rows, strict=True)), 3),
                    fwd_bwd_ms=round(sum(n * r['fwd_bwd_ms'] for n, r in zip(counts, rows, strict=True)), 3),
                    largest_difference=max(r.get('largest_difference', 0.0) for r in rows),
                )
            )
        return totals

    def write(self) -> None:
        """Rewrite the JSON file whole (a reader never sees half of it, also when this process is
        killed while writing)."""
        if self.path:
            tmp = f'{self.path}.tmp'
            with open(tmp, 'w') as f:
                totals = self.totals()
                report = dict(self.meta, calls=self.calls, rows=self.rows, totals=totals)
                json.dump(dict(report, fastest=fastest_settings(totals)), f, indent=1)
            os.replace(tmp, self.path)


def fastest_settings(totals: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per operator and backend after the first: the setting with the shortest training step among
    those that agree with the first backend in every call, with its times over the first
    backend's (what decides the backend and its block sizes).

    Args:
        totals (Sequence[dict]): :meth:`Report.totals`, the first backend's first per operator.
    """
    first: dict[str, dict[str, Any]] = {}
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for t in totals:
        base = first.setdefault(t['op'], t)
        if t is base or t['largest_difference'] > AGREEMENT:
            continue
        key = (t['op'], t['backend'])
        if key not in best or t['fwd_bwd_ms'] < best[key]['fwd_bwd_ms']:
            best[key] = dict(
                op=t['op'],
                backend=t['backend'],
                setting=t['setting'],
                fwd_bwd_ms=t['fwd_bwd_ms'],
                fwd_over_first=round(t['fwd_ms'] / base['fwd_ms'], 3),
                fwd_bwd_over_first=round(t['fwd_bwd_ms'] / base['fwd_bwd_ms'], 3),
            )
    return list(best.values())


def format_totals(totals: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :meth:`Report.totals`, with each setting's time over the first
    backend's (per operator)."""
    lines = [
        '| op | backend | setting | forward ms | training step ms | / first backend (step) | largest difference |',
        '|---|---|---|---|---|---|---|',
    ]
    first: dict[str, float] = {}
    for t in totals:
        base = first.setdefault(t['op'], t['fwd_bwd_ms'])
        lines.append(
            f'| {t["op"]} | {t["backend"]} | {t["setting"]} | {t["fwd_ms"]:.2f} | {t["fwd_bwd_ms"]:.2f} | '
            f'{t["fwd_bwd_ms"] / base:.2f} | {t["largest_difference"]:.1e} |'
        )
    return '\n'.join(lines)


def measurement_plan(calls: Sequence[Call], backends: Sequence[str], tune: bool) -> list[tuple[str, Setting, int]]:
    """``(backend, setting, call index)`` in the order of measurement: every call with every backend
    at the launchers' block sizes, then (``tune``) every call with the GPU kernels at each of
    :data:`TUNING`'s settings for its operator."""
    plan = [(backend, Setting({}), index) for backend in backends for index in range(len(calls))]
    if tune:
        for op in dict.fromkeys(call.op for call in calls):
            for constants in TUNING[op]:
                plan += [('gpu-kernel', Setting(constants), i) for i, call in enumerate(calls) if call.op == op]
    return plan


def run_measurements(
    calls: Sequence[Call],
    backends: Sequence[str],
    tune: bool,
    warmup: int,
    repeats: int,
    report: Report,
    time_limit_s: float | None = None,
) -> None:
    """Measures the :func:`measurement_plan`, each result compared with the first backend's.

    Args:
        calls (Sequence[Call]): The recorded calls.
        backends (Sequence[str]): The backends, the first the reference of the comparisons.
        tune (bool): Also the GPU kernels at :data:`TUNING`'s settings.
        warmup (int): Untimed calls before the timed ones.
        repeats (int): Timed calls.
        report (Report): Where the rows go.
        time_limit_s (float, optional): Start no measurement after this many seconds; the rest is
            counted in the report's ``not_measured``.
    """
    # Per call: the first results measured (the first backend's, unless it failed) and what gave them.
    reference: dict[int, tuple[str, list[torch.Tensor]]] = {}
    plan = measurement_plan(calls, backends, tune)
    deadline = None if time_limit_s is None else time.monotonic() + time_limit_s
    for done, (backend, setting, index) in enumerate(plan):
        if deadline is not None and time.monotonic() > deadline:
            report.meta['not_measured'] = len(plan) - done
            print(f'Time limit of {time_limit_s:.0f} s: {len(plan) - done} of {len(plan)} not measured', flush=True)
            break
        call = calls[index]
        row = dict(call=index, op=call.op, backend=backend, setting=setting.label())
        try:
            with setting:
                times, results = measure(call, backend, warmup, repeats)
        except Exception as exc:  # a backend that cannot run here, a kernel that does not compile
            row['error'] = f'{type(exc).__name__}: {exc}'[:500]
            print(f'  {call.describe()}: {backend} {setting.label()}: {row["error"]}', flush=True)
            report.add(row)
            continue
        row.update({k: round(v, 3) for k, v in times.items()})
        if index in reference:
            row['compared_with'], expected = reference[index]
            diffs = differences(results, expected)
            row['differences'] = dict(zip(result_names(call.op), diffs, strict=True))
            row['largest_difference'] = max(diffs)
            row['agrees'] = row['largest_difference'] <= AGREEMENT
        else:
            reference[index] = (f'{backend} {setting.label()}', results)
        print(
            f'  {call.describe()} x{call.count}: {backend} {setting.label()}: forward {row["fwd_ms"]:.2f} ms, '
            f'forward+backward {row["fwd_bwd_ms"]:.2f} ms'
            + (f', largest difference {row["largest_difference"]:.1e}' if 'largest_difference' in row else ''),
            flush=True,
        )
        report.add(row)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='datpp-t', help='a DAT.arch_zoo name (default: datpp-t)')
    parser.add_argument('--input', default='1344x800@1', help='S@B or WxH@B (default: 1344x800@1)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument(
        '--backends',
        nargs='+',
        choices=[b for b in BACKENDS if b != 'reference'],
        help="the operators' backends, the first the others are compared with (default: pytorch and "
        'gpu-kernel on CUDA, pytorch and cpu-kernel on CPU)',
    )
    parser.add_argument('--ops', nargs='+', choices=list(OPS.values()), default=list(OPS.values()))
    parser.add_argument('--tune', action='store_true', help="also time the GPU kernels at TUNING's block sizes")
    parser.add_argument('--warmup', type=int, default=2, help='untimed calls before the timed ones')
    parser.add_argument('--repeats', type=int, default=5, help='timed calls (their median is reported)')
    parser.add_argument('--threads', type=int, help="CPU threads (default: torch's)")
    parser.add_argument(
        '--time-limit-s', type=float, help='start no measurement after this many seconds (the rest is not measured)'
    )
    parser.add_argument('--json', help='write the calls and every measurement to this file')
    args = parser.parse_args(argv)
    if args.backends is None:
        args.backends = ['pytorch', 'gpu-kernel' if args.device.startswith('cuda') else 'cpu-kernel']
    if ('gpu-kernel' in args.backends or args.tune) and not gpu_kernels.available():
        parser.error(
            f'the GPU kernels are opt-in: set {gpu_kernels.ENV_SWITCH}=1 (and have Triton 3 or newer) to time them'
        )
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    width, height, batch = benchmarking.parse_input_spec(args.input)
    machine = benchmarking.machine_description(args.device, torch.get_num_threads())
    print(f'Machine: {json.dumps(machine)}', flush=True)
    calls = [c for c in record_calls(args.arch, width, height, batch, args.device) if c.op in args.ops]
    report = Report(args.json, dict(machine=machine, args=vars(args)), calls)
    print(f'{args.arch} at {args.input}: {len(calls)} distinct attention calls', flush=True)
    run_measurements(calls, args.backends, args.tune, args.warmup, args.repeats, report, args.time_limit_s)
    report.write()
    totals = report.totals()
    print(format_totals(totals), flush=True)
    for best in fastest_settings(totals):
        ratios = f'training step {best["fwd_bwd_over_first"]:.2f}x, forward {best["fwd_over_first"]:.2f}x'
        print(f'Fastest {best["op"]} {best["backend"]}: {best["setting"]} ({ratios} the first backend)', flush=True)
    return totals


if __name__ == '__main__':
    main()
