"""How many logits one chunk of the fast attention operators holds, per device, and how large the
CPU's last-level cache is (:func:`cpu_last_level_cache_bytes`: whether ConvFFN's inference stripes
pay off).

The fast operators (:mod:`~projects.dat.ops.deformable`, :mod:`~projects.dat.ops.neighborhood`)
compute logits, softmax and gradients chunk by chunk, so that no whole attention matrix is ever
in memory. What a good chunk is depends on the device:

- CPU: the operator's own constant (``DEFORMABLE_CHUNK_ELEMENTS``,
  ``NEIGHBORHOOD_CHUNK_ELEMENTS``), sized so that a chunk's buffers stay in the caches.
- CUDA: a chunk costs a few dozen kernel launches and as many Python calls, whatever its size.
  A cache-sized chunk (a million logits, 4 MB) is a few microseconds of work for a GPU, so the
  stage-1 D block of DAT-T++ at 1344x800 (141 million logits per image) would be 141 chunks,
  bound by launches and Python. There a chunk holds up to :data:`CUDA_CHUNK_ELEMENTS` logits
  (that block: 3 chunks), and its buffers together take at most :data:`CUDA_MEMORY_FRACTION`
  of the GPU's memory (smaller chunks on small GPUs), never fewer logits than on CPU.

The CUDA budget follows the GPU's total memory, not its free memory: total memory is fixed for a
device, so the chunks, and with them the order of the floating-point sums, are the same from
call to call (free memory falls as PyTorch's caching allocator keeps freed blocks, and would
shrink the chunks for no reason).
"""

import os

import torch

from . import torch_compat

# Logits per chunk on CUDA at most: 256 MiB per float32 buffer. Each of the chunk's kernels then
# runs for a few hundred microseconds, far longer than launching it and the Python around it.
CUDA_CHUNK_ELEMENTS = 1 << 26
# The share of the GPU's memory that one chunk's buffers may take together (1.6 %: 2.2 GB on a
# 141 GB GPU, 250 MB on a 16 GB one).
CUDA_MEMORY_FRACTION = 1 / 64


def cuda_chunk_elements(total_memory: int, buffers: int, element_size: int, minimum: int) -> int:
    """Logits per chunk on a GPU of ``total_memory`` bytes (a pure function of its arguments).

    Args:
        total_memory (int): The GPU's memory in bytes.
        buffers (int): How many chunk-sized buffers the operator holds at once (in its backward
            pass, the larger number).
        element_size (int): Bytes per logit (4 for float32).
        minimum (int): The fewest logits per chunk: the operator's CPU value.

    Returns:
        int: :data:`CUDA_CHUNK_ELEMENTS`, or fewer where the buffers would take more than
        :data:`CUDA_MEMORY_FRACTION` of the memory, but at least ``minimum``.
    """
    fitting = int(total_memory * CUDA_MEMORY_FRACTION) // (buffers * element_size)
    return max(minimum, min(CUDA_CHUNK_ELEMENTS, fitting))


@torch_compat.assume_constant_result
def _cuda_total_memory(device: torch.device) -> int:
    """The GPU's memory in bytes; torch.compile takes it as a constant instead of breaking the
    graph at the query."""
    return torch.cuda.get_device_properties(device).total_memory


def default_chunk_elements(device: torch.device, dtype: torch.dtype, cpu_elements: int, buffers: int) -> int:
    """The chunk of an operator whose inputs are on ``device``, where the caller gives none.

    Args:
        device (torch.device): The device of the operator's inputs.
        dtype (torch.dtype): The dtype of its logits (its compute dtype).
        cpu_elements (int): The operator's chunk on CPU (and any device but CUDA).
        buffers (int): How many chunk-sized buffers the operator holds at once.

    Returns:
        int: ``cpu_elements`` off CUDA; on CUDA :func:`cuda_chunk_elements` of the GPU's memory.
    """
    if device.type != 'cuda':
        return cpu_elements
    element_size = torch.finfo(dtype).bits // 8
    return cuda_chunk_elements(_cuda_total_memory(device), buffers, element_size, cpu_elements)


# Where Linux describes the caches of CPU 0.
CPU_CACHE_DIR = '/sys/devices/system/cpu/cpu0/cache'
_SIZE_UNITS = {'': 1, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}


def parse_cache_size(text: str) -> int:
    """Bytes of a cache size as Linux writes it (``'48K'``, ``'491520K'``, ``'32M'``).

    Raises:
        ValueError: Not a number with an optional K, M or G.
    """
    text = text.strip()
    unit = text[-1:].upper() if text[-1:].isalpha() else ''
    number = text[: len(text) - len(unit)]
    if unit not in _SIZE_UNITS or not number.isdigit():
        raise ValueError(f"expected a cache size such as '48K' or '32M', got {text!r}")
    return int(number) * _SIZE_UNITS[unit]


def read_last_level_cache_bytes(cache_dir: str = CPU_CACHE_DIR) -> int:
    """The size of the highest-level data or unified cache that ``cache_dir`` describes (sysfs:
    ``index*/level``, ``type`` and ``size``), or 0 where it describes none (not Linux, a
    container without sysfs).

    Args:
        cache_dir (str): A folder laid out as ``/sys/devices/system/cpu/cpu0/cache``.

    Returns:
        int: Bytes.
    """
    caches = []
    try:
        for entry in sorted(e for e in os.listdir(cache_dir) if e.startswith('index')):
            folder = os.path.join(cache_dir, entry)
            fields = {}
            for name in ('level', 'type', 'size'):
                with open(os.path.join(folder, name)) as file:
                    fields[name] = file.read().strip()
            if fields['type'] != 'Instruction':
                caches.append((int(fields['level']), parse_cache_size(fields['size'])))
    except (OSError, ValueError):
        return 0
    return max(caches)[1] if caches else 0


_cpu_cache_bytes = []  # read once per process


@torch_compat.assume_constant_result
def cpu_last_level_cache_bytes() -> int:
    """The CPU's last-level cache in bytes (read once), 0 where unknown; torch.compile takes it as
    a constant instead of tracing the file reads."""
    if not _cpu_cache_bytes:
        _cpu_cache_bytes.append(read_last_level_cache_bytes())
    return _cpu_cache_bytes[0]
