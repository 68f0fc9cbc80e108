"""The two tiny llama models behind tests/fixtures/llama_cpp_quants.npz: their shapes, their weights
(regenerated from a seed, checked against the hashes the fixture keeps) and the f32 GGUF llama.cpp
quantized. Shared by scripts/make_gguf_quant_fixture.py (which made the fixture once, with
llama-cpp-python) and tests/test_gguf_quants.py."""
import hashlib
import os
import zlib

import numpy as np

# 'untied': 8 layers, GQA 2, an output head. 'tied': 16 layers (Q3_K_M's first sixteenth), GQA 4, no
# output.weight, and ffn_down rows of 320 values, which no K-quant takes (llama.cpp's fallbacks).
MODELS = {
    'untied': dict(n_layers=8, dim=256, hidden=512, heads=4, kv_heads=2, vocab=256, tied=False, seed=1),
    'tied': dict(n_layers=16, dim=256, hidden=320, heads=4, kv_heads=1, vocab=192, tied=True, seed=2),
    # 80 layers with GQA: llama.cpp's "70B", whose attn_v never goes below Q5_K (types only, no bytes kept)
    'deep': dict(n_layers=80, dim=256, hidden=256, heads=4, kv_heads=1, vocab=32, tied=False, seed=3, sample=False),
}
SCHEMES = ('q4_k_m', 'q5_k_m', 'q6_k', 'q4_k_s', 'q5_k_s', 'q3_k_m', 'q4_0', 'q5_0')
# the tensors whose bytes the fixture keeps (their first SAMPLED_ROWS rows) under every scheme
SAMPLED = ('token_embd.weight', 'output.weight', 'blk.0.attn_v.weight', 'blk.1.attn_v.weight',
           'blk.0.ffn_down.weight', 'blk.1.ffn_down.weight', 'blk.2.attn_q.weight', 'blk.2.attn_output.weight')
SAMPLED_ROWS = 16
BLOCK = ('attn_norm', 'attn_q', 'attn_k', 'attn_v', 'attn_output', 'ffn_norm', 'ffn_gate', 'ffn_up', 'ffn_down')


def shapes(spec):
    """{GGUF name: (rows, row length)} in file order; norms are 1-D."""
    d, h, kv = spec['dim'], spec['hidden'], spec['dim'] // spec['heads'] * spec['kv_heads']
    block = {'attn_norm': (d,), 'attn_q': (d, d), 'attn_k': (kv, d), 'attn_v': (kv, d), 'attn_output': (d, d),
             'ffn_norm': (d,), 'ffn_gate': (h, d), 'ffn_up': (h, d), 'ffn_down': (d, h)}
    out = {'token_embd.weight': (spec['vocab'], d)}
    for i in range(spec['n_layers']):
        out.update({f'blk.{i}.{name}.weight': block[name] for name in BLOCK})
    out['output_norm.weight'] = (d,)
    if not spec['tied']:
        out['output.weight'] = (spec['vocab'], d)
    return out


def weights(spec, name, shape):
    """float32 values like a trained model's: per-row scales over two decades, heavy tails, a few
    outliers; and the corner cases: an all-zero 64-value stretch, a constant 32-value group."""
    rng = np.random.default_rng([spec['seed'], zlib.crc32(name.encode())])
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    rows, cols = shape
    scale = 0.05 * np.exp(rng.uniform(-2.3, 0.0, size=(rows, 1)))
    x = rng.standard_t(4, size=shape) * scale
    outliers = rng.random(shape) < 1e-3
    x[outliers] *= 8
    x[0, :64] = 0
    x[1, 32:64] = x[1, 32]
    x[2, :32] = -abs(x[2, :32])  # a group with no positive value (its min is its most negative)
    return x.astype(np.float32)


def digest(values):
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float32).tobytes()).hexdigest()[:16]


def llama_cpp_quantize(src, dst, scheme):
    """llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize), no importance matrix."""
    import ctypes
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f'LLAMA_FTYPE_MOSTLY_{scheme.upper()}')
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f'llama_model_quantize failed on {src} -> {scheme}')
    return dst


def ggml_quantize(rows, kind):
    """ggml_quantize_chunk from llama-cpp-python's own libggml-base: rows [n, k] float32 -> bytes."""
    import ctypes
    import glob

    import gguf
    import llama_cpp
    folder = os.path.join(os.path.dirname(llama_cpp.__file__), 'lib')
    lib = ctypes.CDLL(sorted(glob.glob(os.path.join(folder, 'libggml-base.so*')))[0])
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = np.zeros((rows.shape[0], rows.shape[1] // block * size), dtype=np.uint8)
    lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None)
    return out


def write_f32_gguf(path, spec):
    """The model as an f32 GGUF llama.cpp's quantizer reads (hyper-parameters, no vocabulary)."""
    import gguf
    writer = gguf.GGUFWriter(str(path), 'llama')
    writer.add_block_count(spec['n_layers'])
    writer.add_context_length(256)
    writer.add_embedding_length(spec['dim'])
    writer.add_feed_forward_length(spec['hidden'])
    writer.add_head_count(spec['heads'])
    writer.add_head_count_kv(spec['kv_heads'])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(spec['dim'] // spec['heads'])
    writer.add_vocab_size(spec['vocab'])
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    for name, shape in shapes(spec).items():
        writer.add_tensor(name, weights(spec, name, shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
