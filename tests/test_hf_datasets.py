"""Hugging Face datasets on disk as --data: save_to_disk folders, .arrow, .parquet and .csv give the
same batches as the equivalent JSONL, with --field / --split, and clear errors."""
import json
import sys

import datasets
import pytest
import torch
from conftest import CORPUS, save_tiny_tokenizer

from slowllama.data.dataset import load_data, read_records
from slowllama.errors import SlowLlamaError
from slowllama.tokenizer.tokenizer import load_tokenizer

TEXT = [{'text': line} for line in CORPUS]
ALPACA = [{'instruction': f'repeat: {line}', 'input': '' if n % 2 else 'twice', 'output': line}
          for n, line in enumerate(CORPUS)]
CHAT = [{'messages': [{'role': 'user', 'content': line}, {'role': 'assistant', 'content': CORPUS[n - 1]}]}
        for n, line in enumerate(CORPUS)]
LAYOUTS = {'text': TEXT, 'alpaca': ALPACA, 'chat': CHAT}
FORMS = ('save_to_disk', 'arrow', 'parquet', 'csv', 'hub_folder')


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp('tok')
    save_tiny_tokenizer(folder)
    return load_tokenizer(folder)


def write_jsonl(path, records):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    return path


def write_as(kind, folder, records):
    """The records written by the datasets library itself in one of the on-disk forms."""
    dataset = datasets.Dataset.from_list(records)
    if kind == 'save_to_disk':
        dataset.save_to_disk(str(folder / 'saved'))
        return folder / 'saved'
    if kind == 'arrow':
        dataset.save_to_disk(str(folder / 'saved'))
        return next((folder / 'saved').glob('*.arrow'))
    if kind == 'hub_folder':  # data files named by split, as on the Hub
        (folder / 'hub').mkdir()
        dataset.to_parquet(str(folder / 'hub' / 'train-00000-of-00001.parquet'))
        return folder / 'hub'
    path = folder / f'data.{kind}'
    dataset.to_parquet(str(path)) if kind == 'parquet' else dataset.to_csv(str(path), index=False)
    return path


def batches(path, tokenizer, **options):
    data = load_data(path, tokenizer, seq_len=256, batch_size=2, seed=7, val_fraction=0.3, **options)
    return data.kind, [data.train.batch(i) for i in range(4)] + data.val


def assert_same_batches(got, want):
    assert got[0] == want[0]
    assert len(got[1]) == len(want[1]) > 4
    for a, b in zip(got[1], want[1]):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)


@pytest.mark.parametrize('kind, layout', [(kind, layout) for kind in FORMS for layout in LAYOUTS
                                           if not (kind == 'csv' and layout == 'chat')])  # no lists in CSV
def test_each_format_gives_the_batches_of_its_jsonl(tokenizer, tmp_path, kind, layout):
    records = LAYOUTS[layout]
    want = batches(write_jsonl(tmp_path / 'data.jsonl', records), tokenizer)
    assert_same_batches(batches(write_as(kind, tmp_path, records), tokenizer), want)


def test_records_are_read_lazily(tmp_path):
    mapped = read_records(write_as('save_to_disk', tmp_path, TEXT))
    assert not isinstance(mapped, list) and mapped.dataset.cache_files  # memory-mapped from its file
    assert len(mapped) == len(TEXT) and list(mapped) == TEXT
    streamed = read_records(write_as('parquet', tmp_path, TEXT))
    assert isinstance(streamed.open_stream(), datasets.IterableDataset)
    assert streamed[2] == TEXT[2] and len(streamed) == len(TEXT)


def test_field_chooses_the_column(tokenizer, tmp_path):
    want = batches(write_jsonl(tmp_path / 'data.jsonl', TEXT), tokenizer)
    renamed = [{'id': n, 'content': r['text']} for n, r in enumerate(TEXT)]
    assert_same_batches(batches(write_as('parquet', tmp_path, renamed), tokenizer, field='content'), want)
    want = batches(write_jsonl(tmp_path / 'chat.jsonl', CHAT), tokenizer)
    conversations = [{'conversation': r['messages']} for r in CHAT]
    assert_same_batches(batches(write_as('save_to_disk', tmp_path, conversations), tokenizer,
                                field='conversation'), want)
    with pytest.raises(SlowLlamaError, match="no field 'body'.*id, content"):
        load_data(tmp_path / 'data.parquet', tokenizer, 24, 2, field='body')
    with pytest.raises(SlowLlamaError, match='has none of the keys'):
        load_data(tmp_path / 'data.parquet', tokenizer, 24, 2)


def test_split_chooses_one_of_several(tokenizer, tmp_path):
    train, test = datasets.Dataset.from_list(TEXT[:4]), datasets.Dataset.from_list(ALPACA[2:])
    datasets.DatasetDict({'train': train, 'test': test}).save_to_disk(str(tmp_path / 'dict'))
    want = batches(write_jsonl(tmp_path / 'test.jsonl', ALPACA[2:]), tokenizer)
    assert_same_batches(batches(tmp_path / 'dict', tokenizer, split='test'), want)
    want = batches(write_jsonl(tmp_path / 'train.jsonl', TEXT[:4]), tokenizer)
    assert_same_batches(batches(tmp_path / 'dict', tokenizer), want)  # train by default
    with pytest.raises(SlowLlamaError, match='choose one of the splits train, test with --split'):
        load_data(tmp_path / 'dict', tokenizer, 24, 2, split='validation')
    with pytest.raises(SlowLlamaError, match='--split applies to Hugging Face datasets'):
        load_data(tmp_path / 'train.jsonl', tokenizer, 24, 2, split='test')


def test_bad_datasets_name_the_file(tokenizer, tmp_path):
    corrupt = tmp_path / 'broken.parquet'
    corrupt.write_bytes(b'PAR1 this is not parquet')
    with pytest.raises(SlowLlamaError, match='broken.parquet: cannot read it as a Hugging Face dataset'):
        load_data(corrupt, tokenizer, 24, 2)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(SlowLlamaError, match='empty: cannot read it as a Hugging Face dataset'):
        load_data(tmp_path / 'empty', tokenizer, 24, 2)


def test_missing_library_gives_the_install_hint(tokenizer, tmp_path, monkeypatch):
    path = write_as('parquet', tmp_path, TEXT)
    monkeypatch.setitem(sys.modules, 'datasets', None)  # import datasets -> ImportError
    with pytest.raises(SlowLlamaError, match=r'needs the datasets library: pip install slowllama\[datasets\]'):
        load_data(path, tokenizer, 24, 2)
