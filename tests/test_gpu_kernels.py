"""The D and N ops' Triton kernels compiled for a Hopper GPU (sm_90, the H200 of tools/gpu_check.sh)
without one: Triton's compiler and its bundled ptxas run on any machine. This catches what
Triton's interpreter (which checks the kernels' numbers, in tests/test_attention_fast.py) does
not: code that does not compile for the GPU, and register spills at the launch configuration of
projects.dat.ops.gpu_kernels (local-memory traffic in the kernels' inner loops).
"""

import inspect
import os
import re
import subprocess

import pytest

from projects.dat.ops import gpu_kernels

triton = pytest.importorskip('triton', minversion='3.0', reason='Triton 3 or newer does not import here')
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')
HOPPER = GPUTarget('cuda', 90, 32)
# The kernels' pointer arguments by what they point to (the rest are int32 sizes and strides).
QUERY_DTYPE_POINTERS = {'q_ptr', 'k_ptr', 'v_ptr', 'out_ptr', 'grad_out_ptr', 'grad_q_ptr'}
INDEX_POINTERS = {'iy_ptr', 'ix_ptr'}


def _signature(kernel, dtype: str, constants: dict) -> dict:
    """Triton's signature of a kernel: what each argument is, as the launcher passes it."""
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constants:
            signature[name] = 'constexpr'
        elif name in QUERY_DTYPE_POINTERS:
            signature[name] = f'*{dtype}'
        elif name in INDEX_POINTERS:
            signature[name] = '*i32'
        elif name.endswith('_ptr'):
            signature[name] = '*fp32'
        else:
            signature[name] = 'fp32' if name == 'scale' else 'i32'
    return signature


def _compile_for_hopper(kernel, dtype: str, constants: dict, num_warps: int) -> str:
    """Compiles a kernel for sm_90 and returns ptxas's report of its registers and spills."""
    source = ASTSource(fn=kernel, signature=_signature(kernel, dtype, constants), constexprs=constants)
    compiled = triton.compile(source, target=HOPPER, options=dict(num_warps=num_warps))
    assert compiled.metadata.shared <= 227 * 1024  # an H100 / H200 block's shared memory
    ptx = compiled.asm['ptx']
    return subprocess.run(
        [PTXAS, '-arch=sm_90a', '-v', '-', '-o', os.devnull], input=ptx, capture_output=True, text=True, check=True
    ).stderr


def _assert_no_spills(report: str):
    spills = [int(n) for n in re.findall(r'(\d+) bytes spill stores', report)]
    assert spills and max(spills) == 0, report


@pytest.mark.skipif(not os.path.isfile(PTXAS), reason="Triton's wheel has no ptxas here")
@pytest.mark.parametrize('dtype', ['fp32', 'fp16'])
@pytest.mark.parametrize('name', list(gpu_kernels.KERNEL_BLOCKS))
def test_kernel_compiles_for_sm90_without_register_spills(name, dtype):
    from projects.dat.ops import deformable_triton

    kernel = getattr(deformable_triton, name)
    block_m, block_n = gpu_kernels.KERNEL_BLOCKS[name]
    # 32 channels per head, as in every DAT and DAT++ variant.
    constants = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=32, IEEE=dtype == 'fp32', ROUND_LOGITS=dtype != 'fp32')
    _assert_no_spills(_compile_for_hopper(kernel, dtype, constants, gpu_kernels.NUM_WARPS))


@pytest.mark.skipif(not os.path.isfile(PTXAS), reason="Triton's wheel has no ptxas here")
@pytest.mark.parametrize('name', ['forward', 'backward_queries', 'backward_keys'])
def test_neighborhood_kernel_compiles_for_sm90_without_register_spills(name):
    from projects.dat.ops import neighborhood_triton

    kernel = getattr(neighborhood_triton, name)
    tile_h, tile_w = gpu_kernels.NEIGHBORHOOD_TILE
    constants = dict(TILE_H=tile_h, TILE_W=tile_w, BLOCK_D=32)  # float32, 32 channels per head
    _assert_no_spills(_compile_for_hopper(kernel, 'fp32', constants, gpu_kernels.NEIGHBORHOOD_NUM_WARPS))
