"""GGUF files (llama.cpp): llama, qwen2, qwen3, phi3, smollm3, granite, olmo2, gemma2 and gemma3
architectures, float or quantized, read into a prepared folder.

Tensors are dequantized with the `gguf` package one at a time, read with plain file reads (not the
reader's memory map) so RAM holds one block. GGUF lists shapes innermost first (ggml's `ne`), so
they are reversed; for the llama architecture q/k are in Meta's interleaved rope layout (llama.cpp
permutes them) and are un-permuted with n_heads (q) and n_kv_heads (k); the others keep HF's. Phi-3's
fused attn_qkv and ffn_up (gate and up) are split as the HF folder's are. llama.cpp stores Gemma's
norm weights plus one (it folds Gemma's (1 + w) in); we keep w, as transformers does. What llama.cpp
hardcodes per architecture rather than writing (Gemma's layer pattern and query scale, SmolLM3's
layers without rope) is filled in as llama.cpp does. The tokenizer comes from the metadata.
"""
import math
import mmap
import os
import struct

import numpy as np
import torch

from ...errors import SlowLlamaError
from ...model.block import block_shapes
from ...model.config import ModelConfig, config_errors
from ...model.names import EMBED_TENSOR, HEAD_TENSOR, NORM_TENSOR, PROJECTION_WEIGHTS, block_tensor_names
from ...progress import progress
from ...tokenizer.gguf_tokenizer import metadata, tokenizer_files
from .experts import is_expert_tensor, read_gguf_experts
from .layout import block_to_hf, split_fused, unfused_names
from .names import (
    FAMILY_FIELDS,
    GGUF_ARCHITECTURES,
    GGUF_BLOCK_PREFIX,
    GGUF_EXPERT_FAMILIES,
    GGUF_FUSED,
    GGUF_NORMS_PLUS_ONE,
    GGUF_ROPE_FREQS,
    LAYERED_FAMILIES,
    OUTER_TENSORS,
    WINDOWED_FAMILIES,
    gguf_block_name,
)

ARCHITECTURES = tuple(GGUF_ARCHITECTURES)
# ModelConfig field -> GGUF metadata key (after '{architecture}.')
CONFIG_KEYS = {
    'dim': 'embedding_length', 'n_layers': 'block_count', 'n_heads': 'attention.head_count',
    'n_kv_heads': 'attention.head_count_kv', 'hidden_dim': 'feed_forward_length',
    'norm_eps': 'attention.layer_norm_rms_epsilon', 'rope_theta': 'rope.freq_base',
    'max_seq_len': 'context_length', 'head_dim': 'attention.key_length',
    'sliding_window': 'attention.sliding_window',
}
LONGROPE_TENSORS = ('rope_factors_long.weight', 'rope_factors_short.weight')
REQUIRED = ('dim', 'n_layers', 'n_heads', 'hidden_dim')
LLAMA3_ROPE_DEFAULTS = {'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}


def is_gguf_file(src):
    if not os.path.isfile(src):
        return False
    with open(src, 'rb') as f:
        return f.read(4) == b'GGUF'


def check_header(path):
    """Refuse counts no file of this size could hold, before the reader allocates anything."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(24)
    if len(head) < 24:
        raise SlowLlamaError(f'{path}: truncated GGUF file ({size} bytes)')
    version, n_tensors, n_values = struct.unpack('<IQQ', head[4:24])
    if version not in (2, 3):
        raise SlowLlamaError(f'{path}: GGUF version {version} is not supported (2 or 3)')
    # a tensor entry takes at least 32 bytes (name length, dims, one dim, type, offset), a value 13
    if 24 + n_tensors * 32 + n_values * 13 > size:
        raise SlowLlamaError(f'{path}: corrupt GGUF header ({n_tensors} tensors and {n_values} values '
                             f'cannot fit in {size} bytes)')


# GGUF value type -> size in bytes of a scalar of it (8: string, 9: array)
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


def check_metadata(path):
    """Walk the key-value section before the gguf reader does: every string length and array count
    must fit in the file (the reader loops over an array's claimed count even past the file's end)."""
    with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        n_values = struct.unpack_from('<Q', data, 16)[0]
        offset = 24
        for _ in range(n_values):
            offset = _skip_string(data, offset, path)
            offset = _skip_value(data, offset + 4, _u(data, offset, '<I', path), path)


def _u(data, offset, fmt, path):
    if offset + struct.calcsize(fmt) > len(data):
        raise SlowLlamaError(f'{path}: corrupt GGUF metadata (runs past the end of the file)')
    return struct.unpack_from(fmt, data, offset)[0]


def _skip_string(data, offset, path):
    end = offset + 8 + _u(data, offset, '<Q', path)
    if end > len(data):
        raise SlowLlamaError(f'{path}: corrupt GGUF metadata (a string runs past the end of the file)')
    return end


def _skip_value(data, offset, kind, path, depth=0):
    if depth > 4:  # llama.cpp writes arrays of scalars and strings only
        raise SlowLlamaError(f'{path}: corrupt GGUF metadata (arrays nested {depth} deep)')
    if kind in SCALAR_SIZES:
        return offset + SCALAR_SIZES[kind]
    if kind == STRING:
        return _skip_string(data, offset, path)
    if kind != ARRAY:
        raise SlowLlamaError(f'{path}: corrupt GGUF metadata (value type {kind})')
    item, count = _u(data, offset, '<I', path), _u(data, offset + 4, '<Q', path)
    offset += 12
    if count * SCALAR_SIZES.get(item, 8) > len(data) - offset:  # strings and arrays take 8 bytes at least
        raise SlowLlamaError(f'{path}: corrupt GGUF metadata (an array of {count} items cannot fit in the file)')
    if item in SCALAR_SIZES:
        return offset + count * SCALAR_SIZES[item]
    for _ in range(count):
        offset = _skip_value(data, offset, item, path, depth + 1)
    return offset


def open_reader(path):
    import gguf
    check_header(path)
    check_metadata(path)
    try:
        return gguf.GGUFReader(path, 'r')
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as e:
        raise SlowLlamaError(f'{path}: truncated or corrupt GGUF file ({e})') from None


def read_config(src, reader=None):
    reader = reader or open_reader(src)
    arch = metadata(reader, 'general.architecture')
    if arch not in ARCHITECTURES:
        raise SlowLlamaError(f'{src}: architecture {arch!r} is not supported (only {", ".join(ARCHITECTURES)})')
    values = {field: metadata(reader, f'{arch}.{key}') for field, key in CONFIG_KEYS.items()}
    values = {k: v for k, v in values.items() if v is not None}
    missing = [CONFIG_KEYS[k] for k in REQUIRED if k not in values]
    if missing:
        raise SlowLlamaError(f'{src}: GGUF metadata lacks {arch}.{missing[0]}')
    tensors = {t.name: t for t in reader.tensors}
    embed = tensors.get(OUTER_TENSORS[EMBED_TENSOR][1])
    if embed is None:
        raise SlowLlamaError(f'{src}: no {OUTER_TENSORS[EMBED_TENSOR][1]} tensor')
    if any(name in tensors for name in LONGROPE_TENSORS):
        raise SlowLlamaError(f'{src}: LongRoPE factors in a GGUF file are not read; prepare the Hugging Face folder')
    model_type = GGUF_ARCHITECTURES[arch][0]
    experts = _gguf_experts(reader, arch)
    model_type = GGUF_EXPERT_FAMILIES[arch] if experts else model_type
    if model_type not in WINDOWED_FAMILIES + LAYERED_FAMILIES:
        values.pop('sliding_window', None)
    with config_errors(src):
        values['rope_scaling'] = _llama3_scaling(src, tensors, values) or _scaling_metadata(src, reader, arch)
        values.update(_family_fields(reader, arch, values))
        return ModelConfig(**values, **experts, vocab_size=int(embed.shape[1]), model_type=model_type,
                           **FAMILY_FIELDS.get(model_type, {}),
                           tie_embeddings=OUTER_TENSORS[HEAD_TENSOR][1] not in tensors,
                           bos_id=metadata(reader, 'tokenizer.ggml.bos_token_id'),
                           eos_id=metadata(reader, 'tokenizer.ggml.eos_token_id'))


def _family_fields(reader, arch, values):
    """The ModelConfig fields of issue 35's families: llama.cpp's keys for them, and what it hardcodes."""
    def key(name, default=None):
        return metadata(reader, f'{arch}.{name}', default)
    n, fields = values['n_layers'], {}
    if arch == 'smollm3':  # llama.cpp: every fourth layer has no rope (no key says so)
        fields['no_rope_layers'] = [int((i + 1) % 4 != 0) for i in range(n)]
    if arch == 'granite':
        fields.update(attn_scale=key('attention.scale'), embed_multiplier=key('embedding_scale', 1.0),
                      residual_multiplier=key('residual_scale', 1.0), logits_scaling=key('logit_scale', 1.0))
    if arch in ('gemma2', 'gemma3'):
        pattern = key('attention.sliding_window_pattern', 2 if arch == 'gemma2' else 6)
        sliding = list(pattern) if isinstance(pattern, list) else [bool((i + 1) % pattern) for i in range(n)]
        # llama.cpp: the 27B models scale queries by hidden / heads, the others by head_dim
        big = n == (46 if arch == 'gemma2' else 62)
        head_dim = values['dim'] // values['n_heads'] if big else values.get('head_dim') or values['dim'] // values['n_heads']
        fields.update(layer_types=['sliding_attention' if s else 'full_attention' for s in sliding],
                      attn_scale=head_dim ** -0.5, embed_multiplier=values['dim'] ** 0.5,
                      attn_softcap=key('attn_logit_softcapping'), final_softcap=key('final_logit_softcapping'))
    if arch == 'gemma3':
        fields['rope_local_theta'] = float(key('rope.freq_base_swa', 10000.0))
    return fields


def _gguf_experts(reader, arch):
    """ModelConfig's expert fields from {arch}.expert_count and friends (none: dense)."""
    count = metadata(reader, f'{arch}.expert_count') or 0
    if not count:
        return {}
    if arch not in GGUF_EXPERT_FAMILIES:
        raise SlowLlamaError(f'architecture {arch!r} with experts is not supported')
    hidden = metadata(reader, f'{arch}.expert_feed_forward_length') or metadata(reader, f'{arch}.feed_forward_length')
    norm = metadata(reader, f'{arch}.expert_weights_norm')
    return {'n_experts': int(count), 'experts_per_token': int(metadata(reader, f'{arch}.expert_used_count') or 0),
            'expert_hidden_dim': int(hidden or 0), 'router_aux_loss_coef': 0.001,
            # mixtral always renormalises; llama.cpp's qwen3moe does unless the file says otherwise
            'norm_topk_prob': True if arch == 'llama' or norm is None else bool(norm)}


def prepare_gguf(src, writer):
    cfg, reader = writer.cfg, open_reader(src)
    tensors = {t.name: t for t in reader.tensors}
    arch = metadata(reader, 'general.architecture')
    interleaved, fused, shapes = GGUF_ARCHITECTURES[arch][1], GGUF_FUSED.get(arch, {}), block_shapes(cfg)
    with open(src, 'rb') as f:
        def get(gguf_name):
            if gguf_name not in tensors:
                raise SlowLlamaError(f'{src}: tensor {gguf_name} missing')
            tensor = read_tensor(src, f, tensors[gguf_name])
            if arch in GGUF_NORMS_PLUS_ONE and gguf_name.endswith('norm.weight'):
                tensor -= 1.0  # gemma: llama.cpp stores 1 + w
            return tensor

        def carried(gguf_name, ours):  # Q8_0 into an int8 model: its bytes as they are, not re-quantized
            return (writer.quant is not None and writer.quant.type == 'int8' and ours in PROJECTION_WEIGHTS
                    and tensors[gguf_name].tensor_type.name == 'Q8_0')

        writer.write_embed(get(OUTER_TENSORS[EMBED_TENSOR][1]))
        for i in progress(range(cfg.n_layers), desc='prepare blocks', unit='block'):
            prefix = GGUF_BLOCK_PREFIX.format(i=i)
            names = {ours: prefix + gguf_block_name(ours, cfg)
                     for ours in unfused_names(block_tensor_names(cfg), fused) if not is_expert_tensor(ours)}
            raw = {ours for ours, name in names.items() if name in tensors and carried(name, ours)}
            block = {ours: read_raw(src, f, tensors[name]) if ours in raw else get(name)
                     for ours, name in names.items()}
            block.update({name: get(prefix + name) for name in fused})  # fused ones are dequantized, then split
            if cfg.n_experts:  # the router and each expert out of llama.cpp's 3D expert tensors
                block.update(read_gguf_experts(cfg, prefix, tensors, get, src))
            block = split_fused(block, fused, shapes, f'{src}: layer {i}')
            if interleaved:
                block = block_to_hf(block, cfg)  # whole rows move, so Q8_0's rows of bytes un-permute as values do
            writer.write_block(i, {ours: {'qweight': t} if ours in raw else t for ours, t in block.items()})
        head = None if cfg.tie_embeddings else get(OUTER_TENSORS[HEAD_TENSOR][1])
        writer.write_head(get(OUTER_TENSORS[NORM_TENSOR][1]), head)
    for name, data in tokenizer_files(reader, src).items():
        writer.add_tokenizer_file(name, data)


def read_raw(path, f, tensor):
    """A quantized tensor's bytes as the file holds them: uint8 [rows, bytes per row]."""
    raw = bytearray(tensor.n_bytes)
    f.seek(tensor.data_offset)
    if f.readinto(raw) != tensor.n_bytes:
        raise SlowLlamaError(f'{path}: truncated GGUF file: {tensor.name} ends past the end of the file')
    return torch.frombuffer(raw, dtype=torch.uint8).reshape(tuple(int(d) for d in tensor.data.shape))


def read_tensor(path, f, tensor):
    """One tensor, dequantized to float32, in torch's [rows, cols] order."""
    import gguf
    raw = bytearray(tensor.n_bytes)
    f.seek(tensor.data_offset)
    if f.readinto(raw) != tensor.n_bytes:
        raise SlowLlamaError(f'{path}: truncated GGUF file: {tensor.name} ends past the end of the file')
    data = np.frombuffer(raw, dtype=tensor.data.dtype).reshape(tensor.data.shape)
    try:
        values = gguf.quants.dequantize(data, tensor.tensor_type)
    except NotImplementedError:
        raise SlowLlamaError(f'{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which cannot '
                             'be dequantized (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K- and '
                             'IQ-quants can)') from None
    shape = tuple(reversed([int(d) for d in tensor.shape]))
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _llama3_scaling(src, tensors, values):
    """Llama-3.1-style files carry the rope frequency divisors as a tensor; recover the factor."""
    if GGUF_ROPE_FREQS not in tensors:
        return None
    with open(src, 'rb') as f:
        divisors = read_tensor(src, f, tensors[GGUF_ROPE_FREQS]).double()
    scaling = {'factor': float(divisors.max()), **LLAMA3_ROPE_DEFAULTS}
    head_dim = values.get('head_dim') or values['dim'] // values['n_heads']
    expected = llama3_divisors(head_dim, values.get('rope_theta', 10000.0), scaling)
    if expected.shape != divisors.shape or not torch.allclose(expected, divisors, rtol=1e-3):
        raise SlowLlamaError(f'{src}: {GGUF_ROPE_FREQS} does not follow the Llama-3 rope scaling rule; '
                             'this rope scaling is not supported')
    return scaling


def _scaling_metadata(src, reader, arch):
    """rope.scaling.type from the metadata: none, or linear with its factor; others are refused."""
    kind = metadata(reader, f'{arch}.rope.scaling.type', 'none')
    if kind == 'none':
        return None
    if kind == 'linear':
        return {'rope_type': 'linear', 'factor': float(metadata(reader, f'{arch}.rope.scaling.factor'))}
    raise SlowLlamaError(f'{src}: rope scaling {kind!r} is not supported (none and linear are)')


def llama3_divisors(head_dim, theta, scaling):
    """The per-frequency divisors Llama-3 applies to rope (as llama.cpp's rope_freqs stores them)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    factor, low, high = scaling['factor'], scaling['low_freq_factor'], scaling['high_freq_factor']
    original = scaling['original_max_position_embeddings']
    wavelen = 2 * math.pi / freqs
    smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)
    divisors = 1.0 / ((1 - smooth) / factor + smooth)
    divisors[wavelen < original / high] = 1.0
    divisors[wavelen > original / low] = factor
    return divisors
