"""Hugging Face folders: config.json + one or more safetensors shards (with or without the index)."""
import glob
import os

from ..config import ModelConfig, read_json
from ..errors import SlowLlamaError
from ..files import SafetensorsFile, write_json, write_safetensors
from ..names import BLOCK_TENSORS, EMBED_TENSOR, HEAD_TENSOR, HF_BLOCK_PREFIX, HF_OUTER, NORM_TENSOR
from ..progress import progress

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json', 'special_tokens_map.json',
                   'generation_config.json')


def is_hf_folder(src):
    return os.path.isdir(src) and os.path.exists(os.path.join(src, 'config.json'))


def read_config(src):
    return ModelConfig.from_hf(read_json(os.path.join(src, 'config.json'), 'config.json'))


def shard_index(src):
    """{tensor name: shard path}, from the index when there is one (headers only are read)."""
    index_path = os.path.join(src, 'model.safetensors.index.json')
    if os.path.exists(index_path):
        weight_map = read_json(index_path, 'safetensors index')['weight_map']
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

    def get(name):
        if name not in where:
            raise SlowLlamaError(f'{src}: tensor {name} missing from the checkpoint')
        if where[name] not in opened:
            opened[where[name]] = SafetensorsFile(where[name])
        return opened[where[name]].tensor(name)

    writer.write_embed(get(HF_OUTER[EMBED_TENSOR]))
    for i in progress(range(cfg.n_layers), desc='prepare blocks', unit='block'):
        opened.clear()
        prefix = HF_BLOCK_PREFIX.format(i=i)
        writer.write_block(i, {name: get(prefix + name) for name in BLOCK_TENSORS})
    opened.clear()
    head = None
    if not cfg.tie_embeddings:
        head = get(HF_OUTER[HEAD_TENSOR])
    writer.write_head(get(HF_OUTER[NORM_TENSOR]), head)
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.exists(path):
            with open(path, 'rb') as f:
                writer.add_tokenizer_file(name, f.read())


# --- writing ---------------------------------------------------------------------------------

def write_hf(merged, folder, dtype_name, max_shard_bytes):
    """Merged weights as model.safetensors, or model-NNNNN-of-MMMMM.safetensors + index above
    max_shard_bytes; config.json for transformers. One shard's tensors are in RAM at a time."""
    cfg = merged.cfg
    units = [lambda: {HF_OUTER[EMBED_TENSOR]: merged.embed()}]
    units += [lambda i=i: {HF_BLOCK_PREFIX.format(i=i) + k: v for k, v in merged.block(i).items()}
              for i in range(cfg.n_layers)]
    units += [lambda: {HF_OUTER[NORM_TENSOR]: merged.norm()}
              | ({} if cfg.tie_embeddings else {HF_OUTER[HEAD_TENSOR]: merged.lm_head()})]
    files, pending = [], {}
    for unit in progress(units, desc='write blocks', unit='block'):
        pending.update(unit())
        if sum(t.numel() * t.element_size() for t in pending.values()) >= max_shard_bytes:
            files.append(_write_part(folder, len(files), pending))
            pending = {}
    if pending or not files:
        files.append(_write_part(folder, len(files), pending))
    _name_parts(folder, files)
    config = {**cfg.to_hf(), 'torch_dtype': dtype_name, 'dtype': dtype_name}
    write_json(os.path.join(folder, 'config.json'), config)


def _write_part(folder, n, tensors):
    path = os.path.join(folder, f'.part-{n:05d}.safetensors')
    write_safetensors(path, tensors, metadata={'format': 'pt'})
    return path, {name: t.numel() * t.element_size() for name, t in tensors.items()}


def _name_parts(folder, files):
    if len(files) == 1:
        os.replace(files[0][0], os.path.join(folder, 'model.safetensors'))
        return
    weight_map, total = {}, 0
    for n, (path, sizes) in enumerate(files):
        name = f'model-{n + 1:05d}-of-{len(files):05d}.safetensors'
        os.replace(path, os.path.join(folder, name))
        weight_map.update({tensor: name for tensor in sizes})
        total += sum(sizes.values())
    write_json(os.path.join(folder, 'model.safetensors.index.json'),
               {'metadata': {'total_size': total}, 'weight_map': weight_map})
