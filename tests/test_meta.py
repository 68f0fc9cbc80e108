"""Meta checkpoints in: shards for MP 1, 2 and 8 (GQA, Llama-2/3 and CodeLlama params.json), joined
block by block; bad shards refused with the file named; peak memory bounded by a block."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import slowllama
from checkpoints import hf_params, write_meta
from conftest import make_hf_model, random_batch

# n_kv_heads 8 so that 8 model-parallel shards get one kv head each, as Llama-2/3 70B do
META_TINY = dict(hidden_size=128, num_attention_heads=16, num_key_value_heads=8, vocab_size=256,
                 num_hidden_layers=2)
VARIANTS = {
    # Llama-2 style: hidden_dim from multiple_of alone (int(2*4*128/3) = 341 -> 512)
    'llama2': (dict(intermediate_size=512), dict()),
    # Llama-3 style: ffn_dim_multiplier, large rope_theta (int(1.3 * 341) = 443 -> 448 with multiple_of 64)
    'llama3': (dict(intermediate_size=448, rope_theta=500000.0), dict(ffn_dim_multiplier=1.3, multiple_of=64)),
    # CodeLlama / old params.json: vocab_size -1, taken from the embedding; rope_theta 1e6
    'codellama': (dict(intermediate_size=512, rope_theta=1e6), dict(vocab_size=-1)),
}
MAX_DIFFS = {}


def meta_checkpoint(folder, variant, n_shards, seed=0):
    hf_overrides, params = VARIANTS[variant]
    hf_model = make_hf_model(folder / 'hf', seed=seed, **{**META_TINY, **hf_overrides})
    write_meta(folder / 'meta', hf_model, n_shards, hf_params(hf_model, **params))
    return folder / 'meta', hf_model


@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize('n_shards', [1, 2, 8])
def test_meta_logits_equal_transformers(tmp_path, variant, n_shards):
    src, hf_model = meta_checkpoint(tmp_path, variant, n_shards)
    slowllama.prepare(src, tmp_path / 'prepared', dtype='fp32')
    model = slowllama.load(tmp_path / 'prepared')
    assert model.cfg.n_kv_heads == 8 and model.cfg.hidden_dim == hf_model.config.intermediate_size
    assert model.cfg.rope_theta == hf_model.config.rope_parameters['rope_theta']
    tokens, _ = random_batch(model.cfg.vocab_size, seq=16)
    with torch.no_grad():
        ref = hf_model(tokens).logits
    diff = (model.logits(tokens) - ref).abs().max().item()
    MAX_DIFFS[(variant, n_shards)] = diff
    print(f'meta {variant} MP={n_shards}: max |logit diff| {diff:.2e}')
    assert diff < 1e-4


def test_meta_prepare_from_the_command_line(tmp_path):
    src, _ = meta_checkpoint(tmp_path, 'llama2', 2)
    script = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'prepare_model.py')
    done = subprocess.run([sys.executable, script, str(src), str(tmp_path / 'out'), '--dtype', 'bf16'],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / 'out' / 'manifest.json').read_text())
    assert manifest['source']['format'] == 'meta' and manifest['dtype'] == 'bf16'


def test_code_in_a_pickle_is_refused(tmp_path):
    src, _ = meta_checkpoint(tmp_path, 'llama2', 1)
    shard = src / 'consolidated.00.pth'
    state = torch.load(shard, weights_only=True)
    state['evil'] = RunsCode()
    torch.save(state, shard)
    with pytest.raises(slowllama.SlowLlamaError, match='consolidated.00.pth: refused'):
        slowllama.prepare(src, tmp_path / 'out')
    assert not (tmp_path / 'ran').exists() and not (tmp_path / 'out').exists()


class RunsCode:
    def __reduce__(self):
        return (os.system, ('touch ran',))


def test_truncated_shard_is_named_and_old_output_kept(tmp_path):
    src, _ = meta_checkpoint(tmp_path, 'llama2', 2)
    slowllama.prepare(src, tmp_path / 'out', dtype='fp32')
    before = (tmp_path / 'out' / 'manifest.json').read_bytes()
    shard = src / 'consolidated.01.pth'
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(slowllama.SlowLlamaError, match='consolidated.01.pth: truncated or corrupt'):
        slowllama.prepare(src, tmp_path / 'out')
    assert (tmp_path / 'out' / 'manifest.json').read_bytes() == before


def test_missing_shard_is_named(tmp_path):
    src, _ = meta_checkpoint(tmp_path, 'llama2', 2)
    os.unlink(src / 'consolidated.00.pth')
    with pytest.raises(slowllama.SlowLlamaError, match=r'consolidated.00.pth: shard missing'):
        slowllama.prepare(src, tmp_path / 'out')


def test_shards_that_do_not_fit_params_are_refused(tmp_path):
    src, _ = meta_checkpoint(tmp_path, 'llama2', 2)
    os.unlink(src / 'consolidated.01.pth')  # one of two shards left: every split tensor is half size
    with pytest.raises(slowllama.SlowLlamaError, match='shape'):
        slowllama.prepare(src, tmp_path / 'out')
    params = json.loads((src / 'params.json').read_text())
    (src / 'params.json').write_text(json.dumps({**params, 'n_layers': 1}))
    with pytest.raises(slowllama.SlowLlamaError, match='does not describe'):
        slowllama.prepare(src, tmp_path / 'out')


# --- memory ------------------------------------------------------------------------------------

PEAK_RSS = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    import slowllama

    def status(key):
        return int(open('/proc/self/status').read().split(key + ':')[1].split()[0]) * 1024

    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset the peak RSS (VmHWM) to the current RSS: what follows is measured alone
    before = status('VmRSS')
    slowllama.prepare(sys.argv[2], sys.argv[3], dtype='bf16')
    print(before, status('VmHWM'))
''')


def rss_around_prepare(src, out):
    """(RSS before, peak RSS during) slowllama.prepare in a fresh interpreter, from /proc."""
    root = os.path.join(os.path.dirname(__file__), '..')
    done = subprocess.run([sys.executable, '-c', PEAK_RSS, root, str(src), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    before, peak = map(int, done.stdout.split()[-2:])
    return before, peak


def write_big_meta(folder, n_layers, dim, hidden, n_shards):
    """Random Meta shards of a model far larger than one block (fp32), written shard by shard."""
    os.makedirs(folder, exist_ok=True)
    n_heads = dim // 64
    g = torch.Generator().manual_seed(0)
    shapes = {'attention.wq.weight': (dim, dim, 0), 'attention.wk.weight': (dim, dim, 0),
              'attention.wv.weight': (dim, dim, 0), 'attention.wo.weight': (dim, dim, 1),
              'feed_forward.w1.weight': (hidden, dim, 0), 'feed_forward.w3.weight': (hidden, dim, 0),
              'feed_forward.w2.weight': (dim, hidden, 1), 'attention_norm.weight': (dim, None, None),
              'ffn_norm.weight': (dim, None, None)}
    for s in range(n_shards):
        shard = {'tok_embeddings.weight': torch.randn(256, dim // n_shards, generator=g),
                 'norm.weight': torch.ones(dim), 'output.weight': torch.randn(256 // n_shards, dim, generator=g)}
        for i in range(n_layers):
            for name, (rows, cols, dim_split) in shapes.items():
                shape = [rows] if cols is None else [rows, cols]
                if dim_split is not None:
                    shape[dim_split] //= n_shards
                shard[f'layers.{i}.{name}'] = torch.randn(*shape, generator=g) * 0.02
        torch.save(shard, os.path.join(folder, f'consolidated.{s:02d}.pth'))
        del shard
    with open(os.path.join(folder, 'params.json'), 'w') as f:
        json.dump({'dim': dim, 'n_layers': n_layers, 'n_heads': n_heads, 'multiple_of': 256, 'vocab_size': 256,
                   'norm_eps': 1e-5}, f)
    return sum(os.path.getsize(os.path.join(folder, f'consolidated.{s:02d}.pth')) for s in range(n_shards))


@pytest.mark.slow
def test_prepare_peak_memory_stays_near_one_block(tmp_path):
    """Prepare a 40-block model (~520 MiB of fp32 shards) in a subprocess: its RSS may grow by
    7 blocks at most while preparing (the mapped source pieces, the joined block, its bf16 copy and
    serialized bytes, allocator slack), an allowance the model is 5.7 times larger than."""
    dim, hidden, n_layers = 512, 1536, 40
    block_bytes = (4 * dim * dim + 3 * dim * hidden) * 4
    model_bytes = write_big_meta(tmp_path / 'big', n_layers, dim, hidden, n_shards=2)
    allowance = 7 * block_bytes
    before, peak = rss_around_prepare(tmp_path / 'big', tmp_path / 'prepared')
    print(f'memory: model {model_bytes / 2**20:.0f} MiB, block {block_bytes / 2**20:.1f} MiB, '
          f'RSS before {before / 2**20:.0f} MiB, limit {(before + allowance) / 2**20:.0f} MiB, '
          f'peak {peak / 2**20:.0f} MiB')
    assert model_bytes > 5 * allowance
    assert peak < before + allowance
    assert json.loads((tmp_path / 'prepared' / 'manifest.json').read_text())['config']['n_layers'] == n_layers
