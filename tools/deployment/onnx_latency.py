"""ONNX Runtime (CPU) latency of DAT-T++ and Swin-T classifiers beside PyTorch eager, measured side by side.

Both classifiers have random weights: the DAT-T++ classifier of
``configs/classification/datpp-t_8xb128_in1k.py`` and mmpretrain's Swin-T
(``swin_transformer/swin-tiny_16xb64_in1k.py`` of mmpretrain's configs). Each is exported with
``tools/deployment/pytorch2onnx.py``'s export at every batch size (static sizes, float32, images to
class scores), checked against PyTorch once, and then timed: round after round, every
(model, batch) runs one forward pass in ONNX Runtime and one in PyTorch (``torch.no_grad``,
the model's default attention implementation, for DAT-T++ the fast path with its C++ CPU
kernels), alternating which of the two goes first, so that both see the same load on a shared
machine. Reported: the median per implementation and the median of the per-round ratios
ONNX Runtime / PyTorch. Both use ``--threads`` threads.

Example::

    python tools/deployment/onnx_latency.py --batches 1 32 --rounds 10 --json docs/bench/onnx_latency.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import os.path as osp
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from projects.dat.toolboxes import build_config_model

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DATPP_T = osp.join(REPO, 'configs', 'classification', 'datpp-t_8xb128_in1k.py')
SWIN_T = ('swin_transformer', 'swin-tiny_16xb64_in1k.py')
MODELS = ('datpp-t', 'swin-t')


def _load_pytorch2onnx():
    """The export tool beside this file, as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        '_dat_pytorch2onnx', osp.join(osp.dirname(__file__), 'pytorch2onnx.py')
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytorch2onnx = _load_pytorch2onnx()


def model_config(name: str) -> str:
    """The config file of a model of :data:`MODELS` (Swin-T: from mmpretrain's installed configs)."""
    if name == 'datpp-t':
        return DATPP_T
    package = osp.dirname(importlib.util.find_spec('mmpretrain').origin)
    path = osp.join(package, '.mim', 'configs', *SWIN_T)
    if not osp.isfile(path):
        raise FileNotFoundError(f"mmpretrain's Swin-T config is not at {path}")
    return path


def build_classifier(name: str) -> nn.Module:
    """A classifier of :data:`MODELS` with random weights, images to class scores, in eval mode."""
    torch.manual_seed(0)
    model, scope, _ = build_config_model(model_config(name))
    if scope != 'mmpretrain':
        raise ValueError(f'{name}: expected an mmpretrain classifier config, got scope {scope!r}')
    return pytorch2onnx.ClassifierScores(model).eval()


def machine_info(threads: int) -> dict[str, Any]:
    """CPU model, core count, threads, library versions and load average of this machine."""
    import onnx
    import onnxruntime

    cpu = platform.processor()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    except OSError:
        pass
    return dict(
        cpu=cpu,
        logical_cpus=os.cpu_count(),
        threads=threads,
        python=platform.python_version(),
        torch=torch.__version__,
        onnx=onnx.__version__,
        onnxruntime=onnxruntime.__version__,
        platform=platform.platform(),
        load_average=list(os.getloadavg()),
    )


def _timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return (time.perf_counter() - start) * 1e3


def measure(
    models: Sequence[str], batches: Sequence[int], size: int, rounds: int, warmup: int, threads: int, workdir: str
) -> list[dict[str, Any]]:
    """Export, check and time every (model, batch); see the module docstring.

    Returns:
        list[dict]: Per (model, batch): ``onnx_ms`` and ``torch_ms`` (every round),
        their medians, ``ratio_median`` (ONNX Runtime / PyTorch, per round), ``relative_diff``
        (``max|onnx - torch| / max|torch|`` of the class scores), ``export_s`` and ``onnx_mib``.
    """
    import onnxruntime as ort

    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    jobs = []
    for name in models:
        model = build_classifier(name)
        for batch in batches:
            path = osp.join(workdir, f'{name}_b{batch}.onnx')
            print(f'exporting {name} at {batch}x{size}x{size}', flush=True)
            start = time.perf_counter()
            pytorch2onnx.export_onnx(model, path, ['logits'], (size, size), batch=batch)
            export_s = time.perf_counter() - start
            (check,) = pytorch2onnx.compare_with_onnxruntime(model, path, ['logits'], [(size, size, batch)])
            print(f'      {export_s:.1f} s; max|onnx - torch| / max|torch| = {check["relative"]:.2e}', flush=True)
            session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
            images = torch.randn(batch, 3, size, size)
            feed = {'input': images.numpy()}

            def run_torch(model=model, images=images):
                with torch.no_grad():
                    model(images)

            jobs.append(
                dict(
                    model=name,
                    batch=batch,
                    run=dict(onnx=lambda session=session, feed=feed: session.run(None, feed), torch=run_torch),
                    result=dict(
                        model=name,
                        batch=batch,
                        size=size,
                        relative_diff=check['relative'],
                        export_s=export_s,
                        onnx_mib=os.path.getsize(path) / 2**20,
                        onnx_ms=[],
                        torch_ms=[],
                    ),
                )
            )
    print(f'warm-up ({warmup} run(s) of each)', flush=True)
    for job in jobs:
        for _ in range(warmup):
            job['run']['onnx']()
            job['run']['torch']()
    for index in range(rounds):
        order = ('onnx', 'torch') if index % 2 == 0 else ('torch', 'onnx')
        for job in jobs:
            for impl in order:
                job['result'][f'{impl}_ms'].append(_timed(job['run'][impl]))
        print(f'round {index + 1}/{rounds} done', flush=True)
    results = []
    for job in jobs:
        result = job['result']
        result['onnx_median_ms'] = statistics.median(result['onnx_ms'])
        result['torch_median_ms'] = statistics.median(result['torch_ms'])
        ratios = [o / t for o, t in zip(result['onnx_ms'], result['torch_ms'], strict=True)]
        result['ratio_median'] = statistics.median(ratios)
        results.append(result)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--models', nargs='+', choices=MODELS, default=list(MODELS), help='classifiers to time')
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 32], help='batch sizes (default 1 32)')
    parser.add_argument('--size', type=int, default=224, help='image side (default 224)')
    parser.add_argument('--rounds', type=int, default=10, help='timed rounds (default 10)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed runs of each before the rounds (default 2)')
    parser.add_argument('--threads', type=int, default=os.cpu_count(), help='threads of both (default: all CPUs)')
    parser.add_argument('--json', help='write machine, arguments and every timing to this JSON file')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ('size', 'rounds', 'threads'):
        if getattr(args, name) < 1:
            print(f'onnx_latency: error: --{name} must be at least 1, got {getattr(args, name)}', file=sys.stderr)
            return 2
    if args.warmup < 0 or min(args.batches) < 1:
        print('onnx_latency: error: --warmup must be >= 0 and --batches >= 1', file=sys.stderr)
        return 2
    machine = machine_info(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        results = measure(args.models, args.batches, args.size, args.rounds, args.warmup, args.threads, workdir)
    machine['load_average_end'] = list(os.getloadavg())
    print(f'\n{"model":>8} {"batch":>5} {"ONNX Runtime ms":>16} {"PyTorch ms":>11} {"ORT / PyTorch":>14}')
    for r in results:
        print(
            f'{r["model"]:>8} {r["batch"]:>5} {r["onnx_median_ms"]:>16.1f} {r["torch_median_ms"]:>11.1f} '
            f'{r["ratio_median"]:>14.2f}'
        )
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(machine=machine, args=vars(args), results=results), f, indent=2)
            f.write('\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
