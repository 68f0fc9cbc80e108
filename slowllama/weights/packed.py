"""Blocks whose projection weights are packed (prepare --quant): the names of the packed parts in a
block file, the layout of such a file, and unpacking on the compute device into reused buffers.

A packed projection 'self_attn.q_proj.weight' is stored as 'self_attn.q_proj.qweight' (+
'self_attn.q_proj.absmax' ... for nf4); its shape is the config's. Only the prepared writer, the
store and export read this module: the engine always gets plain weights.
"""
import sys

import torch

from ..errors import SlowLlamaError
from ..model import kernels
from ..model.names import EMBED_TENSOR, HEAD_TENSOR, is_projection
from ..model.quant import (NF4_BLOCK, Quant, check_quantizable, dequantize, dequantize_absmax, nf4_code,
                           nf4_dequantize, packed_layout, q8_0_dequantize, quantize)


def part_name(weight_name, part):
    """('self_attn.q_proj.weight', 'qweight') -> 'self_attn.q_proj.qweight'."""
    return weight_name.removesuffix('.weight') + '.' + part


def is_packed(name, quant):
    return quant is not None and (is_projection(name) or (quant.head and name in (EMBED_TENSOR, HEAD_TENSOR)))


def file_layout(shapes, quant: Quant | None, dtype):
    """{name in a block file: (shape, dtype)}: the packed parts of the projections, and the other
    tensors (all of them without quant) in `dtype`."""
    layout = {}
    for name, shape in shapes.items():
        if is_packed(name, quant):
            layout.update({part_name(name, part): v for part, v in packed_layout(shape, quant).items()})
        else:
            layout[name] = (tuple(shape), dtype)
    return layout


def pack_block(tensors, quant: Quant, source, rows=False):
    """{weight name: float tensor, or {part: tensor} packed already} -> {name in the file: tensor}."""
    out = {}
    for name, tensor in tensors.items():
        if not is_packed(name, quant):
            out[name] = tensor
            continue
        if not isinstance(tensor, dict):
            check_quantizable(tuple(tensor.shape), quant, f'{source}: {name}', rows)
            tensor = quantize(tensor, quant)
        out.update({part_name(name, part): t for part, t in tensor.items()})
    return out


def check_file_layout(path, file, layout):
    """A block file holds exactly the tensors of `layout`, with their shapes and dtypes (a packed
    part whose size does not match its weight's shape is refused here, before any read)."""
    names = set(file.names())
    if names != set(layout):
        missing, extra = sorted(set(layout) - names), sorted(names - set(layout))
        raise SlowLlamaError(f'{path}: tensors do not match the manifest (missing {missing[:2]}, '
                             f'unexpected {extra[:2]}); run prepare_model.py again')
    for name, (shape, dtype) in layout.items():
        got = (file.shape(name), file.entries[name]['dtype'])
        if got[0] != tuple(shape) or got[1] != _safetensors_dtype(dtype):
            raise SlowLlamaError(f'{path}: {name} is {got[1]} {list(got[0])}, its weight\'s shape needs '
                                 f'{_safetensors_dtype(dtype)} {list(shape)}; run prepare_model.py again')


def _safetensors_dtype(dtype):
    from .files import SAFETENSORS_DTYPES
    return {v: k for k, v in SAFETENSORS_DTYPES.items()}[dtype]


def expert_parts(layout, n_experts):
    """[names in a block file of expert e, for each e]: a MoE block's experts, each fetched alone."""
    parts = [[] for _ in range(n_experts)]
    for name in layout:
        if name.startswith('mlp.experts.'):
            parts[int(name.split('.')[2])].append(name)
    return parts


def unpack_block(tensors, shapes, quant: Quant, out=None, dtype=torch.float32):
    """{name in the file: tensor} -> {weight name: tensor} on the tensors' device; the projections
    dequantized into `out` ({weight name: buffer}) or, without it, as new tensors of `dtype`."""
    block = {}
    for name, shape in shapes.items():
        if not is_packed(name, quant):
            block[name] = tensors[name]
            continue
        parts = {part: tensors[part_name(name, part)] for part in packed_layout(shape, quant)}
        block[name] = dequantize(parts, shape, quant, None if out is None else out[name], dtype)
    return block


def unpack_rows(tensors, name, shape, quant: Quant, rows, device, dtype):
    """Rows of a packed [vocab, dim] table (embeddings, head; nf4 blocks never cross its rows) as a
    new [rows, dim] tensor of `dtype` on `device`. rows: (start, end), or a LongTensor of indices.
    Only those rows' bytes are read and travel; they are unpacked on `device`."""
    vocab, dim = shape
    parts = {part: tensors[part_name(name, part)] for part in packed_layout(shape, quant)}
    span = isinstance(rows, tuple)
    pick = (lambda t: t[rows[0]:rows[1]]) if span else (lambda t: t.index_select(0, rows.to(t.device)))
    count = rows[1] - rows[0] if span else rows.numel()
    if quant.type == 'int8':
        return q8_0_dequantize(pick(parts['qweight']).to(device), (count, dim), dtype=dtype)
    per_row = dim // NF4_BLOCK
    qweight = pick(parts['qweight'].view(vocab, dim // 2)).to(device)
    if not quant.double_quant:
        absmax = pick(parts['absmax'].view(vocab, per_row)).to(device)
    else:  # each absmax code with its own block of 256's scale
        codes = pick(parts['absmax'].view(vocab, per_row)).to(device)
        if span:
            positions = torch.arange(rows[0] * per_row, rows[1] * per_row, device=device)
        else:
            positions = (rows.to(device)[:, None] * per_row + torch.arange(per_row, device=device)).reshape(-1)
        absmax = dequantize_absmax(codes.reshape(-1), parts['absmax_scale'].to(device),
                                   parts['absmax_offset'].to(device), positions)
    return nf4_dequantize(qweight.reshape(-1), absmax.reshape(-1), (count, dim), dtype=dtype)


class Unpacker:
    """Dequantizes packed blocks on the compute device into two reused sets of buffers, one for the
    block in use and one for the block after it. A third block held at once (only whole-model
    readers do that) gets buffers of its own."""

    def __init__(self, shapes, quant: Quant, device, dtype):
        self.shapes, self.quant, self.device, self.dtype = shapes, quant, device, dtype
        self._pool = [self._buffers(), self._buffers()]
        if quant.type == 'nf4' and torch.device(device).type == 'cpu':
            _hint_cpu_library()

    def unpack(self, tensors):
        """-> (buffers to hand back with release(), {weight name: tensor}). `shapes`: what every pass
        of a block unpacks (a MoE block's experts are unpacked apart, as they are fetched)."""
        buffers = self._pool.pop() if self._pool else self._buffers()
        try:
            return buffers, unpack_block(tensors, self.shapes, self.quant, buffers)
        except BaseException:  # the buffers stay in the pool for the next pass
            self.release(buffers)
            raise

    def release(self, buffers):
        if buffers is not None and len(self._pool) < 2:
            self._pool.append(buffers)

    def _buffers(self):
        return {name: torch.empty(shape, device=self.device, dtype=self.dtype)
                for name, shape in self.shapes.items() if is_packed(name, self.quant)}


_HINTED = []


def _hint_cpu_library():
    """One line, once, where nf4 unpacks on a cpu without bitsandbytes' kernel."""
    why = kernels.cpu_library_status(nf4_code(torch.device('cpu')))
    if why and kernels.enabled() and not _HINTED:
        _HINTED.append(why)
        low, high = (f'{major}.{minor}' for major, minor in kernels.BITSANDBYTES_CHECKED)
        print(f"slowllama: {why}; nf4 unpacks about 5x faster on a cpu with bitsandbytes >={low},<{high} "
              f"(pip install 'slowllama[qlora]')", file=sys.stderr)
