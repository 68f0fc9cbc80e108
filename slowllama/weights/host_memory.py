"""How much memory there is to plan with, from the OS through psutil on every platform: free and
total host memory (within the limit of a memory cgroup on Linux: a container, a job scheduler),
free device memory, and the share of the host's RAM that is this process's when torchrun starts
several on one machine. On a Mac (mps) host and device are one memory: one budget, counted once.
And the C library's hands on host memory: faulting a mapping in ahead (madvise) and giving the
heap's free part back (HeapTrimmer)."""
import ctypes
import ctypes.util
import functools
import os
import sys

import psutil
import torch


def free_host_memory():
    """Bytes the process can still take without swapping or being killed: what the OS counts as
    available, and no more than what the memory cgroups it runs in leave below their limits."""
    return min(psutil.virtual_memory().available, cgroup_room())


def cgroup_room():
    """What the tightest memory cgroup of this process (and its parents) leaves below its limit, its
    reclaimable page cache counted as free; a very large number where none limits memory (not Linux,
    or no limit set). cgroup v2 and v1 alike."""
    room = 1 << 62
    for folder, (limit, usage, cache) in _memory_cgroups():
        try:
            with open(os.path.join(folder, limit)) as f:
                cap = f.read().strip()
            if cap == 'max' or int(cap) >= 1 << 60:
                continue
            with open(os.path.join(folder, usage)) as f:
                used = int(f.read())
            with open(os.path.join(folder, 'memory.stat')) as f:
                stats = dict(line.split() for line in f if len(line.split()) == 2)
            room = min(room, int(cap) - used + int(stats.get(cache, 0)))
        except (OSError, ValueError):
            continue
    return max(room, 0)


def _memory_cgroups():
    """(folder, (limit file, usage file, reclaimable cache key)) of this process's memory cgroup and
    its parents, from /proc/self/cgroup."""
    try:
        with open('/proc/self/cgroup') as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(':', 2)
        if controllers == '':  # v2: one unified hierarchy
            root, files = '/sys/fs/cgroup', ('memory.max', 'memory.current', 'inactive_file')
        elif 'memory' in controllers.split(','):
            root, files = '/sys/fs/cgroup/memory', ('memory.limit_in_bytes', 'memory.usage_in_bytes',
                                                    'total_inactive_file')
        else:
            continue
        parts = [p for p in path.split('/') if p]
        for depth in range(len(parts), -1, -1):
            folder = os.path.join(root, *parts[:depth])
            if os.path.exists(os.path.join(folder, files[0])):
                yield folder, files


def total_host_memory():
    return psutil.virtual_memory().total


def unified_memory(device):
    """Whether the device computes in the host's memory (Apple silicon)."""
    return device.type == 'mps'


def free_device_memory(device):
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    if device.type == 'mps':  # what the OS has free, within what Metal lets this process take
        metal = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        return min(free_host_memory(), metal)
    return free_host_memory()


def host_share():
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE): each plans with its
    share of the host's free memory, as each pins its own copy of the RAM tier."""
    try:
        return max(1, int(os.environ.get('LOCAL_WORLD_SIZE', '1')))
    except ValueError:
        return 1


def process_rss():
    """This process's resident bytes now."""
    return psutil.Process().memory_info().rss


def peak_rss():
    """This process's peak resident bytes (since reset_peak_rss(), where the OS allows a reset)."""
    try:  # Linux: VmHWM is what clear_refs resets. getrusage's maxrss is not: a process started by
        with open('/proc/self/status') as f:  # a big one inherits that one's peak through fork and exec
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return psutil.Process().memory_info().peak_wset
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss():
    """Start the peak over from the current resident bytes (Linux; elsewhere the peak is the
    process's whole life, which a benchmark worker started for one measurement can live with)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


# --- the C library ---------------------------------------------------------------------------

MADV_POPULATE_READ = 22  # Linux 5.14+; Python's mmap module names it only from 3.13


def populate_read(mapped):
    """Fault every page of a writable (or copy-on-write) mmap in, reading from disk what the page
    cache lacks: True when the kernel did it (libc's madvise, called through ctypes, which lets other
    threads run meanwhile), False where it cannot (not Linux, an older kernel)."""
    libc = glibc()
    if libc is None:
        return False
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
    return libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(len(mapped)), MADV_POPULATE_READ) == 0


@functools.lru_cache(maxsize=None)
def glibc():
    """The C library through ctypes on Linux (madvise, and the heap's mallinfo2 / malloc_trim for
    HeapTrimmer), else None."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


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
