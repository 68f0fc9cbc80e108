"""Hugging Face folders: config.json + one or more safetensors shards (with or without the index)."""
import glob
import os

from ..config import ModelConfig, read_json
from ..errors import SlowLlamaError
from ..files import SafetensorsFile
from ..names import BLOCK_TENSORS, EMBED_TENSOR, HEAD_TENSOR, HF_BLOCK_PREFIX, HF_OUTER, NORM_TENSOR
from ..progress import progress

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json', 'special_tokens_map.json',
                   'generation_config.json')


def is_hf_folder(src):
    return os.path.isdir(src) and os.path.exists(os.path.join(src, 'config.json'))


def read_config(src):
    return ModelConfig.from_hf(read_json(os.path.join(src, 'config.json'), 'config.json'))


def open_shards(src):
    """{tensor name: SafetensorsFile holding it}, from the index when there is one."""
    index_path = os.path.join(src, 'model.safetensors.index.json')
    if os.path.exists(index_path):
        weight_map = read_json(index_path, 'safetensors index')['weight_map']
        shards = {f: SafetensorsFile(os.path.join(src, f)) for f in sorted(set(weight_map.values()))}
        where = {name: shards[f] for name, f in weight_map.items()}
        for name, shard in where.items():
            if name not in shard.entries:
                raise SlowLlamaError(f'{shard.path}: the index lists {name} here but the shard lacks it '
                                     '(truncated download?)')
        return where
    paths = sorted(glob.glob(os.path.join(src, '*.safetensors')))
    if not paths:
        raise SlowLlamaError(f'{src}: no *.safetensors files (PyTorch .bin checkpoints are not read; '
                             'convert them to safetensors first)')
    return {name: shard for shard in map(SafetensorsFile, paths) for name in shard.names()}


def prepare_hf(src, writer):
    """Copy an HF folder into a PreparedWriter, tensor by tensor."""
    cfg = writer.cfg
    where = open_shards(src)

    def get(name):
        if name not in where:
            raise SlowLlamaError(f'{src}: tensor {name} missing from the checkpoint')
        return where[name].tensor(name)

    writer.write_embed(get(HF_OUTER[EMBED_TENSOR]))
    for i in progress(range(cfg.n_layers), desc='prepare blocks', unit='block'):
        prefix = HF_BLOCK_PREFIX.format(i=i)
        writer.write_block(i, {name: get(prefix + name) for name in BLOCK_TENSORS})
    head = None
    if not cfg.tie_embeddings:
        head = get(HF_OUTER[HEAD_TENSOR])
    writer.write_head(get(HF_OUTER[NORM_TENSOR]), head)
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.exists(path):
            with open(path, 'rb') as f:
                writer.add_tokenizer_file(name, f.read())
