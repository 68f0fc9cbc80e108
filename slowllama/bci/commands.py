"""The BCI package's two small commands: `bci_decode` (decode and score the trials of a split, print
the scores, optionally write the sentences) and `bci_demo` (write a synthetic data set).

    bci_decode --model M --run RUN --bci-data DIR --split test --out preds.jsonl

--run is a finetune run folder (its adapter/) or an adapter folder holding encoder.safetensors; with a
merged decoder (export.py, then prepare) give --encoder FOLDER instead: the encoder alone, no adapter.
preds.jsonl has one {"index", "text"} line per trial, index being the trial's line in texts.jsonl.
"""
import json
import os
import sys

from ..errors import SlowLlamaError
from ..files import atomic_open
from ..formats.tokenizer import load_tokenizer
from .data import SPLITS, read_data
from .decode import decode_trials, exact_match, load_decoder, word_error_rate
from .synthetic import make_demo_set


def add_decode_arguments(p):
    p.add_argument('--model', required=True, help='prepared model folder (the base, or a merged decoder)')
    p.add_argument('--run', dest='run_dir', default=None, help='finetune run folder or adapter folder with the encoder')
    p.add_argument('--encoder', default=None, help='encoder folder, for a merged --model (no adapter)')
    p.add_argument('--bci-data', required=True, help='BCI data folder (signals.npy + texts.jsonl)')
    p.add_argument('--split', default='test', help='train | val | test | all (default test)')
    p.add_argument('--out', default=None, help='predictions file (JSONL; default: print only the scores)')
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
    tokenizer = load_tokenizer(args.model)
    model = load_decoder(args.model, args.run_dir, args.encoder, args.device, args.dtype, args.offload)
    print(f'decoding {len(indices)} {args.split} trials', file=sys.stderr, flush=True)
    predictions = decode_trials(model, data, tokenizer, indices, args.max_new_tokens, show_progress=True)
    if args.out:
        write_predictions(args.out, indices, predictions)
    references = [data.texts[i] for i in indices]
    print(f'{args.split}: {len(indices)} trials, exact match {exact_match(predictions, references):.4f}, '
          f'WER {word_error_rate(predictions, references):.4f}')
    return 0


def write_predictions(path, indices, texts):
    with atomic_open(path, 'w') as f:
        for index, text in zip(indices, texts):
            f.write(json.dumps({'index': index, 'text': text}) + '\n')
    print(f'predictions written to {os.path.abspath(path)}', file=sys.stderr)



def add_synthetic_arguments(p):
    p.add_argument('out', help='the data folder to write (signals.npy + texts.jsonl)')
    p.add_argument('--trials', type=int, default=400, help='recordings (default 400)')
    p.add_argument('--sentences', type=int, default=24, help='distinct sentences (default 24)')
    p.add_argument('--channels', type=int, default=16, help='electrodes (default 16)')
    p.add_argument('--word-len', type=int, default=16, help='samples per word (default 16)')
    p.add_argument('--max-words', type=int, default=4, help='words per sentence at most (default 4)')
    p.add_argument('--noise', type=float, default=0.5, help='noise standard deviation (default 0.5)')
    p.add_argument('--no-splits', action='store_true', help='leave "split" out (bci data then splits itself)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')


def run_synthetic(args):
    texts = make_demo_set(args.out, args.trials, args.sentences, args.channels, args.word_len, args.max_words,
                          args.noise, splits=not args.no_splits, seed=args.seed)
    print(f'{args.trials} trials of {len(texts)} sentences written to {os.path.abspath(args.out)}; '
          f'e.g. {texts[0]!r}')
