"""Preference pairs for DPO: a prompt with a chosen and a rejected answer, tokenized as trl's
DPOTrainer tokenizes them, the prompt masked out of the targets.

Records are `{"prompt", "chosen", "rejected"}`, either three strings (an EOS is added to each answer)
or trl's conversational form: `prompt` a list of {"role", "content"} messages, `chosen` and `rejected`
lists of the answering message(s), rendered as chat records are (chat.py: the model's chat template,
or --chat-format plain lines; never plain lines silently). Each answer starts where
the tokenized prompt and the tokenized prompt + answer part (they can differ at the boundary).
A prompt + answer longer than --seq-len tokens keeps its last --seq-len tokens (trl's
truncation_mode='keep_end': the prompt is cut from the left first); such pairs are counted.

A batch holds whole pairs, [pairs, 2, seq] (chosen, rejected), so that a data-parallel share of its
rows never separates an answer from its twin.
"""
import dataclasses
import hashlib
import math
from dataclasses import dataclass

import torch

from ..errors import SlowLlamaError
from .chat import PLAIN, chat_rendering, check_messages, common_prefix, describe_rendering, plain_segments
from .dataset import IGNORE, Batch, EpochShuffle, _generator, check_data_flags, read_records

KEYS = ('prompt', 'chosen', 'rejected')


@dataclass
class Pair:
    chosen: list     # token ids of prompt + chosen answer, at most seq_len
    rejected: list   # the same for the rejected answer
    chosen_start: int    # where the answer starts in `chosen` (the prompt before it is masked)
    rejected_start: int
    truncated: bool = False
    reference: tuple | None = None  # (chosen, rejected) summed log-probs of the reference model


@dataclass
class PairBatch(Batch):
    """tokens / targets [pairs, 2, seq]: row 0 the chosen answer, row 1 the rejected one."""
    reference: torch.Tensor | None = dataclasses.field(default=None, kw_only=True)  # [pairs, 2] float32

    @property
    def n_targets(self):  # the DPO loss is a mean over pairs
        return self.tokens.shape[0]

    def flat(self):
        """-> tokens, targets [pairs * 2, seq]: chosen, rejected, chosen, rejected, ..."""
        return self.tokens.flatten(0, 1), self.targets.flatten(0, 1)

    def flat_mask(self):
        """-> [pairs * 2, seq] 0 at padding, as flat() orders the rows; None where nothing is padded."""
        return None if self.mask is None else self.mask.flatten(0, 1)


# --- records -> pairs --------------------------------------------------------------------------

def is_conversational(record):
    return isinstance(record['prompt'], list)


def tokenize_record(tokenizer, record, where, rendering=None):
    """-> (prompt ids, prompt + chosen ids, prompt + rejected ids). rendering: chat.TEMPLATE or
    chat.PLAIN for conversational records (chat.chat_rendering)."""
    for key in KEYS:
        if key not in record:
            raise SlowLlamaError(f'{where}: no "{key}" (a preference pair needs "prompt", "chosen" and "rejected")')
    if is_conversational(record):
        if not all(isinstance(record[key], list) for key in KEYS):
            raise SlowLlamaError(f'{where}: "prompt", "chosen" and "rejected" must all be strings or all be '
                                 'lists of {"role", "content"} messages')
        prompt, chosen, rejected = (check_messages(record[key], where, key) for key in KEYS)
        if rendering == PLAIN:
            render = lambda m, g: [i for ids, _ in plain_segments(tokenizer, m, where, g) for i in ids]  # noqa: E731
        else:
            render = lambda m, g: tokenizer.encode_chat(m, g, where=where)  # noqa: E731
        return render(prompt, True), render(prompt + chosen, False), render(prompt + rejected, False)
    if not all(isinstance(record[key], str) for key in KEYS):
        raise SlowLlamaError(f'{where}: "prompt", "chosen" and "rejected" must all be strings or all be '
                             'lists of {"role", "content"} messages')
    prompt = record['prompt']
    return (tokenizer.encode(prompt), tokenizer.encode(prompt + record['chosen'], eos=True),
            tokenizer.encode(prompt + record['rejected'], eos=True))


def make_pair(prompt, chosen, rejected, seq_len):
    """Token ids -> Pair: the answers start where both part from the prompt; keep the last seq_len."""
    start = min(common_prefix(prompt, chosen), common_prefix(prompt, rejected))
    truncated = max(len(chosen), len(rejected)) > seq_len
    cut_c, cut_r = max(0, len(chosen) - seq_len), max(0, len(rejected) - seq_len)
    return Pair(chosen[cut_c:], rejected[cut_r:], max(0, start - cut_c), max(0, start - cut_r), truncated)


def answer_example(ids, start):
    """ids -> (tokens, targets): targets[t] = ids[t + 1] where that token is part of the answer."""
    return ids[:-1], [i if t + 1 >= start else IGNORE for t, i in enumerate(ids[1:])]


def collate_pairs(pairs, pad_id):
    """Pairs -> PairBatch, padded on the right to the longest sequence of the batch."""
    examples = [answer_example(ids, start) for p in pairs
                for ids, start in ((p.chosen, p.chosen_start), (p.rejected, p.rejected_start))]
    width = max(1, max(len(tokens) for tokens, _ in examples))
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # for a MoE's load-balancing loss, as collate's
    for row, (ids, targets_row) in enumerate(examples):
        tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        targets[row, :len(targets_row)] = torch.tensor(targets_row, dtype=torch.long)
        mask[row, :len(ids)] = 1
    reference = None
    if all(p.reference is not None for p in pairs):
        reference = torch.tensor([p.reference for p in pairs], dtype=torch.float32)
    mask = None if bool(mask.all()) else mask.view(len(pairs), 2, width)
    return PairBatch(tokens.view(len(pairs), 2, width), targets.view(len(pairs), 2, width), reference=reference,
                     mask=mask)


# --- batches -----------------------------------------------------------------------------------

class PairBatches(EpochShuffle):
    """Batches of pairs, reshuffled every epoch; batch i is a function of (seed, i) alone."""

    def __init__(self, pairs, batch_size, seed, pad_id):
        super().__init__(pairs, batch_size, seed)
        self.pad_id = pad_id

    def batch(self, index):
        return collate_pairs(self.picks(index), self.pad_id)


def fixed_pair_batches(pairs, batch_size, pad_id, limit=None):
    batches = [collate_pairs(pairs[s:s + batch_size], pad_id) for s in range(0, len(pairs), batch_size)]
    return batches[:limit] if limit else batches


@dataclass
class PairSet:
    train: list   # [Pair]
    val: list     # [Pair]
    summary: str
    fingerprint: str  # every token of every pair, and which are held out
    rendering: str | None = None  # conversational pairs: which rendering they used (chat.describe_rendering)


def load_pairs(path, tokenizer, seq_len, seed=0, val_fraction=0.0, split=None, chat_format=None):
    """Read preference pairs (JSONL / JSON, or a Hugging Face dataset on disk: --split picks one of
    its splits); hold out ceil(val_fraction * n) of them (the same records the SFT reader would hold
    out). chat_format: the rendering of conversational pairs (chat.py)."""
    path = check_data_flags(path, seq_len, val_fraction)
    records = read_records(path, split=split)
    n_val = math.ceil(len(records) * val_fraction) if val_fraction else 0
    if n_val >= len(records):
        raise SlowLlamaError(f'{path}: {len(records)} records are too few for --val-fraction {val_fraction}')
    val_index = set(torch.randperm(len(records), generator=_generator(seed, 1 << 30)).tolist()[:n_val])
    train, val = [], []
    digest = hashlib.sha256()
    rendering = None  # decided at the first conversational pair
    for n, record in enumerate(records):
        if rendering is None and isinstance(record.get('prompt'), list):
            rendering = chat_rendering(tokenizer, chat_format, path)
        pair = make_pair(*tokenize_record(tokenizer, record, f'{path}: record {n + 1}', rendering), seq_len)
        if pair.chosen_start >= len(pair.chosen) or pair.rejected_start >= len(pair.rejected):
            raise SlowLlamaError(f'{path}: record {n + 1} has an empty answer')
        digest.update(repr((n in val_index, pair.chosen, pair.rejected, pair.chosen_start,
                            pair.rejected_start)).encode())
        (val if n in val_index else train).append(pair)
    cut = sum(p.truncated for p in train + val)
    summary = (f'{path}: preference pairs, {len(train)} training and {len(val)} validation; '
               f'{cut} cut to --seq-len {seq_len} (prompt first, from the left)')
    return PairSet(train, val, summary, digest.hexdigest(),
                   describe_rendering(tokenizer, rendering) if rendering else None)
