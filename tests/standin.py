"""A stand-in Apple GPU on this cpu, so the mps branches of the real code run here (tests/test_mps.py).

Within `standin_mps(monkeypatch)`, 'mps' is the cpu under another name: a tensor made or moved there
is an OnMps, a cpu tensor whose .device says mps, so every `device.type == 'mps'` branch is taken,
and the arithmetic is the cpu's, so a run compares with a cpu run bit for bit. torch's
device-generic stream and event API (torch.accelerator, torch.Event, torch.Stream) is replaced by
fakes, so the real CopyQueue is built for mps and driven by the real copier; torch.mps' RNG, memory
and synchronize functions answer as a Mac would.

What it records, for the tests to check the rules the mps path must keep:
- `queue_calls`: (what, thread name) of every call on mps' one queue (an event recorded, waited
  for or synchronized, a wait_event, a copy queued through CopyQueue): MPS encoding is not
  thread-safe, so all of them must come from the thread that launches the compute;
- `transfers`: (from, to, non_blocking, thread name) of every copy between the host and 'mps';
- `freed_early`: host tensors copied to 'mps' without blocking that were freed before anything
  showed the copy done (an event after it synchronized, a blocking copy): on mps such a copy from
  pageable memory reads it late, so that would be silent corruption;
- `calls`: (torch function, its tensor arguments) of the functions in WATCHED.

torch function modes are per thread: the copier's reader thread enters the stand-in too, so what it
does on 'mps' is recorded with its name.
"""
import contextlib
import functools
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.overrides import TorchFunctionMode

MPS = torch.device('mps')
WATCHED = (torch.multinomial, torch.nn.functional.scaled_dot_product_attention)


class OnMps(torch.Tensor):
    """A cpu tensor that says it lives on mps; what is computed from it does too."""

    @property
    def device(self):
        return MPS

    @property
    def is_cpu(self):
        return False


class StandInMps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.queue_calls, self.transfers, self.freed_early, self.calls = [], [], [], []
        self.copies_queued, self._unread = 0, {}  # copy number -> what it reads, until shown done

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.to:
            return self._to(args[0], *args[1:], **kwargs)
        if func is torch.Tensor.cpu:
            return self._to(args[0], 'cpu')
        if func is torch.Tensor.copy_:
            non_blocking = kwargs.get('non_blocking', args[2] if len(args) > 2 else False)
            self._transfer(args[1], args[0].device, non_blocking)
        if func in WATCHED:
            self.calls.append((func, [a for a in args if isinstance(a, torch.Tensor)]))
        made_on_mps = _device_type(kwargs.get('device')) == 'mps'
        if made_on_mps:
            kwargs['device'] = 'cpu'
        result = func(*args, **kwargs)
        return _on_mps(result) if made_on_mps else result

    def _to(self, tensor, *args, copy=False, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        target = device or tensor.device
        moved = target.type != tensor.device.type
        if moved:
            self._transfer(tensor, target, non_blocking)
        plain = tensor.as_subclass(torch.Tensor).to(dtype or tensor.dtype, copy=copy or moved)
        return _on_mps(plain) if target.type == 'mps' else plain

    def _transfer(self, source, target, non_blocking):
        kinds = (source.device.type, target.type)
        if set(kinds) != {'cpu', 'mps'}:
            return
        self.transfers.append((*kinds, bool(non_blocking), threading.current_thread().name))
        if not non_blocking:
            self.done_up_to(self.copies_queued)  # a blocking copy waits for everything queued
        elif kinds == ('cpu', 'mps'):
            self.copies_queued += 1
            self._read_late(source, self.copies_queued)

    def _read_late(self, source, number):
        """The copy may read `source` until shown done: its memory (a view's base) must live that long."""
        memory = source if source._base is None else source._base
        self._unread[number] = repr(tuple(source.shape))
        finalizer = weakref.finalize(memory, self._freed, number)
        finalizer.atexit = False

    def _freed(self, number):
        if number in self._unread:
            self.freed_early.append(self._unread.pop(number))

    def done_up_to(self, number):
        for n in [n for n in self._unread if n <= number]:
            del self._unread[n]

    def queue_call(self, what):
        self.queue_calls.append((what, threading.current_thread().name))


def _device_type(device):
    return None if device is None else torch.device(device).type


def _on_mps(result):
    if isinstance(result, torch.Tensor) and not isinstance(result, OnMps):
        return result.as_subclass(OnMps)
    return result


class FakeEvent:
    def __init__(self, standin):
        self.standin, self.after = standin, 0

    def record(self, stream=None):
        self.standin.queue_call('event.record')
        self.after = self.standin.copies_queued

    def synchronize(self):
        self.standin.queue_call('event.synchronize')
        self.standin.done_up_to(self.after)


class FakeStream:
    """mps' one queue."""

    def __init__(self, standin):
        self.standin = standin

    def wait_event(self, event):
        self.standin.queue_call('stream.wait_event')

    def __enter__(self):
        self.standin.queue_call('stream.enter')
        return self

    def __exit__(self, *exc):
        return False


@contextlib.contextmanager
def standin_mps(monkeypatch):
    """Within: 'mps' stands in on this cpu -> the StandInMps recording what happens there."""
    from slowllama.weights import copier
    from slowllama.weights.streams import CopyQueue
    standin = StandInMps()
    stream = FakeStream(standin)

    def synchronize():
        standin.queue_call('mps.synchronize')
        standin.done_up_to(standin.copies_queued)

    mps = {'is_available': lambda: True, 'synchronize': synchronize,
           'get_rng_state': lambda device='mps': torch.get_rng_state(),  # dropout draws from the cpu's here
           'set_rng_state': lambda state, device='mps': None,
           'recommended_max_memory': lambda: 16 << 30, 'driver_allocated_memory': lambda: 1 << 30}
    for name, value in mps.items():
        monkeypatch.setattr(torch.mps, name, value, raising=False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: True)
    monkeypatch.setattr(torch.accelerator, 'current_device_index', lambda: 0)
    monkeypatch.setattr(torch.accelerator, 'current_stream', lambda device=None: stream)
    monkeypatch.setattr(torch, 'Event', lambda device=None, **kwargs: FakeEvent(standin))
    copy = CopyQueue.copy

    def recorded_copy(queue, pairs, after=None):
        standin.queue_call('queue.copy')
        return copy(queue, pairs, after)
    monkeypatch.setattr(CopyQueue, 'copy', recorded_copy)
    reader_threads = functools.partial(ThreadPoolExecutor, initializer=standin.__enter__)  # they stand in too
    monkeypatch.setattr(copier, 'ThreadPoolExecutor', reader_threads)
    with standin:
        yield standin
