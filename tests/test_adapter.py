"""(d): adapters saved by us load back and load into peft; adapters saved by peft load into us."""
import json

import pytest
import torch

import slowllama
from reference import peft_model, randomize_adapters
from conftest import random_batch


def test_our_adapter_round_trips(tiny_prepared, tmp_path):
    model_dir, _, _ = tiny_prepared
    lora = slowllama.LoraConfig(rank=3, alpha=6.0, targets=('wq', 'v_proj', 'gate'))
    model = slowllama.load(model_dir, lora=lora)
    randomize_adapters(model.adapters, seed=5)
    model.save_adapter(tmp_path / 'adapter')
    config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
    assert config['peft_type'] == 'LORA' and config['r'] == 3 and config['lora_alpha'] == 6.0
    assert sorted(config['target_modules']) == ['gate_proj', 'q_proj', 'v_proj']
    again = slowllama.load(model_dir, adapter=tmp_path / 'adapter')
    ours, theirs = model.trainable_parameters(), again.trainable_parameters()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' in ours


def test_our_adapter_loads_into_peft(tiny_prepared, tmp_path):
    from peft import PeftModel
    model_dir, _, hf_model = tiny_prepared
    model = slowllama.load(model_dir, lora=slowllama.LoraConfig(rank=4, targets=('q', 'k', 'down')))
    randomize_adapters(model.adapters, seed=6)
    model.save_adapter(tmp_path / 'adapter')
    import copy
    reference = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / 'adapter').eval()
    tokens, _ = random_batch(model.cfg.vocab_size)
    base_logits = hf_model(tokens).logits
    ref_logits = reference(input_ids=tokens).logits
    assert (ref_logits - base_logits).abs().max() > 1e-3  # the adapter matters
    assert torch.allclose(model.logits(tokens), ref_logits, atol=1e-4)


def test_peft_adapter_loads_into_us(tiny_prepared, tmp_path):
    model_dir, _, hf_model = tiny_prepared
    reference = peft_model(hf_model, rank=2, alpha=4.0, targets=('v_proj', 'up_proj'))
    reference.save_pretrained(tmp_path / 'adapter')
    ours = slowllama.load(model_dir, adapter=tmp_path / 'adapter')
    assert ours.lora.rank == 2 and ours.lora.scale == 2.0 and ours.lora.targets == ('v', 'up')
    tokens, _ = random_batch(ours.cfg.vocab_size)
    assert torch.allclose(ours.logits(tokens), reference(input_ids=tokens).logits, atol=1e-4)


def test_adapter_that_does_not_fit_is_refused(tiny_prepared, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from conftest import TINY
    model_dir, _, _ = tiny_prepared
    other = LlamaForCausalLM(LlamaConfig(**{**TINY, 'hidden_size': 32}))
    peft_model(other).save_pretrained(tmp_path / 'adapter')
    with pytest.raises(slowllama.SlowLlamaError, match='shape'):
        slowllama.load(model_dir, adapter=tmp_path / 'adapter')
