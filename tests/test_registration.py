"""What ``import projects.dat`` adds to the process: names that clash with nothing, added once.

Each test runs in a fresh interpreter (this one imported ``projects.dat`` long ago), so that
the state before the import can be recorded:

- with every module of mmdet, mmseg and mmpretrain registered, the names the import adds
  (mmengine registries, root and children; file backends; checkpoint loader schemes; torch
  operators) are new names of our own, and nothing registered before is replaced, apart from
  the ``http(s)://`` checkpoint loaders, which the package replaces on purpose with one that
  loads ``weights_only``;
- importing again (two configs with ``custom_imports``, ``importlib.reload`` of the package and
  of every module in it) raises nothing and leaves one registration per name, one entry per
  object on torch's allow-list and one definition per operator.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / 'projects' / 'dat'

# Records the registrations of the process as JSON-able dicts. Registries are found from the
# registry modules of mmengine and the toolboxes, following parents and children.
SNAPSHOT = r"""
import importlib, json, sys
import torch
import mmengine.registry
from mmengine.fileio.backends.registry_utils import backends, prefix_to_backends
from mmengine.registry import Registry
from mmengine.runner.checkpoint import CheckpointLoader

for toolbox in ('mmdet', 'mmseg', 'mmpretrain'):
    importlib.import_module(f'{toolbox}.utils').register_all_modules(init_default_scope=False)
REGISTRY_MODULES = [importlib.import_module(f'{name}.registry') for name in ('mmdet', 'mmseg', 'mmpretrain')]


def name_of(obj):
    return f'{getattr(obj, "__module__", "?")}.{getattr(obj, "__qualname__", type(obj).__qualname__)}'


def registries():
    found, stack = {}, [obj for module in (mmengine.registry, *REGISTRY_MODULES) for obj in vars(module).values()
                        if isinstance(obj, Registry)]
    while stack:
        registry = stack.pop()
        if id(registry) not in found:
            found[id(registry)] = registry
            stack.extend(registry.children.values())
            if registry.parent is not None:
                stack.append(registry.parent)
    return found.values()


def root_of(registry):
    while registry.parent is not None:
        registry = registry.parent
    return registry


def snapshot():
    names = [f'{r.scope}/{r.name}' for r in registries()]
    assert len(set(names)) == len(names), f'two registries share a scope and name: {sorted(names)}'
    return {
        'registries': {f'{r.scope}/{r.name}': {key: name_of(obj) for key, obj in r.module_dict.items()}
                       for r in registries()},
        'families': {f'{r.scope}/{r.name}': f'{root_of(r).scope}/{root_of(r).name}' for r in registries()},
        'backends': {key: name_of(obj) for key, obj in backends.items()},
        'prefixes': {key: name_of(obj) for key, obj in prefix_to_backends.items()},
        'schemes': {key: name_of(obj) for key, obj in CheckpointLoader._schemes.items()},
        'ops': sorted(torch._C._dispatch_get_all_op_names()),
        'has_custom_ops': hasattr(torch.library, 'custom_op'),
        'safe_global_names': sorted(name_of(g[0] if isinstance(g, tuple) else g)
                                    for g in torch.serialization.get_safe_globals())
        if hasattr(torch.serialization, 'get_safe_globals') else None,
    }
"""


def _run(code: str, tmp_path) -> list[dict]:
    """Run ``SNAPSHOT + code`` in a fresh interpreter outside the repository; ``code`` prints
    snapshots, one JSON line each, prefixed with ``SNAPSHOT``."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run(
        [sys.executable, '-c', SNAPSHOT + code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line[len('SNAPSHOT') :]) for line in proc.stdout.splitlines() if line.startswith('SNAPSHOT')]


@pytest.fixture(scope='module')
def before_and_after_import(tmp_path_factory) -> tuple[dict, dict]:
    before, after = _run(
        "print('SNAPSHOT' + json.dumps(snapshot()))\nimport projects.dat\nprint('SNAPSHOT' + json.dumps(snapshot()))\n",
        tmp_path_factory.mktemp('import'),
    )
    return before, after


def _added(before: dict, after: dict, table: str) -> dict:
    return {key: value for key, value in after[table].items() if key not in before[table]}


def test_registered_names_are_new_and_ours(before_and_after_import):
    before, after = before_and_after_import
    assert set(after['registries']) == set(before['registries']), 'the import created or dropped a registry'
    added = {}
    for registry, entries in after['registries'].items():
        old = before['registries'][registry]
        for key, obj in entries.items():
            if key in old:
                assert obj == old[key], f'{registry}: {key} was {old[key]}, the import replaced it with {obj}'
            else:
                added[(registry, key)] = obj
    assert added.get(('mmengine/model', 'DAT')) == 'projects.dat.models.dat.DAT'
    for (registry, key), obj in added.items():
        assert obj.startswith('projects.dat.'), f'{registry}: {key} -> {obj} is not ours'
        # A toolbox registry looks up its own names before its root's: the same name in any
        # registry of the family would shadow ours (or be shadowed) under that default scope.
        family = after['families'][registry]
        holders = [
            r for r, entries in before['registries'].items() if after['families'][r] == family and key in entries
        ]
        assert holders == [], f'{key} (ours, in {registry}) is already registered in {holders}'


# mmengine's checkpoint schemes that name a model in a table of URLs (projects.dat.checkpoint.url_loader).
NAMED_SCHEMES = ('torchvision://', 'modelzoo://', 'open-mmlab://', 'openmmlab://', 'mmcls://')


def test_file_backends_and_loaders_only_add_names(before_and_after_import):
    before, after = before_and_after_import
    for table in ('backends', 'prefixes'):
        for key, obj in before[table].items():
            assert after[table][key] == obj, f'file backend {key!r} replaced by {after[table][key]}'
        for key, obj in _added(before, after, table).items():
            assert key.startswith('dat_') and obj.startswith('projects.dat.'), (key, obj)
    for prefix, loader in after['schemes'].items():
        if prefix in ('http://', 'https://', *NAMED_SCHEMES):
            # The only replacements: mmengine's URL loaders unpickle everything.
            assert loader.startswith('projects.dat.'), (prefix, loader)
        else:
            assert before['schemes'].get(prefix) == loader, f'checkpoint loader for {prefix!r} changed to {loader}'


def test_custom_operators_live_in_a_namespace_of_their_own(before_and_after_import):
    before, after = before_and_after_import
    assert not [op for op in before['ops'] if op.startswith('dat::')], 'the dat:: namespace is taken'
    added = sorted(set(after['ops']) - set(before['ops']))
    defined = sorted(
        set(re.findall(r"custom_op\('(dat::\w+)'", ''.join(path.read_text() for path in PACKAGE.rglob('*.py'))))
    )
    assert defined, 'no custom operator found in the sources: has the way they are defined changed?'
    # Without torch.library.custom_op (torch < 2.4) the same functions run as plain callables.
    assert added == (defined if after['has_custom_ops'] else [])


IMPORT_TWICE = r"""
import pathlib
from mmengine.config import Config
configs = []
for name in ('first', 'second'):
    path = pathlib.Path(f'{name}.py')
    path.write_text("custom_imports = dict(imports=['projects.dat'], allow_failed_imports=False)\n"
                    "model = dict(type='DAT', arch='datpp-t')\n")
    configs.append(Config.fromfile(str(path)))
print('SNAPSHOT' + json.dumps(snapshot()))
import projects.dat
importlib.reload(projects.dat)
print('SNAPSHOT' + json.dumps(snapshot()))
# Every module of the package executed again: new classes and functions, same names.
for name in sorted(n for n in sys.modules if n == 'projects.dat' or n.startswith('projects.dat.')):
    importlib.reload(sys.modules[name])
print('SNAPSHOT' + json.dumps(snapshot()))
from mmengine.registry import MODELS
assert MODELS.get('DAT') is sys.modules['projects.dat.models.dat'].DAT, 'the registry holds a stale class'
"""


def test_importing_twice_is_harmless(tmp_path):
    after_configs, after_package_reload, after_module_reloads = _run(IMPORT_TWICE, tmp_path)
    for again in (after_package_reload, after_module_reloads):
        for registry, entries in after_configs['registries'].items():
            assert set(again['registries'][registry]) == set(entries), registry
        assert again['backends'] == after_configs['backends']
        assert again['schemes'] == after_configs['schemes']
        assert [op for op in again['ops'] if op.startswith('dat::')] == [
            op for op in after_configs['ops'] if op.startswith('dat::')
        ]
        # The allow-list holds each object once: a reload must not add a second copy of ours.
        assert again['safe_global_names'] == after_configs['safe_global_names']
