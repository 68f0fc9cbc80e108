"""--quant MoE experts travel packed and are unpacked one at a time, only while each computes: the
bytes unpacked and alive at once are one expert's (autograd keeps the packed parts, not the
weights), in the recomputed and the kept backward alike, and loss and gradients are those of
unpacking every fetched expert at once and letting autograd keep them."""
import weakref

import pytest
import torch
from conftest import random_batch

import slowllama
from slowllama.model.quant import parse_quant
from slowllama.recipes.random_model import write_random_prepared
from slowllama.weights.formats.model_config import config_from_hf

SMALL = dict(model_type='qwen3_moe', hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=128, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=True, num_hidden_layers=3, vocab_size=256, rms_norm_eps=1e-6,
             max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LORA = slowllama.LoraConfig(rank=4, targets=('q', 'v', 'experts', 'router'))


@pytest.fixture(scope='module', params=['nf4', 'int8'])
def packed(request, tmp_path_factory):
    cfg = config_from_hf(SMALL)
    folder = tmp_path_factory.mktemp(request.param) / 'model'
    write_random_prepared(cfg, folder, dtype='bf16', quant=parse_quant(request.param), seed=4)
    return cfg, folder


class LiveUnpacked:
    """Wraps a store's unpack_expert: the bytes of unpacked expert weights alive at once, counted by
    their storages (a storage lives while anything holds it: a view, autograd's saved tensors, the
    store's own buffers), and how many distinct storages it handed out."""

    def __init__(self, store):
        self.live = self.peak = self.calls = 0
        self.alive, self.seen = {}, set()
        self._unpack = store.unpack_expert
        store.unpack_expert = self

    def __call__(self, parts, **kw):
        weights = self._unpack(parts, **kw)
        self.calls += 1
        for tensor in weights.values():
            storage = tensor.untyped_storage()
            self.seen.add(storage.data_ptr())
            if storage.data_ptr() not in self.alive:
                self.alive[storage.data_ptr()] = storage.nbytes()
                self.live += storage.nbytes()
                weakref.finalize(storage, self._freed, storage.data_ptr())
        self.peak = max(self.peak, self.live)
        return weights

    def _freed(self, pointer):
        self.live -= self.alive.pop(pointer)


def unpack_all(store):
    """The former path: every fetched expert unpacked at once, autograd keeping its weights."""
    probe = LiveUnpacked(store)
    packed, unpack = store.packed_experts, store.unpack_expert
    store.packed_experts = lambda i, ids: {e: unpack(parts, reuse=False) for e, parts in packed(i, ids).items()}
    store.unpack_expert = None  # the fetcher hands out weights: moe.py runs them as they are
    return probe


def step(cfg, folder, keep, setup):
    model = slowllama.load(folder, lora=LORA, dtype=torch.float32, offload='disk', keep_activations=keep)
    torch.manual_seed(0)
    for p in model.trainable_parameters().values():
        torch.nn.init.normal_(p, std=0.05)
    probe = setup(model.store)
    tokens, targets = random_batch(cfg.vocab_size, batch=2, seq=16, seed=2)  # 64 choices: every expert hit
    loss = model.backward(tokens, targets)
    return loss, {n: p.grad.clone() for n, p in model.trainable_parameters().items()}, probe, model


@pytest.mark.parametrize('keep', ['none', 'all'])
def test_one_expert_is_unpacked_at_a_time_and_grads_are_unpack_alls(packed, keep):
    cfg, folder = packed
    loss, grads, probe, model = step(cfg, folder, keep, LiveUnpacked)
    one_expert = 3 * cfg.dim * cfg.expert_hidden_dim * 4  # gate, up, down in fp32
    fetched = model.traffic()['experts_fetched']
    assert fetched >= cfg.n_layers * cfg.n_experts  # every expert of every block hit
    # each routed expert unpacked in the forward and again in the backward (more than once where its
    # block's forward runs again), never two at once: a block's 8 experts would be 8 times the bytes;
    # always into the same three buffers (fresh weights each time grew a CPU heap by ~4 MB an expert
    # in a block's backward: 0.5 GB on a Qwen3-30B-A3B block)
    assert probe.calls >= fetched
    assert probe.peak == one_expert and len(probe.seen) == 3
    ref_loss, ref_grads, ref_probe, ref_model = step(cfg, folder, keep, unpack_all)
    assert ref_model.traffic()['experts_fetched'] == fetched
    assert ref_probe.peak >= cfg.n_experts * one_expert  # the probe sees the former path's whole block
    assert loss == ref_loss
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-8, msg=name)


def test_plan_and_store_count_one_expert_unpacked(packed):
    """What the store tells the planner its experts take on a cpu (the packed parts are used where
    they lie in the mapped files): one expert's weights in the compute dtype."""
    cfg, folder = packed
    store = slowllama.load(folder, dtype=torch.float32, offload='disk').store
    assert store._experts_room(True) == 3 * cfg.dim * cfg.expert_hidden_dim * 4
