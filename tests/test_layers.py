"""The layers of DAT's blocks against plain PyTorch: the fused ConvFFN hidden layer
(ops/convffn.py: the C++ CPU kernel and oneDNN's conv with PyTorch's GELU, both where a test takes
``hidden_method``) against its composition, PointwiseConv2d, GELU2d, DropPathResidual
(models/layers.py) and the folded depth-wise residual, the offset network's strided depth-wise
conv (ops/depthwise_conv.py) against F.conv2d, and the offset network of the deformable blocks
against the original's sequence of layers on each group's view of the queries.

The tests that take ``device`` (``tests/conftest.py``) also run on CUDA where a GPU is visible; there
the ConvFFN hidden layer is the composition (the C++ kernel is CPU-only), the other layers are the
same code. Inputs are made on CPU and moved.
"""

import functools

import pytest
import torch

from projects.dat.models.dat import ConvFFN, OffsetNetwork
from projects.dat.models.layers import DropPathResidual, GELU2d, PointwiseConv2d
from projects.dat.ops import convffn as convffn_ops
from projects.dat.ops import (
    cpu_kernels,
    depthwise_conv_gelu,
    depthwise_conv_gelu_linear,
    depthwise_conv_gelu_reference,
    depthwise_conv_plus_identity,
    sample_keys,
    sample_keys_reference,
    strided_depthwise_conv,
    torch_compat,
)
from projects.dat.ops import depthwise_conv as depthwise_conv_ops
from projects.dat.ops import key_sampling as key_sampling_ops


def _conv(channels, kernel, dtype=torch.float32, device='cpu'):
    conv = torch.nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels).to(device, dtype)
    with torch.no_grad():  # taps of the size of the identity that is folded in
        conv.weight.normal_(0.0, 0.5)
        conv.bias.normal_(0.0, 0.5)
    return conv


@pytest.fixture(params=['fused-kernel', 'onednn'])
def hidden_method(request, monkeypatch):
    """Runs the test with each method of the fused hidden layer, whatever the kernels' build."""
    monkeypatch.setattr(convffn_ops, 'runs_fused_kernel', lambda: request.param == 'fused-kernel')
    return request.param


def _value_and_grads(fn, y, conv, grad):
    y = y.detach().clone().requires_grad_()
    out = fn(y, conv)
    return (out, *torch.autograd.grad(out, (y, conv.weight, conv.bias), grad))


@pytest.mark.parametrize(
    'batch, channels, height, width, kernel',
    [
        (2, 12, 9, 7, 3),
        (1, 5, 4, 6, 5),  # channels not a multiple of the vector width, a 5x5 kernel
        (2, 16, 1, 3, 3),  # a one-row map: every tap but the middle row is padding
        (3, 64, 14, 14, 3),
        (1, 40, 6, 37, 3),  # rows of several column blocks, channels of two cache lines and a half
        # The kernel reads copies of the rows with padded columns (C a multiple of 512):
        (1, 512, 5, 19, 3),
        (2, 1024, 3, 4, 5),  # two images: the copies' ring must not mix their rows
    ],
)
@pytest.mark.parametrize('memory_format', [torch.channels_last, torch.contiguous_format])
def test_fused_hidden_layer_matches_float64_reference(
    batch, channels, height, width, kernel, memory_format, device, require_cpu_kernels, hidden_method
):
    if device.type == 'cpu':
        require_cpu_kernels()
    torch.manual_seed(0)
    conv64 = _conv(channels, kernel, torch.float64, device)
    conv32 = _conv(channels, kernel, device=device)
    conv32.load_state_dict(conv64.state_dict())
    y = (torch.randn(batch, channels, height, width, dtype=torch.float64) * 2).to(device, memory_format=memory_format)
    grad = torch.randn(batch, channels, height, width, dtype=torch.float64).to(device)
    expected = _value_and_grads(depthwise_conv_gelu_reference, y, conv64, grad)
    actual = _value_and_grads(depthwise_conv_gelu, y.float(), conv32, grad.float())
    if device.type == 'cpu':  # the kernel's output; elsewhere the composition keeps the input's layout
        assert actual[0].is_contiguous(memory_format=torch.channels_last)
    for name, a, e in zip(('out', 'grad_y', 'grad_weight', 'grad_bias'), actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == torch.float32, name
        scale = e.abs().max().item()
        error = (a.double() - e).abs().max().item()
        assert error <= 1e-6 * max(scale, 1.0), f'{name}: max error {error:.3g} at scale {scale:.3g}'


def test_fused_hidden_layer_equals_float32_pytorch_composition(require_cpu_kernels, hidden_method):
    require_cpu_kernels()
    torch.manual_seed(1)
    conv = _conv(32, 3)
    y = torch.randn(2, 32, 10, 11).to(memory_format=torch.channels_last)
    grad = torch.randn(2, 32, 10, 11)
    for a, e in zip(
        _value_and_grads(depthwise_conv_gelu, y, conv, grad),
        _value_and_grads(depthwise_conv_gelu_reference, y, conv, grad),
        strict=True,
    ):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('channels', [8, 512])  # 512: from copies of the rows
@pytest.mark.parametrize('threads', [1, 3])
def test_fused_hidden_layer_gradients_do_not_depend_on_the_thread_count(
    threads, channels, require_cpu_kernels, monkeypatch
):
    """Each thread of the C++ kernel recomputes the grad_z rows it shares with its neighbours;
    every row's bias and weight terms must still be counted once."""
    require_cpu_kernels()
    monkeypatch.setattr(convffn_ops, 'runs_fused_kernel', lambda: True)
    torch.manual_seed(5)
    conv = _conv(channels, 3)
    y = torch.randn(2, channels, 7, 5).to(memory_format=torch.channels_last)  # 14 rows: odd chunks
    grad = torch.randn(2, channels, 7, 5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        actual = _value_and_grads(depthwise_conv_gelu, y, conv, grad)
        torch.set_num_threads(2)
        expected = _value_and_grads(depthwise_conv_gelu, y, conv, grad)
    finally:
        torch.set_num_threads(before)
    # Sums of per-thread sums, in another order per thread count; a row counted twice or not at
    # all would be off by about one.
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(('build', 'fused'), [('avx512', True), ('avx2', True), ('baseline', False)])
def test_fused_hidden_layer_method_follows_the_build(build, fused, monkeypatch):
    monkeypatch.setattr(cpu_kernels, 'simd_flags', lambda: (build, []))
    assert convffn_ops.runs_fused_kernel() is fused


def test_fused_hidden_layer_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    torch.manual_seed(2)
    conv = _conv(8, 3, torch.float64)
    y = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    assert torch.equal(depthwise_conv_gelu(y, conv), depthwise_conv_gelu_reference(y, conv))  # float64
    with pytest.raises(RuntimeError, match=r"attn_impl='cpu-kernel' cannot run .* got torch.float64 on 'cpu'"):
        depthwise_conv_gelu(y, conv, 'cpu-kernel')
    conv, y = conv.float(), y.float()
    assert torch.equal(depthwise_conv_gelu(y, conv, 'pytorch'), depthwise_conv_gelu_reference(y, conv))
    with torch.autocast('cpu', dtype=torch.bfloat16):  # the composition's conv computes in bfloat16
        assert torch.equal(depthwise_conv_gelu(y, conv), depthwise_conv_gelu_reference(y, conv))
    monkeypatch.setattr(cpu_kernels, 'load_kernels', lambda: None)
    assert torch.equal(depthwise_conv_gelu(y, conv), depthwise_conv_gelu_reference(y, conv))


def test_fused_hidden_layer_of_a_conv_without_bias(require_cpu_kernels, hidden_method):
    require_cpu_kernels()
    torch.manual_seed(8)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    y = torch.randn(2, 8, 6, 5).to(memory_format=torch.channels_last).requires_grad_()
    fused = depthwise_conv_gelu(y, conv, 'cpu-kernel')
    plain = depthwise_conv_gelu_reference(y, conv)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for a, e in zip(
        torch.autograd.grad(fused.sum(), (y, conv.weight)),
        torch.autograd.grad(plain.sum(), (y, conv.weight)),
        strict=True,
    ):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_fused_hidden_layer_rejects_a_conv_it_does_not_compute(require_cpu_kernels):
    require_cpu_kernels()
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=4)
    with pytest.raises(ValueError, match=r'expected a depth-wise conv weight \(8, 1, k, k\).*got \(8, 2, 3, 3\)'):
        depthwise_conv_gelu(torch.randn(1, 8, 5, 5), conv)
    strided = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
    with pytest.raises(ValueError, match=r"expected a 'same' conv .*'stride': \(2, 2\)"):
        depthwise_conv_gelu(torch.randn(1, 8, 5, 5), strided)


@pytest.mark.parametrize('recompute_hidden', [False, True])
def test_conv_ffn_fused_and_reference_agree(recompute_hidden, device, require_cpu_kernels, hidden_method):
    if device.type == 'cpu':
        require_cpu_kernels()
    torch.manual_seed(3)
    fused = ConvFFN(16, recompute_hidden=recompute_hidden).to(device)
    reference = ConvFFN(16, recompute_hidden=recompute_hidden, impl='reference').to(device)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 16, 7, 9).to(device, memory_format=torch.channels_last)
    outs, grads = [], []
    for ffn in (fused, reference):
        xi = x.clone().requires_grad_()
        out = ffn(xi)
        out.square().sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in ffn.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, e in zip(*grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('fc_bias', [True, False])
def test_hidden_layer_and_linear_operator_equals_the_checkpointed_composition(
    fc_bias, require_cpu_kernels, hidden_method
):
    """dat::depthwise_conv_gelu_linear gives fc(GELU(y + conv(y))) and its gradients as the
    composition does, and keeps only y of the hidden maps for the backward pass."""
    require_cpu_kernels()
    torch.manual_seed(7)
    conv = _conv(12, 3)
    fc = PointwiseConv2d(12, 5, bias=fc_bias)
    y = torch.randn(2, 12, 9, 7).to(memory_format=torch.channels_last)
    grad = torch.randn(2, 5, 9, 7)
    params = [conv.weight, conv.bias, *fc.parameters()]

    def value_and_grads(fn):
        yi = y.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            out = fn(yi)
        return saved, (out, *torch.autograd.grad(out, [yi, *params], grad))

    saved, fused = value_and_grads(lambda t: depthwise_conv_gelu_linear(t, conv, fc))
    _, composed = value_and_grads(lambda t: fc(depthwise_conv_gelu(t, conv)))
    for a, e in zip(fused, composed, strict=True):  # fc's weight gradient is summed in another order
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert saved.count(y.shape) == 1  # y; the composition also keeps the hidden layer's output


@pytest.mark.parametrize('channels', [20, 512])  # 512: from copies of the rows
@pytest.mark.parametrize('threads', [1, 2, 3])
def test_fused_hidden_layer_backward_writes_the_forward_output(threads, channels, require_cpu_kernels):
    """The kernel's backward pass, asked for it, gives the forward pass's output to the bit: every
    row written (into an uninitialised tensor), also where threads split the rows mid-image."""
    require_cpu_kernels()
    kernels = cpu_kernels.load_kernels()
    torch.manual_seed(8)
    y, grad = torch.randn(2, 1, 13, 11, channels).unbind(0)
    taps, bias = torch.randn(9, channels), torch.randn(channels)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = kernels.depthwise_conv_gelu_forward(y, taps, bias)
        with_output = kernels.depthwise_conv_gelu_backward(grad, y, taps, bias, True)
        without = kernels.depthwise_conv_gelu_backward(grad, y, taps, bias, False)
    finally:
        torch.set_num_threads(before)
    assert len(with_output) == 4 and len(without) == 3
    assert torch.equal(with_output[3], out)
    for a, e in zip(with_output[:3], without, strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize('memory_format', [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize('bias', [True, False])
def test_pointwise_conv_equals_the_conv(memory_format, bias, device):
    torch.manual_seed(4)
    pointwise = PointwiseConv2d(6, 5, bias=bias).to(device)
    conv = torch.nn.Conv2d(6, 5, 1, bias=bias).to(device)
    conv.load_state_dict(pointwise.state_dict())  # same parameter names and shapes
    x = torch.randn(2, 6, 4, 7).to(device, memory_format=memory_format)
    grad = torch.randn(2, 5, 4, 7).to(device)
    results = []
    for module in (pointwise, conv):
        xi = x.clone().requires_grad_()
        out = module(xi)
        results.append((out, *torch.autograd.grad(out, (xi, *module.parameters()), grad)))
    assert results[0][0].is_contiguous(memory_format=memory_format)
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('memory_format', [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize(
    'batch, channels, groups, kernel, stride, height, width',
    [(1, 8, 1, 9, 8, 33, 41), (2, 12, 3, 5, 2, 14, 9), (3, 16, 4, 3, 1, 5, 7), (1, 4, 2, 7, 4, 3, 2)],
)
def test_offset_network_equals_its_layers_on_each_group(
    memory_format, batch, channels, groups, kernel, stride, height, width, device
):
    """All groups in one depth-wise conv give the offsets (and gradients) that the layers in sequence
    give on the ``(B * groups, C / groups, H, W)`` view of the queries, as the original computes them."""
    torch.manual_seed(5)
    network = OffsetNetwork(channels // groups, kernel, stride).to(device)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0.0, 0.5)
    q = torch.randn(batch, channels, height, width).to(device, memory_format=memory_format)
    results = []
    for run in (
        lambda x: network(x, groups),
        lambda x: torch.nn.Sequential.forward(network, x.reshape(-1, channels // groups, height, width)).permute(
            0, 2, 3, 1
        ),
    ):
        x = q.clone().requires_grad_()
        out = run(x)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(device)
        results.append((out, *torch.autograd.grad(out, (x, *network.parameters()), grad)))
    assert results[0][0].shape == (batch * groups, -(-height // stride), -(-width // stride), 2)
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('memory_format', [torch.channels_last, torch.contiguous_format])
def test_gelu2d_equals_gelu_and_keeps_the_memory_format(memory_format, device):
    torch.manual_seed(7)
    x = torch.randn(2, 6, 5, 4).to(device, memory_format=memory_format).requires_grad_()
    out = GELU2d()(x)
    expected = torch.nn.GELU()(x)
    # PyTorch's vectorised GELU (contiguous NHWC) and its strided loop (channels-last NCHW) differ
    # by a few float32 ulps: up to 1.1e-6 beyond rtol over 2000 random inputs, 2.1e-7 backward.
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=2e-6)
    assert out.is_contiguous(memory_format=memory_format)
    grad = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0], rtol=1e-6, atol=2e-6
    )


@pytest.mark.parametrize('kernel', [3, 5])
def test_depthwise_conv_plus_identity_is_the_residual_sum(kernel, device):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 6, kernel, padding=kernel // 2, groups=6).to(device)
    x = torch.randn(2, 6, 9, 7).to(device).requires_grad_()
    weight_before = conv.weight.detach().clone()
    folded = depthwise_conv_plus_identity(x, conv)
    grads = torch.autograd.grad(folded.square().sum(), (x, conv.weight, conv.bias))
    plain = x + conv(x)
    plain_grads = torch.autograd.grad(plain.square().sum(), (x, conv.weight, conv.bias))
    torch.testing.assert_close(folded, plain, rtol=1e-6, atol=1e-6)
    for a, e in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert torch.equal(conv.weight, weight_before)  # the identity is added to a copy


@pytest.mark.skipif(
    not torch_compat.HAS_CUSTOM_OPS,
    reason=(
        f'torch {torch.__version__} has no torch.library.custom_op (torch 2.4): the fused layer runs as a plain '
        'autograd function, which torch.compile and opcheck do not treat as an operator'
    ),
)
def test_fused_hidden_layer_passes_opcheck_and_compiles_without_graph_breaks(require_cpu_kernels, hidden_method):
    require_cpu_kernels()
    torch.manual_seed(6)
    conv = _conv(8, 3)
    y = torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last)
    # The fakes must match the real outputs to the strides; the backward op on its own.
    torch.library.opcheck(convffn_ops._depthwise_conv_gelu_op, (y, conv.weight, conv.bias))
    torch.library.opcheck(
        convffn_ops._depthwise_conv_gelu_backward_op, (grad, y.detach(), conv.weight.detach(), conv.bias.detach())
    )
    fc = PointwiseConv2d(8, 3)
    torch.library.opcheck(convffn_ops._depthwise_conv_gelu_linear_op, (y, conv.weight, conv.bias, fc.weight, fc.bias))
    torch.library.opcheck(
        convffn_ops._depthwise_conv_gelu_linear_backward_op,
        (torch.randn(2, 3, 5, 6), y.detach(), conv.weight.detach(), conv.bias.detach(), fc.weight.detach()),
    )
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward.
    compiled = torch.compile(lambda t: depthwise_conv_gelu(t, conv), backend='aot_eager', fullgraph=True)
    for a, e in zip(
        _value_and_grads(lambda t, c: compiled(t), y, conv, grad),
        _value_and_grads(depthwise_conv_gelu, y, conv, grad),
        strict=True,
    ):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    compiled = torch.compile(lambda t: depthwise_conv_gelu_linear(t, conv, fc), backend='aot_eager', fullgraph=True)
    fc_grad = torch.randn(2, 3, 5, 6)
    for a, e in zip(
        _value_and_grads(lambda t, c: compiled(t), y, conv, fc_grad),
        _value_and_grads(lambda t, c: depthwise_conv_gelu_linear(t, c, fc), y, conv, fc_grad),
        strict=True,
    ):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_fused_hidden_layer_operator_and_kernel_check_their_inputs(require_cpu_kernels):
    require_cpu_kernels()
    kernels = cpu_kernels.load_kernels()
    conv = _conv(8, 3)
    y = torch.randn(1, 8, 5, 6)
    with pytest.raises(
        ValueError,
        match=r'dat::depthwise_conv_gelu expects .* got y \(1, 8, 5, 6\) torch.float32 on '
        r'cpu, weight \(8, 1, 3, 3\), bias \(7,\)',
    ):
        convffn_ops._depthwise_conv_gelu_op(y, conv.weight, conv.bias[:7])
    with pytest.raises(ValueError, match=r'weight \(8, 1, 2, 2\)'):
        convffn_ops._depthwise_conv_gelu_op(y, torch.randn(8, 1, 2, 2), conv.bias)
    nhwc = y.permute(0, 2, 3, 1).contiguous()
    with pytest.raises(RuntimeError, match=r'expected weight \(k \* k, C\) for an odd k and C = 8, got \[8, 8\]'):
        kernels.depthwise_conv_gelu_forward(nhwc, torch.randn(8, 8), conv.bias.detach())
    with pytest.raises(RuntimeError, match=r'expected bias \(8\), got \[9\]'):
        kernels.depthwise_conv_gelu_forward(nhwc, torch.randn(9, 8), torch.randn(9))
    with pytest.raises(RuntimeError, match=r"expected grad_out of y's shape \[1, 5, 6, 8\], got \[1, 5, 5, 8\]"):
        kernels.depthwise_conv_gelu_backward(
            nhwc[:, :, :5].contiguous(), nhwc, torch.randn(9, 8), torch.randn(8), False
        )
    fc = torch.randn(4, 7, 1, 1)
    with pytest.raises(
        ValueError, match=r'expects a 1x1 conv weight .* for a 8-channel map; got weight \(4, 7, 1, 1\)'
    ):
        convffn_ops._depthwise_conv_gelu_linear_op(y, conv.weight, conv.bias, fc, torch.randn(4))
    with pytest.raises(ValueError, match=r"expected a 1x1 conv after the hidden layer .*'kernel_size': \(3, 3\)"):
        depthwise_conv_gelu_linear(y, conv, torch.nn.Conv2d(8, 4, 3))


def test_fused_hidden_layer_operator_without_kernels_says_so(monkeypatch):
    monkeypatch.setattr(cpu_kernels, 'load_kernels', lambda: None)
    monkeypatch.setattr(convffn_ops, 'runs_fused_kernel', lambda: True)
    conv = _conv(8, 3)
    y = torch.randn(1, 8, 5, 6).to(memory_format=torch.channels_last)
    with pytest.raises(
        RuntimeError, match=r'dat::depthwise_conv_gelu in AVX2 or AVX-512 vectors needs the C\+\+ CPU kernels'
    ):
        convffn_ops._depthwise_conv_gelu_op(y, conv.weight, conv.bias)


def test_fused_hidden_layer_keeps_nan_where_the_composition_has_it(require_cpu_kernels, hidden_method):
    require_cpu_kernels()
    conv = _conv(8, 3)
    y = torch.randn(1, 8, 6, 7).to(memory_format=torch.channels_last)
    y[0, 3, 2, 4] = float('nan')
    with torch.no_grad():
        fused, plain = depthwise_conv_gelu(y, conv), depthwise_conv_gelu_reference(y, conv)
    assert torch.equal(torch.isnan(fused), torch.isnan(plain)) and torch.isnan(plain).sum() == 9
    torch.testing.assert_close(fused.nan_to_num(0.0), plain.nan_to_num(0.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('grad_format', [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize('memory_format', [torch.channels_last, torch.contiguous_format])
def test_gelu2d_gradient_for_any_layout_of_the_incoming_gradient(memory_format, grad_format, device):
    """Also on torch 2.0 / 2.1, whose GELU backward gets strided gradients wrong (pytorch/pytorch#112006)."""
    torch.manual_seed(7)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64).to(device)
    grad = torch.randn(2, 8, 5, 6, dtype=torch.float64).to(device).contiguous(memory_format=grad_format)
    (expected,) = torch.autograd.grad(torch.nn.functional.gelu(x.requires_grad_()), x, grad)
    x32 = x.detach().float().contiguous(memory_format=memory_format).requires_grad_()
    (actual,) = torch.autograd.grad(GELU2d()(x32), x32, grad.float())
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('drop_prob', [0.0, 0.3])
def test_drop_path_residual_is_the_plain_sum_when_evaluating_or_never_dropping(drop_prob, device):
    torch.manual_seed(8)
    x, branch = torch.randn(2, 2, 6, 5, 4).to(device)
    residual = DropPathResidual(drop_prob)
    if drop_prob:
        residual.eval()
    assert torch.equal(residual(x, branch), x + branch)


def test_drop_path_residual_drops_whole_samples_and_scales_the_kept_ones(device):
    """Each sample's branch is dropped (the output is x itself) or kept and scaled by 1 / keep,
    as timm's DropPath computes it (to the round-off of one fused multiply-add), with the
    gradient scaled alike; about drop_prob of 4000 samples are dropped."""
    torch.manual_seed(9)
    drop_prob, samples = 0.3, 4000
    x = torch.randn(samples, 3, 2, 2).to(device, memory_format=torch.channels_last)
    branch = torch.randn(samples, 3, 2, 2).to(device, memory_format=torch.channels_last).requires_grad_()
    out = DropPathResidual(drop_prob).train()(x, branch)
    grad = torch.randn_like(out)
    (grad_branch,) = torch.autograd.grad(out, branch, grad)
    kept = (out != x).flatten(1).any(1)
    assert torch.equal(out[~kept], x[~kept]) and torch.equal(grad_branch[~kept], torch.zeros_like(grad_branch[~kept]))
    factor = torch.tensor(1.0 / (1.0 - drop_prob), device=device)  # timm: bernoulli(keep).div_(keep)
    torch.testing.assert_close(out[kept], x[kept] + branch[kept].detach() * factor, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_branch[kept], grad[kept] * factor, rtol=0, atol=0)
    dropped = samples - kept.sum().item()
    assert abs(dropped - drop_prob * samples) < 5 * (samples * drop_prob * (1 - drop_prob)) ** 0.5  # 5 sigma
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_drop_path_residual_adds_a_half_branch_to_a_float_residual():
    """Under autocast a block's branch may be float16 and its residual float32: the sum is float32,
    as ``x + branch`` is."""
    torch.manual_seed(10)
    x, branch = torch.randn(2, 8, 3, 4, 4)
    out = DropPathResidual(0.5).train()(x, branch.half())
    assert out.dtype == torch.float32
    kept = (out != x).flatten(1).any(1)
    assert 0 < kept.sum() < len(x)
    torch.testing.assert_close(out[kept], x[kept] + branch.half().float()[kept] * 2, rtol=1e-6, atol=1e-6)


def _depthwise_inputs(batch, channels, kernel, height, width, memory_format=torch.channels_last):
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(batch, channels, height, width, generator=generator)
    weight = torch.randn(channels, 1, kernel, kernel, generator=generator)
    bias = torch.randn(channels, generator=generator)
    return x.contiguous(memory_format=memory_format), weight, bias


@pytest.mark.parametrize('memory_format', [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize(
    'batch, channels, kernel, stride, padding, height, width',
    [
        (1, 8, 9, 8, 4, 33, 41),  # DAT++'s stage-0 offset conv
        (3, 12, 7, 4, 3, 14, 9),
        (2, 16, 5, 2, 2, 11, 8),
        (2, 8, 3, 1, 1, 5, 7),  # stride 1: oneDNN's weight gradient
        (1, 4, 4, 4, 0, 10, 13),  # kernel == stride: no padding, the last rows and columns unread
        (1, 4, 7, 4, 3, 3, 2),  # one output position, most taps on padding
    ],
)
def test_strided_depthwise_conv_operator_equals_the_conv(
    memory_format, batch, channels, kernel, stride, padding, height, width
):
    """The operator's output and its three gradients against F.conv2d's, and its weight gradient
    against the float64 one."""
    x, weight, bias = _depthwise_inputs(batch, channels, kernel, height, width, memory_format)
    results = []
    plain = functools.partial(torch.nn.functional.conv2d, groups=channels)
    for conv in (depthwise_conv_ops._strided_depthwise_conv_op, plain):
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = conv(*inputs, stride, padding)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(12)).to(memory_format=memory_format)
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    x64, weight64 = x.double().requires_grad_(), weight.double().requires_grad_()
    out64 = plain(x64, weight64, bias.double(), stride, padding)
    (expected,) = torch.autograd.grad(out64, weight64, grad.double())
    actual = depthwise_conv_ops.strided_depthwise_weight_gradient(x, grad, kernel, stride, padding)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)


def test_strided_depthwise_conv_runs_its_operator_only_where_it_applies():
    """The operator for float32 CPU maps with gradients and a stride above 1; else F.conv2d itself:
    without gradients, for the reference, stride 1, other dtypes and under autocast (whose conv
    computes in bfloat16)."""
    x, weight, bias = _depthwise_inputs(1, 4, 5, 9, 9)
    weight.requires_grad_()

    def backward_node(x=x, weight=weight, bias=bias, stride=2, impl='auto'):
        out = strided_depthwise_conv(x, weight, bias, stride, 2, impl)
        return out.grad_fn.name() if out.grad_fn is not None else None

    operator = 'GeneratedBackwardFor_dat_strided_depthwise_conv' if torch_compat.HAS_CUSTOM_OPS else '_AutogradOp'
    assert backward_node().startswith(operator)
    assert backward_node(impl='pytorch').startswith(operator)
    with torch.no_grad():
        assert backward_node() is None
    assert backward_node(impl='reference') == 'ConvolutionBackward0'
    assert backward_node(stride=1) == 'ConvolutionBackward0'
    assert backward_node(x.double(), weight.detach().double().requires_grad_(), bias.double()) == 'ConvolutionBackward0'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert backward_node() == 'ConvolutionBackward0'


def test_strided_depthwise_conv_operator_checks_its_inputs():
    x, weight, bias = _depthwise_inputs(1, 8, 5, 9, 9)
    with pytest.raises(
        ValueError,
        match=r'dat::strided_depthwise_conv expects a map x \(B, C, H, W\), a depth-wise weight \(C, 1, k, k\) and '
        r'a bias \(C,\); got x \(1, 8, 9, 9\), weight \(8, 1, 5, 5\), bias \(7,\)',
    ):
        depthwise_conv_ops._strided_depthwise_conv_op(x, weight, bias[:7], 2, 2)


@pytest.mark.skipif(
    not torch_compat.HAS_CUSTOM_OPS,
    reason=f'torch {torch.__version__} has no torch.library.custom_op (torch 2.4): no operator to check',
)
def test_strided_depthwise_conv_passes_opcheck_and_compiles_without_graph_breaks():
    x, weight, bias = _depthwise_inputs(2, 8, 5, 9, 11)
    inputs = [t.requires_grad_() for t in (x, weight, bias)]
    torch.library.opcheck(depthwise_conv_ops._strided_depthwise_conv_op, (*inputs, 2, 2))
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward.
    compiled = torch.compile(lambda *t: strided_depthwise_conv(*t, 2, 2), backend='aot_eager', fullgraph=True)
    grad = torch.randn(2, 8, 5, 6).to(memory_format=torch.channels_last)
    results = []
    for conv in (compiled, lambda *t: strided_depthwise_conv(*t, 2, 2)):
        out = conv(*inputs)
        results.append((out, *torch.autograd.grad(out, inputs, grad)))
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def _key_sampling_inputs(batch, groups, channels, height, width, keys, memory_format=torch.channels_last):
    """A map and key positions over [-1.3, 1.3] (some outside the map: zero padding), with the
    corners -1 and 1 exactly among them."""
    generator = torch.Generator().manual_seed(batch * 1000 + channels)
    x = torch.randn(batch, channels, height, width, generator=generator).contiguous(memory_format=memory_format)
    pos = torch.rand(batch * groups, keys, 2, generator=generator) * 2.6 - 1.3
    pos[0, :2] = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    return x, pos


def _sampled_keys_and_grads(sample, x, pos, groups, grad):
    x, pos = x.clone().requires_grad_(), pos.clone().requires_grad_()
    out = sample(x, pos, groups)
    return (out, *torch.autograd.grad(out, (x, pos), grad))


@pytest.mark.parametrize('memory_format', [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize(
    'batch, groups, channels, height, width, keys',
    [
        (1, 1, 8, 33, 41, 20),  # one group: x's reshape is a view at batch 1
        (2, 4, 32, 9, 11, 15),  # a batch above 1: grid_sample needs a copy of a channels-last map
        (3, 2, 10, 7, 6, 6),  # 5 channels per group, not a multiple of the vector width
        (1, 8, 64, 1, 5, 12),  # a one-row map: every y tap but row 0 is padding
        (2, 1, 4, 2, 2, 30),  # more keys than pixels
    ],
)
def test_key_sampling_operator_matches_grid_sample(
    memory_format, batch, groups, channels, height, width, keys, require_cpu_kernels
):
    """The operator's keys and gradients (map and positions) against the reference's
    (F.grid_sample) in float64, and against its float32 numbers."""
    require_cpu_kernels()
    x, pos = _key_sampling_inputs(batch, groups, channels, height, width, keys, memory_format)
    grad = torch.randn(batch, channels, 1, keys, generator=torch.Generator().manual_seed(3))
    actual = _sampled_keys_and_grads(key_sampling_ops._sample_keys_op, x, pos, groups, grad)
    expected32 = _sampled_keys_and_grads(sample_keys_reference, x, pos, groups, grad)
    expected64 = _sampled_keys_and_grads(sample_keys_reference, x.double(), pos.double(), groups, grad.double())
    for a, e32, e64 in zip(actual, expected32, expected64, strict=True):
        scale = e64.abs().max().item()
        torch.testing.assert_close(a.double(), e64, rtol=0, atol=2e-6 * scale)
        torch.testing.assert_close(a, e32, rtol=0, atol=4e-6 * scale)
    # The keys and the map's gradient are channels-last (the projections read them in place).
    assert actual[0].is_contiguous(memory_format=torch.channels_last)
    assert actual[1].is_contiguous(memory_format=torch.channels_last)


def test_key_sampling_gradients_do_not_depend_on_the_thread_count(require_cpu_kernels, monkeypatch):
    require_cpu_kernels()
    x, pos = _key_sampling_inputs(2, 4, 32, 12, 10, 40)
    grad = torch.randn(2, 32, 1, 40, generator=torch.Generator().manual_seed(4))
    results = []
    threads = torch.get_num_threads()
    for count in (1, 3):
        torch.set_num_threads(count)
        try:
            results.append(_sampled_keys_and_grads(key_sampling_ops._sample_keys_op, x, pos, 4, grad))
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_key_sampling_nan_position_reads_nan_for_its_key_only(require_cpu_kernels):
    """A key at a position that is not finite reads NaN in its group's channels, as with
    grid_sample, and gets a NaN gradient; the map's gradient and the other keys stay finite."""
    require_cpu_kernels()
    x, pos = _key_sampling_inputs(1, 2, 8, 6, 7, 5)
    pos[1, 2, 0] = float('nan')  # group 1, key 2
    pos[0, 4, 1] = float('inf')  # group 0, key 4
    grad = torch.randn(1, 8, 1, 5, generator=torch.Generator().manual_seed(5))
    out, grad_x, grad_pos = _sampled_keys_and_grads(key_sampling_ops._sample_keys_op, x, pos, 2, grad)
    expected = sample_keys_reference(x, pos, 2)
    assert torch.equal(out.isnan(), expected.isnan())
    nan_keys = torch.zeros(1, 8, 1, 5, dtype=torch.bool)
    nan_keys[0, 4:, 0, 2] = nan_keys[0, :4, 0, 4] = True
    assert torch.equal(out.isnan(), nan_keys)
    assert grad_x.isfinite().all()
    assert grad_pos[1, 2].isnan().all() and grad_pos[0, 4].isnan().all()
    assert grad_pos.isnan().sum() == 4


def test_sample_keys_runs_its_operator_only_where_it_applies(require_cpu_kernels, monkeypatch):
    """The operator for float32 positions on CPU with the C++ kernels; else grid_sample itself:
    for the reference and the PyTorch backend, and float64."""
    require_cpu_kernels()
    calls = []
    operator = key_sampling_ops._sample_keys_op
    monkeypatch.setattr(key_sampling_ops, '_sample_keys_op', lambda *args: calls.append(1) or operator(*args))
    x, pos = _key_sampling_inputs(2, 2, 8, 6, 7, 5)

    def runs_operator(x=x, pos=pos, impl='auto'):
        calls.clear()
        sample_keys(x, pos, 2, impl)
        return bool(calls)

    assert runs_operator() and runs_operator(impl='cpu-kernel')
    assert not runs_operator(impl='reference') and not runs_operator(impl='pytorch')
    assert not runs_operator(x.double(), pos.double())
    assert torch.equal(sample_keys(x, pos, 2, 'reference'), sample_keys_reference(x, pos, 2))
    # A half map is read in float32, as the reference reads it.
    assert runs_operator(x.bfloat16())
    half = sample_keys(x.bfloat16(), pos, 2)
    assert half.dtype == torch.float32
    assert torch.equal(half, sample_keys_reference(x.bfloat16(), pos, 2))


def test_key_sampling_operator_and_kernel_check_their_inputs(require_cpu_kernels):
    require_cpu_kernels()
    kernels = cpu_kernels.load_kernels()
    x, pos = _key_sampling_inputs(2, 2, 8, 6, 7, 5)
    with pytest.raises(
        ValueError,
        match=r'dat::sample_keys expects a float32 CPU map x \(B, C, H, W\), positions \(B \* groups, N, 2\) and '
        r'a number of groups that divides C; got x \(2, 8, 6, 7\) torch.float32 on cpu, pos \(4, 5, 2\) '
        r'torch.float32 on cpu, groups 3',
    ):
        key_sampling_ops._sample_keys_op(x, pos, 3)
    with pytest.raises(ValueError, match=r'pos \(2, 5, 2\) torch.float32'):
        key_sampling_ops._sample_keys_op(x, pos[:2], 2)
    with pytest.raises(ValueError, match=r'pos \(4, 5, 2\) torch.float64'):
        key_sampling_ops._sample_keys_op(x, pos.double(), 2)
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    with pytest.raises(RuntimeError, match=r'expected a number of groups that divides the 8 channels, got 3'):
        kernels.sample_keys_forward(nhwc, pos, 3)
    with pytest.raises(RuntimeError, match=r'expected pos \(B \* G, N, 2\) = \(4, N, 2\), got \[4, 5, 3\]'):
        kernels.sample_keys_forward(nhwc, torch.zeros(4, 5, 3), 2)
    with pytest.raises(RuntimeError, match=r'expected grad_out \(B, N, C\) = \(2, 5, 8\), got \[2, 4, 8\]'):
        kernels.sample_keys_backward(torch.zeros(2, 4, 8), nhwc, pos, 2)
    with pytest.raises(RuntimeError, match=r'expected contiguous Float CPU tensors for x and pos, got a non-'):
        kernels.sample_keys_forward(x.permute(0, 2, 3, 1).transpose(1, 2), pos, 2)


def test_key_sampling_operator_without_kernels_says_so(monkeypatch):
    monkeypatch.setattr(cpu_kernels, 'load_kernels', lambda: None)
    x, pos = _key_sampling_inputs(1, 1, 8, 6, 7, 5)
    with pytest.raises(RuntimeError, match=r'dat::sample_keys needs the C\+\+ CPU kernels'):
        key_sampling_ops._sample_keys_op(x, pos, 1)


@pytest.mark.skipif(
    not torch_compat.HAS_CUSTOM_OPS,
    reason=f'torch {torch.__version__} has no torch.library.custom_op (torch 2.4): no operator to check',
)
def test_key_sampling_passes_opcheck_and_compiles_without_graph_breaks(require_cpu_kernels):
    require_cpu_kernels()
    x, pos = _key_sampling_inputs(2, 2, 8, 6, 7, 5)
    x.requires_grad_(), pos.requires_grad_()
    grad = torch.randn(2, 8, 1, 5).to(memory_format=torch.channels_last)
    # The fakes must match the real outputs to the strides; the backward op on its own.
    torch.library.opcheck(key_sampling_ops._sample_keys_op, (x, pos, 2))
    torch.library.opcheck(key_sampling_ops._sample_keys_backward_op, (grad, x.detach(), pos.detach(), 2))
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward.
    compiled = torch.compile(lambda *t: sample_keys(*t, 2), backend='aot_eager', fullgraph=True)
    results = []
    for sample in (compiled, lambda *t: sample_keys(*t, 2)):
        out = sample(x, pos)
        results.append((out, *torch.autograd.grad(out, (x, pos), grad)))
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
