"""The step's plan, made once from the run's settings (EngineOptions) and the memory free at load:
how many micro-batches travel together, which blocks keep their activations, and where the saved
inputs wait. The trip (trip.py) follows the StepPlan it is handed; the arithmetic is plan.py's.

The step the run declared (grad_accum micro-batches of step_rows x batch_hint's positions) is planned
when the model loads, so that what cannot fit is refused before a run starts. A step of that shape,
or of fewer micro-batches (a micro-batch with no counted target is left out), runs on that plan; a
step of a shape never declared (a Python caller's own batch) is planned once when it first comes."""
import dataclasses

from ..weights.host_memory import (
    HeapTrimmer,
    free_device_memory,
    free_host_memory,
    host_share,
    unified_memory,
)
from ..weights.prepared import dtype_name
from .plan import CPU_RUNTIME_BYTES, cap_budget, plan_step, step_working_bytes
from .stash import spill_room


class StepPlanner:
    def __init__(self, store, lora, dropout, options, trim_host_heap):
        self.store, self.cfg, self.lora, self.dropout, self.options = store, store.cfg, lora, dropout, options
        self.device, self.dtype = store.device, store.dtype
        self.trim_host_heap = trim_host_heap
        self._read_rate = None  # the disk's rate the plans were made with (known after the first reads)
        mapped = store.disk_tier_bytes()  # the tiers are set at load: whether every block streams from disk
        self._streams_every_block = (options.keep_activations == 'auto' and self.device.type == 'cpu'
                                     and mapped['blocks'] == self.cfg.n_layers and not self.cfg.n_experts)
        self._block_file_bytes = mapped['block']
        self._at_load = self._budgets()  # a plan made again for the disk's rate keeps these
        self._declared = self._plan(*options.step_shape, budgets=self._at_load)
        self._other = None  # (shape, (plan, heap slack)) of the last step of another shape
        self.current = self._declared[0]  # the plan of the last step (what the trainer's log describes)

    def for_step(self, micro_batches, batch, seq, packed=False):
        """The StepPlan a step of `micro_batches` of batch x seq runs on."""
        self._replan_at_read_rate()
        _, rows, positions, declared_packed = self.options.step_shape
        declared = (batch, seq, packed) == (rows, positions, declared_packed)
        if declared and micro_batches <= self._declared[0].micro_batches:
            plan, slack = self._declared
        else:
            shape = (micro_batches, batch, seq, packed)
            if self._other is None or self._other[0] != shape:
                self._other = shape, self._plan(*shape)
            plan, slack = self._other[1]
        if isinstance(self.trim_host_heap, HeapTrimmer):  # what the next step reuses stays in the heap
            self.trim_host_heap.slack = slack
        self.current = plan
        return plan

    def _replan_at_read_rate(self):
        """Plan again where every block is read from disk on a cpu, once the run's reads told the
        disk's rate, and whenever it moved twofold since: which blocks keep their activations then
        weighs their recompute against the page cache (keep_cost.fastest_kept)."""
        rate = self.store.read_rate() if self._streams_every_block else None
        if rate is None or (self._read_rate is not None and 0.5 < rate / self._read_rate < 2):
            return
        self._read_rate = rate
        weighed = self._plan(*self.options.step_shape, budgets=self._at_load)
        if weighed[0] != self._declared[0]:  # the same plan stays the same object (and is not logged again)
            self._declared, self._other = weighed, None

    def _plan(self, micro_batches, batch, seq, packed, budgets=None):
        """-> (StepPlan, the heap slack its steps reuse). Raises SlowLlamaError when what was asked
        cannot fit (keep_activations all, say). budgets: _budgets() as measured at load (the memory
        free now, by default: the steps so far took some of it already, for what the next reuses)."""
        budget, ram, page_cache, ram_files, in_flight = budgets or self._budgets()
        dtype = dtype_name(self.dtype)
        working = step_working_bytes(self.cfg, batch, seq, dtype, micro_batches)
        plan = plan_step(
            self.cfg, batch, seq, dtype, micro_batches, budget, ram, disk_budget=spill_room(),
            block_files=page_cache, ram_files=ram_files, in_flight=in_flight,
            trip=self.options.micro_batches_per_trip, keep=self.options.keep_activations,
            working=working, host_heap=self.device.type == 'cpu',
            targets=self.lora.targets, rank=self.lora.rank, dropout=self.dropout, lora_dropout=self.lora.dropout,
            device_type=self.device.type, packed=packed, packed_experts=self.store.quant is not None,
            disk_reads=self._read_rate and (self._block_file_bytes, self._read_rate))
        return self._with_stash_caps(plan), max(HeapTrimmer.SLACK, plan.kept_bytes + working)

    def _with_stash_caps(self, plan):
        """Where a trip's saved inputs wait: the plan's room on the device, then RAM (on a cpu both are
        the host's), then disk; a cap given at load wins."""
        device_cap, ram_cap = self.options.stash_device_bytes, self.options.stash_ram_bytes
        device_room = plan.stash_device_bytes if device_cap is None else device_cap
        ram_room = plan.stash_ram_bytes if ram_cap is None else ram_cap
        if self.device.type == 'cpu':
            ram_room = device_room if ram_cap is None else ram_cap
        return dataclasses.replace(plan, stash_device_bytes=device_room, stash_ram_bytes=ram_room)

    def _budgets(self):
        """-> (bytes the step may take on the device, host bytes for what spills there, the bytes of the
        block files the page cache would keep in the device's memory, those it would keep in host RAM
        beside a separate device, the bytes of the blocks held at once already taken off the first).
        A cpu or a Mac: the one memory, less the blocks the store holds mapped at once; where blocks
        are read from files the page cache would like to keep them, and kept activations leave it
        their bytes where they fit beside the step (plan.page_cache_reserve). cuda: its free memory,
        and the RAM the pinned tier leaves beside it, where the disk tier's files are cached the same
        way beside the spill (plan_limits.ram_page_cache). 90% of what is free, within max_device_mem
        / max_ram (cap_budget): the last tenth is the system's headroom."""
        store, options = self.store, self.options
        mapped = store.disk_tier_bytes()
        if self.device.type == 'cpu' or unified_memory(self.device):
            free = free_host_memory() if self.device.type == 'cpu' else free_device_memory(self.device)
            held = 2 * mapped['block'] if mapped['blocks'] else 0  # the last two blocks stay for the backward
            # what a cpu process takes after load beside the step's planned tensors (autograd's and
            # the thread pools' memory, the head's slices, the heap's slack): measured 140-190 MB
            grows = CPU_RUNTIME_BYTES if self.device.type == 'cpu' else 0
            budget = (min(cap_budget(free) - grows, cap_budget(free, options.max_device_mem))
                      - store.unallocated_device_bytes() - held)
            return max(0, budget), 0, mapped['total'], 0, held
        unallocated = store.unallocated_device_bytes()  # the copier's two block buffers
        budget = cap_budget(free_device_memory(self.device), options.max_device_mem) - unallocated
        ram = cap_budget(free_host_memory() // host_share(), options.max_ram)
        return max(0, budget), ram, 0, mapped['total'], unallocated
