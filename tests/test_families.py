"""The Llama-shaped families against transformers' own class for each: Qwen2 (q/k/v bias, tied),
Qwen3 (per-head q/k norm, explicit head_dim), Mistral (sliding window), Phi-3 (fused projections,
window) and Llama 3.2 (tied, llama3 rope scaling): logits, loss and every LoRA gradient with LoRA
dropout on, greedy generation, export round trips; what we do not build is refused."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_hf_model, random_batch
from reference import peft_grads, peft_model, randomize_adapters, step_beside_peft

import slowllama
from slowllama.weights.formats.export import export
from slowllama.weights.formats.model_config import config_from_hf

HF_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
LLAMA3_ROPE = {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 32.0, 'low_freq_factor': 1.0,
               'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}
NO_SPECIAL_IDS = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)  # their defaults pass TINY's vocab
# GQA with odd head counts; windows shorter than the test sequences so that they matter
FAMILIES = {
    'qwen2': dict(model_type='qwen2', hidden_size=72, num_attention_heads=9, num_key_value_heads=3,
                  tie_word_embeddings=True),
    'qwen3': dict(model_type='qwen3', num_attention_heads=5, num_key_value_heads=1, head_dim=16),
    'mistral': dict(model_type='mistral', num_attention_heads=6, num_key_value_heads=3, hidden_size=72,
                    sliding_window=5),
    'phi3': dict(model_type='phi3', num_attention_heads=6, num_key_value_heads=2, hidden_size=72,
                 sliding_window=7, pad_token_id=None),
    # LongRoPE past an original length of 8: training rows (12) and generation use the long factors
    'phi3-longrope': dict(model_type='phi3', num_attention_heads=6, num_key_value_heads=3, hidden_size=72,
                          pad_token_id=None, original_max_position_embeddings=8,
                          rope_parameters={'rope_type': 'longrope', 'rope_theta': 10000.0,
                                           'short_factor': [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
                                           'long_factor': [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]}),
    'llama3.2': dict(model_type='llama', tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    # issue 35's families. SmolLM3: layer 1 without rope
    'smollm3': dict(model_type='smollm3', no_rope_layer_interval=2, tie_word_embeddings=False, **NO_SPECIAL_IDS),
    # OLMo 2: norms after attention and MLP only, q/k norms over the whole projection
    'olmo2': dict(model_type='olmo2', num_attention_heads=4, num_key_value_heads=2, **NO_SPECIAL_IDS),
    'granite': dict(model_type='granite', embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.05,
                    logits_scaling=2.5, **NO_SPECIAL_IDS),
    # Gemma 3: sliding (window 5) and full layers, two rope bases, linear scaling on the full ones,
    # head_dim apart from hidden / heads, query_pre_attn_scalar apart from head_dim, tied
    'gemma3_text': dict(model_type='gemma3_text', head_dim=24, query_pre_attn_scalar=20, sliding_window=5,
                        layer_types=['sliding_attention', 'full_attention', 'sliding_attention'],
                        rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 4.0, 'rope_theta': 1e5},
                                         'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e3}},
                        **NO_SPECIAL_IDS),
    # Gemma 2: soft-caps small enough to bend the scores and logits; every other layer windowed
    'gemma2': dict(model_type='gemma2', head_dim=16, query_pre_attn_scalar=20, sliding_window=5,
                   attn_logit_softcapping=3.0, final_logit_softcapping=2.0, **NO_SPECIAL_IDS),
}
NEW_FAMILIES = ('smollm3', 'olmo2', 'granite', 'gemma3_text', 'gemma2')


@pytest.fixture(scope='module', params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, prepared folder, transformers model) of a tiny random model of each family."""
    folder = tmp_path_factory.mktemp(request.param)
    hf_model = make_hf_model(folder / 'hf', seed=11, **FAMILIES[request.param])
    slowllama.prepare(folder / 'hf', folder / 'prepared', dtype='fp32')
    return request.param, folder / 'prepared', hf_model


def test_config_names_the_family(family):
    name, model_dir, hf_model = family
    cfg = slowllama.load(model_dir).cfg
    assert cfg.model_type == hf_model.config.model_type
    assert cfg.qkv_bias == (name == 'qwen2') and cfg.qk_norm == (name in ('qwen3', 'olmo2', 'gemma3_text'))
    rope_kind = cfg.rope_scaling and cfg.rope_scaling.get('rope_type', 'llama3')
    assert rope_kind == {'phi3-longrope': 'longrope', 'llama3.2': 'llama3', 'gemma3_text': 'linear'}.get(name)
    hf = hf_model.config
    assert cfg.sliding_window == getattr(hf, 'sliding_window', None)
    if name in ('gemma2', 'gemma3_text'):
        assert cfg.layer_types == hf.layer_types and len(set(cfg.layer_types)) == 2
    assert cfg.no_rope_layers == ([1, 0, 1] if name == 'smollm3' else None)
    assert cfg.head_dim == (getattr(hf, 'head_dim', None) or hf.hidden_size // hf.num_attention_heads)
    assert cfg.tie_embeddings == hf.tie_word_embeddings


def test_logits_loss_and_grads_equal_transformers_peft_with_dropout(family, tmp_path):
    """A random adapter of ours exported for peft and loaded by it on transformers' class; both in
    training mode with LoRA dropout 0.1 and the same seed (peft draws its masks in the order we
    do): logits, loss and every LoRA gradient agree. Phi-3's fused modules get one dropout mask
    where we draw three, so it is checked without dropout, through the stacked adapter: its A
    gradients are ours stacked, its B gradients ours on the diagonal blocks."""
    from peft import PeftModel

    from slowllama.weights.formats.peft import peft_adapter
    name, model_dir, hf_model = family
    dropout = 0.0 if name.startswith('phi3') else 0.1
    lora = slowllama.LoraConfig(rank=4, alpha=8.0, dropout=dropout, targets=HF_TARGETS)
    ours = slowllama.load(model_dir, lora=lora)
    randomize_adapters(ours.adapters)
    ours.save_adapter(tmp_path / 'adapter')
    export(model_dir, tmp_path / 'peft', 'peft', adapter=tmp_path / 'adapter')
    reference = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / 'peft', is_trainable=True)
    tokens, targets = random_batch(ours.cfg.vocab_size, seq=12, seed=3)

    _, logit_diff, loss, ref_loss = step_beside_peft(ours, reference, tokens, targets)

    grads = {k: p.grad for k, p in ours.trainable_parameters().items()}
    on_diagonal = peft_adapter(ours.cfg, lora, {k: torch.ones_like(g) for k, g in grads.items()})[1]
    grads = peft_adapter(ours.cfg, lora, grads)[1]
    ref_grads = {k: g * on_diagonal[k] for k, g in peft_grads(reference).items()}
    assert set(grads) == set(ref_grads)
    worst = max(((grads[k] - ref_grads[k]).abs().max() / ref_grads[k].abs().max()).item() for k in grads)
    print(f'\n{name}: max logit diff {logit_diff:.2e}, loss diff {abs(loss - ref_loss.item()):.2e}, '
          f'max relative grad diff {worst:.2e}')
    assert logit_diff < 1e-5 and abs(loss - ref_loss.item()) < 1e-5 and worst < 1e-5
    if dropout:
        torch.manual_seed(6)
        assert ours.backward(tokens, targets) != loss  # the dropout is real


def test_generate_greedy_equals_transformers(family):
    """24 greedy tokens; the prompt (8) is longer than the Mistral window (5), and the whole
    sequence longer than the Phi-3 one (7)."""
    name, model_dir, hf_model = family
    ours = slowllama.load(model_dir)
    prompt = torch.tensor([[5, 17, 42, 9, 3, 77, 21, 60]])
    want = hf_model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones_like(prompt))
    ours.cfg = type(ours.cfg).from_dict({**ours.cfg.to_dict(), 'eos_id': None})
    got = ours.generate(prompt, 24)
    assert torch.equal(got, want), (got, want)


def test_window_matters():
    """The windowed mask changes the logits of a sequence longer than the window (else the
    Mistral checks above would prove nothing about it)."""
    from slowllama.model.block import Transformer
    from slowllama.model.config import ModelConfig
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=48, vocab_size=64, sliding_window=4)
    torch.manual_seed(0)
    windowed = Transformer(cfg).eval()
    full = Transformer(ModelConfig.from_dict({**cfg.to_dict(), 'sliding_window': None})).eval()
    full.load_state_dict(windowed.state_dict())
    tokens = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        a, b = windowed(tokens), full(tokens)
    assert torch.equal(a[:, :4], b[:, :4]) and (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3


def test_export_hf_and_peft_load_in_transformers_and_peft(family, tmp_path):
    """export hf: the source's model_type and names (fused again for Phi-3), loaded by
    transformers' class for it; export peft: target names peft applies to that class."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    name, model_dir, hf_model = family
    lora = slowllama.LoraConfig(rank=3, alpha=6.0, targets=HF_TARGETS)
    ours = slowllama.load(model_dir, lora=lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ours.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours.save_adapter(tmp_path / 'adapter')
    tokens, _ = random_batch(ours.cfg.vocab_size, seq=12)
    want = ours.logits(tokens)
    assert (want - hf_model(tokens).logits).abs().max() > 1e-3  # the adapter matters

    export(model_dir, tmp_path / 'hf', 'hf', adapter=tmp_path / 'adapter', dtype='fp32')
    config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    assert config['model_type'] == hf_model.config.model_type
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf', dtype=torch.float32).eval()
    assert type(merged) is type(hf_model)
    assert set(merged.state_dict()) == set(hf_model.state_dict())
    export(model_dir, tmp_path / 'peft', 'peft', adapter=tmp_path / 'adapter')
    loaded = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / 'peft').eval()
    with torch.no_grad():
        hf_diff = (merged(tokens).logits - want).abs().max().item()
        peft_diff = (loaded(input_ids=tokens).logits - want).abs().max().item()
    print(f'\n{name} export: hf {hf_diff:.2e}, peft {peft_diff:.2e}')
    assert hf_diff < 1e-4 and peft_diff < 1e-4


def test_export_meta_writes_llama_and_refuses_the_other_families(family, tmp_path):
    name, model_dir, hf_model = family
    if name == 'llama3.2':  # Llama 3.2 goes to Meta's layout with its rope scaling
        export(model_dir, tmp_path / 'meta', 'meta')
        assert json.loads((tmp_path / 'meta' / 'params.json').read_text())['use_scaled_rope'] is True
    else:
        with pytest.raises(slowllama.SlowLlamaError, match=f'^format meta.*{hf_model.config.model_type}'):
            export(model_dir, tmp_path / 'meta', 'meta')
        assert not (tmp_path / 'meta').exists()


@pytest.mark.parametrize('model_type', ['qwen2_moe', 'olmoe', 'gemma', 'olmo'])
def test_other_model_types_are_refused_at_prepare(model_type, tmp_path):
    folder = tmp_path / 'hf'
    folder.mkdir()
    (folder / 'config.json').write_text(json.dumps({'model_type': model_type, 'hidden_size': 8}))
    (folder / 'model.safetensors').write_bytes(b'')
    with pytest.raises(slowllama.SlowLlamaError, match=f"model_type '{model_type}' is not supported") as e:
        slowllama.prepare(folder, tmp_path / 'out')
    assert '\n' not in str(e.value) and not (tmp_path / 'out').exists()
    assert ('supported: llama, mistral, qwen2, qwen3, phi3, smollm3, olmo2, granite, gemma3_text, gemma2, '
            'qwen3_moe, mixtral, gemma3') in str(e.value)


@pytest.mark.parametrize('change, message', [
    ({'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0}}, "rope_type 'yarn' is not supported"),
    ({'rope_parameters': {'rope_type': 'default', 'rope_theta': 1e4, 'partial_rotary_factor': 0.5}},
     'partial_rotary_factor 0.5'),
    ({'use_sliding_window': True, 'max_window_layers': 1, 'model_type': 'qwen2'}, 'use_sliding_window on some layers'),
])
def test_what_we_do_not_build_is_refused_with_one_line(change, message):
    hf = {'model_type': 'phi3', 'hidden_size': 72, 'num_attention_heads': 6, 'num_hidden_layers': 3,
          'intermediate_size': 96, 'vocab_size': 128, **change}
    with pytest.raises(slowllama.SlowLlamaError, match=message):
        config_from_hf(hf)


@pytest.mark.parametrize('model_type, change, message', [
    ('gemma3_text', {'layer_types': ['sliding_attention', 'full_attention']},
     'layer_types lists 2 layers but num_hidden_layers is 3'),
    ('gemma2', {'attn_logit_softcapping': 0}, 'attn_logit_softcapping must be a positive number or null, got 0'),
    ('gemma2', {'final_logit_softcapping': -30.0}, 'final_logit_softcapping must be a positive number or null, got -30'),
    ('gemma2', {'final_logit_softcapping': 'high'}, "final_logit_softcapping must be a positive number or null, got 'hi"),
    ('gemma3_text', {'hidden_activation': 'gelu'}, "hidden_act 'gelu' is not supported"),
    ('smollm3', {'no_rope_layers': [1, 0]}, r'no_rope_layers must list one entry per layer \(3\), got 2'),
    ('granite', {'logits_scaling': 0.0}, 'logits_scaling must be a positive number, got 0.0'),
])
def test_bad_family_configs_are_refused_at_prepare_in_one_line(model_type, change, message, tmp_path):
    """A config.json transformers would save for the family but with one bad value: prepare names
    config.json and the value, in one line, and writes nothing."""
    folder = tmp_path / 'hf'
    folder.mkdir()
    hf = {'model_type': model_type, 'hidden_size': 64, 'num_attention_heads': 4, 'num_hidden_layers': 3,
          'intermediate_size': 96, 'vocab_size': 128, 'head_dim': 16, 'query_pre_attn_scalar': 16, **change}
    (folder / 'config.json').write_text(json.dumps(hf))
    (folder / 'model.safetensors').write_bytes(b'')
    with pytest.raises(slowllama.SlowLlamaError, match=message) as e:
        slowllama.prepare(folder, tmp_path / 'out')
    assert str(e.value).startswith(str(folder / 'config.json')) and '\n' not in str(e.value)
    assert not (tmp_path / 'out').exists()


def test_windowed_cache_keeps_the_window_only():
    from slowllama.model.block import KVCache
    cache = KVCache(1, 2, 100, 4, 'cpu', torch.float32, window=5)
    k, _ = cache.append(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4))  # a prompt longer than the window
    assert k.shape[2] == 8 and cache.start == 0
    for step in range(10):
        k, _ = cache.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
        assert k.shape[2] == 5 and cache.start + 5 == cache.length == 9 + step


@pytest.mark.parametrize('arch, shape', [
    ('qwen2', dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True)),
    ('qwen3', dict(hidden_size=64, num_attention_heads=3, num_key_value_heads=1, head_dim=32)),
    ('phi3', dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, sliding_window=7, pad_token_id=None)),
])
def test_gguf_of_the_family_reads_to_its_hf_twins_logits(arch, shape, tmp_path):
    """A GGUF written with gguf's writer under llama.cpp's names (q/k not interleaved for these
    architectures; biases, q/k norms, Phi-3's fused attn_qkv / ffn_up and its window kept as
    llama.cpp keeps them) gives the logits of its transformers twin carrying the same
    (dequantized) weights, over rows longer than the window."""
    import gguf
    from checkpoints import twin_from_gguf, write_gguf
    T = gguf.GGMLQuantizationType
    hf_model = make_hf_model(tmp_path / 'hf', seed=5, model_type=arch, intermediate_size=128, **shape)
    expected = write_gguf(tmp_path / 'm.gguf', hf_model, {'*': T.F16, 'attn_q.weight': T.Q8_0}, arch=arch)
    assert any(name.endswith(('attn_q.bias', 'attn_q_norm.weight', 'attn_qkv.weight')) for name in expected)
    slowllama.prepare(tmp_path / 'm.gguf', tmp_path / 'out', dtype='fp32')
    model = slowllama.load(tmp_path / 'out')
    assert model.cfg.model_type == arch and model.cfg.tie_embeddings == hf_model.config.tie_word_embeddings
    assert model.cfg.sliding_window == shape.get('sliding_window')
    tokens, _ = random_batch(model.cfg.vocab_size, seq=16)
    with torch.no_grad():
        want = twin_from_gguf(hf_model, expected)(tokens).logits
    diff = (model.logits(tokens) - want).abs().max().item()
    print(f'\ngguf {arch}: max |logit diff| {diff:.2e}')
    assert diff < 1e-4


def gguf_twin_of(name):
    """(llama.cpp architecture, HF model overrides, GGUF metadata writer calls) of a FAMILIES entry as
    llama.cpp keeps it: what it hardcodes (SmolLM3's rope-less fourth layers, Gemma's query scale of
    head_dim ** -0.5) chosen in the model; what it has keys for written under them."""
    import gguf
    overrides, metadata = dict(FAMILIES[name]), {}
    if name == 'smollm3':
        overrides.update(no_rope_layer_interval=4, num_hidden_layers=4)
    if name == 'granite':
        metadata = {'add_attention_scale': 0.05, 'add_embedding_scale': 3.0, 'add_residual_scale': 0.4,
                    'add_logit_scale': 2.5}
    if name in ('gemma2', 'gemma3_text'):
        overrides['query_pre_attn_scalar'] = overrides['head_dim']
        metadata = {'add_final_logit_softcapping': overrides.get('final_logit_softcapping'),
                    'add_attn_logit_softcapping': overrides.get('attn_logit_softcapping')}
    if name == 'gemma3_text':  # the layer pattern written out, not llama.cpp's default of 6
        metadata = {'add_sliding_window_pattern': [True, False, True], 'add_rope_freq_base_swa': 1e3,
                    'add_rope_scaling_type': gguf.RopeScalingType.LINEAR, 'add_rope_scaling_factor': 4.0}
    arch = {'gemma3_text': 'gemma3'}.get(name, name)
    return arch, overrides, {k: v for k, v in metadata.items() if v is not None}


@pytest.mark.parametrize('name', NEW_FAMILIES)
def test_gguf_of_issue_35_families_reads_to_its_hf_twins_logits(name, tmp_path):
    """A GGUF of each family under llama.cpp's names and keys (q/k interleaved for granite and smollm3,
    Gemma's norms stored plus one, post norms, soft-caps, multipliers, the two rope bases) reads to
    the logits of its transformers twin carrying the same dequantized weights."""
    import gguf
    from checkpoints import twin_from_gguf, write_gguf
    arch, overrides, metadata = gguf_twin_of(name)
    hf_model = make_hf_model(tmp_path / 'hf', seed=5, **overrides)
    types = {'*': gguf.GGMLQuantizationType.F16, 'attn_q.weight': gguf.GGMLQuantizationType.Q8_0}
    expected = write_gguf(tmp_path / 'm.gguf', hf_model, types, arch=arch, extra_metadata=metadata)
    slowllama.prepare(tmp_path / 'm.gguf', tmp_path / 'out', dtype='fp32')
    model = slowllama.load(tmp_path / 'out')
    assert model.cfg.model_type == hf_model.config.model_type
    tokens, _ = random_batch(model.cfg.vocab_size, seq=16)
    with torch.no_grad():
        want = twin_from_gguf(hf_model, expected, arch)(tokens).logits
    diff = (model.logits(tokens) - want).abs().max().item()
    print(f'\ngguf {arch}: max |logit diff| {diff:.2e}')
    assert diff < 1e-4


@pytest.mark.parametrize('name', NEW_FAMILIES)
def test_gguf_export_of_issue_35_families_reads_back_to_the_same_logits(name, tmp_path):
    """export --format gguf (f32) of a family's model with a trained-looking adapter merged: llama.cpp's
    architecture name and tensor names (Gemma's norms plus one, q/k interleaved for granite and
    smollm3), read back by our reader to the logits of our model with the adapter; the gguf-lora
    adapter file names the same tensors."""
    import gguf
    arch, overrides, _ = gguf_twin_of(name)
    make_hf_model(tmp_path / 'hf', seed=9, **overrides)
    slowllama.prepare(tmp_path / 'hf', tmp_path / 'prepared', dtype='fp32')
    ours = slowllama.load(tmp_path / 'prepared', lora=slowllama.LoraConfig(rank=2, alpha=4.0, targets=HF_TARGETS))
    randomize_adapters(ours.adapters)
    ours.save_adapter(tmp_path / 'adapter')
    export(tmp_path / 'prepared', tmp_path / 'm.gguf', 'gguf', adapter=tmp_path / 'adapter', dtype='f32')
    reader = gguf.GGUFReader(tmp_path / 'm.gguf')
    assert bytes(reader.fields['general.architecture'].parts[-1]).decode() == arch
    names = {t.name for t in reader.tensors}
    assert ('blk.0.post_ffw_norm.weight' in names) == (name in ('olmo2', 'gemma2', 'gemma3_text'))
    slowllama.prepare(tmp_path / 'm.gguf', tmp_path / 'back', dtype='fp32')
    back = slowllama.load(tmp_path / 'back')
    assert back.cfg.model_type == ours.cfg.model_type
    tokens, _ = random_batch(ours.cfg.vocab_size, seq=16)
    diff = (back.logits(tokens) - ours.logits(tokens)).abs().max().item()
    print(f'\ngguf export {arch}: max |logit diff| {diff:.2e}')
    assert diff < 1e-4
    export(tmp_path / 'prepared', tmp_path / 'lora.gguf', 'gguf-lora', adapter=tmp_path / 'adapter')
    lora_names = {t.name for t in gguf.GGUFReader(tmp_path / 'lora.gguf').tensors}
    assert {n.removesuffix('.lora_a').removesuffix('.lora_b') for n in lora_names} <= names


@pytest.mark.parametrize('name', NEW_FAMILIES)
def test_peft_adapters_of_issue_35_families_load_in_ours(name, tmp_path):
    """An adapter peft made on the family's transformers class (all seven projections, random
    non-zero B) loads as ours with peft's logits."""
    hf_model = make_hf_model(tmp_path / 'hf', seed=12, **FAMILIES[name])
    slowllama.prepare(tmp_path / 'hf', tmp_path / 'prepared', dtype='fp32')
    reference = peft_model(hf_model, targets=HF_TARGETS)
    reference.save_pretrained(tmp_path / 'from_peft')
    ours = slowllama.load(tmp_path / 'prepared', adapter=tmp_path / 'from_peft')
    tokens, _ = random_batch(ours.cfg.vocab_size, seq=12)
    with torch.no_grad():
        want = reference(input_ids=tokens).logits
        assert (want - hf_model(tokens).logits).abs().max() > 1e-3  # the adapter matters
        assert (ours.logits(tokens) - want).abs().max() < 1e-5


def make_gemma3_multimodal(folder, seed):
    """A tiny Gemma3ForConditionalGeneration (a SigLIP tower of one layer) saved by transformers, its
    weights perturbed as make_hf_model's."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    text = {k: v for k, v in FAMILIES['gemma3_text'].items() if k != 'model_type'}
    text.update(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, rms_norm_eps=1e-5)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                          boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            param.copy_(1.0 + 0.2 * torch.randn_like(param) if 'norm' in param_name else 0.15 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model


def test_gemma3_multimodal_folder_prepares_its_language_model(tmp_path, capfd):
    """A gemma3 (multimodal) folder: its language model is read and the vision tower skipped, with one
    line saying so; text logits equal the multimodal model's on text alone; an adapter peft trained
    on the multimodal model (its q/v LoRAs on the vision tower too) loads in ours with peft's text logits."""
    model = make_gemma3_multimodal(tmp_path / 'hf', seed=2)
    slowllama.prepare(tmp_path / 'hf', tmp_path / 'prepared', dtype='fp32')
    said = capfd.readouterr().err
    assert said.count('vision tower is skipped') == 1
    ours = slowllama.load(tmp_path / 'prepared')
    assert ours.cfg.model_type == 'gemma3_text' and ours.cfg.layer_types == FAMILIES['gemma3_text']['layer_types']
    tokens, _ = random_batch(296, seq=12)
    with torch.no_grad():
        assert_fp32_logits_equal(ours.logits(tokens), model(input_ids=tokens).logits)
    reference = peft_model(model, targets=('q_proj', 'v_proj', 'down_proj'))
    reference.save_pretrained(tmp_path / 'from_peft')
    assert any('vision_tower' in k for k in reference.state_dict() if 'lora_A' in k)
    ours = slowllama.load(tmp_path / 'prepared', adapter=tmp_path / 'from_peft')
    assert ours.lora.targets == ('q', 'v', 'down')
    assert 'LoRAs on the vision tower are skipped' in capfd.readouterr().err
    with torch.no_grad():
        assert_fp32_logits_equal(ours.logits(tokens), reference(input_ids=tokens).logits)


def assert_fp32_logits_equal(ours, want):
    """Within fp32's rounding at the logits' scale: 3e-6 of the largest (this multimodal gemma's reach 10,
    and its differences 0.8-1.2e-5 from one CPU and thread count to another)."""
    assert (ours - want).abs().max() < 3e-6 * max(1.0, want.abs().max().item())


def test_phi3_adapters_of_peft_read_back_into_our_projections(tmp_path):
    """A peft adapter trained on Phi-3's fused modules (one rank-r LoRA on qkv_proj, gate_up_proj)
    loads as our per-projection LoRAs with peft's logits; one of ours with q, v and up only,
    exported for peft and read back, is the same adapter with the same targets."""
    hf_model = make_hf_model(tmp_path / 'hf', seed=4, **FAMILIES['phi3'])
    slowllama.prepare(tmp_path / 'hf', tmp_path / 'prepared', dtype='fp32')
    reference = peft_model(hf_model, targets=('qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj'))
    reference.save_pretrained(tmp_path / 'from_peft')
    ours = slowllama.load(tmp_path / 'prepared', adapter=tmp_path / 'from_peft')
    assert ours.lora.targets == ('q', 'k', 'v', 'o', 'gate', 'up', 'down')
    tokens, _ = random_batch(ours.cfg.vocab_size, seq=12)
    with torch.no_grad():
        assert (ours.logits(tokens) - reference(input_ids=tokens).logits).abs().max() < 1e-4

    lora = slowllama.LoraConfig(rank=2, alpha=5.0, targets=('q', 'v', 'up'))
    ours = slowllama.load(tmp_path / 'prepared', lora=lora)
    randomize_adapters(ours.adapters)
    ours.save_adapter(tmp_path / 'adapter')
    export(tmp_path / 'prepared', tmp_path / 'peft', 'peft', adapter=tmp_path / 'adapter')
    again = slowllama.load(tmp_path / 'prepared', adapter=tmp_path / 'peft')
    assert again.lora == lora
    first, second = ours.trainable_parameters(), again.trainable_parameters()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_phi3_prepare_finetune_generate_export_from_the_command_line(tmp_path):
    """The family's own architecture through the commands: prepare a Phi-3 folder, finetune it
    (window 7 < rows of 16), generate, export hf: transformers' Phi-3 class gives the logits of
    our model with the run's adapter."""
    from conftest import save_tiny_tokenizer
    from transformers import AutoModelForCausalLM
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def script(name, *args):
        done = subprocess.run([sys.executable, f'{root}/scripts/{name}', *map(str, args)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    make_hf_model(tmp_path / 'hf', seed=8, bos_token_id=1, eos_token_id=2, **FAMILIES['phi3'])
    save_tiny_tokenizer(tmp_path / 'hf')
    (tmp_path / 'story.txt').write_text('odalys brenn keeps the violet lamp burning every night. ' * 8)
    script('prepare_model.py', tmp_path / 'hf', tmp_path / 'prepared', '--dtype', 'fp32')
    script('finetune.py', '--model', tmp_path / 'prepared', '--data', tmp_path / 'story.txt', '--out',
           tmp_path / 'run', '--device', 'cpu', '--iters', 3, '--batch-size', 2, '--seq-len', 16, '--lr', 1e-2,
           '--targets', 'q,k,v,o,gate,up,down', '--lora-dropout', 0.1)
    out = script('test_gen.py', tmp_path / 'prepared', '--lora', tmp_path / 'run' / 'adapter', '--prompt',
                 'the violet', '--max-new-tokens', 12)
    assert out.strip()
    script('export.py', '--model', tmp_path / 'prepared', '--lora', tmp_path / 'run' / 'adapter', '--format', 'hf',
           '--out', tmp_path / 'exported', '--dtype', 'fp32')
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / 'exported', dtype=torch.float32).eval()
    assert type(merged).__name__ == 'Phi3ForCausalLM'
    assert 'model.layers.0.self_attn.qkv_proj.weight' in merged.state_dict()
    ours = slowllama.load(tmp_path / 'prepared', adapter=tmp_path / 'run' / 'adapter')
    tokens, _ = random_batch(ours.cfg.vocab_size, seq=16)
    with torch.no_grad():
        assert (merged(tokens).logits - ours.logits(tokens)).abs().max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize('name', ['gemma3_text', 'olmo2'])
def test_family_prepare_finetune_export_hf_and_gguf_from_the_command_line(name, tmp_path):
    """Gemma 3 (and OLMo 2) through the commands: prepare, finetune (window 5 < rows of 16, LoRA
    dropout), generate, export hf and gguf: transformers' class for the family and our GGUF reader
    give the logits of our model with the run's adapter."""
    from conftest import save_tiny_tokenizer
    from transformers import AutoModelForCausalLM
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def script(script_name, *args):
        done = subprocess.run([sys.executable, f'{root}/scripts/{script_name}', *map(str, args)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    overrides = {**gguf_twin_of(name)[1], 'bos_token_id': 1, 'eos_token_id': 2, 'pad_token_id': 3}
    make_hf_model(tmp_path / 'hf', seed=8, **overrides)
    save_tiny_tokenizer(tmp_path / 'hf')
    (tmp_path / 'story.txt').write_text('odalys brenn keeps the violet lamp burning every night. ' * 8)
    script('prepare_model.py', tmp_path / 'hf', tmp_path / 'prepared', '--dtype', 'fp32')
    script('finetune.py', '--model', tmp_path / 'prepared', '--data', tmp_path / 'story.txt', '--out',
           tmp_path / 'run', '--device', 'cpu', '--iters', 3, '--batch-size', 2, '--seq-len', 16, '--lr', 1e-2,
           '--targets', 'q,k,v,o,gate,up,down', '--lora-dropout', 0.1)
    assert script('test_gen.py', tmp_path / 'prepared', '--lora', tmp_path / 'run' / 'adapter', '--prompt',
                  'the violet', '--max-new-tokens', 12).strip()
    adapter = ('--model', tmp_path / 'prepared', '--lora', tmp_path / 'run' / 'adapter')
    script('export.py', *adapter, '--format', 'hf', '--out', tmp_path / 'exported', '--dtype', 'fp32')
    script('export.py', *adapter, '--format', 'gguf', '--out', tmp_path / 'm.gguf', '--dtype', 'f32')
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / 'exported', dtype=torch.float32).eval()
    assert type(merged).__name__ == {'gemma3_text': 'Gemma3ForCausalLM', 'olmo2': 'Olmo2ForCausalLM'}[name]
    slowllama.prepare(tmp_path / 'm.gguf', tmp_path / 'from_gguf', dtype='fp32')
    ours = slowllama.load(tmp_path / 'prepared', adapter=tmp_path / 'run' / 'adapter')
    tokens, _ = random_batch(ours.cfg.vocab_size, seq=16)
    with torch.no_grad():
        want = ours.logits(tokens)
        assert (want - slowllama.load(tmp_path / 'prepared').logits(tokens)).abs().max() > 1e-4  # it trained
        assert (merged(tokens).logits - want).abs().max() < 1e-4
        assert (slowllama.load(tmp_path / 'from_gguf').logits(tokens) - want).abs().max() < 1e-4


def test_gguf_longrope_factors_are_refused_with_one_line(tmp_path):
    import gguf
    import numpy as np
    from checkpoints import write_gguf
    hf_model = make_hf_model(tmp_path / 'hf', seed=5, model_type='phi3', hidden_size=64, num_attention_heads=4,
                             num_key_value_heads=2, pad_token_id=None)
    write_gguf(tmp_path / 'm.gguf', hf_model, {'*': gguf.GGMLQuantizationType.F32}, arch='phi3',
               extra_tensors={'rope_factors_long.weight': np.ones(8), 'rope_factors_short.weight': np.ones(8)})
    with pytest.raises(slowllama.SlowLlamaError, match='m.gguf: LongRoPE factors in a GGUF file are not read'):
        slowllama.prepare(tmp_path / 'm.gguf', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_gguf_qwen2_tokenizer_splits_as_transformers_qwen2_tokenizer(tmp_path):
    """llama.cpp's 'qwen2' pre-tokenizer (digits one at a time, NFC): the tokenizer read from the
    GGUF encodes as transformers' Qwen2Tokenizer over the same vocabulary and merges."""
    import gguf
    from checkpoints import write_gguf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    from slowllama.tokenizer.tokenizer import load_tokenizer
    texts = ['In 2024 we sold 1234567 lamps, didn\'t we?', 'café  CAFÉ\n\nthe 3rd of 12 ships', "it's 99.5%"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts * 4 + ['0123456789 ' * 5], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [' '.join(m) if isinstance(m, list) else m for m in json.loads(bpe.to_str())['model']['merges']]
    fields = {'add_tokenizer_model': 'gpt2', 'add_tokenizer_pre': 'qwen2', 'add_token_list': tokens,
              'add_token_types': [1] * len(tokens), 'add_token_merges': merges, 'add_add_bos_token': False}
    hf_model = make_hf_model(tmp_path / 'hf', seed=5, model_type='qwen2', vocab_size=len(tokens))
    write_gguf(tmp_path / 'm.gguf', hf_model, {'*': gguf.GGMLQuantizationType.F32}, tokenizer=fields, arch='qwen2')
    slowllama.prepare(tmp_path / 'm.gguf', tmp_path / 'out', dtype='fp32')
    ours = load_tokenizer(tmp_path / 'out')
    reference = Qwen2Tokenizer(vocab=vocab, merges=[tuple(m.split(' ')) for m in merges])
    for text in texts + ['version 10.2.33 of 2048']:
        want = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text, bos=False) == want, text
    assert len(reference.encode('2024', add_special_tokens=False)) == 4  # the split rule matters here


def test_packed_documents_with_a_window_equal_each_document_alone(tmp_path):
    """Mistral rows packed from documents longer than the window (5): the document mask and the
    window together give each document's logits, loss and LoRA gradients as transformers + peft
    give for the documents one by one."""
    hf_model = make_hf_model(tmp_path / 'hf', seed=6, **FAMILIES['mistral'])
    slowllama.prepare(tmp_path / 'hf', tmp_path / 'prepared', dtype='fp32')
    reference = peft_model(hf_model, targets=HF_TARGETS)
    reference.save_pretrained(tmp_path / 'adapter')
    ours = slowllama.load(tmp_path / 'prepared', adapter=tmp_path / 'adapter')
    tokens, targets = random_batch(ours.cfg.vocab_size, batch=2, seq=20, seed=5)
    documents = [(0, 0, 8), (0, 8, 20), (1, 0, 13), (1, 13, 20)]  # (row, start, end)
    positions = torch.zeros_like(tokens)
    for row, start, end in documents:
        positions[row, start:end] = torch.arange(end - start)
    logits = ours.logits(tokens, positions=positions)
    loss = ours.backward(tokens, targets, positions=positions)
    total, worst_logit = 0.0, 0.0
    for row, start, end in documents:
        alone = reference(input_ids=tokens[row:row + 1, start:end]).logits[0]
        worst_logit = max(worst_logit, (logits[row, start:end] - alone).abs().max().item())
        total = total + torch.nn.functional.cross_entropy(alone, targets[row, start:end], ignore_index=-100,
                                                          reduction='sum')
    ref_loss = total / int((targets != -100).sum())
    ref_loss.backward()
    ref_grads = peft_grads(reference)
    grads = {k: p.grad for k, p in ours.trainable_parameters().items()}
    worst = max(((grads[k] - ref_grads[k]).abs().max() / ref_grads[k].abs().max()).item() for k in grads)
    assert worst_logit < 1e-4 and abs(loss - ref_loss.item()) < 1e-5 and worst < 1e-4
