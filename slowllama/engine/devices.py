"""Choosing the device and compute dtype once, at load, and saving/restoring its RNG state."""
import ctypes

import torch

from ..errors import SlowLlamaError
from ..weights.files import glibc


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
        raise SlowLlamaError('--device mps: no Apple GPU (mps) is available here (it needs Apple silicon with macOS '
                             '14 or later, or macOS 13 with torch 2.7 or 2.8)')
    if device.type not in ('cpu', 'cuda', 'mps'):
        raise SlowLlamaError(f'--device: {name!r} is not supported (use cpu, cuda or mps)')
    return device


def default_dtype(device, dtype=None):
    """The dtype name to compute in unless --dtype says otherwise: fp32 on the CPU (fast and exact
    there), bf16 on GPUs."""
    return dtype or ('fp32' if device.type == 'cpu' else 'bf16')


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


def seeded_rng_state(device, seed):
    """The RNG states get_rng_state would give right after seeding with `seed` (nothing is reseeded)."""
    state = {'cpu': torch.Generator().manual_seed(seed).get_state()}
    if device.type == 'cuda':
        state['cuda'] = torch.Generator(device=device).manual_seed(seed).get_state()
    elif device.type == 'mps':  # the one mps generator, seeded for a moment and put back
        held = torch.mps.get_rng_state()
        torch.mps.manual_seed(seed)
        state['mps'] = torch.mps.get_rng_state()
        torch.mps.set_rng_state(held)
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


class HeapTrimmer:
    """glibc keeps the memory of freed tensors in its heap: reusing it is fast (no page faults, no
    zeroing), but the process's resident memory then only grows, by hundreds of MB on a CPU run.
    Called every few blocks of the backward (where autograd's saved tensors and gradients come and
    go), it gives the free part back when it exceeds `slack`: measured on a 0.4B model on CPU, that
    keeps the speed of reuse within a few percent and the memory gained near what is live. The
    step's plan raises the slack to what every step takes again (kept activations and the working
    set): handing that back would only make the next step fault it in again, page by page (a step
    keeping 0.8 GB of activations faulted 427,000 pages back in, against 9,000 untrimmed).
    A no-op where glibc is not the allocator."""
    SLACK = 16 << 20

    def __init__(self, slack=SLACK):
        self.slack, self._libc = slack, glibc()
        try:
            if self._libc is not None:
                self._libc.mallinfo2.restype = _MallInfo2
        except AttributeError:  # not glibc, or older than 2.33
            self._libc = None

    def __call__(self):
        if self._libc is not None and self._libc.mallinfo2().fordblks > self.slack:
            self._libc.malloc_trim(0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]
