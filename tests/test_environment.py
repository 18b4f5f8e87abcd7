"""The installed environment: package importable from anywhere, pins, mim, idempotent installer.

These run with the interpreter of ``.venv`` (``make test``) and take seconds each.
"""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
SETUP_ENV = REPO / 'tools' / 'setup_env.sh'


def run_python(code: str, cwd: str = '/', timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this environment, outside the repository.

    PYTHONPATH is dropped so that only the installed package can satisfy the imports.
    """
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    return subprocess.run(
        [sys.executable, '-c', code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_import_from_root_directory():
    """`mim train` runs the toolbox's own script: the package must not need the repo on sys.path."""
    proc = run_python(
        'import projects.dat, sys; print(projects.dat.__file__); '
        f'print(any(p.rstrip("/") == {str(REPO)!r} for p in sys.path))'
    )
    assert proc.returncode == 0, proc.stderr
    origin, repo_on_path = proc.stdout.split()[-2:]
    assert Path(origin) == REPO / 'projects' / 'dat' / '__init__.py'
    assert repo_on_path == 'False', 'the repository root must not be on sys.path for this test'


def test_version_is_the_installed_distribution_version():
    import projects.dat

    assert isinstance(projects.dat.__version__, str)
    assert re.fullmatch(r'\d+\.\d+\.\d+(\S*)', projects.dat.__version__)
    assert importlib.metadata.version('projects-dat') == projects.dat.__version__


def test_custom_imports_register_dat_from_any_directory(tmp_path):
    """What a config's ``custom_imports`` does inside mmdet's train script."""
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(
        "custom_imports = dict(imports=['projects.dat'], allow_failed_imports=False)\n"
        "model = dict(type='DAT', arch='datpp-t')\n"
    )
    proc = run_python(
        'from mmengine.config import Config\n'
        'from mmengine.registry import MODELS\n'
        f'cfg = Config.fromfile({str(cfg)!r})\n'
        "print(MODELS.get('DAT').__module__)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith('projects.dat')


def test_backbone_imports_and_trains_without_mmcv():
    """``install_requires`` leaves mmcv to the toolbox extras: ``projects.dat`` must import, build
    DAT and DAT++ and run a training step (drop path, offset network, fast operators) where mmcv
    cannot be imported."""
    proc = run_python(
        'import sys; sys.modules["mmcv"] = None\n'  # any `import mmcv...` now raises ImportError
        'import torch, projects.dat\n'
        'from projects.dat.models.dat import DAT\n'
        'for arch in ("dat-t", "datpp-t"):\n'
        '    model = DAT(arch, drop_path_rate=0.5).train()\n'
        '    sum(f.mean() for f in model(torch.randn(2, 3, 64, 96))).backward()\n'
        'print(sorted(m for m in sys.modules if m.split(".")[0] == "mmcv"))'
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split('\n')[-2] == "['mmcv']"  # only the blocker


def test_setuptools_within_bounds():
    """openmim and mmcv still import pkg_resources, removed in setuptools 82."""
    version = Version(importlib.metadata.version('setuptools'))
    assert version in SpecifierSet('>=77.0.3,<82'), f'setuptools {version}'


def _import_check_env():
    sys.path.insert(0, str(REPO / 'tools'))
    try:
        import check_env
    finally:
        sys.path.remove(str(REPO / 'tools'))
    return check_env


def test_pinned_versions_match_requirements():
    check_env = _import_check_env()
    assert check_env.check_versions().endswith('requirements satisfied')


def test_check_env_builds_the_cpu_kernels_unless_turned_off(monkeypatch):
    check_env = _import_check_env()
    monkeypatch.setenv('DAT_CPU_KERNELS', '0')
    assert check_env.check_cpu_kernels().startswith('turned off (DAT_CPU_KERNELS=0)')
    monkeypatch.delenv('DAT_CPU_KERNELS')
    assert check_env.check_cpu_kernels().startswith('built, agree with the PyTorch path')


def test_cpu_kernels_build_with_this_environments_ninja(monkeypatch, tmp_path):
    """A system ninja first on PATH must not build the cached kernels: two ninja versions taking
    turns recompile each other's builds (ninja 1.13 hashes its log differently)."""
    import torch.utils.cpp_extension

    from projects.dat.ops import cpu_kernels

    scripts = Path(sys.executable).parent
    if not (scripts / 'ninja').is_file():
        pytest.skip(f'no ninja beside {sys.executable}')
    system = tmp_path / 'bin'
    system.mkdir()
    (system / 'ninja').write_text('#!/bin/sh\nexit 1\n')
    (system / 'ninja').chmod(0o755)
    path = f'{system}{os.pathsep}{os.environ["PATH"]}'
    monkeypatch.setenv('PATH', path)
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'extensions'))
    seen = []
    monkeypatch.setattr(torch.utils.cpp_extension, 'load', lambda *args, **kwargs: seen.append(shutil.which('ninja')))
    cpu_kernels.build()
    assert seen == [str(scripts / 'ninja')]
    assert os.environ['PATH'] == path  # restored


def test_mim_lists_the_openmmlab_stack():
    proc = subprocess.run([sys.executable, '-m', 'mim', 'list'], cwd='/', capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines()[2:] if line}
    assert listed.get('mmdet') == '3.3.0', proc.stdout
    assert listed.get('mmcv') == '2.1.0', proc.stdout
    assert listed.get('mmengine') == '0.10.7', proc.stdout


def test_mim_finds_mmdet_train_script():
    """`mim train mmdet CONFIG` runs this script with our config path."""
    from mim.utils import get_installed_path

    script = Path(get_installed_path('mmdet')) / '.mim' / 'tools' / 'train.py'
    assert script.is_file(), script


def test_installer_second_run_is_a_fast_no_op():
    check = subprocess.run(['bash', str(SETUP_ENV), '--check'], cwd=REPO, capture_output=True, text=True, timeout=300)
    if check.returncode == 3:
        pytest.fail(
            'the environment is out of date with requirements/ or the installer: '
            f'run `make env` first\n{check.stdout}{check.stderr}'
        )
    assert check.returncode == 0, check.stdout + check.stderr

    start = time.monotonic()
    proc = subprocess.run(['bash', str(SETUP_ENV)], cwd=REPO, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'is up to date' in proc.stdout, proc.stdout
    assert 'step 1/6' not in proc.stdout, proc.stdout
    assert elapsed < 60, f'second run took {elapsed:.1f}s'


def test_installer_rejects_unknown_arguments():
    proc = subprocess.run(['bash', str(SETUP_ENV), '--bogus'], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown argument '--bogus'" in proc.stderr
