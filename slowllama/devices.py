"""Choosing the device and compute dtype once, at load, and saving/restoring its RNG state."""
import ctypes
import ctypes.util
import sys

import torch

from .errors import SlowLlamaError


def best_device():
    if torch.cuda.is_available():
        return 'cuda'
    if torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


def resolve_device(name):
    """'cuda' / 'cuda:1' / 'mps' / 'cpu' / None (best) -> torch.device, refusing one that is not there."""
    if name in (None, '', 'auto'):
        name = best_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SlowLlamaError(f'--device: unknown device {name!r} (use cpu, cuda or mps)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SlowLlamaError('--device cuda: no CUDA device is available here')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise SlowLlamaError('--device mps: no Apple GPU (mps) is available here')
    if device.type not in ('cpu', 'cuda', 'mps'):
        raise SlowLlamaError(f'--device: {name!r} is not supported (use cpu, cuda or mps)')
    return device


def compute_dtype(device, dtype):
    """The dtype to compute in: bf16 falls back to fp16 on mps builds without bf16 support."""
    if device.type == 'mps' and dtype == torch.bfloat16:
        try:
            torch.ones(1, device=device, dtype=torch.bfloat16) * 2
        except (RuntimeError, TypeError):
            return torch.float16
    return dtype


def get_rng_state(device):
    """The RNG states that dropout on `device` draws from (the CPU one always)."""
    state = {'cpu': torch.get_rng_state()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    elif device.type == 'mps':
        state['mps'] = torch.mps.get_rng_state()
    return state


def set_rng_state(device, state):
    torch.set_rng_state(state['cpu'])
    if 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)
    if 'mps' in state:
        torch.mps.set_rng_state(state['mps'])


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


def return_large_frees_to_os(threshold=1 << 20):
    """Make glibc serve allocations above `threshold` with their own mappings, given back on free.
    By default glibc raises that threshold as large buffers are freed and then keeps freed
    activations in its heap, so host memory grows by hundreds of MB over the first steps."""
    if not sys.platform.startswith('linux'):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; setting it also stops the dynamic raise
    except (OSError, AttributeError):
        pass
