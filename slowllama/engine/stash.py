"""Saved block inputs between the forward and the backward: on the device while a byte budget
allows, then in host RAM (pinned on cuda), then in a temporary file on disk (in the system's
temporary folder: TMPDIR chooses it). Keys are any hashable: (block, micro-batch) in a trip."""
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from ..errors import SlowLlamaError


class InputStash:
    def __init__(self, device, device_bytes=None, ram_bytes=None):
        self.device = device
        self.budget = {'device': device_bytes, 'ram': ram_bytes}
        self.used = {'device': 0, 'ram': 0}
        self.items = {}
        self._folder = None

    def put(self, key, x):
        tier = self._tier(x.nbytes)
        if tier == 'device' or (tier == 'ram' and self.device.type == 'cpu'):
            self.items[key] = (tier, x)
        elif tier == 'ram':
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=self.device.type == 'cuda')
            self.items[key] = (tier, host.copy_(x, non_blocking=copies_may_return_early(self.device)))
        else:
            name = '_'.join(map(str, key)) if isinstance(key, tuple) else str(key)
            path = os.path.join(self._disk_folder(), f'{name}.safetensors')
            try:
                save_file({'x': x.cpu().contiguous()}, path)
            except OSError as e:
                raise SlowLlamaError(f'{self._folder}: cannot spill the saved block inputs there ({e.strerror or e}); '
                                     'free space there, point TMPDIR at a folder with room, or lower '
                                     '`batch_size` / `micro_batches_per_trip`') from None
            self.items[key] = (tier, path)
        if tier != 'disk':
            self.used[tier] += x.nbytes

    def pop(self, key):
        tier, value = self.items.pop(key)
        if tier == 'disk':
            path, value = value, load_file(value)['x']
            os.unlink(path)
        else:
            self.used[tier] -= value.nbytes
        return value.to(self.device, non_blocking=copies_may_return_early(self.device))

    def close(self):
        self.items.clear()
        if self._folder:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _tier(self, nbytes):
        tiers = ('ram',) if self.device.type == 'cpu' else ('device', 'ram')
        for tier in tiers:
            limit = self.budget[tier]
            if limit is None or self.used[tier] + nbytes <= limit:
                return tier
        return 'disk'

    def _disk_folder(self):
        if self._folder is None:
            try:
                self._folder = tempfile.mkdtemp(prefix='slowllama-inputs-')
            except OSError as e:
                raise SlowLlamaError(f'{tempfile.gettempdir()}: cannot make a folder for the saved block inputs '
                                     f'({e.strerror or e}); point TMPDIR at a writable folder') from None
        return self._folder


def spill_room():
    """Free bytes where saved inputs spill (the system's temporary folder); None when that folder
    cannot be asked (the stash names it if it ever has to write there)."""
    try:
        return shutil.disk_usage(tempfile.gettempdir()).free
    except OSError:
        return None


def copies_may_return_early(device):
    """Whether the stash's copies between host memory and `device` may be non-blocking: only on
    cuda, where a pinned host tensor freed while its copy is queued is kept by torch's caching host
    allocator until the copy is done, and a copy from pageable memory has read it before copy_
    returns. On mps a non-blocking copy from pageable memory may read it after the tensor that
    held it was popped and freed (PyTorch issue 189690: silent corruption), so there it blocks."""
    return device.type == 'cuda'
