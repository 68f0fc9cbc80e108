"""Packed weights: 4-bit NormalFloat (QLoRA, as bitsandbytes lays it out) and 8-bit Q8_0 (llama.cpp).

Pure torch, no files. A weight is packed into a few named parts ({part: tensor}) and unpacked back
to float32 on whatever device the parts are on:

- nf4: the weight flattened and cut into blocks of 64 values (the last block may be shorter); each
  block is scaled by its largest magnitude ('absmax', float32) and every value replaced by the index
  of the nearest NF4 code; two indices per byte, the first in the high nibble ('qweight', uint8).
  With double quantization the absmax themselves are stored in 8 bits: minus their mean
  ('absmax_offset'), in blocks of 256 scaled by their own absmax ('absmax_scale'), as indices into
  the signed dynamic 8-bit map.
- int8 (Q8_0): each row cut into blocks of 32; a block is 34 bytes, its scale (absmax / 127) as
  float16, then the 32 values divided by the scale, rounded half away from zero, as int8 ('qweight',
  uint8 [rows, cols / 32 * 34], GGUF's bytes exactly).
"""
import math
import sys
from dataclasses import dataclass

import torch

from ..errors import SlowLlamaError
from . import kernels

QUANT_TYPES = ('nf4', 'int8')
NF4_BLOCK = 64
ABSMAX_BLOCK = 256  # double quantization's blocks of absmax
Q8_BLOCK = 32
Q8_BLOCK_BYTES = 2 + Q8_BLOCK  # fp16 scale + 32 int8

# QLoRA's NormalFloat-4: the quantiles of a standard normal scaled to [-1, 1], with an exact zero
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class Quant:
    """How a prepared model's projection weights are packed (recorded in its manifest); with `head`,
    the embeddings and output head too."""
    type: str
    double_quant: bool = False
    head: bool = False

    def __post_init__(self):
        if self.type not in QUANT_TYPES:
            raise SlowLlamaError(f'quant: unknown quantization {self.type!r} (use {" or ".join(QUANT_TYPES)})')
        if self.double_quant and self.type != 'nf4':
            raise SlowLlamaError('double_quant: only nf4 has a second level of quantization')

    def to_dict(self):
        block = NF4_BLOCK if self.type == 'nf4' else Q8_BLOCK
        return {'type': self.type, 'blocksize': block, 'double_quant': self.double_quant, 'head': self.head}

    @classmethod
    def from_dict(cls, d):
        """A manifest's record (None: not quantized). A damaged one is a 'model config:' error, which
        config_errors names the manifest in."""
        if d is None:
            return None
        flags = (d.get('double_quant', False), d.get('head', False)) if isinstance(d, dict) else ()
        try:
            if len(flags) != 2 or not all(isinstance(flag, bool) for flag in flags):
                raise SlowLlamaError('double_quant and head must be true or false')
            return cls(d['type'], *flags)
        except (SlowLlamaError, TypeError, KeyError):
            raise SlowLlamaError(f'model config: quant must be a record slowllama writes, got {d!r:.120}') from None


def parse_quant(quant, double_quant=False, head=False):
    """None | 'nf4' | 'int8' | Quant -> Quant or None."""
    if quant is None and head:
        raise SlowLlamaError('quant_head: packs the embeddings and head with `quant` nf4 or int8; give `quant`')
    if quant is None or isinstance(quant, Quant):
        return quant
    return Quant(str(quant), double_quant, head)


def packed_layout(shape, quant: Quant):
    """{part: (shape, dtype)} of a weight of `shape` packed with `quant`."""
    n = math.prod(shape)
    if quant.type == 'int8':
        rows, cols = shape
        return {'qweight': ((rows, cols // Q8_BLOCK * Q8_BLOCK_BYTES), torch.uint8)}
    blocks = -(-n // NF4_BLOCK)
    layout = {'qweight': (((n + 1) // 2,), torch.uint8)}
    if not quant.double_quant:
        return layout | {'absmax': ((blocks,), torch.float32)}
    return layout | {'absmax': ((blocks,), torch.uint8), 'absmax_scale': ((-(-blocks // ABSMAX_BLOCK),), torch.float32),
                     'absmax_offset': ((1,), torch.float32)}


def packed_nbytes(shape, quant: Quant):
    return sum(math.prod(s) * dtype.itemsize for s, dtype in packed_layout(shape, quant).values())


def check_quantizable(shape, quant: Quant, name, rows=False):
    """rows: the weight is read a row at a time (embeddings, head), so nf4 blocks may not cross rows."""
    if quant.type == 'int8' and (len(shape) != 2 or shape[1] % Q8_BLOCK):
        raise SlowLlamaError(f'quant int8: {name} has shape {tuple(shape)}; Q8_0 needs rows of a multiple '
                             f'of {Q8_BLOCK} values')
    if rows and quant.type == 'nf4' and shape[-1] % NF4_BLOCK:
        raise SlowLlamaError(f'quant_head: {name} has rows of {shape[-1]} values; nf4 read a row at a '
                             f'time needs a multiple of {NF4_BLOCK}')


def quantize(weight, quant: Quant):
    """float weight -> {part: tensor} (see packed_layout)."""
    if quant.type == 'int8':
        return {'qweight': q8_0_quantize(weight)}
    qweight, absmax = nf4_quantize(weight)
    if not quant.double_quant:
        return {'qweight': qweight, 'absmax': absmax}
    return {'qweight': qweight, **quantize_absmax(absmax)}


def dequantize(parts, shape, quant: Quant, out=None, dtype=torch.float32):
    """{part: tensor} -> weight of `shape` on the parts' device: a new tensor of `dtype`, or written
    into `out` (any float dtype); values formed in float32 and rounded once."""
    if quant.type == 'int8':
        return q8_0_dequantize(parts['qweight'], shape, out, dtype)
    absmax = parts['absmax'] if not quant.double_quant else dequantize_absmax(
        parts['absmax'], parts['absmax_scale'], parts['absmax_offset'])
    return nf4_dequantize(parts['qweight'], absmax, shape, out, dtype)


# --- nf4 -------------------------------------------------------------------------------------

def _scaled_blocks(flat, blocksize):
    """flat float32 [n] -> (values scaled into [-1, 1] per block [n], absmax per block [blocks]).
    Full blocks are scaled by multiplying with 1 / absmax, a last partial block by dividing: the
    order of operations bitsandbytes uses, so the rounding (and so the chosen codes) match."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    return scaled, absmax


def _nearest(scaled, code):
    """Index of the nearest value of the sorted `code` (a tie goes to the lower one)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints)


def nf4_quantize(weight):
    """weight (any shape, any float dtype) -> (qweight uint8 [ceil(n / 2)], absmax float32 [blocks])."""
    flat = weight.detach().reshape(-1).float()
    scaled, absmax = _scaled_blocks(flat, NF4_BLOCK)
    if scaled.numel() % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])  # an odd count: the last byte's low nibble holds 0.0
    codes = _nearest(scaled, torch.tensor(NF4_CODE, device=flat.device)).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def nf4_dequantize(qweight, absmax, shape, out=None, dtype=torch.float32, plain=False):
    """-> [shape] (new, of `dtype`, or written into `out`): code[index] * absmax of its block. A
    faster kernel does it where one serves (kernels.py), unless `plain`."""
    n = math.prod(shape)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=qweight.device)
    if not plain and _fused_nf4_into(qweight, absmax, shape, out):
        return out
    # each byte's two values (high nibble first) gathered as one 64-bit word [bytes]: straight into a
    # float32 `out`, then scaled there in place, else into a temporary. One 8-byte gather with int32
    # indices measured 3x faster on a CPU than two 4-byte ones indexed with int64.
    in_place = (out.dtype == torch.float32 and n % 2 == 0 and out.is_contiguous()
                and out.storage_offset() % 2 == 0)  # whole 8-byte words
    pairs = out.view(-1).view(torch.int64) if in_place else None
    pairs = torch.index_select(_nf4_pairs(qweight.device), 0, qweight.int(), out=pairs)
    values = pairs.view(torch.float32)[:n]
    flat, full = out.view(-1), n - n % NF4_BLOCK
    torch.mul(values[:full].view(-1, NF4_BLOCK), absmax[:full // NF4_BLOCK, None], out=flat[:full].view(-1, NF4_BLOCK))
    if full < n:
        torch.mul(values[full:], absmax[-1], out=flat[full:])
    return out


# On cuda the three plain kernels (widen the bytes, gather the pairs, scale) move about 14 bytes per
# bf16 value through the GPU's memory. Measured on an H200, one Llama-7B block to bf16: 1.42 ms plain,
# 0.78 ms as torch.compile builds the formula, 0.17 ms with the Triton kernel of kernels.py. On a cpu,
# bitsandbytes' kernel where it is installed (compiled by torch, the formula was 2x slower there).
_FUSED = {'failed': False}


def _fused_nf4_into(qweight, absmax, shape, out):
    """Dequantize into `out` with a faster kernel where one serves; -> False where the caller's plain
    path must do it."""
    if out.device.type == 'cpu':
        return kernels.cpu_nf4_into(qweight, absmax, nf4_code(out.device), shape, out)
    if (_FUSED['failed'] or not out.is_cuda or not out.is_contiguous() or not qweight.is_contiguous()
            or not kernels.triton_available() or not kernels.enabled()):
        return False
    try:
        kernels.triton_nf4_into(qweight, absmax, nf4_code(out.device), math.prod(shape), out)
    except Exception as error:  # noqa: BLE001 (no compiler, a GPU Triton does not build for)
        _FUSED['failed'] = True
        print(f'slowllama: the fused nf4 kernel could not be built ({type(error).__name__}); '
              f'dequantizing with plain torch kernels', file=sys.stderr)
        return False
    return True


_CODES = {}


def nf4_code(device):
    if device not in _CODES:
        _CODES[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return _CODES[device]


_PAIR_TABLES = {}


def _nf4_pairs(device):
    """[256] int64: the two NF4 float32 values a byte holds (high nibble's first in memory), as one word."""
    if device not in _PAIR_TABLES:
        code = torch.tensor(NF4_CODE, dtype=torch.float32)
        byte = torch.arange(256)
        pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1)  # [256, 2] float32
        _PAIR_TABLES[device] = pairs.view(torch.int64).view(256).to(device)
    return _PAIR_TABLES[device]


# --- double quantization of the absmax ----------------------------------------------------------

def dynamic_map():
    """The signed dynamic 8-bit map (Dettmers' dynamic tree quantization, 7 exponent bits), sorted:
    for exponent e = 0..6, the midpoints of 2**e + 1 evenly spaced points in [0.1, 1], times 10**(e - 6),
    both signs; then 0 and 1. 256 float32 values."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2
        values += (10 ** (e - 6) * mids).tolist() + (-(10 ** (e - 6)) * mids).tolist()  # products in float32
    return torch.tensor(sorted(values), dtype=torch.float32)


_DYNAMIC_MAPS = {}


def _dynamic_map(device):
    if device not in _DYNAMIC_MAPS:
        _DYNAMIC_MAPS[device] = dynamic_map().to(device)
    return _DYNAMIC_MAPS[device]


def quantize_absmax(absmax):
    """absmax float32 [blocks] -> {'absmax': uint8 [blocks], 'absmax_scale', 'absmax_offset'}."""
    offset = absmax.mean()
    scaled, scale = _scaled_blocks(absmax - offset, ABSMAX_BLOCK)
    codes = _nearest(scaled, dynamic_map().to(absmax.device)).to(torch.uint8)
    return {'absmax': codes, 'absmax_scale': scale, 'absmax_offset': offset.reshape(1)}


def dequantize_absmax(codes, scale, offset, positions=None):
    """Codes -> float32 absmax: each a map value times its block of 256's scale, plus the offset.
    positions: where `codes` sit in the whole array, when they are some rows of a table read a row at
    a time (the same products)."""
    values = torch.index_select(_dynamic_map(codes.device), 0, codes.int())
    if positions is not None:
        return values * scale[positions // ABSMAX_BLOCK] + offset
    n, full = values.numel(), values.numel() - values.numel() % ABSMAX_BLOCK
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    out[:full] = (values[:full].view(-1, ABSMAX_BLOCK) * scale[:full // ABSMAX_BLOCK, None]).reshape(-1)
    if full < n:
        out[full:] = values[full:] * scale[-1]
    return out + offset


# --- int8 (Q8_0) -------------------------------------------------------------------------------

def _round_half_away(x):
    """Round to nearest, halves away from zero, computed as llama.cpp's reference does (floor of |x|
    plus floor of twice the fraction), which adding 0.5 would not always match."""
    a = x.abs()
    whole = a.floor()
    return x.sign() * (whole + (2 * (a - whole)).floor())


def q8_0_quantize(weight):
    """weight [rows, cols] (cols a multiple of 32) -> uint8 [rows, cols / 32 * 34]."""
    rows, cols = weight.shape
    blocks = weight.detach().float().reshape(rows, cols // Q8_BLOCK, Q8_BLOCK)
    scale = blocks.abs().amax(dim=2, keepdim=True) / 127  # [rows, blocks, 1]
    inverse = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    codes = _round_half_away(blocks * inverse).to(torch.int8)
    packed = torch.cat([scale.half().view(torch.uint8), codes.view(torch.uint8)], dim=2)  # [rows, blocks, 34]
    return packed.reshape(rows, -1)


def q8_0_dequantize(qweight, shape, out=None, dtype=torch.float32):
    """uint8 [rows, cols / 32 * 34] -> [rows, cols] (new, of `dtype`, or written into `out`): int8
    code * fp16 scale, multiplied in float32."""
    rows, cols = shape
    blocks = qweight.view(rows, cols // Q8_BLOCK, Q8_BLOCK_BYTES)
    scale = blocks[:, :, :2].view(torch.float16).float()  # [rows, blocks, 1]
    codes = blocks[:, :, 2:].view(torch.int8)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=qweight.device)
    torch.mul(codes.float(), scale, out=out.view(rows, cols // Q8_BLOCK, Q8_BLOCK))
    return out
