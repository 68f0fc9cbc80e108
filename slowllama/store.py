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
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from .config import ModelConfig, config_errors, read_json
from .errors import SlowLlamaError
from .files import (SafetensorsFile, clean_leftovers, safetensors_header, sha256_file, staging_dir, swap_dir,
                    write_json, write_safetensors)
from .names import BLOCK_TENSORS, EMBED_TENSOR, HEAD_TENSOR, NORM_TENSOR

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

    def __init__(self, out, cfg: ModelConfig, dtype, source):
        self.out, self.cfg, self.dtype, self.source = str(out), cfg, parse_dtype(dtype), source
        self.where = source.get('path', source) if isinstance(source, dict) else source  # for messages
        parent = os.path.dirname(os.path.abspath(self.out))
        os.makedirs(parent, exist_ok=True)
        check_free_space(parent, expected_bytes(cfg, self.dtype), f'prepare into {self.out}')
        announce(clean_leftovers(self.out))
        self.staging = staging_dir(self.out)
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
            raise SlowLlamaError(f'{self.where}: layer {i} lacks {sorted(missing)}')
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
            raise SlowLlamaError(f'{self.where}: incomplete model, nothing written for {missing[:3]}')
        verify_files(self.staging, self.files)  # what reached the disk is what we meant to write
        write_json(os.path.join(self.staging, MANIFEST), {
            'format': FORMAT_NAME, 'version': FORMAT_VERSION, 'config': self.cfg.to_dict(),
            'dtype': dtype_name(self.dtype), 'source': self.source, 'tokenizer': self.tokenizer_files,
            'files': self.files})
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


def block_shapes(cfg: ModelConfig):
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {
        'self_attn.q_proj.weight': (q, cfg.dim), 'self_attn.k_proj.weight': (kv, cfg.dim),
        'self_attn.v_proj.weight': (kv, cfg.dim), 'self_attn.o_proj.weight': (cfg.dim, q),
        'mlp.gate_proj.weight': (cfg.hidden_dim, cfg.dim), 'mlp.up_proj.weight': (cfg.hidden_dim, cfg.dim),
        'mlp.down_proj.weight': (cfg.dim, cfg.hidden_dim),
        'input_layernorm.weight': (cfg.dim,), 'post_attention_layernorm.weight': (cfg.dim,),
    }


def verify_files(folder, files, progress_desc=None):
    """Check the size and sha256 of every file listed ({name: {'size', 'sha256'}}) in `folder`."""
    from .progress import progress
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


def check_manifest(model_dir, manifest, path):
    """The manifest's config has sane types and ranges, and the tensors in the files (their headers
    only) have the shapes it implies: nothing is sized from the config before this holds."""
    with config_errors(path):
        cfg = ModelConfig.from_dict(manifest.get('config'))
    if not _fields_ok(manifest):
        raise SlowLlamaError(f'{path}: damaged manifest (files, dtype, source or tokenizer); '
                             'run prepare_model.py again')
    files = manifest['files']
    expected = {block_file(i): block_shapes(cfg) for i in range(cfg.n_layers)}
    expected[EMBED_FILE] = {EMBED_TENSOR: (cfg.vocab_size, cfg.dim)}
    expected[HEAD_FILE] = {NORM_TENSOR: (cfg.dim,)}
    if not cfg.tie_embeddings:
        expected[HEAD_FILE][HEAD_TENSOR] = (cfg.vocab_size, cfg.dim)
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
        self._files, self._verified = {}, set()
        self.tiers = placement(self.cfg, self.device, dtype, offload, self.manifest['dtype'], max_device_mem,
                               max_ram, batch_hint)
        self._resident = {f: self._load_resident(f, tier) for f, tier in self.tiers.items() if tier != 'disk'}
        self._copier = DeviceCopier(self.device, block_shapes(self.cfg), dtype)
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
            self._held[i] = ticket.wait()
        return self._held[i][1]

    def prefetch(self, i):
        """Start bringing block i to the device while the current block computes."""
        if i is None or i in self._held or i in self._pending or not 0 <= i < self.cfg.n_layers:
            return
        self._pending[i] = self._fetch(i)

    def release(self, i):
        slot, _ = self._held.pop(i, (None, None))
        self._copier.release(slot)
        filename = block_file(i)
        if self.tiers[filename] == 'disk' and filename in self._files:
            self._files[filename].advise(mmap.MADV_DONTNEED)

    def release_all(self):
        for i in list(self._held):
            self.release(i)
        for ticket in self._pending.values():
            ticket.settle()
            self._copier.release(ticket.slot)
        self._pending.clear()

    def head_norm(self):
        """The final norm's weight on the compute device."""
        return self._whole(HEAD_FILE, NORM_TENSOR)

    def head_rows(self, start, end):
        """Rows [start, end) of the output head (the embeddings when tied) on the compute device. The
        head is hundreds of MB at 7B and above, so the engine takes it a vocabulary slice at a time
        and hands each slice back with release_head_rows()."""
        filename, name = self._head_source()
        if filename in self._resident:
            return self._resident[filename][name][start:end].to(self.device, non_blocking=True)
        return self._file(filename).tensor(name)[start:end].to(self.device, self.dtype)

    def release_head_rows(self, start, end):
        """Rows read from a mapped file leave this process's memory (they stay in the page cache)."""
        filename, name = self._head_source()
        if filename in self._files:
            self._files[filename].advise_rows(name, start, end, mmap.MADV_DONTNEED)

    def _head_source(self):
        return (EMBED_FILE, EMBED_TENSOR) if self.cfg.tie_embeddings else (HEAD_FILE, HEAD_TENSOR)

    def embed(self, tokens):
        """Token embeddings [batch, seq, dim] on the device. Only the rows needed are read, so the
        embedding matrix never travels whole."""
        if EMBED_FILE in self._resident:
            table = self._resident[EMBED_FILE][EMBED_TENSOR]
            return F.embedding(tokens.to(table.device), table).to(self.device, self.dtype)
        mapped = self._file(EMBED_FILE)
        rows = F.embedding(tokens.cpu(), mapped.tensor(EMBED_TENSOR)).to(self.device, self.dtype, copy=True)
        mapped.advise(mmap.MADV_DONTNEED)  # each row read faulted in its neighbours too
        return rows

    # --- internals -----------------------------------------------------------------------

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

    def _load_resident(self, filename, tier):
        home = self.device if tier == 'device' else torch.device('cpu')
        pin = tier == 'ram' and self.device.type == 'cuda'
        tensors = {}
        for name, t in self._file(filename).tensors().items():
            t = t.to(home, self.dtype, copy=True)
            tensors[name] = t.pin_memory() if pin else t
        self._files.pop(filename).advise(mmap.MADV_DONTNEED)
        return tensors

    def _file(self, filename):
        if filename not in self._files:
            path = os.path.join(self.model_dir, filename)
            expected = self.manifest['files'].get(filename)
            if expected is None:
                raise SlowLlamaError(f'{self.model_dir}: manifest does not list {filename}; run prepare again')
            first_read = self.verify and filename not in self._verified
            check_file(path, expected, checksum=first_read)  # the full checksum once per run
            self._verified.add(filename)
            self._files[filename] = SafetensorsFile(path)
        return self._files[filename]


class DeviceCopier:
    """Brings streamed blocks to the device in their compute dtype, through two preallocated device
    buffers (double buffering), so block i+1 travels while block i computes.

    On cuda the host -> device copy runs on a side stream, and a buffer is only overwritten once the
    compute that read it is done. A block read from disk is first read into a pinned staging buffer
    by a background thread (the reads and page faults would otherwise hold up the thread that
    launches the compute), then copied. On a cpu there is nothing to copy when the file's dtype is
    the compute dtype (the mapped file is used as it is); otherwise the conversion into the buffer
    runs in the background thread."""

    def __init__(self, device, shapes, dtype):
        self.device, self.dtype, self.shapes = device, dtype, shapes
        self.cuda, self.on_cpu = device.type == 'cuda', device.type == 'cpu'
        self._buffers, self._staging = [None, None], [None, None]
        self._free_events, self._copied_events, self._in_use = [None, None], [None, None], [False, False]
        self._reader = None
        if self.cuda:
            self._stream = torch.cuda.Stream(device)

    def start(self, host_tensors, from_disk=False):
        if self.on_cpu and all(t.dtype == self.dtype for t in host_tensors.values()):
            return Ready(None, host_tensors)  # zero-copy: the compute reads the mapped pages
        if not self.on_cpu and not self.cuda:  # mps: the copy is queued on its own stream already
            return Ready(None, {n: t.to(self.device, self.dtype) for n, t in host_tensors.items()})
        slot = self._in_use.index(False)  # the engine holds at most one block while one is pending
        self._in_use[slot] = True
        if self.on_cpu:
            return Pending(slot, self._read_in_background(self._convert, slot, host_tensors))
        if from_disk:
            return Pending(slot, self._read_in_background(self._stage_and_copy, slot, host_tensors))
        return Ready(slot, *self._copy(slot, host_tensors))

    def release(self, slot):
        if slot is None:
            return
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))  # the compute that read the buffer
            self._free_events[slot] = event
        self._in_use[slot] = False

    def _read_in_background(self, work, slot, host_tensors):
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix='slowllama-read')
        return self._reader.submit(work, slot, host_tensors)

    def _convert(self, slot, host_tensors):  # cpu, in the reader thread
        buffers = self._slot_buffers(slot)
        for name, tensor in host_tensors.items():
            buffers[name].copy_(tensor)
        return buffers, None

    def _stage_and_copy(self, slot, host_tensors):  # cuda, in the reader thread
        if self._copied_events[slot] is not None:
            self._copied_events[slot].synchronize()  # the last copy out of this staging buffer is done
        if self._staging[slot] is None:
            self._staging[slot] = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                                   for n, t in host_tensors.items()}
        staging = self._staging[slot]
        for name, tensor in host_tensors.items():
            staging[name].copy_(tensor)
        return self._copy(slot, staging)

    def _copy(self, slot, host_tensors):  # cuda: on the side stream, after the buffer's last reader
        buffers = self._slot_buffers(slot)
        with torch.cuda.stream(self._stream):
            if self._free_events[slot] is not None:
                self._stream.wait_event(self._free_events[slot])
            for name, tensor in host_tensors.items():
                buffers[name].copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        self._copied_events[slot] = done
        return buffers, done

    def _slot_buffers(self, slot):
        if self._buffers[slot] is None:
            self._buffers[slot] = {n: torch.empty(s, device=self.device, dtype=self.dtype)
                                   for n, s in self.shapes.items()}
        return self._buffers[slot]


class Ready:
    """A fetch whose tensors can be used now (on cuda: once the compute stream waits for `copied`)."""

    def __init__(self, slot, tensors, copied=None):
        self.slot, self.tensors, self.copied = slot, tensors, copied

    def wait(self):
        if self.copied is not None:
            device = next(iter(self.tensors.values())).device
            torch.cuda.current_stream(device).wait_event(self.copied)
        return self.slot, self.tensors

    def settle(self):
        pass


class Pending:
    """A fetch running in the reader thread."""

    def __init__(self, slot, future):
        self.slot, self.future = slot, future

    def wait(self):
        return Ready(self.slot, *self.future.result()).wait()

    def settle(self):
        """Wait until the reader thread is done with the buffers, whether it succeeded or not."""
        futures.wait([self.future])


# --- placement -----------------------------------------------------------------------------

def placement(cfg, device, dtype, offload, stored_dtype, max_device_mem=None, max_ram=None,
              batch_hint=(4, 512)):
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
        if tier == 'ram' and _over(cfg, dtype, free_host_memory(), max_ram):
            tier = 'disk'
        return {f: tier for f in [EMBED_FILE, HEAD_FILE] + blocks}
    from .plan import place_blocks
    plan = place_blocks(cfg, *batch_hint, dtype=dtype_name(dtype),
                        device_budget=_cap(free_device_memory(device), max_device_mem),
                        ram_budget=_cap(free_host_memory(), max_ram))
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


def free_device_memory(device):
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    if device.type == 'mps':
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    return free_host_memory()


def free_host_memory():
    try:
        with open('/proc/meminfo') as f:
            info = dict(line.split(':', 1) for line in f)
        return int(info['MemAvailable'].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 * 1024 ** 3  # macOS and others: a conservative guess
