"""Mixture-of-Experts in the plan and in the store's memory: the experts a pass fetches (expected
under uniform routing, at worst), device copy buffers sized for a block's attention and router (its
experts get memory as they are fetched), bytes read per decoded token, and a random packed model of
a shape written straight to a prepared folder (bench --write-model)."""
import json
import os

import pytest
import torch
from conftest import random_batch

import slowllama
from slowllama.engine import moe_plan, plan
from slowllama.generation.completion import DecodeTraffic
from slowllama.model.quant import parse_quant
from slowllama.recipes.random_model import WEIGHT_STD, write_random_prepared
from slowllama.recipes.shapes import shape_config
from slowllama.weights.formats.model_config import config_from_hf
from slowllama.weights.prepared import block_file, verify_model

SMALL = dict(model_type='qwen3_moe', hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             intermediate_size=256, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=True, num_hidden_layers=2, vocab_size=1024, rms_norm_eps=1e-6,
             max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope='module', params=['nf4', 'nf4-double', 'int8', 'bf16'])
def small(request, tmp_path_factory):
    """(cfg, quant, folder): a scaled-down Qwen3-30B-A3B (2 layers, 8 experts) written by the writer."""
    cfg = config_from_hf(SMALL)
    quant = None if request.param == 'bf16' else parse_quant(request.param.split('-')[0],
                                                             double_quant=request.param.endswith('double'))
    folder = tmp_path_factory.mktemp(request.param) / 'model'
    write_random_prepared(cfg, folder, dtype='bf16', quant=quant, seed=3)
    return cfg, quant, folder


def test_expected_experts_match_uniform_routing_and_worst_case_bounds_it():
    """E(1-(1-k/E)^T) is the mean number of distinct experts T tokens choose when each picks k of E
    uniformly at random (simulated), min(E, Tk) the most; a whole block is the fetch of every expert."""
    cfg = shape_config('30b-a3b-block')
    g = torch.Generator().manual_seed(0)
    for tokens in (1, 4, 16, 64):
        trials = [len(set(torch.cat([torch.randperm(128, generator=g)[:8] for _ in range(tokens)]).tolist()))
                  for _ in range(400)]
        expected = moe_plan.experts_expected(cfg, tokens)
        assert abs(sum(trials) / len(trials) - expected) < 0.01 * expected + 0.1
        assert max(trials) <= moe_plan.experts_worst(cfg, tokens) == min(128, 8 * tokens)
    for quant in (None, parse_quant('nf4'), parse_quant('int8')):
        whole = plan.block_bytes(cfg, 'bf16', quant)
        assert moe_plan.fetched_block_bytes(cfg, 128, 'bf16', quant) == whole
        core, eight = (moe_plan.fetched_block_bytes(cfg, n, 'bf16', quant) for n in (0, 8))
        assert core < eight < whole / 10  # a token's block: attention, router and 8 of 128 experts
    dense = shape_config('0.4b')
    assert moe_plan.fetched_block_bytes(dense, 0) == plan.block_bytes(dense) and moe_plan.experts_line(dense, 9) == ''


def test_plan_prints_the_experts_and_counts_only_the_fetched_ones(capsys, monkeypatch):
    cfg = shape_config('30b-a3b-block')
    nf4 = parse_quant('nf4')
    plan.print_plan(cfg, 1, 4, 'bf16', 4, ('q', 'v'), nf4)
    out = capsys.readouterr().out
    assert 'experts fetched per block for 4 tokens: 29.1 of 128 expected' in out and '32 at worst' in out
    assert 'a decoded token: 8.0 of 128 expected' in out
    # streamed from disk, the device's peak counts the trip's worst case of experts, not the whole block
    few = plan.predict(cfg, 1, 4, 'bf16', 4, ('q', 'v'), quant=nf4)
    monkeypatch.setattr(plan, 'experts_worst', lambda cfg, tokens: cfg.n_experts)  # as if the whole block came
    whole = plan.predict(cfg, 1, 4, 'bf16', 4, ('q', 'v'), quant=nf4)
    packed = 2 * (plan.block_bytes(cfg, 'bf16', nf4) - moe_plan.fetched_block_bytes(cfg, 32, 'bf16', nf4))
    assert whole.device_bytes - few.device_bytes == packed  # two blocks' other 96 experts, packed
    # unpacked: two blocks' attention and router, and one expert (each is unpacked only while it computes)
    monkeypatch.setattr(plan, 'expert_params', lambda cfg: 0)
    none_unpacked = plan.predict(cfg, 1, 4, 'bf16', 4, ('q', 'v'), quant=nf4)
    assert whole.device_bytes - none_unpacked.device_bytes == 3 * cfg.dim * cfg.expert_hidden_dim * 2
    assert moe_plan.experts_worst(cfg, 16) == cfg.n_experts  # from 16 tokens on, every expert at worst


def test_random_writer_files_are_plans_block_bytes_and_the_model_trains(small):
    """The writer's block files hold exactly the plan's block bytes (beside the safetensors header),
    the manifest checks pass, the unpacked weights have WEIGHT_STD, and a step trains with a finite
    loss near ln(vocab) (random weights predict nothing) and finite, non-zero gradients."""
    cfg, quant, folder = small
    for i in range(cfg.n_layers):
        with open(folder / block_file(i), 'rb') as f:
            header = int.from_bytes(f.read(8), 'little')
        data = os.path.getsize(folder / block_file(i)) - 8 - header
        assert data == plan.block_bytes(cfg, 'bf16', quant) == moe_plan.fetched_block_bytes(cfg, 8, 'bf16', quant)
    manifest = json.loads((folder / 'manifest.json').read_text())
    assert manifest['config']['n_experts'] == 8 and 'tokenizer.json' in manifest['tokenizer']
    verify_model(folder)  # every file's size and sha256 against the manifest
    model = slowllama.load(folder, lora=slowllama.LoraConfig(rank=4, targets=('q', 'v', 'experts')), offload='disk')
    store = model.store
    store.block(0)
    expert = store.experts(0, [5])[5]['down_proj.weight'].float()
    store.release(0)
    assert abs(expert.std().item() - WEIGHT_STD) < 0.1 * WEIGHT_STD
    tokens, targets = random_batch(cfg.vocab_size, batch=1, seq=32)
    loss = model.backward(tokens, targets)
    grads = [p.grad for p in model.trainable_parameters().values()]
    assert abs(loss - torch.log(torch.tensor(1024.0)).item()) < 0.5
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    optimizer = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-3)
    optimizer.step()
    assert torch.isfinite(torch.tensor(model.backward(tokens, targets)))


def test_copy_buffers_hold_the_attention_and_router_and_experts_come_as_fetched(small):
    """Streamed through the copier's slots as on cuda, a MoE block's two slots (and the unpacker's two
    sets of buffers) are its attention and router only: the experts get memory as they are fetched.
    Loss and gradients are the zero-copy path's."""
    cfg, quant, folder = small
    results = []
    for as_device in (False, True):
        model = slowllama.load(folder, lora=slowllama.LoraConfig(rank=4, targets=('q', 'v', 'experts')),
                               offload='disk', dtype=torch.float32)
        copier = model.store._copier
        if as_device:
            copier.on_cpu = False  # copy through the slots and their staging as on cuda
            core = moe_plan.fetched_block_bytes(cfg, 0, 'fp32', quant)
            # bf16: every expert of two blocks, converted to fp32; nf4, int8: one expert unpacked in fp32 at
            # a time (on a cpu the packed parts are used where they lie)
            experts = 2 * (plan.block_bytes(cfg, 'fp32') - moe_plan.fetched_block_bytes(cfg, 0, 'fp32'))
            if quant is not None:
                experts = moe_plan.expert_params(cfg) * 4
            assert copier.unallocated_bytes() == 2 * core < plan.block_bytes(cfg, 'fp32', quant) / 3
            assert model.store.unallocated_device_bytes() == 2 * core + experts  # what the planner leaves room for
        torch.manual_seed(0)
        for p in model.trainable_parameters().values():
            torch.nn.init.normal_(p, std=0.02)
        tokens, targets = random_batch(cfg.vocab_size, batch=1, seq=12)
        loss = model.backward(tokens, targets)
        results.append((loss, {n: p.grad.clone() for n, p in model.trainable_parameters().items()}))
        if as_device:
            slots = [b for b in copier._buffers if b is not None]
            assert slots and all(not any(n.startswith('mlp.experts.') for n in b) for b in slots)
            assert 'self_attn.q_proj.weight' in str(list(slots[0])) or 'self_attn.q_proj.qweight' in slots[0]
        if quant is not None:
            pool = model.store._unpacker._pool
            assert pool and all(not any(n.startswith('mlp.experts.') for n in b) for b in pool)
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == loss_b and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_a_decoded_token_reads_its_k_experts_per_block(small):
    """Each decoded token reads, from disk, each block's attention and router and the k experts it
    chose, the head and one embedding row (decoded_token_bytes): within 10%, and far from the whole
    blocks; test_gen says so."""
    cfg, quant, folder = small
    model = slowllama.load(folder, offload='disk', dtype=torch.float32)
    model.cfg = type(cfg).from_dict({**model.cfg.to_dict(), 'eos_id': None})  # all the tokens asked for
    traffic = DecodeTraffic(model)
    model.generate(torch.tensor([[1, 40, 41, 42]]), 6, on_token=traffic)
    per_token = traffic.per_token()
    planned = moe_plan.decoded_token_bytes(cfg, 'bf16', quant)
    whole = planned + cfg.n_layers * (plan.block_bytes(cfg, 'bf16', quant)
                                      - moe_plan.fetched_block_bytes(cfg, 2, 'bf16', quant))
    print(f'\n{quant and quant.type}: read per decoded token {per_token["bytes_read"]} B, planned {planned} B, '
          f'whole blocks {whole} B')
    assert abs(per_token['bytes_read'] - planned) <= 0.1 * planned and planned < 0.6 * whole
    assert per_token['experts_fetched'] == cfg.n_layers * cfg.experts_per_token
    from slowllama.recipes.generate import decode_report  # what test_gen prints after the completion
    line = decode_report(model, per_token)
    assert f'(plan: {planned / 2 ** 20:.2f} MiB' in line and 'router and 2 experts' in line
    assert line.endswith('experts fetched per block: 2.0 of 8')
