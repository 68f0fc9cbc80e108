"""The prepared folder as a file format: one safetensors file per transformer block, one for the
embeddings and one for the final norm and head, the tokenizer files, and a manifest with the model's
shape, dtype, source and a size and sha256 per file. Here: the writer (staged beside the folder and
swapped in whole), the manifest and its checks against the files' headers, and verify. The runtime
that serves the blocks to the device is store.py.
"""
import math
import os
import shutil

import torch

from ..errors import SlowLlamaError
from ..model.config import ModelConfig, config_errors
from ..model.block import block_shapes
from ..model.names import EMBED_TENSOR, HEAD_TENSOR, NORM_TENSOR
from ..model.quant import Quant, parse_quant
from .files import (announce, clean_leftovers, read_json, safetensors_header, sha256_file, staging_dir, swap_dir,
                    write_json, write_safetensors)
from .packed import file_layout, pack_block

FORMAT_NAME = 'slowllama-prepared'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
EMBED_FILE = 'embed.safetensors'
HEAD_FILE = 'head.safetensors'
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}


def block_file(i):
    return f'block_{i:03d}.safetensors'


def parse_dtype(name, flag='dtype'):
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

    def __init__(self, out, cfg: ModelConfig, dtype, source, quant=None):
        self.out, self.cfg, self.dtype, self.source = str(out), cfg, parse_dtype(dtype), source
        self.quant = parse_quant(quant)  # None: every weight in `dtype`
        self.where = source.get('path', source) if isinstance(source, dict) else source  # for messages
        parent = os.path.dirname(os.path.abspath(self.out))
        os.makedirs(parent, exist_ok=True)
        check_free_space(parent, expected_bytes(cfg, self.dtype, self.quant), f'prepare into {self.out}')
        self.staging = staging_dir(self.out)  # what a killed earlier prepare left is removed first
        self.files = {}
        self.tokenizer_files = []

    def write(self, filename, tensors, keep_dtype=()):
        tensors = {k: v.to(self.dtype) if v.is_floating_point() and k not in keep_dtype else v
                   for k, v in tensors.items()}
        path = os.path.join(self.staging, filename)
        self.files[filename] = {'sha256': write_safetensors(path, tensors), 'size': os.path.getsize(path)}

    def write_embed(self, weight):
        self._check(EMBED_TENSOR, weight, (self.cfg.vocab_size, self.cfg.dim))
        self._write_table(EMBED_FILE, {EMBED_TENSOR: weight})

    def write_block(self, i, tensors):
        shapes = block_shapes(self.cfg)
        missing = set(shapes) - set(tensors)
        if missing:
            raise SlowLlamaError(f'{self.where}: layer {i} lacks {sorted(missing)}')
        for name, shape in shapes.items():
            if not isinstance(tensors[name], dict):  # a dict: parts packed already (GGUF's Q8_0)
                self._check(f'layer {i} {name}', tensors[name], shape)
        block = {name: tensors[name] for name in shapes}
        if self.quant is None:
            self.write(block_file(i), block)
            return
        # projections packed from the source's own values (not from their `dtype` rounding)
        packed = pack_block(block, self.quant, self.where)
        layout = file_layout(shapes, self.quant, self.dtype)
        for name, (shape, dtype) in layout.items():
            if tuple(packed[name].shape) != shape or (packed[name].dtype != dtype and name not in shapes):
                raise SlowLlamaError(f'{self.where}: layer {i} {name} packs to {tuple(packed[name].shape)} '
                                     f'{packed[name].dtype}, the config needs {shape} {dtype}')
        self.write(block_file(i), packed, keep_dtype=set(layout) - set(shapes))

    def write_head(self, norm, lm_head=None):
        self._check(NORM_TENSOR, norm, (self.cfg.dim,))
        tensors = {NORM_TENSOR: norm}
        if not self.cfg.tie_embeddings:
            self._check(HEAD_TENSOR, lm_head, (self.cfg.vocab_size, self.cfg.dim))
            tensors[HEAD_TENSOR] = lm_head
        self._write_table(HEAD_FILE, tensors)

    def _write_table(self, filename, tensors):
        """The embeddings or head file: with --quant-head the table packed (from the source's own
        values), the final norm in `dtype`."""
        if self.quant is None or not self.quant.head:
            return self.write(filename, tensors)
        packed = pack_block(tensors, self.quant, self.where, rows=True)
        self.write(filename, packed, keep_dtype=set(packed) - set(tensors))

    def add_tokenizer_file(self, name, data: bytes):
        """A tokenizer file, or a chat template (additional_chat_templates/NAME.jinja: the one
        sub-folder a prepared folder has, where transformers looks for named templates)."""
        path = os.path.join(self.staging, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as f:
            f.write(data)
        self.tokenizer_files.append(name)
        self.files[name] = {'sha256': sha256_file(path), 'size': os.path.getsize(path)}

    def finish(self):
        expected = [EMBED_FILE, HEAD_FILE] + [block_file(i) for i in range(self.cfg.n_layers)]
        missing = [f for f in expected if f not in self.files]
        if missing:
            raise SlowLlamaError(f'{self.where}: incomplete model, nothing written for {missing[:3]}')
        verify_files(self.staging, self.files)  # what reached the disk is what we meant to write
        write_json(os.path.join(self.staging, MANIFEST), {
            'format': FORMAT_NAME, 'version': FORMAT_VERSION, 'config': self.cfg.to_dict(),
            'dtype': dtype_name(self.dtype), 'source': self.source, 'tokenizer': self.tokenizer_files,
            'files': self.files} | ({'quant': self.quant.to_dict()} if self.quant else {}))
        swap_dir(self.staging, self.out)  # `out` is the old folder or the new one at every instant

    def abort(self):
        shutil.rmtree(self.staging, ignore_errors=True)

    def _check(self, name, tensor, shape):
        if tensor is None or tuple(tensor.shape) != tuple(shape):
            got = None if tensor is None else tuple(tensor.shape)
            raise SlowLlamaError(f'{self.where}: {name} has shape {got}, the config needs {tuple(shape)}')


def expected_bytes(cfg: ModelConfig, dtype, quant=None):
    """The files' bytes: every weight in `dtype`, or the projections (and with --quant-head the
    tables) packed (a packed model's check of free space must not ask for its float size)."""
    if quant is None:
        return model_params(cfg) * dtype.itemsize
    layouts = [file_layout(shapes, quant, dtype) for shapes in table_shapes(cfg).values()]
    layouts += [file_layout(block_shapes(cfg), quant, dtype)] * cfg.n_layers
    return sum(math.prod(shape) * dt.itemsize for layout in layouts for shape, dt in layout.values())


def model_params(cfg: ModelConfig):
    """The weights of the prepared files: every block, the embeddings, the final norm, an untied head."""
    block = sum(math.prod(shape) for shape in block_shapes(cfg).values())
    tables = sum(math.prod(shape) for shapes in table_shapes(cfg).values() for shape in shapes.values())
    return cfg.n_layers * block + tables


def check_free_space(folder, needed, what):
    """Refuse before writing anything when the disk cannot hold `needed` bytes (plus 1% slack)."""
    free = shutil.disk_usage(folder).free
    if free < needed * 1.01:
        raise SlowLlamaError(f'{what}: needs {needed / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free')


def table_shapes(cfg: ModelConfig):
    """{filename: {name: shape}} of the embeddings file and the norm-and-head file."""
    head = {NORM_TENSOR: (cfg.dim,)} | ({} if cfg.tie_embeddings else {HEAD_TENSOR: (cfg.vocab_size, cfg.dim)})
    return {EMBED_FILE: {EMBED_TENSOR: (cfg.vocab_size, cfg.dim)}, HEAD_FILE: head}


def verify_files(folder, files, progress_desc=None):
    """Check the size and sha256 of every file listed ({name: {'size', 'sha256'}}) in `folder`."""
    from ..progress import progress
    names = sorted(files)
    for name in progress(names, desc=progress_desc, unit='file') if progress_desc else names:
        check_file(os.path.join(folder, name), files[name])


def check_file(path, expected, checksum=True, read_times=None):
    """Size always, sha256 too when `checksum` (its reads timed into `read_times`, a files.ReadTimes);
    a mismatch names the file and says what to do."""
    if not os.path.exists(path) or os.path.getsize(path) != expected['size']:
        raise SlowLlamaError(f'{path}: missing or wrong size; the prepared model is damaged, '
                             'run prepare_model.py again')
    if checksum and sha256_file(path, read_times=read_times) != expected['sha256']:
        raise SlowLlamaError(f'{path}: checksum mismatch, the file is corrupt; run prepare_model.py again')


def verify_model(model_dir):
    """Full check of a prepared folder against its manifest (the `verify` command, --verify)."""
    verify_files(str(model_dir), read_manifest(model_dir)['files'], progress_desc='verify')


# --- reading a prepared folder -------------------------------------------------------------

def read_manifest(model_dir):
    path = os.path.join(str(model_dir), MANIFEST)
    if not os.path.isdir(str(model_dir)):
        found = clean_leftovers(model_dir)  # a prepare killed mid-way: say so; an old folder may come back
        if not os.path.isdir(str(model_dir)):
            raise SlowLlamaError(f'{model_dir}: model folder not found (run prepare_model.py first)'
                                 + (f'; {found}' if found else ''))
        announce(found)
    manifest = read_json(path, 'manifest of a prepared model (run prepare_model.py)')
    if (not isinstance(manifest, dict) or manifest.get('format') != FORMAT_NAME
            or manifest.get('version') != FORMAT_VERSION):
        raise SlowLlamaError(f'{path}: not a slowllama prepared model of version {FORMAT_VERSION}; '
                             'run prepare_model.py again')
    check_manifest(str(model_dir), manifest, path)
    return manifest


def model_config(model_dir):
    """(ModelConfig, Quant or None) of a prepared folder, from its manifest."""
    manifest = read_manifest(model_dir)
    return ModelConfig.from_dict(manifest['config']), Quant.from_dict(manifest.get('quant'))


def check_manifest(model_dir, manifest, path):
    """The manifest's config has sane types and ranges, and the tensors in the files (their headers
    only) have the shapes it implies: nothing is sized from the config before this holds."""
    with config_errors(path):
        cfg = ModelConfig.from_dict(manifest.get('config'))
    if not _fields_ok(manifest):
        raise SlowLlamaError(f'{path}: damaged manifest (files, dtype, source or tokenizer); '
                             'run prepare_model.py again')
    files = manifest['files']
    with config_errors(path):
        quant = Quant.from_dict(manifest.get('quant'))
    stored = file_layout(block_shapes(cfg), quant, DTYPES[manifest['dtype']])  # packed parts, when quantized
    expected = {block_file(i): {name: shape for name, (shape, _) in stored.items()} for i in range(cfg.n_layers)}
    for filename, shapes in table_shapes(cfg).items():  # packed with --quant-head
        layout = file_layout(shapes, quant, DTYPES[manifest['dtype']])
        expected[filename] = {name: shape for name, (shape, _) in layout.items()}
    unlisted = [name for name in expected if name not in files]
    if unlisted:
        raise SlowLlamaError(f'{path}: the config needs {unlisted[0]}, which the manifest does not list; '
                             'run prepare_model.py again')
    for filename, shapes in expected.items():
        file_path = os.path.join(model_dir, filename)
        if not os.path.exists(file_path):
            continue  # check_file names it when it is read
        entries = safetensors_header(file_path)
        for name, shape in shapes.items():
            if name not in entries or tuple(entries[name]['shape']) != shape:
                got = tuple(entries[name]['shape']) if name in entries else None
                raise SlowLlamaError(f'{file_path}: {name} has shape {got}, the manifest\'s config needs '
                                     f'{shape}; run prepare_model.py again')


def _fields_ok(manifest):
    files, tokenizer = manifest.get('files'), manifest.get('tokenizer', [])
    return (isinstance(files, dict) and isinstance(manifest.get('dtype'), str) and manifest['dtype'] in DTYPES
            and isinstance(manifest.get('source', {}), dict)
            and all(isinstance(e, dict) and _is_size(e.get('size')) and isinstance(e.get('sha256'), str)
                    for e in files.values())
            and all(_inside(name) for name in files)
            and isinstance(tokenizer, list) and all(isinstance(n, str) and n in files for n in tokenizer))


def _inside(name):
    """A file of the folder itself or of one sub-folder (named chat templates): nothing outside it."""
    parts = name.split('/')
    return len(parts) <= 2 and all(p and p not in ('.', '..') and '\\' not in p for p in parts)


def _is_size(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
