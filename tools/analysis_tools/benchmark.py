"""Throughput, latency and peak memory of DAT backbones and whole models, side by side.

Each model of a run gets its own worker process (so that models do not share allocator
state and peak memory is read for each alone). The workers warm up one after the other;
then the timed iterations alternate between them (round i times iteration i of every
model), so that a change of machine load during the run (a shared machine) affects all
models alike and the ratios of the table compare like with like. Only one worker computes
at a time.

Model specs (``--models``):

- ``ARCH[:IMPL][:cp]``: a DAT backbone of ``DAT.arch_zoo`` (``datpp-t``, ``dat-t``, ...) with
  its four outputs and norms, and ``attn_impl`` IMPL (one of ``projects.dat.ops.ATTN_IMPLS``:
  ``auto``, ``fast``, ``reference``, ``pytorch``, ``cpu-kernel``; default ``auto``;
  ``fast-pytorch`` is another name of ``pytorch``, the fast path without the C++ CPU kernels);
  ``:cp`` turns activation checkpointing on (``with_cp=True``);
- ``swin-t``: mmdet's ``SwinTransformer`` with the settings of mmdet's
  ``mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py`` backbone (the usual comparison); where mmdet cannot
  be imported (e.g. an mmcv without its compiled ops), timm's ``swin_tiny_patch4_window7_224``,
  the same architecture, with mmdet's four output norms (:class:`projects.dat.benchmarking.TimmSwinT`); each result's
  ``model_source`` says which ran;
- ``CONFIG.py[:IMPL][:cp|nocp]``: the whole model of an mmdet / mmseg / mmpretrain config,
  run in ``mode='tensor'`` (backbone, neck and heads, without losses and post-processing).
  ``:cp`` / ``:nocp`` override the config's ``model.backbone.with_cp``.

Input specs (``--inputs``): ``S@B`` or ``WxH@B``, e.g. ``224@32`` or ``1344x800@1`` (width x
height, as mmdet writes image scales).

Protocol (the original DAT code's): ``--warmup`` untimed iterations (default 50), then
``--repeats`` timed ones (default 30), each timed on its own (CUDA synchronised); the table
shows the median latency per iteration and images/s = batch / median; the JSON output keeps
every iteration's time, and is written after every group of measurements (a run stopped early
keeps what it measured). ``--quick`` runs 2 + 5 for a small CPU. Forward runs in eval mode
under ``torch.no_grad()``; forward+backward in train mode with the gradients of all parameters,
from the same loss for every spec (``projects.dat.benchmarking.training_loss``: the outputs'
means, weighted by channel).
Between timed iterations a worker keeps the memory it freed, as a training loop does, unless the
workers' peaks together come near the machine's memory (then each returns its freed memory to
the OS after its iteration, so that the idle ones hold little; the log and the JSON say which).
Returning it is not what a training loop does, and not free: the next iteration page-faults its
memory in afresh. Workers that keep it run one untimed iteration more after the warm-up (which
ends by returning memory, so that idle workers stay small while the others warm up). Kept means
what the allocator keeps: glibc by default returns every block above its mmap threshold (at
most 32 MiB) as soon as it is freed, in a training loop as here, so a model's largest tensors
are faulted in afresh every iteration. Keeping them too (``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` set above the step's peak) made CPU timings faster and steadier and
changed the models' ratios (docs/benchmarks.md, "Page faults"); the JSON's ``machine.allocator``
records such settings (and a preloaded allocator).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated()`` minus the memory allocated
before the first iteration (and, as ``peak_reserved_mib``, the peak of what PyTorch's caching
allocator held minus what it held then; its cache is emptied before each model is built). On
CPU the peak resident set size of the worker process during the warm-up and timed iterations
minus its resident size just before them (after building the model and the input): the
high-water mark is reset through ``/proc/self/clear_refs`` (Linux) and read from ``VmHWM`` in
``/proc/self/status``. This counts what the process really holds (glibc may keep freed blocks,
so it is an upper bound of the tensors alive at the peak), in MiB.

MACs: every result carries the multiply-accumulates of one forward pass of its model at its
input (``macs``, and the table's GMACs and MACs / first), counted by one counter for every model,
:func:`projects.dat.flops.analyze_complexity` with the papers' convention (convolutions, linear
layers and matrix products, norms and bilinear sampling; not softmax or element-wise ops). They
are counted once per model and input, in a process of their own before the workers start, so
that neither the timings nor the memory peaks see them (:func:`count_macs`). Every attention
implementation of a model has the same count (the fused operators are counted as the reference
operations they replace). Backbones are counted at batch 1 and the count multiplied by the batch,
which is exact (they compute each image on its own); a config's model is counted at the full
batch, on the input the workers time on CPU (its heads' work can depend on the data, e.g. the
proposals an RPN keeps). A model that cannot be counted gets no MACs and the reason (``macs_method``, and a note
under the table). The backward pass is not counted: MACs / first compares forward passes in
both modes. ``--no-macs`` skips the counts (``tools/gpu_check.sh``: they do not depend on the
device, and tracing at 1344x800 on the CPU would take much of its time budget).

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
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from projects.dat.benchmarking import (
    machine_description,
    memory_total_mib,
    parse_input_spec,
    parse_model_spec,
    run_step,
    seeded_model_and_input,
)
from projects.dat.flops import analyze_complexity

MODES = ('fwd', 'fwd+bwd')
RESULT_MARKER = 'BENCHMARK_RESULT '
# Interleaved workers keep their freed memory between iterations while their peaks together
# stay below this fraction of the machine's memory.
KEEP_MEMORY_FRACTION = 0.75


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


def mac_count_key(spec: str, width: int, height: int, batch: int) -> tuple[str, int, int, int]:
    """What a MAC count depends on: the model (without implementation or checkpointing: the
    same math), the input size, and the batch for a config (1 for a backbone, whose count is
    multiplied by the batch).

    Returns:
        tuple: ``(name, width, height, batch to count at)``.
    """
    name = parse_model_spec(spec)[0]
    return name, width, height, batch if name.endswith('.py') else 1


def count_macs(name: str, width: int, height: int, batch: int) -> dict[str, Any]:
    """Multiply-accumulates of one forward pass, by :func:`projects.dat.flops.analyze_complexity`.

    The model is built as the benchmark builds it (seeded, with its default attention
    implementation and checkpointing), in eval mode, and traced on CPU at ``batch`` (see the
    module docstring for which batch).

    Args:
        name (str): A model spec's name field: a DAT arch, ``swin-t`` or a config file.
        width (int): Input width.
        height (int): Input height.
        batch (int): The batch to count at.

    Returns:
        dict: ``macs`` (int) and ``macs_method`` (how they were counted).

    Raises:
        RuntimeError: If the model cannot be traced, or the trace met ops that look like
            products but are not counted (the count would be too low).
    """
    model, run, _, inputs = seeded_model_and_input(name, width, height, batch)
    model.eval()  # not chained: mmdet's SwinTransformer.train returns None
    complexity = analyze_complexity(model if run is model else _Forward(model, run), inputs, 'paper')
    if complexity.suspicious_ops:
        raise RuntimeError(f'uncounted ops that look like products: {dict(complexity.suspicious_ops)}')
    return dict(
        macs=complexity.flops,
        macs_method=f'projects.dat.flops, paper convention, forward pass in eval mode, counted at batch {batch}',
    )


class _Forward(nn.Module):
    """A model whose forward pass is a callable of it (a config model's tensor-mode call), to trace."""

    def __init__(self, model: nn.Module, run: Any):
        super().__init__()
        self.model = model
        self.run = run

    def forward(self, inputs: torch.Tensor) -> Any:
        return self.run(inputs)


def _count_or_reason(name: str, width: int, height: int, batch: int, threads: int) -> dict[str, Any]:
    """:func:`count_macs`, or no MACs and why not."""
    torch.set_num_threads(threads)
    try:
        return count_macs(name, width, height, batch)
    except Exception as exc:  # the tracer and the models raise many types
        first_line = (str(exc).splitlines() or [''])[0][:300]
        return dict(macs=None, macs_method=f'not counted: {type(exc).__name__}: {first_line}')


def count_all_macs(jobs: Sequence[Job], isolate: bool = True, log: Any = print) -> dict[tuple, dict[str, Any]]:
    """The MAC count of every model and input of ``jobs``, each counted once.

    Args:
        jobs (Sequence[Job]): The measurements.
        isolate (bool): Count in a process of its own per model and input (nothing of the trace
            stays in this process); else here.
        log (callable): Progress printer.

    Returns:
        dict: ``{mac_count_key: dict(macs, macs_method)}``; ``macs`` is None where the model
        could not be counted, and ``macs_method`` says why.
    """
    counts: dict[tuple, dict[str, Any]] = {}
    for job in jobs:
        key = mac_count_key(job.model, job.width, job.height, job.batch)
        if key in counts:
            continue
        t0 = time.perf_counter()
        args = dict(name=key[0], width=key[1], height=key[2], batch=key[3], threads=job.threads)
        counts[key] = _count_in_subprocess(args) if isolate else _count_or_reason(**args)
        macs = counts[key]['macs']
        summary = f'{macs / 1e9:.2f} GMACs at batch {key[3]}' if macs is not None else counts[key]['macs_method']
        log(f'  MACs of {key[0]} at {key[1]}x{key[2]}: {summary} ({time.perf_counter() - t0:.0f} s)')
    return counts


def _count_in_subprocess(args: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, osp.abspath(__file__), '--count-macs', json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    return dict(macs=None, macs_method=f'not counted: the counting process exited with {proc.returncode}: {tail}')


NOT_COUNTED = dict(macs=None, macs_method='not counted: --no-macs')


def macs_of(job: Job, counts: dict[tuple, dict[str, Any]]) -> dict[str, Any]:
    """``macs`` (None if not counted) and ``macs_method`` of a job, from :func:`count_all_macs`'s counts."""
    key = mac_count_key(job.model, job.width, job.height, job.batch)
    count = counts[key]
    if count['macs'] is None or key[3] == job.batch:
        return dict(count)
    return dict(
        macs=count['macs'] * job.batch // key[3],
        macs_method=count['macs_method'] + f', times {job.batch} (the backbone computes each image on its own)',
    )


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


def _release_memory() -> None:
    """Give freed heap memory back to the OS (glibc), so that idle workers hold little."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_rss_mib() -> float:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
    raise RuntimeError('VmHWM not found in /proc/self/status')


class Session:
    """A model, its input and the state of one measurement, in the current process.

    Args:
        job (Job): What to measure.
    """

    def __init__(self, job: Job):
        torch.set_num_threads(job.threads)
        t0 = time.perf_counter()
        self.job = job
        self.device = torch.device(job.device)
        if self.device.type == 'cuda':  # blocks cached by an earlier job of this process (--no-isolate)
            gc.collect()
            torch.cuda.empty_cache()
        self.model, run, self.model_source, self.inputs = seeded_model_and_input(
            job.model, job.width, job.height, job.batch, job.device
        )
        self.backward = job.mode == 'fwd+bwd'
        self.model.train(self.backward)
        self.compile_s = self.graph_breaks = None
        if job.compile:
            from torch._dynamo.utils import counters

            counters.clear()
            run = torch.compile(run)
        self.run = run
        self.times: list[float] = []
        # Whether freed memory goes back to the OS after every timed iteration (see keep_memory).
        self.release_memory = True
        gc.collect()
        self.setup_s = time.perf_counter() - t0
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mem = torch.cuda.memory_allocated(self.device) / 2**20
            self.base_reserved = torch.cuda.memory_reserved(self.device) / 2**20
            self.memory_method = 'torch.cuda.max_memory_allocated - allocated before the first iteration'
        else:
            self.base_mem = _rss_mib()
            self.memory_method = (
                'peak RSS (VmHWM after /proc/self/clear_refs) - RSS before the first iteration'
                if _reset_peak_rss()
                else 'ru_maxrss - RSS before the first iteration (peak could not be reset)'
            )

    def step(self) -> float:
        """Run one iteration and return its wall time in seconds (CUDA synchronised)."""
        t0 = time.perf_counter()
        run_step(self.model, self.run, self.inputs, self.backward, self.job.amp)
        return time.perf_counter() - t0

    def warmup(self) -> None:
        """The compiling iteration (with ``--compile``) and the untimed warm-up iterations."""
        if self.job.compile and self.compile_s is None:
            from torch._dynamo.utils import counters

            self.compile_s = self.step()
            self.graph_breaks = sum(counters['graph_break'].values())
        for _ in range(self.job.warmup):
            self.step()
        _release_memory()

    def timed_step(self) -> float:
        seconds = self.step()
        self.times.append(seconds)
        if self.release_memory:
            _release_memory()  # not timed
        return seconds

    def keep_memory(self) -> None:
        """Keep freed memory between timed iterations, as a training loop does: the allocator
        reuses it instead of the OS handing out (and page-faulting in) fresh pages every
        iteration. Runs one more untimed iteration: the warm-up ended by returning memory, and
        the first iteration after it would pay for that."""
        self.release_memory = False
        self.step()

    def result(self) -> dict[str, Any]:
        """Latency statistics, images/s and peak memory of the timed iterations."""
        extra = {}
        if self.device.type == 'cuda':
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base_mem
            extra['peak_reserved_mib'] = torch.cuda.max_memory_reserved(self.device) / 2**20 - self.base_reserved
        elif self.memory_method.startswith('peak RSS'):
            peak = _peak_rss_mib() - self.base_mem
        else:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.base_mem
        times = self.times
        median = statistics.median(times)
        return dict(
            job=asdict(self.job),
            model_source=self.model_source,
            setup_s=self.setup_s,
            compile_s=self.compile_s,
            graph_breaks=self.graph_breaks,
            latency_ms=dict(
                median=median * 1e3,
                mean=statistics.fmean(times) * 1e3,
                min=min(times) * 1e3,
                max=max(times) * 1e3,
                std=statistics.pstdev(times) * 1e3,
                all=[t * 1e3 for t in times],
            ),
            images_per_s=self.job.batch / median,
            peak_mem_mib=peak,
            memory_method=self.memory_method,
            memory_between_iterations='released to the OS' if self.release_memory else 'kept',
            **extra,
        )


def measure(job: Job) -> dict[str, Any]:
    """Run one measurement in this process: warm-up, then ``job.repeats`` timed iterations.

    Returns:
        dict: ``latency_ms`` (median, mean, min, max, std, all), ``images_per_s``,
        ``peak_mem_mib``, ``memory_method``, ``compile_s`` and ``graph_breaks`` (with
        ``--compile``), ``setup_s``.
    """
    session = Session(job)
    session.warmup()
    session.keep_memory()  # the only model in memory
    for _ in range(job.repeats):
        session.timed_step()
    return session.result()


def serve(job: Job) -> None:
    """Worker loop: build a :class:`Session`, then obey ``warmup`` / ``time`` / ``finish`` on stdin."""
    session = Session(job)
    print(RESULT_MARKER + json.dumps(dict(ready=True)), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == 'warmup':
            session.warmup()
            reply: dict[str, Any] = dict(ok=True, peak_rss_mib=_peak_rss_mib())
        elif command == 'keep-memory':
            session.keep_memory()
            reply = dict(ok=True)
        elif command == 'time':
            reply = dict(seconds=session.timed_step())
        elif command == 'finish':
            print(RESULT_MARKER + json.dumps(session.result()), flush=True)
            return
        else:
            raise ValueError(f'unknown worker command {command!r}')
        print(RESULT_MARKER + json.dumps(reply), flush=True)


class Worker:
    """A :func:`serve` subprocess for one job (its own allocator state and peak memory)."""

    def __init__(self, job: Job):
        import tempfile

        self.job = job
        self.stderr = tempfile.TemporaryFile(mode='w+')
        cmd = [sys.executable, osp.abspath(__file__), '--worker', json.dumps(asdict(job))]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self._read()

    def _read(self) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(RESULT_MARKER):
                return json.loads(line[len(RESULT_MARKER) :])
        self.proc.wait()
        self.stderr.seek(0)
        tail = '\n'.join(self.stderr.read().strip().splitlines()[-15:])
        raise RuntimeError(f'benchmark worker for {self.job.model} failed (exit {self.proc.returncode}):\n{tail}')

    def call(self, command: str) -> dict[str, Any]:
        self.proc.stdin.write(command + '\n')
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def measure_interleaved(jobs: list[Job], log: Any = print) -> list[dict[str, Any]]:
    """Measure several jobs in their own worker processes, alternating their timed iterations.

    Each worker warms up in turn; then round ``i`` times iteration ``i`` of every job, one
    after the other, so that a change of machine load during the run affects all of them
    alike and their ratios stay meaningful. Only one worker computes at a time. The workers
    keep their freed memory between iterations (as a training loop does) where their peak
    memories together fit in :data:`KEEP_MEMORY_FRACTION` of the machine's; otherwise each
    returns it to the OS after its iteration, so that the idle workers hold little.

    Args:
        jobs (list[Job]): Jobs with the same ``repeats``.
        log (callable): Progress printer.

    Returns:
        list[dict]: One result per job, as :func:`measure`.
    """
    workers: list[Worker] = []
    peaks: list[float] = []  # each worker's peak resident memory during its warm-up, MiB
    try:
        for job in jobs:
            log(f'  starting {job.model} (build + {job.warmup} warm-up iterations) ...')
            t0 = time.perf_counter()
            worker = Worker(job)
            workers.append(worker)
            peaks.append(worker.call('warmup')['peak_rss_mib'])
            log(f'  {job.model} ready in {time.perf_counter() - t0:.0f} s')
        total_mib = memory_total_mib()
        if total_mib is not None and sum(peaks) <= KEEP_MEMORY_FRACTION * total_mib:
            for w in workers:
                w.call('keep-memory')
            log(f'  workers keep their memory between iterations (peaks {sum(peaks) / 1024:.1f} GiB together)')
        else:
            log(
                f'  workers return freed memory to the OS after every iteration (peaks {sum(peaks) / 1024:.1f} GiB '
                "together, too close to the machine's memory to keep)"
            )
        repeats = jobs[0].repeats
        for i in range(repeats):
            timings = [f'{w.job.model} {w.call("time")["seconds"] * 1e3:.0f} ms' for w in workers]
            log(f'  round {i + 1}/{repeats}: ' + ', '.join(timings))
        return [w.call('finish') for w in workers]
    finally:
        for w in workers:
            w.close()


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table; the ratios compare each model with the first one of the same input and mode.

    Models without a MAC count show ``n/a``, and a note under the table says why.
    """
    lines = [
        '| model | input (WxH@B) | mode | GMACs | latency ms (median) | min-max ms | images/s | peak MiB | '
        'time / first | MACs / first | memory / first |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    first: dict[tuple, dict] = {}
    not_counted: dict[str, str] = {}
    for r in results:
        j = r['job']
        key = (j['width'], j['height'], j['batch'], j['mode'])
        base = first.setdefault(key, r)
        lat = r['latency_ms']
        t_ratio = lat['median'] / base['latency_ms']['median']
        m_ratio = r['peak_mem_mib'] / base['peak_mem_mib'] if base['peak_mem_mib'] > 0 else float('nan')
        macs, base_macs = r.get('macs'), base.get('macs')
        gmacs = f'{macs / 1e9:.2f}' if macs is not None else 'n/a'
        mac_ratio = f'{macs / base_macs:.2f}' if macs is not None and base_macs else 'n/a'
        if macs is None:
            not_counted[j['model']] = r.get('macs_method', 'not counted (no MAC count in these results)')
        lines.append(
            f'| {j["model"]} | {j["width"]}x{j["height"]}@{j["batch"]} | {j["mode"]} | {gmacs} | {lat["median"]:.1f} | '
            f'{lat["min"]:.1f}-{lat["max"]:.1f} | {r["images_per_s"]:.2f} | {r["peak_mem_mib"]:.0f} | '
            f'{t_ratio:.2f} | {mac_ratio} | {m_ratio:.2f} |'
        )
    lines += [f'\nMACs of {model}: {reason}' for model, reason in not_counted.items()]
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
        help='model specs: ARCH[:IMPL][:cp], swin-t or CONFIG.py[:IMPL][:cp|nocp]',
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
    parser.add_argument('--json', help='write all results and the machine description to this file')
    parser.add_argument(
        '--no-macs', action='store_true', help='do not count MACs (they depend on the input only, not on the device)'
    )
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    parser.add_argument('--count-macs', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 2, 5
    if args.warmup < 0 or args.repeats < 1:
        parser.error(f'--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error(f'--device {args.device} requested but CUDA is not available')
    try:
        internal = args.worker or args.count_macs
        args.parsed_models = [parse_model_spec(m) for m in args.models] if not internal else []
        args.parsed_inputs = [parse_input_spec(s) for s in args.inputs]
    except ValueError as exc:
        parser.error(str(exc))
    return args


def write_json(path: str, machine: dict[str, Any], args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    """Write the machine, the arguments and the results so far to ``path`` (whole or not at all:
    through a temporary file renamed over it)."""
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(dict(machine=machine, args=vars(args) | dict(parsed_models=None), results=results), f, indent=2)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.worker:
        serve(Job(**json.loads(args.worker)))
        return []
    if args.count_macs:
        print(RESULT_MARKER + json.dumps(_count_or_reason(**json.loads(args.count_macs))), flush=True)
        return []
    groups = [
        [
            Job(model, w, h, b, mode, args.device, args.amp, args.warmup, args.repeats, args.threads, args.compile)
            for model in args.models
        ]
        for (w, h, b) in args.parsed_inputs
        for mode in args.modes
    ]
    machine = machine_description(args.device, args.threads)
    print(f'Machine: {json.dumps(machine)}', flush=True)
    print(
        f'{sum(map(len, groups))} measurements in {len(groups)} groups, {args.warmup} warm-up + {args.repeats} timed '
        f'iterations each ({"in this process" if args.no_isolate else "one worker process per model, interleaved"})',
        flush=True,
    )
    if args.no_macs:
        mac_counts = None
    else:
        print('MACs of every model and input (forward pass; counted once each, before the timing):', flush=True)
        mac_counts = count_all_macs([j for group in groups for j in group], isolate=not args.no_isolate)
    results = []
    for i, group in enumerate(groups, 1):
        job = group[0]
        label = f'[{i}/{len(groups)}] {job.width}x{job.height}@{job.batch} {job.mode}'
        print(f'{label}: {", ".join(j.model for j in group)}', flush=True)
        t0 = time.perf_counter()
        if args.no_isolate:
            group_results = []
            for j in group:
                print(f'  {j.model} (build + {j.warmup} warm-up + {j.repeats} timed iterations) ...', flush=True)
                group_results.append(measure(j))
        else:
            group_results = measure_interleaved(group, log=lambda msg: print(msg, flush=True))
        for j, r in zip(group, group_results, strict=True):
            r.update(macs_of(j, mac_counts) if mac_counts is not None else NOT_COUNTED)
            extra = f', compile {r["compile_s"]:.1f} s, {r["graph_breaks"]} graph breaks' if job.compile else ''
            gmacs = 'MACs not counted' if r['macs'] is None else f'{r["macs"] / 1e9:.2f} GMACs'
            print(
                f'  {r["job"]["model"]}: {r["latency_ms"]["median"]:.1f} ms/iter (median), '
                f'{r["images_per_s"]:.2f} images/s, peak {r["peak_mem_mib"]:.0f} MiB, {gmacs}{extra}',
                flush=True,
            )
        print(f'{label}: done in {time.perf_counter() - t0:.0f} s', flush=True)
        results += group_results
        if args.json:  # after every group: a run stopped early keeps what it measured
            write_json(args.json, machine, args, results)
    machine['load_average_end'] = list(os.getloadavg()) if hasattr(os, 'getloadavg') else None
    print()
    print(format_table(results))
    if results:
        print(f'\nPeak memory: {results[0]["memory_method"]}')
        print("MACs: one forward pass, projects.dat.flops (the papers' convention); backbones: batch 1 x the batch")
    if args.json:
        write_json(args.json, machine, args, results)
    return results


if __name__ == '__main__':
    main()
