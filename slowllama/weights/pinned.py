"""Host memory for weights on their way to the device: one allocation per tier (the blocks held in
RAM with the embeddings and head, or the two staging buffers of disk reads), each tensor a view
into it.

torch's pinned allocator rounds every allocation up to a power of two: a Llama-2-7B block's 386 MiB
of weights would pin 512 MiB, an all-RAM 13B 41 GiB for 24. So on cuda an arena is plain memory,
allocated once and registered with the driver (cudaHostRegister): the pinned bytes are the bytes
the planner counted. Where registering is not possible it falls back to torch's pinned allocator,
rounding included. mps shares one memory with the host and a cpu copies nothing: no pinning there.
"""
import math
import weakref

import torch

ROW_STAGING_BYTES = 32 << 20  # each of the two buffers that stage a mapped head's rows (copier.RowStager)
ALIGNMENT = 16384  # every tensor starts on a page (Apple silicon's are 16 KiB), so on a cache line too


def arena_layout(specs, alignment=ALIGNMENT):
    """{key: (shape, dtype)} -> ({key: byte offset}, total bytes), each offset aligned."""
    offsets, end = {}, 0
    for key, (shape, dtype) in specs.items():
        start = -(-end // alignment) * alignment
        offsets[key] = start
        end = start + math.prod(shape) * dtype.itemsize
    return offsets, -(-end // alignment) * alignment


def arena_bytes(specs):
    return arena_layout(specs)[1]


class HostArena:
    """arena.tensors[key]: an uninitialised tensor of that key's shape and dtype, a view into one
    allocation of arena.nbytes bytes, pinned when `pin`."""

    def __init__(self, specs, pin=False):
        offsets, self.nbytes = arena_layout(specs)
        raw = torch.empty(self.nbytes + ALIGNMENT, dtype=torch.uint8)
        shift = -raw.data_ptr() % ALIGNMENT  # offsets count from a page boundary
        self.memory = raw[shift:shift + self.nbytes]
        self.pinned = False
        if pin and self.nbytes:
            self.pinned = _register(self.memory)
            if not self.pinned:
                self.memory = self.memory.pin_memory()  # rounded up, but pinned
                self.pinned = True
        self.tensors = {key: self._view(offsets[key], shape, dtype) for key, (shape, dtype) in specs.items()}

    def _view(self, offset, shape, dtype):
        nbytes = math.prod(shape) * dtype.itemsize
        return self.memory[offset:offset + nbytes].view(dtype).view(shape)


def _register(memory):
    """Pin `memory` in place (cudaHostRegister); unregistered when the arena's memory is freed.
    -> False where the runtime offers no registering."""
    try:
        cudart = torch.cuda.cudart()
        error = cudart.cudaHostRegister(memory.data_ptr(), memory.numel(), 0)
    except (AttributeError, AssertionError, RuntimeError):  # no cudart bindings in this build
        return False
    if int(error) != 0:
        return False
    weakref.finalize(memory, cudart.cudaHostUnregister, memory.data_ptr())
    return True
