"""Faster nf4 unpacking than the plain torch kernels, into the caller's buffer, with their bits.

- cuda: a Triton kernel written here (torch's cuda builds ship Triton). Each program reads a run of
  packed bytes and their blocks' absmax, looks both nibbles of every byte up in the 16 NF4 codes,
  multiplies in float32 and rounds once to the output's dtype: the plain kernels' formula, so the
  same bits (tests/test_cuda.py), in one launch per weight and about 2.5 bytes of memory traffic per
  bf16 value instead of 14.
- cpu: bitsandbytes' C++ kernel, where bitsandbytes is installed (the `qlora` extra). A torch gather
  cannot use the CPU's 16-entry permutes: on 2 cores a 0.4b block took 9 ms in plain torch and 1.2 ms
  there. Its torch op would cost more than it saves (it returns a new tensor, no out= on a cpu: a
  7B projection then pays page faults, 48 ms against 15; and importing the package adds 120 MB), so
  its shared library is called directly, only for the versions whose entry points we checked, and
  only after it has unpacked a test weight to the plain kernels' bits.

SLOWLLAMA_FUSED_DEQUANT=0 turns both off.
"""
import ctypes
import glob
import importlib.metadata
import importlib.util
import os
import sys

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # cpu-only torch builds, mps
    triton = None

BYTES_PER_PROGRAM = 1024
BYTES_PER_ABSMAX = 32  # 64 values of a block, two a byte

if triton is not None:
    @triton.jit
    def _nf4_kernel(qweight, absmax, code, out, n, BYTES: tl.constexpr, PER_ABSMAX: tl.constexpr,
                    DOWNCAST: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BYTES
        byte_index = start + tl.arange(0, BYTES)
        in_bounds = byte_index < (n + 1) // 2
        byte = tl.load(qweight + byte_index, mask=in_bounds, other=0).to(tl.int32)
        scale = tl.load(absmax + byte_index // PER_ABSMAX, mask=in_bounds, other=0.0)
        high = tl.load(code + (byte >> 4)) * scale  # the high nibble is the first value
        low = tl.load(code + (byte & 15)) * scale
        value_index = 2 * start + tl.arange(0, 2 * BYTES)
        values = tl.interleave(high, low)
        if DOWNCAST:  # to bf16 or fp16, rounded to nearest even as torch rounds
            values = values.to(out.dtype.element_ty, fp_downcast_rounding='rtne')
        tl.store(out + value_index, values, mask=value_index < n)


def enabled():
    return os.environ.get('SLOWLLAMA_FUSED_DEQUANT', '1') != '0'


def triton_available():
    return triton is not None


def triton_nf4_into(qweight, absmax, code, n, out):
    """Unpack n values: qweight uint8 [ceil(n / 2)], absmax float32 [ceil(n / 64)], code float32 [16],
    all on one cuda device, into the contiguous `out` (any float dtype)."""
    grid = (triton.cdiv(qweight.numel(), BYTES_PER_PROGRAM),)
    # Triton launches on the current device's current stream. Outside torchrun nothing sets the
    # current device, so with --device cuda:1 the launch would go to device 0, unordered after the
    # copy that the compute stream of device 1 waits for: make out's device the current one
    with torch.cuda.device(out.device):
        _nf4_kernel[grid](qweight, absmax, code, out, n, BYTES=BYTES_PER_PROGRAM, PER_ABSMAX=BYTES_PER_ABSMAX,
                          DOWNCAST=out.dtype != torch.float32)


# --- cpu: bitsandbytes' shared library ----------------------------------------------------------

# versions whose cdequantize_blockwise_cpu_nf4_* take (qweight, absmax, out, blocksize, rows, cols)
BITSANDBYTES_CHECKED = ((0, 49), (0, 51))  # from, up to (excluded)
_CPU_SUFFIX = {torch.float32: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}
_CPU = {}


def cpu_nf4_into(qweight, absmax, code, shape, out):
    """Unpack a [rows, cols] weight (cols a multiple of 64: its kernel's blocks do not cross rows)
    into the contiguous cpu tensor `out`; -> False where the library is missing or does not serve.
    code: the 16 NF4 values (float32), to check the library's bits against the first time."""
    if not (enabled() and len(shape) == 2 and shape[1] % 64 == 0 and out.dtype in _CPU_SUFFIX
            and out.is_contiguous() and qweight.is_contiguous() and absmax.is_contiguous()):
        return False
    entry = _cpu_library(code).get(out.dtype)
    if entry is None:
        return False
    entry(qweight.data_ptr(), absmax.data_ptr(), out.data_ptr(), 64, *shape)
    return True


def cpu_library_status(code):
    """None where the cpu library serves, else why not (one line)."""
    return _cpu_library(code).get('status')


def _cpu_library(code):
    """{dtype: entry point} and, where it does not serve, {'status': why}."""
    if not _CPU:
        _CPU.update(_load_cpu_library(code))
    return _CPU


def _load_cpu_library(code):
    try:
        version = importlib.metadata.version('bitsandbytes')
    except importlib.metadata.PackageNotFoundError:
        return {'status': 'bitsandbytes is not installed'}
    major_minor = tuple(int(part) for part in version.split('.')[:2] if part.isdigit())
    if not BITSANDBYTES_CHECKED[0] <= major_minor < BITSANDBYTES_CHECKED[1]:
        return {'status': f'bitsandbytes {version} is not a version whose cpu kernel slowllama has checked'}
    folder = importlib.util.find_spec('bitsandbytes').submodule_search_locations[0]
    found = sorted(glob.glob(os.path.join(folder, 'libbitsandbytes_cpu.*')))
    try:
        library = ctypes.CDLL(found[0])
        entries = {dtype: getattr(library, f'cdequantize_blockwise_cpu_nf4_{suffix}')
                   for dtype, suffix in _CPU_SUFFIX.items()}
    except (IndexError, OSError, AttributeError) as error:
        return {'status': f'bitsandbytes {version} has no cpu nf4 kernel here ({type(error).__name__})'}
    for entry in entries.values():
        entry.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_longlong] * 3
        entry.restype = None
    if not _same_bits_as_plain(entries, code):
        print(f'slowllama: bitsandbytes {version}\'s cpu kernel unpacked a test weight differently; '
              f'using plain torch kernels', file=sys.stderr)
        return {'status': f'bitsandbytes {version}\'s cpu kernel gave other bits'}
    return entries


def _same_bits_as_plain(entries, code):
    """Random packed bytes and absmax over 6 rows of 3 blocks, unpacked by each entry point: the plain
    formula's bits (code[nibble] * absmax in float32, rounded once to the dtype)?"""
    generator = torch.Generator().manual_seed(0)
    rows, cols = 6, 192
    qweight = torch.randint(0, 256, (rows * cols // 2,), dtype=torch.uint8, generator=generator)
    absmax = torch.rand(rows * cols // 64, generator=generator) * torch.logspace(-3, 1, rows * cols // 64)
    nibbles = torch.stack([qweight >> 4, qweight & 15], dim=1).reshape(-1, 64).long()
    expected = (code[nibbles] * absmax[:, None]).reshape(rows, cols)
    for dtype, entry in entries.items():
        got = torch.full((rows, cols), float('nan'), dtype=dtype)
        entry(qweight.data_ptr(), absmax.data_ptr(), got.data_ptr(), 64, rows, cols)
        if not torch.equal(got, expected.to(dtype)):
            return False
    return True
