"""Checkpoint formats: reading Meta / Hugging Face / GGUF into a prepared folder, and writing back."""
import os

from ..errors import SlowLlamaError
from ..store import PreparedWriter, parse_dtype
from . import hf


def detect(src):
    src = str(src)
    if not os.path.exists(src):
        raise SlowLlamaError(f'{src}: not found')
    if hf.is_hf_folder(src):
        return 'hf'
    raise SlowLlamaError(f'{src}: not a Hugging Face folder (config.json + *.safetensors)')


def prepare(src, out, dtype='bf16'):
    """Turn a checkpoint into a prepared folder at `out` (replaced whole, only on success)."""
    src, dtype = str(src), parse_dtype(dtype)
    kind = detect(src)
    readers = {'hf': (hf.read_config, hf.prepare_hf)}
    read_config, fill = readers[kind]
    writer = PreparedWriter(out, read_config(src), dtype, source={'format': kind, 'path': os.path.abspath(src)})
    try:
        fill(src, writer)
        writer.finish()
    finally:
        writer.abort()
    return str(out)
