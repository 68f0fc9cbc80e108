"""Our Llama math against transformers: rope variants, GQA, tied heads, reduced precision."""
import pytest
import torch
from conftest import make_hf_model, random_batch
from reference import copy_adapters

import slowllama
from slowllama.weights.formats.model_config import config_from_hf

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


# --- model dropout (--dropout) against its definition -------------------------------------------
# transformers' Llama has no residual dropout, so the reference there is the definition: each kept
# value scaled by 1 / (1 - p), a fraction p zeroed, the expectation unchanged. Attention dropout (on
# the softmax probabilities) is compared with transformers' eager attention drawing from the same
# generator.

DROPOUT = 0.25


@pytest.fixture(scope='module')
def layer_pair():
    """(transformers' eager LlamaDecoderLayer with attention_dropout p, our Block with its weights,
    ModelConfig, input x [2, 12, 64], cos, sin)."""
    from conftest import TINY
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from slowllama.model.block import Block, rope_table
    from slowllama.model.config import ModelConfig
    from slowllama.weights.formats.model_config import config_from_hf
    config = LlamaConfig(**TINY, attention_dropout=DROPOUT, attn_implementation='eager')
    torch.manual_seed(0)
    theirs = LlamaDecoderLayer(config, layer_idx=0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            param.copy_(1.0 + 0.2 * torch.randn_like(param) if 'norm' in name else 0.15 * torch.randn_like(param))
    cfg = config_from_hf(config.to_dict())
    ours = Block(cfg, DROPOUT)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 12, cfg.dim)
    positions = torch.arange(x.shape[1])
    cos, sin = rope_table(cfg, positions, 'cpu')
    their_cos, their_sin = LlamaRotaryEmbedding(config)(x, positions[None])
    assert torch.allclose(cos, their_cos[0], atol=1e-6) and torch.allclose(sin, their_sin[0], atol=1e-6)
    return theirs, ours, x, cos, sin


def causal_bias(seq):
    """The additive mask transformers' eager attention takes: 0 where a key is seen, -inf elsewhere."""
    return torch.full((seq, seq), float('-inf')).triu(1)[None, None]


def residual_dropout(x, p):
    """Dropout by its definition: keep each value with probability 1 - p, scaled by 1 / (1 - p)."""
    keep = torch.empty_like(x).bernoulli_(1 - p)
    return x * keep / (1 - p)


def reference_block(theirs, x, p):
    """h = x + drop(attn(norm(x))); out = h + drop(mlp(norm(h))), attention by transformers (its eager
    dropout on the probabilities), the residual dropout written out; the masks drawn in that order."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    position_embeddings = LlamaRotaryEmbedding(theirs.self_attn.config)(x, torch.arange(x.shape[1])[None])
    attn, _ = theirs.self_attn(theirs.input_layernorm(x), position_embeddings=position_embeddings,
                               attention_mask=causal_bias(x.shape[1]))
    h = x + residual_dropout(attn, p)
    return h + residual_dropout(theirs.mlp(theirs.post_attention_layernorm(h)), p)


def test_block_dropout_is_transformers_attention_dropout_plus_residual_dropout(layer_pair):
    """Our Block in training mode, same generator: transformers' eager attention with its dropout on
    the softmax probabilities, then dropout on both residual branches by the definition."""
    theirs, ours, x, cos, sin = layer_pair
    theirs.train(), ours.train()
    with torch.no_grad():
        for seed in range(3):
            torch.manual_seed(seed)
            got = ours(x, cos, sin)
            torch.manual_seed(seed)
            want = reference_block(theirs, x, DROPOUT)
            assert torch.allclose(got, want, atol=1e-5), (seed, (got - want).abs().max())
        torch.manual_seed(0)
        other = ours(x, cos, sin)
        assert (other - ours(x, cos, sin)).abs().max() > 0.1  # each call draws new masks
        ours.eval(), theirs.eval()
        plain = theirs(x, position_embeddings=(cos[None], sin[None]), attention_mask=causal_bias(x.shape[1]))
        assert torch.allclose(ours(x, cos, sin), plain, atol=1e-5)  # evaluation: no dropout anywhere
        assert (other - plain).abs().max() > 0.1


def test_attention_dropout_alone_equals_transformers_and_keeps_the_expectation(layer_pair):
    """Attention dropout without the residual one (transformers' layer has only this one): the same
    values as transformers' eager attention with the same generator; its mean over draws is the
    output without dropout (dropout is linear in the probabilities)."""
    theirs, ours, x, cos, sin = layer_pair
    ours.train(), theirs.train()
    ours.dropout = 0.0  # the residual branches undropped, attention dropout still p
    bias = causal_bias(x.shape[1])
    try:
        with torch.no_grad():
            torch.manual_seed(3)
            got = ours(x, cos, sin)
            torch.manual_seed(3)
            want = theirs(x, position_embeddings=(cos[None], sin[None]), attention_mask=bias)
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
            attn_only = ours.self_attn(ours.input_layernorm(x), cos, sin)
            draws = ours.self_attn(ours.input_layernorm(x.repeat(200, 1, 1)), cos, sin)  # 200 draws, one call
            draws = draws.view(200, *x.shape)
            ours.eval()
            exact = ours.self_attn(ours.input_layernorm(x), cos, sin)
    finally:
        ours.set_dropout(DROPOUT)
    assert (attn_only - exact).abs().max() > 0.05 * exact.abs().max()  # a single draw is not the mean
    assert ratio(draws.mean(0), exact) == pytest.approx(1.0, abs=0.03)


def ratio(dropped, exact):
    """<dropped, exact> / <exact, exact>: 1 when dropout keeps the expectation, 1 - p without the
    1 / (1 - p) scale."""
    return float((dropped * exact).sum() / (exact * exact).sum())


@pytest.mark.parametrize('branch', ['attention', 'mlp'])
def test_residual_dropout_zeroes_a_fraction_p_and_scales_the_rest(layer_pair, branch):
    """One residual branch at a time (the other's output projection zeroed), attention dropout off:
    out - x is the branch's output with a fraction p of its values zeroed and the rest times
    1 / (1 - p), and over many draws it averages to the branch's output."""
    import copy
    _, block, x, cos, sin = layer_pair
    block = copy.deepcopy(block)
    block.self_attn.dropout = 0.0
    with torch.no_grad():
        silenced = block.mlp.down_proj if branch == 'attention' else block.self_attn.o_proj
        silenced.weight.zero_()
        block.eval()
        exact = block(x, cos, sin) - x  # the branch's output, undropped
        block.train()
        torch.manual_seed(4)
        draws = (block(x.repeat(40, 1, 1), cos, sin) - x.repeat(40, 1, 1)).view(40, *x.shape)  # 40 draws
    zeroed = draws.abs() < 1e-7
    fraction = zeroed.float().mean().item()
    n = zeroed.numel()
    assert abs(fraction - DROPOUT) < 5 * (DROPOUT * (1 - DROPOUT) / n) ** 0.5, fraction
    kept = ~zeroed
    scaled = (exact / (1 - DROPOUT)).expand_as(draws)
    assert torch.allclose(draws[kept], scaled[kept], rtol=1e-4, atol=1e-6)
    assert ratio(draws.mean(0), exact) == pytest.approx(1.0, abs=0.02)
