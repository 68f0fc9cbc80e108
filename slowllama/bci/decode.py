"""Decoding BCI trials: the decoder (with its trained encoder) loaded for inference, the sentence of
each trial decoded greedily with the KV cache (free decoding) or chosen from a list of candidate
sentences by the decoder's log-likelihood given the signal (closed vocabulary), and the scores (word
error rate, exact match)."""
import os

import torch

from ..data.dataset import IGNORE
from ..errors import SlowLlamaError

from ..api import load
from ..engine.devices import default_dtype, resolve_device
from ..progress import progress
from ..weights.formats.peft import adapter_folder
from .data import words_of
from .encoder import (ENCODER_NAME, attach_encoder, decode_signal, has_encoder, load_encoder, prefix_embeddings,
                      prompt_ids)


BEST = 'best'  # the run folder's adapter + encoder of the best validation score (train.py)
ROWS_PER_PASS = 64  # candidate rows scored in one streamed pass


def run_adapter(run, latest=False):
    """A run folder -> its best/ (unless `latest` or there is none), else what adapter_folder finds."""
    best = os.path.join(str(run), BEST)
    if not latest and has_encoder(best):
        return best
    return adapter_folder(run)


def load_decoder(model_dir, run=None, encoder_dir=None, device=None, dtype=None, offload='disk', latest=False):
    """Base + trained adapter and encoder (run: an adapter folder, or a run folder whose best/ is
    taken unless `latest`), or a merged decoder + encoder (encoder_dir)."""
    device = resolve_device(device)
    adapter = run_adapter(run, latest) if run is not None else None
    model = load(model_dir, device, default_dtype(device, dtype), adapter=adapter, offload=offload)
    encoder_dir = adapter or encoder_dir
    if not has_encoder(encoder_dir) and has_encoder(os.path.join(str(encoder_dir), 'adapter')):
        encoder_dir = os.path.join(str(encoder_dir), 'adapter')  # a run folder
    attach_encoder(model, load_encoder(encoder_dir, device))
    return model


def decode_trials(model, data, tokenizer, indices, max_new_tokens, show_progress=False):
    """The decoded text of each trial (greedy, the KV cache), in the order of `indices`."""
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


@torch.no_grad()
def rank_candidates(model, data, tokenizer, indices, candidates, show_progress=False):
    """Closed-vocabulary decoding: for each trial, the candidate sentence of highest log-likelihood
    (summed over its tokens and EOS) under the decoder given the trial's signal. The candidates of a
    trial (of several trials, up to ROWS_PER_PASS rows) are scored as one batch: one streamed pass."""
    encoder = model.attached[ENCODER_NAME]
    encoder.eval()
    prompt, start = prompt_ids(encoder.cfg, tokenizer), encoder.cfg.start_token
    tokens, targets = candidate_rows(tokenizer, candidates, start)  # [C, L]
    per_pass = max(1, ROWS_PER_PASS // len(candidates))
    groups = [indices[s:s + per_pass] for s in range(0, len(indices), per_pass)]
    chosen = []
    for group in (progress(groups, desc='rank', unit='pass') if show_progress else groups):
        signals = torch.from_numpy(data.signals[group].copy()).repeat_interleave(len(candidates), dim=0)
        prefix = prefix_embeddings(model, encoder, signals, prompt)  # [len(group) * C, P, dim]
        scores = sequence_log_likelihood(model.logits(tokens.repeat(len(group), 1), prefix=prefix),
                                         targets.repeat(len(group), 1)).view(len(group), len(candidates))
        chosen += [candidates[int(best)] for best in scores.argmax(dim=1)]
    return chosen


def candidate_rows(tokenizer, candidates, start_token):
    """-> tokens [C, L] (start, then the sentence) and targets [C, L] (the sentence, then EOS;
    IGNORE on padding), as training saw them."""
    rows = [tokenizer.encode(text, bos=False) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
            for text in candidates]
    width = max(len(r) for r in rows)
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for row, ids in enumerate(rows):
        tokens[row, :len(ids)] = torch.tensor([start_token] + ids[:-1])
        targets[row, :len(ids)] = torch.tensor(ids)
    return tokens, targets


def sequence_log_likelihood(logits, targets):
    """logits [rows, L, vocab], targets [rows, L] -> the summed log-probability of each row's targets."""
    counted = targets != IGNORE
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    picked = log_probs.gather(2, targets.clamp(min=0).to(logits.device)[..., None])[..., 0]  # [rows, L]
    return (picked * counted.to(picked.device)).sum(dim=1)


def read_candidates(path):
    """One sentence per line (blank lines skipped), at least two, no repeats."""
    if not os.path.exists(path):
        raise SlowLlamaError(f'{path}: file not found (--candidates: one sentence per line)')
    with open(path, encoding='utf-8') as f:
        lines = [line.strip() for line in f]
    sentences = list(dict.fromkeys(line for line in lines if line))
    if len(sentences) < 2:
        raise SlowLlamaError(f'{path}: needs at least two candidate sentences, one per line (--candidates)')
    return sentences


# --- scores ----------------------------------------------------------------------------------

def exact_match(predictions, references):
    """Share of trials whose words equal the reference's (case and spacing ignored)."""
    hits = sum(words_of(p) == words_of(r) for p, r in zip(predictions, references))
    return hits / max(len(references), 1)


def word_error_rate(predictions, references):
    """Corpus WER: word edits (substitutions + insertions + deletions) over reference words."""
    edits = sum(edit_distance(words_of(p), words_of(r)) for p, r in zip(predictions, references))
    return edits / max(sum(len(words_of(r)) for r in references), 1)


def edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]
