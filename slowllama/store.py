"""Where frozen weights live and how they reach the device.

A prepared folder holds one safetensors file per transformer block, one for the embeddings and one
for the final norm and head, and a manifest with the model's shape and a sha256 per file. The store
hands the engine a block's tensors on the compute device in the compute dtype, from one of three
tiers: 'disk' (memory-mapped file, read at each use), 'ram' (held in host memory, pinned on cuda)
or 'device' (all resident).
"""
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F

from .config import ModelConfig, read_json
from .errors import SlowLlamaError
from .files import SafetensorsFile, sha256_file, write_json, write_safetensors
from .names import BLOCK_TENSORS, EMBED_TENSOR, HEAD_TENSOR, NORM_TENSOR

FORMAT_NAME = 'slowllama-prepared'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
EMBED_FILE = 'embed.safetensors'
HEAD_FILE = 'head.safetensors'
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}
OFFLOAD_MODES = ('disk', 'ram', 'device')


def block_file(i):
    return f'block_{i:03d}.safetensors'


def parse_dtype(name, flag='--dtype'):
    if isinstance(name, torch.dtype):
        return name
    aliases = {'bfloat16': 'bf16', 'float16': 'fp16', 'half': 'fp16', 'float32': 'fp32', 'float': 'fp32'}
    name = aliases.get(str(name), str(name))
    if name not in DTYPES:
        raise SlowLlamaError(f'{flag}: unknown dtype {name!r} (use bf16, fp16 or fp32)')
    return DTYPES[name]


def dtype_name(dtype):
    return {v: k for k, v in DTYPES.items()}[dtype]


# --- writing a prepared folder -------------------------------------------------------------

class PreparedWriter:
    """Writes a prepared folder into a staging folder beside `out` and swaps it in at finish(),
    so an existing folder is replaced whole or not at all."""

    def __init__(self, out, cfg: ModelConfig, dtype, source):
        self.out, self.cfg, self.dtype, self.source = str(out), cfg, parse_dtype(dtype), source
        parent = os.path.dirname(os.path.abspath(self.out))
        os.makedirs(parent, exist_ok=True)
        self.staging = tempfile.mkdtemp(dir=parent, prefix='.' + os.path.basename(self.out) + '.staging-')
        self.files = {}
        self.tokenizer_files = []

    def write(self, filename, tensors):
        tensors = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        path = os.path.join(self.staging, filename)
        self.files[filename] = {'sha256': write_safetensors(path, tensors), 'size': os.path.getsize(path)}

    def write_embed(self, weight):
        self._check(EMBED_TENSOR, weight, (self.cfg.vocab_size, self.cfg.dim))
        self.write(EMBED_FILE, {EMBED_TENSOR: weight})

    def write_block(self, i, tensors):
        missing = set(BLOCK_TENSORS) - set(tensors)
        if missing:
            raise SlowLlamaError(f'{self.source}: layer {i} lacks {sorted(missing)}')
        for name, shape in block_shapes(self.cfg).items():
            self._check(f'layer {i} {name}', tensors[name], shape)
        self.write(block_file(i), {name: tensors[name] for name in BLOCK_TENSORS})

    def write_head(self, norm, lm_head=None):
        self._check(NORM_TENSOR, norm, (self.cfg.dim,))
        tensors = {NORM_TENSOR: norm}
        if not self.cfg.tie_embeddings:
            self._check(HEAD_TENSOR, lm_head, (self.cfg.vocab_size, self.cfg.dim))
            tensors[HEAD_TENSOR] = lm_head
        self.write(HEAD_FILE, tensors)

    def add_tokenizer_file(self, name, data: bytes):
        path = os.path.join(self.staging, name)
        with open(path, 'wb') as f:
            f.write(data)
        self.tokenizer_files.append(name)
        self.files[name] = {'sha256': sha256_file(path), 'size': os.path.getsize(path)}

    def finish(self):
        expected = [EMBED_FILE, HEAD_FILE] + [block_file(i) for i in range(self.cfg.n_layers)]
        missing = [f for f in expected if f not in self.files]
        if missing:
            raise SlowLlamaError(f'{self.source}: incomplete model, nothing written for {missing[:3]}')
        write_json(os.path.join(self.staging, MANIFEST), {
            'format': FORMAT_NAME, 'version': FORMAT_VERSION, 'config': self.cfg.to_dict(),
            'dtype': dtype_name(self.dtype), 'source': self.source, 'tokenizer': self.tokenizer_files,
            'files': self.files})
        _swap_in(self.staging, self.out)

    def abort(self):
        shutil.rmtree(self.staging, ignore_errors=True)

    def _check(self, name, tensor, shape):
        if tensor is None or tuple(tensor.shape) != tuple(shape):
            got = None if tensor is None else tuple(tensor.shape)
            raise SlowLlamaError(f'{self.source}: {name} has shape {got}, the config needs {tuple(shape)}')


def block_shapes(cfg: ModelConfig):
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {
        'self_attn.q_proj.weight': (q, cfg.dim), 'self_attn.k_proj.weight': (kv, cfg.dim),
        'self_attn.v_proj.weight': (kv, cfg.dim), 'self_attn.o_proj.weight': (cfg.dim, q),
        'mlp.gate_proj.weight': (cfg.hidden_dim, cfg.dim), 'mlp.up_proj.weight': (cfg.hidden_dim, cfg.dim),
        'mlp.down_proj.weight': (cfg.dim, cfg.hidden_dim),
        'input_layernorm.weight': (cfg.dim,), 'post_attention_layernorm.weight': (cfg.dim,),
    }


def _swap_in(staging, out):
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out)), prefix='.old-')
        os.replace(out, os.path.join(old, 'model'))
    os.replace(staging, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# --- reading a prepared folder -------------------------------------------------------------

def read_manifest(model_dir):
    path = os.path.join(str(model_dir), MANIFEST)
    if not os.path.isdir(str(model_dir)):
        raise SlowLlamaError(f'{model_dir}: model folder not found (run prepare_model.py first)')
    manifest = read_json(path, 'manifest of a prepared model (run prepare_model.py)')
    if manifest.get('format') != FORMAT_NAME or manifest.get('version') != FORMAT_VERSION:
        raise SlowLlamaError(f'{path}: not a slowllama prepared model of version {FORMAT_VERSION}; '
                             'run prepare_model.py again')
    return manifest


class BlockStore:
    """Frozen weights of a prepared folder, served to the engine on `device` in `dtype`."""

    def __init__(self, model_dir, device, dtype, offload='disk', verify=True):
        if offload not in OFFLOAD_MODES:
            raise SlowLlamaError(f'--offload: unknown mode {offload!r} (use {", ".join(OFFLOAD_MODES)})')
        self.model_dir = str(model_dir)
        self.manifest = read_manifest(model_dir)
        self.cfg = ModelConfig.from_dict(self.manifest['config'])
        self.device, self.dtype, self.offload = torch.device(device), dtype, offload
        self.verify = verify
        self._files = {}
        self._resident = {}
        if offload != 'disk':
            home = self.device if offload == 'device' else torch.device('cpu')
            for filename in [EMBED_FILE, HEAD_FILE] + [block_file(i) for i in range(self.cfg.n_layers)]:
                self._resident[filename] = {name: self._convert(t, home)
                                            for name, t in self._file(filename).tensors().items()}

    # the three things the engine asks for

    def block(self, i):
        """{name: tensor} for block i on the compute device."""
        return self._tensors(block_file(i))

    def head(self):
        """{'norm.weight', 'lm_head.weight'} on the compute device (the embeddings when tied)."""
        tensors = dict(self._tensors(HEAD_FILE))
        if self.cfg.tie_embeddings:
            tensors[HEAD_TENSOR] = self._tensors(EMBED_FILE)[EMBED_TENSOR]
        return tensors

    def embed(self, tokens):
        """Token embeddings [batch, seq, dim] on the device. Only the rows needed are read, so the
        embedding matrix never travels whole."""
        if EMBED_FILE in self._resident:
            table = self._resident[EMBED_FILE][EMBED_TENSOR]
        else:
            table = self._file(EMBED_FILE).tensor(EMBED_TENSOR)
        rows = F.embedding(tokens.to(table.device), table)
        return rows.to(self.device, self.dtype)

    # internals

    def _tensors(self, filename):
        if filename in self._resident:
            return {name: t.to(self.device, non_blocking=True) for name, t in self._resident[filename].items()}
        return {name: self._convert(t, self.device) for name, t in self._file(filename).tensors().items()}

    def _convert(self, tensor, device):
        tensor = tensor.to(device=device, dtype=self.dtype)
        if device.type == 'cpu' and self.device.type == 'cuda':
            tensor = tensor.pin_memory()
        return tensor

    def _file(self, filename):
        if filename not in self._files:
            path = os.path.join(self.model_dir, filename)
            expected = self.manifest['files'].get(filename)
            if expected is None:
                raise SlowLlamaError(f'{self.model_dir}: manifest does not list {filename}; run prepare again')
            size = os.path.getsize(path) if os.path.exists(path) else None
            if size != expected['size']:
                raise SlowLlamaError(f'{path}: {"missing" if size is None else "wrong size"}; '
                                     'the prepared model is damaged, run prepare_model.py again')
            if self.verify and sha256_file(path) != expected['sha256']:
                raise SlowLlamaError(f'{path}: checksum mismatch, the file is corrupt; run prepare_model.py again')
            self._files[filename] = SafetensorsFile(path)
        return self._files[filename]
