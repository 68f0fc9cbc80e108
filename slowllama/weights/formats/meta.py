"""Meta checkpoints: params.json + consolidated.NN.pth model-parallel shards, read and written.

Reading opens every shard as a memory map (torch.load(weights_only=True, mmap=True)) once per block
and joins that block's pieces along Meta's split dims, so RAM holds one block plus page cache.
Writing lays each shard file out first (formats/pth.py) and fills it block by block as the merged
blocks arrive: Meta's own .pth is the one pickle we write.
"""
import glob
import os
import pickle
import re

import torch

from ...errors import SlowLlamaError
from ...model.config import config_errors
from ...model.names import EMBED_TENSOR, HEAD_TENSOR, NORM_TENSOR
from ...progress import progress
from ...tokenizer import tiktoken
from ...tokenizer.chat_template import copy_tokenizer_files
from ..files import read_json, write_json
from ..prepared import block_shapes
from .layout import block_to_hf, block_to_meta, join, split
from .model_config import config_from_meta, config_to_meta
from .names import BLOCK_TENSORS, META_BLOCK_PREFIX, META_IGNORED, META_PARAMS, META_SHARD, OUTER_TENSORS
from .pth import PthWriter

TOKENIZER_FILES = ('tokenizer.model', 'tokenizer.json', 'tokenizer_config.json')


def is_meta_folder(src):
    return os.path.isdir(src) and os.path.exists(os.path.join(src, META_PARAMS))


def shard_paths(src):
    """consolidated.00.pth .. consolidated.NN.pth, checked to be complete."""
    found = glob.glob(os.path.join(src, 'consolidated.*.pth'))
    numbers = sorted(int(m.group(1)) for p in found if (m := re.search(r'consolidated\.(\d+)\.pth$', p)))
    if not numbers:
        raise SlowLlamaError(f'{src}: no consolidated.NN.pth shards beside params.json')
    for n in range(numbers[-1] + 1):
        if n not in numbers:
            raise SlowLlamaError(f'{os.path.join(src, META_SHARD.format(n))}: shard missing '
                                 f'(found {len(numbers)} of {numbers[-1] + 1})')
    return [os.path.join(src, META_SHARD.format(n)) for n in numbers]


def load_shard(path):
    """{name: tensor} memory-mapped from one .pth; a pickle holding anything but tensors is refused."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except FileNotFoundError:
        raise SlowLlamaError(f'{path}: shard not found') from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise SlowLlamaError(f'{path}: refused to load: the pickle holds code or objects other than '
                             f'tensors ({first})') from None
    except MemoryError:
        raise
    except Exception as e:  # a damaged pickle makes the unpickler fail in many ways (KeyError, IndexError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlowLlamaError(f'{path}: truncated or corrupt checkpoint shard ({first})') from None


def read_config(src):
    path = os.path.join(src, META_PARAMS)
    params = read_json(path, 'params.json')
    with config_errors(path):
        vocab = params.get('vocab_size', -1)
        if vocab is None or vocab <= 0:  # old params.json: the embedding says how many tokens
            first = shard_paths(src)[0]
            vocab = _tensor(load_shard(first), OUTER_TENSORS[EMBED_TENSOR][0], first).shape[0]
        return config_from_meta(params, vocab_size=vocab)


def _tensor(shard, name, path):
    if name not in shard:
        raise SlowLlamaError(f'{path}: tensor {name} missing (truncated or not a Llama checkpoint?)')
    return shard[name]


def _joined(shards, paths, name, dim):
    return join([_tensor(shard, name, path) for shard, path in zip(shards, paths)], dim)


def prepare_meta(src, writer):
    """Join the shards block by block into a PreparedWriter."""
    cfg, paths = writer.cfg, shard_paths(src)
    shards = [load_shard(p) for p in progress(paths, desc='open shards', unit='shard')]
    _check_known(shards, paths, cfg)
    meta_name, _, dim = OUTER_TENSORS[EMBED_TENSOR]
    writer.write_embed(_joined(shards, paths, meta_name, dim))
    for i in progress(range(cfg.n_layers), desc='prepare blocks', unit='block'):
        shards = None  # unmap the previous block's pages before mapping afresh
        shards = [load_shard(p) for p in paths]
        prefix = META_BLOCK_PREFIX.format(i=i)
        block = {ours: _joined(shards, paths, prefix + meta, dim) for ours, (meta, _, dim) in BLOCK_TENSORS.items()}
        writer.write_block(i, block_to_hf(block, cfg))
    shards = None
    shards = [load_shard(p) for p in paths]
    norm = _joined(shards, paths, OUTER_TENSORS[NORM_TENSOR][0], OUTER_TENSORS[NORM_TENSOR][2])
    meta_name, _, dim = OUTER_TENSORS[HEAD_TENSOR]
    writer.write_head(norm, _joined(shards, paths, meta_name, dim))
    _copy_tokenizer(src, writer)


def _check_known(shards, paths, cfg):
    """Refuse a checkpoint with more layers or unknown tensors than params.json describes."""
    known = {meta for meta, _, _ in OUTER_TENSORS.values()} | set(META_IGNORED)
    known |= {META_BLOCK_PREFIX.format(i=i) + meta for i in range(cfg.n_layers)
              for meta, _, _ in BLOCK_TENSORS.values()}
    for shard, path in zip(shards, paths):
        unknown = sorted(set(shard) - known)
        if unknown:
            raise SlowLlamaError(f'{path}: tensors the config does not describe, e.g. {unknown[:3]} '
                                 f'(params.json says {cfg.n_layers} layers)')


def _copy_tokenizer(src, writer):
    """Copy the tokenizer files; Llama-3's tiktoken tokenizer.model also becomes a tokenizer.json."""
    model_path = os.path.join(src, 'tokenizer.model')
    converted = None
    if os.path.exists(model_path) and not os.path.exists(os.path.join(src, 'tokenizer.json')):
        with open(model_path, 'rb') as f:
            model = f.read()
        if tiktoken.is_tiktoken(model):
            converted = tiktoken.tokenizer_files(model, model_path, writer.cfg.vocab_size)
    copy_tokenizer_files(src, TOKENIZER_FILES, writer, converted)


# --- writing ---------------------------------------------------------------------------------

def write_meta(merged, folder, n_shards):
    """Write merged weights (HF names and layout) as n_shards consolidated.NN.pth + params.json,
    each block split and written into the shard files as soon as it is merged."""
    cfg = merged.cfg
    layout = meta_layout(cfg, n_shards)
    writers = []
    try:
        for s in range(n_shards):
            writers.append(PthWriter(os.path.join(folder, META_SHARD.format(s)),
                                     {name: (shape, merged.dtype) for name, shape in layout.items()}))
        units = [lambda: _meta_outer(merged.embed(), EMBED_TENSOR)]
        units += [lambda i=i: _meta_block(merged.block(i), cfg, i) for i in range(cfg.n_layers)]
        units += [lambda: _meta_outer(merged.norm(), NORM_TENSOR) | _meta_outer(merged.lm_head(), HEAD_TENSOR)]
        for unit in progress(units, desc='write blocks', unit='block'):
            for name, (tensor, dim) in unit().items():
                for writer, piece in zip(writers, split(tensor, dim, n_shards, name)):
                    writer.write(name, piece)
        for writer in progress(writers, desc='finish shards', unit='shard'):
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    write_json(os.path.join(folder, META_PARAMS), config_to_meta(cfg))


def meta_layout(cfg, n_shards):
    """{Meta name: the shape of one shard's piece}, checking that every split divides evenly."""
    full = {EMBED_TENSOR: (cfg.vocab_size, cfg.dim), NORM_TENSOR: (cfg.dim,), HEAD_TENSOR: (cfg.vocab_size, cfg.dim)}
    layout = {OUTER_TENSORS[ours][0]: _piece_shape(full[ours], OUTER_TENSORS[ours][2], n_shards, ours)
              for ours in (EMBED_TENSOR, NORM_TENSOR, HEAD_TENSOR)}
    shapes = block_shapes(cfg)
    for i in range(cfg.n_layers):
        for ours, (meta, _, dim) in BLOCK_TENSORS.items():
            layout[META_BLOCK_PREFIX.format(i=i) + meta] = _piece_shape(shapes[ours], dim, n_shards, ours)
    return layout


def _piece_shape(shape, dim, n_shards, name):
    if dim is None:
        return tuple(shape)
    if shape[dim] % n_shards:
        raise SlowLlamaError(f'shards {n_shards}: {name} has {shape[dim]} along dim {dim}, '
                             f'which does not split into {n_shards} equal parts')
    return tuple(n // n_shards if d == dim else n for d, n in enumerate(shape))


def _meta_outer(tensor, ours):
    meta_name, _, dim = OUTER_TENSORS[ours]
    return {meta_name: (tensor, dim)}


def _meta_block(tensors, cfg, i):
    prefix = META_BLOCK_PREFIX.format(i=i)
    tensors = block_to_meta(tensors, cfg)
    return {prefix + meta: (tensors[ours], dim) for ours, (meta, _, dim) in BLOCK_TENSORS.items()}
