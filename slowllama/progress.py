"""Progress for long steps: a tqdm bar on a terminal, plain periodic log lines otherwise."""
import sys
import time

from tqdm import tqdm


def progress(iterable, desc, unit='it', total=None, file=None):
    stream = file or sys.stderr
    if stream.isatty():
        return tqdm(iterable, desc=desc, unit=unit, total=total, file=stream, dynamic_ncols=True)
    return _plain(iterable, desc, unit, total if total is not None else _len(iterable), stream)


def _len(iterable):
    try:
        return len(iterable)
    except TypeError:
        return None


def _plain(iterable, desc, unit, total, stream, every_s=10.0):
    start = last = time.monotonic()
    for n, item in enumerate(iterable, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s or n == total:
            last = now
            rate = n / max(now - start, 1e-9)
            eta = f', eta {(total - n) / rate:.0f}s' if total else ''
            of = f'/{total}' if total else ''
            print(f'{desc}: {n}{of} {unit} ({rate:.2f} {unit}/s{eta})', file=stream, flush=True)
