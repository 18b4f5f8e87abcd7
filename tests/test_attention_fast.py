"""Fast deformable and neighbourhood attention against their reference paths.

Agreement is checked in float32 as a relative error against the largest reference value
(``max|fast - ref| <= 1e-5 * max|ref|``) on outputs and on every gradient, on odd and tiny
maps, several groups, both DAT versions, and through whole backbones (including the golden
tensors of the original code). Memory: the fast paths must not save any tensor of the size
of the attention matrix (deformable) or of the windows' logits (neighbourhood).

The tests that take ``device`` (``tests/conftest.py``) run on CPU and, where a GPU is visible,
on CUDA (with TF32 off), where the fast paths run in PyTorch; the inputs are made on CPU and
moved, so that both devices see the same numbers.
"""

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from fixtures.tiny_archs import TINY as TINY_ARCHS

from projects.dat import DAT, set_attn_impl
from projects.dat.converter import convert_original_state_dict
from projects.dat.models.dat import ConvFFN, DeformableAttention, NeighborhoodAttention
from projects.dat.models.geometry import query_grid
from projects.dat.models.inspection import record_sampling_points
from projects.dat.ops import (
    ATTN_IMPLS,
    chunking,
    cpu_kernels,
    deformable_attention,
    dispatch,
    gpu_kernels,
    neighborhood_attention,
    select_backend,
    torch_compat,
)
from projects.dat.ops import deformable as deformable_ops
from projects.dat.ops import neighborhood as neighborhood_ops
from projects.dat.ops.neighborhood import neighborhood_tiles
from projects.dat.ops.reference import (
    deformable_attention_reference,
    neighborhood_attention_reference,
    neighborhood_indices,
)

GOLDEN = Path(__file__).resolve().parents[2] / 'shared' / 'golden'
CPU = torch.device('cpu')
needs_custom_ops = pytest.mark.skipif(
    not torch_compat.HAS_CUSTOM_OPS,
    reason=(
        f'torch {torch.__version__} has no torch.library.custom_op (torch 2.4): the fast ops run as plain autograd '
        'functions, which torch.compile and opcheck do not treat as operators'
    ),
)
# Stage 2 with two heads per offset group (the fixture's has one).
TINY = dict(TINY_ARCHS, pp=dict(TINY_ARCHS['pp'], heads=[1, 2, 4, 4]))


def assert_rel_close(actual, expected, tol=1e-5, name='', floor=1e-6):
    """``max|actual - expected| <= tol * max(max|expected|, floor)``."""
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(scale, floor), f'{name}: max error {err:.3e} vs max value {scale:.3e}'


def _deformable_inputs(b, c, h, w, heads, groups, hk, wk, table, version, spread, dtype=torch.float32, device=CPU):
    """Random deformable-attention inputs (made on CPU, then moved to ``device``) requiring grad,
    and the query grid."""
    g = torch.Generator().manual_seed(h * 100 + w * 10 + groups)
    q = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    k = torch.randn(b, c, hk * wk, generator=g, dtype=dtype)
    v = torch.randn(b, c, hk * wk, generator=g, dtype=dtype)
    pos = (torch.rand(b * groups, hk * wk, 2, generator=g, dtype=dtype) * 2 - 1) * spread
    rpe = torch.randn(heads, *table, generator=g, dtype=dtype)
    coords = query_grid(h, w, version, dtype).to(device)
    return [t.to(device).requires_grad_() for t in (q, k, v, pos, rpe)], coords


@pytest.fixture
def gpu_kernel(monkeypatch):
    """A function of the device that returns the attn_impl under which the D and N ops run their GPU
    kernels, ``'fast'``: on CUDA where they are turned on (``DAT_GPU_KERNELS=1``, as
    ``tools/gpu_check.sh`` sets it), else the test is skipped. On CPU the kernels run in Triton's
    interpreter, which Triton sets up on import (``TRITON_INTERPRET=1``): those cases run in a
    process of their own (:func:`test_gpu_kernel_cases_pass_in_triton_interpreter`), where the
    ops' entries send their float32 work to the kernels, and are skipped elsewhere."""

    def interpreted(impl, device, compute_dtype, gpu_kernel=False):
        if impl == 'fast' and compute_dtype == torch.float32:
            return 'gpu-kernel'
        return select_backend(impl, device, compute_dtype, gpu_kernel)

    def use(device):
        if device.type == 'cpu':
            if not gpu_kernels.interpreting():
                pytest.skip("runs in Triton's interpreter: test_gpu_kernel_cases_pass_in_triton_interpreter")
            monkeypatch.setenv(gpu_kernels.ENV_SWITCH, '1')
            for ops in (deformable_ops, neighborhood_ops):
                monkeypatch.setattr(ops, 'select_backend', interpreted)
        if not gpu_kernels.available():
            switch = gpu_kernels.ENV_SWITCH
            pytest.skip(f'the GPU kernels are off ({switch}=1 turns them on) or Triton 3 or newer does not import')
        return 'fast'

    return use


def test_gpu_kernel_cases_pass_in_triton_interpreter():
    """The CPU cases of the D and N ops' GPU kernels (``gpu_kernel`` in their id), in a process with
    ``TRITON_INTERPRET=1``: the kernels' output and gradients against the reference (and, for half
    inputs, against the PyTorch path)."""
    if not gpu_kernels.triton_imports():
        pytest.skip('Triton 3 or newer does not import here')
    if gpu_kernels.interpreting():
        pytest.skip('already in the interpreter')
    cases = 'cpu-gpu_kernel or (gpu_kernel_half and cpu) or (neighborhood_gpu_kernel and cpu)'
    command = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__, '-k', cases]
    env = {**os.environ, gpu_kernels.INTERPRET_SWITCH: '1'}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    # Every case ran: D: 7 shapes, 6 layouts, float16 inputs, the far keys, the NaN position; N: 4
    # shapes, the qkv buffer, NaN inputs; opcheck of both (and bfloat16 was skipped).
    expected = r'23 passed, 1 skipped(, \d+ deselected)?(, \d+ warnings?)? in [\d.]+s( \(.*\))?'
    assert re.fullmatch(expected, summary), summary


def _fast_impl(bias_impl, require_cpu_kernels, device=CPU, gpu_kernel=None):
    """The attn_impl of a test's backend: the C++ kernels (required to run; CPU only), the D op's
    GPU kernel (the ``gpu_kernel`` fixture's function) or PyTorch."""
    if bias_impl == 'pytorch':
        return 'pytorch'
    if bias_impl == 'gpu_kernel':
        return gpu_kernel(device)
    if device.type != 'cpu':
        pytest.skip(f'the C++ kernels compute on CPU only, not on {device.type}')
    require_cpu_kernels()
    return 'cpu-kernel'


def _assert_deformable_matches_reference(inputs, coords, groups, chunk, impl):
    """The fast deformable op's output and gradients equal the reference's (1e-5 relative);
    returns the fast op's gradients of ``inputs`` (q, k, v, pos, table)."""
    q, k, v, pos, rpe = inputs
    ref = deformable_attention_reference(q, k, v, pos, coords.reshape(-1, 2), rpe, groups)
    fast = deformable_attention(q, k, v, pos, coords[:, 0, 0], coords[0, :, 1], rpe, groups, impl, chunk_elements=chunk)
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    assert_rel_close(fast, ref, name='output')
    grad_out = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, inputs, grad_out)
    grads_fast = torch.autograd.grad(fast, inputs, grad_out)
    # With one key the softmax is 1 and the logits' gradient p * (dp - sum(p * dp)) is zero in
    # exact arithmetic, so are those of q, k, pos and the table: what is left is the round-off of
    # the terms that cancel, of the size |grad_out| |v| |q or k| (CUDA leaves 3e-7 where CPU
    # leaves 0).
    one_key = k.shape[-1] == 1
    cancelled = (grad_out.abs().max() * v.abs().max() * max(q.abs().max(), k.abs().max())).item()
    for name, a, e in zip(('q', 'k', 'v', 'pos', 'table'), grads_fast, grads_ref, strict=True):
        floor = cancelled if one_key and name != 'v' else 1e-6
        assert_rel_close(a, e, name=f'grad {name}', floor=floor)
    return grads_fast


@pytest.mark.parametrize(
    'b, c, h, w, heads, groups, hk, wk, table, version, chunk',
    [
        (2, 8, 7, 9, 2, 1, 2, 3, (13, 13), 'pp', None),
        (2, 8, 7, 9, 2, 1, 2, 3, (13, 13), 'pp', 40),  # several chunks of rows
        (3, 16, 13, 11, 4, 2, 4, 3, (9, 7), 'v1', 2000),  # several images per chunk
        (1, 16, 13, 11, 4, 4, 7, 6, (25, 21), 'pp', 300),
        (3, 16, 1, 1, 4, 2, 1, 1, (5, 5), 'pp', None),  # 1x1 map, one key
        (2, 12, 3, 3, 6, 3, 2, 2, (5, 7), 'v1', 10),
        (1, 8, 5, 16, 2, 2, 3, 4, (3, 3), 'pp', None),  # table smaller than the map
    ],
)
@pytest.mark.parametrize('bias_impl', ['cpu_kernels', 'gpu_kernel', 'pytorch'])
def test_deformable_matches_reference(
    b, c, h, w, heads, groups, hk, wk, table, version, chunk, bias_impl, device, require_cpu_kernels, gpu_kernel
):
    impl = _fast_impl(bias_impl, require_cpu_kernels, device, gpu_kernel)
    # Positions beyond [-1, 1] (v1 allows them) exercise the zero padding of the table.
    inputs, coords = _deformable_inputs(b, c, h, w, heads, groups, hk, wk, table, version, spread=1.1, device=device)
    _assert_deformable_matches_reference(inputs, coords, groups, chunk, impl)


@pytest.mark.parametrize('b, groups', [(1, 2), (2, 1), (2, 2)])
@pytest.mark.parametrize('grad_layout', ['contiguous', 'channels_last'])
@pytest.mark.parametrize('bias_impl', ['cpu_kernels', 'gpu_kernel', 'pytorch'])
def test_deformable_channels_last_queries(b, groups, grad_layout, bias_impl, device, require_cpu_kernels, gpu_kernel):
    """The D block's queries are channels-last maps: the output is too, on every path. The operator
    reads them in place (and returns q's gradient in their layout) where the batch or the groups
    are one; a batch of several groups is copied. Values and gradients are the reference's either
    way, for either layout of the output's gradient. Rows of 37 queries: a block of 32 and a tail."""
    impl = _fast_impl(bias_impl, require_cpu_kernels, device, gpu_kernel)
    inputs, coords = _deformable_inputs(b, 16, 5, 37, 4, groups, 3, 4, (11, 13), 'pp', spread=1.1, device=device)
    q = inputs[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    inputs = [q, *inputs[1:]]
    ref = deformable_attention_reference(*inputs[:4], coords.reshape(-1, 2), inputs[4], groups)
    fast, reference_path = (
        deformable_attention(*inputs[:4], coords[:, 0, 0], coords[0, :, 1], inputs[4], groups, i)
        for i in (impl, 'reference')
    )
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert reference_path.is_contiguous(memory_format=torch.channels_last)
    in_place = b == 1 or groups == 1
    assert_rel_close(fast, ref, name='output')
    layout = {'contiguous': torch.contiguous_format, 'channels_last': torch.channels_last}[grad_layout]
    grad_out = torch.randn_like(ref, memory_format=layout)
    grads_ref = torch.autograd.grad(ref, inputs, grad_out)
    grads_fast = torch.autograd.grad(fast, inputs, grad_out)
    assert grads_fast[0].is_contiguous(memory_format=torch.channels_last) == in_place
    for name, a, e in zip(('q', 'k', 'v', 'pos', 'table'), grads_fast, grads_ref, strict=True):
        assert_rel_close(a, e, name=f'grad {name}')


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['float16', 'bfloat16'])
def test_deformable_gpu_kernel_half_inputs_agree_with_pytorch_path(dtype, device, gpu_kernel):
    """Half q, k and v (as under autocast): the GPU kernels' output and gradients are the PyTorch
    path's to half round-off (both round the product's logits to the half type and sum in float32)."""
    if device.type == 'cpu' and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter multiplies bfloat16 blocks wrongly (tl.dot); the CUDA case runs it")
    gpu_kernel(device)
    inputs, coords = _deformable_inputs(2, 16, 6, 7, 4, 2, 3, 3, (9, 11), 'pp', spread=1.1, device=device)
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in inputs[:3])
    inputs = [q, k, v, *inputs[3:]]
    grad_out = torch.randn(2, 16, 6, 7, device=device).to(dtype)
    results = {}
    for backend in ('gpu-kernel', 'pytorch'):
        out, _ = deformable_ops._deformable_attention_op(
            q.reshape(4, 2, 4, 42), k.reshape(4, 2, 4, 9), v.reshape(4, 2, 4, 9), inputs[3],
            coords[:, 0, 0], coords[0, :, 1], inputs[4], 2, 1 << 20, backend,
        )  # fmt: skip
        assert out.dtype == dtype
        results[backend] = (out, torch.autograd.grad(out.view(2, 16, 6, 7), inputs, grad_out))
    (out, grads), (out_pt, grads_pt) = results['gpu-kernel'], results['pytorch']
    assert_rel_close(out.float(), out_pt.float(), tol=1e-2, name='output')
    for name, a, e in zip(('q', 'k', 'v', 'pos', 'table'), grads, grads_pt, strict=True):
        assert a.dtype == e.dtype
        assert_rel_close(a.float(), e.float(), tol=2e-2, name=f'grad {name}')


@pytest.mark.parametrize('bias_impl', ['cpu_kernels', 'gpu_kernel', 'pytorch'])
def test_deformable_keys_far_outside_the_table(bias_impl, device, require_cpu_kernels, gpu_kernel):
    """Keys up to 3x beyond [-1, 1]: many displacements fall beyond the table's zero padding
    (both taps outside, coordinates clamped), where the bias is 0 and has no gradient, as in
    grid_sample; others have one tap inside."""
    impl = _fast_impl(bias_impl, require_cpu_kernels, device, gpu_kernel)
    inputs, coords = _deformable_inputs(2, 8, 6, 7, 2, 2, 3, 3, (9, 11), 'pp', spread=3.0, device=device)
    pos = inputs[3]
    with torch.no_grad():
        pos[:, :2] = 4.5  # beyond every query's reach: displacements below -1.75 in both axes
    grad_pos = _assert_deformable_matches_reference(inputs, coords, 2, 50, impl)[3]
    # The keys beyond every query's reach get no gradient; the others do.
    assert grad_pos[:, :2].abs().max() == 0 and grad_pos[:, 2:].abs().min() > 0


@pytest.mark.parametrize('chunk', [None, 40])
def test_deformable_cpu_kernels_equal_pytorch_path(chunk, require_cpu_kernels):
    require_cpu_kernels()
    (q, k, v, pos, rpe), coords = _deformable_inputs(2, 16, 9, 11, 4, 2, 3, 4, (13, 15), 'v1', spread=1.2)
    qy, qx = coords[:, 0, 0], coords[0, :, 1]
    grad_out = torch.randn(2, 16, 9, 11, generator=torch.Generator().manual_seed(0))
    results = {}
    for impl in ('cpu-kernel', 'pytorch'):
        out = deformable_attention(q, k, v, pos, qy, qx, rpe, 2, impl, chunk_elements=chunk)
        results[impl] = (out, torch.autograd.grad(out, (q, k, v, pos, rpe), grad_out))
    (out, grads), (out_pt, grads_pt) = results['cpu-kernel'], results['pytorch']
    assert_rel_close(out, out_pt, tol=1e-6, name='output')
    # Two float32 round-offs of sums over many pairs: up to 1.4e-6 over 60 random grad_out.
    for name, a, e in zip(('q', 'k', 'v', 'pos', 'table'), grads, grads_pt, strict=True):
        assert_rel_close(a, e, tol=2e-6, name=f'grad {name}')


def test_deformable_cpu_kernel_bias_windows_of_every_width(require_cpu_kernels):
    """The C++ kernels add the bias and take its gradient 8 queries x 8 keys at a time, from a
    window of the table columns that the keys' taps reach over those queries (taps at most 6
    columns above the lowest, code specialised per spread), where the first key's taps move by
    at most 4 columns over the 8 queries; elsewhere pair by pair. Query rows of 64 against tables
    2 to 96 columns wide move the taps by 0.06 to 5.3 columns per 8 queries: windows of every
    spread that occurs (0 to 5 columns) and the pairwise path each agree with the reference."""
    require_cpu_kernels()
    widths = set()
    for table_width in (2, 12, 30, 48, 66, 80, 96):
        inputs, coords = _deformable_inputs(1, 16, 3, 64, 2, 1, 4, 6, (5, table_width), 'pp', spread=1.0)
        _assert_deformable_matches_reference(inputs, coords, 1, None, 'cpu-kernel')
        ix, _ = deformable_ops._table_coordinates(coords[0, :, 1], inputs[3].detach()[..., 1], table_width)
        groups = ix[0].reshape(8, 8, 3, 8)  # (query group, query, key block, key)
        windowed = (groups[:, 7, 0, 0] - groups[:, 0, 0, 0]).abs() <= 4  # by the first key's taps
        spread = (groups.amax(1) - groups.amin(1)).amax(-1)  # the widest of each block's 8 keys
        widths.update(spread[windowed].flatten().tolist())
        widths.update(['pairs'] if not windowed.all() else [])
    assert widths == {0, 1, 2, 3, 4, 5, 'pairs'}


@pytest.mark.parametrize('threads', [1, 3])
def test_deformable_cpu_kernel_blocks_and_row_segments(threads, require_cpu_kernels):
    # Query rows of 70 (two blocks of the kernel's 32 queries and a tail of 6), a head size of 5
    # (off the vector lanes) and 15 keys; with 3 threads for 2 heads, the backward pass splits the
    # rows into 2 segments per head, whose gradients are summed.
    require_cpu_kernels()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs, coords = _deformable_inputs(1, 10, 5, 70, 2, 1, 3, 5, (9, 11), 'pp', spread=1.5)
        _assert_deformable_matches_reference(inputs, coords, 1, None, 'cpu-kernel')
    finally:
        torch.set_num_threads(previous)


def test_deformable_cpu_kernel_under_autocast_computes_in_float32(require_cpu_kernels):
    # Half inputs (CPU autocast) reach the kernel as float32; the output and gradients return in
    # the inputs' dtypes.
    require_cpu_kernels()
    (q, k, v, pos, rpe), coords = _deformable_inputs(1, 8, 4, 6, 2, 2, 2, 3, (7, 7), 'pp', spread=1.0)
    qy, qx = coords[:, 0, 0], coords[0, :, 1]
    half = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out = deformable_attention(*half, pos, qy, qx, rpe, 2, 'cpu-kernel')
    ref = deformable_attention(*(t.detach().bfloat16().float() for t in (q, k, v)), pos, qy, qx, rpe, 2, 'cpu-kernel')
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0, rtol=0.01)
    grads = torch.autograd.grad(out.float().square().sum(), half)
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def test_unbuildable_cpu_kernels_fall_back_to_pytorch_with_a_warning(monkeypatch):
    def no_compiler(verbose=False):
        raise OSError('g++: not found')

    monkeypatch.setattr(cpu_kernels, '_loaded', {})
    monkeypatch.setattr(cpu_kernels, 'build', no_compiler)
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    messages = []
    monkeypatch.setattr(cpu_kernels, 'print_log', lambda msg, **kwargs: messages.append((msg, kwargs['level'])))
    (q, k, v, pos, rpe), coords = _deformable_inputs(1, 8, 5, 6, 2, 1, 2, 2, (7, 7), 'pp', 0.9)
    out = deformable_attention(q, k, v, pos, coords[:, 0, 0], coords[0, :, 1], rpe, 1)
    ref = deformable_attention_reference(q, k, v, pos, coords.reshape(-1, 2), rpe, 1)
    assert_rel_close(out, ref)
    assert cpu_kernels.load_kernels() is None
    assert len(messages) == 1 and messages[0][1] == logging.WARNING
    assert 'g++: not found' in messages[0][0] and 'runs in PyTorch' in messages[0][0]


def test_deformable_float64_is_exact_and_passes_gradcheck(device):
    # Keys up to 2x beyond [-1, 1]: some displacements fall beyond the zero padding of the table.
    (q, k, v, pos, rpe), coords = _deformable_inputs(
        1, 4, 3, 4, 2, 2, 2, 2, (5, 5), 'pp', 2.0, torch.float64, device=device
    )
    ref = deformable_attention_reference(q, k, v, pos, coords.reshape(-1, 2), rpe, 2)
    fast = deformable_attention(q, k, v, pos, coords[:, 0, 0], coords[0, :, 1], rpe, 2, chunk_elements=8)
    assert_rel_close(fast, ref, tol=1e-12)
    assert torch.autograd.gradcheck(
        lambda *t: deformable_attention(*t[:4], coords[:, 0, 0], coords[0, :, 1], t[4], 2, chunk_elements=8),
        (q, k, v, pos, rpe),
    )


@pytest.mark.parametrize(
    'b, heads, h, w, d, kernel',
    [
        (2, 2, 7, 9, 4, 7),
        (1, 3, 13, 11, 8, 7),
        (2, 1, 7, 7, 4, 7),
        (1, 2, 5, 6, 4, 3),
        (1, 2, 20, 17, 8, 5),
        (2, 2, 23, 30, 4, 7),  # several tiles per axis, the last one overlapping
        (1, 2, 9, 8, 13, 7),  # d not a multiple of the kernels' 8 lanes
        (1, 2, 9, 21, 40, 7),  # C++ tiles whose keys' gradient sums take 32 channels, then 8
    ],
)
# The C++ kernel (window by window), or the tiled PyTorch path in one chunk or one tile row per chunk.
@pytest.mark.parametrize('impl, chunk', [('cpu_kernels', None), ('pytorch', None), ('pytorch', 1)])
def test_neighborhood_matches_reference(b, heads, h, w, d, kernel, impl, chunk, device, require_cpu_kernels):
    impl = _fast_impl(impl, require_cpu_kernels, device)
    g = torch.Generator().manual_seed(h * w)
    q, k, v = (torch.randn(b, heads, h, w, d, generator=g).to(device).requires_grad_() for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g).to(device).requires_grad_()
    ref = neighborhood_attention_reference(q, k, v, rpb, kernel)
    fast = neighborhood_attention(q, k, v, rpb, kernel, impl, chunk_elements=chunk)
    assert_rel_close(fast, ref, name='output')
    grad_out = torch.randn_like(ref)
    for name, a, e in zip(
        'qkvb',
        torch.autograd.grad(fast, (q, k, v, rpb), grad_out),
        torch.autograd.grad(ref, (q, k, v, rpb), grad_out),
        strict=False,
    ):
        assert_rel_close(a, e, name=f'grad {name}')


# Small enough for Triton's interpreter, which runs the programs one by one: one and several
# tiles of 8 x 8 pixels per axis, maps of the kernel's size, borders where windows shift inwards,
# channels not a power of two.
@pytest.mark.parametrize(
    'b, heads, h, w, d, kernel',
    [(1, 1, 7, 9, 4, 7), (2, 1, 10, 11, 4, 3), (1, 2, 9, 17, 13, 5), (1, 1, 5, 3, 8, 3)],
)
def test_neighborhood_gpu_kernel_matches_reference(b, heads, h, w, d, kernel, device, gpu_kernel):
    impl = gpu_kernel(device)
    g = torch.Generator().manual_seed(h * w)
    q, k, v = (torch.randn(b, heads, h, w, d, generator=g).to(device).requires_grad_() for _ in range(3))
    rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g).to(device).requires_grad_()
    ref = neighborhood_attention_reference(q, k, v, rpb, kernel)
    fast = neighborhood_attention(q, k, v, rpb, kernel, impl)
    assert_rel_close(fast, ref, name='output')
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(fast, (q, k, v, rpb), grad_out)
    for name, a, e in zip('qkvb', grads, torch.autograd.grad(ref, (q, k, v, rpb), grad_out), strict=True):
        assert_rel_close(a, e, name=f'grad {name}')


@pytest.mark.parametrize('impl', ['cpu-kernel', pytest.param('gpu-kernel', id='gpu_kernel'), 'pytorch', 'reference'])
def test_neighborhood_reads_the_qkv_buffer_in_place_and_scales_queries(
    impl, device, require_cpu_kernels, gpu_kernel, monkeypatch
):
    """As the N block calls it: q, k, v are views of one (B, H, W, 3, heads, d) buffer and the
    queries' scale is an argument. Agrees with the reference on ``scale * q`` (forward, and the
    gradients of the buffer and the table); the C++ and GPU kernels get the views themselves (no
    copy), and the C++ kernels give the same bits as pre-scaled contiguous inputs."""
    b, h, w, heads, d, kernel, scale = 2, 11, 19, 2, 16, 7, 16**-0.5
    if impl == 'cpu-kernel':
        _fast_impl('cpu_kernels', require_cpu_kernels, device)
    if impl == 'gpu-kernel':
        impl = gpu_kernel(device)
        h, w, kernel = 9, 10, 3  # few programs for Triton's interpreter
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(b, h, w, 3, heads, d, generator=g).to(device).requires_grad_()
    rpb = torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=g).to(device).requires_grad_()
    grad_out = torch.randn(b, heads, h, w, d, generator=g).to(device)
    q, k, v = (t.permute(0, 3, 1, 2, 4) for t in qkv.unbind(3))
    passed = []
    op = neighborhood_ops._neighborhood_attention_op
    monkeypatch.setattr(neighborhood_ops, '_neighborhood_attention_op', lambda *args: passed.append(args) or op(*args))
    out = neighborhood_attention(q, k, v, rpb, kernel, impl, scale=scale)
    grads = torch.autograd.grad(out, (qkv, rpb), grad_out)
    ref = neighborhood_attention_reference(q * scale, k, v, rpb, kernel)
    assert_rel_close(out, ref, name='output')
    for name, a, e in zip(('qkv', 'rpb'), grads, torch.autograd.grad(ref, (qkv, rpb), grad_out), strict=True):
        assert_rel_close(a, e, name=f'grad {name}')
    assert len(passed) == (impl != 'reference')
    if impl not in ('cpu-kernel', 'fast'):
        return
    assert all(t.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr() for t in passed[0][:3])
    if impl == 'fast':
        return
    inputs = [t.detach().contiguous().requires_grad_() for t in (q * scale, k, v, rpb)]
    prescaled = neighborhood_attention(*inputs, kernel, impl)
    assert torch.equal(out, prescaled)
    grad_q, grad_k, grad_v, grad_rpb = torch.autograd.grad(prescaled, inputs, grad_out)
    assert torch.equal(grads[0], torch.stack([grad_q * scale, grad_k, grad_v], 1).permute(0, 3, 4, 1, 2, 5))
    assert torch.equal(grads[1], grad_rpb)


def test_neighborhood_cpu_kernel_and_tiled_path_match_float64(require_cpu_kernels):
    """The C++ kernel and the tiled PyTorch path, each against the tiled path in float64.

    Each is within 1.1e-6 of the largest value of float64's result (AVX2 and baseline builds of
    the kernel alike); their difference adds two independent round-offs and reached 2.1e-6 in
    the baseline build, so it is not what is bounded."""
    require_cpu_kernels()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 16, 19, 32, generator=g).requires_grad_() for _ in range(3))
    rpb = torch.randn(4, 13, 13, generator=g).requires_grad_()
    grad_out = torch.randn(3, 4, 16, 19, 32, generator=g)
    results = {}
    for impl, dtype in (('cpu-kernel', torch.float32), ('pytorch', torch.float32), ('pytorch', torch.float64)):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, rpb)]
        out = neighborhood_attention(*inputs, 7, impl)
        results[impl, dtype] = (out, *torch.autograd.grad(out, inputs, grad_out.to(dtype)))
    exact = results['pytorch', torch.float64]
    for impl in ('cpu-kernel', 'pytorch'):
        for name, a, e in zip(
            ('output', 'grad q', 'grad k', 'grad v', 'grad rpb'), results[impl, torch.float32], exact, strict=True
        ):
            assert_rel_close(a.double(), e, tol=2e-6, name=f'{impl} {name}')


def test_neighborhood_cpu_kernel_row_segments(require_cpu_kernels):
    """With fewer (batch, head) slices than threads, the backward pass splits each head's query rows
    into segments (here 1, 2 and 3 of 23 rows, at least 7 high), each with its own gradients of the
    key and value rows its windows read and of the bias, summed after. With each split the
    gradients agree with float64; the queries' gradients, which no two segments share, keep their
    bits."""
    require_cpu_kernels()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 23, 19, 32, generator=g).requires_grad_() for _ in range(3))
    rpb = torch.randn(1, 13, 13, generator=g).requires_grad_()
    grad_out = torch.randn(1, 1, 23, 19, 32, generator=g)
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v, rpb)]
    exact = torch.autograd.grad(neighborhood_attention(*inputs, 7, 'pytorch'), inputs, grad_out.double())
    previous = torch.get_num_threads()
    grad_q = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            grads = torch.autograd.grad(neighborhood_attention(q, k, v, rpb, 7, 'cpu-kernel'), (q, k, v, rpb), grad_out)
            for name, a, e in zip(('q', 'k', 'v', 'rpb'), grads, exact, strict=True):
                assert_rel_close(a.double(), e, tol=2e-6, name=f'grad {name}, {threads} threads')
            grad_q[threads] = grads[0]
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(grad_q[1], grad_q[2]) and torch.equal(grad_q[1], grad_q[3])


@pytest.mark.parametrize(
    'height, width, d, kernel',
    [
        (9, 30, 32, 7),  # tiles of 8 queries, windows clamped at the top and bottom rows
        (6, 21, 13, 5),  # d not a multiple of 8: window by window everywhere
        (4, 19, 8, 3),
        (9, 26, 16, 9),  # no tiles for this kernel size: window by window everywhere
    ],
)
def test_neighborhood_kernel_query_tiles_equal_window_by_window(height, width, d, kernel, require_cpu_kernels):
    """The kernels compute 8 neighbouring queries side by side where their windows are not clamped
    at a row's ends, and the others one by one; the backward pass recomputes the logits against the
    forward pass's log-sum-exp. Both ways must give the same bits: a query computed in a tile
    equals the same query in a map cropped to its window's columns, too narrow for any tile (its
    output, log-sum-exp and q's gradient depend on its window only). The full map's q, k, v are
    views of one (B, H, W, 3, heads, d) buffer (read in place), the crops contiguous copies."""
    require_cpu_kernels()
    kernels = cpu_kernels.load_kernels()
    g = torch.Generator().manual_seed(width)
    q, k, v = torch.randn(1, height, width, 3, 3, d, generator=g).unbind(3)
    grad_out = torch.randn(1, height, width, 3, d, generator=g)
    rpb = torch.randn(3, 2 * kernel - 1, 2 * kernel - 1, generator=g)
    scale = d**-0.5
    out, lse = kernels.neighborhood_attention_forward(q, k, v, rpb, kernel, scale)
    grad_q = kernels.neighborhood_attention_backward(grad_out, q, k, v, rpb, out, lse, kernel, scale)[0]
    half = kernel // 2
    for j in range(half, width - half):
        window = slice(j - half, j + half + 1)
        q_c, k_c, v_c, grad_out_c = (t[:, :, window].contiguous() for t in (q, k, v, grad_out))
        out_c, lse_c = kernels.neighborhood_attention_forward(q_c, k_c, v_c, rpb, kernel, scale)
        grad_q_c, *_ = kernels.neighborhood_attention_backward(
            grad_out_c, q_c, k_c, v_c, rpb, out_c, lse_c, kernel, scale
        )
        assert torch.equal(out[:, :, j], out_c[:, :, half]), f'output of query column {j}'
        assert torch.equal(lse.view(3, height, width)[:, :, j], lse_c.view(3, height, kernel)[:, :, half]), j
        assert torch.equal(grad_q[:, :, j], grad_q_c[:, :, half]), f'grad q of query column {j}'


@pytest.mark.parametrize(
    'length, kernel, tile',
    [(7, 7, 7), (13, 7, 7), (14, 7, 7), (23, 7, 7), (56, 7, 7), (20, 5, 8), (9, 3, 4), (30, 7, 30)],
)
def test_neighborhood_tiles_hold_every_window(length, kernel, tile):
    queries, keys, bias, slot = neighborhood_tiles(length, kernel, tile)
    size = min(tile, length)
    num_tiles = -(-length // size)
    assert queries.shape == (num_tiles, size) and keys.shape == (num_tiles, min(size + kernel - 1, length))
    assert bool((queries >= 0).all() and (queries < length).all() and (keys >= 0).all() and (keys < length).all())
    assert torch.equal(queries.reshape(-1)[slot], torch.arange(length))  # every query has its slot
    assert set(queries.reshape(-1).tolist()) == set(range(length))
    window_keys, window_bias = neighborhood_indices(length, kernel)
    for t in range(num_tiles):
        for i, query in enumerate(queries[t].tolist()):
            inside = bias[t, i] >= 0
            # The keys of the query's window, each once, with the reference's bias rows.
            assert keys[t][inside].tolist() == window_keys[query].tolist()
            assert bias[t, i][inside].tolist() == window_bias[query].tolist()


@pytest.mark.parametrize('version', ['v1', 'pp'])
@pytest.mark.parametrize('size', [(1, 1), (33, 47), (64, 96), (112, 137)])
def test_backbone_fast_equals_reference(version, size, device):
    torch.manual_seed(0)
    model = DAT(TINY[version], drop_path_rate=0.0, attn_impl='reference')
    x = torch.randn(2, 3, *size).to(device)
    model.to(device)
    weights = [torch.randn_like(o) for o in model(x)]

    def run(impl):
        set_attn_impl(model, impl)
        model.zero_grad()
        outs = model(x)
        sum((o * wgt).sum() for o, wgt in zip(outs, weights, strict=False)).backward()
        return outs, {n: p.grad.clone() for n, p in model.named_parameters()}

    outs_ref, grads_ref = run('reference')
    outs_fast, grads_fast = run('fast')
    for i, (a, e) in enumerate(zip(outs_fast, outs_ref, strict=False)):
        assert_rel_close(a, e, name=f'output {i}')
    # Gradients that are zero in exact math (proj_k biases: softmax ignores them; attention over a
    # single key on 1x1 maps) are round-off on both paths: they must stay tiny against the largest.
    # The others sum terms over whole maps and several blocks: their float32 round-off reached
    # 1.1e-5 of their largest value (torch 2.1 on an AVX-512 Xeon, the 112x137 map), hence 3e-5.
    largest = max(g.abs().max().item() for g in grads_ref.values())
    for name, grad in grads_ref.items():
        if grad.abs().max() <= 1e-6 * largest:
            assert grads_fast[name].abs().max() <= 1e-5 * largest, name
        else:
            assert_rel_close(grads_fast[name], grad, tol=3e-5, name=name)


@pytest.mark.skipif(not GOLDEN.is_dir(), reason='../shared (golden tensors) not present')
@pytest.mark.parametrize('impl', ['reference', 'fast'])
@pytest.mark.parametrize('name', ['dat_v1_small', 'dat_pp_small'])
def test_golden_parity_with_each_impl(name, impl, device):
    golden = torch.load(GOLDEN / f'{name}.pt', weights_only=True)
    converted, info = convert_original_state_dict(golden['state_dict'])
    model = DAT(info['arch'], out_indices=(3,), img_size=tuple(info['img_size']), attn_impl=impl).eval()
    model.load_state_dict({k[len('backbone.') :]: v for k, v in converted.items() if k.startswith('backbone.')})
    model.to(device)
    for case_name, case in golden['cases'].items():
        with torch.no_grad():
            pooled = model(case['input'].to(device))[0].mean((2, 3)).cpu()
        logits = pooled @ converted['head.fc.weight'].t() + converted['head.fc.bias']
        torch.testing.assert_close(logits, case['logits'], atol=1e-4, rtol=1e-4, msg=f'{case_name} logits ({impl})')


def _largest_saved(module, x):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return max(sizes)


def test_fast_paths_save_no_attention_matrix(device):
    torch.manual_seed(0)
    b, c, h, w = 2, 32, 28, 36
    x = torch.randn(b, c, h, w).to(device).requires_grad_()
    deform = DeformableAttention(c, 4, 2, key_stride=1, offset_kernel=3, table_size=(14, 14), version='pp').to(device)
    num_keys = h * w
    set_attn_impl(deform, 'reference')
    assert _largest_saved(deform, x) >= b * 4 * h * w * num_keys  # the attention matrix
    for impl in ('pytorch', 'fast'):
        set_attn_impl(deform, impl)
        assert _largest_saved(deform, x) <= b * c * h * w, impl  # nothing bigger than a feature map

    neigh = NeighborhoodAttention(c, 4, 7).to(device)
    set_attn_impl(neigh, 'reference')
    assert _largest_saved(neigh, x) >= b * h * w * 49 * c  # gathered windows (all heads)
    for impl in ('pytorch', 'fast'):
        set_attn_impl(neigh, impl)
        assert _largest_saved(neigh, x) <= b * c * h * w, impl  # q, k, v and the output, no logits


def _cpu_autocast_supports(dtype: torch.dtype) -> bool:
    """Whether this torch autocasts to ``dtype`` on CPU (torch 2.1 does to bfloat16 only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the warning of a torch that disables autocast instead
            with torch.autocast('cpu', dtype=dtype):
                return torch_compat.is_autocast_enabled('cpu')
    except RuntimeError:  # a torch that refuses the dtype
        return False


@pytest.mark.parametrize('amp_dtype', [torch.bfloat16, torch.float16], ids=['bfloat16', 'float16'])
def test_amp_keeps_positions_float32_and_agrees(amp_dtype, device):
    if device.type == 'cpu' and not _cpu_autocast_supports(amp_dtype):
        pytest.skip(f'torch {torch.__version__} has no CPU autocast to {amp_dtype}')
    if device.type == 'cuda' and amp_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip(f'{torch.cuda.get_device_name(device)} has no bfloat16')
    torch.manual_seed(0)
    model = DAT(TINY['pp'], drop_path_rate=0.0).to(device)
    x = torch.randn(2, 3, 64, 96).to(device)
    results = {}
    for impl in ('reference', 'fast'):
        set_attn_impl(model, impl)
        model.zero_grad()
        with torch.autocast(device.type, dtype=amp_dtype), record_sampling_points(model) as records:
            outs = model(x)
        sum(o.float().square().mean() for o in outs).backward()
        assert all(r['positions'].dtype == torch.float32 for r in records.values())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        results[impl] = [o.float() for o in outs]
    with torch.no_grad():
        full = model(x)
    for fast, ref, f32 in zip(results['fast'], results['reference'], full, strict=False):
        assert (fast - ref).norm() <= 0.03 * ref.norm()
        assert (fast - f32).norm() <= 0.03 * f32.norm()


def test_with_cp_matches_on_fast_path(device):
    torch.manual_seed(0)
    model = DAT(TINY['pp'], drop_path_rate=0.0).to(device)
    model_cp = DAT(TINY['pp'], drop_path_rate=0.0, with_cp=True).to(device)
    model_cp.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64).to(device)
    for m in (model, model_cp):
        sum(o.square().mean() for o in m(x)).backward()
    for (name, p), p_cp in zip(model.named_parameters(), model_cp.parameters(), strict=False):
        torch.testing.assert_close(p_cp.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


@needs_custom_ops
def test_compile_traces_fast_ops_without_graph_breaks(device):
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward through
    # the custom operators and their fake implementations without a C++ compiler. On CUDA the
    # query of the GPU's memory for the chunk size must not break the graph either.
    (q, k, v, pos, rpe), coords = _deformable_inputs(1, 8, 5, 6, 2, 1, 2, 2, (7, 7), 'pp', 0.9, device=device)
    qy, qx = coords[:, 0, 0], coords[0, :, 1]

    def both(q, k, v, pos, rpe):
        out = deformable_attention(q, k, v, pos, qy, qx, rpe, 1)
        heads_view = out.reshape(1, 2, 4, 5, 6).permute(0, 1, 3, 4, 2)
        return neighborhood_attention(heads_view, heads_view, heads_view, rpe[:, :5, :5], 3)

    compiled = torch.compile(both, backend='aot_eager', fullgraph=True)
    eager = both(q, k, v, pos, rpe)
    result = compiled(q, k, v, pos, rpe)
    assert_rel_close(result, eager, tol=1e-6)
    grads = torch.autograd.grad(result.square().sum(), (q, k, v, pos, rpe))
    grads_eager = torch.autograd.grad(eager.square().sum(), (q, k, v, pos, rpe))
    for a, e in zip(grads, grads_eager, strict=False):
        assert_rel_close(a, e, tol=1e-6)


@needs_custom_ops
@pytest.mark.parametrize('backend', ['pytorch', 'cpu-kernel', pytest.param('gpu-kernel', id='gpu_kernel')])
def test_custom_ops_pass_opcheck(backend, device, require_cpu_kernels, gpu_kernel):
    # Fake implementations must match the real ones to the strides (inductor checks them); the
    # backward operators are checked on their own, with real forward outputs.
    if backend == 'cpu-kernel':
        _fast_impl('cpu_kernels', require_cpu_kernels, device)
    if backend == 'gpu-kernel':
        gpu_kernel(device)
    g = torch.Generator().manual_seed(0)
    # q, k, v as the N block passes them: views of one (B, H, W, 3, heads, d) buffer.
    qkv = torch.randn(1, 8, 9, 3, 2, 4, generator=g).to(device).requires_grad_()
    q, k, v = qkv.unbind(3)
    rpb = torch.randn(2, 5, 5, generator=g).to(device).requires_grad_()
    n_args = (q, k, v, rpb, 3, 0.5, 1 << 22, backend)
    torch.library.opcheck(torch.ops.dat.neighborhood_attention.default, n_args)
    out, lse = torch.ops.dat.neighborhood_attention(*n_args)
    detached = [t.detach() for t in (q, k, v, rpb, out, lse)]
    torch.library.opcheck(
        torch.ops.dat.neighborhood_attention_backward.default,
        (torch.randn_like(out), *detached, *n_args[4:]),
    )
    (q, k, v, pos, rpe), coords = _deformable_inputs(2, 8, 5, 6, 2, 2, 2, 3, (7, 9), 'pp', 0.9, device=device)
    d_args = (
        q.reshape(4, 1, 4, 30),
        k.reshape(4, 1, 4, 6),
        v.reshape(4, 1, 4, 6),
        pos,
        coords[:, 0, 0],
        coords[0, :, 1],
        rpe,
        2,
        40,
        backend,
    )
    torch.library.opcheck(torch.ops.dat.deformable_attention.default, d_args)
    out, lse = torch.ops.dat.deformable_attention(*d_args)
    detached = [t.detach() for t in d_args[:7]]
    torch.library.opcheck(
        torch.ops.dat.deformable_attention_backward.default,
        (torch.randn_like(out), *detached, out.detach(), lse.detach(), 2, 40, backend),
    )


def test_chunk_budget_is_respected():
    chunks = deformable_ops._chunk_ranges(bg=3, heads_per_group=2, height=10, width=7, num_keys=5, budget=150)
    assert chunks[0] == (0, 1, 0, 2) and all(r1 - r0 <= 2 for _, _, r0, r1 in chunks)
    covered = {(b, r) for b0, b1, r0, r1 in chunks for b in range(b0, b1) for r in range(r0, r1)}
    assert covered == {(b, r) for b in range(3) for r in range(10)}
    assert deformable_ops._chunk_ranges(3, 2, 10, 7, 5, 10**6) == [(0, 3, 0, 10)]


def test_chunk_size_per_device(monkeypatch):
    """CPU keeps each operator's cache-sized chunk; CUDA takes a fixed large chunk, smaller where
    its buffers would take more than their share of a small GPU's memory, never smaller than on CPU.
    Computed from numbers: no CUDA call (the GPU's memory is given)."""
    gib, cpu = 1 << 30, deformable_ops.DEFORMABLE_CHUNK_ELEMENTS
    buffers = deformable_ops.DEFORMABLE_CHUNK_BUFFERS
    assert chunking.default_chunk_elements(torch.device('cpu'), torch.float32, cpu, buffers) == cpu
    assert chunking.cuda_chunk_elements(141 * gib, buffers, 4, cpu) == chunking.CUDA_CHUNK_ELEMENTS
    small = chunking.cuda_chunk_elements(16 * gib, buffers, 4, cpu)
    assert small == int(16 * gib * chunking.CUDA_MEMORY_FRACTION) // (buffers * 4)
    assert cpu < small < chunking.CUDA_CHUNK_ELEMENTS
    assert small * buffers * 4 <= 16 * gib * chunking.CUDA_MEMORY_FRACTION
    assert chunking.cuda_chunk_elements(gib // 4, buffers, 4, cpu) == cpu
    # On a torch.device('cuda') the GPU's memory is asked for (here given), and float64 halves the chunk.
    monkeypatch.setattr(chunking, '_cuda_total_memory', lambda device: 16 * gib)
    assert chunking.default_chunk_elements(torch.device('cuda', 0), torch.float32, cpu, buffers) == small
    assert chunking.default_chunk_elements(torch.device('cuda', 0), torch.float64, cpu, buffers) == small // 2


def test_switch_errors():
    with pytest.raises(
        ValueError,
        match=r"attn_impl must be one of \('auto', 'fast', 'reference', 'pytorch', "
        r"'cpu-kernel'\), got 'flash'",
    ):
        DAT(TINY['pp'], attn_impl='flash')
    with pytest.raises(RuntimeError, match=r"attn_impl='fast' is not available on device 'meta'"):
        select_backend('fast', torch.device('meta'), torch.float32)
    assert select_backend('auto', torch.device('meta'), torch.float32) == 'reference'
    with pytest.raises(ValueError, match=r'deformable_attention expects q \(B, C, H, W\).*got q \(1, 8, 3, 3\)'):
        deformable_attention(
            torch.randn(1, 8, 3, 3),
            torch.randn(1, 8, 4),
            torch.randn(1, 8, 4),
            torch.randn(1, 5, 2),
            torch.zeros(3),
            torch.zeros(3),
            torch.randn(2, 5, 5),
            1,
        )
    with pytest.raises(ValueError, match=r'H, W >= kernel_size.*kernel_size 7'):
        x = torch.randn(1, 1, 5, 9, 4)
        neighborhood_attention(x, x, x, torch.randn(1, 13, 13), 7)


@needs_custom_ops
def test_backbone_in_eval_mode_traces_as_one_graph(device, monkeypatch):
    # The wrappers of the custom operators decide in Python which path runs; dynamo must not
    # trace into the kernels' loader (it compiles and logs: a graph break at every block), also
    # when the kernels are not loaded yet, nor into the query of the GPU's memory on CUDA.
    monkeypatch.setattr(cpu_kernels, '_loaded', {})
    torch._dynamo.reset()
    model = DAT(TINY['pp']).eval().to(device)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(torch.randn(1, 3, 64, 64).to(device))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


# ------------------------------------------------------------- the operators check their inputs


def _deformable_kernel_args(rows=3, width=4, ns=5, table=(5, 6)):
    """Valid arguments of the C++ deformable attention for nb = 1, hg = 2, d = 3: q, k, v, the
    scale, then the bias inputs (padded table, iy, fy, ix, fx, x_taps)."""
    nb, hg, d = 1, 2, 3
    qkv = [torch.randn(nb, hg, d, rows * width), torch.randn(nb, hg, d, ns), torch.randn(nb, hg, d, ns), 0.5]
    padded = torch.randn(nb, hg, table[0] + 4, table[1] + 4)
    iy = torch.full((nb, rows, ns), 2, dtype=torch.int32)
    ix = torch.full((nb, width, ns), 2, dtype=torch.int32)
    x_taps = torch.tensor([2, 3], dtype=torch.int32).expand(nb, ns, 2).contiguous()
    bias = [padded, iy, torch.rand(nb, rows, ns), ix, torch.rand(nb, width, ns), x_taps]
    return qkv, bias


def _replaced(bias, index, value):
    return [value if i == index else t for i, t in enumerate(bias)]


@pytest.mark.parametrize(
    'case, match',
    [
        ('iy above the table', r'expected the y tap indices iy .* in \[0, 7\], got values from 2 to 8'),
        ('iy below the table', r'expected the y tap indices iy .* in \[0, 7\], got values from -1 to 2'),
        ('x_taps beyond the table', r'expected the x tap ranges x_taps .* in \[0, 9\], got values from 2 to 10'),
        (
            "ix outside its key's x_taps",
            r'expected the x tap indices ix\[0, 3, 4\] and ix \+ 1 inside '
            r'x_taps\[0, 4\] = \[2, 3\], got ix = 3',
        ),
        (
            'table of other heads',
            r"expected a table \(nb, hg, Th \+ 4, Tw \+ 4\) for q's \(nb, hg\) = \(1, 2\)",
        ),
        ('int64 indices', r'expected contiguous Int CPU tensors for the tap indices, got a contiguous Long tensor'),
        ('iy of other rows', r'expected q \(nb, hg, d, rows \* W\) with the rows of iy and the W of ix, rows \* W = 8'),
        ('keys of other heads', r'expected k and v \(1, 2, 3, Ns\) with the Ns of ix'),
        ('float64 q', r'expected q as a float32 CPU tensor dense in memory \(its axes in any order\), got a Double'),
        ('q with gaps', r'expected q as a float32 CPU tensor dense in memory .* strides \[144, 72, 24, 2\]'),
        ('non-contiguous k', r'expected contiguous Float CPU tensors for k, v, the tables'),
    ],
)
def test_deformable_kernel_rejects_inconsistent_inputs(case, match, require_cpu_kernels):
    require_cpu_kernels()
    kernels = cpu_kernels.load_kernels()
    qkv, bias = _deformable_kernel_args()
    out, lse = kernels.deformable_attention_forward(*qkv, *bias)  # valid as made
    iy, ix, x_taps = bias[1].clone(), bias[3].clone(), bias[5].clone()
    if case == 'iy above the table':
        iy[0, 1, 2] = 8  # rows 8 and 9 of a padded table of 9 rows
        bias = _replaced(bias, 1, iy)
    elif case == 'iy below the table':
        iy[0, 0, 0] = -1
        bias = _replaced(bias, 1, iy)
    elif case == 'x_taps beyond the table':
        x_taps[0, 1, 1] = 10
        bias = _replaced(bias, 5, x_taps)
    elif case == "ix outside its key's x_taps":
        ix[0, 3, 4] = 3  # reads columns 3 and 4, the key's row is computed at columns 2..3 only
        bias = _replaced(bias, 3, ix)
    elif case == 'table of other heads':
        bias = _replaced(bias, 0, torch.randn(1, 3, 9, 10))
    elif case == 'int64 indices':
        bias = _replaced(bias, 1, iy.long())
    elif case == 'iy of other rows':
        bias = _replaced(bias, 1, iy[:, :2].contiguous())
    elif case == 'keys of other heads':
        qkv = _replaced(qkv, 1, torch.randn(1, 1, 3, 5))
    elif case == 'float64 q':
        qkv = _replaced(qkv, 0, qkv[0].double())
    elif case == 'q with gaps':
        qkv = _replaced(qkv, 0, torch.randn(*qkv[0].shape[:3], 2 * qkv[0].shape[3])[..., ::2])
    elif case == 'non-contiguous k':
        qkv = _replaced(qkv, 1, qkv[1].transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(RuntimeError, match=match):
        kernels.deformable_attention_forward(*qkv, *bias)
    with pytest.raises(RuntimeError, match=match):
        kernels.deformable_attention_backward(torch.randn_like(qkv[0]), *qkv[:3], lse, 0.5, *bias)


def test_deformable_kernel_backward_checks_grad_out_and_lse(require_cpu_kernels):
    require_cpu_kernels()
    kernels = cpu_kernels.load_kernels()
    (q, k, v, scale), bias = _deformable_kernel_args()
    out, lse = kernels.deformable_attention_forward(q, k, v, scale, *bias)
    kernels.deformable_attention_backward(torch.randn_like(out), q, k, v, lse, scale, *bias)  # valid
    with pytest.raises(RuntimeError, match=r"expected grad_out of q's shape \[1, 2, 3, 12\], got \[1, 2, 3, 11\]"):
        kernels.deformable_attention_backward(torch.randn(1, 2, 3, 11), q, k, v, lse, scale, *bias)
    with pytest.raises(RuntimeError, match=r'expected lse \(1, 2, 12\), got \[1, 2, 11\]'):
        kernels.deformable_attention_backward(torch.randn_like(out), q, k, v, lse[..., :11].contiguous(), scale, *bias)


@pytest.mark.parametrize(
    'heads, kernel, shape, match',
    [
        (3, 3, (2, 5, 5, 2, 8), r'expected rpb \(heads, 2k - 1, 2k - 1\) = \(2, 5, 5\), got \[3, 5, 5\]'),
        (2, 3, (2, 5, 5, 16), r'expected q, k, v of one shape \(B, H, W, heads, d\), got \[2, 5, 5, 16\]'),
        (2, 4, (2, 5, 5, 2, 8), r'expected an odd kernel_size > 0 no larger than H and W, got 4'),
        (2, -1, (2, 5, 5, 2, 8), r'expected an odd kernel_size > 0 no larger than H and W, got -1'),
        (2, 7, (2, 5, 9, 2, 8), r'expected an odd kernel_size > 0 no larger than H and W, got 7'),
    ],
)
def test_neighborhood_kernel_rejects_inconsistent_inputs(heads, kernel, shape, match, require_cpu_kernels):
    require_cpu_kernels()
    kernels = cpu_kernels.load_kernels()
    q = torch.randn(shape)
    table = max(2 * kernel - 1, 0)
    rpb = torch.randn(heads, table, table)
    lse = torch.zeros(shape[0] * heads, shape[1] * shape[2])
    with pytest.raises(RuntimeError, match=match):
        kernels.neighborhood_attention_forward(q, q, q, rpb, kernel, 1.0)
    with pytest.raises(RuntimeError, match=match):
        kernels.neighborhood_attention_backward(q, q, q, q, rpb, q, lse, kernel, 1.0)


def test_neighborhood_kernel_checks_lse_and_layouts(require_cpu_kernels):
    require_cpu_kernels()
    kernels = cpu_kernels.load_kernels()
    q, rpb = torch.randn(2, 5, 6, 2, 8), torch.randn(2, 5, 5)
    with pytest.raises(RuntimeError, match=r'expected lse \(B \* heads, H \* W\) = \(4, 30\), got \[4, 29\]'):
        kernels.neighborhood_attention_backward(q, q, q, q, rpb, q, torch.zeros(4, 29), 3, 1.0)
    # The kernels read q, k, v with any strides but contiguous channels and rows W pixels apart.
    for bad, strides in [
        (q.transpose(3, 4).contiguous().transpose(3, 4), r'\[480, 96, 16, 1, 2\]'),
        (torch.randn(2, 5, 7, 2, 8)[:, :, :6], r'\[560, 112, 16, 8, 1\]'),
    ]:
        with pytest.raises(
            RuntimeError, match=r'expected k \(B, H, W, heads, d\) with contiguous channels.*' + strides
        ):
            kernels.neighborhood_attention_forward(q, bad, q, rpb, 3, 1.0)


def test_operators_told_to_use_gpu_kernels_that_are_off_say_so(monkeypatch):
    monkeypatch.setattr(gpu_kernels, 'interpreting', lambda: True)  # CPU tensors pass as on the device
    monkeypatch.delenv(gpu_kernels.ENV_SWITCH, raising=False)
    off = r'was told to use its GPU kernels, which are not turned on \(DAT_GPU_KERNELS=1\)'
    x = torch.randn(1, 5, 6, 1, 4)
    with pytest.raises(RuntimeError, match=rf'dat::neighborhood_attention {off}.* neighborhood_attention\(\) picks'):
        neighborhood_ops._neighborhood_attention_op(x, x, x, torch.randn(1, 5, 5), 3, 1.0, 1 << 20, 'gpu-kernel')
    (q, k, v, pos, rpe), coords = _deformable_inputs(1, 4, 5, 6, 1, 1, 2, 3, (7, 9), 'pp', 0.9)
    args = (
        q.detach().reshape(1, 1, 4, 30),
        k.detach().reshape(1, 1, 4, 6),
        v.detach().reshape(1, 1, 4, 6),
        pos.detach(),
    )
    with pytest.raises(RuntimeError, match=rf'dat::deformable_attention {off}.* deformable_attention\(\) picks'):
        deformable_ops._deformable_attention_op(
            *args, coords[:, 0, 0], coords[0, :, 1], rpe.detach(), 1, 40, 'gpu-kernel'
        )


def test_operators_called_directly_check_their_inputs():
    (q, k, v, pos, rpe), coords = _deformable_inputs(2, 8, 5, 6, 2, 2, 2, 3, (7, 9), 'pp', 0.9)
    q, k, v = q.detach().reshape(4, 1, 4, 30), k.detach().reshape(4, 1, 4, 6), v.detach().reshape(4, 1, 4, 6)
    pos, rpe, qy, qx = pos.detach(), rpe.detach(), coords[:, 0, 0], coords[0, :, 1]
    deformable_ops._deformable_attention_op(q, k, v, pos, qy, qx, rpe, 2, 40, 'pytorch')  # valid
    for bad, given in [
        ((q, k, v, pos, qy, qx, rpe, 0, 40), 'groups 0'),
        ((q, k, v, pos, qy, qx, rpe, 3, 40), 'groups 3'),
        ((q, k, v, pos, qy, qx, rpe[:1], 2, 40), r'table \(1, 7, 9\)'),
        ((q, k, v, pos[:, :5], qy, qx, rpe, 2, 40), r'pos \(4, 5, 2\)'),
        ((q, k, v, pos, qy[:4], qx, rpe, 2, 40), r'query_y \(4,\)'),
        ((q, k, v, pos, qy, qx, rpe, 2, 0), 'chunk 0'),
    ]:
        with pytest.raises(ValueError, match=r'dat::deformable_attention expects .*' + given):
            deformable_ops._deformable_attention_op(*bad, 'pytorch')
    # The C++ kernels compute float32 on CPU only: an operator told to use them refuses the rest.
    with pytest.raises(ValueError, match=r'runs the C\+\+ CPU kernels on a float32 CPU table only; got torch.float64'):
        deformable_ops._deformable_attention_op(*(t.double() for t in (q, k, v, pos, qy, qx, rpe)), 2, 40, 'cpu-kernel')
    # So do the GPU kernels, off CUDA (outside Triton's interpreter); an unknown backend is refused.
    with pytest.raises(ValueError, match=r'runs its GPU kernels on CUDA tensors.*got torch.float32 queries on cpu'):
        deformable_ops._deformable_attention_op(q, k, v, pos, qy, qx, rpe, 2, 40, 'gpu-kernel')
    backends = r"\('pytorch', 'cpu-kernel', 'gpu-kernel'\)"
    with pytest.raises(ValueError, match=rf"backend must be one of {backends}, got 'cuda'"):
        deformable_ops._deformable_attention_op(q, k, v, pos, qy, qx, rpe, 2, 40, 'cuda')
    x = torch.randn(2, 5, 6, 2, 8)
    neighborhood_ops._neighborhood_attention_op(x, x, x, torch.randn(2, 5, 5), 3, 1.0, 1 << 20, 'pytorch')  # valid
    with pytest.raises(ValueError, match=r'runs its GPU kernels on float32 CUDA tensors; got torch.float32 on cpu'):
        neighborhood_ops._neighborhood_attention_op(x, x, x, torch.randn(2, 5, 5), 3, 1.0, 1 << 20, 'gpu-kernel')
    with pytest.raises(ValueError, match=rf"backend must be one of {backends}, got 'cuda'"):
        neighborhood_ops._neighborhood_attention_op(x, x, x, torch.randn(2, 5, 5), 3, 1.0, 1 << 20, 'cuda')
    with pytest.raises(ValueError, match=r'runs the C\+\+ CPU kernels on float32 CPU inputs only; got torch.float64'):
        x64, rpb64 = x.double(), torch.randn(2, 5, 5).double()
        neighborhood_ops._neighborhood_attention_op(x64, x64, x64, rpb64, 3, 1.0, 1 << 20, 'cpu-kernel')
    for bad_x, rpb, kernel, given in [
        (x, torch.randn(0, 5, 5), 3, r'rpb \(0, 5, 5\)'),
        (x, torch.randn(3, 5, 5), 3, 'rpb'),
        (x, torch.randn(2, 3, 3), 2, 'kernel_size 2'),
        (x, torch.randn(2, 13, 13), 7, 'kernel_size 7'),
        (x.flatten(3), torch.randn(2, 5, 5), 3, r'q \(2, 5, 6, 16\)'),
    ]:
        with pytest.raises(ValueError, match=r'dat::neighborhood_attention expects .*' + given):
            neighborhood_ops._neighborhood_attention_op(bad_x, bad_x, bad_x, rpb, kernel, 1.0, 1 << 20, 'pytorch')


@pytest.mark.parametrize('bias_impl', ['cpu_kernels', 'gpu_kernel', 'pytorch'])
def test_nan_key_position_gives_nan_where_it_is_read_and_nothing_else(
    bias_impl, device, require_cpu_kernels, gpu_kernel
):
    """A NaN position never becomes a table index (the kernels would read outside the table): it
    makes the outputs of its image NaN, and leaves the other image's output and gradient as they
    were."""
    impl = _fast_impl(bias_impl, require_cpu_kernels, device, gpu_kernel)
    (q, k, v, pos, rpe), coords = _deformable_inputs(2, 8, 5, 6, 2, 1, 2, 3, (7, 9), 'pp', 0.9, device=device)
    qy, qx = coords[:, 0, 0], coords[0, :, 1]
    clean = deformable_attention(q, k, v, pos, qy, qx, rpe, 1, impl, chunk_elements=40)
    (grad_q_clean,) = torch.autograd.grad(clean[0].sum(), q)
    nan_pos = pos.detach().clone()
    nan_pos[1, 2] = float('nan')
    nan_pos[1, 4, 1] = float('nan')
    nan_pos.requires_grad_()
    out = deformable_attention(q, k, v, nan_pos, qy, qx, rpe, 1, impl, chunk_elements=40)
    assert torch.isnan(out[1]).all()
    assert torch.equal(out[0], clean[0])
    (grad_q,) = torch.autograd.grad(out[0].sum(), q)
    assert torch.equal(grad_q[0], grad_q_clean[0])  # the NaN image's gradient is 0 * NaN


@pytest.mark.parametrize('impl', ['cpu_kernels', 'gpu_kernel', 'pytorch'])
def test_nan_in_neighborhood_inputs_stays_where_the_reference_has_it(impl, device, require_cpu_kernels, gpu_kernel):
    """NaN inputs give NaN outputs (the tiled path also at the queries of the NaN key's tile, whose
    masked logits are NaN), and never an error or a read outside the inputs."""
    attn_impl = _fast_impl(impl, require_cpu_kernels, device, gpu_kernel)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, 4, generator=g) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=g).to(device)
    q[0, 0, 1, 1, 0] = float('nan')
    k[0, 1, 6, 5, 2] = float('nan')
    q, k, v = q.to(device), k.to(device), v.to(device)
    ref = neighborhood_attention_reference(q, k, v, rpb, 3)
    out = neighborhood_attention(q, k, v, rpb, 3, attn_impl)
    assert torch.isnan(ref).any() and torch.isnan(out[torch.isnan(ref)]).all()  # no NaN is hidden
    if impl != 'pytorch':  # exactly the k x k windows: NaN nowhere else
        assert torch.equal(torch.isnan(out), torch.isnan(ref))
        assert_rel_close(out[~torch.isnan(ref)], ref[~torch.isnan(ref)])


@pytest.mark.parametrize('table', [(3, 3), (9, 31)])  # the bias added in windows / pair by pair
@pytest.mark.parametrize('impl', ['cpu_kernels', 'pytorch'])
def test_nan_in_deformable_queries_and_keys_stays_where_the_reference_has_it(impl, table, require_cpu_kernels):
    """A NaN query channel makes that query's output NaN in its head, a NaN key channel the
    outputs of every query of its head (their softmax reads the key), as in the reference: the
    softmax's maximum passes over a NaN logit and its sum turns NaN through it."""
    attn_impl = _fast_impl(impl, require_cpu_kernels)
    (q, k, v, pos, rpe), coords = _deformable_inputs(1, 8, 5, 16, 2, 1, 3, 4, table, 'pp', 0.9)
    q, k = q.detach().clone(), k.detach().clone()
    q[0, 1, 2, 9] = float('nan')  # head 0 (channels 0-3), query (2, 9)
    k[0, 6, 7] = float('nan')  # head 1 (channels 4-7), key 7
    ref = deformable_attention_reference(q, k, v, pos, coords.reshape(-1, 2), rpe, 1)
    out = deformable_attention(q, k, v, pos, coords[:, 0, 0], coords[0, :, 1], rpe, 1, attn_impl)
    nan = torch.isnan(ref)
    assert nan[0, :4, 2, 9].all() and nan[0, 4:].all() and nan.sum() == 4 + 4 * 5 * 16
    assert torch.equal(torch.isnan(out), nan)
    assert_rel_close(out[~nan], ref[~nan])


def test_plain_op_fallback_differentiates_like_the_custom_operator():
    """The fallback of torches without custom operators (PlainOp) runs the same forward, setup and
    backward functions through an autograd function, and refuses to differentiate without them."""

    def function(x: torch.Tensor, scale: float) -> torch.Tensor:
        return x.sin() * scale

    op = torch_compat.PlainOp('dat_test::sin_scaled', function)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match='dat_test::sin_scaled has no autograd formula'):
        op(x, 2.0)
    out = op(x.detach(), 2.0)
    assert not out.requires_grad and torch.equal(out, function(x.detach(), 2.0))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.scale = inputs[1]

    op.register_autograd(lambda ctx, grad: (grad * ctx.saved_tensors[0].cos() * ctx.scale, None), setup_context)
    assert torch.autograd.gradcheck(lambda t: op(t, 2.0), (x,))


def test_is_autocast_enabled_per_device_type():
    assert not torch_compat.is_autocast_enabled('cpu')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch_compat.is_autocast_enabled('cpu') and not torch_compat.is_autocast_enabled('cuda')


# ------------------------------------------------------------ which implementation runs, and the switch

# select_backend's table: (impl, where) -> backend, or the error it raises. 'cuda' is decided from
# the device alone (no GPU needed); 'cuda_gpu_kernel' is an operator with a GPU kernel, Triton
# taken as importable; 'cuda_deterministic' the same under torch.use_deterministic_algorithms(True).
_BACKEND_TABLE = {
    'reference': dict(
        kernels='reference',
        float64='reference',
        kernels_off='reference',
        cuda='reference',
        cuda_gpu_kernel='reference',
        cuda_deterministic='reference',
        meta='reference',
        onnx='reference',
    ),
    'auto': dict(
        kernels='cpu-kernel',
        float64='pytorch',
        kernels_off='pytorch',
        cuda='pytorch',
        cuda_gpu_kernel='gpu-kernel',
        cuda_deterministic='pytorch',
        meta='reference',
        onnx='reference',
    ),
    'fast': dict(
        kernels='cpu-kernel',
        float64='pytorch',
        kernels_off='pytorch',
        cuda='pytorch',
        cuda_gpu_kernel='gpu-kernel',
        cuda_deterministic='pytorch',
        meta=RuntimeError,
        onnx=RuntimeError,
    ),
    'pytorch': dict(
        kernels='pytorch',
        float64='pytorch',
        kernels_off='pytorch',
        cuda='pytorch',
        cuda_gpu_kernel='pytorch',
        cuda_deterministic='pytorch',
        meta=RuntimeError,
        onnx=RuntimeError,
    ),
    'cpu-kernel': dict(
        kernels='cpu-kernel',
        float64=RuntimeError,
        kernels_off=RuntimeError,
        cuda=RuntimeError,
        cuda_gpu_kernel=RuntimeError,
        cuda_deterministic=RuntimeError,
        meta=RuntimeError,
        onnx=RuntimeError,
    ),
}


@pytest.mark.parametrize(
    'where', ['kernels', 'float64', 'kernels_off', 'cuda', 'cuda_gpu_kernel', 'cuda_deterministic', 'meta', 'onnx']
)
@pytest.mark.parametrize('impl', ATTN_IMPLS)
def test_select_backend_follows_its_table(impl, where, monkeypatch, require_cpu_kernels):
    if where == 'kernels':
        require_cpu_kernels()
    gpu_kernel = where in ('cuda_gpu_kernel', 'cuda_deterministic')
    if gpu_kernel:
        monkeypatch.setattr(dispatch, 'gpu_kernels_available', lambda: True)
    if where == 'cuda_deterministic':
        monkeypatch.setattr(torch, 'are_deterministic_algorithms_enabled', lambda: True)
    device = torch.device('cuda' if gpu_kernel else where if where in ('cuda', 'meta') else 'cpu')
    dtype = torch.float64 if where == 'float64' else None
    if where == 'kernels_off':
        monkeypatch.setenv(cpu_kernels.ENV_SWITCH, '0')
    if where == 'onnx':
        monkeypatch.setattr(torch.onnx, 'is_in_onnx_export', lambda: True)
    expected = _BACKEND_TABLE[impl][where]
    if expected is RuntimeError:
        with pytest.raises(RuntimeError, match=rf"attn_impl='{impl}' (is not available|cannot run the C\+\+)"):
            select_backend(impl, device, dtype or torch.float32, gpu_kernel)
    else:
        assert select_backend(impl, device, dtype or torch.float32, gpu_kernel) == expected


@pytest.mark.parametrize('impl', ['pytorch', 'cpu-kernel', 'reference'])
def test_each_backend_of_a_block_computes_the_same(impl, device, require_cpu_kernels):
    """Every implementation of the N and D blocks and the ConvFFN gives the reference's numbers."""
    if impl == 'cpu-kernel':
        _fast_impl('cpu_kernels', require_cpu_kernels, device)
    torch.manual_seed(0)
    x = torch.randn(2, 16, 11, 13).to(device)
    blocks = [
        NeighborhoodAttention(16, 2, 5),
        ConvFFN(16),
        DeformableAttention(16, 2, 2, key_stride=2, offset_kernel=3, table_size=(11, 13), version='pp'),
    ]
    for block in blocks:
        block.to(device)
        set_attn_impl(block, 'reference')
        with torch.no_grad():
            expected = block(x)
        set_attn_impl(block, impl)
        with torch.no_grad():
            assert_rel_close(block(x), expected, name=type(block).__name__)


def test_set_attn_impl_switches_and_restores_every_dat_module():
    model = torch.nn.Sequential(DAT(TINY['pp']), torch.nn.Linear(2, 2))
    switched = {
        name
        for name, m in model.named_modules()
        if isinstance(m, (DAT, ConvFFN, DeformableAttention, NeighborhoodAttention))
    }
    previous = set_attn_impl(model, 'reference')
    assert set(previous) == switched and set(previous.values()) == {'auto'}
    assert model[0].attn_impl == 'reference' and model[0].stages[0].blocks[0].attn.impl == 'reference'
    set_attn_impl(model, {'0.stages.0.blocks.0.attn': 'pytorch'})
    assert set(set_attn_impl(model, previous).values()) == {'reference', 'pytorch'}
    assert set(set_attn_impl(model, 'auto').values()) == {'auto'}
    assert set_attn_impl(torch.nn.Linear(2, 2), 'fast') == {}
    with pytest.raises(ValueError, match=r"attn_impl must be one of .*got 'flash'"):
        set_attn_impl(model, 'flash')
    with pytest.raises(ValueError, match=r"\['1'\] are not DAT modules of this model"):
        set_attn_impl(model, {'1': 'fast'})


def test_neighborhood_plan_built_once_per_size():
    """The PyTorch backend builds a map size's tiling once and reuses it, forward and backward,
    also for a training step after a call under inference mode."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 11, 4, generator=g) for _ in range(3))
    rpb = torch.randn(2, 13, 13, generator=g)
    neighborhood_ops._plan.cache_clear()
    with torch.inference_mode():
        expected = neighborhood_attention(q, k, v, rpb, 7, 'pytorch')
    q, rpb = q.detach().requires_grad_(), rpb.detach().requires_grad_()
    out = neighborhood_attention(q, k, v, rpb, 7, 'pytorch')
    out.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert q.grad.abs().sum() > 0 and rpb.grad.abs().sum() > 0
    info = neighborhood_ops._plan.cache_info()
    assert (info.misses, info.hits) == (1, 2)
