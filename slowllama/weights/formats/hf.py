"""Hugging Face folders: config.json + one or more safetensors shards (with or without the index)."""
import glob
import os

import torch

from ...errors import SlowLlamaError
from ...model.block import block_shapes
from ...model.config import config_errors
from ...model.names import EMBED_TENSOR, HEAD_TENSOR, NORM_TENSOR
from ...progress import progress
from ...tokenizer.chat_template import copy_tokenizer_files
from ..files import SafetensorsFile, announce, read_json, write_json
from .experts import hf_expert_names, is_expert_tensor, read_hf_experts
from .layout import fuse, fused_parts, hf_block_names, split_fused
from .model_config import config_from_hf, config_to_hf
from .names import HF_BLOCK_PREFIX, HF_OUTER
from .safetensors_stream import SafetensorsStreamWriter

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json', 'special_tokens_map.json',
                   'generation_config.json')


def is_hf_folder(src):
    return os.path.isdir(src) and os.path.exists(os.path.join(src, 'config.json'))


def read_config(src):
    path = os.path.join(src, 'config.json')
    with config_errors(path):
        return config_from_hf(read_json(path, 'config.json'))


def shard_index(src):
    """{tensor name: shard path}, from the index when there is one (headers only are read)."""
    index_path = os.path.join(src, 'model.safetensors.index.json')
    if os.path.exists(index_path):
        index = read_json(index_path, 'safetensors index')
        weight_map = index.get('weight_map') if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) and f.endswith('.safetensors') and os.path.basename(f) == f  # in this folder
                for f in weight_map.values()):
            raise SlowLlamaError(f'{index_path}: weight_map must map tensor names to shard file names')
        for path in sorted(set(weight_map.values())):
            shard = SafetensorsFile(os.path.join(src, path))
            for name in (n for n, f in weight_map.items() if f == path):
                if name not in shard.entries:
                    raise SlowLlamaError(f'{shard.path}: the index lists {name} here but the shard lacks it '
                                         '(truncated download?)')
        return {name: os.path.join(src, f) for name, f in weight_map.items()}
    paths = sorted(glob.glob(os.path.join(src, '*.safetensors')))
    if not paths:
        raise SlowLlamaError(f'{src}: no *.safetensors files (PyTorch .bin checkpoints are not read; '
                             'convert them to safetensors first)')
    return {name: path for path in paths for name in SafetensorsFile(path).names()}


def prepare_hf(src, writer):
    """Copy an HF folder into a PreparedWriter, block by block. Shards are mapped afresh for each
    block, so the pages of blocks already written are let go (RAM: one block plus page cache)."""
    cfg = writer.cfg
    where = shard_index(src)
    opened = {}
    checkpoint_name = language_model_names(where, src)

    def get(name):
        name = checkpoint_name(name)
        if name not in where:
            raise SlowLlamaError(f'{src}: tensor {name} missing from the checkpoint')
        if where[name] not in opened:
            opened[where[name]] = SafetensorsFile(where[name])
        return opened[where[name]].tensor(name)

    def file_of(name):  # the shard that holds `name`, or else one holding its block, for messages
        block = name.split('.mlp.')[0] + '.'
        return where.get(name) or next((f for n, f in where.items() if n.startswith(block)), src)

    writer.write_embed(get(HF_OUTER[EMBED_TENSOR]))
    shapes = block_shapes(cfg)
    dense = [name for name in hf_block_names(cfg, shapes) if not is_expert_tensor(name)]
    for i in progress(range(cfg.n_layers), desc='prepare blocks', unit='block'):
        opened.clear()
        prefix = HF_BLOCK_PREFIX.format(i=i)
        block = {name: get(prefix + name) for name in dense}
        if cfg.n_experts:  # qwen3_moe, mixtral: the router and each expert, from either layout
            block.update(read_hf_experts(cfg, prefix, where, get, file_of))
        writer.write_block(i, split_fused(block, fused_parts(cfg), shapes, f'{src}: layer {i}'))
    opened.clear()
    head = None
    if not cfg.tie_embeddings:
        head = get(HF_OUTER[HEAD_TENSOR])
    writer.write_head(get(HF_OUTER[NORM_TENSOR]), head)
    copy_tokenizer_files(src, TOKENIZER_FILES, writer)


# Where a multimodal checkpoint (gemma3) keeps its language model: the prefix that stands for our
# 'model.' (transformers v5 writes the first, Google's release the second), and its lm_head's name
LANGUAGE_MODEL_PREFIXES = {'model.language_model.': 'lm_head.weight',
                           'language_model.model.': 'language_model.lm_head.weight'}


def language_model_names(where, src):
    """Our HF name -> the checkpoint's: the same, or inside a multimodal model's language model (whose
    vision tower and projector we skip)."""
    for prefix, head in LANGUAGE_MODEL_PREFIXES.items():
        if prefix + 'embed_tokens.weight' in where:
            announce(f'{src}: a multimodal checkpoint: its language model is read, its vision tower is skipped')
            return lambda name: head if name == HF_OUTER[HEAD_TENSOR] else prefix + name.removeprefix('model.')
    return lambda name: name


# --- writing ---------------------------------------------------------------------------------

def write_hf(merged, folder, dtype_name, max_shard_bytes):
    """Merged weights as model.safetensors, or model-NNNNN-of-MMMMM.safetensors + index above
    max_shard_bytes, and config.json for transformers; each tensor is written as it is merged."""
    cfg = merged.cfg
    parts = plan_shards(hf_layout(cfg, merged.dtype), max_shard_bytes)
    names = [_shard_name(n, len(parts)) for n in range(len(parts))]
    writers = iter(SafetensorsStreamWriter(os.path.join(folder, name), part, metadata={'format': 'pt'})
                   for name, part in zip(names, parts))
    units = [lambda: {HF_OUTER[EMBED_TENSOR]: merged.embed()}]
    units += [lambda i=i: _prefixed(merged.block(i), HF_BLOCK_PREFIX.format(i=i), cfg) for i in range(cfg.n_layers)]
    units += [lambda: {HF_OUTER[NORM_TENSOR]: merged.norm()}
              | ({} if cfg.tie_embeddings else {HF_OUTER[HEAD_TENSOR]: merged.lm_head()})]
    writer, left = None, 0
    try:
        for unit in progress(units, desc='write blocks', unit='block'):
            for name, tensor in unit().items():
                if left == 0:
                    writer = next(writers)
                    left = len(writer.order)
                writer.write(name, tensor)
                left -= 1
                if left == 0:
                    writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if len(parts) > 1:
        weight_map = {tensor: name for name, part in zip(names, parts) for tensor in part}
        total = sum(_nbytes(shape, dtype) for part in parts for shape, dtype in part.values())
        write_json(os.path.join(folder, 'model.safetensors.index.json'),
                   {'metadata': {'total_size': total}, 'weight_map': weight_map})
    write_json(os.path.join(folder, 'config.json'), {**config_to_hf(cfg), 'torch_dtype': dtype_name, 'dtype': dtype_name})


def _prefixed(block, prefix, cfg):
    block = _hub_names(fuse(block, cfg), cfg)
    return {prefix + name: block[name] for name in hf_block_shapes(cfg)}  # in the layout's order


def _hub_names(block, cfg):
    """Experts under the hub's names (Mixtral's block_sparse_moe.experts.E.w1 ...); others unchanged."""
    if not cfg.n_experts:
        return block
    names = hf_expert_names(cfg)
    return {names.get(name, name): tensor for name, tensor in block.items()}


def hf_layout(cfg, dtype):
    """{HF checkpoint name: (shape, dtype)} in the order the tensors are written."""
    layout = {HF_OUTER[EMBED_TENSOR]: ((cfg.vocab_size, cfg.dim), dtype)}
    shapes = hf_block_shapes(cfg)
    for i in range(cfg.n_layers):
        layout.update({HF_BLOCK_PREFIX.format(i=i) + k: (shape, dtype) for k, shape in shapes.items()})
    layout[HF_OUTER[NORM_TENSOR]] = ((cfg.dim,), dtype)
    if not cfg.tie_embeddings:
        layout[HF_OUTER[HEAD_TENSOR]] = ((cfg.vocab_size, cfg.dim), dtype)
    return layout


def hf_block_shapes(cfg):
    """{HF name: shape} of one block, in the order fuse() gives its tensors."""
    block = fuse({n: torch.empty(s, device='meta') for n, s in block_shapes(cfg).items()}, cfg)
    return {name: tuple(t.shape) for name, t in _hub_names(block, cfg).items()}


def plan_shards(layout, max_shard_bytes):
    """Cut the layout, in order, into parts that stay under max_shard_bytes (one tensor at least)."""
    parts, part, size = [], {}, 0
    for name, (shape, dtype) in layout.items():
        nbytes = _nbytes(shape, dtype)
        if part and size + nbytes > max_shard_bytes:
            parts.append(part)
            part, size = {}, 0
        part[name], size = (shape, dtype), size + nbytes
    return parts + [part]


def _nbytes(shape, dtype):
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def _shard_name(n, count):
    return 'model.safetensors' if count == 1 else f'model-{n + 1:05d}-of-{count:05d}.safetensors'
