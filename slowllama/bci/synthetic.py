"""A synthetic BCI data set, to try the encoder head with no recordings.

Each word of a small vocabulary has its own spatio-temporal pattern: some channels (a random
"cortical patch", or all of them with --density 1) active with smooth random waveforms for `word_len`
samples, scaled so that the pattern's amplitude (its largest absolute value) is 1. A sentence is read
one word after another; its trial is the words' patterns laid end to end (slots after the last word
silent), shifted in time by up to `jitter` samples, scaled by a per-trial gain, on top of per-channel
offsets and Gaussian noise of standard deviation `noise` (so `noise` is a fraction of the amplitude).
Sentences come from a fixed list of `sentences` distinct word sequences, every trial a new noisy
recording of one of them, so held-out trials test reading the signal, not memorising a trial.

The "external" preset is the kind of set issue 17 describes: 16 sentences, 32 channels, noise at 60%
of the amplitude, 12 train (+ 2 val) + 4 test trials per sentence. `test_jitter` gives the test trials
more jitter than the training trials show.
"""
import json
import os

import numpy as np

from ..errors import SlowLlamaError
from ..weights.files import atomic_open
from .data import SIGNALS_FILE, TEXTS_FILE

WORDS = ('the', 'quick', 'brown', 'fox', 'jumps', 'over', 'lazy', 'dog', 'ships', 'at', 'sea', 'look', 'for',
         'light', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine', 'ten')
GAIN = (0.8, 1.2)  # per-trial amplitude range

# make_bci_demo --preset NAME: the settings it stands for (flags given as well still win)
PRESETS = {
    'external': dict(sentences=16, channels=32, word_len=20, min_words=3, max_words=5, noise=0.6, density=1.0,
                     jitter=5, cycles=(1.5, 4.0), per_sentence=(12, 2, 4)),
}


def make_demo_set(folder, trials=400, sentences=24, channels=16, word_len=16, max_words=4, noise=0.35,
                  words=WORDS, splits=True, seed=0, jitter=None, test_jitter=None, min_words=1, density=1 / 3,
                  per_sentence=None, cycles=(0.5, 1.5)):
    """Write signals.npy and texts.jsonl into `folder`; returns the distinct sentences.

    jitter: the largest shift of a trial's start, in samples (default word_len // 4); test_jitter: the
    same for the test trials (default: jitter). cycles: the range of the waves' frequencies, in
    cycles per word (faster waves make a shift matter more). per_sentence: (train, val, test) trials per sentence,
    instead of `trials` trials split 80 / 10 / 10."""
    jitter = word_len // 4 if jitter is None else jitter
    test_jitter = jitter if test_jitter is None else test_jitter
    check_settings(trials, sentences, channels, word_len, min_words, max_words, noise, jitter, test_jitter,
                   density, per_sentence)
    rng = np.random.default_rng(seed)
    patterns = word_patterns(rng, len(words), channels, word_len, density, cycles)
    texts = distinct_sentences(rng, sentences, len(words), min_words, max_words)
    chosen, split_of = trial_plan(rng, len(texts), trials, per_sentence)
    time = max_words * word_len + max(jitter, test_jitter)  # room for the jitter
    offsets = rng.normal(0.0, 3.0, size=(channels, 1))
    signals = np.empty((len(chosen), channels, time), dtype=np.float32)
    for trial, sentence in enumerate(chosen):
        shift = test_jitter if split_of[trial] == 'test' else jitter
        signals[trial] = recording(rng, [patterns[w] for w in texts[sentence]], time, offsets, noise, shift)
    lines = [{'text': ' '.join(words[w] for w in texts[s])} for s in chosen]
    if splits:
        for line, split in zip(lines, split_of):
            line['split'] = split
    write_demo_set(folder, signals, lines)
    return [' '.join(words[w] for w in sentence) for sentence in texts]


def check_settings(trials, sentences, channels, word_len, min_words, max_words, noise, jitter, test_jitter,
                   density, per_sentence):
    if trials < 1 or sentences < 1 or channels < 2 or word_len < 4 or not 1 <= min_words <= max_words:
        raise SlowLlamaError('make_bci_demo: --trials, --sentences must be >= 1, --channels >= 2, --word-len >= 4, '
                             '1 <= --min-words <= --max-words')
    if noise < 0 or jitter < 0 or test_jitter < 0 or not 0 < density <= 1:
        raise SlowLlamaError('make_bci_demo: --noise, --jitter and --test-jitter must be >= 0, --density in (0, 1]')
    if per_sentence is not None and (len(per_sentence) != 3 or min(per_sentence) < 0 or per_sentence[0] < 1):
        raise SlowLlamaError('make_bci_demo: --trials-per-sentence must be >= 1, --val-per-sentence and '
                             '--test-per-sentence >= 0')


def trial_plan(rng, n_sentences, trials, per_sentence):
    """-> (the sentence of each trial, the split of each trial), trials in a random order."""
    if per_sentence is None:  # `trials` recordings, train / val / test: 80 / 10 / 10
        chosen = [i % n_sentences for i in range(trials)]
        rng.shuffle(chosen)
        return chosen, [('val', 'test')[t % 2] if t % 10 >= 8 else 'train' for t in range(trials)]
    plan = [(s, split) for s in range(n_sentences) for split, count in zip(('train', 'val', 'test'), per_sentence)
            for _ in range(count)]
    order = rng.permutation(len(plan))
    return [plan[i][0] for i in order], [plan[i][1] for i in order]


def word_patterns(rng, n_words, channels, word_len, density, cycles):
    """[n_words, channels, word_len]: each word drives a random share of the channels with smooth waves,
    scaled to amplitude (largest absolute value) 1."""
    t = np.linspace(0.0, 1.0, word_len)
    patterns = np.zeros((n_words, channels, word_len))
    for word in range(n_words):
        active = rng.choice(channels, size=max(1, round(channels * density)), replace=False)
        for channel in active:
            frequency, phase = rng.uniform(*cycles), rng.uniform(0, 2 * np.pi)
            patterns[word, channel] = rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * frequency * t + phase)
        patterns[word] /= np.abs(patterns[word]).max()
    return patterns


def distinct_sentences(rng, count, n_words, min_words, max_words):
    found, tries = [], 0
    while len(found) < count:
        tries += 1
        if tries > 100 * count:
            raise SlowLlamaError(f'make_bci_demo: cannot make {count} distinct sentences from these words')
        sentence = tuple(rng.choice(n_words, size=rng.integers(min_words, max_words + 1)).tolist())
        if sentence not in found:
            found.append(sentence)
    return found


def recording(rng, patterns, time, offsets, noise, jitter):
    channels, word_len = patterns[0].shape
    clean = np.zeros((channels, time))
    start = int(rng.integers(0, jitter + 1))  # the reading starts a little late
    for k, pattern in enumerate(patterns):
        clean[:, start + k * word_len:start + (k + 1) * word_len] = pattern
    gain = rng.uniform(*GAIN)
    return gain * clean + offsets + rng.normal(0.0, noise, size=(channels, time))


def write_demo_set(folder, signals, lines):
    os.makedirs(folder, exist_ok=True)
    with atomic_open(os.path.join(folder, SIGNALS_FILE)) as f:
        np.save(f, signals, allow_pickle=False)
    with atomic_open(os.path.join(folder, TEXTS_FILE), 'w') as f:
        f.writelines(json.dumps(line) + '\n' for line in lines)
