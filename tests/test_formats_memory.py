"""prepare() and export() of a model far larger than a memory allowance stay under it, for every
format: the peak RSS of a subprocess (from /proc, reset just before the call) may grow by a few
blocks only."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

DIM, HIDDEN, N_LAYERS, VOCAB = 512, 1536, 48, 256
BLOCK_BYTES = (4 * DIM * DIM + 3 * DIM * HIDDEN) * 4           # one block in fp32: 13 MiB
# RSS growth allowed: the mapped source block, the joined / merged block, its converted copy and
# serialized bytes, the adapter, allocator slack. Constant in the model's size (measured: 3 to 5 blocks).
ALLOWANCE = 8 * BLOCK_BYTES
# HF/Meta/GGUF names for the same block tensors, with their shapes and Meta split dims
BLOCK = {  # HF name: (Meta name, GGUF name, shape, Meta split dim)
    'self_attn.q_proj.weight': ('attention.wq.weight', 'attn_q.weight', (DIM, DIM), 0),
    'self_attn.k_proj.weight': ('attention.wk.weight', 'attn_k.weight', (DIM, DIM), 0),
    'self_attn.v_proj.weight': ('attention.wv.weight', 'attn_v.weight', (DIM, DIM), 0),
    'self_attn.o_proj.weight': ('attention.wo.weight', 'attn_output.weight', (DIM, DIM), 1),
    'mlp.gate_proj.weight': ('feed_forward.w1.weight', 'ffn_gate.weight', (HIDDEN, DIM), 0),
    'mlp.up_proj.weight': ('feed_forward.w3.weight', 'ffn_up.weight', (HIDDEN, DIM), 0),
    'mlp.down_proj.weight': ('feed_forward.w2.weight', 'ffn_down.weight', (DIM, HIDDEN), 1),
    'input_layernorm.weight': ('attention_norm.weight', 'attn_norm.weight', (DIM,), None),
    'post_attention_layernorm.weight': ('ffn_norm.weight', 'ffn_norm.weight', (DIM,), None),
}
OUTER = {'model.embed_tokens.weight': ('tok_embeddings.weight', 'token_embd.weight', (VOCAB, DIM), 1),
         'model.norm.weight': ('norm.weight', 'output_norm.weight', (DIM,), None),
         'lm_head.weight': ('output.weight', 'output.weight', (VOCAB, DIM), 0)}

MEASURE = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    import slowllama
    import slowllama.weights.formats.export  # noqa: F401  (code, not data: loaded before measuring)

    def status(key):
        return int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) * 1024

    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset the peak RSS (VmHWM) to the current RSS: what follows is measured alone
        before = status('VmRSS')
    except OSError:  # no reset allowed: measure growth above the peak so far (a weaker bound)
        before = status('VmHWM')
    if sys.argv[2] == 'prepare':
        slowllama.prepare(sys.argv[3], sys.argv[4], dtype='bf16')
    else:
        from slowllama.weights.formats.export import export
        export(sys.argv[3], sys.argv[4], sys.argv[2], adapter=sys.argv[5], shards=2)
    print(before, status('VmHWM'))
''')


def rss_around(kind, *args):
    """(RSS before, peak RSS during) slowllama.prepare ('prepare') or export (kind = format) in a
    fresh interpreter."""
    root = os.path.join(os.path.dirname(__file__), '..')
    # A fixed mmap threshold: glibc's dynamic one keeps freed tensors of up to 32 MB (here: whole
    # blocks) in a fragmenting heap, slack that real, GB-sized blocks never see (always mmap'd).
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': str(1 << 16)}
    done = subprocess.run([sys.executable, '-c', MEASURE, root, kind, *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    before, peak = map(int, done.stdout.split()[-2:])
    return before, peak


def tensors(seed):
    """(HF name, (Meta name, GGUF name, Meta split dim), fp32 tensor) for the whole model, made one at a time."""
    g = torch.Generator().manual_seed(seed)
    for name, (meta, gguf_name, shape, dim) in OUTER.items():
        yield name, (meta, gguf_name, dim), torch.randn(*shape, generator=g) * 0.02
    for i in range(N_LAYERS):
        for name, (meta, gguf_name, shape, dim) in BLOCK.items():
            yield (f'model.layers.{i}.{name}', (f'layers.{i}.{meta}', f'blk.{i}.{gguf_name}', dim),
                   torch.randn(*shape, generator=g) * 0.02)


def write_meta(folder):
    """Two shards, written one at a time (each regenerates the same tensors and keeps its half)."""
    os.makedirs(folder)
    for s in range(2):
        shard = {meta: (t if dim is None else t.chunk(2, dim)[s]).clone() for _, (meta, _, dim), t in tensors(0)}
        torch.save(shard, os.path.join(folder, f'consolidated.{s:02d}.pth'))
        del shard
    with open(os.path.join(folder, 'params.json'), 'w') as f:
        json.dump({'dim': DIM, 'n_layers': N_LAYERS, 'n_heads': DIM // 64, 'multiple_of': 256,
                   'vocab_size': VOCAB, 'norm_eps': 1e-5}, f)
    return folder


def write_hf(folder):
    """Safetensors shards of 10 blocks each, no index."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    os.makedirs(folder)
    LlamaConfig(hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=N_LAYERS, num_attention_heads=DIM // 64,
                vocab_size=VOCAB).save_pretrained(folder)
    part = {}
    for name, _, t in tensors(0):
        part[name] = t
        if len(part) >= 10 * len(BLOCK):
            save_file(part, os.path.join(folder, f'part-{len(os.listdir(folder)):02d}.safetensors'))
            part = {}
    save_file(part, os.path.join(folder, f'part-{len(os.listdir(folder)):02d}.safetensors'))
    return folder


def write_gguf(folder):
    """F32 tensors streamed into the file one at a time."""
    import gguf
    os.makedirs(folder)
    path = os.path.join(folder, 'big.gguf')
    writer = gguf.GGUFWriter(path, 'llama')
    for key, value in (('block_count', N_LAYERS), ('embedding_length', DIM), ('feed_forward_length', HIDDEN),
                       ('head_count', DIM // 64), ('head_count_kv', DIM // 64), ('context_length', 2048)):
        getattr(writer, f'add_{key}')(value)
    writer.add_layer_norm_rms_eps(1e-5)
    for _, (_, gguf_name, _), t in tensors(0):
        writer.add_tensor_info(gguf_name, t.shape, np.dtype(np.float32), t.numel() * 4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, _, t in tensors(0):
        writer.write_tensor_data(t.numpy())
    writer.close()
    return path


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['meta', 'hf', 'gguf'])
def test_prepare_peak_memory_stays_near_one_block(tmp_path, fmt):
    """A 48-block model (~625 MiB in fp32): RSS may grow by 8 blocks (104 MiB) while preparing."""
    src = {'meta': write_meta, 'hf': write_hf, 'gguf': write_gguf}[fmt](str(tmp_path / 'src'))
    model_bytes = N_LAYERS * BLOCK_BYTES + 2 * VOCAB * DIM * 4
    before, peak = rss_around('prepare', src, tmp_path / 'prepared')
    print(f'memory {fmt}: model {model_bytes / 2**20:.0f} MiB, block {BLOCK_BYTES / 2**20:.1f} MiB, '
          f'RSS before {before / 2**20:.0f} MiB, limit {(before + ALLOWANCE) / 2**20:.0f} MiB, '
          f'peak {peak / 2**20:.0f} MiB (+{(peak - before) / 2**20:.0f} MiB)')
    assert model_bytes > 5 * ALLOWANCE
    assert peak < before + ALLOWANCE
    manifest = json.loads((tmp_path / 'prepared' / 'manifest.json').read_text())
    assert manifest['config']['n_layers'] == N_LAYERS and manifest['source']['format'] == fmt


@pytest.fixture(scope='module')
def big_prepared(tmp_path_factory):
    """The 48-block model prepared in fp32, and a rank-8 adapter on every linear of every block."""
    import slowllama
    from slowllama.model.lora import LoraConfig
    from slowllama.weights.formats.peft import save_adapter_folder
    from slowllama.model.block import block_shapes
    folder = tmp_path_factory.mktemp('big')
    src = write_hf(str(folder / 'hf'))
    slowllama.prepare(src, folder / 'prepared', dtype='fp32')
    lora = LoraConfig(rank=8, alpha=16.0, targets=('q', 'k', 'v', 'o', 'gate', 'up', 'down'))
    shapes = block_shapes(slowllama.load(folder / 'prepared').cfg)
    g = torch.Generator().manual_seed(1)
    state = {}
    for i in range(N_LAYERS):
        for path in ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj',
                     'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj'):
            rows, cols = shapes[path + '.weight']
            state[f'base_model.model.model.layers.{i}.{path}.lora_A.weight'] = torch.randn(8, cols, generator=g)
            state[f'base_model.model.model.layers.{i}.{path}.lora_B.weight'] = torch.randn(rows, 8, generator=g)
    save_adapter_folder(folder / 'adapter', lora, state)
    return folder / 'prepared', folder / 'adapter'


@pytest.mark.slow
@pytest.mark.parametrize('fmt', ['meta', 'hf'])
def test_export_peak_memory_stays_near_one_block(big_prepared, tmp_path, fmt):
    """Merged export of the same model (fp32, one 625 MiB HF file or two Meta shards): the same allowance."""
    model_dir, adapter = big_prepared
    model_bytes = N_LAYERS * BLOCK_BYTES + 2 * VOCAB * DIM * 4
    before, peak = rss_around(fmt, model_dir, tmp_path / 'out', adapter)
    print(f'memory export {fmt}: model {model_bytes / 2**20:.0f} MiB, RSS before {before / 2**20:.0f} MiB, '
          f'limit {(before + ALLOWANCE) / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB '
          f'(+{(peak - before) / 2**20:.0f} MiB)')
    assert peak < before + ALLOWANCE
    assert model_bytes > 5 * ALLOWANCE
    written = sum(os.path.getsize(tmp_path / 'out' / name) for name in os.listdir(tmp_path / 'out'))
    assert written > model_bytes
