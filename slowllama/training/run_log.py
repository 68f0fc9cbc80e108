"""What a run tells as it goes: metrics.jsonl (one JSON object per step), train.log (what the console
showed, plus the sample completions), and the console itself: a tqdm bar on a terminal, a plain line
every ten seconds otherwise. On a resume both files are cut back to the checkpoint's step first.
Only the main process writes; the others' calls do nothing."""
import json
import os
import re
import time

from tqdm import tqdm

from ..weights.files import atomic_open

METRICS, LOG = 'metrics.jsonl', 'train.log'
PLAIN_EVERY_S = 10


class RunLog:
    def __init__(self, run_dir, stream, enabled=True):
        self.run_dir, self.stream, self.enabled = run_dir, stream, enabled
        self.bar = None
        self._pending = []  # lines logged before begin() has set up train.log

    def begin(self, fresh, resumed_at=None):
        """Start the files: emptied for a fresh run, cut back to `resumed_at` for a resumed one; then
        the lines logged so far."""
        if not self.enabled:
            return
        for name in (METRICS, LOG):
            if fresh:
                _rewrite_lines(self._path(name), [])
            elif resumed_at is not None:
                _truncate_log(self._path(name), resumed_at)
        pending, self._pending = self._pending, None
        for line in pending:
            _append_line(self._path(LOG), line)

    def log(self, message):
        """A line for train.log and the console (above the bar on a terminal)."""
        if not self.enabled:
            return
        if self._pending is not None:
            self._pending.append(message)
        else:
            _append_line(self._path(LOG), message)
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def record(self, row, iters, shown=()):
        """One step's row: into metrics.jsonl whole; into train.log and onto the console as a line
        with the loss, `shown` metrics, the learning rate and the rates."""
        if not self.enabled:
            return
        _append_line(self._path(METRICS), json.dumps({k: v for k, v in row.items() if k != 'sample'}))
        extra = ''.join(f' {k} {row[k]:.4g}' for k in shown)
        read = f' {row["read_bytes_per_s"] / 1e6:.0f} MB/s read' if row.get('read_bytes_per_s') else ''
        line = (f'step {row["step"]}/{iters} loss {row["loss"]:.4f}{extra} lr {row["lr"]:.2e} '
                f'{row["tokens_per_s"]:.0f} tok/s{read}')
        _append_line(self._path(LOG), line)
        if self.bar is not None:
            postfix = {'loss': f'{row["loss"]:.4f}', **{k: f'{row[k]:.4g}' for k in shown},
                       'tok_s': f'{row["tokens_per_s"]:.0f}'}
            if read:
                postfix['read'] = f'{row["read_bytes_per_s"] / 1e6:.0f}MB/s'
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif time.monotonic() - self._last_print >= PLAIN_EVERY_S or row['step'] in (self._first, iters):
            self._last_print = time.monotonic()
            eta = (time.monotonic() - self._opened) / (row['step'] - self._first + 1) * (iters - row['step'])
            print(f'{line}, eta {eta:.0f}s', file=self.stream, flush=True)

    def open_bar(self, step, iters):
        """From step + 1 to iters: a bar on a terminal, plain lines otherwise."""
        self._first, self._opened, self._last_print = step + 1, time.monotonic(), time.monotonic()
        if self.stream.isatty() and self.enabled:
            self.bar = tqdm(total=iters, initial=step, desc='train', unit='step', file=self.stream,
                            dynamic_ncols=True)

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _path(self, name):
        return os.path.join(self.run_dir, name)


def _append_line(path, line):
    """One complete line per write (O_APPEND), so a crash can cut off at most the last line."""
    with open(path, 'a', encoding='utf-8') as f:
        f.write(line + '\n')


def _rewrite_lines(path, lines):
    with atomic_open(path, 'w') as f:
        f.writelines(line + '\n' for line in lines)


def _truncate_log(path, step):
    """Drop what was logged after `step` (and a torn last line) before a resumed run appends again."""
    if not os.path.exists(path):
        return
    with open(path, encoding='utf-8', errors='replace') as f:  # a damaged log must not stop the resume
        lines = f.read().split('\n')[:-1]  # a last line without its newline is torn: drop it
    keep = []
    for line in lines:
        logged = _logged_step(line)
        if logged is not None and logged > step:
            break
        keep.append(line)
    _rewrite_lines(path, keep)


def _logged_step(line):
    if line.startswith('{'):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            return None
        step = row.get('step') if isinstance(row, dict) else None
        return step if isinstance(step, int) else None
    match = re.match(r'step (\d+)', line)
    return int(match.group(1)) if match else None
