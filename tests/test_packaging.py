"""The package as a user installs it: one wheel, built once per test module, and what it declares.

- ``projects`` is a namespace package: the wheel carries ``projects/dat/`` only, and a foreign
  ``projects/<name>/`` folder imports beside ``projects.dat`` (wheel and editable install);
- the metadata declares ranges, not pins: what ``projects.dat`` imports, the toolboxes as extras,
  the Python versions the code runs on; the tested set in ``requirements/constraints.txt`` lies
  inside those ranges;
- package data: every C++ kernel source (compiled on first use), the licence.
"""

import ast
import email.message
import email.parser
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / 'projects' / 'dat'
# What setup.py reads to build the wheel.
BUILD_INPUTS = ('setup.py', 'pyproject.toml', 'README.md', 'LICENSE', 'requirements', 'projects')
TOOLBOX_EXTRAS = {'det': 'mmdet', 'seg': 'mmsegmentation', 'cls': 'mmpretrain'}


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    """A wheel of this checkout, built like ``pip wheel .`` (without build isolation: no network)."""
    tmp = tmp_path_factory.mktemp('wheel')
    # Built from a copy: a build/ folder left in the checkout by an earlier build would otherwise
    # be packaged instead of the current sources.
    source = tmp / 'source'
    source.mkdir()
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns('__pycache__', '*.egg-info'))
        else:
            shutil.copy(path, source)
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            'pip',
            'wheel',
            '--no-deps',
            '--no-build-isolation',
            '--no-index',
            '-q',
            '-w',
            str(tmp),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = tmp.glob('projects_dat-*.whl')
    return built


@pytest.fixture(scope='module')
def wheel_files(wheel) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


@pytest.fixture(scope='module')
def metadata(wheel, wheel_files) -> email.message.Message:
    (name,) = [n for n in wheel_files if n.endswith('.dist-info/METADATA')]
    with zipfile.ZipFile(wheel) as archive:
        return email.parser.Parser().parsestr(archive.read(name).decode())


def _requirements(metadata, extra: str | None = None) -> dict[str, Requirement]:
    """The Requires-Dist entries of the base install (``extra=None``) or of one extra, by name."""
    found = {}
    for line in metadata.get_all('Requires-Dist'):
        req = Requirement(line)
        in_extra = req.marker is not None and req.marker.evaluate({'extra': extra or ''})
        if (extra is None and req.marker is None) or (extra is not None and in_extra):
            found[req.name.lower()] = req
    return found


def _constraints() -> dict[str, SpecifierSet]:
    pins = {}
    for line in (REPO / 'requirements' / 'constraints.txt').read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[req.name.lower()] = req.specifier
    return pins


def test_wheel_carries_every_kernel_source(wheel_files):
    """The C++ kernels compile on first use from the installed package: a wheel (a non-editable
    install) must carry every file of ``csrc``, headers included."""
    packaged = {Path(name).name for name in wheel_files if name.startswith('projects/dat/csrc/')}
    sources = {path.name for path in (PACKAGE / 'csrc').iterdir() if path.is_file()}
    assert packaged == sources


def test_wheel_carries_the_package_and_licence_only_below_projects_dat(wheel_files):
    """A wheel that shipped ``projects/__init__.py`` would make ``projects`` a regular package and
    hide every other ``projects/<name>`` folder."""
    assert 'projects/__init__.py' not in wheel_files
    outside = [n for n in wheel_files if not n.startswith(('projects/dat/', 'projects_dat-'))]
    assert outside == []
    sources = {p.relative_to(REPO).as_posix() for p in PACKAGE.rglob('*.py') if '__pycache__' not in p.parts}
    assert sources <= set(wheel_files)
    assert not [n for n in wheel_files if '__pycache__' in n or n.endswith('.pyc')]
    assert any(n.endswith('.dist-info/licenses/LICENSE') for n in wheel_files)


def test_metadata_version_python_and_licence(metadata):
    assert metadata['Name'] == 'projects-dat'
    assert metadata['Version'] == importlib.metadata.version('projects-dat')
    assert metadata['License-Expression'] == 'Apache-2.0'
    requires_python = SpecifierSet(metadata['Requires-Python'])
    # zip(..., strict=True) in the package needs 3.10; the suite runs on this interpreter.
    assert '3.9' not in requires_python and '3.10' in requires_python
    assert f'{sys.version_info.major}.{sys.version_info.minor}' in requires_python
    classified = {c.rsplit(' :: ', 1)[-1] for c in metadata.get_all('Classifier') if c.startswith('Programming')}
    assert {'3.10', '3.11'} <= classified


def test_citation_and_changelog_name_this_version(metadata):
    import yaml

    citation = yaml.safe_load((REPO / 'CITATION.cff').read_text())
    assert citation['cff-version'] == '1.2.0'
    assert str(citation['version']) == metadata['Version']
    assert citation['license'] == metadata['License-Expression']
    cited = {ref['url'] for ref in citation['references']}
    assert cited == {'https://arxiv.org/abs/2201.00520', 'https://arxiv.org/abs/2309.01430'}
    for ref in citation['references']:
        assert [a['family-names'] for a in ref['authors']] == ['Xia', 'Pan', 'Song', 'Li', 'Huang']
    headings = [line[3:].strip() for line in (REPO / 'CHANGELOG.md').read_text().splitlines() if line.startswith('## ')]
    assert headings[0] == metadata['Version'], 'CHANGELOG.md: the newest section must be this version'


def test_install_requires_are_ranges_of_what_the_package_imports(metadata):
    base = _requirements(metadata)
    assert set(base) == {'torch', 'numpy', 'mmengine', 'pillow'}
    assert base['torch'].specifier == SpecifierSet('>=2.0')
    # mmengine as mmdet 3.3 declares it (mmcv, which the package does not import: the toolbox extras).
    assert base['mmengine'].specifier == SpecifierSet('>=0.7.1,<1.0.0')
    pinned = [
        line
        for line in metadata.get_all('Requires-Dist')
        if any(spec.operator in ('==', '===') for spec in Requirement(line).specifier)
    ]
    assert pinned == [], 'exact pins belong in requirements/constraints.txt'

    # Every third-party module that projects/dat imports at module level is a base requirement,
    # and every base requirement is imported; a module imported only inside the function that
    # needs it is an optional dependency, declared by an extra, and so is what a module of the
    # package imports that the package itself imports only inside a function (the Triton kernels).
    trees = {path: ast.parse(path.read_text(), str(path)) for path in PACKAGE.rglob('*.py')}
    lazy_modules, eager_modules = set(), set()
    for tree in trees.values():
        top_level = set(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                names = {alias.name for alias in node.names} | {(node.module or '').split('.')[-1]}
                (eager_modules if node in top_level else lazy_modules).update(names)
    optional_files = {path for path in trees if path.stem in lazy_modules - eager_modules}
    assert {path.stem for path in optional_files} == {'deformable_triton', 'neighborhood_triton'}
    imported, optional = set(), set()
    for path, tree in trees.items():
        top_level = set(tree.body) if path not in optional_files else set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name.split('.')[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = {node.module.split('.')[0]}
            else:
                continue
            (imported if node in top_level else optional).update(names)
    distributions = importlib.metadata.packages_distributions()

    def distribution(module):
        return distributions.get(module, [module])[0].lower()

    third_party = imported - set(sys.stdlib_module_names) - {'projects'}
    assert {distribution(m) for m in third_party} == set(base), f'projects/dat imports {sorted(third_party)}'
    extras = {name for extra in metadata.get_all('Provides-Extra') for name in _requirements(metadata, extra)}
    undeclared = {distribution(m) for m in optional - set(sys.stdlib_module_names) - {'projects'}}
    assert undeclared - set(base) <= extras, f'imported in functions, in no extra: {sorted(undeclared - extras)}'


def test_toolboxes_tests_and_deploy_are_extras(metadata):
    extras = set(metadata.get_all('Provides-Extra'))
    assert {'det', 'seg', 'cls', 'all', 'tests', 'deploy', 'mim'} <= extras
    ranges = {'mmdet': '>=3.0.0,<3.4.0', 'mmsegmentation': '>=1.0.0,<1.3.0', 'mmpretrain': '>=1.0.0,<1.3.0'}
    for extra, toolbox in TOOLBOX_EXTRAS.items():
        assert _requirements(metadata, extra)[toolbox].specifier == SpecifierSet(ranges[toolbox])
        assert toolbox not in _requirements(metadata), f'{toolbox} must be an extra, not required'
        # The toolboxes import mmcv but do not declare it; mmcv as mmdet 3.3 declares it to mim
        # (without its release candidates).
        assert _requirements(metadata, extra)['mmcv'].specifier == SpecifierSet('>=2.0.0,<2.2.0')
    union = {name for extra in TOOLBOX_EXTRAS for name in _requirements(metadata, extra)}
    assert set(_requirements(metadata, 'all')) == union
    assert {'ftfy', 'regex'} <= set(_requirements(metadata, 'seg'))  # imported by mmseg.utils
    assert {'pytest', 'ruff', *union} <= set(_requirements(metadata, 'tests'))
    assert {'onnx', 'onnxruntime'} <= set(_requirements(metadata, 'deploy'))
    assert set(_requirements(metadata, 'deploy')) <= set(_requirements(metadata, 'tests'))  # tests/test_onnx.py
    assert 'openmim' in _requirements(metadata, 'mim')


def test_tested_set_lies_inside_the_declared_ranges(metadata):
    """``requirements/constraints.txt`` (what .venv runs) must be an install the metadata allows,
    and must pin everything the base install, the toolbox extras and the deploy extra name."""
    pins = _constraints()
    declared = {**_requirements(metadata, 'all'), **_requirements(metadata, 'deploy'), **_requirements(metadata)}
    for name, req in declared.items():
        assert name in pins, f'{name} is declared but not pinned in requirements/constraints.txt'
        (pin,) = [spec for spec in pins[name] if spec.operator == '==']
        assert Version(pin.version) in req.specifier, f'{name}{pin} is outside {req}'
        installed = Version(Version(importlib.metadata.version(name)).public)
        assert installed in req.specifier, f'{name} {installed} is installed, outside {req}'


def test_wheel_installs_into_this_environment_without_changing_it(wheel, tmp_path):
    """An environment that already runs the three toolboxes (this one) satisfies every range:
    pip would add projects-dat and touch nothing else (a dry run, no index)."""
    report = tmp_path / 'report.json'
    proc = subprocess.run(
        [
            sys.executable,
            '-m',
            'pip',
            'install',
            '--dry-run',
            '--no-index',
            '--disable-pip-version-check',
            '-q',
            '--report',
            str(report),
            f'{wheel}[all,tests,mim]',
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    would_install = [item['metadata']['name'] for item in json.loads(report.read_text())['install']]
    assert would_install == ['projects-dat']


# Import order and where the foreign folder sits on sys.path: both must work.
NAMESPACE_CASES = {
    'dat-first_foreign-appended': ('projects.dat', 'projects.other', 'append'),
    'other-first_foreign-prepended': ('projects.other', 'projects.dat', 'prepend'),
}
NAMESPACE_CHECK = """
import importlib, sys
first, second, where, foreign = sys.argv[1:]
if where == 'append':
    sys.path.append(foreign)
else:
    sys.path.insert(0, foreign)
importlib.import_module(first)
importlib.import_module(second)
import projects, projects.dat, projects.other
from mmengine.registry import MODELS
assert MODELS.get('DAT') is projects.dat.DAT
print(projects.__file__)
print(projects.dat.__file__)
print(projects.other.__file__)
"""


@pytest.fixture(scope='module')
def foreign_projects(tmp_path_factory) -> Path:
    """A folder holding ``projects/other/`` as mmdet's and mmseg's checkouts hold ``projects/<Name>/``
    (no ``projects/__init__.py``)."""
    root = tmp_path_factory.mktemp('foreign')
    (root / 'projects' / 'other').mkdir(parents=True)
    (root / 'projects' / 'other' / '__init__.py').write_text("NAME = 'other'\n")
    return root


@pytest.fixture(scope='module')
def wheel_venv(wheel, tmp_path_factory) -> tuple[Path, Path]:
    """A throwaway virtual environment with the wheel installed (not editable) and this
    environment's packages (torch, mmengine, ...) reachable through a ``.pth`` file; this
    environment's own editable install of the checkout is not (its ``.pth`` is not processed)."""
    venv = tmp_path_factory.mktemp('venv')
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=120)
    python = venv / 'bin' / 'python'
    site = Path(
        subprocess.run(
            [str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / 'outer_environment.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index', '-q', '--target', str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return python, site


def _run_namespace_check(python: Path, case: str, foreign: Path, cwd: Path) -> tuple[Path, Path, Path]:
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run(
        [str(python), '-c', NAMESPACE_CHECK, *NAMESPACE_CASES[case], str(foreign)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    namespace_file, dat_file, other_file = proc.stdout.strip().splitlines()[-3:]
    assert namespace_file == 'None', 'projects must be a namespace package'
    return Path(dat_file), Path(other_file)


@pytest.mark.parametrize('case', list(NAMESPACE_CASES))
def test_wheel_install_shares_projects_with_a_foreign_folder(case, wheel_venv, foreign_projects, tmp_path):
    python, site = wheel_venv
    dat_file, other_file = _run_namespace_check(python, case, foreign_projects, cwd=tmp_path)
    assert dat_file == site / 'projects' / 'dat' / '__init__.py'  # the wheel, not the checkout
    assert other_file == foreign_projects / 'projects' / 'other' / '__init__.py'


def test_editable_install_shares_projects_with_a_foreign_folder(foreign_projects, tmp_path):
    """``make env`` installs the checkout in editable mode; from any directory, next to a foreign
    ``projects`` folder, ``projects.dat`` is still the checkout's."""
    case = 'other-first_foreign-prepended'
    dat_file, other_file = _run_namespace_check(Path(sys.executable), case, foreign_projects, cwd=tmp_path)
    assert dat_file == PACKAGE / '__init__.py'
    assert other_file == foreign_projects / 'projects' / 'other' / '__init__.py'
