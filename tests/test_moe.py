"""Mixture-of-Experts families against transformers' own classes (Qwen3MoeForCausalLM,
MixtralForCausalLM) and peft's LoRA on the expert tensors (target_parameters): logits, loss and
every LoRA gradient, greedy generation, adapters both ways, export; both checkpoint layouts (the
hub's one tensor per expert, transformers 5's fused 3D tensors); what is wrong is refused."""
import copy
import json

import pytest
import torch
from conftest import make_hf_model, random_batch
from reference import peft_grads, randomize_adapters, step_beside_peft
from safetensors.torch import save_file

import slowllama
from slowllama.weights.formats.export import export

TARGETS = ('q', 'k', 'v', 'o', 'experts', 'router')
# expert counts that are not powers of two; top-1 and top-2; norm_topk_prob both ways (mixtral: always)
FAMILIES = {
    'qwen3_moe-top2-norm': dict(model_type='qwen3_moe', num_experts=6, num_experts_per_tok=2,
                                moe_intermediate_size=24, norm_topk_prob=True, head_dim=16),
    'qwen3_moe-top1-fused': dict(model_type='qwen3_moe', num_experts=5, num_experts_per_tok=1,
                                 moe_intermediate_size=32, norm_topk_prob=False),
    'mixtral-top2': dict(model_type='mixtral', num_local_experts=6, num_experts_per_tok=2, intermediate_size=40),
    'mixtral-top1-fused': dict(model_type='mixtral', num_local_experts=3, num_experts_per_tok=1,
                               intermediate_size=24, sliding_window=5),
}


def write_fused(folder, hf_model):
    """The model as transformers 5 holds it (3D gate_up_proj / down_proj per block), config.json beside."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, str(folder / 'model.safetensors'))
    hf_model.config.to_json_file(str(folder / 'config.json'))


@pytest.fixture(scope='module', params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, prepared folder, transformers model) of a tiny random MoE model of each family."""
    folder = tmp_path_factory.mktemp(request.param)
    hf_model = make_hf_model(folder / 'hf', seed=11, **FAMILIES[request.param])
    if request.param.endswith('fused'):
        write_fused(folder / 'fused', hf_model)
    source = folder / ('fused' if request.param.endswith('fused') else 'hf')
    slowllama.prepare(source, folder / 'prepared', dtype='fp32')
    return request.param, folder / 'prepared', hf_model


def test_config_and_prepared_layout_keep_each_expert_alone(family):
    from safetensors import safe_open
    name, model_dir, hf_model = family
    cfg = slowllama.load(model_dir).cfg
    hf = hf_model.config
    assert cfg.model_type == hf.model_type and cfg.n_experts == hf.num_experts if hasattr(hf, 'num_experts') \
        else cfg.n_experts == hf.num_local_experts
    assert cfg.experts_per_token == hf.num_experts_per_tok
    assert cfg.norm_topk_prob == (name.startswith('mixtral') or hf.norm_topk_prob)
    with safe_open(str(model_dir / 'block_000.safetensors'), 'pt') as f:
        keys = set(f.keys())
    assert 'mlp.gate.weight' in keys and not any('gate_up' in k for k in keys)
    assert {f'mlp.experts.{e}.{p}.weight' for e in range(cfg.n_experts)
            for p in ('gate_proj', 'up_proj', 'down_proj')} <= keys


def test_logits_loss_and_grads_equal_transformers_peft(family, tmp_path):
    """A random adapter of ours on attention, every expert and the router, exported for peft
    (target_parameters on the fused expert tensors, target_modules 'gate' on the router) and loaded
    by it on transformers' class: logits, loss and every LoRA gradient agree."""
    from peft import PeftModel
    name, model_dir, hf_model = family
    lora = slowllama.LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    ours = slowllama.load(model_dir, lora=lora, router_aux_loss_coef=0)  # transformers' default: no aux loss
    randomize_adapters(ours.adapters)
    ours.save_adapter(tmp_path / 'adapter')
    export(model_dir, tmp_path / 'peft', 'peft', adapter=tmp_path / 'adapter')
    config = json.loads((tmp_path / 'peft' / 'adapter_config.json').read_text())
    assert config['target_parameters'] == ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']
    reference = PeftModel.from_pretrained(copy.deepcopy(hf_model), tmp_path / 'peft', is_trainable=True)
    tokens, targets = random_batch(ours.cfg.vocab_size, seq=12, seed=3)

    _, logit_diff, loss, ref_loss = step_beside_peft(ours, reference, tokens, targets)

    grads = {k: p.grad for k, p in ours.trainable_parameters().items()}
    ref_grads = peft_grads(reference)
    assert set(grads) == set(ref_grads) and any('mlp.experts.base_layer.lora_A' in k for k in grads)
    # top-1 with renormalisation weighs every chosen expert 1: the router's gradient is 0 up to rounding
    vanishing = [k for k in grads if ref_grads[k].abs().max() < 1e-6]
    assert all(grads[k].abs().max() < 1e-6 for k in vanishing)
    assert all('.mlp.gate.' in k for k in vanishing) and bool(vanishing) == (name == 'mixtral-top1-fused')
    worst = max(((grads[k] - ref_grads[k]).abs().max() / ref_grads[k].abs().max()).item()
                for k in grads if k not in vanishing)
    print(f'\n{name}: max logit diff {logit_diff:.2e}, loss diff {abs(loss - ref_loss.item()):.2e}, '
          f'max relative grad diff {worst:.2e}')
    assert logit_diff < 1e-5 and abs(loss - ref_loss.item()) < 1e-5 and worst < 1e-5
    with torch.no_grad():  # the adapter matters
        assert (ours.logits(tokens) - hf_model(tokens).logits).abs().max() > 1e-3


def test_generate_greedy_equals_transformers(family):
    name, model_dir, hf_model = family
    ours = slowllama.load(model_dir)
    prompt = torch.tensor([[5, 17, 42, 9, 3, 77, 21, 60]])
    want = hf_model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones_like(prompt))
    ours.cfg = type(ours.cfg).from_dict({**ours.cfg.to_dict(), 'eos_id': None})
    assert torch.equal(ours.generate(prompt, 16), want)


def test_peft_adapter_with_target_parameters_loads_in_ours(family, tmp_path):
    """An adapter peft made on transformers' class (experts as target_parameters, either nesting
    order; the router as target_modules 'gate') loads as ours with peft's logits."""
    from peft import LoraConfig, get_peft_model
    name, model_dir, hf_model = family
    for order in (['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'],
                  ['mlp.experts.down_proj', 'mlp.experts.gate_up_proj']):
        torch.manual_seed(2)
        config = LoraConfig(r=3, lora_alpha=7, target_modules=['q_proj', 'o_proj', 'gate'], target_parameters=order,
                            init_lora_weights=False)
        reference = get_peft_model(copy.deepcopy(hf_model), config).eval()
        reference.save_pretrained(tmp_path / 'from_peft')
        ours = slowllama.load(model_dir, adapter=tmp_path / 'from_peft')
        assert ours.lora.targets == ('q', 'o', 'router', 'experts') and ours.lora.scale == 7 / 3
        tokens, _ = random_batch(ours.cfg.vocab_size, seq=12)
        with torch.no_grad():
            diff = (ours.logits(tokens) - reference(input_ids=tokens).logits).abs().max().item()
        assert diff < 1e-5, (order, diff)


def test_export_hf_loads_in_transformers(family, tmp_path):
    """export hf merges every expert's LoRA and writes the hub's names; transformers' class loads it."""
    from transformers import AutoModelForCausalLM
    name, model_dir, hf_model = family
    lora = slowllama.LoraConfig(rank=3, alpha=6.0, targets=TARGETS)
    ours = slowllama.load(model_dir, lora=lora)
    randomize_adapters(ours.adapters, seed=4)
    ours.save_adapter(tmp_path / 'adapter')
    tokens, _ = random_batch(ours.cfg.vocab_size, seq=12)
    want = ours.logits(tokens)
    export(model_dir, tmp_path / 'hf', 'hf', adapter=tmp_path / 'adapter', dtype='fp32')
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / 'hf', dtype=torch.float32).eval()
    assert type(merged) is type(hf_model)
    with torch.no_grad():
        assert (merged(tokens).logits - want).abs().max() < 1e-4


def test_streamed_backward_equals_the_whole_model(family):
    """Several micro-batches in one trip, kept activations and recompute: the same loss and
    gradients as one backward each."""
    from reference import assert_same_loss_and_gradients
    name, model_dir, _ = family
    lora = slowllama.LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    kept = slowllama.load(model_dir, lora=lora, dropout=0.1, keep_activations='all')
    recomputed = slowllama.load(model_dir, lora=lora, dropout=0.1, keep_activations='none')
    assert_same_loss_and_gradients(kept, recomputed, seed=9)


@pytest.mark.parametrize('name', list(FAMILIES))
def test_router_and_experts_in_bf16_are_transformers_bit_for_bit(name, tmp_path):
    """In bf16 the router's choice and weights are transformers' bits: softmax in fp32, the top k
    renormalised in fp32 where norm_topk_prob, then cast to bf16 (qwen3_moe) or kept in fp32
    (mixtral, whose experts' outputs are weighed in fp32); the block's output is its eager
    experts' bits (fp32 checks cannot see these roundings)."""
    from slowllama.model.moe import MoE
    from slowllama.weights.formats.model_config import config_from_hf
    hf_model = make_hf_model(tmp_path, seed=11, **FAMILIES[name])
    hf_model.set_experts_implementation('eager')  # the loop over experts written out, not grouped_mm
    cfg = config_from_hf(hf_model.config.to_dict())
    theirs = hf_model.model.layers[0].mlp.to(torch.bfloat16)
    ours = MoE(cfg).to(torch.bfloat16)
    with torch.no_grad():
        ours.gate.weight.copy_(theirs.gate.weight)
        for e, expert in enumerate(ours.experts):
            gate, up = theirs.experts.gate_up_proj[e].chunk(2, dim=0)
            expert.gate_proj.weight.copy_(gate)
            expert.up_proj.weight.copy_(up)
            expert.down_proj.weight.copy_(theirs.experts.down_proj[e])
        torch.manual_seed(0)
        x = torch.randn(2, 48, cfg.dim).to(torch.bfloat16)
        route, their_route = ours.route(x.reshape(-1, cfg.dim)), theirs.gate(x.reshape(-1, cfg.dim))
        their_probs = torch.softmax(their_route[0], dim=-1, dtype=torch.float32)  # ours hands out the fp32 probs
        for got, want in zip(route, (their_probs, *their_route[1:])):
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert route[1].dtype == (torch.float32 if name.startswith('mixtral') else torch.bfloat16)
        assert torch.equal(ours(x), theirs(x))


# --- what is refused ----------------------------------------------------------------------------

def _hub_folder(tmp_path, **overrides):
    hf_model = make_hf_model(tmp_path / 'hf', seed=1, **{**FAMILIES['mixtral-top2'], **overrides})
    return tmp_path / 'hf', hf_model


def test_missing_or_misshapen_expert_is_refused_naming_block_expert_and_file(tmp_path):
    from safetensors.torch import load_file
    folder, _ = _hub_folder(tmp_path)
    path = folder / 'model.safetensors'
    tensors = load_file(str(path))
    missing = {k: v for k, v in tensors.items() if k != 'model.layers.1.block_sparse_moe.experts.4.w3.weight'}
    save_file(missing, str(path))
    with pytest.raises(slowllama.SlowLlamaError, match=r'model.safetensors: model.layers.1 expert 4: .*w3.weight '
                                                       'is missing') as e:
        slowllama.prepare(folder, tmp_path / 'out')
    assert '\n' not in str(e.value) and not (tmp_path / 'out').exists()
    save_file({**tensors, 'model.layers.2.block_sparse_moe.experts.0.w2.weight': torch.zeros(3, 3)}, str(path))
    with pytest.raises(slowllama.SlowLlamaError, match=r'model.safetensors: expert 0: model.layers.2.*w2.weight has '
                                                       r'shape \(3, 3\)'):
        slowllama.prepare(folder, tmp_path / 'out')


def test_router_width_other_than_the_expert_count_is_refused(tmp_path):
    from safetensors.torch import load_file
    folder, _ = _hub_folder(tmp_path)
    tensors = load_file(str(folder / 'model.safetensors'))
    tensors['model.layers.0.block_sparse_moe.gate.weight'] = torch.zeros(5, 64)
    save_file(tensors, str(folder / 'model.safetensors'))
    with pytest.raises(slowllama.SlowLlamaError, match=r'gate.weight has shape \(5, 64\): the router must have one '
                                                       r'row per expert \(6\)'):
        slowllama.prepare(folder, tmp_path / 'out')


def test_dense_layers_among_experts_are_refused(tmp_path):
    from slowllama.weights.formats.model_config import config_from_hf
    hf = {'model_type': 'qwen3_moe', 'hidden_size': 64, 'num_attention_heads': 4, 'num_hidden_layers': 3,
          'intermediate_size': 96, 'vocab_size': 128, 'num_experts': 4, 'mlp_only_layers': [1]}
    with pytest.raises(slowllama.SlowLlamaError, match='mlp_only_layers'):
        config_from_hf(hf)
    with pytest.raises(slowllama.SlowLlamaError, match='decoder_sparse_step 2'):
        config_from_hf({**hf, 'mlp_only_layers': [], 'decoder_sparse_step': 2})


def test_expert_targets_on_a_dense_model_say_it_has_no_experts(tiny_prepared):
    model_dir, _, _ = tiny_prepared
    with pytest.raises(slowllama.SlowLlamaError, match='LoraConfig.targets experts: the model has no experts'):
        slowllama.load(model_dir, lora=slowllama.LoraConfig(targets=('q', 'experts')))


def test_dense_mlp_targets_on_a_moe_model_are_refused(family):
    _, model_dir, _ = family
    with pytest.raises(slowllama.SlowLlamaError, match='LoraConfig.targets gate,up: a Mixture-of-Experts model has no dense'):
        slowllama.load(model_dir, lora=slowllama.LoraConfig(targets=('q', 'gate', 'up')))
    with pytest.raises(slowllama.SlowLlamaError, match='LoraConfig.dropout 0.1 with `LoraConfig.targets` experts'):
        slowllama.LoraConfig(dropout=0.1, targets=('q', 'experts'))
    from slowllama.cli import as_flags  # on the command line: the flags
    assert as_flags('LoraConfig.dropout 0.1 with `LoraConfig.targets` experts: x') == '--lora-dropout 0.1 with --targets experts: x'


def test_streamed_fetches_only_the_routed_experts(family):
    """A trip fetches the attention and router, then only the experts some token routes to, for the
    forward and once more for the backward; a decoded token fetches only its k experts per block.
    The whole model in memory (every expert present) gives the same loss and gradients."""
    from reference import against_whole_model
    name, model_dir, _ = family
    targets = TARGETS[:-1] if name == 'mixtral-top1-fused' else TARGETS  # its router's gradient is 0 (see above)
    _, loss_diff, worst = against_whole_model(model_dir, targets=targets, lora_dropout=0.0, router_aux_loss_coef=0)
    assert loss_diff < 1e-5 and worst < 1e-5
    model = slowllama.load(model_dir)
    cfg = model.cfg
    tokens, targets = random_batch(cfg.vocab_size, batch=1, seq=2, seed=1)
    asked, experts = {}, model.store.packed_experts
    model.store.packed_experts = lambda i, ids: (asked.setdefault(i, []).append(sorted(ids)), experts(i, ids))[1]
    before = model.traffic()
    model.backward(tokens, targets)
    fetched = model.traffic()['experts_fetched'] - before['experts_fetched']
    routed = sum(len(calls[0]) for calls in asked.values())  # the forward's: at most 2 tokens x k of them
    assert all(len(calls[0]) <= 2 * cfg.experts_per_token and all(c == calls[0] for c in calls)
               for calls in asked.values())  # the backward asks for the forward's set again
    assert len(asked) == cfg.n_layers and routed <= fetched <= 2 * routed < 2 * cfg.n_layers * cfg.n_experts
    before = model.traffic()
    model.cfg = type(cfg).from_dict({**cfg.to_dict(), 'eos_id': None})
    model.generate(tokens[:, :1], 2)
    assert model.traffic()['experts_fetched'] - before['experts_fetched'] == 2 * cfg.n_layers * cfg.experts_per_token


# --- packed experts (--quant) -------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['nf4', 'int8'])
def test_quantized_experts_are_packed_alone_and_stream_as_the_whole_model(kind, tmp_path):
    """--quant packs each expert's projections on their own (the router stays plain); streamed,
    only the chosen experts travel, packed, and are unpacked alone: loss and gradients equal the
    whole model built from the same unpacked weights. nf4: each expert's bytes are bitsandbytes'
    quantize_4bit of that expert's weight; transformers + bitsandbytes (which quantizes the
    attention's linears, not the 3D expert tensors) carrying our unpacked experts gives our logits."""
    from reference import against_whole_model
    from slowllama.weights.files import SafetensorsFile
    hf_model = make_hf_model(tmp_path / 'hf', seed=5, model_type='qwen3_moe', num_experts=5, num_experts_per_tok=2,
                             moe_intermediate_size=128, norm_topk_prob=True, head_dim=16)
    slowllama.prepare(tmp_path / 'hf', tmp_path / 'q', dtype='fp32', quant=kind)
    block = SafetensorsFile(tmp_path / 'q' / 'block_001.safetensors')
    assert block.tensor('mlp.gate.weight').dtype == torch.float32
    assert block.tensor('mlp.experts.3.down_proj.qweight').dtype in (torch.uint8, torch.int8)
    _, loss_diff, worst = against_whole_model(tmp_path / 'q', targets=TARGETS, lora_dropout=0.0,
                                              router_aux_loss_coef=0)
    assert loss_diff < 1e-5 and worst < 1e-5
    if kind != 'nf4':
        return
    import bitsandbytes.functional as bnbf
    weight = hf_model.model.layers[1].mlp.experts.down_proj[3].contiguous()  # [dim, hidden]
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type='nf4')
    assert torch.equal(block.tensor('mlp.experts.3.down_proj.qweight'), packed.reshape(-1))
    assert torch.allclose(block.tensor('mlp.experts.3.down_proj.absmax'), state.absmax)
    from test_packed import bnb_base
    reference = bnb_base(tmp_path / 'hf')
    store = slowllama.load(tmp_path / 'q').store
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            store.block(i)
            experts = store.experts(i, range(5))
            layer.mlp.experts.gate_up_proj.copy_(torch.stack(
                [torch.cat([experts[e]['gate_proj.weight'], experts[e]['up_proj.weight']]) for e in range(5)]))
            layer.mlp.experts.down_proj.copy_(torch.stack([experts[e]['down_proj.weight'] for e in range(5)]))
            store.release(i)
    ours = slowllama.load(tmp_path / 'q')
    tokens, _ = random_batch(ours.cfg.vocab_size, seq=12)
    with torch.no_grad():
        diff = (ours.logits(tokens) - reference(tokens).logits).abs().max().item()
    print(f'\nnf4 MoE vs transformers + bitsandbytes: max logit diff {diff:.2e}')
    assert diff < 1e-4


# --- GGUF -----------------------------------------------------------------------------------------

def write_moe_gguf(path, hf_model, arch):
    """llama.cpp's layout of a MoE model, written with gguf's writer: the router as ffn_gate_inp,
    each projection of every expert in one 3D ffn_{gate,up,down}_exps; Mixtral as architecture llama
    with an expert count (q/k rows interleaved, as llama.cpp's convert permutes them); F32 throughout."""
    import gguf
    import numpy as np
    from checkpoints import to_interleaved
    cfg, sd = hf_model.config, hf_model.state_dict()
    writer = gguf.GGUFWriter(str(path), arch)
    experts = getattr(cfg, 'num_experts', None) or cfg.num_local_experts
    head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    for method, value in (('add_block_count', cfg.num_hidden_layers), ('add_context_length', 256),
                          ('add_embedding_length', cfg.hidden_size), ('add_feed_forward_length', cfg.intermediate_size),
                          ('add_head_count', cfg.num_attention_heads), ('add_head_count_kv', cfg.num_key_value_heads),
                          ('add_layer_norm_rms_eps', cfg.rms_norm_eps), ('add_rope_dimension_count', head_dim),
                          ('add_rope_freq_base', cfg.rope_parameters['rope_theta']), ('add_expert_count', experts),
                          ('add_expert_used_count', cfg.num_experts_per_tok)):
        getattr(writer, method)(value)
    if arch == 'qwen3moe':
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        writer.add_expert_weights_norm(cfg.norm_topk_prob)
    add = lambda name, t: writer.add_tensor(name, np.ascontiguousarray(t.float().numpy()))  # noqa: E731
    add('token_embd.weight', sd['model.embed_tokens.weight'])
    add('output_norm.weight', sd['model.norm.weight'])
    add('output.weight', sd['lm_head.weight'])
    heads = {'q_proj': cfg.num_attention_heads, 'k_proj': cfg.num_key_value_heads} if arch == 'llama' else {}
    for i in range(cfg.num_hidden_layers):
        p, b = f'model.layers.{i}.', f'blk.{i}.'
        for ours, theirs in (('q_proj', 'attn_q'), ('k_proj', 'attn_k'), ('v_proj', 'attn_v'), ('o_proj', 'attn_output')):
            w = sd[f'{p}self_attn.{ours}.weight']
            add(f'{b}{theirs}.weight', torch.from_numpy(to_interleaved(w.numpy(), heads[ours]).copy())
                if ours in heads else w)
        if arch == 'qwen3moe':
            add(f'{b}attn_q_norm.weight', sd[f'{p}self_attn.q_norm.weight'])
            add(f'{b}attn_k_norm.weight', sd[f'{p}self_attn.k_norm.weight'])
        add(f'{b}attn_norm.weight', sd[f'{p}input_layernorm.weight'])
        add(f'{b}ffn_norm.weight', sd[f'{p}post_attention_layernorm.weight'])
        add(f'{b}ffn_gate_inp.weight', sd[f'{p}mlp.gate.weight'])
        gate_up, hidden = sd[f'{p}mlp.experts.gate_up_proj'], sd[f'{p}mlp.experts.down_proj'].shape[2]
        add(f'{b}ffn_gate_exps.weight', gate_up[:, :hidden])
        add(f'{b}ffn_up_exps.weight', gate_up[:, hidden:])
        add(f'{b}ffn_down_exps.weight', sd[f'{p}mlp.experts.down_proj'])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize('arch, name', [('qwen3moe', 'qwen3_moe-top2-norm'), ('llama', 'mixtral-top2')])
def test_gguf_moe_reads_to_its_hf_twins_logits(arch, name, tmp_path):
    hf_model = make_hf_model(tmp_path / 'hf', seed=5, **FAMILIES[name])
    write_moe_gguf(tmp_path / 'm.gguf', hf_model, arch)
    slowllama.prepare(tmp_path / 'm.gguf', tmp_path / 'out', dtype='fp32')
    model = slowllama.load(tmp_path / 'out')
    assert model.cfg.model_type == hf_model.config.model_type and model.cfg.n_experts == 6
    assert model.cfg.norm_topk_prob and model.cfg.experts_per_token == 2
    tokens, _ = random_batch(model.cfg.vocab_size, seq=12)
    with torch.no_grad():
        diff = (model.logits(tokens) - hf_model(tokens).logits).abs().max().item()
    assert diff < 1e-5


def test_trip_of_micro_batches_and_dpo_reference_on_moe(family):
    """Three micro-batches travelling together (each block's routed experts fetched once for all of
    them) give the bits of one micro-batch a trip; the base model under lora_disabled (DPO's
    reference pass) is transformers' model without the adapter."""
    from slowllama.engine.trip import MicroBatch
    name, model_dir, hf_model = family
    lora = slowllama.LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    results = []
    for trip in (3, 1):
        model = slowllama.load(model_dir, lora=lora, dropout=0.1, micro_batches_per_trip=trip)
        randomize_adapters(model.adapters, seed=5)
        batches = [MicroBatch(*random_batch(model.cfg.vocab_size, seed=s)) for s in range(3)]
        torch.manual_seed(7)
        losses = model.accumulate(batches, [0.5, 0.3, 0.2])
        results.append((losses, {k: p.grad.clone() for k, p in model.trainable_parameters().items()}))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])
    tokens, _ = random_batch(model.cfg.vocab_size, seq=12)
    with model.lora_disabled(), torch.no_grad():
        assert (model.logits(tokens) - hf_model(tokens).logits).abs().max() < 1e-5


@pytest.mark.parametrize('offload, dtype', [('ram', torch.float32), ('device', torch.float32),
                                           ('ram', torch.bfloat16)])
def test_tiers_give_identical_gradients_on_moe(family, offload, dtype):
    """The experts fetched alone from the mapped file, from RAM (converted into the copy buffers in
    bf16) and resident: the same bits."""
    from reference import assert_same_loss_and_gradients
    _, model_dir, _ = family
    lora = slowllama.LoraConfig(rank=4, targets=TARGETS)
    baseline = slowllama.load(model_dir, lora=lora, offload='disk', dropout=0.1, dtype=dtype)
    other = slowllama.load(model_dir, lora=lora, offload=offload, dropout=0.1, dtype=dtype)
    assert_same_loss_and_gradients(baseline, other, seed=7)


def test_what_gguf_and_meta_cannot_hold_is_refused_in_one_line(family, tmp_path):
    """Meta's format has no experts; llama.cpp (test_gguf_moe.py) always renormalises qwen3moe's top-k
    weights and runs Mixtral (architecture llama) without a sliding window."""
    name, model_dir, hf_model = family
    refused = {'qwen3_moe-top1-fused': 'norm_topk_prob false', 'mixtral-top1-fused': 'mixtral models with sliding_window'}
    cases = [('meta', tmp_path / 'meta', hf_model.config.model_type)]
    cases += [('gguf', tmp_path / 'm.gguf', refused[name])] if name in refused else []
    for fmt, out, match in cases:
        with pytest.raises(slowllama.SlowLlamaError, match=match) as e:
            export(model_dir, out, fmt)
        assert '\n' not in str(e.value) and not out.exists()
