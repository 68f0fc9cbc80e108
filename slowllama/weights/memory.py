"""How much memory there is to plan with, from the OS through psutil on every platform: free and
total host memory (within the limit of a memory cgroup on Linux: a container, a job scheduler),
free device memory, and the share of the host's RAM that is this process's when torchrun starts
several on one machine. On a Mac (mps) host and device are one memory: one budget, counted once."""
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
