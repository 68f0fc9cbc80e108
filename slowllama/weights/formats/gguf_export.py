"""Write GGUF for llama.cpp / Ollama: the merged model as one file, or the LoRA adapter alone.

The model file: llama.cpp's tensor names (names.py), q/k back in the rope-interleaved rows llama.cpp
expects (layout.py), the hyper-parameters under the keys our GGUF reader reads (gguf.CONFIG_KEYS),
and the tokenizer (gguf_vocab.py). GGUF lists every tensor before any data, so the tensor table is
built from the config alone; then the tensors are merged and written one at a time, so RAM holds one
block. Matrices take the chosen type (f32 / f16 / bf16 / q8_0); norms stay f32, as llama.cpp keeps
them, and a q8_0 matrix whose rows do not split into 32-value blocks falls back to f16.

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
from ...model.lora import peft_key
from ...model.names import EMBED_TENSOR, HEAD_TENSOR, NORM_TENSOR, TARGET_MODULES
from ...progress import progress
from ...tokenizer.gguf_vocab import vocab_metadata
from ..files import commit_staged, discard_staged, temporary_beside
from ..prepared import block_shapes, check_free_space
from .gguf import CONFIG_KEYS, llama3_divisors
from .layout import block_to_meta, hf_to_meta
from .names import BLOCK_TENSORS, GGUF_BLOCK_PREFIX, GGUF_LORA_SUFFIXES, GGUF_ROPE_FREQS, OUTER_TENSORS, ROPE_PERMUTED

ARCHITECTURE = 'llama'
GGUF_DTYPES = ('f32', 'f16', 'bf16', 'q8_0')
DTYPE_ALIASES = {'fp32': 'f32', 'float32': 'f32', 'fp16': 'f16', 'float16': 'f16', 'bfloat16': 'bf16'}
FILE_TYPES = {'f32': 'ALL_F32', 'f16': 'MOSTLY_F16', 'bf16': 'MOSTLY_BF16', 'q8_0': 'MOSTLY_Q8_0'}  # general.file_type
DEFAULT_ADAPTER_DTYPE = 'f32'  # adapters are small; llama.cpp's own converter writes them in f32 too


def gguf_dtype(name, default):
    """--dtype for the GGUF formats: f32 | f16 | bf16 | q8_0 (fp32 / fp16 spellings accepted)."""
    name = DTYPE_ALIASES.get(name or default, name or default)
    if name not in GGUF_DTYPES:
        raise SlowLlamaError(f'dtype: {name!r} is not a GGUF type (use {", ".join(GGUF_DTYPES)})')
    return name


def write_gguf_model(merged, out, dtype, name=None):
    """The merged model (MergedWeights, read in fp32) as one llama.cpp GGUF file at `out`."""
    cfg = merged.cfg
    _check_supported(cfg)
    layout = model_layout(cfg, dtype)
    metadata = {'general.type': 'model', 'general.name': name or os.path.basename(str(merged.model_dir)),
                'general.file_type': _file_type(dtype), 'general.quantization_version': _quant_version()}
    metadata.update(hyper_parameters(cfg))
    metadata.update(vocab_metadata(merged.model_dir, cfg.vocab_size))
    _write(out, metadata, layout, _model_tensors(merged), desc='write gguf')
    return str(out)


def write_gguf_adapter(lora, state, cfg, out, dtype=DEFAULT_ADAPTER_DTYPE):
    """The LoRA adapter alone as a llama.cpp LoRA GGUF (load it with `llama-cli --lora`)."""
    _check_supported(cfg)
    layout = {name: (tuple(t.shape), _matrix_type(t.shape, dtype)) for name, t in _adapter_tensors(lora, state, cfg)}
    metadata = {'general.type': 'adapter', 'adapter.type': 'lora', 'adapter.lora.alpha': float(lora.alpha)}
    _write(out, metadata, layout, _adapter_tensors(lora, state, cfg), desc='write gguf adapter')
    return str(out)


# --- what goes in -------------------------------------------------------------------------------

def hyper_parameters(cfg):
    """{'llama.…': value} from the config, under the same keys the GGUF reader reads."""
    values = {f'{ARCHITECTURE}.{key}': getattr(cfg, field) for field, key in CONFIG_KEYS.items()}
    values[f'{ARCHITECTURE}.attention.value_length'] = cfg.head_dim
    values[f'{ARCHITECTURE}.rope.dimension_count'] = cfg.head_dim
    values[f'{ARCHITECTURE}.vocab_size'] = cfg.vocab_size
    return values


def model_layout(cfg, dtype):
    """{GGUF name: (shape in torch order, GGUF type)} in the order the tensors are written."""
    table = (cfg.vocab_size, cfg.dim)
    layout = {OUTER_TENSORS[EMBED_TENSOR][1]: (table, _matrix_type(table, dtype))}
    if cfg.rope_scaling:
        layout[GGUF_ROPE_FREQS] = ((cfg.head_dim // 2,), 'f32')
    shapes = block_shapes(cfg)
    for i in range(cfg.n_layers):
        for ours, (_, gguf_name, _) in BLOCK_TENSORS.items():
            layout[GGUF_BLOCK_PREFIX.format(i=i) + gguf_name] = (shapes[ours], _matrix_type(shapes[ours], dtype))
    layout[OUTER_TENSORS[NORM_TENSOR][1]] = ((cfg.dim,), 'f32')
    if not cfg.tie_embeddings:  # llama.cpp falls back to token_embd when output.weight is absent
        layout[OUTER_TENSORS[HEAD_TENSOR][1]] = (table, _matrix_type(table, dtype))
    return layout


def _model_tensors(merged):
    """(GGUF name, fp32 tensor in llama.cpp's layout), one at a time, in model_layout's order."""
    cfg = merged.cfg
    yield OUTER_TENSORS[EMBED_TENSOR][1], merged.embed()
    if cfg.rope_scaling:
        yield GGUF_ROPE_FREQS, llama3_divisors(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).float()
    for i in range(cfg.n_layers):
        block = merged.block(i)
        extra = sorted(set(block) - set(BLOCK_TENSORS))
        if extra:
            raise SlowLlamaError(f'{merged.model_dir}: block tensor {extra[0]} has no llama.cpp name; this model '
                                 'family cannot be exported to GGUF yet')
        block = block_to_meta(block, cfg)
        for ours, (_, gguf_name, _) in BLOCK_TENSORS.items():
            yield GGUF_BLOCK_PREFIX.format(i=i) + gguf_name, block[ours]
        del block
    yield OUTER_TENSORS[NORM_TENSOR][1], merged.norm()
    if not cfg.tie_embeddings:
        yield OUTER_TENSORS[HEAD_TENSOR][1], merged.lm_head()


def _adapter_tensors(lora, state, cfg):
    for i in range(cfg.n_layers):
        for target in lora.targets:
            path = TARGET_MODULES[target]
            ours = path + '.weight'
            A = state[peft_key(i, path, 'A')].float()  # [rank, in]
            B = state[peft_key(i, path, 'B')].float()  # [out, rank]
            if ours in ROPE_PERMUTED:  # (P B) A = P (B A): permuting B's rows permutes the update's
                B = hf_to_meta(B, getattr(cfg, ROPE_PERMUTED[ours]))
            name = GGUF_BLOCK_PREFIX.format(i=i) + BLOCK_TENSORS[ours][1]
            yield name + GGUF_LORA_SUFFIXES['A'], A
            yield name + GGUF_LORA_SUFFIXES['B'], B


def _check_supported(cfg):
    """Only the llama architecture is written: other families' extras (biases, q/k norms, sliding
    windows) would need their own llama.cpp names and keys. Block tensors without a llama.cpp name
    are refused again as they are read (_model_tensors)."""
    family = cfg.model_type
    extras = [field for field in ('qkv_bias', 'qk_norm', 'sliding_window') if getattr(cfg, field)]
    if family != ARCHITECTURE or extras:
        raise SlowLlamaError(f'GGUF export: {family} models{" with " + extras[0] if extras else ""} cannot be '
                             f'written yet (only {ARCHITECTURE})')


# --- how it is encoded ----------------------------------------------------------------------------

def _matrix_type(shape, dtype):
    if len(shape) == 1:
        return 'f32'
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
    return _gguf().quants.quantize(tensor.numpy(), _qtype(kind))


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

def _write(out, metadata, layout, tensors, desc):
    """Header, metadata and tensor table from `layout`, then each tensor as `tensors` yields it."""
    gguf, out = _gguf(), str(out)
    if os.path.isdir(out):
        raise SlowLlamaError(f'out {out}: is a folder; the GGUF formats write one file (FILE.gguf)')
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    check_free_space(folder, sum(_nbytes(shape, kind) for shape, kind in layout.values()), out)
    fd, tmp = temporary_beside(out)
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
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
