"""BCI data: a folder with signals.npy (float32 [N, channels, time]) and texts.jsonl (N lines
{"text": ..., "split": "train"|"val"|"test" optional}). Line i of texts.jsonl is trial i.

Checked on reading (a SlowLlamaError naming the file otherwise): the array's rank and dtype, no NaN
or infinity, one text line per trial, splits either on every line or on none. Without splits a
deterministic split is made (a seeded permutation: 10% val, 10% test, at least one each when N >= 10).
Per-channel z-score statistics come from the train trials only and are saved with the encoder.
Batches are a pure function of (seed, index), as in data.py, so a resumed run sees the same batches.
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..data.dataset import IGNORE, Batch, EpochShuffle
from ..errors import SlowLlamaError

SIGNALS_FILE = 'signals.npy'
TEXTS_FILE = 'texts.jsonl'
SPLITS = ('train', 'val', 'test')
HELD_OUT_FRACTION = 0.1
SPLIT_SEED = 0
STATS_CHUNK = 256  # trials per chunk when scanning a memory-mapped signals.npy


@dataclass
class TrialSet:
    folder: str
    signals: np.ndarray  # [N, channels, time], float32 (memory-mapped when possible)
    texts: list          # N strings
    splits: list         # N of 'train' | 'val' | 'test'

    def indices(self, split):
        return [i for i, s in enumerate(self.splits) if s == split]

    @property
    def channels(self):
        return self.signals.shape[1]

    @property
    def time(self):
        return self.signals.shape[2]

    def summary(self):
        counts = ', '.join(f'{s} {len(self.indices(s))}' for s in SPLITS)
        return (f'{self.folder}: {len(self.texts)} trials of {self.channels} channels x {self.time} samples '
                f'({counts})')


def read_data(folder):
    folder = str(folder)
    if not os.path.isdir(folder):
        raise SlowLlamaError(f'{folder}: BCI data folder not found (--bci-data)')
    signals = read_signals(os.path.join(folder, SIGNALS_FILE))
    texts, splits = read_texts(os.path.join(folder, TEXTS_FILE))
    if len(texts) != signals.shape[0]:
        raise SlowLlamaError(f'{os.path.join(folder, TEXTS_FILE)}: {len(texts)} lines, but {SIGNALS_FILE} '
                             f'holds {signals.shape[0]} trials (one line per trial)')
    if splits is None:
        splits = default_splits(len(texts))
    data = TrialSet(folder, signals, texts, splits)
    if not data.indices('train'):
        raise SlowLlamaError(f'{os.path.join(folder, TEXTS_FILE)}: no trial has "split": "train"')
    return data


def read_signals(path):
    if not os.path.exists(path):
        raise SlowLlamaError(f'{path}: file not found (a BCI data folder holds {SIGNALS_FILE} and {TEXTS_FILE})')
    try:
        signals = np.load(path, mmap_mode='r', allow_pickle=False)
    except ValueError as e:
        raise SlowLlamaError(f'{path}: not a numeric .npy array ({e})') from None
    except OSError as e:
        raise SlowLlamaError(f'{path}: cannot read ({e})') from None
    if signals.ndim != 3 or 0 in signals.shape:
        raise SlowLlamaError(f'{path}: shape {tuple(signals.shape)}, expected [trials, channels, time]')
    if signals.dtype != np.float32:
        raise SlowLlamaError(f'{path}: dtype {signals.dtype}, expected float32 '
                             '(np.save(path, signals.astype(np.float32)))')
    for start in range(0, signals.shape[0], STATS_CHUNK):
        finite = np.isfinite(signals[start:start + STATS_CHUNK]).all(axis=(1, 2))
        if not finite.all():
            trial = start + int(np.argmin(finite))
            raise SlowLlamaError(f'{path}: trial {trial} holds NaN or infinite values')
    return signals


def read_texts(path):
    """-> (texts, splits or None)."""
    if not os.path.exists(path):
        raise SlowLlamaError(f'{path}: file not found (a BCI data folder holds {SIGNALS_FILE} and {TEXTS_FILE})')
    with open(path, encoding='utf-8') as f:
        lines = f.read().split('\n')
    while lines and not lines[-1].strip():
        lines.pop()
    texts, splits = [], []
    for number, line in enumerate(lines, 1):
        record = _record(path, number, line)
        texts.append(record['text'])
        splits.append(record.get('split'))
    given = [s is not None for s in splits]
    if any(given) and not all(given):
        line = given.index(False) + 1
        raise SlowLlamaError(f'{path}: line {line} has no "split" but other lines do (give it on every line or none)')
    return texts, (splits if all(given) and splits else None)


def _record(path, number, line):
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise SlowLlamaError(f'{path}: line {number} is not JSON') from None
    if not isinstance(record, dict) or not isinstance(record.get('text'), str):
        raise SlowLlamaError(f'{path}: line {number} needs a "text" string')
    if record.get('split', 'train') not in SPLITS:
        raise SlowLlamaError(f'{path}: line {number}: "split" must be train, val or test, '
                             f'got {record["split"]!r}')
    return record


def words_of(text):
    """The words of a sentence, as the scores compare them (case and spacing ignored)."""
    return text.lower().split()


def default_splits(n):
    """A deterministic split for a set without "split" fields: a fixed permutation, 10% val, 10% test."""
    held_out = int(n * HELD_OUT_FRACTION) if n >= 10 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    splits = ['train'] * n
    for i in order[:held_out]:
        splits[i] = 'val'
    for i in order[held_out:2 * held_out]:
        splits[i] = 'test'
    return splits


def channel_stats(signals, indices):
    """Per-channel mean and standard deviation over the given trials and all their samples (float64 sums)."""
    total = np.zeros(signals.shape[1])
    squares = np.zeros(signals.shape[1])
    for start in range(0, len(indices), STATS_CHUNK):
        part = np.asarray(signals[sorted(indices[start:start + STATS_CHUNK])], dtype=np.float64)
        total += part.sum(axis=(0, 2))
        squares += (part ** 2).sum(axis=(0, 2))
    count = len(indices) * signals.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(np.where(std > 0, std, 1.0), dtype=torch.float32)


# --- batches ---------------------------------------------------------------------------------

@dataclass
class TrialBatch(Batch):
    """tokens [batch, seq]: the start token, then the text; targets: the text, then EOS (IGNORE on
    padding); signals [batch, channels, time] float32, row for row."""
    signals: torch.Tensor


class TrialTexts:
    """Tokenizes the texts once: trial i -> tokens [start, t1..tn], targets [t1..tn, eos]."""

    def __init__(self, data, tokenizer, start_token, max_tokens):
        self.data, self.start_token = data, start_token
        self.eos = tokenizer.eos_id
        self.pad_id = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
        self.ids = {}
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def text_ids(self, index):
        if index not in self.ids:
            ids = self.tokenizer.encode(self.data.texts[index], bos=False)[:self.max_tokens]
            self.ids[index] = ids + ([self.eos] if self.eos is not None else [])
        return self.ids[index]

    def collate(self, indices):
        rows = [self.text_ids(i) for i in indices]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for row, ids in enumerate(rows):
            tokens[row, :len(ids)] = torch.tensor([self.start_token] + ids[:-1], dtype=torch.long)
            targets[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        signals = torch.from_numpy(np.array(self.data.signals[list(indices)], dtype=np.float32))
        return TrialBatch(tokens, targets, signals)


class TrialBatches(EpochShuffle):
    """Training batches over the train trials, reshuffled every epoch; batch i is a function of (seed, i)."""

    def __init__(self, trials: TrialTexts, indices, batch_size, seed):
        super().__init__(indices, batch_size, seed)
        self.trials = trials

    def batch(self, index):
        return self.trials.collate(self.picks(index))


def fixed_trial_batches(trials: TrialTexts, indices, batch_size, limit=None):
    """The validation batches: trials in order, batch_size at a time, at most `limit` batches."""
    batches = [trials.collate(indices[s:s + batch_size]) for s in range(0, len(indices), batch_size)]
    return batches[:limit] if limit else batches
