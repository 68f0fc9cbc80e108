"""bci_decode: write the decoder's sentence for every trial of a split, greedy with the KV cache, and
score it (word error rate and exact match).

    bci_decode --model M --run RUN --bci-data DIR --split test --out preds.jsonl

--run is a finetune run folder (its adapter/) or an adapter folder holding encoder.safetensors; with a
merged decoder (export.py, then prepare) give --encoder FOLDER instead: the encoder alone, no adapter.
preds.jsonl has one {"index", "text"} line per trial, index being the trial's line in texts.jsonl.
"""
import json
import os
import sys

import torch

from .errors import SlowLlamaError
from .files import atomic_open


def add_arguments(p):
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


def run(args):
    from .bci_data import SPLITS, read_bci_data
    from .formats.tokenizer import load_tokenizer
    if (args.run_dir is None) == (args.encoder is None):
        raise SlowLlamaError('give --run RUN (adapter + encoder) or --encoder DIR (merged --model), one of them')
    if args.split not in SPLITS + ('all',):
        raise SlowLlamaError(f'--split must be train, val, test or all, got {args.split!r}')
    if args.max_new_tokens < 1:
        raise SlowLlamaError(f'--max-new-tokens must be at least 1, got {args.max_new_tokens}')
    data = read_bci_data(args.bci_data)
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


def load_decoder(model_dir, run=None, encoder_dir=None, device=None, dtype=None, offload='disk'):
    """Base + trained adapter and encoder (run), or a merged decoder + encoder (encoder_dir)."""
    import slowllama
    from .bci import attach_encoder, has_encoder, load_encoder
    from .devices import resolve_device
    from .generate import adapter_folder, default_dtype
    device = resolve_device(device)
    adapter = adapter_folder(run) if run is not None else None
    model = slowllama.load(model_dir, device, default_dtype(device, dtype), adapter=adapter, offload=offload)
    encoder_dir = adapter or encoder_dir
    if not has_encoder(encoder_dir) and has_encoder(os.path.join(str(encoder_dir), 'adapter')):
        encoder_dir = os.path.join(str(encoder_dir), 'adapter')  # a run folder
    attach_encoder(model, load_encoder(encoder_dir, device))
    return model


def decode_trials(model, data, tokenizer, indices, max_new_tokens, show_progress=False):
    """The decoded text of each trial (greedy, the KV cache), in the order of `indices`."""
    from .bci import ENCODER_NAME, decode_signal, prompt_ids
    from .progress import progress
    cfg = model.attached[ENCODER_NAME].cfg
    prompt = prompt_ids(cfg, tokenizer)
    texts = []
    for i in (progress(indices, desc='decode', unit='trial') if show_progress else indices):
        signal = torch.from_numpy(data.signals[i].copy())
        ids = decode_signal(model, signal, max_new_tokens, prompt, cfg.start_token)
        if tokenizer.eos_id in ids:  # the model's EOS ends generation; the tokenizer's ends the text too
            ids = ids[:ids.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode(ids).strip())
    return texts


def write_predictions(path, indices, texts):
    with atomic_open(path, 'w') as f:
        for index, text in zip(indices, texts):
            f.write(json.dumps({'index': index, 'text': text}) + '\n')
    print(f'predictions written to {os.path.abspath(path)}', file=sys.stderr)


# --- scores ----------------------------------------------------------------------------------

def words(text):
    return text.lower().split()


def exact_match(predictions, references):
    """Share of trials whose words equal the reference's (case and spacing ignored)."""
    hits = sum(words(p) == words(r) for p, r in zip(predictions, references))
    return hits / max(len(references), 1)


def word_error_rate(predictions, references):
    """Corpus WER: word edits (substitutions + insertions + deletions) over reference words."""
    edits = sum(edit_distance(words(p), words(r)) for p, r in zip(predictions, references))
    return edits / max(sum(len(words(r)) for r in references), 1)


def edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]
