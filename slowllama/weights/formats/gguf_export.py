"""Write GGUF for llama.cpp / Ollama: the merged model as one file, or the LoRA adapter alone.

The model file: llama.cpp's tensor names (names.py), q/k back in the rope-interleaved rows llama.cpp
expects for the architectures it converts as Llama (layout.py), Gemma's norm weights plus one as
llama.cpp stores them, the hyper-parameters under the keys our GGUF reader reads (gguf.CONFIG_KEYS),
and the tokenizer (gguf_vocab.py). A Mixture-of-Experts block (qwen3moe; Mixtral as architecture llama
with an expert count) is written as llama.cpp holds it: the router as ffn_gate_inp (kept f32), each
projection of every expert in one 3D ffn_{gate,up,down}_exps (experts.py). GGUF lists every tensor before any data, so the tensor table is
built from the config alone; then the tensors are merged and written one at a time, so RAM holds one
block. Matrices take the chosen type (f32 / f16 / bf16 / q8_0), or in a llama.cpp quantization scheme
(q4_k_m, q5_k_m, q6_k, ...) the type llama.cpp's own quantizer would give each one (gguf_mixture.py),
encoded as its reference quantizer encodes it (gguf_quants.py); norms stay f32, as llama.cpp keeps
them, and a matrix whose rows do not split into its type's blocks falls back (q8_0 to f16; the
schemes as llama.cpp falls back), the export naming each one that did.

The adapter file (`general.type = adapter`): per target `blk.N.<tensor>.lora_a` = A [rank, in] and
`.lora_b` = B [out, rank], B's rows permuted like the weight's for q/k (B A then has the weight's
layout), and `adapter.lora.alpha`; llama.cpp scales by alpha / rank as PEFT does.

Both are written under a temporary name beside the output and renamed into place when complete.
"""
import contextlib
import os

import numpy as np
import torch

from ...errors import SlowLlamaError
from ...model.block import block_shapes
from ...model.lora import peft_key
from ...model.names import (
    EMBED_TENSOR,
    HEAD_TENSOR,
    MOE_TARGETS,
    NORM_TENSOR,
    TARGET_MODULES,
    block_tensor_names,
)
from ...progress import progress
from ...tokenizer.gguf_vocab import vocab_metadata
from ..files import commit_staged, discard_staged, temporary_beside
from ..prepared import check_free_space
from .experts import gguf_expert_shapes, gguf_expert_tensors, is_expert_tensor
from .gguf import CONFIG_KEYS, llama3_divisors
from .gguf_mixture import SCHEMES, tensor_types
from .gguf_quants import quantize as quantize_rows
from .layout import block_to_meta, hf_to_meta
from .names import (
    GGUF_ARCHITECTURES,
    GGUF_BLOCK_PREFIX,
    GGUF_EXPERT_FAMILIES,
    GGUF_LORA_SUFFIXES,
    GGUF_NORMS_PLUS_ONE,
    GGUF_ROPE_FREQS,
    GGUF_ROUTER,
    OUTER_TENSORS,
    ROPE_PERMUTED,
    gguf_block_name,
)

# The families written: model_type -> llama.cpp's architecture (the inverse of GGUF_ARCHITECTURES)
WRITTEN = ('llama', 'smollm3', 'granite', 'olmo2', 'gemma2', 'gemma3_text', 'qwen3_moe')
ARCHITECTURES = {model_type: arch for arch, (model_type, _) in GGUF_ARCHITECTURES.items() if model_type in WRITTEN}
ARCHITECTURES['mixtral'] = next(arch for arch, family in GGUF_EXPERT_FAMILIES.items() if family == 'mixtral')
GGUF_DTYPES = ('f32', 'f16', 'bf16', 'q8_0', *SCHEMES)
DTYPE_ALIASES = {'fp32': 'f32', 'float32': 'f32', 'fp16': 'f16', 'float16': 'f16', 'bfloat16': 'bf16',
                 'q4_k': 'q4_k_m', 'q5_k': 'q5_k_m', 'q3_k': 'q3_k_m'}  # llama-quantize's own short names
FILE_TYPES = {'f32': 'ALL_F32', 'f16': 'MOSTLY_F16', 'bf16': 'MOSTLY_BF16', 'q8_0': 'MOSTLY_Q8_0',
              **{scheme: file_type for scheme, (_, file_type) in SCHEMES.items()}}  # general.file_type
DEFAULT_ADAPTER_DTYPE = 'f32'  # adapters are small; llama.cpp's own converter writes them in f32 too


def gguf_dtype(name, default):
    """--dtype for the GGUF formats: f32 | f16 | bf16 | q8_0 | a llama.cpp scheme (q4_k_m, ...);
    fp32 / fp16 spellings and upper case accepted."""
    name = (name or default).lower()
    name = DTYPE_ALIASES.get(name, name)
    if name not in GGUF_DTYPES:
        raise SlowLlamaError(f'dtype: {name!r} is not a GGUF type (use {", ".join(GGUF_DTYPES)})')
    return name


def write_gguf_model(merged, out, dtype, name=None):
    """The merged model (MergedWeights, read in fp32) as one llama.cpp GGUF file at `out`."""
    cfg = merged.cfg
    _check_supported(cfg)
    layout = model_layout(cfg, dtype)
    for note in fallbacks(cfg, dtype):
        print(f'gguf: {note}')
    metadata = {'general.type': 'model', 'general.name': name or os.path.basename(str(merged.model_dir)),
                'general.file_type': _file_type(dtype), 'general.quantization_version': _quant_version()}
    metadata.update(hyper_parameters(cfg))
    metadata.update(vocab_metadata(merged.model_dir, cfg.vocab_size))
    _write(out, metadata, layout, _model_tensors(merged), desc='write gguf', arch=ARCHITECTURES[cfg.model_type])
    return str(out)


def write_gguf_adapter(lora, state, cfg, out, dtype=DEFAULT_ADAPTER_DTYPE):
    """The LoRA adapter alone as a llama.cpp LoRA GGUF (load it with `llama-cli --lora`)."""
    _check_supported(cfg)
    moe = [target for target in lora.targets if target in MOE_TARGETS]
    if moe:
        raise SlowLlamaError(f'GGUF adapter: LoRA on {",".join(moe)} is not written as a llama.cpp adapter; '
                             '`export --format gguf` merges it into the model')
    if dtype in SCHEMES:
        raise SlowLlamaError(f'dtype {dtype}: a quantization scheme is for the merged model; a gguf-lora '
                             'adapter is written as f32, f16, bf16 or q8_0')
    layout = {name: (tuple(t.shape), _matrix_type(t.shape, dtype)) for name, t in _adapter_tensors(lora, state, cfg)}
    metadata = {'general.type': 'adapter', 'adapter.type': 'lora', 'adapter.lora.alpha': float(lora.alpha)}
    _write(out, metadata, layout, _adapter_tensors(lora, state, cfg), desc='write gguf adapter',
           arch=ARCHITECTURES[cfg.model_type])
    return str(out)


# --- what goes in -------------------------------------------------------------------------------

def hyper_parameters(cfg):
    """{'llama.…': value} from the config, under the same keys the GGUF reader reads."""
    arch = ARCHITECTURES[cfg.model_type]
    values = {f'{arch}.{key}': getattr(cfg, field) for field, key in CONFIG_KEYS.items()}
    values[f'{arch}.attention.value_length'] = cfg.head_dim
    values[f'{arch}.rope.dimension_count'] = cfg.head_dim
    values[f'{arch}.vocab_size'] = cfg.vocab_size
    values.update({f'{arch}.{key}': value for key, value in _family_values(cfg).items()})
    return values


def _family_values(cfg):
    """llama.cpp's keys for what issue 35's families add (gguf.py reads them back)."""
    values = {}
    if cfg.n_experts:  # llama.cpp's Mixtral reads its experts' width from feed_forward_length
        values.update({'expert_count': cfg.n_experts, 'expert_used_count': cfg.experts_per_token,
                       'expert_feed_forward_length' if cfg.model_type == 'qwen3_moe' else 'feed_forward_length':
                       cfg.expert_hidden_dim})
    if cfg.model_type == 'qwen3_moe':
        values['expert_weights_norm'] = cfg.norm_topk_prob
    if (cfg.rope_scaling or {}).get('rope_type') == 'linear':  # gemma3's full layers
        values.update({'rope.scaling.type': 'linear', 'rope.scaling.factor': float(cfg.rope_scaling['factor'])})
    if cfg.model_type == 'granite':
        values.update({'attention.scale': float(cfg.attn_scale or cfg.head_dim ** -0.5),
                       'embedding_scale': cfg.embed_multiplier, 'residual_scale': cfg.residual_multiplier,
                       'logit_scale': cfg.logits_scaling})
    if cfg.model_type in ('gemma2', 'gemma3_text'):
        values.update({'attn_logit_softcapping': cfg.attn_softcap, 'final_logit_softcapping': cfg.final_softcap,
                       'rope.freq_base_swa': cfg.rope_local_theta,
                       'attention.sliding_window_pattern': [t == 'sliding_attention' for t in cfg.layer_types]})
    return values


def model_layout(cfg, dtype):
    """{GGUF name: (shape in torch order, GGUF type)} in the order the tensors are written."""
    layout = _plain_layout(cfg, dtype)
    if dtype not in SCHEMES:
        return layout
    types, _ = _scheme_types(cfg, layout, dtype)
    return {name: (shape, types[name]) for name, (shape, _) in layout.items()}


def fallbacks(cfg, dtype):
    """One line for each matrix whose rows cannot take the type it was meant to have."""
    layout = _plain_layout(cfg, dtype)
    if dtype not in SCHEMES:
        return [f'{name}: rows of {shape[-1]} values do not split into q8_0 blocks of 32; written as f16'
                for name, (shape, kind) in layout.items() if dtype == 'q8_0' and len(shape) == 2 and kind == 'f16']
    return _scheme_types(cfg, layout, dtype)[1]


def _scheme_types(cfg, layout, scheme):
    shapes = {name: shape for name, (shape, _) in layout.items()}
    return tensor_types(shapes, scheme, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.n_experts)


def _plain_layout(cfg, dtype):
    table = (cfg.vocab_size, cfg.dim)
    layout = {OUTER_TENSORS[EMBED_TENSOR][1]: (table, _matrix_type(table, dtype))}
    if _llama3_rope(cfg):
        layout[GGUF_ROPE_FREQS] = ((cfg.head_dim // 2,), 'f32')
    shapes = block_shapes(cfg)
    for i in range(cfg.n_layers):
        prefix = GGUF_BLOCK_PREFIX.format(i=i)
        for ours in block_tensor_names(cfg):
            if not is_expert_tensor(ours):
                layout[prefix + gguf_block_name(ours, cfg)] = (shapes[ours], _matrix_type(shapes[ours], dtype))
        for name, shape in (gguf_expert_shapes(cfg) if cfg.n_experts else {}).items():
            # the router stays f32, as llama.cpp's converter writes it and its quantizer leaves it
            layout[prefix + name] = (shape, 'f32' if name == GGUF_ROUTER else _matrix_type(shape, dtype))
    layout[OUTER_TENSORS[NORM_TENSOR][1]] = ((cfg.dim,), 'f32')
    if not cfg.tie_embeddings:  # llama.cpp falls back to token_embd when output.weight is absent
        layout[OUTER_TENSORS[HEAD_TENSOR][1]] = (table, _matrix_type(table, dtype))
    return layout


def _model_tensors(merged):
    """(GGUF name, fp32 tensor in llama.cpp's layout), one at a time, in model_layout's order."""
    cfg = merged.cfg
    arch = ARCHITECTURES[cfg.model_type]
    plus_one = 1.0 if arch in GGUF_NORMS_PLUS_ONE else 0.0  # gemma: llama.cpp stores 1 + w
    yield OUTER_TENSORS[EMBED_TENSOR][1], merged.embed()
    if _llama3_rope(cfg):
        yield GGUF_ROPE_FREQS, llama3_divisors(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).float()
    for i in range(cfg.n_layers):
        block = merged.block(i)
        if GGUF_ARCHITECTURES[arch][1]:  # converted as Llama: q/k rope-interleaved
            block = block_to_meta(block, cfg)
        prefix = GGUF_BLOCK_PREFIX.format(i=i)
        for ours in block_tensor_names(cfg):
            if not is_expert_tensor(ours):
                tensor = block[ours] + plus_one if ours.endswith('norm.weight') else block[ours]
                yield prefix + gguf_block_name(ours, cfg), tensor
        if cfg.n_experts:
            for name, tensor in gguf_expert_tensors(cfg, block):
                yield prefix + name, tensor
        del block
    yield OUTER_TENSORS[NORM_TENSOR][1], merged.norm() + plus_one
    if not cfg.tie_embeddings:
        yield OUTER_TENSORS[HEAD_TENSOR][1], merged.lm_head()


def _adapter_tensors(lora, state, cfg):
    for i in range(cfg.n_layers):
        for target in lora.targets:
            path = TARGET_MODULES[target]
            ours = path + '.weight'
            A = state[peft_key(i, path, 'A')].float()  # [rank, in]
            B = state[peft_key(i, path, 'B')].float()  # [out, rank]
            if ours in ROPE_PERMUTED and GGUF_ARCHITECTURES[ARCHITECTURES[cfg.model_type]][1]:
                B = hf_to_meta(B, getattr(cfg, ROPE_PERMUTED[ours]))  # (P B) A = P (B A): the update's rows permuted
            name = GGUF_BLOCK_PREFIX.format(i=i) + gguf_block_name(ours, cfg)
            yield name + GGUF_LORA_SUFFIXES['A'], A
            yield name + GGUF_LORA_SUFFIXES['B'], B


def _check_supported(cfg):
    """The families in WRITTEN, as llama.cpp runs them: what it hardcodes rather than reads (SmolLM3's
    rope-less fourth layers, Gemma's query scale) must be what the model has."""
    family = cfg.model_type
    extras = [field for field in ('qkv_bias', 'sliding_window') if getattr(cfg, field)]
    if family not in ARCHITECTURES or (family in ('llama', 'mixtral') and extras):
        raise SlowLlamaError(f'GGUF export: {family} models{" with " + extras[0] if extras else ""} cannot be '
                             f'written yet (only {", ".join(ARCHITECTURES)})')
    if family == 'qwen3_moe' and not cfg.norm_topk_prob:
        raise SlowLlamaError('GGUF export: llama.cpp runs qwen3moe with the top-k router weights renormalised; '
                             'this qwen3_moe model has norm_topk_prob false')
    if family == 'smollm3' and (cfg.no_rope_layers or [1] * cfg.n_layers) != [
            int((i + 1) % 4 != 0) for i in range(cfg.n_layers)]:
        raise SlowLlamaError('GGUF export: llama.cpp runs smollm3 with every fourth layer without rope; '
                             'this model\'s no_rope_layers differ')
    if family in ('gemma2', 'gemma3_text'):
        big = cfg.n_layers == (46 if family == 'gemma2' else 62)  # llama.cpp's 27B rule
        scale = (cfg.dim // cfg.n_heads if big else cfg.head_dim) ** -0.5
        if abs((cfg.attn_scale or scale) - scale) > 1e-6 * scale:
            raise SlowLlamaError(f'GGUF export: llama.cpp scales {family} queries by {scale:.6g}; this model\'s '
                                 f'query_pre_attn_scalar gives {cfg.attn_scale:.6g}')


def _llama3_rope(cfg):
    """Llama-3 rope scaling (stored without a rope_type), which llama.cpp takes as a rope_freqs tensor."""
    return bool(cfg.rope_scaling) and 'rope_type' not in cfg.rope_scaling


# --- how it is encoded ----------------------------------------------------------------------------

def _matrix_type(shape, dtype):
    if len(shape) == 1:
        return 'f32'
    if dtype in SCHEMES:
        return dtype  # placeholder: model_layout asks gguf_mixture
    if dtype == 'q8_0' and shape[-1] % _gguf().GGML_QUANT_SIZES[_qtype('q8_0')][0]:
        return 'f16'  # rows must split into whole Q8_0 blocks of 32 values
    return dtype


def _encode(tensor, kind):
    """fp32 torch tensor -> the bytes of one GGUF tensor, as a numpy array."""
    tensor = tensor.detach().float().contiguous()
    if kind == 'f32':
        return tensor.numpy()
    if kind == 'f16':
        return tensor.to(torch.float16).numpy()
    if kind == 'bf16':  # round to nearest even, as llama.cpp's converter does
        return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return quantize_rows(tensor.numpy(), kind)


def _nbytes(shape, kind):
    block, size = _gguf().GGML_QUANT_SIZES[_qtype(kind)]
    numel = int(np.prod(shape))
    return numel // block * size


def _qtype(kind):
    return _gguf().GGMLQuantizationType[kind.upper()]


def _file_type(dtype):
    return int(_gguf().LlamaFileType[FILE_TYPES[dtype]])


def _quant_version():
    return int(_gguf().GGML_QUANT_VERSION)


def _gguf():
    import gguf  # imported when a GGUF is written, as the reader does
    return gguf


# --- the file -------------------------------------------------------------------------------------

def _write(out, metadata, layout, tensors, desc, arch='llama'):
    """Header, metadata and tensor table from `layout`, then each tensor as `tensors` yields it."""
    gguf, out = _gguf(), str(out)
    if os.path.isdir(out):
        raise SlowLlamaError(f'out {out}: is a folder; the GGUF formats write one file (FILE.gguf)')
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    check_free_space(folder, sum(_nbytes(shape, kind) for shape, kind in layout.values()), out)
    fd, tmp = temporary_beside(out)
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        for key, value in metadata.items():
            _add(writer, key, value)
        for name, (shape, kind) in layout.items():
            byte_shape = gguf.quant_shape_to_byte_shape(shape, _qtype(kind))
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), _nbytes(shape, kind), raw_dtype=_qtype(kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        names = iter(layout)
        for name, tensor in progress(tensors, desc=desc, unit='tensor', total=len(layout)):
            expected = next(names)
            shape, kind = layout[expected]
            if name != expected or tuple(tensor.shape) != tuple(shape):
                raise SlowLlamaError(f'{out}: tensor {name} {tuple(tensor.shape)} does not match the planned '
                                     f'{expected} {tuple(shape)}')
            writer.write_tensor_data(_encode(tensor, kind))
        missing = next(names, None)
        if missing is not None:
            raise SlowLlamaError(f'{out}: tensor {missing} was planned but never came')
        commit_staged(writer.fout[0], tmp, out)
        writer.fout = None
    except BaseException as e:
        if writer.fout:
            discard_staged(writer.fout[0], tmp)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno == 28:
            raise SlowLlamaError(f'{out}: no space left on the device') from None
        raise


def _add(writer, key, value):
    """One metadata value with the type llama.cpp reads it as (ids and counts are uint32)."""
    if value is None:
        return
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))
