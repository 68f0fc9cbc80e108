"""Export a prepared model (+ a LoRA adapter) as merged Meta shards, a merged Hugging Face folder,
the PEFT adapter alone, or GGUF for llama.cpp (the merged model, or the adapter: gguf_export.py).

Weights stream block by block: each block is read from the prepared folder, merged
(W + alpha/r * B A, formed in fp32) and written before the next is read. Everything is written into
a staging folder beside OUT that replaces OUT only once complete, so a failed export leaves an
existing OUT as it was.
"""
import os
import shutil

import torch

from ...errors import SlowLlamaError
from ...model.block import block_shapes
from ...model.config import ModelConfig
from ...model.lora import expert_factors, lora_shapes, peft_key
from ...model.names import (EMBED_TENSOR, EXPERT_LORA, HEAD_TENSOR, NORM_TENSOR, PEFT_PREFIX, TARGET_MODULES,
                            expert_weight)
from ...model.quant import Quant
from ..files import SafetensorsFile, atomic_folder
from ..packed import check_file_layout, file_layout, is_packed, unpack_block
from ..prepared import EMBED_FILE, HEAD_FILE, block_file, check_file, parse_dtype, read_manifest, table_shapes
from .gguf_export import DEFAULT_ADAPTER_DTYPE, gguf_dtype, write_gguf_adapter, write_gguf_model
from .hf import write_hf
from .meta import write_meta
from .peft import read_peft_adapter, save_peft_adapter

FORMATS = ('meta', 'hf', 'peft', 'gguf', 'gguf-lora')
ADAPTER_ONLY = ('peft', 'gguf-lora')
DEFAULT_MAX_SHARD_BYTES = 2 << 30
SPACE_MARGIN = 1.05


class MergedWeights:
    """A prepared model's weights with an adapter merged in, one file at a time (HF names, HF layout).
    Each file is mapped only while its tensors are in use, so pages already written are let go."""

    def __init__(self, model_dir, dtype, adapter=None):
        self.model_dir, self.manifest = str(model_dir), read_manifest(model_dir)
        self.cfg, self.dtype = ModelConfig.from_dict(self.manifest['config']), dtype
        self.quant = Quant.from_dict(self.manifest.get('quant'))
        self.lora, self.state = adapter if adapter else (None, {})

    def embed(self):
        return self._table(EMBED_FILE)[EMBED_TENSOR]

    def block(self, i):
        layout = file_layout(block_shapes(self.cfg), self.quant, parse_dtype(self.manifest['dtype']))
        tensors = self._read(block_file(i), cast=self.quant is None, layout=layout)
        if self.quant is not None:  # packed projections dequantized to fp32, merged, then rounded once
            tensors = unpack_block(tensors, block_shapes(self.cfg), self.quant)
            tensors = {n: t if is_packed(n, self.quant) else t.to(self.dtype) for n, t in tensors.items()}
        for target in (self.lora.targets if self.lora else ()):
            if target == 'experts':
                tensors.update(self._merged_experts(i, tensors))
                continue
            path = TARGET_MODULES[target]
            A, B = self.state[peft_key(i, path, 'A')], self.state[peft_key(i, path, 'B')]
            weight = tensors[path + '.weight']
            # W + (alpha / r) B A, the product formed in fp32 (as LoraLinear.merged_weight does)
            tensors[path + '.weight'] = (weight.float() + self.lora.scale * (B.float() @ A.float())).to(self.dtype)
        return {name: t.to(self.dtype) for name, t in tensors.items()}

    def _merged_experts(self, i, tensors):
        """Each expert's gate, up and down with its slice of the stacked expert LoRAs merged (fp32 product)."""
        cfg, merged = self.cfg, {}
        hidden = cfg.expert_hidden_dim
        for peft_path, (_, module) in EXPERT_LORA.items():
            a, b = self.state[peft_key(i, peft_path, 'A')], self.state[peft_key(i, peft_path, 'B')]
            for e in range(cfg.n_experts):
                part_a, part_b = expert_factors(a, b, e, cfg.n_experts)
                delta = self.lora.scale * (part_b.float() @ part_a.float())
                parts = {'gate_proj': delta[:hidden], 'up_proj': delta[hidden:]} if module == 'mlp.gate_up' \
                    else {'down_proj': delta}
                for projection, d in parts.items():
                    name = expert_weight(e, projection)
                    merged[name] = (tensors[name].float() + d).to(self.dtype)
        return merged

    def norm(self):
        return self._table(HEAD_FILE)[NORM_TENSOR]

    def lm_head(self):
        return self.embed() if self.cfg.tie_embeddings else self._table(HEAD_FILE)[HEAD_TENSOR]

    def _table(self, filename):
        """The embeddings or the norm-and-head file; packed tables (--quant-head) dequantized to fp32
        and rounded once to the export dtype."""
        if self.quant is None or not self.quant.head:
            return self._read(filename)
        shapes = table_shapes(self.cfg)[filename]
        layout = file_layout(shapes, self.quant, parse_dtype(self.manifest['dtype']))
        tensors = self._read(filename, cast=False, layout=layout)
        return {name: t.to(self.dtype) for name, t in unpack_block(tensors, shapes, self.quant).items()}

    def _read(self, filename, cast=True, layout=None):
        path = os.path.join(self.model_dir, filename)
        check_file(path, self.manifest['files'].get(filename, {'size': None, 'sha256': None}))
        mapped = SafetensorsFile(path)
        if layout is not None:
            check_file_layout(path, mapped, layout)
        return {name: t.to(self.dtype) if cast else t for name, t in mapped.tensors().items()}


def export(model_dir, out, fmt, adapter=None, shards=1, dtype=None, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES):
    """Write `fmt` ('meta' | 'hf' | 'peft' | 'gguf' | 'gguf-lora') to `out`; returns out."""
    if fmt not in FORMATS:
        raise SlowLlamaError(f'format: unknown format {fmt!r} (use {", ".join(FORMATS)})')
    if fmt.startswith('gguf'):
        return _export_gguf(model_dir, out, fmt, adapter, dtype)
    if shards < 1:
        raise SlowLlamaError(f'shards must be at least 1, got {shards}')
    manifest = read_manifest(model_dir)
    dtype = parse_dtype(dtype or manifest['dtype'])
    lora = _read_adapter(adapter, model_dir, fmt)
    merged = MergedWeights(model_dir, dtype, lora)
    if fmt == 'meta' and merged.cfg.model_type != 'llama':
        raise SlowLlamaError(f'format meta: Meta checkpoints hold Llama models only, this is '
                             f'{merged.cfg.model_type}; use `format` hf')
    _check_space(out, _bytes_needed(merged.cfg, dtype, fmt, lora))
    with atomic_folder(out) as staging:  # `out` is the old folder or the new one at every instant
        if fmt == 'peft':
            save_peft_adapter(staging, merged.cfg, lora[0], lora[1],
                              base_model=str(manifest.get('source', {}).get('path', '')))
        elif fmt == 'meta':
            write_meta(merged, staging, shards)
        else:
            write_hf(merged, staging, str(dtype).replace('torch.', ''), max_shard_bytes)
        if fmt != 'peft':
            _copy_tokenizer(model_dir, manifest, staging)
    return str(out)


def _export_gguf(model_dir, out, fmt, adapter, dtype):
    """One .gguf file: the merged model (read in fp32, written as --dtype), or the adapter alone."""
    manifest = read_manifest(model_dir)
    lora = _read_adapter(adapter, model_dir, fmt)
    if fmt == 'gguf-lora':
        cfg = ModelConfig.from_dict(manifest['config'])
        return write_gguf_adapter(lora[0], lora[1], cfg, out, gguf_dtype(dtype, DEFAULT_ADAPTER_DTYPE))
    return write_gguf_model(MergedWeights(model_dir, torch.float32, lora), out, gguf_dtype(dtype, manifest['dtype']))


def _read_adapter(adapter, model_dir, fmt):
    if adapter is None:
        if fmt in ADAPTER_ONLY:
            raise SlowLlamaError(f'lora: the {fmt} format exports an adapter; give its folder with `lora`')
        return None
    lora, state = read_peft_adapter(adapter, model_dir)
    state = {k.replace('.default.weight', '.weight'): v for k, v in state.items()}
    cfg = ModelConfig.from_dict(read_manifest(model_dir)['config'])
    per_block = lora_shapes(cfg, lora)
    expected = {f'{PEFT_PREFIX}{i}.{name}': shape for i in range(cfg.n_layers) for name, shape in per_block.items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise SlowLlamaError(f'{adapter}: adapter keys do not match the model (missing {missing[:2]}, '
                             f'unexpected {extra[:2]})')
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise SlowLlamaError(f'{adapter}: {key} has shape {tuple(state[key].shape)}, the model needs {shape}')
    return lora, state


def expert_lora_shapes(cfg):
    """{PEFT path: (in, out)} of the two expert LoRAs of a MoE block (gate and up stacked, then down)."""
    hidden = cfg.expert_hidden_dim
    return dict(zip(EXPERT_LORA, ((cfg.dim, 2 * hidden), (hidden, cfg.dim))))


def _bytes_needed(cfg, dtype, fmt, lora):
    if fmt == 'peft':
        return sum(t.numel() * 4 for t in lora[1].values())
    numel = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings and fmt == 'hf' else 2) + cfg.dim
    numel += cfg.n_layers * sum(_prod(shape) for shape in block_shapes(cfg).values())
    return numel * dtype.itemsize


def _prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def _check_space(out, needed):
    parent = os.path.dirname(os.path.abspath(str(out)))
    free = shutil.disk_usage(parent).free
    if free < needed * SPACE_MARGIN:
        raise SlowLlamaError(f'{out}: not enough disk space: the export needs about {needed / 2**30:.2f} GiB, '
                             f'{free / 2**30:.2f} GiB are free')


def _copy_tokenizer(model_dir, manifest, staging):
    for name in manifest.get('tokenizer', []):  # chat templates included, where transformers looks for them
        os.makedirs(os.path.dirname(os.path.join(staging, name)), exist_ok=True)
        shutil.copyfile(os.path.join(str(model_dir), name), os.path.join(staging, name))
