"""A synthetic BCI data set, to try the encoder head with no recordings.

Each word of a small vocabulary has its own spatio-temporal pattern: a few channels (a random
"cortical patch") active with smooth random waveforms for `word_len` samples. A sentence is read one
word per slot; its trial is the words' patterns laid end to end (slots after the last word silent), jittered
in time by a few samples, scaled by a per-trial gain, on top of per-channel offsets and Gaussian noise.
Sentences come from a fixed list of `sentences` distinct word sequences, every trial a new noisy
recording of one of them, so held-out trials test reading the signal, not memorising a trial.
"""
import json
import os

import numpy as np

from ..errors import SlowLlamaError
from ..files import atomic_open
from .data import SIGNALS_FILE, TEXTS_FILE

WORDS = ('the', 'quick', 'brown', 'fox', 'jumps', 'over', 'lazy', 'dog', 'ships', 'at', 'sea', 'look', 'for',
         'light', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten')


def make_demo_set(folder, trials=400, sentences=24, channels=16, word_len=16, max_words=4, noise=0.5,
                  words=WORDS, splits=True, seed=0):
    """Write signals.npy and texts.jsonl into `folder`; returns the distinct sentences."""
    if trials < 1 or sentences < 1 or channels < 2 or word_len < 4 or max_words < 1 or noise < 0:
        raise SlowLlamaError('make_bci_demo: --trials, --sentences, --max-words must be >= 1, '
                             '--channels >= 2, --word-len >= 4, --noise >= 0')
    rng = np.random.default_rng(seed)
    patterns = word_patterns(rng, len(words), channels, word_len)
    texts = distinct_sentences(rng, sentences, len(words), max_words)
    time = max_words * word_len + word_len // 4  # room for the jitter
    offsets = rng.normal(0.0, 3.0, size=(channels, 1))
    signals = np.empty((trials, channels, time), dtype=np.float32)
    chosen = [i % len(texts) for i in range(trials)]
    rng.shuffle(chosen)
    for trial, sentence in enumerate(chosen):
        signals[trial] = recording(rng, [patterns[w] for w in texts[sentence]], time, offsets, noise)
    lines = [{'text': ' '.join(words[w] for w in texts[s])} for s in chosen]
    if splits:  # train / val / test: 80 / 10 / 10, every trial a fresh recording
        for trial, line in enumerate(lines):
            line['split'] = ('val', 'test')[trial % 2] if trial % 10 >= 8 else 'train'
    write_demo_set(folder, signals, lines)
    return [' '.join(words[w] for w in sentence) for sentence in texts]


def word_patterns(rng, n_words, channels, word_len):
    """[n_words, channels, word_len]: each word drives a random third of the channels with smooth waves."""
    t = np.linspace(0.0, 1.0, word_len)
    patterns = np.zeros((n_words, channels, word_len))
    for word in range(n_words):
        active = rng.choice(channels, size=max(1, channels // 3), replace=False)
        for channel in active:
            frequency, phase = rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)  # slow against the jitter
            patterns[word, channel] = rng.uniform(1.0, 2.0) * np.sin(2 * np.pi * frequency * t + phase)
    return patterns


def distinct_sentences(rng, count, n_words, max_words):
    found, tries = [], 0
    while len(found) < count:
        tries += 1
        if tries > 100 * count:
            raise SlowLlamaError(f'make_bci_demo: cannot make {count} distinct sentences from these words')
        sentence = tuple(rng.choice(n_words, size=rng.integers(1, max_words + 1)).tolist())
        if sentence not in found:
            found.append(sentence)
    return found


def recording(rng, patterns, time, offsets, noise):
    channels, word_len = patterns[0].shape
    clean = np.zeros((channels, time))
    start = int(rng.integers(0, word_len // 4 + 1))  # jitter: the reading starts a little late or early
    for k, pattern in enumerate(patterns):
        clean[:, start + k * word_len:start + (k + 1) * word_len] = pattern
    gain = rng.uniform(0.8, 1.2)
    return gain * clean + offsets + rng.normal(0.0, noise, size=(channels, time))


def write_demo_set(folder, signals, lines):
    os.makedirs(folder, exist_ok=True)
    with atomic_open(os.path.join(folder, SIGNALS_FILE)) as f:
        np.save(f, signals, allow_pickle=False)
    with atomic_open(os.path.join(folder, TEXTS_FILE), 'w') as f:
        f.writelines(json.dumps(line) + '\n' for line in lines)
