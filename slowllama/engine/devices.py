"""Choosing the device and compute dtype once, at load, and saving/restoring its RNG state."""

import torch

from ..errors import SlowLlamaError


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
        raise SlowLlamaError(f'device: unknown device {name!r} (use cpu, cuda or mps)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SlowLlamaError('device cuda: no CUDA device is available here')
    if device.type == 'mps' and not torch.backends.mps.is_available():
        raise SlowLlamaError('device mps: no Apple GPU (mps) is available here (it needs Apple silicon with macOS '
                             '14 or later, or macOS 13 with torch 2.7 or 2.8)')
    if device.type not in ('cpu', 'cuda', 'mps'):
        raise SlowLlamaError(f'device: {name!r} is not supported (use cpu, cuda or mps)')
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
