"""Prove that the environment built by ``tools/setup_env.sh`` works.

Checks, each reported on its own line and naming the broken part on failure:

* every package named in ``requirements/*.txt`` is installed, at the version that
  ``requirements/constraints.txt`` pins (setuptools inside ``>=77.0.3,<82``);
* ``projects.dat`` is installed (editable) from this checkout and is found from any directory;
* mmcv's compiled ops load (``mmcv._ext``);
* full mode only: ``mmdet.models``, ``mmseg.models`` and ``mmpretrain.models`` import, and
  ``mmcv.ops.nms`` / ``mmcv.ops.RoIAlign`` agree with torchvision's implementations on a small
  CPU tensor (and on the GPU when one is visible; with ``FORCE_CUDA=1`` mmcv must have CUDA ops);
  the C++ CPU kernels of the fast attention (``projects/dat/csrc``) compile (once per torch
  version and checkout, cached) and agree with the PyTorch path (skipped with
  ``DAT_CPU_KERNELS=0``).

Usage::

    .venv/bin/python tools/check_env.py          # full check (end of make env)
    .venv/bin/python tools/check_env.py --quick  # versions + imports only (re-run fast path)

Exit status 0 when everything passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
REQUIREMENT_FILES = ('constraints.txt', 'build.txt', 'mminstall.txt', 'runtime.txt', 'tests.txt')
DIST_NAME = 'projects-dat'


class CheckFailed(Exception):
    """A check found the environment broken; the message says how."""


def read_requirements(repo: Path = REPO) -> list[str]:
    """Collect the requirement specifiers of the files the installer uses.

    Args:
        repo (Path): Repository root holding ``requirements/``.

    Returns:
        list[str]: Specifiers such as ``'mmdet==3.3.0'`` (constraints) or ``'mmdet'`` (what a step
        installs), comments dropped.
    """
    specs = []
    for name in REQUIREMENT_FILES:
        for line in (repo / 'requirements' / name).read_text().splitlines():
            line = line.split('#', 1)[0].strip()
            if line:
                specs.append(line)
    return specs


def check_versions() -> str:
    """Compare installed distributions with ``requirements/*.txt`` (pins: ``constraints.txt``).

    Local version labels are ignored (``torch 2.14.1+cu130`` satisfies ``torch==2.14.1``).

    Returns:
        str: Summary for the report line.

    Raises:
        CheckFailed: Listing every missing or mismatching distribution.
    """
    from packaging.requirements import Requirement
    from packaging.version import Version

    problems = []
    specs = read_requirements()
    for spec in specs:
        req = Requirement(spec)
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f'{req.name} is not installed (want {spec})')
            continue
        public = Version(Version(installed).public)
        if req.specifier and not req.specifier.contains(public, prereleases=True):
            problems.append(f'{req.name} {installed} installed, want {spec}')
    if problems:
        raise CheckFailed('; '.join(problems))
    return f'{len(specs)} requirements satisfied'


def check_package_installed() -> str:
    """Check that ``projects.dat`` is installed from this checkout, findable from any cwd.

    Only locates the package (no import), so a broken model file cannot hide an install
    problem and vice versa; ``tests/test_environment.py`` imports it.

    Returns:
        str: Where the package was found.

    Raises:
        CheckFailed: If the distribution is missing or points to another checkout.
    """
    try:
        version = importlib.metadata.version(DIST_NAME)
    except importlib.metadata.PackageNotFoundError as exc:
        raise CheckFailed(
            f'distribution {DIST_NAME!r} is not installed (run: .venv/bin/pip '
            'install -e . --no-deps --no-build-isolation)'
        ) from exc
    spec = importlib.util.find_spec('projects.dat')
    if spec is None or spec.origin is None:
        raise CheckFailed(f'{DIST_NAME} {version} is installed but projects.dat is not found from {os.getcwd()}')
    origin = Path(spec.origin).resolve()
    if REPO not in origin.parents:
        raise CheckFailed(
            f'projects.dat comes from {origin}, not from this checkout {REPO}; re-run the editable install here'
        )
    return f'{DIST_NAME} {version} -> {origin.parent}'


def check_setuptools() -> str:
    """Check that setuptools keeps ``pkg_resources`` (``>=77.0.3,<82``).

    Returns:
        str: The installed version.

    Raises:
        CheckFailed: If the version is outside the bounds.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = importlib.metadata.version('setuptools')
    if Version(version) not in SpecifierSet('>=77.0.3,<82'):
        raise CheckFailed(
            f'setuptools {version} installed, need >=77.0.3,<82 (openmim and mmcv still import pkg_resources)'
        )
    return f'setuptools {version}'


def check_mmcv_ext() -> str:
    """Load mmcv's compiled extension.

    Returns:
        str: Compiler and CUDA build information of the extension.

    Raises:
        CheckFailed: If ``mmcv._ext`` is missing (mmcv-lite or a build without
            ``MMCV_WITH_OPS=1``), or lacks CUDA ops while ``FORCE_CUDA=1`` is set.
    """
    try:
        importlib.import_module('mmcv._ext')
        from mmcv.ops import get_compiler_version, get_compiling_cuda_version
    except ImportError as exc:
        raise CheckFailed(
            f'mmcv compiled ops do not load ({exc}); reinstall mmcv with MMCV_WITH_OPS=1 against the installed torch'
        ) from exc
    cuda = get_compiling_cuda_version()
    if os.environ.get('FORCE_CUDA') == '1' and cuda == 'not available':
        raise CheckFailed('FORCE_CUDA=1 but mmcv was built without CUDA ops')
    return f'mmcv._ext built with {get_compiler_version()}, CUDA {cuda}'


def check_toolbox_imports() -> str:
    """Import the model packages of the three toolboxes.

    Returns:
        str: The imported modules.

    Raises:
        CheckFailed: Naming the module that failed to import.
    """
    names = ('mmdet.models', 'mmseg.models', 'mmpretrain.models')
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any import-time error is a broken environment
            raise CheckFailed(f'import {name} failed: {type(exc).__name__}: {exc}') from exc
    return ', '.join(names)


def _devices() -> list[str]:
    import torch

    return ['cpu', 'cuda'] if torch.cuda.is_available() else ['cpu']


def check_nms() -> str:
    """Run ``mmcv.ops.nms`` and compare the kept boxes with ``torchvision.ops.nms``.

    Returns:
        str: The devices checked.

    Raises:
        CheckFailed: If the op fails or disagrees with torchvision.
    """
    import torch
    import torchvision
    from mmcv.ops import nms

    for device in _devices():
        gen = torch.Generator().manual_seed(0)
        xy = torch.rand(64, 2, generator=gen) * 50
        wh = torch.rand(64, 2, generator=gen) * 20 + 5
        boxes = torch.cat([xy, xy + wh], dim=1).to(device)
        scores = torch.rand(64, generator=gen).to(device)
        try:
            _, keep = nms(boxes, scores, iou_threshold=0.5)
        except Exception as exc:
            raise CheckFailed(f'mmcv.ops.nms on {device}: {type(exc).__name__}: {exc}') from exc
        want = torchvision.ops.nms(boxes, scores, 0.5)
        if not torch.equal(keep.cpu().sort().values, want.cpu().sort().values):
            raise CheckFailed(f'mmcv.ops.nms on {device} kept {keep.tolist()}, torchvision kept {want.tolist()}')
    return 'matches torchvision on ' + ', '.join(_devices())


def check_roi_align() -> str:
    """Run ``mmcv.ops.RoIAlign`` and compare it with ``torchvision.ops.roi_align``.

    Returns:
        str: The devices checked.

    Raises:
        CheckFailed: If the op fails or disagrees with torchvision.
    """
    import torch
    import torchvision
    from mmcv.ops import RoIAlign

    for device in _devices():
        gen = torch.Generator().manual_seed(0)
        feats = torch.randn(2, 3, 16, 16, generator=gen).to(device)
        rois = torch.tensor([[0, 1.0, 2.0, 30.0, 25.0], [1, 4.0, 4.0, 12.0, 20.0]]).to(device)
        try:
            out = RoIAlign((7, 7), spatial_scale=0.5, sampling_ratio=2, aligned=True)(feats, rois)
        except Exception as exc:
            raise CheckFailed(f'mmcv.ops.RoIAlign on {device}: {type(exc).__name__}: {exc}') from exc
        want = torchvision.ops.roi_align(feats, rois, (7, 7), spatial_scale=0.5, sampling_ratio=2, aligned=True)
        if out.shape != (2, 3, 7, 7) or not torch.allclose(out, want, atol=1e-5):
            diff = (out - want).abs().max().item() if out.shape == want.shape else 'n/a'
            raise CheckFailed(
                f'mmcv.ops.RoIAlign on {device} gives shape {tuple(out.shape)}, max difference to torchvision {diff}'
            )
    return 'matches torchvision on ' + ', '.join(_devices())


def check_cpu_kernels() -> str:
    """Build (or load from the cache) DAT's C++ CPU kernels and compare them with PyTorch.

    Returns:
        str: Where the kernels are cached.

    Raises:
        CheckFailed: If they do not build, or disagree with the PyTorch path.
    """
    import torch

    from projects.dat.ops import cpu_kernels, deformable_attention, neighborhood_attention

    if os.environ.get(cpu_kernels.ENV_SWITCH) == '0':
        return f'turned off ({cpu_kernels.ENV_SWITCH}=0): the fast attention runs in PyTorch'
    try:
        cpu_kernels.build()
    except Exception as exc:
        raise CheckFailed(
            f'the C++ CPU kernels do not build ({type(exc).__name__}: {str(exc)[-800:]}); a C++ '
            'compiler (g++) and ninja are needed, or set DAT_CPU_KERNELS=0 to run without them'
        ) from exc
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 5, 6, generator=gen)
    k, v = torch.randn(2, 2, 8, 12, generator=gen).unbind(0)
    pos = torch.rand(4, 12, 2, generator=gen) * 2 - 1
    table = torch.randn(2, 9, 11, generator=gen)
    nq, nk, nv = torch.randn(3, 1, 2, 9, 8, 5, generator=gen).unbind(0)
    rpb = torch.randn(2, 5, 5, generator=gen)
    outs = {}
    for switch in ('1', '0'):
        with mock.patch.dict(os.environ, {cpu_kernels.ENV_SWITCH: switch}):
            outs[switch] = (
                deformable_attention(q, k, v, pos, torch.linspace(-1, 1, 5), torch.linspace(-1, 1, 6), table, 2),
                neighborhood_attention(nq, nk, nv, rpb, 3),
            )
    for name, kernel_out, pytorch_out in zip(('deformable', 'neighbourhood'), outs['1'], outs['0'], strict=True):
        if not torch.allclose(kernel_out, pytorch_out, rtol=1e-5, atol=1e-6):
            diff = (kernel_out - pytorch_out).abs().max().item()
            raise CheckFailed(
                f'the C++ CPU kernels disagree with the PyTorch path ({name} attention, max difference {diff:.3e})'
            )
    return f'built, agree with the PyTorch path (cached in {cpu_kernels.build_directory()})'


def run_checks(checks: list[tuple[str, Callable[[], str]]]) -> bool:
    """Run checks in order, printing one line each.

    Args:
        checks (list[tuple[str, Callable[[], str]]]): (name, function) pairs.

    Returns:
        bool: True when all passed.
    """
    ok = True
    for name, fn in checks:
        start = time.perf_counter()
        try:
            detail = fn()
        except CheckFailed as exc:
            print(f'[check_env] FAIL {name}: {exc}', flush=True)
            ok = False
            continue
        print(f'[check_env] ok   {name}: {detail} ({time.perf_counter() - start:.1f}s)', flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    """Command line entry point.

    Args:
        argv (list[str] | None): Arguments; ``sys.argv[1:]`` when None.

    Returns:
        int: Exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='only versions, the package location and mmcv._ext')
    args = parser.parse_args(argv)
    checks = [
        ('pinned versions', check_versions),
        ('setuptools bounds', check_setuptools),
        ('projects.dat install', check_package_installed),
        ('mmcv compiled ops', check_mmcv_ext),
    ]
    if not args.quick:
        checks += [
            ('toolbox imports', check_toolbox_imports),
            ('mmcv.ops.nms', check_nms),
            ('mmcv.ops.RoIAlign', check_roi_align),
            ('DAT C++ CPU kernels', check_cpu_kernels),
        ]
    if not run_checks(checks):
        print('[check_env] environment is broken: see the FAIL lines above', flush=True)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
