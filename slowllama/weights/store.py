"""Where frozen weights live and how they reach the device.

A prepared folder holds one safetensors file per transformer block, one for the embeddings and one
for the final norm and head, and a manifest with the model's shape and a sha256 per file. The store
hands the engine a block's tensors on the compute device in the compute dtype, from one of three
tiers: 'disk' (memory-mapped file, read at each use), 'ram' (held in host memory, pinned on cuda)
or 'device' (all resident).
"""
import mmap
import os
import shutil
import sys

import torch
import torch.nn.functional as F

from ..errors import SlowLlamaError
from ..model.config import ModelConfig, config_errors, read_json
from ..model.names import EMBED_TENSOR, HEAD_TENSOR, NORM_TENSOR, block_tensor_names
from ..model.quant import Quant, parse_quant
from .copier import DeviceCopier, Ready, RowStager
from .files import (SafetensorsFile, clean_leftovers, safetensors_header, sha256_file, staging_dir, swap_dir,
                    write_json, write_safetensors)
from .memory import free_device_memory, free_host_memory, host_share, unified_memory
from .packed import Unpacker, check_file_layout, file_layout, pack_block, unpack_rows
from .pinned import HostArena

FORMAT_NAME = 'slowllama-prepared'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
EMBED_FILE = 'embed.safetensors'
HEAD_FILE = 'head.safetensors'
DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': torch.float32}
OFFLOAD_MODES = ('disk', 'ram', 'device')  # and 'auto', the default


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

    def __init__(self, out, cfg: ModelConfig, dtype, source, quant=None):
        self.out, self.cfg, self.dtype, self.source = str(out), cfg, parse_dtype(dtype), source
        self.quant = parse_quant(quant)  # None: every weight in `dtype`
        self.where = source.get('path', source) if isinstance(source, dict) else source  # for messages
        parent = os.path.dirname(os.path.abspath(self.out))
        os.makedirs(parent, exist_ok=True)
        check_free_space(parent, expected_bytes(cfg, self.dtype), f'prepare into {self.out}')
        announce(clean_leftovers(self.out))
        self.staging = staging_dir(self.out)
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
        path = os.path.join(self.staging, name)
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
        swap_in(self.staging, self.out)

    def abort(self):
        shutil.rmtree(self.staging, ignore_errors=True)

    def _check(self, name, tensor, shape):
        if tensor is None or tuple(tensor.shape) != tuple(shape):
            got = None if tensor is None else tuple(tensor.shape)
            raise SlowLlamaError(f'{self.where}: {name} has shape {got}, the config needs {tuple(shape)}')


def expected_bytes(cfg: ModelConfig, dtype):
    from .plan import model_params
    return model_params(cfg) * dtype.itemsize


def check_free_space(folder, needed, what):
    """Refuse before writing anything when the disk cannot hold `needed` bytes (plus 1% slack)."""
    free = shutil.disk_usage(folder).free
    if free < needed * 1.01:
        raise SlowLlamaError(f'{what}: needs {needed / 1e9:.2f} GB but {folder} has {free / 1e9:.2f} GB free')


def table_shapes(cfg: ModelConfig):
    """{filename: {name: shape}} of the embeddings file and the norm-and-head file."""
    head = {NORM_TENSOR: (cfg.dim,)} | ({} if cfg.tie_embeddings else {HEAD_TENSOR: (cfg.vocab_size, cfg.dim)})
    return {EMBED_FILE: {EMBED_TENSOR: (cfg.vocab_size, cfg.dim)}, HEAD_FILE: head}


def block_shapes(cfg: ModelConfig):
    """{our name: shape} of one block's tensors, those of the model's family only."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {
        'self_attn.q_proj.weight': (q, cfg.dim), 'self_attn.k_proj.weight': (kv, cfg.dim),
        'self_attn.v_proj.weight': (kv, cfg.dim), 'self_attn.o_proj.weight': (cfg.dim, q),
        'mlp.gate_proj.weight': (cfg.hidden_dim, cfg.dim), 'mlp.up_proj.weight': (cfg.hidden_dim, cfg.dim),
        'mlp.down_proj.weight': (cfg.dim, cfg.hidden_dim),
        'input_layernorm.weight': (cfg.dim,), 'post_attention_layernorm.weight': (cfg.dim,),
        'self_attn.q_proj.bias': (q,), 'self_attn.k_proj.bias': (kv,), 'self_attn.v_proj.bias': (kv,),
        'self_attn.q_norm.weight': (cfg.head_dim,), 'self_attn.k_norm.weight': (cfg.head_dim,),
    }
    return {name: shapes[name] for name in block_tensor_names(cfg)}


def verify_files(folder, files, progress_desc=None):
    """Check the size and sha256 of every file listed ({name: {'size', 'sha256'}}) in `folder`."""
    from ..progress import progress
    names = sorted(files)
    for name in progress(names, desc=progress_desc, unit='file') if progress_desc else names:
        check_file(os.path.join(folder, name), files[name])


def check_file(path, expected, checksum=True):
    """Size always, sha256 too when `checksum`; a mismatch names the file and says what to do."""
    if not os.path.exists(path) or os.path.getsize(path) != expected['size']:
        raise SlowLlamaError(f'{path}: missing or wrong size; the prepared model is damaged, '
                             'run prepare_model.py again')
    if checksum and sha256_file(path) != expected['sha256']:
        raise SlowLlamaError(f'{path}: checksum mismatch, the file is corrupt; run prepare_model.py again')


def verify_model(model_dir):
    """Full check of a prepared folder against its manifest (the `verify` command, --verify)."""
    verify_files(str(model_dir), read_manifest(model_dir)['files'], progress_desc='verify')


def swap_in(staging, out):
    swap_dir(staging, out)  # `out` is the old folder or the new one at every instant


def announce(found):
    """Say what an interrupted earlier write left behind (clean_leftovers' sentence), if anything."""
    if found:
        print(found, file=sys.stderr, flush=True)


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
            and all(os.path.basename(name) == name for name in files)  # nothing outside the folder
            and isinstance(tokenizer, list) and all(isinstance(n, str) and n in files for n in tokenizer))


def _is_size(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class BlockStore:
    """Frozen weights of a prepared folder, served to the engine on `device` in `dtype`.

    Each file has a tier: 'device' (resident there), 'ram' (host memory, pinned on cuda) or 'disk'
    (memory-mapped, read at each use). The engine asks for a block with block(i), announces the
    next one with prefetch(j) so its copy overlaps the current compute, and hands it back with
    release(i). Streamed blocks go through two preallocated buffers (see DeviceCopier).
    """

    def __init__(self, model_dir, device, dtype, offload='auto', verify=True, max_device_mem=None,
                 max_ram=None, batch_hint=(4, 512)):
        self.model_dir = str(model_dir)
        self.manifest = read_manifest(model_dir)
        self.cfg = ModelConfig.from_dict(self.manifest['config'])
        self.device, self.dtype, self.verify = torch.device(device), dtype, verify
        self.quant = Quant.from_dict(self.manifest.get('quant'))  # packed projections travel packed
        shapes = block_shapes(self.cfg)
        self._stored_layout = file_layout(shapes, self.quant, DTYPES[self.manifest['dtype']])
        self._layout = file_layout(shapes, self.quant, dtype)  # what a block is on the device, before unpacking
        self._tables = table_shapes(self.cfg)
        self._packed_tables = self.quant is not None and self.quant.head  # --quant-head
        self._stored_tables = {f: file_layout(shapes, self.quant, DTYPES[self.manifest['dtype']])
                               for f, shapes in self._tables.items()}
        self._files, self._verified = {}, set()
        self.tiers = placement(self.cfg, self.device, dtype, offload, self.manifest['dtype'], max_device_mem,
                               max_ram, batch_hint, self.quant)
        self._arena = None  # the RAM tier, one host allocation (pinned on cuda)
        self._resident = self._load_resident()
        self._copier = DeviceCopier(self.device, self._layout, dtype)
        self._unpacker = Unpacker(shapes, self.quant, self.device, dtype) if self.quant else None
        self._head_stager = None
        self._held, self._pending = {}, {}

    @property
    def offload(self):
        tiers = set(self.tiers[block_file(i)] for i in range(self.cfg.n_layers))
        return tiers.pop() if len(tiers) == 1 else 'mixed'

    # --- what the engine asks for --------------------------------------------------------

    def block(self, i):
        """{name: tensor} for block i on the compute device; valid until release(i)."""
        if i not in self._held:
            ticket = self._pending.pop(i, None) or self._fetch(i)
            try:
                slot, tensors = ticket.wait()
                buffers = None
                if self._unpacker:  # dequantized here, on the compute device, just before use
                    buffers, tensors = self._unpacker.unpack(tensors)
            except BaseException:  # a failed read, copy or unpack, out of memory, Ctrl-C: the slot comes back
                self._discard(ticket)
                raise
            self._held[i] = slot, buffers, tensors
        return self._held[i][2]

    def prefetch(self, i):
        """Start bringing block i to the device while the current block computes."""
        if i is None or i in self._held or i in self._pending or not 0 <= i < self.cfg.n_layers:
            return
        self._pending[i] = self._fetch(i)

    def release(self, i):
        slot, buffers, _ = self._held.pop(i, (None, None, None))
        self._copier.release(slot)
        if self._unpacker:
            self._unpacker.release(buffers)
        filename = block_file(i)
        if self.tiers[filename] == 'disk' and filename in self._files:
            self._files[filename].advise(mmap.MADV_DONTNEED)

    def release_all(self):
        for i in list(self._held):
            self.release(i)
        while self._pending:  # one at a time: a second Ctrl-C leaves the rest for the next call
            self._discard(self._pending.popitem()[1])

    def _discard(self, ticket):
        """Give back the slot of a fetch that will not be used, once the reader thread has let go
        (interrupted while waiting, the slot still comes back: the reader thread runs one fetch at a
        time, so its next work on the slot starts after this one)."""
        try:
            ticket.settle()
        finally:
            self._copier.release(ticket.slot)

    def head_norm(self):
        """The final norm's weight on the compute device."""
        return self._whole(HEAD_FILE, NORM_TENSOR)

    def head_rows(self, start, end):
        """Rows [start, end) of the output head (the embeddings when tied) on the compute device. The
        head is hundreds of MB at 7B and above, so the engine takes it a vocabulary slice at a time
        and hands each slice back with release_head_rows()."""
        filename, name = self._head_source()
        if self._packed_tables:
            return self._table_rows(filename, name, (start, end))
        if filename in self._resident:
            return self._resident[filename][name][start:end].to(self.device, non_blocking=True)
        rows = self._file(filename).tensor(name)[start:end]  # [slice, dim], mapped
        if self.device.type == 'cpu':
            return rows.to(self.dtype)  # used in place when the dtypes match
        if self._head_stager is None:
            self._head_stager = RowStager(self._copier.queue, self.cfg.dim, self.dtype)
        return self._head_stager.bring(rows)

    def release_head_rows(self, start, end):
        """Rows read from a mapped file leave this process's memory (they stay in the page cache)."""
        filename, name = self._head_source()
        if filename in self._files and not self._packed_tables:  # packed: let go when unpacked
            self._files[filename].advise_rows(name, start, end, mmap.MADV_DONTNEED)

    def _head_source(self):
        return (EMBED_FILE, EMBED_TENSOR) if self.cfg.tie_embeddings else (HEAD_FILE, HEAD_TENSOR)

    def embed(self, tokens):
        """Token embeddings [batch, seq, dim] on the device. Only the rows needed are read, so the
        embedding matrix never travels whole."""
        if self._packed_tables:
            rows = self._table_rows(EMBED_FILE, EMBED_TENSOR, tokens.reshape(-1).long())
            return rows.view(*tokens.shape, self.cfg.dim)
        if EMBED_FILE in self._resident:
            table = self._resident[EMBED_FILE][EMBED_TENSOR]
            return F.embedding(tokens.to(table.device), table).to(self.device, self.dtype)
        mapped = self._file(EMBED_FILE)
        rows = F.embedding(tokens.cpu(), mapped.tensor(EMBED_TENSOR)).to(self.device, self.dtype, copy=True)
        mapped.advise(mmap.MADV_DONTNEED)  # each row read faulted in its neighbours too
        return rows

    # --- internals -----------------------------------------------------------------------

    def _table_rows(self, filename, name, rows):
        """Rows of a packed table (--quant-head), unpacked on the device into a new tensor, so a
        mapped file's pages are let go at once (each row read faulted in its neighbours too)."""
        resident = self._resident.get(filename)
        tensors = resident if resident is not None else self._file(filename).tensors()
        out = unpack_rows(tensors, name, self._tables[filename][name], self.quant, rows, self.device, self.dtype)
        if resident is None:
            self._files[filename].advise(mmap.MADV_DONTNEED)
        return out

    def _fetch(self, i):
        filename = block_file(i)
        tier = self.tiers[filename]
        if tier == 'device':
            return Ready(None, self._resident[filename])
        if tier == 'ram':
            return self._copier.start(self._resident[filename])
        mapped = self._file(filename)
        mapped.advise(mmap.MADV_WILLNEED)  # read-ahead starts now, in the kernel
        return self._copier.start(mapped.tensors(), from_disk=True)

    def _whole(self, filename, name):
        if filename in self._resident:
            return self._resident[filename][name].to(self.device, non_blocking=True)
        return self._file(filename).tensor(name).to(self.device, self.dtype, copy=True)

    def _load_resident(self):
        """{filename: {name: tensor}} for every file not on the disk tier: those on the device copied
        there, those in RAM into one host arena (pinned on cuda); blocks as they travel (packed
        projections stay packed), the tables in the compute dtype."""
        in_ram = [f for f, tier in self.tiers.items() if tier == 'ram']
        specs = {(f, name): (self._file(f).shape(name), self._resident_dtype(f, name))
                 for f in in_ram for name in self._file(f).names()}
        self._arena = HostArena(specs, pin=self.device.type == 'cuda')
        resident = {}
        for filename, tier in self.tiers.items():
            if tier == 'disk':
                continue
            tensors = {}
            for name, t in self._file(filename).tensors().items():
                if tier == 'ram':
                    tensors[name] = self._arena.tensors[(filename, name)].copy_(t)
                else:
                    tensors[name] = t.to(self.device, self._resident_dtype(filename, name), copy=True)
            self._files.pop(filename).advise(mmap.MADV_DONTNEED)
            resident[filename] = tensors
        return resident

    def _resident_dtype(self, filename, name):
        if filename in self._tables:  # the tables in the compute dtype, their packed parts as stored
            packed_part = name not in self._tables[filename] and name in self._stored_tables[filename]
            return self._stored_tables[filename][name][1] if packed_part else self.dtype
        return self._layout[name][1]

    def _file(self, filename):
        if filename not in self._files:
            path = os.path.join(self.model_dir, filename)
            expected = self.manifest['files'].get(filename)
            if expected is None:
                raise SlowLlamaError(f'{self.model_dir}: manifest does not list {filename}; run prepare again')
            first_read = self.verify and filename not in self._verified
            check_file(path, expected, checksum=first_read)  # the full checksum once per run
            mapped = SafetensorsFile(path)
            if filename not in self._verified:
                layout = self._stored_tables.get(filename, self._stored_layout)
                if filename not in self._tables or self._packed_tables:
                    check_file_layout(path, mapped, layout)
            self._verified.add(filename)
            self._files[filename] = mapped
        return self._files[filename]


# --- placement -----------------------------------------------------------------------------

def placement(cfg, device, dtype, offload, stored_dtype, max_device_mem=None, max_ram=None,
              batch_hint=(4, 512), quant=None):
    """{filename: 'device' | 'ram' | 'disk'}. 'auto' asks the planner how many blocks fit on the
    device and in RAM within the free memory and the --max-device-mem / --max-ram caps."""
    if offload not in OFFLOAD_MODES + ('auto',):
        raise SlowLlamaError(f'--offload: unknown mode {offload!r} (use auto, {", ".join(OFFLOAD_MODES)})')
    blocks = [block_file(i) for i in range(cfg.n_layers)]
    if offload != 'auto':
        tier = 'ram' if offload == 'device' and device.type == 'cpu' else offload
        return {f: tier for f in [EMBED_FILE, HEAD_FILE] + blocks}
    if device.type == 'cpu':
        # the page cache already is the RAM tier: mmap'd blocks cost no copy when dtypes match
        tier = 'disk' if DTYPES[stored_dtype] == dtype else 'ram'
        if tier == 'ram' and _over(cfg, dtype, free_host_memory() // host_share(), max_ram):
            tier = 'disk'
        return {f: tier for f in [EMBED_FILE, HEAD_FILE] + blocks}
    from .plan import place_blocks
    ram_budget = _cap(free_host_memory() // host_share(), max_ram)  # torchrun: each its share
    if unified_memory(device):  # one memory: no RAM tier beside the device, host buffers count there
        ram_budget = 0
    plan = place_blocks(cfg, *batch_hint, dtype=dtype_name(dtype), quant=quant,
                        device_budget=_cap(free_device_memory(device), max_device_mem),
                        ram_budget=ram_budget, unified=unified_memory(device))
    tiers = {f: 'device' if i < plan.resident_blocks else 'ram' if i < plan.resident_blocks + plan.ram_blocks
             else 'disk' for i, f in enumerate(blocks)}
    everything_fits = plan.resident_blocks == cfg.n_layers
    tiers[HEAD_FILE] = 'device' if everything_fits else 'ram' if plan.ram_blocks else 'disk'
    tiers[EMBED_FILE] = 'device' if everything_fits else 'ram' if plan.ram_blocks else 'disk'
    return tiers


def _cap(free, cap):
    return int(0.9 * free) if cap is None else min(int(0.9 * free), int(cap))


def _over(cfg, dtype, free, cap):
    from .plan import model_params
    return model_params(cfg) * dtype.itemsize > _cap(free, cap)
