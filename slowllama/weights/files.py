"""Files we write and read: atomic writes (temp name, fsync, rename), JSON, and safetensors files
opened as zero-copy memory maps after their header has been checked.

Nothing we write is pickled; every final name appears only once its bytes are complete on disk.
"""
import collections
import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import re
import shutil
import sys
import tempfile
import time

import torch
from safetensors.torch import save as safetensors_bytes

from ..errors import SlowLlamaError
from .host_memory import populate_read

SAFETENSORS_DTYPES = {
    'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
    'BOOL': torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


# --- atomic writes: one rule for files and folders ------------------------------------------
# A write of FINAL (a file or a folder) is staged beside it as `.FINAL.staging-PID-RANDOM`, completed
# and fsynced there, then renamed (a file) or swapped (a folder) into place. A write killed midway
# leaves only such names; the next write of FINAL (or a reader that finds FINAL missing) removes
# them, unless the process PID is alive (a concurrent writer: never pulled from under it).

STAGING = '.staging-'
# .TARGET.staging-PID-RANDOM (files and folders), .TARGET.old (a fallback swap cut short), and two
# older forms: .TARGET.staging-RANDOM (no pid) and .TARGET.RANDOM.tmp (files)
_LEFTOVER = re.compile(r'^\.(?P<target>.+?)\.(?:staging-(?:(?P<pid>\d+)-)?[a-z0-9_]+|[a-z0-9_]{8}\.tmp|(?P<old>old))$')


def temporary_beside(path):
    """(fd, name) of a new hidden temporary file beside `path` (what an interrupted earlier write of
    `path` left is removed first), with the permissions any new file of the user gets (mkstemp's
    are private: a model written for a service run as another user, such as Ollama, could not be read)."""
    parent, prefix = _staging_prefix(path)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=prefix)
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)
    return fd, tmp


@contextlib.contextmanager
def atomic_open(path, mode='wb'):
    """Write to a temporary file beside `path`; on success fsync and rename it into place."""
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno == 28:
            raise SlowLlamaError(f'{path}: no space left on the device') from None
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_folder(final):
    """Write the folder `final` whole: yields a staging folder beside it to fill, swapped in on
    success (swap_dir), removed on an error. Given a staging folder of this process (the adapter a
    checkpoint holds), it is written in place: the enclosing write's swap is the atomic one."""
    final = str(final)
    match = _LEFTOVER.match(os.path.basename(os.path.abspath(final)))
    if match and match['pid'] == str(os.getpid()) and os.path.isdir(final):
        yield final
        return
    staging = staging_dir(final)
    try:
        yield staging
        swap_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync_dir(folder):
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit_staged(file, tmp, path):
    """A file written in place under the temporary name `tmp`: fsync, close, rename to `path`."""
    file.flush()
    os.fsync(file.fileno())
    file.close()
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def discard_staged(file, tmp):
    file.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def staging_dir(final):
    """A new empty folder beside `final` to write into, then swap_dir() into place (what an
    interrupted earlier write of `final` left is removed first)."""
    parent, prefix = _staging_prefix(final)
    return tempfile.mkdtemp(dir=parent, prefix=prefix)


def _staging_prefix(final):
    """(parent folder, name prefix) of a staged write of `final`; says and removes its leftovers."""
    parent, name = os.path.split(os.path.abspath(str(final)))
    os.makedirs(parent, exist_ok=True)
    announce(clean_leftovers(final))
    return parent, f'.{name}{STAGING}{os.getpid()}-'


def swap_dir(staging, final):
    """Put the complete folder `staging` at `final`, then remove the old one. On Linux the two are
    exchanged in one step (renameat2 RENAME_EXCHANGE), so `final` is at every instant the old folder
    or the new one, never missing or mixed. Elsewhere the old one is first renamed to `.NAME.old`, and
    clean_leftovers() puts it back if a crash came between the two renames."""
    final = str(final)
    if os.path.isdir(final) and _exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # it holds the old folder now
    else:
        old = _old_name(final)
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))


def clean_leftovers(final):
    """What interrupted writes of `final` left beside it is removed (and an old folder renamed away
    by the fallback swap is put back). Returns a sentence saying what was found, or None."""
    parent, name = os.path.split(os.path.abspath(str(final)))
    found = [f'removed {entry}' if removed else 'restored the previous folder'
             for removed, entry in _sweep(parent, name)]
    if not found:
        return None
    return f'{final}: an earlier write was interrupted; {", ".join(found)} (unfinished, never used)'


def sweep_leftovers(folder):
    """clean_leftovers() for every target in `folder` at once: [sentence] for each thing found."""
    return [f'{os.path.join(str(folder), entry)}: ' + ('removed, left unfinished by an interrupted write' if removed
                                                      else 'put back, an interrupted write had moved it away')
            for removed, entry in _sweep(str(folder))]


def _sweep(parent, target=None):
    """[(True, leftover removed) | (False, folder put back)] in `parent`, for `target` alone or any."""
    if not os.path.isdir(parent):
        return []
    found = []
    for entry in sorted(os.listdir(parent)):
        match = _LEFTOVER.match(entry)
        if not match or target not in (None, match['target']) or not _abandoned(match['pid']):
            continue
        path, final = os.path.join(parent, entry), os.path.join(parent, match['target'])
        if match['old'] and os.path.isdir(path) and not os.path.exists(final):
            os.replace(path, final)  # the fallback swap was cut between its two renames
            found.append((False, match['target']))
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        found.append((True, entry))
    return found


def _abandoned(pid):
    """A leftover is abandoned unless another process that is still alive is writing it."""
    if pid is None or int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except PermissionError:
        return False  # alive, another user's
    except (ProcessLookupError, OverflowError):
        return True
    return False


def _old_name(final):
    parent, name = os.path.split(os.path.abspath(final))
    return os.path.join(parent, f'.{name}.old')


RENAME_EXCHANGE, AT_FDCWD = 2, -100


def _exchange(a, b):
    """Atomically swap two paths (Linux renameat2); False where the system or file system cannot."""
    if not sys.platform.startswith('linux'):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), 'renameat2', None)
    if renameat2 is None:
        return False
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SlowLlamaError(f'{path}: {what} not found') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlowLlamaError(f'{path}: not valid JSON ({e})') from None
    except RecursionError:
        raise SlowLlamaError(f'{path}: not valid JSON (nested too deeply)') from None


def announce(found):
    """Say what an interrupted earlier write left behind (clean_leftovers' sentence), if anything."""
    if found:
        print(found, file=sys.stderr, flush=True)


def write_json(path, obj):
    with atomic_open(path, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')


DATA_ALIGNMENT = 4096  # where the tensor bytes start in the files we write: a page boundary


def write_safetensors(path, tensors, metadata=None):
    """Atomically write {name: tensor} as safetensors; returns the sha256 of the bytes written."""
    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    header_end = 8 + int.from_bytes(data[:8], 'little')
    header, body = aligned_header(data[:header_end]), memoryview(data)[header_end:]  # body: no copy
    digest = hashlib.sha256(header)
    digest.update(body)
    with atomic_open(path) as f:
        f.write(header)
        f.write(body)
    return digest.hexdigest()


def aligned_header(header, alignment=DATA_ALIGNMENT):
    """A safetensors header (length + JSON) padded with spaces (the format allows it) so the tensor
    bytes after it start on an `alignment` boundary. Mapped weights are used in place, and a matmul
    reading a weight whose rows start 24 bytes into a cache line (where safetensors' 8-byte padding
    leaves them) measured 5% slower per step on a CPU than on aligned memory."""
    pad = -len(header) % alignment
    return (len(header) - 8 + pad).to_bytes(8, 'little') + header[8:] + b' ' * pad


def sha256_file(path, chunk=1 << 24, read_times=None):
    """The file's sha256; each chunk's read timed into `read_times` (a ReadTimes) when given."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := (f.read(chunk) if read_times is None else read_times.timed(lambda: f.read(chunk))):
            digest.update(block)
    return digest.hexdigest()


class ReadTimes:
    """How fast this run's reads of block files went, for the step's plan (engine/keep_cost.py weighs
    the page cache against kept activations with it): the rates of the last reads (a block faulted
    in whole, a checksum's chunk). The disk's rate is their slow quartile: some reads are served by
    the page cache at memory speed, and the quartile stays the disk's while a quarter of them reach it."""
    SAMPLES = 256
    LEAST = 4  # reads before a rate is told

    def __init__(self):
        self._rates = collections.deque(maxlen=self.SAMPLES)

    def timed(self, read, nbytes=None):
        """read()'s result, its rate noted: the bytes it returns, or `nbytes` it brought in place."""
        start = time.perf_counter()
        result = read()
        got = len(result) if nbytes is None else nbytes
        if got:
            self._rates.append(got / max(time.perf_counter() - start, 1e-9))
        return result

    def rate(self):
        """Bytes a second of the disk as its reads went so far; None before LEAST of them."""
        if len(self._rates) < self.LEAST:
            return None
        return sorted(self._rates)[len(self._rates) // 4]


class SafetensorsFile:
    """A safetensors file mapped read-only (copy-on-write, so torch gets a writable buffer but the
    file is never changed). tensor() returns zero-copy views. The header is validated first: a
    truncated or corrupt file is refused before anything is allocated."""

    def __init__(self, path):
        self.path = str(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, 'rb') as f:
                self.entries, self.data_start = _read_header(f, size, self.path)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        except FileNotFoundError:
            raise SlowLlamaError(f'{self.path}: file not found') from None
        self.metadata = self.entries.pop('__metadata__', None) or {}

    def names(self):
        return list(self.entries)

    def shape(self, name):
        return tuple(self.entries[name]['shape'])

    def tensor(self, name):
        entry = self.entries[name]
        dtype = SAFETENSORS_DTYPES[entry['dtype']]
        start, end = entry['data_offsets']
        count = (end - start) // dtype.itemsize
        if count == 0:
            return torch.empty(entry['shape'], dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self.data_start + start)
        return flat.view(entry['shape'])

    def byte_range(self, name):
        start, end = self.entries[name]['data_offsets']
        return self.data_start + start, end - start

    def tensors(self):
        return {name: self.tensor(name) for name in self.entries}

    def advise_rows(self, name, start, end, advice):
        """madvise the pages holding rows [start, end) of a tensor (whole pages inside the range)."""
        offset, size = self.byte_range(name)
        row_bytes = size // max(1, self.shape(name)[0])
        first = -(-(offset + start * row_bytes) // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (offset + end * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if self._map is not None and last > first and hasattr(self._map, 'madvise'):
            with contextlib.suppress(OSError, ValueError):
                self._map.madvise(advice, first, last - first)

    def prefault(self):
        """Read the whole file into memory now, in the calling thread (a reader thread: the disk read
        then happens beside the compute, not inside its page faults): Linux's MADV_POPULATE_READ maps
        every page; elsewhere the file is read through the page cache."""
        if self._map is None or populate_read(self._map):
            return
        scratch = bytearray(1 << 22)
        with open(self.path, 'rb', buffering=0) as f:
            while f.readinto(scratch):
                pass

    def advise(self, advice):
        """madvise the whole mapping: MADV_WILLNEED starts read-ahead, MADV_DONTNEED drops the pages
        from this process (they stay in the page cache), so a streamed file stops counting as resident."""
        if self._map is not None and hasattr(self._map, 'madvise'):
            with contextlib.suppress(OSError, ValueError):
                self._map.madvise(advice)


def safetensors_header(path):
    """{name: entry} of a safetensors file, the header alone read and checked (no mapping)."""
    path = str(path)
    try:
        with open(path, 'rb') as f:
            entries, _ = _read_header(f, os.path.getsize(path), path)
    except FileNotFoundError:
        raise SlowLlamaError(f'{path}: file not found') from None
    entries.pop('__metadata__', None)
    return entries


def _read_header(f, size, path):
    if size < 8:
        raise SlowLlamaError(f'{path}: truncated safetensors file ({size} bytes)')
    header_len = int.from_bytes(f.read(8), 'little')
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise SlowLlamaError(f'{path}: corrupt safetensors header (claims {header_len} bytes)')
    try:
        entries = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise SlowLlamaError(f'{path}: corrupt safetensors header (not JSON)') from None
    if not isinstance(entries, dict):
        raise SlowLlamaError(f'{path}: corrupt safetensors header (not a JSON object)')
    data_start = 8 + header_len
    data_size = size - data_start
    for name, entry in entries.items():
        if name == '__metadata__':
            continue
        _check_entry(name, entry, data_size, path)
    return entries, data_start


def _check_entry(name, entry, data_size, path):
    try:
        dtype = SAFETENSORS_DTYPES[entry['dtype']]
        start, end = entry['data_offsets']
        numel = 1
        for dim in [start, end, *entry['shape']]:
            if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim < 1 << 48:
                raise ValueError
        for dim in entry['shape']:
            numel *= dim
    except (KeyError, TypeError, ValueError):
        raise SlowLlamaError(f'{path}: corrupt safetensors entry for {name}') from None
    if not 0 <= start <= end <= data_size:
        raise SlowLlamaError(f'{path}: truncated or corrupt: {name} lies outside the file')
    if end - start != numel * dtype.itemsize:
        raise SlowLlamaError(f'{path}: corrupt: {name} has {end - start} bytes for shape {entry["shape"]}')
