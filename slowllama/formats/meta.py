"""Meta checkpoints: params.json + consolidated.NN.pth model-parallel shards, read and written.

Reading opens every shard as a memory map (torch.load(weights_only=True, mmap=True)) once per block
and joins that block's pieces along Meta's split dims, so RAM holds one block plus page cache.
Writing stages each shard's pieces per block as safetensors and then saves each shard with
torch.save from those memory-mapped pieces: Meta's own .pth is the one pickle we write.
"""
import glob
import os
import pickle
import re
import shutil

import torch

from ..config import ModelConfig, read_json
from ..errors import SlowLlamaError
from ..files import SafetensorsFile, atomic_open, write_json, write_safetensors
from ..names import (BLOCK_TENSORS, EMBED_TENSOR, HEAD_TENSOR, META_BLOCK_PREFIX, META_IGNORED,
                     META_PARAMS, META_SHARD, NORM_TENSOR, OUTER_TENSORS)
from ..progress import progress
from . import tiktoken
from .layout import block_to_hf, block_to_meta, join, split

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
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise SlowLlamaError(f'{path}: truncated or corrupt checkpoint shard ({str(e).splitlines()[0]})') from None


def read_config(src):
    params = read_json(os.path.join(src, META_PARAMS), 'params.json')
    vocab = params.get('vocab_size', -1)
    if vocab is None or vocab <= 0:  # old params.json: the embedding says how many tokens
        first = shard_paths(src)[0]
        vocab = _tensor(load_shard(first), OUTER_TENSORS[EMBED_TENSOR][0], first).shape[0]
    try:
        return ModelConfig.from_meta(params, vocab_size=vocab)
    except KeyError as e:
        raise SlowLlamaError(f'{os.path.join(src, META_PARAMS)}: lacks {e.args[0]!r}') from None


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
    found = {}
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.exists(path):
            with open(path, 'rb') as f:
                found[name] = f.read()
    model = found.get('tokenizer.model')
    if model is not None and 'tokenizer.json' not in found and tiktoken.is_tiktoken(model):
        converted = tiktoken.tokenizer_files(model, os.path.join(src, 'tokenizer.model'), writer.cfg.vocab_size)
        found = {**converted, **found}
    for name, data in found.items():
        writer.add_tokenizer_file(name, data)


# --- writing ---------------------------------------------------------------------------------

def write_meta(merged, folder, n_shards):
    """Write merged weights (HF names and layout) as n_shards consolidated.NN.pth + params.json."""
    cfg = merged.cfg
    pieces_dir = os.path.join(folder, '.pieces')
    os.makedirs(pieces_dir, exist_ok=True)
    units = [('embed', lambda: _meta_outer(merged.embed(), EMBED_TENSOR))]
    units += [(f'block_{i:03d}', lambda i=i: _meta_block(merged.block(i), cfg, i)) for i in range(cfg.n_layers)]
    units += [('head', lambda: _meta_outer(merged.norm(), NORM_TENSOR) | _meta_outer(merged.lm_head(), HEAD_TENSOR))]
    for unit, tensors in progress(units, desc='split blocks', unit='block'):
        shard_pieces = [{} for _ in range(n_shards)]
        for name, (tensor, dim) in tensors().items():
            for s, piece in enumerate(split(tensor, dim, n_shards, name)):
                shard_pieces[s][name] = piece
        for s, pieces in enumerate(shard_pieces):
            write_safetensors(os.path.join(pieces_dir, f'{unit}.{s:02d}.safetensors'), pieces)
    for s in progress(range(n_shards), desc='write shards', unit='shard'):
        _save_shard(os.path.join(folder, META_SHARD.format(s)), [
            os.path.join(pieces_dir, f'{unit}.{s:02d}.safetensors') for unit, _ in units])
    shutil.rmtree(pieces_dir)
    write_json(os.path.join(folder, META_PARAMS), cfg.to_meta())


def _save_shard(path, piece_paths):
    """torch.save one shard from memory-mapped pieces (read page by page as it is written)."""
    state = {}
    for piece_path in piece_paths:
        state.update(SafetensorsFile(piece_path).tensors())
    with atomic_open(path) as f:
        torch.save(state, f)
    for piece_path in piece_paths:
        os.unlink(piece_path)


def _meta_outer(tensor, ours):
    meta_name, _, dim = OUTER_TENSORS[ours]
    return {meta_name: (tensor, dim)}


def _meta_block(tensors, cfg, i):
    prefix = META_BLOCK_PREFIX.format(i=i)
    tensors = block_to_meta(tensors, cfg)
    return {prefix + meta: (tensors[ours], dim) for ours, (meta, _, dim) in BLOCK_TENSORS.items()}
