"""Hugging Face datasets on disk as training records: a `save_to_disk` folder (or a folder of data
files laid out as on the Hub), `.arrow`, `.parquet` and `.csv` files, read with the `datasets` library.

Nothing is loaded whole: save_to_disk folders and .arrow files are memory-mapped Arrow tables,
parquet and csv files are streamed, so a data set larger than RAM can be read. The records come out
as plain dicts, as from a JSONL file, and data.py detects their layout the same way.
"""
import itertools
import os
from collections.abc import Sequence

from ..errors import SlowLlamaError

FILE_BUILDERS = {'.parquet': 'parquet', '.csv': 'csv'}  # streamed through datasets' builders
HINT = 'pip install slowllama[datasets]'


def is_hf_dataset(path):
    """A folder or an .arrow / .parquet / .csv file (anything else is read as JSONL or text)."""
    return os.path.isdir(path) or str(path).lower().endswith(('.arrow', *FILE_BUILDERS))


def read_hf_records(path, split=None):
    """The records of the dataset at `path` (split: which one of several; default 'train' or the
    only one) as a lazy sequence of dicts."""
    datasets = _import_datasets(path)
    try:
        return _open(datasets, str(path), split)
    except SlowLlamaError:
        raise
    except Exception as e:  # OSError, pyarrow's ArrowInvalid, datasets' own errors for corrupt files
        raise SlowLlamaError(f'{path}: cannot read it as a Hugging Face dataset ({_first_line(e)})') from None


def _open(datasets, path, split):
    if os.path.isdir(path) and _saved_by_datasets(path):
        return MappedRecords(_pick_split(path, datasets.load_from_disk(path), split))
    if os.path.isdir(path):  # data files laid out as on the Hub: the builder reads the split names
        builder, data_files = path, None
    else:
        _one_split(path, split)
        suffix = os.path.splitext(path)[1].lower()
        if suffix == '.arrow':
            return MappedRecords(datasets.Dataset.from_file(path))
        builder, data_files = FILE_BUILDERS[suffix], path
    options = {}
    if builder == 'parquet':  # read row group by row group: pre-buffering kept ~0.3 GB more of a 0.4 GB file
        import pyarrow.dataset
        options['fragment_scan_options'] = pyarrow.dataset.ParquetFragmentScanOptions(pre_buffer=False)

    def stream():
        return datasets.load_dataset(builder, data_files=data_files, split=split or 'train', streaming=True,
                                     **options)
    stream()  # a missing split or an unreadable folder fails here, with the file named
    return StreamedRecords(stream, path)


class MappedRecords(Sequence):
    """A memory-mapped datasets.Dataset, row by row as dicts."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return dict(self.dataset[index])

    def __iter__(self):
        return (dict(row) for row in self.dataset)


class StreamedRecords(Sequence):
    """A streamed (datasets' IterableDataset) file: every pass reads it again from disk; its length
    costs one pass, and indexing reads up to the row (used for the first record only)."""

    def __init__(self, open_stream, path):
        self.open_stream, self.path, self._length = open_stream, path, None

    def __iter__(self):
        try:
            for row in self.open_stream():
                yield dict(row)
        except Exception as e:  # a corrupt row or file shows only once it is read
            raise SlowLlamaError(f'{self.path}: cannot read it as a Hugging Face dataset ({_first_line(e)})') from None

    def __len__(self):
        if self._length is None:
            self._length = sum(1 for _ in self)
        return self._length

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        row = next(itertools.islice(iter(self), index, None), None)
        if row is None:
            raise IndexError(index)
        return row


def _import_datasets(path):
    try:
        import datasets
    except ImportError:
        raise SlowLlamaError(f'{path}: reading Hugging Face datasets needs the datasets library: {HINT}') from None
    return datasets


def _saved_by_datasets(folder):
    return any(os.path.exists(os.path.join(folder, name)) for name in ('dataset_dict.json', 'state.json'))


def _pick_split(path, loaded, split):
    """A DatasetDict's chosen split; a single Dataset is its own split."""
    if not hasattr(loaded, 'keys'):
        _one_split(path, split)
        return loaded
    names = list(loaded.keys())
    chosen = split or ('train' if 'train' in names else names[0] if len(names) == 1 else None)
    if chosen not in names:
        raise SlowLlamaError(f'{path}: choose one of the splits {", ".join(names)} with --split')
    return loaded[chosen]


def _one_split(path, split):
    if split not in (None, 'train'):
        raise SlowLlamaError(f'{path}: holds one split; --split {split} applies to a folder of several')


def _first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
