"""Our Llama math against transformers: rope variants, GQA, tied heads, reduced precision."""
import pytest
import torch

import slowllama
from conftest import make_hf_model, random_batch
from reference import copy_adapters

LLAMA3_ROPE = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
               'original_max_position_embeddings': 16}


@pytest.mark.parametrize('overrides', [
    {'rope_scaling': LLAMA3_ROPE, 'rope_theta': 500000.0},   # Llama-3.1 long-context rope
    {'num_key_value_heads': 1},                               # multi-query attention
    {'num_key_value_heads': 4, 'tie_word_embeddings': True},  # plain multi-head, tied head
], ids=['llama3-rope', 'mqa', 'mha-tied'])
def test_logits_equal_transformers(tmp_path, overrides):
    hf_model = make_hf_model(tmp_path / 'hf', seed=4, **overrides)
    slowllama.prepare(tmp_path / 'hf', tmp_path / 'prepared', dtype='fp32')
    model = slowllama.load(tmp_path / 'prepared')
    tokens, _ = random_batch(model.cfg.vocab_size, seq=40)  # past original_max_position_embeddings
    want = hf_model(tokens).logits
    assert torch.allclose(model.logits(tokens), want, atol=1e-4, rtol=1e-4)


def test_llama3_scaling_is_read_and_matters(tmp_path):
    make_hf_model(tmp_path / 'hf', rope_scaling=LLAMA3_ROPE)
    slowllama.prepare(tmp_path / 'hf', tmp_path / 'prepared', dtype='fp32')
    model = slowllama.load(tmp_path / 'prepared')
    assert model.cfg.rope_scaling['factor'] == 8.0
    from slowllama.model.block import rope_inv_freq
    plain = type(model.cfg).from_dict({**model.cfg.to_dict(), 'rope_scaling': None})
    assert not torch.allclose(rope_inv_freq(model.cfg), rope_inv_freq(plain))


def test_bf16_compute_tracks_fp32(tiny_prepared):
    model_dir, _, _ = tiny_prepared
    exact = slowllama.load(model_dir, dtype='fp32')
    half = slowllama.load(model_dir, dtype='bf16')
    copy_adapters(exact.adapters, half.adapters)
    tokens, targets = random_batch(exact.cfg.vocab_size)
    assert half.logits(tokens).dtype == torch.float32
    assert (half.logits(tokens) - exact.logits(tokens)).abs().max() < 0.25
    loss32, loss16 = exact.backward(tokens, targets), half.backward(tokens, targets)
    assert abs(loss32 - loss16) < 0.05
    for name, param in half.trainable_parameters().items():
        assert param.dtype == torch.float32 and torch.isfinite(param.grad).all()
        ref = exact.trainable_parameters()[name].grad
        cos = torch.nn.functional.cosine_similarity(param.grad.flatten(), ref.flatten(), dim=0)
        assert cos > 0.98 or ref.abs().max() == 0
