"""Checkpoint formats: reading Meta / Hugging Face / GGUF into a prepared folder, and writing back."""
import os

from ...errors import SlowLlamaError
from ...model.quant import parse_quant
from ..prepared import PreparedWriter, parse_dtype
from . import gguf, hf, meta


def detect(src):
    src = str(src)
    if not os.path.exists(src):
        raise SlowLlamaError(f'{src}: not found')
    if hf.is_hf_folder(src):
        return 'hf'
    if meta.is_meta_folder(src):
        return 'meta'
    if gguf.is_gguf_file(src):
        return 'gguf'
    raise SlowLlamaError(f'{src}: not a Hugging Face folder (config.json + *.safetensors), a Meta folder '
                         '(params.json + consolidated.NN.pth) or a .gguf file')


def prepare(src, out, dtype='bf16', quant=None, double_quant=False, quant_head=False):
    """Turn a checkpoint into a prepared folder at `out` (replaced whole, only on success).
    quant: None, 'nf4' or 'int8': the blocks' projection weights stored packed (see quant.py);
    quant_head: the embeddings and output head packed too (QLoRA keeps them unquantized)."""
    src, dtype, quant = str(src), parse_dtype(dtype), parse_quant(quant, double_quant, quant_head)
    kind = detect(src)
    readers = {'hf': (hf.read_config, hf.prepare_hf), 'meta': (meta.read_config, meta.prepare_meta),
               'gguf': (gguf.read_config, gguf.prepare_gguf)}
    read_config, fill = readers[kind]
    writer = PreparedWriter(out, read_config(src), dtype, source={'format': kind, 'path': os.path.abspath(src)},
                            quant=quant)
    try:
        fill(src, writer)
        writer.finish()
    finally:
        writer.abort()
    return str(out)
