"""Throughput, latency and peak memory of DAT backbones and whole models, side by side.

Every measurement (one model, one input, forward or forward+backward) runs in a fresh
subprocess by default, so that models measured in one run do not share allocator state and
peak memory can be read for each on its own. Models are measured one after the other for
each input and mode, so the ratios of the table come from one run on one machine state.

Model specs (``--models``):

- ``ARCH[:IMPL]``: a DAT backbone of ``DAT.arch_zoo`` (``datpp-t``, ``dat-t``, ...) with its
  four outputs and norms, and ``attn_impl`` IMPL (``auto``, ``fast`` or ``reference``;
  default ``auto``);
- ``swin-t``: mmdet's ``SwinTransformer`` with the settings of mmdet's
  ``mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py`` backbone (the usual comparison);
- ``CONFIG.py[:IMPL]``: the whole model of an mmdet / mmseg / mmpretrain config, run in
  ``mode='tensor'`` (backbone, neck and heads, without losses and post-processing); the
  backward pass starts from the sum of the means of its outputs.

Input specs (``--inputs``): ``S@B`` or ``WxH@B``, e.g. ``224@32`` or ``1344x800@1`` (width x
height, as mmdet writes image scales).

Protocol (the original DAT code's): ``--warmup`` untimed iterations (default 50), then
``--repeats`` timed ones (default 30), each timed on its own (CUDA synchronised); the table
shows the median latency per iteration and images/s = batch / median. ``--quick`` runs 2 +
5 for a small CPU. Forward runs in eval mode under ``torch.no_grad()``; forward+backward in
train mode with the gradients of all parameters.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated()`` minus the memory allocated
before the first iteration. On CPU the peak resident set size of the worker process during
the warm-up and timed iterations minus its resident size just before them (after building
the model and the input): the high-water mark is reset through ``/proc/self/clear_refs``
(Linux) and read from ``VmHWM`` in ``/proc/self/status``. This counts what the process
really holds (glibc may keep freed blocks, so it is an upper bound of the tensors alive at
the peak), in MiB.

Examples::

    python tools/analysis_tools/benchmark.py --models datpp-t:reference datpp-t:fast swin-t \\
        --inputs 224@32 1344x800@1 --modes fwd fwd+bwd --quick
    python tools/analysis_tools/benchmark.py --models datpp-t swin-t --device cuda --amp
    python tools/analysis_tools/benchmark.py --models \\
        configs/detection/mask_rcnn/mask-rcnn_datpp-t_fpn_1x_coco.py:fast --inputs 1333x800@2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import os.path as osp
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MODES = ('fwd', 'fwd+bwd')
IMPLS = ('auto', 'fast', 'reference')
RESULT_MARKER = 'BENCHMARK_RESULT '

# mmdet configs/swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py, without the pretrained init.
SWIN_T = dict(
    type='SwinTransformer',
    embed_dims=96,
    depths=[2, 2, 6, 2],
    num_heads=[3, 6, 12, 24],
    window_size=7,
    mlp_ratio=4,
    qkv_bias=True,
    qk_scale=None,
    drop_rate=0.0,
    attn_drop_rate=0.0,
    drop_path_rate=0.2,
    patch_norm=True,
    out_indices=(0, 1, 2, 3),
    with_cp=False,
    convert_weights=True,
)


@dataclass
class Job:
    """One measurement."""

    model: str
    width: int
    height: int
    batch: int
    mode: str
    device: str
    amp: bool
    warmup: int
    repeats: int
    threads: int
    compile: bool


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """``'datpp-t:fast'`` -> ``('datpp-t', 'fast')``; ``'swin-t'`` -> ``('swin-t', None)``.

    Raises:
        ValueError: For an unknown model or implementation.
    """
    from projects.dat.models.dat import DAT

    name, _, impl = spec.partition(':')
    impl = impl or None
    if impl is not None and impl not in IMPLS:
        raise ValueError(f'Unknown attention implementation {impl!r} in model spec {spec!r}; expected one of {IMPLS}')
    if name == 'swin-t':
        if impl is not None:
            raise ValueError(f'swin-t has no attention implementations to choose, got {spec!r}')
    elif name.endswith('.py'):
        if not osp.isfile(name):
            raise ValueError(f'Config file {name!r} of model spec {spec!r} does not exist')
    elif name.lower() not in DAT.arch_zoo:
        raise ValueError(
            f'Unknown model {name!r} in spec {spec!r}; expected a DAT arch '
            f'({", ".join(sorted(DAT.arch_zoo))}), swin-t or a config file (.py)'
        )
    return name, impl


def parse_input_spec(spec: str) -> tuple[int, int, int]:
    """``'224@32'`` -> ``(224, 224, 32)``; ``'1344x800@1'`` -> ``(1344, 800, 1)`` (W, H, B).

    Raises:
        ValueError: For another format or non-positive numbers.
    """
    try:
        size, _, batch = spec.partition('@')
        width, _, height = size.lower().partition('x')
        w, h, b = int(width), int(height or width), int(batch or 1)
    except ValueError:
        w = h = b = 0
    if min(w, h, b) <= 0:
        raise ValueError(f'Input spec must be S@B or WxH@B with positive ints (e.g. 224@32, 1344x800@1), got {spec!r}')
    return w, h, b


def _tensor_leaves(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensor_leaves(item)]
    return []


def build_model(spec: str, height: int, width: int) -> tuple[nn.Module, Any]:
    """The module to time and a function ``run(inputs)`` returning its output.

    Args:
        spec (str): A model spec (see the module docstring).
        height (int): Input height (whole models: the data samples' image shape).
        width (int): Input width.

    Returns:
        tuple: the model and the callable to time.
    """
    from projects.dat.models.dat import DAT

    name, impl = parse_model_spec(spec)
    if name == 'swin-t':
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules

        register_all_modules(init_default_scope=False)
        model = MODELS.build(SWIN_T)
        return model, model
    if not name.endswith('.py'):
        model = DAT(name, attn_impl=impl or 'auto')
        return model, model

    sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
    from get_flops import _data_sample, build_config_model

    model, scope, _ = build_config_model(name)
    if impl is not None:
        for module in model.modules():
            if hasattr(module, 'attn_impl'):
                module.attn_impl = impl
    if scope == 'mmseg' and getattr(model, 'auxiliary_head', None) is not None:
        model.auxiliary_head = None  # training-only head, not part of the tensor-mode graph

    def run(inputs: torch.Tensor) -> Any:
        samples = None if scope == 'mmpretrain' else [_data_sample(scope, height, width) for _ in inputs]
        return model(inputs, samples, mode='tensor')

    return model, run


def _rss_mib() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def _reset_peak_rss() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
    raise RuntimeError('VmHWM not found in /proc/self/status')


def measure(job: Job) -> dict[str, Any]:
    """Run one measurement in this process and return its numbers.

    Returns:
        dict: ``latency_ms`` (median, mean, min, max, std), ``images_per_s``,
        ``peak_mem_mib``, ``memory_method``, ``compile_s`` and ``graph_breaks`` (with
        ``--compile``), ``setup_s``.
    """
    torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, run = build_model(job.model, job.height, job.width)
    model.to(device)
    backward = job.mode == 'fwd+bwd'
    model.train(backward)
    inputs = torch.randn(job.batch, 3, job.height, job.width, device=device)
    amp_dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    compile_s = graph_breaks = None
    if job.compile:
        from torch._dynamo.utils import counters

        counters.clear()
        run = torch.compile(run)

    def step() -> None:
        with torch.set_grad_enabled(backward), torch.autocast(device.type, dtype=amp_dtype, enabled=job.amp):
            outputs = run(inputs)
        if backward:
            loss = sum(t.float().mean() for t in _tensor_leaves(outputs))
            loss.backward()
            for p in model.parameters():
                p.grad = None

    def sync() -> None:
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    gc.collect()
    setup_s = time.perf_counter() - t0
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device) / 2**20
        method = 'torch.cuda.max_memory_allocated - allocated before the first iteration'
    else:
        base_mem = _rss_mib()
        method = (
            'peak RSS (VmHWM after /proc/self/clear_refs) - RSS before the first iteration'
            if _reset_peak_rss()
            else 'ru_maxrss - RSS before the first iteration (peak could not be reset)'
        )
    if job.compile:
        t_c = time.perf_counter()
        step()
        sync()
        compile_s = time.perf_counter() - t_c
        graph_breaks = sum(counters['graph_break'].values())
    for _ in range(job.warmup):
        step()
    sync()
    times = []
    for _ in range(job.repeats):
        t_s = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t_s)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device) / 2**20 - base_mem
    elif method.startswith('peak RSS'):
        peak = _peak_rss_mib() - base_mem
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mem
    median = statistics.median(times)
    return dict(
        job=asdict(job),
        setup_s=setup_s,
        compile_s=compile_s,
        graph_breaks=graph_breaks,
        latency_ms=dict(
            median=median * 1e3,
            mean=statistics.fmean(times) * 1e3,
            min=min(times) * 1e3,
            max=max(times) * 1e3,
            std=statistics.pstdev(times) * 1e3,
        ),
        images_per_s=job.batch / median,
        peak_mem_mib=peak,
        memory_method=method,
    )


def run_isolated(job: Job, timeout: float | None) -> dict[str, Any]:
    """Run :func:`measure` in a fresh Python process and return its result."""
    cmd = [sys.executable, osp.abspath(__file__), '--worker', json.dumps(asdict(job))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')])))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = '\n'.join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    raise RuntimeError(f'benchmark worker for {job.model} failed (exit {proc.returncode}):\n{tail}')


def machine_description(device: str, threads: int) -> dict[str, Any]:
    """CPU / GPU, memory, software versions and load, for the record."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    info = dict(
        cpu=cpu,
        logical_cpus=os.cpu_count(),
        threads=threads,
        python=platform.python_version(),
        torch=torch.__version__,
        platform=platform.platform(),
    )
    try:
        with open('/proc/meminfo') as f:
            info['memory_gib'] = round(int(f.readline().split()[1]) / 2**20, 1)
        info['load_average'] = list(os.getloadavg())
    except OSError:
        pass
    if device.startswith('cuda') and torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name(torch.device(device))
    return info


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table; the ratios compare each model with the first one of the same input and mode."""
    lines = [
        '| model | input (WxH@B) | mode | latency ms (median) | min-max ms | images/s | peak MiB | '
        'time / first | memory / first |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    first: dict[tuple, dict] = {}
    for r in results:
        j = r['job']
        key = (j['width'], j['height'], j['batch'], j['mode'])
        base = first.setdefault(key, r)
        lat = r['latency_ms']
        t_ratio = lat['median'] / base['latency_ms']['median']
        m_ratio = r['peak_mem_mib'] / base['peak_mem_mib'] if base['peak_mem_mib'] > 0 else float('nan')
        lines.append(
            f'| {j["model"]} | {j["width"]}x{j["height"]}@{j["batch"]} | {j["mode"]} | {lat["median"]:.1f} | '
            f'{lat["min"]:.1f}-{lat["max"]:.1f} | {r["images_per_s"]:.2f} | {r["peak_mem_mib"]:.0f} | '
            f'{t_ratio:.2f} | {m_ratio:.2f} |'
        )
    return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Throughput, latency and peak memory of DAT and other backbones',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        '--models',
        nargs='+',
        default=['datpp-t:reference', 'datpp-t:fast', 'swin-t'],
        help='model specs: ARCH[:IMPL], swin-t or CONFIG.py[:IMPL]',
    )
    parser.add_argument('--inputs', nargs='+', default=['224@32', '1344x800@1'], help='S@B or WxH@B')
    parser.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--amp', action='store_true', help='autocast: fp16 on CUDA, bf16 on CPU')
    parser.add_argument('--warmup', type=int, default=50)
    parser.add_argument('--repeats', type=int, default=30)
    parser.add_argument('--quick', action='store_true', help='2 warm-up and 5 timed iterations')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(), help='CPU threads')
    parser.add_argument('--compile', action='store_true', help='time torch.compile(model); reports graph breaks')
    parser.add_argument('--no-isolate', action='store_true', help='measure in this process (memory less meaningful)')
    parser.add_argument('--timeout', type=float, default=None, help='seconds per measurement (isolated only)')
    parser.add_argument('--json', help='write all results and the machine description to this file')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 2, 5
    if args.warmup < 0 or args.repeats < 1:
        parser.error(f'--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f'--device {args.device} requested but CUDA is not available')
    try:
        args.parsed_models = [parse_model_spec(m) for m in args.models] if not args.worker else []
        args.parsed_inputs = [parse_input_spec(s) for s in args.inputs]
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.worker:
        result = measure(Job(**json.loads(args.worker)))
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return [result]
    jobs = [
        Job(model, w, h, b, mode, args.device, args.amp, args.warmup, args.repeats, args.threads, args.compile)
        for (w, h, b) in args.parsed_inputs
        for mode in args.modes
        for model in args.models
    ]
    machine = machine_description(args.device, args.threads)
    print(f'Machine: {json.dumps(machine)}', flush=True)
    print(f'{len(jobs)} measurements, {args.warmup} warm-up + {args.repeats} timed iterations each', flush=True)
    results = []
    for i, job in enumerate(jobs, 1):
        label = f'[{i}/{len(jobs)}] {job.model} {job.width}x{job.height}@{job.batch} {job.mode}'
        print(f'{label} ...', flush=True)
        t0 = time.perf_counter()
        result = measure(job) if args.no_isolate else run_isolated(job, args.timeout)
        results.append(result)
        extra = f', compile {result["compile_s"]:.1f} s, {result["graph_breaks"]} graph breaks' if job.compile else ''
        print(
            f'{label}: {result["latency_ms"]["median"]:.1f} ms/iter, {result["images_per_s"]:.2f} images/s, '
            f'peak {result["peak_mem_mib"]:.0f} MiB{extra} ({time.perf_counter() - t0:.0f} s)',
            flush=True,
        )
    machine['load_average_end'] = list(os.getloadavg()) if hasattr(os, 'getloadavg') else None
    print()
    print(format_table(results))
    print(f'\nPeak memory: {results[0]["memory_method"]}' if results else '')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(machine=machine, args=vars(args) | dict(parsed_models=None), results=results), f, indent=2)
    return results


if __name__ == '__main__':
    main()
