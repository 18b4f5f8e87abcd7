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
  the same architecture, with mmdet's four output norms (:class:`TimmSwinT`); each result's
  ``model_source`` says which ran;
- ``CONFIG.py[:IMPL][:cp|nocp]``: the whole model of an mmdet / mmseg / mmpretrain config,
  run in ``mode='tensor'`` (backbone, neck and heads, without losses and post-processing); the
  backward pass starts from the sum of the means of its outputs. ``:cp`` / ``:nocp`` override
  the config's ``model.backbone.with_cp``.

Input specs (``--inputs``): ``S@B`` or ``WxH@B``, e.g. ``224@32`` or ``1344x800@1`` (width x
height, as mmdet writes image scales).

Protocol (the original DAT code's): ``--warmup`` untimed iterations (default 50), then
``--repeats`` timed ones (default 30), each timed on its own (CUDA synchronised); the table
shows the median latency per iteration and images/s = batch / median; the JSON output keeps
every iteration's time, and is written after every group of measurements (a run stopped early
keeps what it measured). ``--quick`` runs 2 + 5 for a small CPU. Forward runs in eval mode
under ``torch.no_grad()``; forward+backward in train mode with the gradients of all parameters.
Between timed iterations a worker keeps the memory it freed, as a training loop does, unless the
workers' peaks together come near the machine's memory (then each returns its freed memory to
the OS after its iteration, so that the idle ones hold little; the log and the JSON say which).
Returning it is not what a training loop does, and not free: the next iteration page-faults its
memory in afresh. Workers that keep it run one untimed iteration more after the warm-up (which
ends by returning memory, so that idle workers stay small while the others warm up).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated()`` minus the memory allocated
before the first iteration (and, as ``peak_reserved_mib``, the peak of what PyTorch's caching
allocator held minus what it held then; its cache is emptied before each model is built). On
CPU the peak resident set size of the worker process during the warm-up and timed iterations
minus its resident size just before them (after building the model and the input): the
high-water mark is reset through ``/proc/self/clear_refs`` (Linux) and read from ``VmHWM`` in
``/proc/self/status``. This counts what the process really holds (glibc may keep freed blocks,
so it is an upper bound of the tensors alive at the peak), in MiB.

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from projects.dat import set_attn_impl
from projects.dat.ops import ATTN_IMPLS

MODES = ('fwd', 'fwd+bwd')
# Spec names of the implementations: attn_impl's values, and the name earlier runs used for 'pytorch'.
IMPL_ALIASES = {'fast-pytorch': 'pytorch'}
IMPLS = (*ATTN_IMPLS, *IMPL_ALIASES)
CHECKPOINTING = {'cp': True, 'nocp': False}
RESULT_MARKER = 'BENCHMARK_RESULT '
# Interleaved workers keep their freed memory between iterations while their peaks together
# stay below this fraction of the machine's memory.
KEEP_MEMORY_FRACTION = 0.75

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


def parse_model_spec(spec: str) -> tuple[str, str | None, bool | None]:
    """``'datpp-t:fast'`` -> ``('datpp-t', 'fast', None)``; ``'datpp-t:reference:cp'`` ->
    ``('datpp-t', 'reference', True)``; ``'swin-t'`` -> ``('swin-t', None, None)``.

    The optional third field is ``cp`` (activation checkpointing on) or ``nocp`` (off); without
    it a DAT backbone runs without checkpointing and a config keeps its own ``with_cp``.

    Raises:
        ValueError: For an unknown model, implementation or checkpointing field.
    """
    from projects.dat.models.dat import DAT

    name, *fields = spec.split(':')
    if len(fields) > 2:
        raise ValueError(f'Model spec {spec!r} has more than three fields; expected NAME[:IMPL][:cp|nocp]')
    impl = fields[0] if fields and fields[0] else None
    checkpointing = fields[1] if len(fields) == 2 else None
    if impl is not None and impl not in IMPLS:
        raise ValueError(f'Unknown attention implementation {impl!r} in model spec {spec!r}; expected one of {IMPLS}')
    if checkpointing is not None and checkpointing not in CHECKPOINTING:
        raise ValueError(
            f'Unknown checkpointing field {checkpointing!r} in model spec {spec!r}; expected one of '
            f'{tuple(CHECKPOINTING)}'
        )
    if name == 'swin-t':
        if fields:
            raise ValueError(f'swin-t takes no attention implementation or checkpointing field, got {spec!r}')
    elif name.endswith('.py'):
        if not osp.isfile(name):
            raise ValueError(f'Config file {name!r} of model spec {spec!r} does not exist')
    elif name.lower() not in DAT.arch_zoo:
        raise ValueError(
            f'Unknown model {name!r} in spec {spec!r}; expected a DAT arch '
            f'({", ".join(sorted(DAT.arch_zoo))}), swin-t or a config file (.py)'
        )
    return name, impl, None if checkpointing is None else CHECKPOINTING[checkpointing]


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


class TimmSwinT(nn.Module):
    """Swin-T from timm with the outputs of mmdet's backbone: the four stages' maps, each through a
    LayerNorm, NCHW.

    timm's ``swin_tiny_patch4_window7_224`` has mmdet's Swin-T architecture (patch 4, window 7,
    depths 2-2-6-2, 3-6-12-24 heads, 96-768 channels). ``strict_img_size=False`` takes any input
    size (maps padded to whole windows, shift masks built for each input, as mmdet does) and
    ``always_partition=True`` keeps window 7 and shift 3 in every stage, also where a map is a
    single window (mmdet does not shrink them either). mmdet adds a LayerNorm to each output; so
    does this module. For where mmdet cannot be imported (its models import mmcv's compiled ops).
    """

    def __init__(self):
        super().__init__()
        import timm

        self.body = timm.create_model(
            'swin_tiny_patch4_window7_224',
            pretrained=False,
            features_only=True,
            strict_img_size=False,
            always_partition=True,
            drop_path_rate=SWIN_T['drop_path_rate'],
        )
        self.norms = nn.ModuleList(nn.LayerNorm(channels) for channels in self.body.feature_info.channels())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # timm's Swin features are NHWC; mmdet's backbone returns contiguous NCHW maps.
        return tuple(norm(f).permute(0, 3, 1, 2).contiguous() for norm, f in zip(self.norms, self.body(x), strict=True))


def build_swin_t() -> tuple[nn.Module, str]:
    """Swin-T with the settings of mmdet's Swin-T Mask R-CNN backbone: mmdet's
    ``SwinTransformer``, or :class:`TimmSwinT` where mmdet cannot be imported.

    Returns:
        tuple: The model and what it is (``model_source`` of the results).

    Raises:
        ImportError: Where neither mmdet nor timm can be imported.
    """
    from projects.dat.toolboxes import build_toolbox_model

    try:
        return build_toolbox_model(SWIN_T, 'mmdet'), 'mmdet SwinTransformer'
    except ImportError as exc:
        mmdet_error = f'{type(exc).__name__}: {exc}'
    try:
        import timm
    except ImportError as exc:
        raise ImportError(f'swin-t needs mmdet ({mmdet_error}) or timm ({type(exc).__name__}: {exc})') from exc
    source = f'timm {timm.__version__} swin_tiny_patch4_window7_224 (mmdet could not be imported: {mmdet_error})'
    return TimmSwinT(), source


def build_model(spec: str, height: int, width: int) -> tuple[nn.Module, Any, str]:
    """The module to time, a function ``run(inputs)`` returning its output, and what was built.

    Args:
        spec (str): A model spec (see the module docstring).
        height (int): Input height (whole models: the data samples' image shape).
        width (int): Input width.

    Returns:
        tuple: the model, the callable to time, and the model's source (``model_source`` of the
        results: for ``swin-t`` whether mmdet's or timm's Swin-T was built).
    """
    from projects.dat import DAT
    from projects.dat.toolboxes import build_config_model, dummy_data_sample

    name, impl, with_cp = parse_model_spec(spec)
    impl = IMPL_ALIASES.get(impl, impl)
    if name == 'swin-t':
        model, source = build_swin_t()
        return model, model, source
    if not name.endswith('.py'):
        model = DAT(name, attn_impl=impl or 'auto', with_cp=bool(with_cp))
        return model, model, f'projects.dat DAT {name}'

    model, scope, _ = build_config_model(name, None if with_cp is None else {'model.backbone.with_cp': with_cp})
    if impl is not None:
        set_attn_impl(model, impl)
    if scope == 'mmseg' and getattr(model, 'auxiliary_head', None) is not None:
        model.auxiliary_head = None  # training-only head, not part of the tensor-mode graph

    def run(inputs: torch.Tensor) -> Any:
        samples = None if scope == 'mmpretrain' else [dummy_data_sample(scope, height, width) for _ in inputs]
        return model(inputs, samples, mode='tensor')

    return model, run, f'{scope} {type(model).__name__} of {name}'


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


def _memory_total_mib() -> float | None:
    """The machine's memory (``MemTotal``), or None where /proc/meminfo is not readable."""
    try:
        with open('/proc/meminfo') as f:
            return int(f.readline().split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None


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
        torch.manual_seed(0)
        self.model, run, self.model_source = build_model(job.model, job.height, job.width)
        self.model.to(self.device)
        self.backward = job.mode == 'fwd+bwd'
        self.model.train(self.backward)
        self.inputs = torch.randn(job.batch, 3, job.height, job.width, device=self.device)
        self.amp_dtype = torch.float16 if self.device.type == 'cuda' else torch.bfloat16
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
        with (
            torch.set_grad_enabled(self.backward),
            torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.job.amp),
        ):
            outputs = self.run(self.inputs)
        if self.backward:
            loss = sum(t.float().mean() for t in _tensor_leaves(outputs))
            loss.backward()
            for p in self.model.parameters():
                p.grad = None
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
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
        total_mib = _memory_total_mib()
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
        info['cuda'] = torch.version.cuda
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
        for r in group_results:
            extra = f', compile {r["compile_s"]:.1f} s, {r["graph_breaks"]} graph breaks' if job.compile else ''
            print(
                f'  {r["job"]["model"]}: {r["latency_ms"]["median"]:.1f} ms/iter (median), '
                f'{r["images_per_s"]:.2f} images/s, peak {r["peak_mem_mib"]:.0f} MiB{extra}',
                flush=True,
            )
        print(f'{label}: done in {time.perf_counter() - t0:.0f} s', flush=True)
        results += group_results
        if args.json:  # after every group: a run stopped early keeps what it measured
            write_json(args.json, machine, args, results)
    machine['load_average_end'] = list(os.getloadavg()) if hasattr(os, 'getloadavg') else None
    print()
    print(format_table(results))
    print(f'\nPeak memory: {results[0]["memory_method"]}' if results else '')
    if args.json:
        write_json(args.json, machine, args, results)
    return results


if __name__ == '__main__':
    main()
