"""Guards around a run: a lock so two runs never write one run folder, and SIGINT/SIGTERM turned
into "finish this step, save a checkpoint, stop" instead of dying mid-write."""
import errno
import os
import signal
import threading

from ..errors import SlowLlamaError

LOCK_FILE = '.lock'


class RunLock:
    """An exclusive flock on RUN_DIR/.lock for the duration of the run (released by the kernel
    if the process dies, so a crashed run never leaves a stale lock)."""

    def __init__(self, run_dir, enabled=True):
        self.path, self.enabled, self.fd = os.path.join(run_dir, LOCK_FILE), enabled, None

    def __enter__(self):
        if not self.enabled:
            return self
        import fcntl
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            self.fd = None
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise SlowLlamaError(f'{os.path.dirname(self.path)}: another run is writing to this folder '
                                     '(wait for it, or choose another `out`)') from None
            raise
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


class StopSignals:
    """While active, the first SIGINT or SIGTERM only sets `requested` (the loop saves and stops at
    the end of the step); a second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
