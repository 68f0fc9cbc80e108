"""How long `export --format gguf --dtype SCHEME` spends quantizing a 7B model (Llama-2-7B's shapes).

Measures each GGUF type's encoder on one 4096 x 11008 tensor (a 7B ffn_down), then adds up, over the
7B's tensors, the time each takes at its type's rate under the scheme's per-tensor types
(gguf_mixture.tensor_types). Prints CPU seconds (one core, robust to a busy machine) and wall seconds
with --threads threads (default: every CPU). Usage: python scripts/gguf_quant_speed.py [--threads N]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from slowllama.weights.formats.gguf_mixture import SCHEMES, tensor_types  # noqa: E402
from slowllama.weights.formats.gguf_quants import quantize  # noqa: E402

LLAMA2_7B = dict(n_layers=32, dim=4096, hidden=11008, vocab=32000, heads=32, kv_heads=32)


def shapes_7b(n_layers, dim, hidden, vocab, **_):
    out = {'token_embd.weight': (vocab, dim)}
    for i in range(n_layers):
        for name, shape in (('attn_q', (dim, dim)), ('attn_k', (dim, dim)), ('attn_v', (dim, dim)),
                            ('attn_output', (dim, dim)), ('ffn_gate', (hidden, dim)), ('ffn_up', (hidden, dim)),
                            ('ffn_down', (dim, hidden)), ('attn_norm', (dim,)), ('ffn_norm', (dim,))):
            out[f'blk.{i}.{name}.weight'] = shape
    out['output_norm.weight'] = (dim,)
    out['output.weight'] = (vocab, dim)
    return out


def rates(kinds, threads):
    """type -> (CPU seconds, wall seconds) a value, measured on one 4096 x 11008 tensor."""
    x = (np.random.default_rng(0).standard_normal((4096, 11008)) * 0.02).astype(np.float32)
    out = {}
    for kind in kinds:
        cpu = time.process_time()
        quantize(x, kind, threads=1)
        cpu = time.process_time() - cpu
        wall = time.perf_counter()
        quantize(x, kind, threads=threads)
        wall = time.perf_counter() - wall
        out[kind] = (cpu / x.size, wall / x.size)
        print(f'{kind}: 4096x11008 in {cpu:.1f} s CPU (one thread), {wall:.1f} s wall ({threads} threads)',
              flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--threads', type=int, default=os.cpu_count())
    args = p.parse_args()
    shapes = shapes_7b(**LLAMA2_7B)
    mixes = {s: tensor_types(shapes, s, LLAMA2_7B['n_layers'], LLAMA2_7B['heads'], LLAMA2_7B['kv_heads'])[0]
             for s in SCHEMES}
    kinds = sorted({k for mix in mixes.values() for k in mix.values() if k != 'f32'})
    per_value = rates(kinds, args.threads)
    print(f'\n7B (Llama-2-7B shapes) quantization time, {args.threads} threads:')
    print('| scheme | CPU time, one thread | wall time |')
    print('| --- | --- | --- |')
    for scheme, mix in mixes.items():
        sizes = [(int(np.prod(shapes[n])), k) for n, k in mix.items() if k != 'f32']
        cpu = sum(n * per_value[k][0] for n, k in sizes)
        wall = sum(n * per_value[k][1] for n, k in sizes)
        print(f'| {scheme} | {cpu / 60:.1f} min | {wall / 60:.1f} min |')


if __name__ == '__main__':
    main()
