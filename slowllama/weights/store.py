"""Where frozen weights live at run time and how they reach the device.

The store hands the engine a block's tensors of a prepared folder (prepared.py) on the compute device
in the compute dtype, from one of three tiers: 'disk' (memory-mapped file, read at each use), 'ram'
(held in host memory, pinned on cuda) or 'device' (all resident); the engine's placement
(engine/placement.py) chooses them.
"""
import math
import mmap
import os

import torch
import torch.nn.functional as F

from ..errors import SlowLlamaError
from ..model.block import block_shapes
from ..model.config import ModelConfig
from ..model.names import EMBED_TENSOR, HEAD_TENSOR, NORM_TENSOR
from ..model.quant import Quant, dequantize, packed_layout, packed_nbytes
from .copier import DeviceCopier, Ready, RowStager, layout_bytes
from .files import ReadTimes, SafetensorsFile
from .packed import Unpacker, check_file_layout, expert_parts, file_layout, part_name, unpack_rows
from .pinned import HostArena
from .prepared import (
    DTYPES,
    EMBED_FILE,
    HEAD_FILE,
    block_file,
    check_file,
    read_manifest,
    table_shapes,
)

OFFLOAD_MODES = ('disk', 'ram', 'device')  # and 'auto', the default


class BlockStore:
    """Frozen weights of a prepared folder, served to the engine on `device` in `dtype`.

    Each file has a tier: 'device' (resident there), 'ram' (host memory, pinned on cuda) or 'disk'
    (memory-mapped, read at each use). The engine asks for a block with block(i), announces the
    next one with prefetch(j) so its copy overlaps the current compute, and hands it back with
    release(i). Streamed blocks go through two preallocated buffers (see DeviceCopier).
    """

    def __init__(self, model_dir, device, dtype, tiers='ram', verify=True, manifest=None):
        """tiers: {filename: tier} (engine/placement.py chooses them), or one tier for every file;
        manifest: the folder's, when the caller has read it already."""
        self.model_dir = str(model_dir)
        self.manifest = manifest or read_manifest(model_dir)
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
        self.tiers = tiers if isinstance(tiers, dict) else uniform_tiers(self.cfg, self.device, tiers)
        self.read_times = ReadTimes()  # how fast the disk tier's block files were read (read_rate)
        self._arena = None  # the RAM tier, one host allocation (pinned on cuda)
        self._resident = self._load_resident()
        self._head_stager = None
        self._held, self._pending = {}, {}
        # what crossed so far: bytes the store read from the model's files (what a disk would serve
        # if nothing were cached) and bytes it copied to the device (0 on a cpu: nothing crosses)
        self.traffic = {'bytes_read': 0, 'bytes_to_device': 0}
        # a MoE block travels in two parts: its attention and router (block()), then the experts its
        # router chose (experts()), each expert's tensors alone; _core: the names of the first part
        self._expert_parts = expert_parts(self._layout, self.cfg.n_experts)
        expert_names = {n for names in self._expert_parts for n in names}
        self._core = [n for n in self._layout if n not in expert_names]
        self._held_experts = {}  # block -> {expert: {weight name: tensor}} fetched while it is held
        if self.cfg.n_experts:
            self.traffic['experts_fetched'] = 0
        self._block_bytes = {'stored': layout_bytes({n: self._stored_layout[n] for n in self._core}),
                             'device': layout_bytes({n: self._layout[n] for n in self._core})}
        # the two slots (and the unpacker's two sets of buffers) hold what every pass fetches: the whole
        # block, or a MoE block's attention and router; its experts get memory as they are fetched
        self._copier = DeviceCopier(self.device, self._layout, dtype, self._core if self.cfg.n_experts else None)
        core_shapes = {n: s for n, s in shapes.items() if not n.startswith('mlp.experts.')}
        self._unpacker = Unpacker(core_shapes, self.quant, self.device, dtype) if self.quant else None
        self._expert_shapes = {n: s for n, s in shapes.items() if n.startswith('mlp.experts.')}
        self._expert_buffers = None
        self._one_expert_shapes = {n.removeprefix('mlp.experts.0.'): s for n, s in self._expert_shapes.items()
                                   if n.startswith('mlp.experts.0.')}  # every expert has expert 0's shapes

    def read_rate(self):
        """Bytes a second the disk tier's block files were read at so far (ReadTimes), None before."""
        return self.read_times.rate()

    def unallocated_device_bytes(self):
        """Device bytes the store will still allocate at its first fetches (the copier's two buffers,
        unless every block is resident or a cpu reads the mapped files as they are): a plan made
        before them leaves them room."""
        streamed = any(self.tiers[block_file(i)] != 'device' for i in range(self.cfg.n_layers))
        zero_copy = self.device.type == 'cpu' and self._layout == self._stored_layout
        return (0 if not streamed or zero_copy else self._copier.unallocated_bytes()) + self._experts_room(streamed)

    def _experts_room(self, streamed):
        """What a MoE model's experts will take as they are fetched (they have no buffers made ahead):
        at worst every expert of the two blocks held at once (a trip of E / k tokens or more hits them
        all), copied where they are not used in place; with --quant packed, and one expert's weights
        unpacked at a time (model/moe.py unpacks each expert only while it computes)."""
        if not self.cfg.n_experts:
            return 0
        names = [n for names in self._expert_parts for n in names]
        in_place = not streamed or (self.device.type == 'cpu' and self._layout == self._stored_layout)
        copies = 0 if in_place else 2 * layout_bytes({n: self._layout[n] for n in names})
        if self.quant is not None:
            return sum(math.prod(shape) for shape in self._one_expert_shapes.values()) * self.dtype.itemsize + (
                0 if self.device.type == 'cpu' or not streamed else copies)
        return copies

    def disk_tier_bytes(self):
        """{'blocks': how many blocks are read from their files at each use, 'block': one block's bytes
        as stored (all of a MoE block's experts: the worst case), 'total': the bytes of every file on
        the disk tier}."""
        on_disk = [f for f, tier in self.tiers.items() if tier == 'disk']
        blocks = sum(f.startswith('block_') for f in on_disk)
        total = sum(self.manifest['files'][f]['size'] for f in on_disk)
        whole = layout_bytes(self._stored_layout)  # a MoE block: at worst every expert is read, and stays mapped
        return {'blocks': blocks, 'block': whole, 'total': total}

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

    def experts(self, i, ids):
        """{e: {'gate_proj.weight', 'up_proj.weight', 'down_proj.weight'}} of held block i's experts
        `ids` on the compute device, unpacked (with --quant) as new tensors each call: for tests and
        tools that want whole weights; a pass asks for packed_experts() and unpacks one at a time."""
        return {e: self.unpack_expert(parts, reuse=False) for e, parts in self.packed_experts(i, ids).items()}

    def packed_experts(self, i, ids):
        """{e: {name: tensor}} of held block i's experts `ids` on the compute device, as stored: with
        --quant their packed parts ('gate_proj.qweight', ...; unpack_expert() makes the weights), else
        their weights. Valid until release(i). Only these experts' bytes are read and travel, once per
        hold (the backward's recompute asks again for the same ones)."""
        held = self._held_experts.setdefault(i, {})
        wanted = [e for e in ids if e not in held]
        if wanted:
            names = [n for e in wanted for n in self._expert_parts[e]]
            filename = block_file(i)
            tier = self.tiers[filename]
            source = self._resident[filename] if tier != 'disk' else self._file(filename).tensors()
            tensors = {n: source[n] for n in names}
            if tier != 'device':
                self._count(layout_bytes({n: self._stored_layout[n] for n in names}) if tier == 'disk' else 0,
                            0 if self.device.type == 'cpu' else layout_bytes({n: self._layout[n] for n in names}))
                tensors = self._copier.bring_now(tensors)
            for e in wanted:
                prefix = f'mlp.experts.{e}.'
                held[e] = {n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)}
            self.traffic['experts_fetched'] += len(wanted)
        return {e: held[e] for e in ids}

    def unpack_expert(self, parts, reuse=True):
        """One expert's {name: tensor} from packed_experts() -> its three weights in the compute dtype,
        unpacked only while that expert computes (a block's experts are never all unpacked at once),
        into the store's one expert's buffers, valid until the next call (reuse=False: new tensors).
        Fresh tensors for each expert grew a CPU's heap by about 4 MB an expert in a block's
        backward, freed but not reused (0.5 GB over a Qwen3-30B-A3B block's 128), where the step had
        planned one expert's. Without --quant the weights themselves."""
        if not self.quant:
            return parts
        if reuse and self._expert_buffers is None:
            self._expert_buffers = {name: torch.empty(shape, dtype=self.dtype, device=self.device)
                                    for name, shape in self._one_expert_shapes.items()}
        return {name: dequantize({part: parts[part_name(name, part)] for part in packed_layout(shape, self.quant)},
                                 shape, self.quant, out=self._expert_buffers[name] if reuse else None,
                                 dtype=self.dtype)
                for name, shape in self._one_expert_shapes.items()}

    def prefetch(self, i):
        """Start bringing block i to the device while the current block computes."""
        if i is None or i in self._held or i in self._pending or not 0 <= i < self.cfg.n_layers:
            return
        self._pending[i] = self._fetch(i)

    def release(self, i):
        self._held_experts.pop(i, None)
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
            self._count(0, self._crossing(filename, (end - start) * self.cfg.dim))
            return self._resident[filename][name][start:end].to(self.device, non_blocking=True)
        rows = self._file(filename).tensor(name)[start:end]  # [slice, dim], mapped
        self._count(rows.nbytes, self._crossing(None, (end - start) * self.cfg.dim))
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
            self._count(0, self._crossing(EMBED_FILE, tokens.numel() * self.cfg.dim))
            return F.embedding(tokens.to(table.device), table).to(self.device, self.dtype)
        mapped = self._file(EMBED_FILE)
        table = mapped.tensor(EMBED_TENSOR)
        self._count(tokens.numel() * self.cfg.dim * table.element_size(),
                    self._crossing(None, tokens.numel() * self.cfg.dim))
        rows = F.embedding(tokens.cpu(), table).to(self.device, self.dtype, copy=True)
        mapped.advise(mmap.MADV_DONTNEED)  # each row read faulted in its neighbours too
        return rows

    # --- internals -----------------------------------------------------------------------

    def _table_rows(self, filename, name, rows):
        """Rows of a packed table (--quant-head), unpacked on the device into a new tensor, so a
        mapped file's pages are let go at once (each row read faulted in its neighbours too)."""
        resident = self._resident.get(filename)
        tensors = resident if resident is not None else self._file(filename).tensors()
        count = rows[1] - rows[0] if isinstance(rows, tuple) else rows.numel()
        packed = packed_nbytes((count, self.cfg.dim), self.quant)  # the rows as they travel
        self._count(0 if resident is not None else packed,
                    0 if self.device.type == 'cpu' or self.tiers[filename] == 'device' else packed)
        out = unpack_rows(tensors, name, self._tables[filename][name], self.quant, rows, self.device, self.dtype)
        if resident is None:
            self._files[filename].advise(mmap.MADV_DONTNEED)
        return out

    def _fetch(self, i):
        filename = block_file(i)
        tier = self.tiers[filename]
        if tier == 'device':
            return Ready(None, self._resident[filename])
        self._count(self._block_bytes['stored'] if tier == 'disk' else 0,
                    0 if self.device.type == 'cpu' else self._block_bytes['device'])
        if tier == 'ram':
            return self._copier.start(self._core_of(self._resident[filename]))
        mapped = self._file(filename)
        if self.cfg.n_experts:  # the experts are read as the router asks for them, not ahead
            return self._copier.start(self._core_of(mapped.tensors()), from_disk=True)
        mapped.advise(mmap.MADV_WILLNEED)  # read-ahead starts now, in the kernel
        stored = self._block_bytes['stored']
        return self._copier.start(mapped.tensors(), from_disk=True,
                                  prefault=lambda: self.read_times.timed(mapped.prefault, stored))

    def _core_of(self, tensors):
        return {n: tensors[n] for n in self._core} if self.cfg.n_experts else tensors

    def _count(self, read, to_device):
        self.traffic['bytes_read'] += read
        self.traffic['bytes_to_device'] += to_device

    def _crossing(self, resident_file, values):
        """Bytes `values` in the compute dtype take to the device: none on a cpu or when they are
        resident there already."""
        if self.device.type == 'cpu' or (resident_file is not None and self.tiers[resident_file] == 'device'):
            return 0
        return values * self.dtype.itemsize

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
            timed = self.read_times if self.tiers.get(filename) == 'disk' else None
            check_file(path, expected, checksum=first_read, read_times=timed)  # the full checksum once per run
            mapped = SafetensorsFile(path)
            if filename not in self._verified:
                layout = self._stored_tables.get(filename, self._stored_layout)
                if filename not in self._tables or self._packed_tables:
                    check_file_layout(path, mapped, layout)
            self._verified.add(filename)
            self._files[filename] = mapped
        return self._files[filename]


def uniform_tiers(cfg, device, offload):
    """{filename: tier}: every file on the tier `offload` names ('device' on a cpu is its RAM)."""
    if offload not in OFFLOAD_MODES:
        raise SlowLlamaError(f'offload: unknown mode {offload!r} (use auto, {", ".join(OFFLOAD_MODES)})')
    tier = 'ram' if offload == 'device' and device.type == 'cpu' else offload
    return {f: tier for f in [EMBED_FILE, HEAD_FILE] + [block_file(i) for i in range(cfg.n_layers)]}
