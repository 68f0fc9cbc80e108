"""Decoding BCI trials: the decoder (with its trained encoder) loaded for inference, the sentence of
each trial decoded greedily with the KV cache, and the scores (word error rate, exact match)."""
import os

import torch

from ..api import load
from ..devices import default_dtype, resolve_device
from ..lora import adapter_folder
from ..progress import progress
from .encoder import ENCODER_NAME, attach_encoder, decode_signal, has_encoder, load_encoder, prompt_ids


def load_decoder(model_dir, run=None, encoder_dir=None, device=None, dtype=None, offload='disk'):
    """Base + trained adapter and encoder (run), or a merged decoder + encoder (encoder_dir)."""
    device = resolve_device(device)
    adapter = adapter_folder(run) if run is not None else None
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
