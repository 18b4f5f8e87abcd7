"""Tests of projects.dat.checkpoint and projects.dat.hooks: weights_only loading of mmengine
checkpoints (and of http(s) URLs), crash-safe saving through AtomicCheckpointHook, what
``import projects.dat`` changes (only registrations), and the loader of original DAT checkpoints.

The file doubles as the training script of the kill-and-resume tests: run as
``python tests/test_checkpoint.py WORK_DIR ...`` it trains the toy model in a fresh process.
"""

from __future__ import annotations

import argparse
import builtins
import copyreg
import errno
import json
import os
import os.path as osp
import pickle
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fixtures.tiny_archs import TINY
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import projects.dat  # noqa: F401  (registers the allow-list)
from projects.dat import checkpoint as dat_ckpt
from projects.dat.checkpoint import (
    CheckpointError,
    UntrustedCheckpointError,
    atomic_open,
    atomic_save,
    extract_state_dict,
    load_original_checkpoint,
)
from projects.dat.hooks import ATOMIC_BACKEND_NAME, AtomicCheckpointHook

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / 'shared' / 'golden' / 'dat_v1_small.pt'


# ---------------------------------------------------------------------------------------------
# A tiny, deterministic mmengine training setup
# ---------------------------------------------------------------------------------------------


class ToyModel(BaseModel):
    """Linear regression from 4 features; enough for optimizer and scheduler state."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        g = torch.Generator().manual_seed(1)  # the same start in every process
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(1, 4, generator=g))
            self.linear.bias.zero_()

    def forward(self, inputs, labels, mode='tensor'):
        pred = self.linear(inputs).squeeze(1)
        if mode == 'loss':
            return {'loss': F.mse_loss(pred, labels)}
        if mode == 'predict':
            return [dict(pred=p, gt=g) for p, g in zip(pred, labels, strict=True)]
        return pred


class ToyDataset(Dataset):
    metainfo = dict(classes=('a', 'b'), palette=[(1, 2, 3), (4, 5, 6)])

    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return dict(inputs=self.x[i], labels=self.y[i])


class ToyMetric(BaseMetric):
    """Returns numpy scalars, as real metrics do, so they land in the message hub."""

    default_prefix = 'toy'

    def process(self, data_batch, data_samples) -> None:
        self.results.extend(float((d['pred'] - d['gt']) ** 2) for d in data_samples)

    def compute_metrics(self, results) -> dict:
        return dict(
            mse=np.float64(np.mean(results)),
            mse32=np.float32(np.mean(results)),
            count=np.int64(len(results)),
        )


class RecordIterHook(Hook):
    """Records the iteration index at which each training iteration starts."""

    def __init__(self) -> None:
        self.iters: list[int] = []

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        self.iters.append(runner.iter)


class KillHook(Hook):
    """SIGKILLs its own process after iteration ``at`` (0-based), before it is checkpointed."""

    priority = 'VERY_HIGH'  # runs before CheckpointHook (VERY_LOW)

    def __init__(self, at: int) -> None:
        self.at = at

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if runner.iter == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def build_runner(
    work_dir,
    max_iters=4,
    interval=2,
    resume=False,
    load_from=None,
    max_keep_ckpts=-1,
    save_best=None,
    val=False,
    hooks=(),
    checkpoint_type='AtomicCheckpointHook',
) -> Runner:
    loader = dict(
        dataset=ToyDataset(),
        batch_size=4,
        num_workers=0,
        sampler=dict(type='DefaultSampler', shuffle=True),
        collate_fn=dict(type='default_collate'),
    )
    val_kwargs = {}
    if val:
        val_kwargs = dict(
            val_dataloader={**loader, 'sampler': dict(type='DefaultSampler', shuffle=False)},
            val_evaluator=[ToyMetric()],
            val_cfg=dict(),
        )
    checkpoint = dict(
        type=checkpoint_type,
        by_epoch=False,
        interval=interval,
        max_keep_ckpts=max_keep_ckpts,
        save_best=save_best,
        rule='less',
    )
    return Runner(
        model=ToyModel(),
        work_dir=str(work_dir),
        experiment_name=f'toy_{uuid.uuid4().hex[:8]}',
        train_dataloader=loader,
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=3),
            dict(type='MultiStepLR', milestones=[5], gamma=0.5, by_epoch=False),
        ],
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=interval if val else max_iters + 1),
        default_hooks=dict(checkpoint=checkpoint, logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=list(hooks),
        resume=resume,
        load_from=load_from,
        randomness=dict(seed=0),
        log_level='WARNING',
        **val_kwargs,
    )


def child_env() -> dict:
    env = dict(os.environ)
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)  # keep torch's default weights_only=True
    return env


def run_python(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tmp_leftovers(directory) -> list[str]:
    return [n for n in os.listdir(directory) if '.tmp-' in n]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 4-iteration run with validation, save_best and numpy metrics: its work_dir."""
    work_dir = tmp_path_factory.mktemp('trained')
    build_runner(work_dir, max_iters=4, interval=2, val=True, save_best='toy/mse').train()
    return work_dir


# ---------------------------------------------------------------------------------------------
# weights_only=True loading of mmengine checkpoints
# ---------------------------------------------------------------------------------------------


def test_checkpoints_need_only_allow_listed_globals(trained):
    paths = sorted(trained.glob('*.pth'))
    assert {p.name for p in paths} >= {'iter_2.pth', 'iter_4.pth'}
    assert any(p.name.startswith('best_toy_mse') for p in paths)
    for path in paths:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
        ckpt = torch.load(path)  # default weights_only=True
        hub = ckpt['message_hub']
        assert type(hub['log_scalars']['train/loss']).__name__ == 'HistoryBuffer'
        assert np.isfinite(hub['log_scalars']['train/loss'].mean())
        assert isinstance(hub['runtime_info']['best_score'], np.float64)
        assert ckpt['meta']['dataset_meta']['classes'] == ('a', 'b')


def test_load_fails_without_allow_list(trained):
    """The same file is refused by a process that has not imported projects.dat."""
    path = trained / 'iter_4.pth'
    unsafe = set(
        json.loads(
            run_python(
                '-c',
                (
                    'import json, sys, torch; print(json.dumps('
                    'torch.serialization.get_unsafe_globals_in_checkpoint(sys.argv[1])))'
                ),
                str(path),
            ).stdout
        )
    )
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in unsafe
    assert {'builtins.getattr', 'numpy.ndarray', 'numpy._core.multiarray.scalar'} <= unsafe
    result = run_python('-c', 'import sys, torch; torch.load(sys.argv[1])', str(path))
    assert result.returncode != 0
    assert 'Weights only load failed' in result.stderr


def test_resume_restores_iteration_and_state(trained, tmp_path):
    (tmp_path / 'iter_2.pth').write_bytes((trained / 'iter_2.pth').read_bytes())
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_2.pth'))
    saved = torch.load(tmp_path / 'iter_2.pth')
    record = RecordIterHook()
    runner = build_runner(tmp_path, max_iters=4, interval=2, resume=True, hooks=[record])
    runner.train()
    assert record.iters == [2, 3]  # resumed after iteration 2, did not start again at 0
    assert runner.iter == 4
    resumed_lr = runner.optim_wrapper.get_lr()['lr'][0]
    original = torch.load(trained / 'iter_4.pth')
    assert resumed_lr == pytest.approx(original['optimizer']['param_groups'][0]['lr'])
    assert saved['meta']['iter'] == 2
    for key, value in runner.model.state_dict().items():
        assert torch.equal(value, original['state_dict'][key]), key


def test_resume_from_explicit_load_from(trained, tmp_path):
    record = RecordIterHook()
    runner = build_runner(tmp_path, max_iters=3, resume=True, load_from=str(trained / 'iter_2.pth'), hooks=[record])
    runner.train()
    assert record.iters == [2]


def test_runner_load_checkpoint_like_test_tools(trained, tmp_path):
    """tools/test.py of mmdet/mmseg/mmpretrain: Runner.load_checkpoint / cfg.load_from."""
    runner = build_runner(tmp_path, load_from=str(trained / 'iter_4.pth'))
    runner.load_or_resume()
    expected = torch.load(trained / 'iter_4.pth')['state_dict']
    for key, value in runner.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    other = build_runner(tmp_path / 'other')
    other.load_checkpoint(str(trained / 'iter_2.pth'))


def test_guarded_getattr_refuses_other_attributes(tmp_path):
    from mmengine.logging import HistoryBuffer

    class Sneaky:
        def __reduce__(self):
            return getattr, (HistoryBuffer, '__init__')

    torch.save({'x': Sneaky()}, tmp_path / 'sneaky.pth')
    with pytest.raises(pickle.UnpicklingError, match='is not allowed'):
        torch.load(tmp_path / 'sneaky.pth')


def test_numpy_1x_names_are_accepted(tmp_path):
    """Checkpoints written under numpy 1.x name 'numpy.core.multiarray'."""
    from mmengine.logging import HistoryBuffer

    buf = HistoryBuffer([1.0, 2.0], [1, 1])
    torch.save(
        {'buf': buf, 's': np.float64(2.5)},
        tmp_path / 'np2.pth',
        _use_new_zipfile_serialization=False,
    )
    data = (tmp_path / 'np2.pth').read_bytes()
    assert b'numpy._core.multiarray\n' in data
    (tmp_path / 'np1.pth').write_bytes(data.replace(b'numpy._core.multiarray\n', b'numpy.core.multiarray\n'))
    loaded = torch.load(tmp_path / 'np1.pth')
    assert loaded['buf'].mean() == 1.5 and loaded['s'] == 2.5


def test_register_is_idempotent():
    before = set(map(repr, torch.serialization.get_safe_globals()))
    assert dat_ckpt.register_mmengine_safe_globals() is True
    assert set(map(repr, torch.serialization.get_safe_globals())) == before


@pytest.mark.parametrize('version', ['2.1.2', '2.4.1'])
def test_register_is_a_no_op_on_old_torch(monkeypatch, version):
    """torch < 2.4 has no add_safe_globals, torch 2.4 no (object, name) entries: nothing is
    registered there and nothing crashes."""
    monkeypatch.setattr(dat_ckpt.allowlist, '_safe_globals_registered', False)
    monkeypatch.setattr(torch, '__version__', torch.torch_version.TorchVersion(version))
    if version < '2.4':
        monkeypatch.delattr(torch.serialization, 'add_safe_globals')
    else:
        monkeypatch.setattr(torch.serialization, 'add_safe_globals', lambda entries: pytest.fail('called'))
    assert dat_ckpt.register_mmengine_safe_globals() is False


# ---------------------------------------------------------------------------------------------
# HistoryBuffer: a crafted state cannot change the statistics methods shared by all buffers
# ---------------------------------------------------------------------------------------------


def crafted_history_buffer(path, methods, **state):
    """Save a pickle of a HistoryBuffer whose state is ``state`` plus ``statistics_methods``."""
    from mmengine.logging import HistoryBuffer

    state = (
        dict(
            dict(max_length=10, _log_history=np.array([1.0, 3.0]), _count_history=np.array([1, 1])),
            statistics_methods=methods,
        )
        | state
    )

    class Crafted:
        __class__ = property(lambda self: HistoryBuffer)  # pickled under HistoryBuffer's name

        def __reduce_ex__(self, protocol):
            return (copyreg.__newobj__, (HistoryBuffer,), state)

    torch.save({'buffer': Crafted()}, path)
    return path


def test_history_buffer_loads_as_a_plain_history_buffer(tmp_path):
    from mmengine.logging import HistoryBuffer

    shared = dict(HistoryBuffer._statistics_methods)
    path = crafted_history_buffer(tmp_path / 'ok.pth', {'mean': HistoryBuffer.mean, 'max': HistoryBuffer.max})
    loaded = torch.load(path)['buffer']
    assert type(loaded) is HistoryBuffer
    assert loaded.mean() == 2.0 and loaded.statistics('max') == 3.0
    assert 'statistics_methods' not in vars(loaded)
    assert HistoryBuffer._statistics_methods == shared


@pytest.mark.parametrize(
    'methods, state, match',
    [
        ({'mean': 'max'}, {}, "statistics method 'mean'.*refused"),  # replace a method
        ({'median': 'min'}, {}, "statistics method 'median'.*refused"),  # add a method
        ({}, {'extra': 1}, 'unknown keys'),
        ({}, {'max_length': -1}, 'max_length must be a positive int'),
    ],
)
def test_crafted_history_buffer_is_refused(tmp_path, methods, state, match):
    from mmengine.logging import HistoryBuffer

    shared = dict(HistoryBuffer._statistics_methods)
    methods = {name: getattr(HistoryBuffer, value) for name, value in methods.items()}
    path = crafted_history_buffer(tmp_path / 'crafted.pth', methods, **state)
    with pytest.raises(pickle.UnpicklingError, match=match):
        torch.load(path)
    assert HistoryBuffer._statistics_methods == shared
    assert HistoryBuffer([1.0, 3.0], [1, 1]).statistics('mean') == 2.0


def test_crafted_history_buffer_would_change_mmengine_without_the_check(tmp_path):
    """Control: mmengine's own HistoryBuffer.__setstate__ (full unpickling, no projects.dat)
    replaces ``mean`` for every buffer of the process."""
    from mmengine.logging import HistoryBuffer

    path = crafted_history_buffer(tmp_path / 'crafted.pth', {'mean': HistoryBuffer.max})
    code = (
        'import sys, torch; from mmengine.logging import HistoryBuffer; '
        'torch.load(sys.argv[1], weights_only=False); '
        'print(HistoryBuffer([1.0, 3.0], [1, 1]).statistics("mean"))'
    )
    result = run_python('-c', code, str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == '3.0'  # the max, not the mean 2.0


# ---------------------------------------------------------------------------------------------
# Crash-safe saving
# ---------------------------------------------------------------------------------------------


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError('cannot pickle this')


def test_atomic_save_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / 'ckpt.pth'
    atomic_save({'w': torch.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match='cannot pickle'):
        atomic_save({'w': torch.zeros(3), 'bad': Unpicklable()}, path)
    assert path.read_bytes() == before
    assert tmp_leftovers(tmp_path) == []
    atomic_save({'w': torch.zeros(3)}, path)
    assert torch.equal(torch.load(path)['w'], torch.zeros(3))
    assert tmp_leftovers(tmp_path) == []


@pytest.fixture
def disk_full(monkeypatch):
    """``fail(name)``: writes to files whose name contains ``name`` write half, then ENOSPC."""
    real_open = builtins.open

    class HalfWriter:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            raise OSError(errno.ENOSPC, 'No space left on device (simulated)')

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def fail(name):
        def fake_open(file, mode='r', *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if name in osp.basename(os.fspath(file)) and ('w' in mode or 'x' in mode):
                return HalfWriter(f)
            return f

        monkeypatch.setattr(builtins, 'open', fake_open)

    return fail


@pytest.mark.parametrize('backend_args', [dict(backend=ATOMIC_BACKEND_NAME), None])
def test_mmengine_save_checkpoint_disk_full(tmp_path, disk_full, backend_args):
    """Through mmengine's own save path (the file backend's put), as the hook calls it. With
    mmengine's LocalBackend the previous checkpoint is destroyed, which shows that this test
    can fail."""
    from mmengine.runner.checkpoint import save_checkpoint

    path = str(tmp_path / 'latest.pth')
    save_checkpoint({'state_dict': {'w': torch.ones(100)}}, path, backend_args=backend_args)
    before = Path(path).read_bytes()
    disk_full('latest.pth')
    with pytest.raises(OSError, match='No space left'):
        save_checkpoint({'state_dict': {'w': torch.zeros(100)}}, path, backend_args=backend_args)
    if backend_args is not None:
        assert Path(path).read_bytes() == before
        assert tmp_leftovers(tmp_path) == []
    else:
        assert Path(path).read_bytes() != before


def test_hook_writes_through_the_atomic_backend(tmp_path):
    runner = build_runner(tmp_path, max_iters=2, interval=2)
    hook = next(h for h in runner.hooks if isinstance(h, AtomicCheckpointHook))
    runner.train()
    assert hook.writes_atomically and hook.backend_args == dict(backend=ATOMIC_BACKEND_NAME)
    assert type(hook.file_backend).__name__ == 'AtomicLocalBackend'
    torch.load(tmp_path / 'iter_2.pth')


def test_hook_with_other_storage_keeps_its_backend(tmp_path):
    """backend_args naming another backend are used as given (here mmengine's own local one
    under file_client_args), with a warning that the writes are not atomic."""
    runner = build_runner(tmp_path, max_iters=2, interval=2)
    hook = next(h for h in runner.hooks if isinstance(h, AtomicCheckpointHook))
    hook.file_client_args = dict(backend='disk')
    with pytest.warns(DeprecationWarning):
        runner.train()
    assert not hook.writes_atomically
    assert hook.backend_args is None
    torch.load(tmp_path / 'iter_2.pth')


def test_last_checkpoint_written_atomically(tmp_path, disk_full):
    build_runner(tmp_path, max_iters=2, interval=2).train()
    last = (tmp_path / 'last_checkpoint').read_text()
    assert last.endswith('iter_2.pth')
    disk_full('last_checkpoint')
    with pytest.raises(OSError, match='No space left'):
        build_runner(tmp_path, max_iters=4, interval=2, resume=True).train()
    assert (tmp_path / 'last_checkpoint').read_text() == last
    assert tmp_leftovers(tmp_path) == []


@pytest.mark.parametrize('checkpoint_type', ['AtomicCheckpointHook', 'CheckpointHook'])
def test_max_keep_ckpts_deletes_only_after_saving(tmp_path, disk_full, checkpoint_type):
    """max_keep_ckpts=1: mmengine's CheckpointHook deletes the old file before writing the new
    one (so a failed write leaves nothing); AtomicCheckpointHook deletes it afterwards."""
    build_runner(tmp_path, max_iters=2, interval=1, max_keep_ckpts=1, checkpoint_type=checkpoint_type).train()
    assert sorted(p.name for p in tmp_path.glob('*.pth')) == ['iter_2.pth']  # still pruned
    disk_full('iter_3.pth')
    with pytest.raises(OSError, match='No space left'):
        build_runner(
            tmp_path, max_iters=3, interval=1, max_keep_ckpts=1, resume=True, checkpoint_type=checkpoint_type
        ).train()
    if checkpoint_type == 'CheckpointHook':
        assert not (tmp_path / 'iter_2.pth').exists()
        return
    assert sorted(p.name for p in tmp_path.glob('*.pth')) == ['iter_2.pth']
    assert tmp_leftovers(tmp_path) == []
    torch.load(tmp_path / 'iter_2.pth')


def test_save_best_keeps_one_best_file(tmp_path):
    build_runner(tmp_path, max_iters=6, interval=2, val=True, save_best='toy/mse', max_keep_ckpts=2).train()
    names = sorted(p.name for p in tmp_path.glob('*.pth'))
    assert [n for n in names if n.startswith('iter_')] == ['iter_4.pth', 'iter_6.pth']
    assert len([n for n in names if n.startswith('best_')]) == 1


def test_failed_best_save_keeps_the_previous_best(tmp_path, disk_full):
    """mmengine deletes the previous best checkpoint before writing the new one."""
    build_runner(tmp_path, max_iters=2, interval=2, val=True, save_best='toy/mse').train()
    (best,) = tmp_path.glob('best_*.pth')
    disk_full('best_toy_mse_iter_4')
    with pytest.raises(OSError, match='No space left'):
        build_runner(tmp_path, max_iters=4, interval=2, val=True, save_best='toy/mse', resume=True).train()
    assert [p.name for p in tmp_path.glob('best_*.pth')] == [best.name]
    torch.load(best)


# ---------------------------------------------------------------------------------------------
# Temporary files of atomic writes
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_tmp_file_is_private_while_written(tmp_path, umask_022):
    path = tmp_path / 'ckpt.pth'
    with atomic_open(path) as f:
        (tmp,) = tmp_leftovers(tmp_path)
        assert stat_mode(tmp_path / tmp) == 0o600
        f.write(b'data')
    assert stat_mode(path) == 0o644  # 0o666 & ~umask, as open() would create it


def test_existing_file_keeps_its_mode(tmp_path, umask_022):
    path = tmp_path / 'ckpt.pth'
    path.write_bytes(b'old')
    os.chmod(path, 0o640)
    atomic_save({'w': torch.ones(1)}, path)
    assert stat_mode(path) == 0o640
    os.chmod(path, 0o600)
    atomic_save({'w': torch.ones(1)}, path)
    assert stat_mode(path) == 0o600


def test_umask_is_respected_for_new_files(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_save({'w': torch.ones(1)}, tmp_path / 'a.pth')
    finally:
        os.umask(old)
    assert stat_mode(tmp_path / 'a.pth') == 0o600


def stat_mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def make_old(path) -> None:
    old = time.time() - dat_ckpt.STALE_TMP_SECONDS - 60
    os.utime(path, (old, old), follow_symlinks=False)


def test_next_write_in_the_folder_removes_abandoned_tmp_files_only(tmp_path):
    path = tmp_path / 'ckpt.pth'
    abandoned = tmp_path / '.ckpt.pth.tmp-4242-0badc0de'  # as a killed writer leaves it
    abandoned_other = tmp_path / '.iter_3.pth.tmp-4242-0badc0de'  # another target, same folder
    in_progress = tmp_path / '.ckpt.pth.tmp-4343-00c0ffee'  # another writer, still active
    not_ours = [
        tmp_path / '.ckpt.pth.tmp-old',  # not our pattern
        tmp_path / 'ckpt.pth.tmp-4242-0badc0de',  # not hidden
        tmp_path / '.ckpt.pth.tmp-4242-0BADC0DE',  # upper-case hex: not what we write
    ]
    outside = tmp_path / 'outside.txt'
    outside.write_bytes(b'keep me')
    symlink = tmp_path / '.link.pth.tmp-4242-0badc0de'
    symlink.symlink_to(outside)
    folder = tmp_path / '.dir.pth.tmp-4242-0badc0de'
    folder.mkdir()
    for leftover in (abandoned, abandoned_other, in_progress, *not_ours):
        leftover.write_bytes(b'partial')
    for old in (abandoned, abandoned_other, *not_ours, symlink, folder):
        make_old(old)
    atomic_save({'w': torch.ones(3)}, path)
    assert torch.equal(torch.load(path)['w'], torch.ones(3))
    assert not abandoned.exists() and not abandoned_other.exists()
    assert in_progress.exists() and folder.is_dir() and symlink.is_symlink()
    assert all(p.exists() for p in not_ours)
    assert outside.read_bytes() == b'keep me'


def test_tmp_files_of_other_users_are_kept(tmp_path, monkeypatch):
    abandoned = tmp_path / '.ckpt.pth.tmp-4242-0badc0de'
    abandoned.write_bytes(b'partial')
    make_old(abandoned)
    monkeypatch.setattr(dat_ckpt.atomic, '_user_id', lambda: os.stat(abandoned).st_uid + 1)
    atomic_save({'w': torch.ones(3)}, tmp_path / 'ckpt.pth')
    assert abandoned.exists()
    monkeypatch.undo()
    atomic_save({'w': torch.ones(3)}, tmp_path / 'ckpt.pth')
    assert not abandoned.exists()


# ---------------------------------------------------------------------------------------------
# import projects.dat changes nothing of mmengine; the hook is in every config
# ---------------------------------------------------------------------------------------------

_SNAPSHOT = r"""
import importlib, inspect, json, pkgutil, sys, types, warnings
warnings.simplefilter('ignore')
import mmengine

def walk():
    for info in pkgutil.walk_packages(mmengine.__path__, 'mmengine.'):
        try:
            importlib.import_module(info.name)
        except Exception:  # optional dependencies (e.g. deepspeed, colossalai) missing
            pass
    seen = {}
    for name, module in sorted(sys.modules.items()):
        if not (name == 'mmengine' or name.startswith('mmengine.')) or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if callable(value) or isinstance(value, (staticmethod, classmethod)):
                seen[f'{name}.{attr}'] = value
            if inspect.isclass(value) and value.__module__.startswith('mmengine'):
                for key, member in list(vars(value).items()):
                    if callable(member) or isinstance(member, (staticmethod, classmethod, property)):
                        seen[f'{name}.{attr}.{key}'] = member
    return seen

before = walk()
import projects.dat
after = walk()
changed = sorted(k for k in before if k in after and after[k] is not before[k])
added = sorted(k for k in after if k not in before and not k.startswith(('mmengine.registry', )))
print(json.dumps(dict(n=len(before), changed=changed, added=added)))
"""


def test_import_changes_no_mmengine_function_or_method():
    """Every function, method and class attribute that is callable in every mmengine module is
    the very same object before and after ``import projects.dat`` (fresh process)."""
    result = run_python('-c', _SNAPSHOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['n'] > 3000, report['n']  # the walk saw mmengine
    assert report['changed'] == []
    assert report['added'] == []


# mmengine's checkpoint schemes that name a model in a table of URLs, and the function of
# mmengine.runner.checkpoint that holds each table.
NAMED_TABLES = {
    'torchvision://': 'get_torchvision_models',
    'modelzoo://': 'get_torchvision_models',
    'open-mmlab://': 'get_external_models',
    'openmmlab://': 'get_external_models',
    'mmcls://': 'get_mmcls_models',
}


def test_import_registers_names_only():
    from mmengine.fileio.backends.registry_utils import backends
    from mmengine.registry import HOOKS
    from mmengine.runner.checkpoint import CheckpointLoader, load_from_http

    assert HOOKS.get('AtomicCheckpointHook') is AtomicCheckpointHook
    assert backends[ATOMIC_BACKEND_NAME].__name__ == 'AtomicLocalBackend'
    for prefix in ('http://', 'https://'):
        assert CheckpointLoader._get_checkpoint_loader(prefix + 'h/x.pth') is dat_ckpt.load_from_http_weights_only
    for prefix in NAMED_TABLES:
        assert CheckpointLoader._get_checkpoint_loader(prefix + 'name') is dat_ckpt.load_from_named_weights_only
    assert load_from_http.__module__ == 'mmengine.runner.checkpoint'  # mmengine's own function is untouched


def test_import_twice_is_harmless():
    """A second import of the modules (e.g. importlib.reload, fresh process) replaces only our
    own registry entries; a name taken by something else is not overridden."""
    code = (
        'import importlib, projects.dat\n'
        'from mmengine.registry import HOOKS\n'
        'from mmengine.fileio.backends.registry_utils import backends\n'
        'from projects.dat import checkpoint, hooks\n'
        'importlib.reload(checkpoint); importlib.reload(hooks)\n'
        'assert HOOKS.get("AtomicCheckpointHook") is hooks.AtomicCheckpointHook\n'
        'assert backends[hooks.ATOMIC_BACKEND_NAME] is hooks.AtomicLocalBackend\n'
        'class Other(hooks.AtomicCheckpointHook): pass\n'
        'HOOKS.register_module(name="AtomicCheckpointHook", module=Other, force=True)\n'
        'try:\n'
        '    importlib.reload(hooks)\n'
        'except KeyError as error:\n'
        '    print("refused:", error)\n'
    )
    result = run_python('-c', code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'refused:' in result.stdout and 'AtomicCheckpointHook' in result.stdout


def test_hook_name_is_free_in_every_toolbox():
    from mmengine.registry import HOOKS as ROOT

    names = {'AtomicCheckpointHook'}
    for toolbox in ('mmdet', 'mmseg', 'mmpretrain'):
        registry = importlib_module(f'{toolbox}.registry').HOOKS
        importlib_module(f'{toolbox}.utils').register_all_modules(init_default_scope=False)
        assert not names & set(registry.module_dict), toolbox
    assert ROOT.module_dict['AtomicCheckpointHook'] is AtomicCheckpointHook


def importlib_module(name):
    import importlib

    return importlib.import_module(name)


CONFIGS = REPO / 'configs'


def all_configs() -> list[Path]:
    return sorted(p for p in CONFIGS.rglob('*.py') if '_base_' not in p.parts)


@pytest.mark.parametrize('path', all_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_uses_the_atomic_hook(path):
    from mmengine.config import Config

    cfg = Config.fromfile(str(path))
    checkpoint = cfg.default_hooks.checkpoint
    assert checkpoint.type == 'AtomicCheckpointHook'
    assert 'interval' in checkpoint  # merged into the toolbox's CheckpointHook settings


@pytest.mark.parametrize(
    'path',
    [
        'demo/datpp-demo_synthetic-imagenet.py',
        'demo/upernet_datpp-demo_synthetic-ade20k.py',
        'demo/mask-rcnn_datpp-demo_fpn_synthetic-coco-tiny.py',
    ],
)
def test_runner_of_each_toolbox_builds_the_hook(path, tmp_path):
    """What ``tools/train.py`` and ``mim train mmpretrain|mmseg|mmdet`` (the toolboxes'
    ``tools/train.py``) do: ``RUNNERS.build(cfg)`` for a config with ``runner_type``, else
    ``Runner.from_cfg(cfg)``."""
    from mmengine.config import Config
    from mmengine.registry import RUNNERS

    cfg = Config.fromfile(str(CONFIGS / path))
    cfg.work_dir = str(tmp_path)
    runner = RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)
    hooks = [h for h in runner.hooks if type(h).__name__ == 'CheckpointHook' or isinstance(h, AtomicCheckpointHook)]
    assert len(hooks) == 1 and isinstance(hooks[0], AtomicCheckpointHook)
    assert hooks[0].interval == cfg.default_hooks.checkpoint.interval


# ---------------------------------------------------------------------------------------------
# Original DAT checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def namespace_ckpt(tmp_path):
    path = tmp_path / 'dat_original.pth'
    torch.save({'model': {'w': torch.ones(2)}, 'config': argparse.Namespace(lr=1e-3)}, path)
    return path


def test_original_with_config_object_needs_trust(namespace_ckpt):
    with pytest.raises(CheckpointError, match=r'argparse\.Namespace.*trusted=True'):
        load_original_checkpoint(namespace_ckpt)
    ckpt = load_original_checkpoint(namespace_ckpt, trusted=True)
    assert ckpt['config'].lr == 1e-3
    assert list(extract_state_dict(ckpt)) == ['w']


def test_original_legacy_format_needs_trust(tmp_path):
    path = tmp_path / 'legacy.pth'
    torch.save(
        {'model': {'w': torch.ones(2)}, 'config': argparse.Namespace(a=1)},
        path,
        _use_new_zipfile_serialization=False,
    )
    with pytest.raises(CheckpointError, match=r'argparse\.Namespace.*--trust-checkpoint'):
        load_original_checkpoint(path)
    assert torch.equal(extract_state_dict(load_original_checkpoint(path, trusted=True))['w'], torch.ones(2))


def test_original_trusted_missing_module(tmp_path):
    path = tmp_path / 'legacy.pth'
    torch.save({'config': argparse.Namespace(a=1)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes().replace(b'argparse\nNamespace', b'yacs_not_here\nCfgNode')
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="module 'yacs_not_here'.*not installed"):
        load_original_checkpoint(path, trusted=True)


def test_original_weights_only_file_needs_no_trust(tmp_path):
    path = tmp_path / 'plain.pth'
    torch.save({'model': {'a.weight': torch.ones(2, 2)}, 'epoch': 3}, path)
    assert list(extract_state_dict(load_original_checkpoint(path))) == ['a.weight']


@pytest.mark.skipif(not GOLDEN.exists(), reason='shared golden file not available')
def test_golden_file_loads_safely():
    sd = extract_state_dict(load_original_checkpoint(GOLDEN))
    assert sd and all(torch.is_tensor(v) for v in sd.values())


def test_original_truncated(namespace_ckpt, tmp_path):
    data = namespace_ckpt.read_bytes()
    for size in (len(data) // 2, 10):
        path = tmp_path / f'trunc_{size}.pth'
        path.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match='truncated or corrupted'):
            load_original_checkpoint(path, trusted=True)


def test_original_truncated_legacy(tmp_path):
    path = tmp_path / 'legacy.pth'
    torch.save({'model': {'w': torch.ones(1000)}}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match='truncated or corrupted'):
        load_original_checkpoint(path)


def test_original_empty_file(tmp_path):
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match='is empty'):
        load_original_checkpoint(tmp_path / 'empty.pth')


def test_original_text_file(tmp_path):
    (tmp_path / 'notes.txt').write_text('model: dat_tiny\nthis is not a checkpoint\n')
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint.*starts with b'model: "):
        load_original_checkpoint(tmp_path / 'notes.txt', trusted=True)


def test_original_plain_pickle(tmp_path):
    (tmp_path / 'x.pkl').write_bytes(pickle.dumps({'a': 1}, protocol=2))
    with pytest.raises(CheckpointError, match='not one written by torch.save'):
        load_original_checkpoint(tmp_path / 'x.pkl', trusted=True)


def test_original_zip_that_is_not_a_checkpoint(tmp_path):
    with zipfile.ZipFile(tmp_path / 'a.zip', 'w') as z:
        z.writestr('readme.txt', 'hello')
    with pytest.raises(CheckpointError, match='could not read .* as a PyTorch checkpoint'):
        load_original_checkpoint(tmp_path / 'a.zip')


def test_original_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match='not found'):
        load_original_checkpoint(tmp_path / 'nope.pth')
    with pytest.raises(CheckpointError, match='got a directory'):
        load_original_checkpoint(tmp_path)


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_extract_state_dict_choices():
    w = torch.ones(1)
    assert extract_state_dict({'model': {'a': w}, 'state_dict': {'b': w}}) == {'a': w}
    assert extract_state_dict({'state_dict': {'b': w}, 'meta': {}}) == {'b': w}
    assert extract_state_dict({'c': w}) == {'c': w}
    assert list(extract_state_dict({'model': nn.Linear(2, 1)})) == ['weight', 'bias']


def test_extract_state_dict_errors():
    with pytest.raises(CheckpointError, match="top-level keys 'epoch', 'optimizer'"):
        extract_state_dict({'epoch': 3, 'optimizer': {}})
    with pytest.raises(CheckpointError, match="checkpoint\\['model'\\] is empty"):
        extract_state_dict({'model': {}})
    with pytest.raises(CheckpointError, match="1 entries do not \\('config': str\\)"):
        extract_state_dict({'state_dict': {'w': torch.ones(1), 'config': 'x'}})
    with pytest.raises(CheckpointError, match='should be a state dict.*got list'):
        extract_state_dict({'model': [torch.ones(1)]})
    with pytest.raises(CheckpointError, match='got Tensor'):
        extract_state_dict(torch.ones(1))


# ---------------------------------------------------------------------------------------------
# http:// and https:// checkpoints: weights_only=True unless the URL is trusted
# ---------------------------------------------------------------------------------------------


class RunsCode:
    """Unpickling this writes ``marker``: what a malicious checkpoint could do."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").write("ran")',)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A folder served over HTTP on 127.0.0.1 (a thread of this process), torch.hub's cache in
    tmp_path, no proxy: ``(folder, base_url)``."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder = tmp_path / 'served'
    folder.mkdir()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    for name in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('no_proxy', '127.0.0.1')
    monkeypatch.delenv(dat_ckpt.TRUSTED_URLS_ENV, raising=False)

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(QuietHandler, directory=str(folder)))
    server.timeout = 10
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.1), daemon=True)
    thread.start()
    try:
        yield folder, f'http://127.0.0.1:{server.server_address[1]}/'
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def malicious(served, tmp_path):
    """``(url, marker)``: a checkpoint with weights that runs code when fully unpickled."""
    folder, base = served
    marker = tmp_path / 'marker'
    torch.save({'state_dict': {'linear.weight': torch.ones(1, 4)}, 'x': RunsCode(marker)}, folder / 'evil.pth')
    return base + 'evil.pth', marker


def assert_refused_without_running(error, url, marker) -> None:
    message = str(error)
    assert url in message
    assert 'builtins.exec' in message  # says why
    assert dat_ckpt.TRUSTED_URLS_ENV in message  # and how to opt in
    assert not marker.exists()


def test_url_with_code_is_refused_by_mmengine_load_checkpoint(malicious):
    from mmengine.runner import load_checkpoint

    url, marker = malicious
    with pytest.raises(UntrustedCheckpointError) as error:
        load_checkpoint(ToyModel(), url, map_location='cpu')
    assert_refused_without_running(error.value, url, marker)


def test_url_with_code_is_refused_by_pretrained_init_cfg(malicious):
    from projects.dat import DAT

    url, marker = malicious
    model = DAT(arch='datpp-t', init_cfg=dict(type='Pretrained', checkpoint=url))
    with pytest.raises(UntrustedCheckpointError) as error:
        model.init_weights()
    assert_refused_without_running(error.value, url, marker)


@pytest.mark.parametrize('scheme', list(NAMED_TABLES))
def test_named_checkpoint_with_code_is_refused(malicious, monkeypatch, scheme):
    """mmengine's named schemes resolve a name to a URL and download it with its own
    ``load_from_http``; ours download it weights_only."""
    from mmengine.runner import checkpoint as mmengine_checkpoint
    from mmengine.runner import load_checkpoint

    url, marker = malicious
    monkeypatch.setattr(mmengine_checkpoint, NAMED_TABLES[scheme], lambda: {'evil': url})
    with pytest.raises(UntrustedCheckpointError) as error:
        load_checkpoint(ToyModel(), scheme + 'evil', map_location='cpu')
    assert_refused_without_running(error.value, url, marker)


def test_named_checkpoints_load_as_mmengine_loads_them(served, monkeypatch):
    from mmengine.runner import checkpoint as mmengine_checkpoint

    folder, base = served
    weights = {'backbone.w': torch.ones(2), 'head.b': torch.zeros(1)}
    torch.save({'state_dict': weights}, folder / 'clean.pth')
    monkeypatch.setattr(mmengine_checkpoint, 'get_torchvision_models', lambda: {'net': base + 'clean.pth'})
    monkeypatch.setattr(mmengine_checkpoint, 'get_external_models', lambda: {'net_v2': base + 'clean.pth'})
    monkeypatch.setattr(mmengine_checkpoint, 'get_deprecated_model_names', lambda: {'net': 'net_v2'})
    monkeypatch.setattr(mmengine_checkpoint, 'get_mmcls_models', lambda: {'net': base + 'clean.pth'})
    logged = []
    monkeypatch.setattr(dat_ckpt.url_loader, 'print_log', lambda message, **kwargs: logged.append(message))
    for name in ('torchvision://net', 'open-mmlab://net'):
        loaded = dat_ckpt.load_from_named_weights_only(name, map_location='cpu')
        assert loaded['state_dict'].keys() == weights.keys(), name
    assert logged == ['open-mmlab://net is deprecated in favour of open-mmlab://net_v2']
    mmcls = dat_ckpt.load_from_named_weights_only('mmcls://net', map_location='cpu')
    assert list(mmcls['state_dict']) == ['w']  # the backbone's weights, as mmengine's loader keeps them


def test_clean_url_loads_through_pretrained_init_cfg(served):
    from projects.dat import DAT

    folder, base = served
    source = DAT(arch=TINY['pp'], img_size=32)
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in source.state_dict().items()}}, folder / 'tiny.pth')
    init_cfg = dict(type='Pretrained', checkpoint=base + 'tiny.pth', prefix='backbone.')
    model = DAT(arch=TINY['pp'], img_size=32, init_cfg=init_cfg)
    model.init_weights()
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize('resume', [False, True])
def test_url_with_code_is_refused_as_load_from_and_resume(malicious, tmp_path, resume):
    url, marker = malicious
    runner = build_runner(tmp_path / 'run', load_from=url, resume=resume)
    with pytest.raises(UntrustedCheckpointError) as error:
        runner.load_or_resume()
    assert_refused_without_running(error.value, url, marker)


def test_mmengine_checkpoint_from_url_resumes_weights_only(served, trained, tmp_path):
    folder, base = served
    (folder / 'iter_2.pth').write_bytes((trained / 'iter_2.pth').read_bytes())
    record = RecordIterHook()
    build_runner(tmp_path / 'run', max_iters=3, resume=True, load_from=base + 'iter_2.pth', hooks=[record]).train()
    assert record.iters == [2]
    cached = Path(os.environ['TORCH_HOME']) / 'hub' / 'checkpoints' / 'iter_2.pth'
    assert cached.read_bytes() == (trained / 'iter_2.pth').read_bytes()  # torch.hub's cache, as mmengine


def test_trusted_prefix_allows_full_unpickling(malicious, monkeypatch):
    """The payload here only writes a marker file in tmp_path."""
    from mmengine.runner.checkpoint import CheckpointLoader

    url, marker = malicious
    base = url[: url.rindex('/')]
    monkeypatch.setenv(dat_ckpt.TRUSTED_URLS_ENV, f'https://elsewhere.example/, {base}0/')
    with pytest.raises(UntrustedCheckpointError):  # another port is another prefix
        CheckpointLoader.load_checkpoint(url, map_location='cpu')
    assert not marker.exists()
    monkeypatch.setenv(dat_ckpt.TRUSTED_URLS_ENV, f'https://elsewhere.example/,{base}')  # no path: base + '/'
    ckpt = CheckpointLoader.load_checkpoint(url, map_location='cpu')
    assert marker.read_text() == 'ran'
    assert torch.equal(ckpt['state_dict']['linear.weight'], torch.ones(1, 4))


def test_trusted_url_never_uses_a_cached_file_of_an_untrusted_url(served, tmp_path, monkeypatch):
    """torch.hub caches by file name only: an untrusted URL's model.pth must not be fully
    unpickled when a trusted URL of the same file name is loaded."""
    from mmengine.runner.checkpoint import CheckpointLoader

    folder, base = served
    marker = tmp_path / 'marker'
    (folder / 'untrusted').mkdir()
    (folder / 'trusted').mkdir()
    torch.save({'w': torch.ones(1), 'x': RunsCode(marker)}, folder / 'untrusted' / 'model.pth')
    torch.save({'w': torch.ones(1), 'cfg': argparse.Namespace(lr=0.1)}, folder / 'trusted' / 'model.pth')
    monkeypatch.setenv(dat_ckpt.TRUSTED_URLS_ENV, base + 'trusted/')
    with pytest.raises(UntrustedCheckpointError):
        CheckpointLoader.load_checkpoint(base + 'untrusted/model.pth', map_location='cpu')
    ckpt = CheckpointLoader.load_checkpoint(base + 'trusted/model.pth', map_location='cpu')
    assert ckpt['cfg'].lr == 0.1
    assert not marker.exists()


def test_trusted_prefixes_are_checked():
    assert dat_ckpt.trusted_url_prefixes('') == []
    assert dat_ckpt.trusted_url_prefixes(' https://h.org , http://h:8/a/b,') == ['https://h.org/', 'http://h:8/a/b']
    for bad in ('h.org/models', 'file:///tmp/', 's3://bucket/', 'https://'):
        with pytest.raises(ValueError, match=f'{dat_ckpt.TRUSTED_URLS_ENV} holds comma-separated URL prefixes'):
            dat_ckpt.trusted_url_prefixes(bad)


def test_trusted_url_matching():
    prefixes = 'https://h.org, http://h:8/models/'
    assert dat_ckpt.is_trusted_url('https://h.org/a.pth', prefixes)
    assert dat_ckpt.is_trusted_url('http://h:8/models/x/a.pth', prefixes)
    assert not dat_ckpt.is_trusted_url('https://h.org.evil.com/a.pth', prefixes)  # host prefix ends with '/'
    assert not dat_ckpt.is_trusted_url('https://h.org@evil.com/a.pth', prefixes)
    assert not dat_ckpt.is_trusted_url('http://h:80/models/a.pth', prefixes)
    assert not dat_ckpt.is_trusted_url('http://h:8/other/a.pth', prefixes)
    for escape in ('..', '%2e%2E', '.'):
        assert not dat_ckpt.is_trusted_url(f'http://h:8/models/{escape}/a.pth', prefixes)
    assert dat_ckpt.is_trusted_url('http://h:8/models/v1..2/a.pth', prefixes)  # only whole segments
    assert not dat_ckpt.is_trusted_url('https://h.org/a.pth', '')


def test_truncated_download_says_where_the_cache_is(served):
    from mmengine.runner.checkpoint import CheckpointLoader

    folder, base = served
    torch.save({'w': torch.ones(1000)}, folder / 'cut.pth')
    (folder / 'cut.pth').write_bytes((folder / 'cut.pth').read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r'cut\.pth: .*truncated.*delete .*cut\.pth to download it again'):
        CheckpointLoader.load_checkpoint(base + 'cut.pth', map_location='cpu')


# ---------------------------------------------------------------------------------------------
# Kill -9 in the middle of training, resume, compare with an uninterrupted run
# ---------------------------------------------------------------------------------------------

MAX_ITERS = 10


def train_in_child(work_dir, *extra: str) -> subprocess.CompletedProcess:
    return run_python(str(Path(__file__).resolve()), str(work_dir), *extra)


def final_weights(work_dir) -> dict:
    return torch.load(Path(work_dir) / f'iter_{MAX_ITERS}.pth')['state_dict']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('uninterrupted')
    build_runner(work_dir, max_iters=MAX_ITERS, interval=1, max_keep_ckpts=1).train()
    return final_weights(work_dir)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigkill_twice_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    """SIGKILL between two iterations, resume; SIGKILL half-way through writing a checkpoint
    (max_keep_ckpts=1, so mmengine is about to delete the only other one), resume: the final
    weights equal those of a run that was never interrupted. The runs name
    ``AtomicCheckpointHook`` in ``default_hooks``, as our configs do."""
    killed = train_in_child(tmp_path, '--kill-after-iter', '3')
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / 'last_checkpoint').read_text().endswith('iter_3.pth')

    killed = train_in_child(tmp_path, '--resume', '--kill-while-writing', 'iter_7.pth')
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert 'Advance dataloader 3 steps' in killed.stdout + killed.stderr
    assert sorted(p.name for p in tmp_path.glob('*.pth')) == ['iter_6.pth']
    assert (tmp_path / 'last_checkpoint').read_text().endswith('iter_6.pth')
    assert len(tmp_leftovers(tmp_path)) == 1  # the half-written temporary file, nothing else

    resumed = train_in_child(tmp_path, '--resume')
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'Advance dataloader 6 steps' in resumed.stdout + resumed.stderr
    assert_same_weights(final_weights(tmp_path), uninterrupted)


def test_sigkill_while_writing_without_protection_loses_checkpoint(tmp_path):
    """The same crash with mmengine's own ``CheckpointHook``: the old checkpoint was deleted
    before the new one was written, so there is nothing to resume from (this is what the test
    above guards against)."""
    killed = train_in_child(tmp_path, '--kill-while-writing', 'iter_7.pth', '--no-atomic')
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / 'iter_6.pth').exists()
    resumed = train_in_child(tmp_path, '--resume', '--no-atomic')
    assert resumed.returncode != 0
    assert 'iter_6.pth can not be found' in resumed.stderr


def _child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description='train the toy model (kill/resume tests)')
    parser.add_argument('work_dir')
    parser.add_argument('--resume', action='store_true')
    parser.add_argument('--kill-after-iter', type=int, default=None)
    parser.add_argument(
        '--kill-while-writing',
        default=None,
        help='SIGKILL half-way through writing the file of this name',
    )
    parser.add_argument('--no-atomic', action='store_true', help="mmengine's CheckpointHook instead of ours")
    args = parser.parse_args(argv)
    if args.kill_while_writing:
        # Imported here, in the child only: the module registers test hooks in mmengine's HOOKS.
        from fixtures.dat_test_hooks import kill_while_writing

        kill_while_writing(args.kill_while_writing)
    hooks = [KillHook(args.kill_after_iter)] if args.kill_after_iter is not None else []
    build_runner(
        args.work_dir,
        max_iters=MAX_ITERS,
        interval=1,
        max_keep_ckpts=1,
        resume=args.resume,
        hooks=hooks,
        checkpoint_type='CheckpointHook' if args.no_atomic else 'AtomicCheckpointHook',
    ).train()


if __name__ == '__main__':
    _child_main(sys.argv[1:])
