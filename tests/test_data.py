"""Data: every format's masking, packing, the validation split, deterministic batches, clear errors."""
import json

import pytest
import torch
from conftest import save_tiny_tokenizer

from slowllama.data.dataset import IGNORE, TextWindows, collate, load_data, pack_rows
from slowllama.data.examples import text_example
from slowllama.errors import SlowLlamaError
from slowllama.tokenizer.tokenizer import load_tokenizer


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp('tok')
    save_tiny_tokenizer(folder)
    return load_tokenizer(folder)


@pytest.fixture(scope='module')
def plain_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp('tok_plain')
    save_tiny_tokenizer(folder, chat_template=None)
    return load_tokenizer(folder)


def write_jsonl(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


def learned(batch, row=0):
    """The target ids of a row that are learned (not IGNORE)."""
    targets = batch.targets[row]
    return targets[targets != IGNORE].tolist()


def check_shifted(batch):
    """Wherever a target is learned, it is the next input token (when that token is in the row)."""
    tokens, targets = batch.tokens, batch.targets
    for row in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if targets[row, t] != IGNORE and targets[row, t + 1] != IGNORE:
                assert targets[row, t] == tokens[row, t + 1]


def test_plain_text_windows_are_shifted_and_deterministic(tokenizer, tmp_path):
    path = tmp_path / 'story.txt'
    path.write_text('the quick brown fox jumps over the lazy dog. ' * 20)
    data = load_data(path, tokenizer, seq_len=16, batch_size=3, seed=5)
    assert isinstance(data.train, TextWindows) and data.kind == 'text' and data.val == []
    batch = data.train.batch(0)
    assert batch.tokens.shape == (3, 16)
    ids = tokenizer.encode(path.read_text(), eos=True)
    for row in range(3):  # each row is a window of the token stream, its targets the next tokens
        tokens, targets = batch.tokens[row].tolist(), batch.targets[row].tolist()
        start = next(s for s in range(len(ids)) if ids[s:s + 16] == tokens and ids[s + 1:s + 17] == targets)
        assert start >= 0
    assert torch.equal(load_data(path, tokenizer, 16, 3, seed=5).train.batch(7).tokens, data.train.batch(7).tokens)
    assert not torch.equal(data.train.batch(1).tokens, batch.tokens)


def test_plain_text_packed_chunks_and_validation_tail(tokenizer, tmp_path):
    path = tmp_path / 'story.txt'
    path.write_text(' '.join(f'one two three four five {i}' for i in range(40)))
    data = load_data(path, tokenizer, seq_len=8, batch_size=2, val_fraction=0.25, pack=True)
    ids = tokenizer.encode(path.read_text(), eos=True)
    val_tokens = sum(int((b.targets != IGNORE).sum()) for b in data.val)
    assert abs(val_tokens - len(ids) * 0.25) <= 2
    assert data.val[0].tokens[0].tolist() == ids[len(ids) - int(len(ids) * 0.25):][:8]
    check_shifted(data.train.batch(0))


def test_jsonl_text_learns_everything_but_padding(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / 'd.jsonl', [{'text': 'the quick brown fox'}, {'text': 'ships at sea'}])
    data = load_data(path, tokenizer, seq_len=64, batch_size=2)
    batch = data.train.batch(0)
    for row in range(2):
        ids = batch.tokens[row][batch.tokens[row] != tokenizer.pad_id].tolist()
        assert ids[0] == tokenizer.bos_id
        assert learned(batch, row) == ids[1:] + [tokenizer.eos_id]  # every next token, EOS included
    assert (batch.targets[batch.tokens == tokenizer.pad_id] == IGNORE).all()


def test_alpaca_masks_the_prompt(tokenizer, tmp_path):
    record = {'instruction': 'one two three', 'input': 'four five', 'output': 'six seven eight'}
    path = tmp_path / 'alpaca.json'
    path.write_text(json.dumps([record, {'instruction': 'ten', 'input': '', 'output': 'nine'}]))
    data = load_data(path, tokenizer, seq_len=512, batch_size=1)
    assert data.kind == 'alpaca'
    examples = data.train.examples
    first, short = examples  # in file order
    targets = [t for t in first.targets if t != IGNORE]
    assert targets == tokenizer.encode('six seven eight', bos=False, eos=True)
    n_prompt = len(first.targets) - len(targets)
    assert all(t == IGNORE for t in first.targets[:n_prompt])  # the whole prompt, then only the answer
    assert len(first.tokens) > len(short.tokens)  # the input block is there only when there is an input
    assert [t for t in short.targets if t != IGNORE] == tokenizer.encode('nine', bos=False, eos=True)


def test_chat_learns_only_the_assistant(tokenizer, tmp_path):
    messages = [{'role': 'user', 'content': 'one two'}, {'role': 'assistant', 'content': 'three four'},
                {'role': 'user', 'content': 'five'}, {'role': 'assistant', 'content': 'six seven'}]
    path = write_jsonl(tmp_path / 'chat.jsonl', [{'messages': messages}])
    data = load_data(path, tokenizer, seq_len=128, batch_size=1)
    assert data.kind == 'chat'
    example = data.train.examples[0]
    full = tokenizer.encode(tokenizer.apply_chat_template(messages), bos=False)
    assert example.tokens == full[:-1]
    spans, current = [], []
    for t in example.targets:  # runs of learned targets
        if t == IGNORE:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(t)
    spans.append(current)
    end = tokenizer.encode('<|end|>', bos=False)
    assert spans == [tokenizer.encode('three four', bos=False) + end, tokenizer.encode('six seven', bos=False) + end]


def test_chat_without_template_masks_the_user(plain_tokenizer, tmp_path):
    messages = [{'role': 'user', 'content': 'one two'}, {'role': 'assistant', 'content': 'three'}]
    path = write_jsonl(tmp_path / 'chat.jsonl', [{'messages': messages}])
    with pytest.raises(SlowLlamaError, match='has no chat template; add --chat-template FILE .* --chat-format plain'):
        load_data(path, plain_tokenizer, seq_len=128, batch_size=1)  # never plain lines unasked
    example = load_data(path, plain_tokenizer, seq_len=128, batch_size=1, chat_format='plain').train.examples[0]
    taught = [t for t in example.targets if t != IGNORE]
    assert taught == plain_tokenizer.encode('three', bos=False, eos=True)


def test_packing_keeps_each_example_and_its_targets(tokenizer, tmp_path):
    records = [{'text': ' '.join(['one two three'] * (1 + i % 3))} for i in range(12)]
    path = write_jsonl(tmp_path / 'd.jsonl', records)
    packed = load_data(path, tokenizer, seq_len=40, batch_size=1, pack=True).train.examples
    examples = [text_example(tokenizer, r['text']) for r in records]
    assert len(packed) < len(examples)
    assert all(len(row.tokens) <= 40 for row in packed)
    assert [t for row in packed for t in row.tokens] == [t for e in examples for t in e.tokens]
    assert [t for row in packed for t in row.targets] == [t for e in examples for t in e.targets]
    assert pack_rows(examples, 10_000)[0].tokens == [t for e in examples for t in e.tokens]
    # each example's positions start again at 0, so it attends to itself only
    assert [p for row in packed for p in row.positions] == [p for e in examples for p in range(len(e.tokens))]


def test_packed_batches_carry_positions_through_padding(tokenizer, tmp_path):
    records = [{'text': 'one two'}, {'text': 'three'}, {'text': 'one two three four five six'}]
    path = write_jsonl(tmp_path / 'd.jsonl', records)
    data = load_data(path, tokenizer, seq_len=12, batch_size=2, pack=True)
    batch = collate(data.train.examples, pad_id=0)
    first, second = data.train.examples[:2]
    assert batch.positions[0, :len(first.positions)].tolist() == first.positions
    assert batch.positions[0].tolist().count(0) == 2  # two documents in the first row
    padded = batch.positions[1, len(second.positions):]  # padding continues the row's last document
    assert padded.tolist() == list(range(second.positions[-1] + 1, second.positions[-1] + 1 + len(padded)))
    assert batch.rows(torch.tensor([1])).positions.shape == (1, batch.tokens.shape[1])
    unpacked = load_data(path, tokenizer, seq_len=12, batch_size=2).train.batch(0)
    assert unpacked.positions is None


def test_validation_split_is_disjoint_and_seeded(tokenizer, tmp_path):
    records = [{'text': f'{w} fox'} for w in ('one two three four five six seven eight nine ten'.split())]
    path = write_jsonl(tmp_path / 'd.jsonl', records)
    data = load_data(path, tokenizer, seq_len=32, batch_size=4, val_fraction=0.3, seed=1)
    val_rows = {tuple(r[r != tokenizer.pad_id].tolist()) for b in data.val for r in b.tokens}
    train_rows = {tuple(e.tokens) for e in data.train.examples}
    assert len(val_rows) == 3 and len(train_rows) == 7 and not val_rows & train_rows
    again = load_data(path, tokenizer, seq_len=32, batch_size=4, val_fraction=0.3, seed=1)
    assert [tuple(e.tokens) for e in again.train.examples] == [tuple(e.tokens) for e in data.train.examples]


def test_each_epoch_sees_every_example_once(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / 'd.jsonl', [{'text': w} for w in 'one two three four five six'.split()])
    data = load_data(path, tokenizer, seq_len=16, batch_size=2)
    rows = [tuple(r.tolist()) for i in range(6) for r in data.train.batch(i).tokens]
    assert len(set(rows[:6])) == 6 and len(set(rows[6:])) == 6
    assert rows[:6] != rows[6:]  # reshuffled


@pytest.mark.parametrize('content, message', [
    ('{"text": "a"}\nnot json\n', 'line 2'),
    ('{"prompt": "a"}\n', 'none of the keys'),
    ('{"instruction": "a"}\n', '"output"'),
    ('{"messages": "hi"}\n', '"messages"'),
    ('', 'empty'),
])
def test_bad_data_files_name_the_problem(tokenizer, tmp_path, content, message):
    path = tmp_path / 'bad.jsonl'
    path.write_text(content)
    with pytest.raises(SlowLlamaError, match=message) as error:
        load_data(path, tokenizer, seq_len=16, batch_size=1)
    assert 'bad.jsonl' in str(error.value)


def test_missing_data_file(tokenizer, tmp_path):
    with pytest.raises(SlowLlamaError, match='--data'):
        load_data(tmp_path / 'nope.jsonl', tokenizer, seq_len=16, batch_size=1)
