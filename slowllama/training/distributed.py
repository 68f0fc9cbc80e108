"""Data parallel training on torch.distributed, started by torchrun.

Each process streams the blocks itself and takes its own rows of every global batch; the
gradients of the trainable parameters are summed with all-reduce before each optimizer step, so N
processes with batch B end where one process with batch N x B ends. nccl on cuda, gloo elsewhere.
Only rank 0 writes checkpoints, metrics and logs; every process evaluates its share.
"""
import gc
import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import SlowLlamaError


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self):
        return self.world > 1

    @property
    def is_main(self):
        return self.rank == 0

    def rows(self, batch_rows):
        """The slice of a global batch of `batch_rows` rows that this process trains on."""
        if batch_rows % self.world:
            raise SlowLlamaError(f'a global batch of {batch_rows} rows does not split over {self.world} processes')
        share = batch_rows // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def sum_(self, tensors):
        """In-place all-reduce (sum) of a list of tensors, as one flat buffer."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def sum_float(self, value, device):
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t)

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.active:
            dist.barrier()


SINGLE = Group()


SLOWEST_READ = 100e6  # bytes/s: a model read from a hard disk, the slowest tier a pass can take
MIN_TIMEOUT = timedelta(minutes=30)


def collective_timeout(model_bytes, grad_accum=1, eval_batches=0, sample_tokens=0):
    """How long a process waits in a collective for the others before the run is declared hung:
    twice the longest stretch between two collectives, in streamed passes over the model (a step:
    a forward and a recomputation per micro-batch; an evaluation: its validation batches, and a
    pass per sampled token), each read at worst from a hard disk; at least 30 minutes. nccl's
    default of 10 minutes would end a disk-tier 70B run in its first evaluation."""
    passes = max(2 * grad_accum, eval_batches + (sample_tokens + 1 if sample_tokens else 0))
    return max(MIN_TIMEOUT, timedelta(seconds=math.ceil(2 * passes * model_bytes / SLOWEST_READ)))


def init_from_env(device_name=None, timeout=MIN_TIMEOUT):
    """-> (Group, device name). Under torchrun (WORLD_SIZE > 1) joins the process group: nccl with
    one GPU per process (cuda:LOCAL_RANK) on cuda, gloo on cpu; `timeout` for every collective."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return SINGLE, device_name
    rank, local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', '0'))
    from ..engine.devices import best_device
    kind = (device_name or best_device()).split(':')[0]
    if kind == 'mps':
        raise SlowLlamaError('device mps: torch.distributed has no mps backend; use cpu or cuda')
    if not dist.is_initialized():
        dist.init_process_group('nccl' if kind == 'cuda' else 'gloo', timeout=timeout)
    if kind == 'cuda':
        torch.cuda.set_device(local_rank)
        return Group(rank, world, local_rank), f'cuda:{local_rank}'
    return Group(rank, world, local_rank), 'cpu'


def shutdown(ok=True):
    """Leave the process group. After a successful run every process first waits for the others:
    tearing gloo down while a peer is still exiting can abort the process."""
    if dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()
    # what still refers to the group (work handles, gathered objects in reference cycles) goes now,
    # while the interpreter is whole: gloo's threads torn down at interpreter exit abort the process
    gc.collect()
