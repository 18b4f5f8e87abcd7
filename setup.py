"""Installs ``projects.dat``: the DAT / DAT++ backbones for mmdet, mmseg and mmpretrain.

``projects`` is a namespace package (no ``projects/__init__.py``): this distribution owns only
``projects.dat``, so that other ``projects/<name>`` folders, such as those of mmdet and mmseg,
import beside it.

``install_requires`` holds ranges of what ``projects.dat`` itself imports; the toolboxes are
extras (``pip install 'projects-dat[det]'``, ``[seg]``, ``[cls]``, ``[all]``), each with mmcv,
which the toolboxes import but do not declare. The exact set that is tested lives in
``requirements/constraints.txt``; ``make env`` (``tools/setup_env.sh``) installs it and then this
repository with ``pip install -e . --no-deps --no-build-isolation``.
"""

import re
from pathlib import Path

from setuptools import find_namespace_packages, setup

ROOT = Path(__file__).resolve().parent

# mmcv and mmengine as mmdet 3.3 declares them (in its mim requirements, not its metadata); mmcv
# 2.2 is outside what mmdet 3.3 accepts.
MMCV = 'mmcv>=2.0.0,<2.2.0'
MMENGINE = 'mmengine>=0.7.1,<1.0.0'

# What projects.dat imports. torch 2.0 runs the reference and pure-PyTorch fast paths; custom
# operators, torch.compile and the C++ kernels are used where the installed torch provides
# what they need (checked at run time).
INSTALL_REQUIRES = [
    'torch>=2.0',
    'numpy',
    MMENGINE,
    'Pillow',  # projects.dat.synthetic draws the synthetic datasets
]

# Each toolbox imports mmcv, and none declares it in its metadata (mim installs it).
TOOLBOXES = {
    'det': ['mmdet>=3.0.0,<3.4.0', MMCV],
    # mmseg.utils imports ftfy and regex (its tokenizer); mmsegmentation declares them only as extras.
    'seg': ['mmsegmentation>=1.0.0,<1.3.0', MMCV, 'ftfy', 'regex'],
    'cls': ['mmpretrain>=1.0.0,<1.3.0', MMCV],
}
ALL_TOOLBOXES = sorted({req for reqs in TOOLBOXES.values() for req in reqs})
# ONNX export (tools/deployment/pytorch2onnx.py) and ONNX Runtime, which checks the exported graph.
DEPLOY = ['onnx', 'onnxruntime']
EXTRAS_REQUIRE = {
    **TOOLBOXES,
    'all': ALL_TOOLBOXES,
    'mim': ['openmim'],  # `mim train mmdet|mmseg|mmpretrain <config>`
    # The tests run all three toolboxes, mim, ruff and the ONNX export; torchvision checks mmcv's ops.
    'tests': sorted(
        {*ALL_TOOLBOXES, *DEPLOY, 'pytest', 'ruff', 'packaging', 'torchvision', 'pycocotools', 'matplotlib', 'openmim'}
    ),
    'deploy': DEPLOY,
    # benchmark.py and profile_layers.py build timm's Swin-T where mmdet cannot be imported.
    'bench': ['timm'],
    # The Triton kernels of the attention operators on CUDA (torch's CUDA wheels for Linux bring Triton).
    'gpu': ['triton>=3.0'],
}


def read_version() -> str:
    """Read ``__version__`` from ``projects/dat/__init__.py`` without importing it.

    Importing would need torch and mmengine, which are not there when pip builds metadata.

    Returns:
        str: The version string, e.g. ``'0.2.0'``.
    """
    init = ROOT / 'projects' / 'dat' / '__init__.py'
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", init.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no __version__ = '...' line found in {init}")
    return match.group(1)


setup(
    name='projects-dat',
    version=read_version(),
    description=(
        'Deformable Attention Transformer (DAT, DAT++) backbones for mmdetection 3, mmsegmentation 1 and mmpretrain 1'
    ),
    long_description=(ROOT / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license_expression='Apache-2.0',
    license_files=['LICENSE'],
    # zip(..., strict=True) needs Python 3.10.
    python_requires='>=3.10',
    # Only projects.dat and its subpackages: a wheel that claimed `projects` itself would hide
    # every other projects/<name> folder. csrc holds data, not Python (package_data below).
    packages=find_namespace_packages(
        include=['projects.dat', 'projects.dat.*'], exclude=['projects.dat.csrc', '*.__pycache__']
    ),
    include_package_data=False,
    package_data={'projects.dat': ['csrc/*.cpp', 'csrc/*.h']},  # compiled on first use (ops/cpu_kernels.py)
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    classifiers=[
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3 :: Only',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Operating System :: POSIX :: Linux',
        'Intended Audience :: Science/Research',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
        'Topic :: Scientific/Engineering :: Image Recognition',
    ],
    zip_safe=False,
)
