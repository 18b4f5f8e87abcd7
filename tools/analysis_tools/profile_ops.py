"""Where a model's step spends its device time, op by op, on CPU or CUDA.

For each model spec (``benchmark.py``'s: ``datpp-t:fast``, ``datpp-t:reference``, ``swin-t``,
...), input and mode (``fwd``: eval, no grad; ``fwd+bwd``: train, the loss and backward of
``benchmark.py``), the model is built and seeded as ``benchmark.py`` builds it, warmed up, timed
for ``--steps`` plain steps (wall time, CUDA synchronised), then run ``--steps`` more times under
``torch.profiler``. It reports per step:

- ``wall_ms``: the median plain step;
- ``device_busy_ms`` and ``kernels``: the summed time and the number of the device's kernels (and
  memory copies and fills) of a profiled step; busy time far below the wall time means the step
  waits on the host (kernel launches, Python, synchronisations), not on the GPU;
- ``ops``: the operators (``aten::*``, ``dat::*``) by the device time of the kernels they launch
  themselves (on CPU: their own CPU time);
- ``modules``: the forward pass by module class, inclusive of the modules inside (on CUDA the
  kernels launched inside the module's forward, not its span on the GPU's timeline, which
  includes the GPU's idle gaps);
- ``backward``: the backward pass by autograd node, inclusive of what the node runs.

Unlike ``profile_layers.py`` (CPU, per stage and block kind, against MACs), this works on any
device and attributes nothing beyond the profiler's own events.

Example (the GPU run of ``docs/benchmarks.md``)::

    python tools/analysis_tools/profile_ops.py --models datpp-t:fast datpp-t:reference swin-t \\
        --inputs 1344x800@1 --modes fwd fwd+bwd --device cuda --json profile.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from projects.dat import benchmarking

BACKWARD_PREFIX = 'autograd::engine::evaluate_function: '
MODULE_PREFIX = 'module::'


@contextlib.contextmanager
def module_scopes(model: torch.nn.Module):
    """Open a ``record_function`` scope named after its class around every module's forward."""
    open_scopes: dict[int, list] = defaultdict(list)

    def enter(module, args):
        scope = record_function(MODULE_PREFIX + type(module).__name__)
        scope.__enter__()
        open_scopes[id(module)].append(scope)

    def leave(module, args, output):
        open_scopes[id(module)].pop().__exit__(None, None, None)

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def device_time_us(event: Any, self_only: bool) -> float:
    """An event's device time in microseconds (torch < 2.4 names it CUDA time)."""
    prefix = 'self_' if self_only else ''
    for name in (f'{prefix}device_time_total', f'{prefix}cuda_time_total'):
        if hasattr(event, name):
            return getattr(event, name)
    return 0.0


class Step:
    """One step of a model as ``benchmark.py`` times it.

    Args:
        spec (str): The model spec.
        width (int): Input width.
        height (int): Input height.
        batch (int): Batch size.
        mode (str): ``fwd`` or ``fwd+bwd``.
        device (str): ``cpu`` or ``cuda``.
        amp (bool): Autocast (fp16 on CUDA, bf16 on CPU).
    """

    def __init__(self, spec: str, width: int, height: int, batch: int, mode: str, device: str, amp: bool):
        self.device = torch.device(device)
        self.model, self.run, self.source, self.inputs = benchmarking.seeded_model_and_input(
            spec, width, height, batch, device
        )
        self.backward = mode == 'fwd+bwd'
        self.model.train(self.backward)
        self.amp = amp

    def __call__(self) -> float:
        t0 = time.perf_counter()
        benchmarking.run_step(self.model, self.run, self.inputs, self.backward, self.amp)
        return time.perf_counter() - t0


def rows(averages: Any, keep: Any, on_device: bool, self_only: bool, steps: int, top: int) -> list[dict[str, Any]]:
    """The ``top`` host-side averaged events that ``keep`` accepts, by time per step (device,
    else CPU). A ``record_function`` scope also has a GPU-side twin of the same name (its span
    on the device's timeline), left out."""
    out = []
    for event in averages:
        if event.device_type != DeviceType.CPU or not keep(event.key):
            continue
        if on_device:
            us = device_time_us(event, self_only)
        else:
            us = event.self_cpu_time_total if self_only else event.cpu_time_total
        out.append(dict(name=event.key, ms=round(us / 1e3 / steps, 3), calls=round(event.count / steps, 1)))
    out.sort(key=lambda row: -row['ms'])
    return out[:top]


def profile_case(step: Step, warmup: int, steps: int, top: int) -> dict[str, Any]:
    """Warm up, time plain steps, then profile as many; the figures are per step."""
    for _ in range(warmup):
        step()
    wall = [step() for _ in range(steps)]
    on_device = step.device.type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with module_scopes(step.model), profile(activities=activities) as prof:
        profiled = [step() for _ in range(steps)]
    # GPU-side spans of record_function scopes are device events too (torch < 2.4 has no flag).
    kernels = [
        e for e in prof.events() if e.device_type != DeviceType.CPU and not getattr(e, 'is_user_annotation', False)
    ]
    averages = prof.key_averages()
    is_op = lambda key: key.startswith(('aten::', 'dat::'))  # noqa: E731
    return dict(
        wall_ms=round(statistics.median(wall) * 1e3, 2),
        profiled_wall_ms=round(statistics.median(profiled) * 1e3, 2),
        device_busy_ms=round(sum(e.device_time for e in kernels) / 1e3 / steps, 2) if on_device else None,
        kernels=round(len(kernels) / steps, 1) if on_device else None,
        ops=rows(averages, is_op, on_device, True, steps, top),
        modules=rows(averages, lambda key: key.startswith(MODULE_PREFIX), on_device, False, steps, top),
        backward=rows(averages, lambda key: key.startswith(BACKWARD_PREFIX), on_device, False, steps, top),
    )


def format_case(case: dict[str, Any]) -> str:
    unit = 'device' if case['device_busy_ms'] is not None else 'CPU'
    lines = [
        f'== {case["model"]} {case["input"]} {case["mode"]} {"amp" if case["amp"] else "fp32"} ({case["source"]})',
        f'wall {case["wall_ms"]} ms/step (profiled {case["profiled_wall_ms"]}), '
        f'device busy {case["device_busy_ms"]} ms, {case["kernels"]} kernels',
    ]
    for table in ('ops', 'modules', 'backward'):
        lines.append(f'  {table} ({unit} ms per step, calls per step):')
        for row in case[table]:
            name = row['name'].removeprefix(BACKWARD_PREFIX)
            lines.append(f'    {row["ms"]:10.3f}  {row["calls"]:8.1f}  {name}')
    return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['datpp-t:fast'], help="benchmark.py's model specs")
    parser.add_argument('--inputs', nargs='+', default=['1344x800@1'], help='S@B or WxH@B')
    parser.add_argument('--modes', nargs='+', choices=('fwd', 'fwd+bwd'), default=['fwd', 'fwd+bwd'])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true', help='autocast: fp16 on CUDA, bf16 on CPU')
    parser.add_argument('--warmup', type=int, default=3, help='steps before the timed ones')
    parser.add_argument('--steps', type=int, default=3, help='timed steps, then as many profiled ones')
    parser.add_argument('--top', type=int, default=25, help='rows per table')
    parser.add_argument('--threads', type=int, help="CPU threads (default: torch's)")
    parser.add_argument('--json', help='write the machine, the arguments and every case to this file')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = benchmarking.machine_description(args.device, torch.get_num_threads())
    print(f'Machine: {json.dumps(machine)}', flush=True)
    cases = []
    for spec in args.models:
        for text in args.inputs:
            width, height, batch = benchmarking.parse_input_spec(text)
            for mode in args.modes:
                print(f'{spec} {text} {mode} ...', flush=True)
                step = Step(spec, width, height, batch, mode, args.device, args.amp)
                case = dict(model=spec, input=text, mode=mode, amp=args.amp, source=step.source)
                case.update(profile_case(step, args.warmup, args.steps, args.top))
                del step
                if args.device == 'cuda':
                    torch.cuda.empty_cache()
                print(format_case(case), flush=True)
                cases.append(case)
                if args.json:
                    with open(args.json, 'w') as f:
                        json.dump(dict(machine=machine, args=vars(args), cases=cases), f, indent=1)
    return cases


if __name__ == '__main__':
    main()
