"""How a streamed block reaches the compute device: two reused device buffers (double buffering), a
reader thread for disk reads and dtype conversion, pinned staging, and the copy queue; and the
same for the rows of a mapped head. Used by the store; knows nothing of files or placement."""
import math
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import torch

from .pinned import ROW_STAGING_BYTES, HostArena
from .streams import CopyQueue


def layout_bytes(layout):
    """Bytes of a block's {name: (shape, dtype)}."""
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())


class DeviceCopier:
    """Brings streamed blocks to the device in their compute dtype, through two preallocated device
    buffers (double buffering), so block i+1 travels while block i computes.

    The copies go through a CopyQueue (a side stream on cuda, the one queue on mps), and a buffer is
    only overwritten once the compute that read it is done. A block read from disk is first read by
    a background thread into a pinned staging buffer, converted there to the compute dtype (the
    reads, page faults and conversion would otherwise hold up the thread that launches the compute,
    and a dtype-changing copy would make a device temporary), then copied. On a cpu there is nothing
    to copy when the file's dtype is the compute dtype (the mapped file is used as it is); otherwise
    the conversion into the buffer runs in the background thread. On mps the reader thread only
    fills the staging buffer: the copy out of it is queued by the compute thread when it takes the
    block (a queue driven from one thread only, see streams.py; mps has one queue, so the copy
    could not overlap anything the compute thread queues anyway).

    A fetch holds one of the two slots from start() to release(slot); a fetch that fails after
    claiming one must still be released (BlockStore does)."""

    def __init__(self, device, layout, dtype, travelling=None):
        """layout: {name: (shape, dtype)} of a block on the device; travelling: the names that go
        through the two slots (default all). A MoE block's experts are not among them: how many of
        them a pass needs is known only once its router has run, so they come by bring_now()."""
        self.device, self.dtype, self.full_layout = device, dtype, layout
        self.layout = layout if travelling is None else {n: layout[n] for n in travelling}
        self.on_cpu = device.type == 'cpu'
        self.queue = CopyQueue(device)
        self._buffers, self._staging = [None, None], None
        self._free_events, self._copied_events, self._in_use = [None, None], [None, None], [False, False]
        self._reader = None

    def start(self, host_tensors, from_disk=False, prefault=None):
        """Start bringing a block's host tensors to the device. prefault: for a block read from a
        mapped file, what reads it into memory (on a cpu the mapped pages are used as they are: the
        reader thread faults them in while the current block computes, so the disk and the compute
        work at once)."""
        if self.on_cpu and all(t.dtype == self.layout[n][1] for n, t in host_tensors.items()):
            if from_disk and prefault is not None:
                return Pending(None, self._in_background(self._faulted_in, prefault, host_tensors), self.queue)
            return Ready(None, host_tensors)  # zero-copy: the compute reads the mapped pages
        slot = self._claim()
        try:
            if self.on_cpu:
                return Pending(slot, self._in_background(self._convert, slot, host_tensors), self.queue)
            if from_disk or any(t.dtype != self.layout[n][1] for n, t in host_tensors.items()):
                return self._staged(slot, host_tensors)
            return Ready(slot, *self._copy(slot, host_tensors), queue=self.queue)
        except BaseException:  # out of memory allocating the buffers, Ctrl-C
            self.release(slot)
            raise

    def bring_now(self, host_tensors):
        """More tensors of a held block (a MoE block's experts, known only once its router has run)
        on the device, ready before the compute goes on -> {name: tensor}. They get memory of their
        own, as many as were asked for (not a whole block's worth per slot), freed when the caller
        lets go of them; the copy is queued on the compute queue, so it comes before its use."""
        layout = self.full_layout
        if self.on_cpu and all(t.dtype == layout[n][1] for n, t in host_tensors.items()):
            return host_tensors  # zero-copy, as start()
        return {name: torch.empty(layout[name][0], dtype=layout[name][1], device=self.device).copy_(tensor)
                for name, tensor in host_tensors.items()}

    def release(self, slot):
        if slot is None:
            return
        self._free_events[slot] = self.queue.after_compute()  # the compute that read the buffer
        self._in_use[slot] = False

    def unallocated_bytes(self):
        """Device bytes of the buffers not allocated yet (they are made at the first copies)."""
        return layout_bytes(self.layout) * sum(buffers is None for buffers in self._buffers)

    def _claim(self):
        if all(self._in_use):
            raise RuntimeError('both copy slots are taken: a block was fetched and never released')
        slot = self._in_use.index(False)
        self._in_use[slot] = True
        return slot

    @staticmethod
    def _faulted_in(prefault, host_tensors):  # cpu, in the reader thread
        prefault()
        return host_tensors, None

    def _in_background(self, work, slot, host_tensors):
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix='slowllama-read')
        return self._reader.submit(work, slot, host_tensors)

    def _convert(self, slot, host_tensors):  # cpu, in the reader thread
        buffers = self._slot_buffers(slot)
        for name, tensor in host_tensors.items():
            buffers[name].copy_(tensor)
        return buffers, None

    def _staged(self, slot, host_tensors):
        """A fetch through the slot's staging buffer, filled in the reader thread."""
        if not self.queue.one_thread:  # cuda: the reader thread queues the copy on the side stream too
            return Pending(slot, self._in_background(self._stage_and_copy, slot, host_tensors), self.queue)
        self.queue.host_waits(self._copied_events[slot])  # the last copy out of this staging buffer is done
        filled = self._in_background(self._stage, slot, host_tensors)
        return Pending(slot, filled, self.queue, then=lambda staging: self._copy(slot, staging))

    def _stage_and_copy(self, slot, host_tensors):  # cuda, in the reader thread
        self.queue.host_waits(self._copied_events[slot])  # the last copy out of this staging buffer is done
        return self._copy(slot, self._stage(slot, host_tensors))

    def _stage(self, slot, host_tensors):  # in the reader thread: nothing here touches the device's queue
        staging = self._staging_slot(slot)
        for name, tensor in host_tensors.items():
            staging[name].copy_(tensor)  # the disk read and the dtype conversion, on the host
        return staging

    def _copy(self, slot, host_tensors):  # on the copy queue, after the buffer's last reader
        buffers = self._slot_buffers(slot)
        pairs = [(buffers[name], tensor) for name, tensor in host_tensors.items()]
        self._copied_events[slot] = self.queue.copy(pairs, after=self._free_events[slot])
        return buffers, self._copied_events[slot]

    def _slot_buffers(self, slot):
        if self._buffers[slot] is None:
            self._buffers[slot] = {n: torch.empty(s, device=self.device, dtype=dtype)
                                   for n, (s, dtype) in self.layout.items()}
        return self._buffers[slot]

    def _staging_slot(self, slot):
        """Slot's half of one host arena for both staging buffers, as the block travels (the compute
        dtype; packed projections packed)."""
        if self._staging is None:
            specs = {(s, n): spec for s in (0, 1) for n, spec in self.layout.items()}
            self._staging = HostArena(specs, pin=self.device.type == 'cuda')
        return {n: self._staging.tensors[(slot, n)] for n in self.layout}


class Ready:
    """A fetch whose tensors can be used once the compute waits for `copied` (None: now)."""

    def __init__(self, slot, tensors, copied=None, queue=None):
        self.slot, self.tensors, self.copied, self.queue = slot, tensors, copied, queue

    def wait(self):
        if self.queue is not None:
            self.queue.compute_waits(self.copied)
        return self.slot, self.tensors

    def settle(self):
        pass


class Pending:
    """A fetch running in the reader thread; `then` (mps) queues its copy from the thread that
    takes the block."""

    def __init__(self, slot, future, queue, then=None):
        self.slot, self.future, self.queue, self.then = slot, future, queue, then

    def wait(self):
        result = self.future.result()
        if self.then is not None:
            result = self.then(result)
        return Ready(self.slot, *result, queue=self.queue).wait()

    def settle(self):
        """Wait until the reader thread is done with the buffers, whether it succeeded or not."""
        futures.wait([self.future])


class RowStager:
    """Rows of a mapped table (the head, a vocabulary slice at a time) to the device through two
    pinned host buffers of ROW_STAGING_BYTES each, as blocks travel: a copy from pageable memory
    would make the host wait for everything queued on the device, once per slice. A slice larger
    than a buffer (generation takes the whole vocabulary at once) goes in chunks. The copies are
    queued on the compute stream: the slices are small, what matters is that nothing waits."""

    def __init__(self, queue, dim, dtype):
        self.queue = queue
        self.rows = max(1, ROW_STAGING_BYTES // (dim * dtype.itemsize))
        self.arena = HostArena({0: ((self.rows, dim), dtype), 1: ((self.rows, dim), dtype)},
                               pin=queue.device.type == 'cuda')
        self._copied, self._turn = [None, None], 0

    def bring(self, rows):
        """rows [n, dim] (mapped, any dtype) -> a copy on the device in the buffers' dtype."""
        dtype = self.arena.tensors[0].dtype
        on_device = torch.empty(rows.shape, dtype=dtype, device=self.queue.device)
        for start in range(0, rows.shape[0], self.rows):
            chunk = rows[start:start + self.rows]
            turn, self._turn = self._turn, 1 - self._turn
            self.queue.host_waits(self._copied[turn])  # the copy out of this buffer, two chunks ago
            staging = self.arena.tensors[turn][:chunk.shape[0]]
            staging.copy_(chunk)  # the page faults and the dtype conversion, on the host
            on_device[start:start + chunk.shape[0]].copy_(staging, non_blocking=True)
            self._copied[turn] = self.queue.after_compute()
        return on_device
