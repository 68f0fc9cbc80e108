"""A hand-written GPU kernel (Triton, which torch's cuda builds ship): nf4 unpacked in one pass.

Each program reads a run of packed bytes and their blocks' absmax, looks both nibbles of every byte up
in the 16 NF4 codes, multiplies in float32 and rounds once to the output's dtype: the plain torch
kernels' formula, so the same bits (tests/test_cuda.py), in one launch per weight and about 2.5 bytes
of memory traffic per bf16 value. Imported only on cuda; the module is importable without Triton.
"""
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


def available():
    return triton is not None


def nf4_into(qweight, absmax, code, n, out):
    """Unpack n values: qweight uint8 [ceil(n / 2)], absmax float32 [ceil(n / 64)], code float32 [16],
    all on one cuda device, into the contiguous `out` (any float dtype)."""
    grid = (triton.cdiv(qweight.numel(), BYTES_PER_PROGRAM),)
    _nf4_kernel[grid](qweight, absmax, code, out, n, BYTES=BYTES_PER_PROGRAM, PER_ABSMAX=BYTES_PER_ABSMAX,
                      DOWNCAST=out.dtype != torch.float32)
