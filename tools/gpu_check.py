"""The GPU check of this repository: the CUDA cases of the tests, the backbone benchmark and, where
mmcv's compiled ops exist, a detector training step and mmdet's inference benchmark; one JSON with
every figure. ``tools/gpu_check.sh`` installs the carried wheels first and runs this.

First run on a GPU (one H200, torch 2.11) on 2026-12-04, at 2d48c45: every step passed but one
test case, whose tolerance was fixed since; results in ``docs/benchmarks.md``. The ``profile``
step and the ``kernels`` step were added after that run and have run on CPU only (``--device
cpu``).

Steps, in order of importance, each with its own time limit inside an overall budget
(``--budget-s``; a step that no longer fits is skipped and says so). The JSON is rewritten after
every step, so a run stopped from outside keeps what it did.

1. ``environment``: Python, torch, CUDA, the GPU, and which packages import (``mmcv.ops`` decides
   step 6; ``mmdet``'s models decide which Swin-T the benchmark builds).
2. ``tests``: the ``cuda`` cases of ``tests/test_attention_fast.py``, ``tests/test_layers.py`` and
   ``tests/test_backbone.py`` (fast paths against the reference: forward, backward, AMP,
   ``with_cp``, odd sizes; TF32 off), with pytest.
3. ``kernels``: ``tools/analysis_tools/benchmark_kernels.py``, DAT-T++'s attention operators
   alone at the arguments of its 1344x800 forward pass, the PyTorch backend against the Triton
   kernels (the check sets ``DAT_GPU_KERNELS=1`` for every step), forward and forward+backward,
   with their differences; then the kernels at the other block sizes of its ``TUNING``: the
   evidence for making each operator's kernels the default on CUDA and for their block sizes.
4. ``benchmark:fp32:*``: ``tools/analysis_tools/benchmark.py``, DAT-T++ reference path, fast path
   computed in PyTorch (``datpp-t:pytorch``) and fast path (``datpp-t:fast``: the D and N ops in
   their Triton kernels where Triton imports), and Swin-T (mmdet's, or timm's where mmdet cannot
   be imported: ``swin_t`` in the JSON says which), at 1344x800@1 and 224@64, fwd and fwd+bwd,
   latency and peak CUDA memory; then the ratios of the fast path to the reference, to the
   PyTorch path and to Swin-T. Each model set runs in one process (``--no-isolate``): a worker
   process per measurement would start CUDA 24 times, a large part of the budget; on a GPU the
   caching allocator counts each model's peak apart all the same.
5. ``profile``: ``tools/analysis_tools/profile_ops.py``, one training step (fwd+bwd, fp32) of
   DAT-T++'s fast path, its PyTorch path and Swin-T under ``torch.profiler``: the device time of each operator,
   module class and backward node, the device's busy time and kernel count per step.
6. ``benchmark:amp:*``: step 4 under AMP (fp16 on CUDA).
7. ``detector_train`` and ``mmdet_benchmark``: where ``import mmcv.ops`` works, two training
   iterations of the demo DAT++ Mask R-CNN (``configs/demo``, synthetic COCO) with
   ``tools/train.py``, then ``mim run mmdet benchmark`` (mmdet's inference benchmark, CUDA only)
   on its checkpoint; else both are skipped, saying why.

``--device cpu`` is the dry run: the same steps and code paths with small inputs, one timed
iteration and a few CPU test cases (``tests/test_gpu_check.py`` runs it).

Writes ``gpu_check.json`` and ``gpu_check.log`` (every step's output) into ``--out``, else ``$OUT``,
else ``work_dirs/gpu_check``; scratch files go to a temporary folder. Exit status 1 where a step
failed or ran out of time, else 0.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[1]
TESTS = ('tests/test_attention_fast.py', 'tests/test_layers.py', 'tests/test_backbone.py')
BENCHMARK = 'tools/analysis_tools/benchmark.py'
KERNELS = 'tools/analysis_tools/benchmark_kernels.py'
KERNELS_MARGIN_S = 25.0  # of the kernels step's limit, for its start and its last measurement
PROFILE = 'tools/analysis_tools/profile_ops.py'
# In one process, in this order: GPU kernels failing on their first GPU (the fast path, last) do
# not cost the other profiles.
PROFILE_MODELS = ('datpp-t:pytorch', 'swin-t', 'datpp-t:fast')
DET_CONFIG = 'configs/demo/mask-rcnn_datpp-demo_fpn_synthetic-coco-tiny.py'
# The benchmark's model sets, one process each (a failing Swin-T, or GPU kernels failing on their
# first GPU, do not cost the other figures).
MODEL_SETS = (('datpp-t:reference', 'datpp-t:pytorch'), ('datpp-t:fast',), ('swin-t',))
# What the fast path is compared with: (name in the ratios, benchmark model).
COMPARED = (('reference', 'datpp-t:reference'), ('pytorch', 'datpp-t:pytorch'), ('swin_t', 'swin-t'))
PROBE_MARKER = 'GPU_CHECK_PROBE '
GPU_KERNELS_SWITCH = 'DAT_GPU_KERNELS'  # projects.dat.ops.gpu_kernels.ENV_SWITCH (not imported here)
# What the environment step imports (a failure is recorded, not fatal).
PROBED_MODULES = (
    'numpy',
    'mmengine',
    'mmcv',
    'mmcv.ops',
    'mmdet',
    'mmdet.models.backbones.swin',
    'timm',
    'onnx',
    'onnxruntime',
    'psutil',
    'triton',
    'projects.dat',
)


@dataclass(frozen=True)
class Plan:
    """What one run does on a device: sizes, iterations and time limits (seconds)."""

    tests_k: str  # pytest -k expression over the TESTS files
    bench_inputs: tuple[str, ...]
    warmup: int
    repeats: int
    bench_threads: int | None  # CPU threads of the benchmark and the profile (None: torch's default)
    profile_input: str
    kernels_input: str  # the input whose attention calls the kernels step times
    kernels_tune: bool  # also the GPU kernels' other block sizes
    det_iters: int  # training iterations of the demo detector
    det_val_images: int  # synthetic validation images (mmdet's benchmark needs as many as its iterations)
    mmdet_bench_iters: int
    budget_s: float
    limits: dict[str, float]


PLANS = {
    # The GPU run: under 8 minutes in all (the wheels' install comes before this budget).
    'cuda': Plan(
        tests_k='cuda',
        bench_inputs=('1344x800@1', '224@64'),
        warmup=3,
        repeats=8,
        bench_threads=None,
        profile_input='1344x800@1',
        kernels_input='1344x800@1',
        kernels_tune=True,
        det_iters=2,
        det_val_images=30,
        mmdet_bench_iters=25,
        budget_s=450.0,
        limits=dict(
            environment=60,
            tests=210,
            kernels=90,
            benchmark=110,
            profile=90,
            detector_data=60,
            detector_train=150,
            mmdet_benchmark=90,
        ),
    ),
    # The dry run: the same steps on CPU with small sizes, one timed iteration, a few test cases.
    'cpu': Plan(
        tests_k='cpu and pytorch and (deformable_matches_reference or neighborhood_matches_reference)',
        bench_inputs=('48x32@2',),  # not square, a batch: what the GPU run's inputs exercise
        warmup=0,
        repeats=1,
        bench_threads=1,  # tiny inputs: a second thread only waits, and slows down on a busy machine
        profile_input='48x32@2',
        kernels_input='48x32@2',
        kernels_tune=False,  # the GPU kernels run on CUDA (on CPU only in Triton's slow interpreter)
        det_iters=1,
        det_val_images=2,
        mmdet_bench_iters=2,
        budget_s=300.0,
        limits=dict(
            environment=60,
            tests=120,
            kernels=60,
            benchmark=90,
            profile=60,
            detector_data=60,
            detector_train=150,
            mmdet_benchmark=60,
        ),
    ),
}
# A step is skipped rather than started with less time than this left in the budget.
MIN_STEP_S = 15.0

PROBE = f"""
import importlib, json, platform, sys
info = dict(python=platform.python_version(), executable=sys.executable)
import torch
info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(
        gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / 2**30, 1),
        capability=f'{{props.major}}.{{props.minor}}', cudnn=torch.backends.cudnn.version(),
        bf16=torch.cuda.is_bf16_supported(),
    )
imports = {{}}
for name in {PROBED_MODULES!r}:
    try:
        module = importlib.import_module(name)
        imports[name] = dict(ok=True, version=getattr(module, '__version__', None))
    except Exception as exc:  # any failure to import is a finding, not a crash of the probe
        imports[name] = dict(ok=False, error=f'{{type(exc).__name__}}: {{exc}}'[:400])
info['imports'] = imports
print({PROBE_MARKER!r} + json.dumps(info), flush=True)
"""


def now() -> str:
    return time.strftime('%H:%M:%S')


class Run:
    """The state of one check: the budget, the log, the report, and how steps are run.

    Args:
        device (str): ``'cuda'`` or ``'cpu'``.
        out (Path): Where ``gpu_check.json`` and ``gpu_check.log`` go.
        scratch (Path): Where everything else goes.
        budget_s (float): The whole check's time budget in seconds.
    """

    def __init__(self, device: str, out: Path, scratch: Path, budget_s: float):
        self.device = device
        self.plan = PLANS[device]
        self.out = out
        self.scratch = scratch
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.log: TextIO = open(out / 'gpu_check.log', 'w')
        # The steps' processes import projects.dat from this checkout (gpu_check.sh sets it too).
        paths = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
        self.env = dict(os.environ, PYTHONUNBUFFERED='1', PYTHONPATH=os.pathsep.join([*paths, str(REPO)]))
        # The Triton kernels are opt-in until they have run on a GPU: this check is where
        # they do (unless the caller says otherwise).
        self.env.setdefault(GPU_KERNELS_SWITCH, '1')
        self.report: dict[str, Any] = dict(
            check='tools/gpu_check.sh',
            note='first run on a GPU on 2026-12-04 (H200); the profile and kernels steps have run on CPU only before',
            device=device,
            dry_run=device != 'cuda',
            started=time.strftime('%Y-%m-%d %H:%M:%S %z'),
            budget_s=budget_s,
            plan=dict(
                tests_k=self.plan.tests_k,
                bench_inputs=list(self.plan.bench_inputs),
                warmup=self.plan.warmup,
                repeats=self.plan.repeats,
            ),
            git=git_description(),
            steps={},
        )

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def say(self, message: str) -> None:
        line = f'[gpu_check {now()} +{time.monotonic() - self.started:4.0f}s] {message}'
        print(line, flush=True)
        self.log.write(line + '\n')
        self.log.flush()

    def time_for(self, step: str) -> float | None:
        """The time limit of ``step``: its own, or what is left of the budget; None where too
        little is left (the step is recorded as skipped)."""
        limit = min(self.plan.limits[step.split(':')[0]], self.remaining())
        if limit < MIN_STEP_S:
            self.record(step, status='skipped', reason=f'time budget: {self.remaining():.0f} s left')
            return None
        return limit

    def record(self, step: str, **fields: Any) -> None:
        """Store a step's outcome and rewrite the JSON."""
        self.report['steps'][step] = fields
        extra = f' ({fields["reason"]})' if fields.get('reason') else ''
        self.say(f'{step}: {fields["status"]}{extra}')
        self.write()

    def write(self) -> None:
        self.report['elapsed_s'] = round(time.monotonic() - self.started, 1)
        tmp = self.out / 'gpu_check.json.tmp'
        tmp.write_text(json.dumps(self.report, indent=2))
        tmp.replace(self.out / 'gpu_check.json')

    def command(self, step: str, cmd: list[str], timeout_s: float, label: str | None = None) -> dict[str, Any]:
        """Run ``cmd`` in the repository in its own process group, its output echoed and logged,
        killed with its children after ``timeout_s``.

        Args:
            step (str): The step's name, for the log.
            cmd (list[str]): The command.
            timeout_s (float): Its time limit.
            label (str, optional): What the log shows instead of the command (a long ``-c`` script).

        Returns:
            dict: ``returncode``, ``timed_out``, ``seconds`` and the last lines of output (``tail``).
        """
        self.say(f'{step}: $ {label or " ".join(cmd)}  (limit {timeout_s:.0f} s)')
        t0 = time.monotonic()
        tail: collections.deque[str] = collections.deque(maxlen=40)
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors='replace',
            start_new_session=True,
        )

        def pump() -> None:
            for line in proc.stdout:
                self.log.write(line)
                tail.append(line.rstrip('\n'))
                print(f'    {line}', end='', flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            returncode, timed_out = proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            returncode, timed_out = proc.wait(), True
        reader.join(timeout=10)
        self.log.flush()
        return dict(
            returncode=returncode, timed_out=timed_out, seconds=round(time.monotonic() - t0, 1), tail=list(tail)
        )


def git_description() -> dict[str, Any] | None:
    """The checkout's commit and whether it has changes, where it is a git checkout (as
    ``projects.dat.benchmarking.checkout_description``, which this script, run before the package's
    dependencies are installed, does not import)."""
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True, text=True, check=True)
        status = subprocess.run(['git', 'status', '--porcelain'], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return dict(commit=commit.stdout.strip(), changed_files=len(status.stdout.splitlines()))


def outcome(result: dict[str, Any]) -> str:
    """A command's status: ``passed``, ``failed`` or ``timeout``."""
    if result['timed_out']:
        return 'timeout'
    return 'passed' if result['returncode'] == 0 else 'failed'


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts of a pytest JUnit report, the failed tests with their messages and the skip reasons.

    Args:
        path (Path): The report.

    Returns:
        dict: ``passed``, ``failed``, ``skipped``, ``failures`` (``{test id: message}``) and
        ``skip_reasons`` (``{reason: count}``).
    """
    counts = dict(passed=0, failed=0, skipped=0)
    failures: dict[str, str] = {}
    skip_reasons: collections.Counter[str] = collections.Counter()
    try:
        cases = list(ET.parse(path).getroot().iter('testcase'))
    except ET.ParseError:  # pytest stopped while writing it
        cases = []
    for case in cases:
        test_id = f'{case.get("classname")}.{case.get("name")}'
        kinds = {child.tag: child for child in case}
        bad = kinds.get('failure', kinds.get('error'))
        if bad is not None:
            counts['failed'] += 1
            failures[test_id] = (bad.get('message') or '')[:500]
        elif 'skipped' in kinds:
            counts['skipped'] += 1
            skip_reasons[(kinds['skipped'].get('message') or '')[:200]] += 1
        else:
            counts['passed'] += 1
    return dict(counts, failures=failures, skip_reasons=dict(skip_reasons))


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per input, mode and precision: DAT-T++ fast against its reference path, its PyTorch path and
    Swin-T (:data:`COMPARED`), in median latency and peak memory (where both sides were measured).

    Args:
        results (list[dict]): benchmark.py results (``job``, ``latency_ms``, ``peak_mem_mib``).

    Returns:
        list[dict]: ``case``, then ``{time,memory}_fast_over_{reference,pytorch,swin_t}`` where
        known.
    """
    cases: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        job = r['job']
        case = f'{job["width"]}x{job["height"]}@{job["batch"]} {job["mode"]} {"amp" if job["amp"] else "fp32"}'
        cases.setdefault(case, {})[job['model']] = r
    rows = []
    for case, by_model in cases.items():
        row: dict[str, Any] = dict(case=case)
        fast = by_model.get('datpp-t:fast')
        for name, model in COMPARED:
            other = by_model.get(model)
            if fast is None or other is None:
                continue
            row[f'time_fast_over_{name}'] = round(fast['latency_ms']['median'] / other['latency_ms']['median'], 3)
            if other['peak_mem_mib'] > 0:
                row[f'memory_fast_over_{name}'] = round(fast['peak_mem_mib'] / other['peak_mem_mib'], 3)
        rows.append(row)
    return rows


def results_table(results: list[dict[str, Any]]) -> str:
    """A Markdown table of the benchmark results (median latency, images/s, peak memory)."""
    lines = [
        '| model | input | mode | precision | ms (median) | images/s | peak MiB |',
        '|---|---|---|---|---|---|---|',
    ]
    for r in results:
        job = r['job']
        lines.append(
            f'| {job["model"]} | {job["width"]}x{job["height"]}@{job["batch"]} | {job["mode"]} | '
            f'{"amp" if job["amp"] else "fp32"} | {r["latency_ms"]["median"]:.1f} | {r["images_per_s"]:.1f} | '
            f'{r["peak_mem_mib"]:.0f} |'
        )
    return '\n'.join(lines)


def step_environment(run: Run) -> None:
    """Probe Python, torch, the GPU and the imports in a fresh process (an import that crashes it is
    a finding too)."""
    limit = run.time_for('environment')
    if limit is None:
        return
    result = run.command('environment', [sys.executable, '-c', PROBE], limit, label=f'{sys.executable} -c PROBE')
    probe = next(
        (json.loads(line[len(PROBE_MARKER) :]) for line in result['tail'] if line.startswith(PROBE_MARKER)), {}
    )
    status = outcome(result) if probe else 'failed'
    if run.device == 'cuda' and probe and not probe.get('cuda_available'):
        status = 'failed'
        result['reason'] = 'torch sees no CUDA device'
    run.report.update(
        {key: probe.get(key) for key in ('python', 'torch', 'cuda', 'gpu', 'gpu_memory_gib', 'capability', 'cudnn')}
    )
    run.report['imports'] = probe.get('imports', {})
    run.record('environment', status=status, seconds=result['seconds'], reason=result.get('reason'))


def step_tests(run: Run) -> None:
    limit = run.time_for('tests')
    if limit is None:
        return
    junit = run.scratch / 'tests.xml'
    cmd = [sys.executable, '-m', 'pytest', *TESTS, '-q', '-rfE', '-p', 'no:cacheprovider']
    cmd += ['-k', run.plan.tests_k, f'--junitxml={junit}']
    result = run.command('tests', cmd, limit)
    summary = junit_summary(junit) if junit.is_file() else {}
    status = outcome(result)
    if status == 'passed' and not summary.get('passed'):
        status, result['reason'] = 'failed', 'no test passed'
    run.record(
        'tests', status=status, seconds=result['seconds'], reason=result.get('reason'), k=run.plan.tests_k, **summary
    )


def step_kernels(run: Run) -> None:
    """DAT-T++'s attention operators alone: the PyTorch backend against the kernels (Triton on
    CUDA, C++ on CPU), and on CUDA the Triton kernels' other block sizes."""
    limit = run.time_for('kernels')
    if limit is None:
        return
    path = run.scratch / 'kernels.json'
    plan = run.plan
    cmd = [sys.executable, KERNELS, '--arch', 'datpp-t', '--input', plan.kernels_input, '--device', run.device]
    cmd += ['--warmup', str(min(plan.warmup, 2)), '--repeats', str(min(plan.repeats, 5)), '--json', str(path)]
    # Room for the start (CUDA, the model's forward pass) before and the last measurement after.
    cmd += ['--time-limit-s', f'{max(limit - KERNELS_MARGIN_S, 0.0):.0f}']
    cmd += ['--tune'] if plan.kernels_tune else []
    cmd += ['--threads', str(plan.bench_threads)] if plan.bench_threads else []
    result = run.command('kernels', cmd, limit)
    data = json.loads(path.read_text()) if path.is_file() else {}
    run.report['kernels'] = {key: data[key] for key in ('calls', 'rows', 'totals', 'fastest') if key in data}
    rows = data.get('rows', [])
    failed = [row for row in rows if 'error' in row or row.get('agrees') is False]
    not_measured = data.get('not_measured', 0)
    status = outcome(result)
    reason = f'time limit: {not_measured} measurements not started' if not_measured else None
    if status == 'passed' and (failed or not rows):
        status, reason = 'failed', f'{len(failed)} of {len(rows)} measurements failed or disagree'
    run.record(
        'kernels',
        status=status,
        seconds=result['seconds'],
        reason=reason,
        measurements=len(rows),
        not_measured=not_measured,
    )


def _benchmark(run: Run, amp: bool) -> None:
    """One benchmark.py process per model set, at one precision; each one's JSON holds what it
    measured, also when it was stopped."""
    all_results: list[dict[str, Any]] = run.report.get('benchmark', {}).get('results', [])
    machine = run.report.get('benchmark', {}).get('machine')
    for models in MODEL_SETS:
        step = f'benchmark:{"amp" if amp else "fp32"}:{models[0]}'
        limit = run.time_for(step)
        if limit is None:
            continue
        path = run.scratch / f'bench_{len(all_results)}_{"amp" if amp else "fp32"}_{models[0]}.json'
        cmd = [sys.executable, BENCHMARK, '--models', *models, '--inputs', *run.plan.bench_inputs]
        cmd += ['--modes', 'fwd', 'fwd+bwd', '--device', run.device, '--warmup', str(run.plan.warmup)]
        # MACs depend on the input alone: a CPU run of benchmark.py counts them.
        cmd += ['--repeats', str(run.plan.repeats), '--no-isolate', '--no-macs', '--json', str(path)]
        cmd += ['--amp'] if amp else []
        cmd += ['--threads', str(run.plan.bench_threads)] if run.plan.bench_threads else []
        result = run.command(step, cmd, limit)
        data = json.loads(path.read_text()) if path.is_file() else {}
        results = data.get('results', [])
        machine = machine or data.get('machine')
        all_results += results
        expected = len(models) * len(run.plan.bench_inputs) * 2
        status = outcome(result)
        reason = None if len(results) == expected else f'{len(results)} of {expected} measurements'
        run.report['benchmark'] = dict(machine=machine, results=all_results, ratios=ratios(all_results))
        sources = {r['model_source'] for r in all_results if r['job']['model'] == 'swin-t'}
        if sources:
            run.report['swin_t'] = sorted(sources)[0] if len(sources) == 1 else sorted(sources)
        run.record(step, status=status, seconds=result['seconds'], reason=reason, measurements=len(results))
    if all_results:
        run.report['benchmark']['table'] = results_table(all_results)


def step_benchmark_fp32(run: Run) -> None:
    _benchmark(run, amp=False)


def step_benchmark_amp(run: Run) -> None:
    _benchmark(run, amp=True)


def step_profile(run: Run) -> None:
    """Where a training step's device time goes, op by op, for DAT-T++'s PyTorch and fast paths and
    Swin-T."""
    limit = run.time_for('profile')
    if limit is None:
        return
    path = run.scratch / 'profile.json'
    plan = run.plan
    cmd = [sys.executable, PROFILE, '--models', *PROFILE_MODELS, '--inputs', plan.profile_input, '--modes', 'fwd+bwd']
    cmd += ['--device', run.device, '--warmup', str(min(plan.warmup, 3)), '--steps', str(min(plan.repeats, 3))]
    cmd += ['--json', str(path)]
    cmd += ['--threads', str(plan.bench_threads)] if plan.bench_threads else []
    result = run.command('profile', cmd, limit)
    cases = json.loads(path.read_text())['cases'] if path.is_file() else []
    run.report['profile'] = cases
    status = outcome(result)
    reason = None if len(cases) == len(PROFILE_MODELS) else f'{len(cases)} of {len(PROFILE_MODELS)} models profiled'
    run.record('profile', status=status, seconds=result['seconds'], reason=reason, cases=len(cases))


def step_detector(run: Run) -> None:
    """The demo detector's training step and mmdet's inference benchmark, where mmcv's ops import."""
    mmcv_ops = run.report.get('imports', {}).get('mmcv.ops', dict(ok=False, error='not probed'))
    if not mmcv_ops['ok']:
        reason = f"import mmcv.ops failed ({mmcv_ops['error']}): mmdet's detectors need mmcv's compiled ops"
        run.record('detector_train', status='skipped', reason=reason)
        run.record('mmdet_benchmark', status='skipped', reason=reason)
        return
    plan, data, work = run.plan, run.scratch / 'coco', run.scratch / 'detector'
    limit = run.time_for('detector_data')
    if limit is None:
        run.record('mmdet_benchmark', status='skipped', reason='no checkpoint of the training step')
        return
    make = (
        'from projects.dat.synthetic import make_coco; '
        f'make_coco({str(data)!r}, num_train=4, num_val={plan.det_val_images}, size=(64, 64), progress=False)'
    )
    result = run.command('detector_data', [sys.executable, '-c', make], limit)
    if outcome(result) != 'passed':
        run.record('detector_train', status='failed', seconds=result['seconds'], reason='synthetic COCO not written')
        run.record('mmdet_benchmark', status='skipped', reason='no checkpoint of the training step')
        return
    options = [
        f'{loader}.dataset.data_root={data}/' for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
    ]
    ann = data / 'annotations' / 'instances_val2017.json'
    options += [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']
    limit = run.time_for('detector_train')
    if limit is None:
        run.record('mmdet_benchmark', status='skipped', reason='no checkpoint of the training step')
        return
    iters = plan.det_iters
    cmd = [sys.executable, 'tools/train.py', DET_CONFIG, '--work-dir', str(work), '--cfg-options', *options]
    cmd += [
        f'train_cfg.max_iters={iters}',
        f'train_cfg.val_interval={iters}',
        f'default_hooks.checkpoint.interval={iters}',
    ]
    result = run.command('detector_train', cmd, limit)
    scalars = sorted(work.glob('*/vis_data/scalars.json'))
    logged = [json.loads(line) for line in scalars[-1].read_text().splitlines() if line.strip()] if scalars else []
    train_logs = [entry for entry in logged if 'loss' in entry]
    checkpoint = work / f'iter_{iters}.pth'
    status = outcome(result)
    if status == 'passed' and not checkpoint.is_file():
        status, result['reason'] = 'failed', f'no checkpoint {checkpoint.name}'
    run.record(
        'detector_train',
        status=status,
        seconds=result['seconds'],
        reason=result.get('reason'),
        last_train_log=train_logs[-1] if train_logs else None,
        val_log=next((entry for entry in reversed(logged) if 'loss' not in entry), None),
    )
    if run.device != 'cuda':
        run.record('mmdet_benchmark', status='skipped', reason="mmdet's inference benchmark runs on CUDA only")
        return
    if status != 'passed':
        run.record('mmdet_benchmark', status='skipped', reason='no checkpoint of the training step')
        return
    step_mmdet_benchmark(run, checkpoint, options)


def mmdet_benchmark_command(config: str, checkpoint: Path, iters: int, options: list[str]) -> tuple[list[str], str]:
    """``mim run mmdet benchmark`` for the inference benchmark, or, without openmim, the script it
    runs (mmdet's ``tools/analysis_tools/benchmark.py``, shipped in mmdet's ``.mim`` folder).

    Returns:
        tuple: The command and how it runs mmdet's benchmark.
    """
    args = [config, '--checkpoint', str(checkpoint), '--task', 'inference', '--max-iter', str(iters)]
    args += ['--num-warmup', '5', '--log-interval', '5', '--cfg-options', *options]
    mim = shutil.which('mim')
    if mim is not None:
        return [mim, 'run', 'mmdet', 'benchmark', *args], 'mim run mmdet benchmark'
    script = (
        Path(importlib.util.find_spec('mmdet').origin).parent / '.mim' / 'tools' / 'analysis_tools' / 'benchmark.py'
    )
    return [sys.executable, str(script), *args], f'{script} (openmim is not installed; the script mim run runs)'


def step_mmdet_benchmark(run: Run, checkpoint: Path, options: list[str]) -> None:
    limit = run.time_for('mmdet_benchmark')
    if limit is None:
        return
    cmd, how = mmdet_benchmark_command(DET_CONFIG, checkpoint, run.plan.mmdet_bench_iters, options)
    result = run.command('mmdet_benchmark', cmd, limit)
    fps = [float(m[1]) for line in result['tail'] if (m := re.search(r'Overall fps: ([\d.]+)', line))]
    run.record(
        'mmdet_benchmark',
        status=outcome(result),
        seconds=result['seconds'],
        how=how,
        fps=fps[-1] if fps else None,
        tail=result['tail'][-10:],
    )


# After the environment, in order of importance (the module docstring).
STEPS = (step_tests, step_kernels, step_benchmark_fp32, step_profile, step_benchmark_amp, step_detector)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', choices=sorted(PLANS), default='cuda', help='cuda, or cpu for the dry run')
    parser.add_argument(
        '--out', help='folder of gpu_check.json and gpu_check.log (default: $OUT, else work_dirs/gpu_check)'
    )
    parser.add_argument('--budget-s', type=float, help="time budget of the whole check (default: the plan's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out or os.environ.get('OUT') or REPO / 'work_dirs' / 'gpu_check')
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='gpu_check_') as scratch:
        run = Run(args.device, out, Path(scratch), args.budget_s or PLANS[args.device].budget_s)
        run.say(f'device {args.device}, budget {run.budget_s:.0f} s, writing {out / "gpu_check.json"}')
        try:
            step_environment(run)
            if run.report['steps'].get('environment', {}).get('status') == 'passed':
                for step in STEPS:
                    try:
                        step(run)
                    except Exception as exc:  # a bug of this script must not cost the later steps
                        name = step.__name__.removeprefix('step_')
                        run.record(name, status='failed', reason=f'gpu_check.py: {type(exc).__name__}: {exc}')
        finally:
            run.write()
            run.log.close()
    steps = run.report['steps']
    print(
        f'\n[gpu_check] {run.report.get("gpu") or "no GPU"}, torch {run.report.get("torch")}, '
        f'{run.report["elapsed_s"]:.0f} s; JSON: {out / "gpu_check.json"}'
    )
    for name, fields in steps.items():
        extra = f' ({fields["reason"]})' if fields.get('reason') else ''
        print(f'  {name}: {fields["status"]}{extra}')
    for best in run.report.get('kernels', {}).get('fastest', []):
        print(f'  kernels, fastest setting that agrees: {best}')
    if 'benchmark' in run.report:
        print(run.report['benchmark'].get('table', ''))
        for row in run.report['benchmark']['ratios']:
            print(f'  {row}')
    for case in run.report.get('profile', []):
        print(
            f'  profile {case["model"]} {case["input"]} {case["mode"]}: {case["wall_ms"]} ms/step, device busy '
            f'{case["device_busy_ms"]} ms, {case["kernels"]} kernels; top ops {case["ops"][:3]}'
        )
    failed = [name for name, fields in steps.items() if fields['status'] in ('failed', 'timeout')]
    return 1 if failed or 'environment' not in steps else 0


if __name__ == '__main__':
    sys.exit(main())
