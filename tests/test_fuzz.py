"""Fuzz tests of the public entry points (issue 8): each input either works or raises one of
our documented errors -- never another exception, a hang, a crash of the interpreter, or a
non-finite output for a valid input.

- ``DAT.forward``: random image sizes (1x1 up to odd, non-square and 1-pixel-wide ones),
  batches of 1-3, float32, float64 (model and input) and bfloat16 under CPU autocast, both
  versions, random ``out_indices``; invalid dtypes and shapes; training-mode backward.
- ``DAT(...)`` construction with invalid settings: ``ValueError``/``TypeError`` naming them.
- Files: random bytes, empty, JSON, text, zip archives of garbage, plain pickles, truncated
  and byte-corrupted real checkpoints go through ``load_original_checkpoint``,
  ``extract_state_dict``, ``convert_original_state_dict``, ``DAT(init_cfg=Pretrained)``
  and the converter CLI. They run in a separate worker process (this file, run as a
  script) so that a crash of the interpreter is seen as a signal, not as a dead test run.
- ``convert_original_state_dict`` on mutated original state dicts (keys dropped, renamed,
  added, shapes changed): ``ConversionError``.

Everything is drawn from ``random.Random(SEED)``: the same cases every run. Known bugs in
the code under test are marked ``xfail(strict=True)`` with the reason, so that the mark has
to go when they are fixed; the one exception is an upstream PyTorch bug that reads
uninitialised memory and so fails only most of the time (``ONEDNN_BF16_WIDTH1``).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
import traceback
import zipfile
from pathlib import Path

import pytest
import torch
from fixtures.tiny_archs import TINY

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / 'shared' / 'golden'
CONVERTER = REPO / 'tools' / 'model_converters' / 'dat_official.py'
SEED = 20220623
needs_golden = pytest.mark.skipif(not GOLDEN.is_dir(), reason='../shared/golden not present')


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """One intra-op thread: these models are tiny, and on a busy 2-core machine two spinning
    OpenMP threads make each forward pass ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ONEDNN_BF16_WIDTH1 = (
    'PyTorch/oneDNN bug: the bfloat16 weight gradient of a strided conv is garbage '
    '(uninitialised memory, often inf/NaN) when its output is 1 pixel wide: in DAT++ (stem '
    'conv2, downsampling convs) for every image at most 16 pixels wide; on CPUs with AVX-512 '
    'BF16 also in v1 (its 4x4 stride-4 stem) for images at most 4 pixels wide (reported to the '
    'lead; padding such maps to width 2 gives the same output)'
)


# ---------------------------------------------------------------------------------------------
# DAT.forward
# ---------------------------------------------------------------------------------------------

EDGE_SIZES = [(1, 1), (1, 2), (2, 1), (3, 5), (7, 7), (37, 61), (61, 37), (1, 97), (97, 1), (32, 32), (33, 31), (2, 64)]


def _forward_cases() -> list:
    rng = random.Random(SEED)
    sizes = EDGE_SIZES + [(rng.randint(1, 80), rng.randint(1, 80)) for _ in range(6)]
    cases = []
    for version in ('v1', 'pp'):
        for h, w in sizes:
            dtype = rng.choice(['float32', 'float64', 'bf16-autocast'])
            k = rng.randint(1, 4)
            out_indices = tuple(sorted(rng.sample(range(4), k)))
            batch = rng.randint(1, 3)
            cases.append(
                pytest.param(
                    version,
                    batch,
                    h,
                    w,
                    dtype,
                    out_indices,
                    id=f'{version}-{batch}x{h}x{w}-{dtype}-out{"".join(map(str, out_indices))}',
                )
            )
    return cases


@pytest.mark.parametrize('version, batch, h, w, dtype, out_indices', _forward_cases())
def test_forward_any_valid_input(version, batch, h, w, dtype, out_indices):
    torch.manual_seed(SEED)
    from projects.dat import DAT

    model = DAT(TINY[version], out_indices=out_indices).eval()
    x = torch.randn(batch, 3, h, w) * 50 + 100  # unnormalised-looking images are valid too
    if dtype == 'float64':
        model, x = model.double(), x.double()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bf16-autocast'):
        outs = model(x)
    assert len(outs) == len(out_indices)
    for i, out in zip(out_indices, outs, strict=True):
        stride = 2 ** (i + 2)
        assert out.shape == (batch, TINY[version]['dims'][i], math.ceil(h / stride), math.ceil(w / stride))
        assert torch.isfinite(out).all(), f'non-finite output of stage {i}'
        if dtype == 'float64':
            assert out.dtype == torch.float64
    if dtype == 'float64' and batch > 1:
        # Images of a batch do not influence each other.
        with torch.no_grad():
            single = model(x[-1:])
        for out, ref in zip(outs, single, strict=True):
            torch.testing.assert_close(out[-1:], ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    'make_input, match',
    [
        (lambda: torch.zeros(1, 3, 9, 9, dtype=torch.uint8), r"parameters' dtype torch.float32 .*got torch.uint8"),
        (lambda: torch.zeros(2, 3, 9, 9, dtype=torch.int32), r'got torch.int32'),
        (lambda: torch.zeros(1, 3, 9, 9, dtype=torch.int64), r'got torch.int64'),
        (lambda: torch.zeros(1, 3, 9, 9, dtype=torch.bool), r'got torch.bool'),
        (lambda: torch.zeros(1, 3, 9, 9, dtype=torch.float16), r'got torch.float16'),
        (lambda: torch.zeros(1, 3, 9, 9, dtype=torch.float64), r'got torch.float64'),
        (lambda: torch.zeros(1, 3, 9, 9, dtype=torch.complex64), r'got torch.complex64'),
        (lambda: torch.zeros(3, 9, 9), r'shape \(B, 3, H, W\), got \(3, 9, 9\)'),
        (lambda: torch.zeros(1, 1, 9, 9), r'got \(1, 1, 9, 9\)'),
        (lambda: torch.zeros(1, 3, 1, 9, 9), r'got \(1, 3, 1, 9, 9\)'),
        (lambda: torch.zeros(0, 3, 9, 9), r'non-empty images .*got \(0, 3, 9, 9\)'),
        (lambda: torch.zeros(1, 3, 9, 0), r'non-empty images .*got \(1, 3, 9, 0\)'),
    ],
    ids=[
        'uint8',
        'int32',
        'int64',
        'bool',
        'float16',
        'float64-into-float32',
        'complex64',
        '3d',
        '1-channel',
        '5d',
        'empty-batch',
        'zero-width',
    ],
)
@pytest.mark.parametrize('version', ['v1', 'pp'])
def test_forward_invalid_input_is_a_value_error(version, make_input, match):
    from projects.dat import DAT

    with pytest.raises(ValueError, match=match):
        DAT(TINY[version]).eval()(make_input())


def _backward_cases() -> list:
    rng = random.Random(SEED + 1)
    cases = []
    for version in ('v1', 'pp'):
        for h, w in [(1, 1), (5, 3), (37, 61), (1, 97), (97, 1), (rng.randint(8, 64), rng.randint(8, 64))]:
            for amp in (False, True):
                marks = []
                if amp and w <= (16 if version == 'pp' else 4):
                    # Not strict: the garbage is whatever the memory held, sometimes zeros,
                    # so a case passes now and then (2 runs in 14 here).
                    marks = [pytest.mark.xfail(strict=False, reason=ONEDNN_BF16_WIDTH1)]
                cases.append(
                    pytest.param(
                        version,
                        h,
                        w,
                        amp,
                        rng.random() < 0.5,
                        marks=marks,
                        id=f'{version}-{h}x{w}-{"bf16" if amp else "fp32"}',
                    )
                )
    return cases


@pytest.mark.parametrize('version, h, w, amp, with_cp', _backward_cases())
def test_training_step_gives_finite_gradients(version, h, w, amp, with_cp):
    """Forward and backward in training mode (drop path on): every parameter gets a finite
    gradient. Three seeds per case (the bf16 failure depends on memory contents)."""
    from projects.dat import DAT

    for seed in range(3):
        torch.manual_seed(seed)
        model = DAT(TINY[version], drop_path_rate=0.2, with_cp=with_cp).train()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            outs = model(torch.randn(2, 3, h, w))
        sum(o.float().square().mean() for o in outs).backward()
        bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not bad, f'seed {seed}: no or non-finite gradient for {bad[:5]}'


# ---------------------------------------------------------------------------------------------
# Construction with invalid settings
# ---------------------------------------------------------------------------------------------


def _bad(reason):
    return [pytest.mark.xfail(strict=True, reason=reason)]


CONSTRUCTION_CASES = [
    # (kwargs, name the message must contain, xfail marks)
    pytest.param(
        dict(img_size=16),
        'img_size',
        id='img_size=16',
    ),
    pytest.param(dict(img_size=0), 'img_size', id='img_size=0'),
    pytest.param(dict(img_size=(224, 8)), 'img_size', id='img_size=(224,8)'),
    pytest.param(
        dict(img_size=(224,)),
        'img_size',
        id='img_size=(224,)',
    ),
    pytest.param(
        dict(img_size='224'),
        'img_size',
        id='img_size=str',
    ),
    pytest.param(
        dict(arch_update=dict(window_size=0)),
        'window_size',
        id='window_size=0',
    ),
    pytest.param(
        dict(arch_update=dict(neighborhood_size=0)),
        'neighborhood_size',
        id='neighborhood_size=0',
    ),
    pytest.param(
        dict(arch_update=dict(key_strides=[0, 1, 1, 1])),
        'key_strides',
        id='key_strides=0',
    ),
    pytest.param(
        dict(arch_update=dict(mlp_ratio=0)),
        'mlp_ratio',
        id='mlp_ratio=0',
    ),
    pytest.param(
        dict(arch_update=dict(heads=[0, 2, 2, 4])),
        'heads',
        id='heads=0',
    ),
    pytest.param(
        dict(arch_update=dict(dims=[0, 32, 64, 128])),
        'dims',
        id='dims=0',
    ),
    pytest.param(
        dict(arch_update=dict(dims=[16.0, 32, 64, 128])),
        'dims',
        id='dims=float',
    ),
    pytest.param(dict(arch_update=dict(groups=[1, 1, 0, 2])), 'groups', id='groups=0'),
    pytest.param(dict(arch_update=dict(heads=[1, 2, 2, 3])), 'heads', id='heads-not-dividing'),
    pytest.param(dict(arch_update=dict(stage_spec=['ND', 'N', 'NX', 'DD'])), 'stage_spec', id='spec-X'),
    pytest.param(dict(arch_update=dict(version=2)), 'version', id='version=2'),
    pytest.param(dict(out_indices=(-1,)), 'out_indices', id='out_indices=-1'),
    pytest.param(dict(frozen_stages=-2), 'frozen_stages', id='frozen_stages=-2'),
    pytest.param(dict(drop_path_rate=-0.1), 'drop_path_rate', id='drop_path_rate<0'),
]


@pytest.mark.parametrize('kwargs, name', CONSTRUCTION_CASES)
@pytest.mark.parametrize('version', ['pp'])
def test_invalid_settings_raise_errors_naming_them(version, kwargs, name):
    from projects.dat import DAT

    kwargs = dict(kwargs)
    arch = dict(TINY[version], **kwargs.pop('arch_update', {}))
    with pytest.raises((ValueError, TypeError), match=name):
        model = DAT(arch, **kwargs).eval()
        model(torch.randn(1, 3, 37, 61))


# ---------------------------------------------------------------------------------------------
# convert_original_state_dict on mutated original weights
# ---------------------------------------------------------------------------------------------


def _load_golden(name: str) -> dict:
    return torch.load(GOLDEN / f'{name}.pt', weights_only=True)['state_dict']


def _mutate(sd: dict, kind: str, rng: random.Random) -> dict:
    sd = dict(sd)
    keys = [k for k in sd if k.startswith('stages.')]
    key = rng.choice(keys)
    if kind == 'drop':
        del sd[key]
    elif kind == 'rename':
        sd[key + '_renamed'] = sd.pop(key)
    elif kind == 'extra':
        sd[f'stages.{rng.randrange(4)}.attns.0.unknown'] = torch.ones(3)
    elif kind == 'shrink':
        big = [k for k in keys if sd[k].dim() and sd[k].shape[0] > 1 and not k.endswith('_index')]
        key = rng.choice(big)
        sd[key] = sd[key][:1]
    elif kind == 'scalar':
        sd[key] = torch.tensor(0.5)
    elif kind == 'no-head':
        sd = {k: v for k, v in sd.items() if not k.startswith('cls_head.')}
    elif kind == 'no-stem':
        sd = {k: v for k, v in sd.items() if not k.startswith('patch_proj.')}
    elif kind == 'half-prefixed':
        sd = {(f'backbone.{k}' if i % 2 else k): v for i, (k, v) in enumerate(sd.items())}
    elif kind == 'no-downsample':
        sd = {k: v for k, v in sd.items() if not k.startswith('down_projs.1.')}
    elif kind == 'no-stage':
        sd = {k: v for k, v in sd.items() if not k.startswith('stages.3.')}
    elif kind == 'flat-bias-table':
        table = [k for k in sd if k.endswith(('relative_position_bias_table', 'rpe_table', 'rpb'))]
        key = rng.choice(table)
        sd[key] = sd[key].reshape(-1)
    else:
        raise AssertionError(kind)
    return sd


CONVERSION_MUTATIONS = []
for _name in ('dat_v1_small', 'dat_pp_small'):
    for _kind in (
        'drop',
        'rename',
        'extra',
        'shrink',
        'scalar',
        'no-head',
        'no-stem',
        'half-prefixed',
        'no-downsample',
        'no-stage',
        'flat-bias-table',
    ):
        CONVERSION_MUTATIONS.append(pytest.param(_kind, _name, id=f'{_name}-{_kind}'))


@needs_golden
@pytest.mark.parametrize('kind, name', CONVERSION_MUTATIONS)
def test_convert_mutated_original_weights(kind, name):
    from projects.dat.converter import ConversionError, convert_original_state_dict

    golden = _load_golden(name)
    rng = random.Random(f'{SEED}-{name}-{kind}')
    for _ in range(2):
        with pytest.raises(ConversionError):
            convert_original_state_dict(_mutate(golden, kind, rng))


# ---------------------------------------------------------------------------------------------
# Corrupted files, in a worker process
# ---------------------------------------------------------------------------------------------


def _zip_bytes(entries: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def _saved(obj, legacy: bool = False) -> bytes:
    """``torch.save`` bytes; the same bytes in every run, also in the legacy format."""
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    data = buf.getvalue()
    if legacy:
        # The legacy format names storages by their memory address, a decimal string of
        # varying length that changes from run to run: rename them to '1', '2', ... in order
        # of appearance (each is a pickled str: opcode X, 4-byte length, the digits).
        names: dict = {}

        def rename(match):
            new = names.setdefault(match.group(1), str(len(names) + 1).encode())
            return b'X' + len(new).to_bytes(4, 'little') + new

        data = re.sub(rb'X[\x06-\x20]\x00\x00\x00(\d{6,32})(?=[^\d])', rename, data)
    return data


def _tiny_converted_checkpoint() -> dict:
    from projects.dat import DAT

    torch.manual_seed(SEED)
    model = DAT(TINY['pp'], out_indices=(3,))
    return dict(state_dict={f'backbone.{k}': v for k, v in model.state_dict().items()}, meta={})


def make_fuzz_files(directory: Path) -> dict:
    """Write the corrupted (and a few valid) files; return ``{case: kind}``.

    kind: 'garbage' (not a torch.save file), 'original' / 'converted' (valid), or
    'torch-readable' (a torch.save file that is not a DAT checkpoint).
    """
    rng = random.Random(SEED)
    files = {
        'empty': (b'', 'garbage'),
        'random-1': (rng.randbytes(1), 'garbage'),
        'random-64': (rng.randbytes(64), 'garbage'),
        'random-4k': (rng.randbytes(4096), 'garbage'),
        'zip-magic-then-random': (b'PK\x03\x04' + rng.randbytes(2000), 'garbage'),
        'pickle-magic-then-random': (b'\x80\x02' + rng.randbytes(2000), 'garbage'),
        'json-object': (json.dumps({'model': {'patch_proj.0.weight': [[1.0]]}}).encode(), 'garbage'),
        'json-list': (json.dumps([1, 2, 3]).encode(), 'garbage'),
        'text': (b'dat_pp_tiny\nnot a checkpoint\n', 'garbage'),
        'zip-of-garbage': (_zip_bytes({'archive/data.pkl': rng.randbytes(300), 'archive/version': b'3\n'}), 'garbage'),
        'zip-empty': (_zip_bytes({}), 'garbage'),
        'plain-pickle': (pickle.dumps({'model': {'a': 1}}, protocol=2), 'garbage'),
        'torch-list': (_saved([torch.ones(2)]), 'torch-readable'),
        'torch-tensor': (_saved(torch.ones(2)), 'torch-readable'),
        'torch-empty-model': (_saved({'model': {}}), 'torch-readable'),
    }
    converted = _saved(_tiny_converted_checkpoint())
    files['converted'] = (converted, 'converted')
    for frac in (0.01, 0.5, 0.99):
        files[f'converted-truncated-{frac}'] = (converted[: int(len(converted) * frac)], 'garbage')
    if GOLDEN.is_dir():
        for name in ('dat_v1_small', 'dat_pp_small'):
            files[f'original-{name}'] = (_saved({'model': _load_golden(name), 'epoch': 300}), 'original')
        original = files['original-dat_pp_small'][0]
        for frac in (0.001, 0.1, 0.5, 0.9, 0.9999):
            files[f'original-truncated-{frac}'] = (original[: int(len(original) * frac)], 'garbage')
        legacy = _saved({'model': _load_golden('dat_pp_small')}, legacy=True)
        # Cut inside the pickle at two places that once escaped as IndexError / struct.error,
        # and in the tensor data.
        for size in LEGACY_CUTS:
            files[f'original-legacy-truncated-{size}'] = (
                legacy[: size if size > 1 else int(len(legacy) * size)],
                'garbage',
            )
    directory.mkdir(parents=True, exist_ok=True)
    for case, (data, _) in files.items():
        (directory / f'{case}.pth').write_bytes(data)
    return {case: kind for case, (_, kind) in files.items()}


# The entry points run on every file, and the errors each may raise.
ENTRY_ERRORS = {
    'load_original_checkpoint': ('CheckpointError',),
    'extract_state_dict': ('CheckpointError',),
    'convert_original_state_dict': ('ConversionError',),
    'init_cfg': ('CheckpointError', 'ConversionError'),
    'cli': (),  # must return 0 or 1, never raise
}
LEGACY_CUTS = (391, 1458, 0.3, 0.999)  # bytes, or a fraction of the file


def _run_entry_points(path: Path, out_dir: Path) -> list:
    """Run every entry point on ``path``; one result dict per entry point."""
    from projects.dat import DAT
    from projects.dat.checkpoint import extract_state_dict, load_original_checkpoint
    from projects.dat.converter import convert_original_state_dict

    sys.path.insert(0, str(CONVERTER.parent))
    import dat_official  # noqa: E402

    results, value = [], None

    def record(entry, fn):
        try:
            out = fn()
        except Exception as error:  # noqa: BLE001 - classified by the test
            results.append(
                dict(
                    entry=entry,
                    ok=False,
                    type=type(error).__name__,
                    # A subclass of a documented error is that error (e.g. UntrustedCheckpointError).
                    classes=[cls.__name__ for cls in type(error).__mro__],
                    message=str(error)[:300],
                    where=traceback.format_exc().strip().splitlines()[-3][:200],
                )
            )
            return None
        results.append(dict(entry=entry, ok=True))
        return out

    value = record('load_original_checkpoint', lambda: load_original_checkpoint(path))
    if value is not None:
        value = record('extract_state_dict', lambda: extract_state_dict(value))
    if value is not None:
        record('convert_original_state_dict', lambda: convert_original_state_dict(value))
    model = DAT(
        TINY['pp'], out_indices=(3,), init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone.')
    )
    record('init_cfg', model.init_weights)
    code = record('cli', lambda: dat_official.main([str(path), str(out_dir / f'{path.stem}.out.pth')]))
    if code is not None:
        results[-1].update(ok=code in (0, 1), code=code)
    return results


def _byte_flip_outcomes(rng: random.Random, count: int) -> list:
    """Corrupt 1-4 bytes of small original-format checkpoints; load and extract each."""
    from projects.dat.checkpoint import CheckpointError, extract_state_dict, load_original_checkpoint

    keys = [f'stages.{i}.attns.{j}.proj_q.weight' for i in range(4) for j in range(2)]
    names = ['patch_proj.0.weight', *keys, 'cls_head.weight']
    # Views of one storage: the legacy format orders storages by memory address, so with
    # several the file would differ from run to run.
    base = torch.randn(4 * len(names), generator=torch.Generator().manual_seed(SEED))
    small = {k: base[4 * i : 4 * i + 4].view(2, 2) for i, k in enumerate(names)}
    outcomes = []
    for legacy in (False, True):
        data = _saved({'model': small, 'epoch': 3}, legacy=legacy)
        for _ in range(count):
            corrupted = bytearray(data)
            changes = []
            for _ in range(rng.randint(1, 4)):
                pos, byte = rng.randrange(len(corrupted)), rng.randrange(256)
                corrupted[pos] = byte
                changes.append((pos, byte))
            path = Path(os.environ['DAT_FUZZ_TMP']) / 'flipped.pth'
            path.write_bytes(bytes(corrupted))
            try:
                extract_state_dict(load_original_checkpoint(path))
                result = 'ok'
            except CheckpointError:
                result = 'CheckpointError'
            except Exception as error:  # noqa: BLE001 - reported by the test
                result = f'{type(error).__name__}: {str(error)[:120]}'
            outcomes.append(dict(legacy=legacy, changes=changes, result=result))
    return outcomes


def _worker_main(argv: list) -> None:
    parser = argparse.ArgumentParser(description='fuzz worker of tests/test_fuzz.py')
    parser.add_argument('files_dir')
    parser.add_argument('--flips', type=int, default=0)
    args = parser.parse_args(argv)
    files_dir = Path(args.files_dir)
    out_dir = files_dir / 'out'
    out_dir.mkdir(exist_ok=True)
    os.environ['DAT_FUZZ_TMP'] = str(out_dir)
    for path in sorted(files_dir.glob('*.pth')):
        print(json.dumps(dict(start=path.stem)), flush=True)
        for result in _run_entry_points(path, out_dir):
            print(json.dumps(dict(case=path.stem, **result)), flush=True)
    if args.flips:
        print(json.dumps(dict(start='byte-flips')), flush=True)
        for outcome in _byte_flip_outcomes(random.Random(SEED), args.flips):
            print(json.dumps(dict(flip=outcome)), flush=True)
    print(json.dumps(dict(done=True)), flush=True)


FLIPS = 150


@pytest.fixture(scope='module')
def fuzz_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp('fuzz_files')
    return directory, make_fuzz_files(directory)


@pytest.fixture(scope='module')
def worker(fuzz_files):
    """Run the worker once; its return code, elapsed time and parsed output lines."""
    directory, kinds = fuzz_files
    start = time.monotonic()
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        [sys.executable, __file__, str(directory), '--flips', str(FLIPS)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
    return dict(
        returncode=proc.returncode, elapsed=time.monotonic() - start, lines=lines, stderr=proc.stderr, kinds=kinds
    )


def test_worker_neither_crashes_nor_hangs(worker):
    started = [line['start'] for line in worker['lines'] if 'start' in line]
    assert worker['returncode'] == 0, (
        f'worker ended with {worker["returncode"]} '
        f'({"signal " + signal.Signals(-worker["returncode"]).name if worker["returncode"] < 0 else "error"}) '
        f'while running {started[-1] if started else "(nothing)"}:\n{worker["stderr"][-3000:]}'
    )
    assert worker['lines'][-1] == dict(done=True)
    assert len(started) == len(worker['kinds']) + 1


def _file_cases() -> list:
    with_golden = GOLDEN.is_dir()
    names = [
        'empty',
        'random-1',
        'random-64',
        'random-4k',
        'zip-magic-then-random',
        'pickle-magic-then-random',
        'json-object',
        'json-list',
        'text',
        'zip-of-garbage',
        'zip-empty',
        'plain-pickle',
        'torch-list',
        'torch-tensor',
        'torch-empty-model',
        'converted',
        'converted-truncated-0.01',
        'converted-truncated-0.5',
        'converted-truncated-0.99',
    ]
    if with_golden:
        names += (
            ['original-dat_v1_small', 'original-dat_pp_small']
            + [f'original-truncated-{f}' for f in (0.001, 0.1, 0.5, 0.9, 0.9999)]
            + [f'original-legacy-truncated-{f}' for f in LEGACY_CUTS]
        )
    cases = []
    for name in names:
        for entry in ENTRY_ERRORS:
            cases.append(pytest.param(name, entry, id=f'{name}-{entry}'))
    return cases


@pytest.mark.parametrize('case, entry', _file_cases())
def test_file_gives_result_or_documented_error(worker, case, entry):
    results = [line for line in worker['lines'] if line.get('case') == case and line['entry'] == entry]
    if not results:
        # load/extract stopped earlier with a documented error: nothing to check here.
        previous = [line for line in worker['lines'] if line.get('case') == case]
        assert previous and entry in ('extract_state_dict', 'convert_original_state_dict'), (
            f'no result for {case} / {entry}: the worker stopped (see test_worker_neither_crashes_nor_hangs)'
        )
        return
    (result,) = results
    kind = worker['kinds'][case]
    if entry == 'cli':
        assert result['ok'], f'the converter CLI raised or returned {result}'
        if kind == 'original':
            assert result['code'] == 0
        elif kind in ('garbage', 'torch-readable'):
            assert result['code'] == 1
        return
    if result['ok']:
        assert kind in ('original', 'converted', 'torch-readable'), f'{entry} accepted the corrupted file {case}'
        if kind == 'converted':
            assert entry in ('load_original_checkpoint', 'extract_state_dict', 'init_cfg')
        return
    assert set(result['classes']) & set(ENTRY_ERRORS[entry]), (
        f'{entry} on {case} raised {result["type"]}: {result["message"]!r} at {result["where"]}'
    )
    assert result['message'].strip(), 'an error without a message'
    if kind == 'original' and entry == 'init_cfg':
        assert 'convert it first' in result['message']
    elif kind == 'original':
        raise AssertionError(f'{entry} refused the valid original checkpoint {case}: {result["message"]}')
    if kind == 'converted' and entry == 'init_cfg':
        raise AssertionError(f'init_cfg refused the valid converted checkpoint: {result["message"]}')


def test_byte_flipped_checkpoints_load_or_raise_checkpoint_error(worker):
    flips = [line['flip'] for line in worker['lines'] if 'flip' in line]
    assert len(flips) == 2 * FLIPS
    escaped = [f for f in flips if f['result'] not in ('ok', 'CheckpointError')]
    assert not escaped, f'{len(escaped)} of {len(flips)} escaped, e.g. {escaped[:3]}'


def test_byte_flipped_checkpoints_exercise_both_outcomes(worker):
    """The corruption is neither always harmless nor always caught (the test above has teeth)."""
    results = {line['flip']['result'] for line in worker['lines'] if 'flip' in line}
    assert {'ok', 'CheckpointError'} <= results


@needs_golden
def test_converter_cli_subprocess_on_corrupted_files(fuzz_files):
    """The real command line, a process per file: exit status 1 with our one-line error, in
    bounded time, never a signal or a traceback."""
    directory, _ = fuzz_files
    cases = ['random-4k', 'original-truncated-0.5']
    procs = {
        case: subprocess.Popen(
            [sys.executable, str(CONVERTER), str(directory / f'{case}.pth'), str(directory / f'{case}.cli.pth')],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case in cases
    }
    for case, proc in procs.items():
        try:
            _, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f'the converter hangs on {case}') from None
        assert proc.returncode == 1, (case, proc.returncode, stderr[-2000:])
        assert 'error: ' in stderr and 'Traceback' not in stderr, (case, stderr[-2000:])
        assert not (directory / f'{case}.cli.pth').exists()


if __name__ == '__main__':
    _worker_main(sys.argv[1:])
