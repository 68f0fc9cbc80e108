"""A prepared folder of random weights written straight from a shape (bench --write-model): block by
block, each projection's packed parts (--quant) drawn at random, so no float model is ever held or
written. Qwen3-30B-A3B in bf16 would take 61 GB of disk; written packed nf4 it takes about 17 GB and
never more than one block's parts (a few hundred MB) in memory.

The values are plausible rather than trained: every projection's weights have a standard deviation
of WEIGHT_STD, as transformers initialises them (nf4: uniform random 4-bit codes, each block's absmax
set so the codes' spread is WEIGHT_STD; int8: uniform int8 codes, each block's fp16 scale the same
way), norms are ones, the router and the tables are normal; activations stay finite through every
layer. The tokenizer is a small BPE trained on the demo text (its ids fit any vocabulary)."""
import json
import os

import torch

from ..model.block import block_shapes
from ..model.config import ModelConfig
from ..model.names import is_projection
from ..model.quant import NF4_CODE, Q8_BLOCK, packed_layout, parse_quant, quantize_absmax
from ..weights.prepared import DTYPES, PreparedWriter

WEIGHT_STD = 0.02
TOKENIZER_VOCAB = 1024
SPECIAL_TOKENS = ['<unk>', '<s>', '</s>', '<pad>']


def write_random_prepared(cfg: ModelConfig, out, dtype='bf16', quant='nf4', seed=0, progress=None):
    """Write a prepared folder of cfg's shape with random weights to `out`; quant: 'nf4', 'int8' or
    None (plain `dtype`). progress(i): called after block i is written."""
    quant = parse_quant(quant)
    g = torch.Generator().manual_seed(seed)
    writer = PreparedWriter(out, cfg, dtype, {'random': {'seed': seed}}, quant=quant)
    try:
        w = DTYPES[dtype]
        writer.write_embed(_normal((cfg.vocab_size, cfg.dim), g, w))
        for i in range(cfg.n_layers):
            writer.write_block(i, random_block(cfg, quant, g, w))
            if progress:
                progress(i)
        head = None if cfg.tie_embeddings else _normal((cfg.vocab_size, cfg.dim), g, w)
        writer.write_head(torch.ones(cfg.dim, dtype=w), head)
        for name, data in tokenizer_files().items():
            writer.add_tokenizer_file(name, data)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return out


def random_block(cfg: ModelConfig, quant, g, dtype):
    """{weight name: tensor, or {part: tensor} packed already} of one block."""
    block = {}
    for name, shape in block_shapes(cfg).items():
        if name.endswith('norm.weight'):
            block[name] = torch.ones(shape, dtype=dtype)
        elif quant is not None and is_projection(name):
            block[name] = random_packed(shape, quant, g)
        else:
            block[name] = _normal(shape, g, dtype)
    return block


def random_packed(shape, quant, g):
    """{part: tensor} of a weight of `shape` packed with `quant`, from random codes whose values have
    a standard deviation of WEIGHT_STD."""
    layout = packed_layout(shape, quant)
    if quant.type == 'int8':
        rows, cols = shape
        codes = torch.randint(-127, 128, (rows, cols // Q8_BLOCK, Q8_BLOCK), generator=g, dtype=torch.int8)
        spread = (127 * 128 / 3) ** 0.5  # the standard deviation of uniform integers in [-127, 127]
        scale = torch.full((rows, cols // Q8_BLOCK, 1), WEIGHT_STD / spread, dtype=torch.float16)
        return {'qweight': torch.cat([scale.view(torch.uint8), codes.view(torch.uint8)], dim=2).reshape(rows, -1)}
    (n_bytes,), _ = layout['qweight']
    qweight = torch.randint(0, 256, (n_bytes,), generator=g, dtype=torch.uint8)
    spread = torch.tensor(NF4_CODE).pow(2).mean().sqrt().item()  # a uniform code's value, root mean square
    (blocks,), _ = layout['absmax']
    jitter = 1 + 0.1 * torch.rand(blocks, generator=g)
    absmax = (WEIGHT_STD / spread * jitter).float()
    return {'qweight': qweight} | (quantize_absmax(absmax) if quant.double_quant else {'absmax': absmax})


def _normal(shape, g, dtype):
    """Normal values of WEIGHT_STD, drawn a slice of rows at a time: no float32 copy of a large table."""
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(shape[0], -1)
    step = max(1, (1 << 22) // flat.shape[1])
    for start in range(0, flat.shape[0], step):
        rows = flat[start:start + step]
        rows.copy_(torch.randn(rows.shape, generator=g) * WEIGHT_STD)
    return out


def tokenizer_files():
    """{filename: bytes}: a byte-fallback BPE of TOKENIZER_VOCAB ids trained on the demo text, and
    its tokenizer_config.json (bos <s> 1, eos </s> 2, pad <pad> 3)."""
    from importlib import resources

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    text = resources.files('slowllama').joinpath('demo_data', 'glimmerfen.txt').read_text(encoding='utf-8')
    tokenizer = Tokenizer(models.BPE(unk_token='<unk>'))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    config = {'bos_token': '<s>', 'eos_token': '</s>', 'pad_token': '<pad>', 'add_bos_token': True}
    return {'tokenizer.json': tokenizer.to_str().encode(), 'tokenizer_config.json': json.dumps(config).encode()}


def write_model_command(shape, out, quant, dtype):
    """bench --write-model OUT --shape NAME [--quant nf4]: the folder, one line a block on stderr."""
    import sys

    from .shapes import shape_config
    cfg = shape_config(shape)
    print(f'bench: writing a random {shape} ({quant or dtype}) prepared folder to {out}', file=sys.stderr)
    write_random_prepared(cfg, os.path.abspath(out), dtype=dtype, quant=quant,
                          progress=lambda i: print(f'  block {i + 1}/{cfg.n_layers}', file=sys.stderr, flush=True))
