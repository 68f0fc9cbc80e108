"""The BCI package's two small commands: `bci_decode` (decode and score the trials of a split, print
the scores beside the nearest-centroid baseline's, optionally write the sentences) and `bci_demo`
(write a synthetic data set).

    bci_decode --model M --run RUN --bci-data DIR --split test [--candidates sentences.txt] --out preds.jsonl

--run is a finetune run folder (its best/, or adapter/ with --latest or when there is no best/) or an
adapter folder holding encoder.safetensors; with a merged decoder (export.py, then prepare) give
--encoder FOLDER instead: the encoder alone, no adapter. With --candidates (one sentence a line) each
trial also gets the candidate the decoder finds most likely given the signal, scored beside free
decoding. preds.jsonl has one {"index", "text"} line per trial (and "candidate" with --candidates),
index being the trial's line in texts.jsonl.
"""
import json
import os
import sys

from ..errors import SlowLlamaError
from ..tokenizer.tokenizer import load_tokenizer
from ..weights.files import atomic_open
from .baseline import nearest_centroid
from .data import SPLITS, read_data
from .decode import decode_trials, exact_match, load_decoder, rank_candidates, read_candidates, word_error_rate
from .synthetic import PRESETS, make_demo_set


def add_decode_arguments(p):
    p.add_argument('--model', required=True, help='prepared model folder (the base, or a merged decoder)')
    p.add_argument('--run', dest='run_dir', default=None, help='finetune run folder or adapter folder with the encoder')
    p.add_argument('--encoder', default=None, help='encoder folder, for a merged --model (no adapter)')
    p.add_argument('--bci-data', required=True, help='BCI data folder (signals.npy + texts.jsonl)')
    p.add_argument('--split', default='test', help='train | val | test | all (default test)')
    p.add_argument('--out', default=None, help='predictions file (JSONL; default: print only the scores)')
    p.add_argument('--candidates', default=None,
                   help='file of candidate sentences, one a line: also rank them by likelihood given the signal')
    p.add_argument('--latest', action='store_true', help="decode with the run's latest adapter/, not best/")
    p.add_argument('--max-new-tokens', type=int, default=64, help='tokens per sentence at most (default 64)')
    p.add_argument('--device', default=None, help='cpu | cuda | mps (default: the best present)')
    p.add_argument('--offload', default='disk', help='disk | ram | device (default disk)')
    p.add_argument('--dtype', default=None, help='bf16 | fp16 | fp32 (default: fp32 on cpu, bf16 elsewhere)')


def run_decode(args):
    if (args.run_dir is None) == (args.encoder is None):
        raise SlowLlamaError('give --run RUN (adapter + encoder) or --encoder DIR (merged --model), one of them')
    if args.split not in SPLITS + ('all',):
        raise SlowLlamaError(f'--split must be train, val, test or all, got {args.split!r}')
    if args.max_new_tokens < 1:
        raise SlowLlamaError(f'--max-new-tokens must be at least 1, got {args.max_new_tokens}')
    data = read_data(args.bci_data)
    indices = list(range(len(data.texts))) if args.split == 'all' else data.indices(args.split)
    if not indices:
        raise SlowLlamaError(f'{args.bci_data}: no trial in the {args.split} split (--split)')
    candidates = read_candidates(args.candidates) if args.candidates else None
    tokenizer = load_tokenizer(args.model)
    model = load_decoder(args.model, args.run_dir, args.encoder, args.device, args.dtype, args.offload, args.latest)
    print(f'decoding {len(indices)} {args.split} trials', file=sys.stderr, flush=True)
    results = {'free decoding': decode_trials(model, data, tokenizer, indices, args.max_new_tokens,
                                              show_progress=True)}
    if candidates:
        results['candidates'] = rank_candidates(model, data, tokenizer, indices, candidates, show_progress=True)
    results['nearest centroid'] = nearest_centroid(data, indices)
    if args.out:
        write_predictions(args.out, indices, results['free decoding'], results.get('candidates'))
    references = [data.texts[i] for i in indices]
    for name, predictions in results.items():
        print(f'{args.split}: {len(indices)} trials, {name}: exact match {exact_match(predictions, references):.4f}, '
              f'WER {word_error_rate(predictions, references):.4f}')
    return 0


def write_predictions(path, indices, texts, candidates=None):
    with atomic_open(path, 'w') as f:
        for row, (index, text) in enumerate(zip(indices, texts)):
            line = {'index': index, 'text': text}
            if candidates:
                line['candidate'] = candidates[row]
            f.write(json.dumps(line) + '\n')
    print(f'predictions written to {os.path.abspath(path)}', file=sys.stderr)



def add_synthetic_arguments(p):
    p.add_argument('out', help='the data folder to write (signals.npy + texts.jsonl)')
    p.add_argument('--preset', choices=sorted(PRESETS), default=None,
                   help='external: 16 sentences, 32 channels, noise 0.6, jitter 5 of 20 samples, 12/2/4 trials per '
                        'sentence (flags given as well win)')
    p.add_argument('--trials', type=int, default=None, help='recordings, split 80/10/10 (default 400)')
    p.add_argument('--trials-per-sentence', type=int, default=None,
                   help='train trials per sentence, instead of --trials (val and test: the next two flags)')
    p.add_argument('--val-per-sentence', type=int, default=None, help='with --trials-per-sentence (default 2)')
    p.add_argument('--test-per-sentence', type=int, default=None, help='with --trials-per-sentence (default 4)')
    p.add_argument('--sentences', type=int, default=None, help='distinct sentences (default 24)')
    p.add_argument('--channels', type=int, default=None, help='electrodes (default 16)')
    p.add_argument('--word-len', type=int, default=None, help='samples per word (default 16)')
    p.add_argument('--min-words', type=int, default=None, help='words per sentence at least (default 1)')
    p.add_argument('--max-words', type=int, default=None, help='words per sentence at most (default 4)')
    p.add_argument('--density', type=float, default=None, help='share of the channels a word drives (default 1/3)')
    p.add_argument('--noise', type=float, default=None,
                   help='noise standard deviation, as a fraction of the patterns\' amplitude (default 0.35)')
    p.add_argument('--jitter', type=int, default=None, help='largest shift of a trial, in samples (default word-len/4)')
    p.add_argument('--test-jitter', type=int, default=None, help='the same for the test trials (default --jitter)')
    p.add_argument('--no-splits', action='store_true', help='leave "split" out (bci data then splits itself)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')


SYNTHETIC_FLAGS = ('trials', 'sentences', 'channels', 'word_len', 'min_words', 'max_words', 'density', 'noise',
                   'jitter', 'test_jitter')


def run_synthetic(args):
    settings = dict(PRESETS.get(args.preset, {}))
    settings.update({k: getattr(args, k) for k in SYNTHETIC_FLAGS if getattr(args, k) is not None})
    counts = (args.trials_per_sentence, args.val_per_sentence, args.test_per_sentence)
    if any(c is not None for c in counts):
        if args.trials_per_sentence is None and 'per_sentence' not in settings:
            raise SlowLlamaError('--val-per-sentence and --test-per-sentence need --trials-per-sentence')
        given = settings.get('per_sentence', (None, 2, 4))
        settings['per_sentence'] = tuple(c if c is not None else d for c, d in zip(counts, given))
    texts = make_demo_set(args.out, splits=not args.no_splits, seed=args.seed, **settings)
    print(f'{len(read_data(args.out).texts)} trials of {len(texts)} sentences written to '
          f'{os.path.abspath(args.out)}; e.g. {texts[0]!r}')
