"""Make tests/fixtures/llama_cpp_quants.npz: what llama.cpp's own quantizer writes, kept once so the
tests can compare our GGUF quantization with it without building llama.cpp.

How it was produced (llama-cpp-python 0.3.36, built from its source distribution on x86-64):
    CMAKE_ARGS="-DGGML_NATIVE=off" pip install llama-cpp-python==0.3.36
    python scripts/make_gguf_quant_fixture.py
For each tiny model of tests/gguf_fixture_model.py it writes the f32 GGUF, has
llama_cpp.llama_model_quantize turn it into each scheme (no importance matrix), and keeps:
the type llama.cpp chose for every tensor, the first rows' bytes of a few tensors (SAMPLED), and a
hash of every input tensor (the tests regenerate the inputs from their seed and check the hash).
"""
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'tests'))
from gguf_fixture_model import (MODELS, SAMPLED, SAMPLED_ROWS, SCHEMES, digest, llama_cpp_quantize,  # noqa: E402
                                shapes, weights, write_f32_gguf)

OUT = os.path.join(HERE, '..', 'tests', 'fixtures', 'llama_cpp_quants.npz')


def main():
    import gguf
    import llama_cpp
    arrays, types, digests = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for model, spec in MODELS.items():
            src = os.path.join(tmp, f'{model}-f32.gguf')
            write_f32_gguf(src, spec)
            if spec.get('sample', True):
                digests[model] = {name: digest(weights(spec, name, shape)) for name, shape in shapes(spec).items()}
            types[model] = {}
            for scheme in SCHEMES:
                dst = os.path.join(tmp, f'{model}-{scheme}.gguf')
                llama_cpp_quantize(src, dst, scheme)
                reader = gguf.GGUFReader(dst)
                types[model][scheme] = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
                for t in reader.tensors:
                    key = f'{model}|{t.name}|{t.tensor_type.name.lower()}'
                    if spec.get('sample', True) and t.name in SAMPLED and key not in arrays:
                        arrays[key] = np.array(t.data[:SAMPLED_ROWS], dtype=np.uint8)
                del reader
                os.unlink(dst)
    meta = {'llama_cpp_python': llama_cpp.__version__, 'models': MODELS, 'schemes': list(SCHEMES),
            'types': types, 'digests': digests, 'sampled_rows': SAMPLED_ROWS}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, meta=np.array(json.dumps(meta)), **arrays)
    print(f'{OUT}: {len(arrays)} sampled tensors, {os.path.getsize(OUT) // 1024} KiB')


if __name__ == '__main__':
    main()
