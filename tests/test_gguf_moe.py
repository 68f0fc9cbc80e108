"""GGUF export of Mixture-of-Experts models (qwen3moe; Mixtral as architecture llama with an expert
count), the adapter merged into the attention, every expert and the router: written with llama.cpp's
names and 3D expert tensors (read back by the gguf package), prepared again from the file to the
merged model's logits, quantized per llama-quantize's rules for the expert tensors, and, where
llama-cpp-python is installed, run by llama.cpp to our logits."""
import numpy as np
import pytest
import torch
from conftest import make_hf_model, random_batch, save_tiny_tokenizer
from reference import randomize_adapters
from test_gguf_export import gguf_fields, gguf_raw, gguf_tensors, needs_llama_cpp
from test_moe import FAMILIES, TARGETS

import slowllama
from slowllama.weights.formats.export import export

WIDE = {  # rows of 256 values: the K-quants take the expert tensors as they are; mixtral's 8 experts
    'qwen3_moe': dict(FAMILIES['qwen3_moe-top2-norm'], hidden_size=256, moe_intermediate_size=256, head_dim=64),
    'mixtral': dict(FAMILIES['mixtral-top2'], num_local_experts=8, hidden_size=256, intermediate_size=256),
}
ARCH = {'qwen3_moe': 'qwen3moe', 'mixtral': 'llama'}


@pytest.fixture(scope='module', params=['qwen3_moe-top2-norm', 'mixtral-top2'])
def merged(request, tmp_path_factory):
    """(name, prepared folder, adapter folder, tokens, our logits with the adapter) of the narrow test
    families (test_moe.py's)."""
    return build(request.param, tmp_path_factory)


@pytest.fixture(scope='module', params=list(WIDE))
def wide(request, tmp_path_factory):
    """The same of the WIDE models, for the quantized types."""
    return build(request.param, tmp_path_factory)


def build(name, tmp_path_factory):
    folder = tmp_path_factory.mktemp(name)
    hf_model = make_hf_model(folder / 'hf', seed=21, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                             **(WIDE[name] if name in WIDE else FAMILIES[name]))
    if name in WIDE:  # tamer weights at 256 wide, so that rounding seldom tips a router into another expert
        with torch.no_grad():
            for key, param in hf_model.named_parameters():
                if 'norm' not in key and 'embed' not in key and 'lm_head' not in key:
                    param.mul_(0.4)
        hf_model.save_pretrained(folder / 'hf')
    save_tiny_tokenizer(folder / 'hf')
    slowllama.prepare(folder / 'hf', folder / 'prepared', dtype='fp32')
    ours = slowllama.load(folder / 'prepared', lora=slowllama.LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    randomize_adapters(ours.adapters, seed=6, scale=0.03 if name in WIDE else 0.1)
    ours.save_adapter(folder / 'adapter')
    tokens, _ = random_batch(ours.cfg.vocab_size, batch=1, seq=10, seed=4)
    return name, folder / 'prepared', folder / 'adapter', tokens, ours.logits(tokens)


def test_names_shapes_and_keys_are_llama_cpps_and_the_file_reads_back(merged, tmp_path):
    name, model_dir, adapter, tokens, want = merged
    out = export(model_dir, tmp_path / 'm.gguf', 'gguf', adapter=adapter, dtype='f32')
    cfg = slowllama.load(model_dir).cfg
    arch, fields = ARCH[cfg.model_type], gguf_fields(out)
    assert fields['general.architecture'] == arch
    assert fields[f'{arch}.expert_count'] == cfg.n_experts
    assert fields[f'{arch}.expert_used_count'] == cfg.experts_per_token
    width = 'expert_feed_forward_length' if arch == 'qwen3moe' else 'feed_forward_length'
    assert fields[f'{arch}.{width}'] == cfg.expert_hidden_dim
    raw = gguf_raw(out)
    for i in range(cfg.n_layers):
        b = f'blk.{i}.'
        assert raw[b + 'ffn_gate_inp.weight'][1:] == ('F32', (cfg.n_experts, cfg.dim))
        assert raw[b + 'ffn_gate_exps.weight'][2] == (cfg.n_experts, cfg.expert_hidden_dim, cfg.dim)
        assert raw[b + 'ffn_up_exps.weight'][2] == (cfg.n_experts, cfg.expert_hidden_dim, cfg.dim)
        assert raw[b + 'ffn_down_exps.weight'][2] == (cfg.n_experts, cfg.dim, cfg.expert_hidden_dim)
        assert not any(n.startswith((b + 'ffn_gate.', b + 'ffn_down.')) for n in raw)
    # the merged experts and router: those export hf writes (checked against transformers in test_moe)
    from safetensors.torch import load_file
    export(model_dir, tmp_path / 'hf', 'hf', adapter=adapter, dtype='fp32')
    hf = {k: v for f in (tmp_path / 'hf').glob('*.safetensors') for k, v in load_file(str(f)).items()}
    tensors = gguf_tensors(out)
    router, expert, theirs = {'qwen3_moe': ('mlp.gate.weight', 'mlp.experts.{e}.{p}.weight',
                                            {'gate': 'gate_proj', 'up': 'up_proj', 'down': 'down_proj'}),
                              'mixtral': ('block_sparse_moe.gate.weight', 'block_sparse_moe.experts.{e}.{p}.weight',
                                          {'gate': 'w1', 'up': 'w3', 'down': 'w2'})}[cfg.model_type]
    p = 'model.layers.1.'
    assert torch.equal(tensors['blk.1.ffn_gate_inp.weight'][0], hf[p + router])
    for proj, hub in theirs.items():
        stacked = torch.stack([hf[p + expert.format(e=e, p=hub)] for e in range(cfg.n_experts)])
        assert torch.equal(tensors[f'blk.1.ffn_{proj}_exps.weight'][0], stacked), proj

    slowllama.prepare(out, tmp_path / 'again', dtype='fp32')
    again = slowllama.load(tmp_path / 'again')
    assert again.cfg.n_experts == cfg.n_experts and again.cfg.model_type == cfg.model_type
    diff = (again.logits(tokens) - want).abs().max().item()
    print(f'\n{name} gguf round trip: max |logit diff| {diff:.2e}')
    assert diff < 1e-5


@pytest.mark.parametrize('dtype', ['q8_0', 'q4_k_m'])
def test_quantized_experts_take_llama_quantizes_types(wide, tmp_path, dtype):
    """q8_0: every expert tensor is the f32 export's values through gguf's own Q8_0, bit for bit;
    q4_k_m: the expert tensors in K-quants (ffn_down_exps Q6_K where llama.cpp spends more bits), the
    router F32, Mixtral's 8-expert rules; every expert's rows within the type's rounding."""
    name, model_dir, adapter, tokens, want = wide
    import gguf
    out = export(model_dir, tmp_path / 'm.gguf', 'gguf', adapter=adapter, dtype=dtype)
    raw = gguf_raw(out)
    types = {n: kind for n, (_, kind, _) in raw.items()}
    assert all(types[f'blk.{i}.ffn_gate_inp.weight'] == 'F32' for i in range(3))
    plain = gguf_tensors(export(model_dir, tmp_path / 'f32.gguf', 'gguf', adapter=adapter, dtype='f32'))
    if dtype == 'q8_0':
        for n in ('blk.2.ffn_gate_exps.weight', 'blk.0.ffn_down_exps.weight'):
            assert raw[n][0] == gguf.quants.quantize(plain[n][0].numpy(), gguf.GGMLQuantizationType.Q8_0).tobytes()
    else:  # 3 layers: llama-quantize's use_more_bits(i, 3) is true for the last layer only
        assert [types[f'blk.{i}.ffn_down_exps.weight'] for i in range(3)] == ['Q4_K', 'Q4_K', 'Q6_K']
        assert types['blk.1.ffn_gate_exps.weight'] == types['blk.1.ffn_up_exps.weight'] == 'Q4_K'
        eight = name == 'mixtral'  # llama-quantize: an 8-expert model's attn_v and attn_k take Q8_0, attn_output Q5_K
        assert types['blk.1.attn_k.weight'] == ('Q8_0' if eight else 'Q4_K')
        assert types['blk.1.attn_v.weight'] == ('Q8_0' if eight else 'Q4_K')
        assert types['blk.1.attn_output.weight'] == ('Q5_K' if eight else 'Q4_K')
    # each expert's rows quantized as its own rows: the values within the type's rounding of the f32 ones
    # (relative RMS error; llama.cpp's K-quant search trades the largest error for the mean one)
    values = gguf_tensors(out)
    for n in (f'blk.{i}.ffn_{p}_exps.weight' for i in range(3) for p in ('gate', 'up', 'down')):
        want_values = plain[n][0]
        assert values[n][0].shape == want_values.shape
        error = ((values[n][0] - want_values).norm() / want_values.norm()).item()  # an expert astray: ~1.4
        assert error < (0.01 if dtype == 'q8_0' else 0.08), (n, error)
    # prepared again from the quantized file: q8_0 keeps the merged model's next tokens mostly (routing is
    # discrete: a rounded router may choose another expert, so the logits of random weights move a lot;
    # q4_k_m's file is checked against llama.cpp's own reading of it below)
    slowllama.prepare(out, tmp_path / 'again', dtype='fp32')
    again = slowllama.load(tmp_path / 'again').logits(tokens)
    agree = (again.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f'\n{name} {dtype}: next tokens agreeing with the f32 merge {agree:.0%}, max |logit diff| '
          f'{(again - want).abs().max():.2e} (max |logit| {want.abs().max():.2f})')
    assert agree >= (0.8 if dtype == 'q8_0' else 0.0) and torch.isfinite(again).all()


@needs_llama_cpp
def test_llama_cpp_runs_the_merged_moe_model(merged, tmp_path):
    name, model_dir, adapter, tokens, want = merged
    out = export(model_dir, tmp_path / 'm.gguf', 'gguf', adapter=adapter, dtype='f32')
    llama_cpp_agrees(name, out, tokens, want, 'f32')


@needs_llama_cpp
def test_llama_cpp_runs_the_quantized_moe_model(wide, tmp_path):
    """q4_k_m, against our own read of the same quantized file."""
    name, model_dir, adapter, tokens, _ = wide
    out = export(model_dir, tmp_path / 'm.gguf', 'gguf', adapter=adapter, dtype='q4_k_m')
    slowllama.prepare(out, tmp_path / 'again', dtype='fp32')
    llama_cpp_agrees(name, out, tokens, slowllama.load(tmp_path / 'again').logits(tokens), 'q4_k_m')


def llama_cpp_agrees(name, out, tokens, want, dtype):
    from llama_cpp import Llama
    llm = Llama(model_path=str(out), n_ctx=64, n_threads=2, n_batch=64, logits_all=True, verbose=False)
    try:
        llm.eval(tokens[0].tolist())
        theirs = np.array(llm.scores[:tokens.shape[1]], dtype=np.float32)
    finally:
        llm.close()
    ours = want[0].numpy()
    diff, agree = np.abs(theirs - ours).max(), (theirs.argmax(-1) == ours.argmax(-1)).mean()
    corr = np.array([np.corrcoef(a, b)[0, 1] for a, b in zip(ours, theirs)])
    print(f'\nllama.cpp {name} {dtype}: max |logit diff| {diff:.2e} of max |logit| {np.abs(ours).max():.2f}, '
          f'next tokens agreeing {agree:.0%}, correlation per position {np.round(corr, 4).tolist()}')
    if dtype == 'f32':
        assert diff < 0.01 * np.abs(ours).max() and agree == 1.0
    else:  # llama.cpp multiplies quantized weights with activations rounded to Q8_K / Q8_0: now and then
        # that tips a router into another expert at one position (these random weights are far from tame)
        assert (corr > 0.99).mean() >= 0.7


def test_an_adapter_gguf_of_expert_or_router_lora_is_refused_in_one_line(merged, tmp_path):
    """export --format gguf merges it instead (what else llama.cpp cannot run: test_moe.py)."""
    _, model_dir, adapter, _, _ = merged
    with pytest.raises(slowllama.SlowLlamaError, match='LoRA on router,experts is not written as a llama.cpp adapter') as e:
        export(model_dir, tmp_path / 'a.gguf', 'gguf-lora', adapter=adapter)
    assert '\n' not in str(e.value) and not (tmp_path / 'a.gguf').exists()


def test_llama_quantizes_expert_rules_in_every_scheme():
    """The 8-expert rules per scheme (llama.cpp's llama_tensor_get_type), the router never quantized,
    ffn_down_exps counted as ffn_down; with 6 experts none of the 8-expert rules."""
    from slowllama.weights.formats.gguf_mixture import tensor_types
    shapes = {f'blk.{i}.{n}': shape for i in range(8) for n, shape in (
        ('attn_k.weight', (256, 256)), ('attn_v.weight', (256, 256)), ('attn_output.weight', (256, 256)),
        ('ffn_gate_inp.weight', (8, 256)), ('ffn_down_exps.weight', (8, 256, 512)))}
    for scheme, output in (('q3_k_m', 'q5_k'), ('q4_k_s', 'q5_k'), ('q4_k_m', 'q5_k'), ('q5_k_m', 'q5_k'),
                           ('q6_k', 'q6_k')):
        types, _ = tensor_types(shapes, scheme, 8, 4, 4, n_expert=8)
        assert types['blk.3.attn_k.weight'] == types['blk.3.attn_v.weight'] == 'q8_0'
        assert types['blk.3.attn_output.weight'] == output and types['blk.3.ffn_gate_inp.weight'] == 'f32'
    types, _ = tensor_types(shapes, 'q4_k_m', 8, 4, 4, n_expert=8)
    assert [types[f'blk.{i}.ffn_down_exps.weight'] for i in range(8)] == ['q6_k', 'q4_k', 'q4_k', 'q6_k', 'q4_k',
                                                                          'q4_k', 'q6_k', 'q6_k']  # use_more_bits
    types, _ = tensor_types(shapes, 'q4_k_m', 8, 4, 4, n_expert=6)
    assert types['blk.3.attn_k.weight'] == types['blk.3.attn_output.weight'] == 'q4_k'
