"""Training data: plain text, JSONL text, alpaca instructions and chat conversations, turned into
batches of (tokens, targets) with prompts and padding masked out of the loss.

Every example is already shifted: targets[t] is the token expected after tokens[:t+1], IGNORE (-100)
where nothing is learned. Batches are a pure function of (seed, batch index), so a run resumed at
batch index k sees exactly the batches an uninterrupted run would. Knows nothing of the model: a
tokenizer (encode / decode / bos_id / eos_id / pad_id, and its chat template) is all it needs.
"""
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import SlowLlamaError
from .chat import chat_example, chat_rendering, describe_rendering
from .examples import Example, IGNORE, alpaca_example, text_record
from .hf_datasets import is_hf_dataset, read_hf_records

TEXT_SUFFIXES = ('.txt', '.md', '.text')


@dataclass
class Batch:
    tokens: torch.Tensor   # [batch, seq] long
    targets: torch.Tensor  # [batch, seq] long, IGNORE for prompts and padding
    # [batch, seq] long for packed rows: each document's rope positions restart at 0 and it attends
    # only to itself, as if it were alone in its row (what torchtune and HF do with packed data)
    positions: torch.Tensor | None = dataclasses.field(default=None, kw_only=True)
    # [batch, seq] long, 0 at the padding after a row's tokens (None: no row is padded); what
    # transformers' attention_mask would be: the padding stays out of the MoE load-balancing loss
    mask: torch.Tensor | None = dataclasses.field(default=None, kw_only=True)

    @property
    def n_targets(self):
        return int((self.targets != IGNORE).sum())

    def rows(self, index):
        """The same batch restricted to some rows (a data-parallel share); works for subclasses
        carrying more per-row tensors."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v[index] for k, v in fields.items() if isinstance(v, torch.Tensor)})


# --- reading files -----------------------------------------------------------------------------

def detect_format(path, field=None, split=None):
    """'text' for a plain text file, else the layout of the first record: 'jsonl', 'alpaca' or 'chat'."""
    if str(path).lower().endswith(TEXT_SUFFIXES):
        return 'text'
    first = next(iter(read_records(path, field, split)), None)  # a streamed data set: one row read
    if first is None:
        raise SlowLlamaError(f'{path}: the data set has no records')
    for kind, key in (('chat', 'messages'), ('alpaca', 'instruction'), ('jsonl', 'text')):
        if key in first:
            return kind
    raise SlowLlamaError(f'{path}: record 1 has none of the keys "text", "instruction" or "messages"')


def read_text(path):
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except FileNotFoundError:
        raise SlowLlamaError(f'{path}: data file not found (--data)') from None
    except UnicodeDecodeError:
        raise SlowLlamaError(f'{path}: not UTF-8 text') from None


def read_records(path, field=None, split=None):
    """The records (dicts) of a data file: JSON Lines, one JSON array of objects (the alpaca release
    is an array), or a Hugging Face dataset on disk (hf_datasets.py: read lazily, a sequence rather
    than a list). field: the column that holds the text (a string) or the conversation (a list of
    messages), for records whose keys are not "text" / "messages". split: see hf_datasets.py."""
    if is_hf_dataset(path):
        records = read_hf_records(path, split)
    else:
        if split is not None:
            raise SlowLlamaError(f'{path}: --split applies to Hugging Face datasets, not to JSON files')
        records = _read_json_records(path)
    return records if field is None else FieldRecords(records, field, path)


def _read_json_records(path):
    text = read_text(path).strip()
    if not text:
        raise SlowLlamaError(f'{path}: the data file is empty')
    if text.startswith('['):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise SlowLlamaError(f'{path}: not valid JSON ({e})') from None
        except RecursionError:
            raise SlowLlamaError(f'{path}: JSON nested too deeply') from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SlowLlamaError(f'{path}: line {n} is not valid JSON ({e.msg})') from None
                except RecursionError:
                    raise SlowLlamaError(f'{path}: line {n} is JSON nested too deeply') from None
    for n, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise SlowLlamaError(f'{path}: record {n} is not a JSON object')
    return records


class FieldRecords(Sequence):
    """Records seen through one field (--field): {"text": value} for a string, {"messages": value}
    for a list of messages."""

    def __init__(self, records, field, path):
        self.records, self.field, self.path = records, field, path

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self._select(self.records[index], index + 1)

    def __iter__(self):
        return (self._select(record, n) for n, record in enumerate(self.records, 1))

    def _select(self, record, n):
        if self.field not in record:
            raise SlowLlamaError(f'{self.path}: record {n} has no field {self.field!r} (--field); it has '
                                 f'{", ".join(map(str, record)) or "none"}')
        value = record[self.field]
        if isinstance(value, str):
            return {'text': value}
        if isinstance(value, list):
            return {'messages': value}
        raise SlowLlamaError(f'{self.path}: record {n}: field {self.field!r} is neither text nor a list of messages')


def split_long(example, seq_len, truncate):
    """Examples longer than seq_len: cut off (instructions) or cut into consecutive pieces (text)."""
    n = len(example.tokens)
    if n <= seq_len:
        return [example]
    if truncate:
        return [Example(example.tokens[:seq_len], example.targets[:seq_len])]
    return [Example(example.tokens[s:s + seq_len], example.targets[s:s + seq_len]) for s in range(0, n, seq_len)]


def pack_rows(examples, seq_len):
    """Concatenate consecutive examples into rows of at most seq_len tokens. Each example keeps its
    own targets, so no target crosses from one example into the next, and its own positions, from
    0, so that it attends to itself only."""
    rows, tokens, targets, positions = [], [], [], []
    for example in examples:
        if tokens and len(tokens) + len(example.tokens) > seq_len:
            rows.append(Example(tokens, targets, positions))
            tokens, targets, positions = [], [], []
        tokens, targets = tokens + example.tokens, targets + example.targets
        positions = positions + list(range(len(example.tokens)))
    if tokens:
        rows.append(Example(tokens, targets, positions))
    return rows


def collate(examples, pad_id):
    """Examples -> Batch padded on the right to the longest; padding is never a target."""
    width = max(len(e.tokens) for e in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        tokens[row, :len(example.tokens)] = torch.tensor(example.tokens, dtype=torch.long)
        targets[row, :len(example.targets)] = torch.tensor(example.targets, dtype=torch.long)
        mask[row, :len(example.tokens)] = 1
    mask = None if bool(mask.all()) else mask
    if all(example.positions is None for example in examples):
        return Batch(tokens, targets, mask=mask)
    positions = torch.arange(width).repeat(len(examples), 1)  # padding: the last document runs on
    for row, example in enumerate(examples):
        if example.positions is not None:
            n = len(example.positions)
            positions[row, :n] = torch.tensor(example.positions, dtype=torch.long)
            positions[row, n:] = torch.arange(width - n) + (example.positions[-1] + 1 if n else 0)
    return Batch(tokens, targets, positions=positions, mask=mask)


# --- batches -----------------------------------------------------------------------------------

def _generator(seed, index):
    return torch.Generator().manual_seed((seed << 32) + index)


class EpochShuffle:
    """Batch i over a list reshuffled every epoch: a function of (seed, i) alone, so a resumed run
    needs only the batch count."""

    def __init__(self, items, batch_size, seed):
        self.items, self.batch_size, self.seed = list(items), batch_size, seed
        self._epoch, self._order = None, None

    def picks(self, index):
        picks = []
        for position in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, k = divmod(position, len(self.items))
            picks.append(self.items[self.order(epoch)[k]])
        return picks

    def order(self, epoch):
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(len(self.items), generator=_generator(self.seed, epoch)).tolist()
        return self._order


class ExampleBatches(EpochShuffle):
    """Batches over a list of examples, reshuffled every epoch."""

    def __init__(self, examples, batch_size, seed, pad_id):
        super().__init__(examples, batch_size, seed)
        self.pad_id = pad_id

    @property
    def examples(self):
        return self.items

    def batch(self, index):
        return collate(self.picks(index), self.pad_id)


class TextWindows:
    """Random windows of seq_len tokens from one long token stream (upstream slowllama's sampling)."""

    def __init__(self, ids, seq_len, batch_size, seed, pad_id):
        self.ids, self.seq_len, self.batch_size, self.seed, self.pad_id = ids, seq_len, batch_size, seed, pad_id

    def batch(self, index):
        span = max(1, len(self.ids) - self.seq_len)  # possible starts of a window with its next token
        starts = torch.randint(0, span, (self.batch_size,), generator=_generator(self.seed, index)).tolist()
        rows = [Example(self.ids[s:s + self.seq_len], self.ids[s + 1:s + self.seq_len + 1]) for s in starts]
        rows = [Example(r.tokens[:len(r.targets)], r.targets) for r in rows]
        return collate(rows, self.pad_id)


def fixed_batches(examples, batch_size, pad_id, limit=None):
    """Examples in order, batch_size at a time (the validation set), at most `limit` batches."""
    batches = [collate(examples[s:s + batch_size], pad_id) for s in range(0, len(examples), batch_size)]
    return batches[:limit] if limit else batches


# --- the data set ------------------------------------------------------------------------------

@dataclass
class Dataset:
    kind: str       # 'text' | 'jsonl' | 'alpaca' | 'chat'
    train: object   # .batch(index) -> Batch
    val: list       # [Batch], empty without a validation split
    summary: str
    rendering: str | None = None  # chat data: which rendering it used (chat.describe_rendering)


def check_data_flags(path, seq_len, val_fraction):
    """--data exists, --seq-len and --val-fraction are usable; -> the path as a string."""
    path = str(path)
    if not os.path.exists(path):
        raise SlowLlamaError(f'{path}: data file not found (--data)')
    if seq_len < 2:
        raise SlowLlamaError(f'--seq-len must be at least 2, got {seq_len}')
    if not 0.0 <= val_fraction < 1.0:
        raise SlowLlamaError(f'--val-fraction must be in [0, 1), got {val_fraction}')
    return path


def load_data(path, tokenizer, seq_len, batch_size, seed=0, val_fraction=0.0, pack=False, kind=None,
              eval_batches=None, field=None, split=None, chat_format=None):
    """Read a data file into training batches and a validation split (see the module docstring).
    field, split: which column and split of the records (read_records); chat_format: the rendering
    of chat records (chat.py: the chat template, or 'plain' lines)."""
    path = check_data_flags(path, seq_len, val_fraction)
    kind = kind or detect_format(path, field, split)
    pad_id = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
    if kind == 'text':
        return _text_dataset(path, tokenizer, seq_len, batch_size, seed, val_fraction, pack, pad_id, eval_batches)
    return _record_dataset(path, kind, tokenizer, seq_len, batch_size, seed, val_fraction, pack, pad_id,
                           eval_batches, field, split, chat_format)


def _text_dataset(path, tokenizer, seq_len, batch_size, seed, val_fraction, pack, pad_id, eval_batches):
    ids = tokenizer.encode(read_text(path), eos=True)
    n_val = int(len(ids) * val_fraction)
    train_ids, val_ids = ids[:len(ids) - n_val], ids[len(ids) - n_val:]
    if len(train_ids) < 2:
        raise SlowLlamaError(f'{path}: too little text to train on ({len(ids)} tokens)')
    val = fixed_batches(_chunks(val_ids, seq_len), batch_size, pad_id, eval_batches) if len(val_ids) > 1 else []
    if pack:
        train = ExampleBatches(_chunks(train_ids, seq_len), batch_size, seed, pad_id)
    else:
        train = TextWindows(train_ids, seq_len, batch_size, seed, pad_id)
    mode = 'packed chunks' if pack else 'random windows'
    return Dataset('text', train, val, f'{path}: text, {len(train_ids)} training tokens in {mode} of {seq_len}, '
                                       f'{len(val_ids)} validation tokens')


def _chunks(ids, seq_len):
    """Consecutive windows of seq_len tokens, each with its next-token targets."""
    return [Example(ids[s:s + seq_len][:len(ids[s + 1:s + seq_len + 1])], ids[s + 1:s + seq_len + 1])
            for s in range(0, len(ids) - 1, seq_len)]


def _record_dataset(path, kind, tokenizer, seq_len, batch_size, seed, val_fraction, pack, pad_id, eval_batches,
                    field=None, split=None, chat_format=None):
    records = read_records(path, field, split)
    rendering = chat_rendering(tokenizer, chat_format, path) if kind == 'chat' else None
    to_example = {'jsonl': lambda r, w: text_record(tokenizer, r, w), 'alpaca': lambda r, w: alpaca_example(
        tokenizer, r, w), 'chat': lambda r, w: chat_example(tokenizer, r, w, rendering)}[kind]
    n_val = math.ceil(len(records) * val_fraction) if val_fraction else 0
    if n_val and n_val >= len(records):
        raise SlowLlamaError(f'{path}: {len(records)} records are too few for --val-fraction {val_fraction}')
    val_index = set(torch.randperm(len(records), generator=_generator(seed, 1 << 30)).tolist()[:n_val])
    train, val = [], []
    for n, record in enumerate(records):
        example = to_example(record, f'{path}: record {n + 1}')
        pieces = [e for e in split_long(example, seq_len, truncate=kind != 'jsonl')
                  if any(t != IGNORE for t in e.targets)]
        (val if n in val_index else train).extend(pieces)
    if not train:
        raise SlowLlamaError(f'{path}: no example has anything to learn within --seq-len {seq_len}')
    if pack:
        train, val = pack_rows(train, seq_len), pack_rows(val, seq_len)
    summary = (f'{path}: {kind}, {len(records) - n_val} training and {n_val} validation records, '
               f'{len(train)} training rows{" (packed)" if pack else ""}')
    return Dataset(kind, ExampleBatches(train, batch_size, seed, pad_id),
                   fixed_batches(val, batch_size, pad_id, eval_batches), summary,
                   describe_rendering(tokenizer, rendering) if rendering else None)
