"""Installs ``projects.dat``: the DAT / DAT++ backbones for mmdet, mmseg and mmpretrain.

The package must be importable from any working directory, because ``mim train mmdet CONFIG``
runs mmdet's own ``tools/train.py`` and the configs load us through
``custom_imports = dict(imports=['projects.dat'])``. Use ``make env`` (``tools/setup_env.sh``),
which installs the OpenMMLab stack first and then this repository in editable mode with
``pip install -e . --no-deps --no-build-isolation``.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    """Read ``__version__`` from ``projects/dat/__init__.py`` without importing it.

    Importing would need torch and mmengine, which are not there when pip builds metadata.

    Returns:
        str: The version string, e.g. ``'0.1.0'``.
    """
    init = ROOT / 'projects' / 'dat' / '__init__.py'
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", init.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no __version__ = '...' line found in {init}")
    return match.group(1)


def read_requirements(name: str) -> list[str]:
    """Read the requirement lines of ``requirements/<name>.txt``.

    Args:
        name (str): File stem, e.g. ``'runtime'``.

    Returns:
        list[str]: Requirement specifiers, comments and blank lines dropped.
    """
    path = ROOT / 'requirements' / f'{name}.txt'
    lines = (line.split('#', 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


setup(
    name='projects-dat',
    version=read_version(),
    description=(
        'Deformable Attention Transformer (DAT, DAT++) backbones for mmdetection 3, mmsegmentation 1 and mmpretrain 1'
    ),
    long_description=(ROOT / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=find_packages(include=['projects', 'projects.dat', 'projects.dat.*']),
    include_package_data=False,
    package_data={'projects.dat': ['csrc/*.cpp', 'csrc/*.h']},  # compiled on first use (models/cpu_kernels.py)
    install_requires=read_requirements('runtime'),
    extras_require={
        # mmcv needs compiled ops built against the installed torch: see tools/setup_env.sh.
        'mim': read_requirements('mminstall'),
        'tests': read_requirements('tests'),
        'build': read_requirements('build'),
    },
    classifiers=[
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3.11',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
    zip_safe=False,
)
