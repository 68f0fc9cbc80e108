"""Meta checkpoints in: shards for MP 1, 2 and 8 (GQA, Llama-2/3 and CodeLlama params.json), joined
block by block; bad shards refused with the file named; peak memory bounded by a block."""
import json
import os
import subprocess
import sys

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
