"""The streamed engine against autograd over the whole model, and against transformers + peft."""
import pytest
import torch
from conftest import random_batch
from reference import (
    assert_same_loss_and_gradients,
    copy_adapters,
    masked_mean_ce,
    peft_grads,
    peft_model,
    randomize_adapters,
    whole_model,
)

import slowllama
from slowllama.engine import forward

ALL_TARGETS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def grads_of(model):
    return {name: p.grad.clone() for name, p in model.trainable_parameters().items()}


def max_rel_diff(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize('head_slices', ['one', 'many'])
def test_streamed_backward_equals_whole_model_autograd_with_dropout(tiny_prepared, head_slices, monkeypatch):
    """(a): same weights, same seed, model dropout and LoRA dropout 0.1: same loss and gradients,
    with the head's vocabulary in one slice or in many (the online log-sum-exp and gradient)."""
    model_dir, _, _ = tiny_prepared
    if head_slices == 'many':
        monkeypatch.setattr(slowllama.engine.plan, 'SLICE_ELEMENTS', 1)  # slices of MIN_SLICE_ROWS rows
    lora = slowllama.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=ALL_TARGETS)
    streamed = slowllama.load(model_dir, lora=lora, dropout=0.1)
    randomize_adapters(streamed.adapters)
    reference, ref_adapters = whole_model(model_dir, lora, dropout=0.1)
    copy_adapters(streamed.adapters, ref_adapters)
    tokens, targets = random_batch(streamed.cfg.vocab_size)

    torch.manual_seed(123)
    loss = streamed.backward(tokens, targets)
    rng_after_streamed = torch.get_rng_state()
    torch.manual_seed(123)
    reference.train()
    ref_loss = masked_mean_ce(reference(tokens), targets)
    ref_loss.backward()

    assert abs(loss - ref_loss.item()) < 1e-5
    assert torch.equal(rng_after_streamed, torch.get_rng_state())  # the backward leaves the RNG as autograd does
    worst = 0.0
    for layer, (ours, ref) in enumerate(zip(streamed.adapters, ref_adapters)):
        for path in ours:
            for matrix in ('lora_A', 'lora_B'):
                got = getattr(ours[path], matrix).weight.grad
                want = getattr(ref[path], matrix).weight.grad
                assert want.abs().max() > 0
                worst = max(worst, max_rel_diff(got, want))
    print(f'\n(a) loss diff {abs(loss - ref_loss.item()):.2e}, max relative grad diff {worst:.2e}')
    assert worst < 1e-5


def test_dropout_changes_the_loss(tiny_prepared):
    """The dropout in (a) is real: with it on, two different seeds give different losses."""
    model_dir, _, _ = tiny_prepared
    model = slowllama.load(model_dir, lora=slowllama.LoraConfig(dropout=0.1), dropout=0.1)
    tokens, targets = random_batch(model.cfg.vocab_size)
    torch.manual_seed(1)
    first = model.backward(tokens, targets)
    torch.manual_seed(2)
    assert model.backward(tokens, targets) != first


def test_logits_loss_and_grads_equal_transformers_peft(tiny_prepared, tmp_path):
    """(b): a non-zero adapter saved by peft, loaded into us: logits, loss and every LoRA gradient."""
    model_dir, _, hf_model = tiny_prepared
    reference = peft_model(hf_model)
    reference.save_pretrained(tmp_path / 'adapter')
    ours = slowllama.load(model_dir, adapter=tmp_path / 'adapter')
    assert ours.lora.targets == ALL_TARGETS
    tokens, targets = random_batch(ours.cfg.vocab_size, seed=3)

    ref_logits = reference(input_ids=tokens).logits
    logits = ours.logits(tokens)
    logit_diff = (logits - ref_logits).abs().max().item()
    assert logit_diff < 1e-4

    ref_loss = masked_mean_ce(ref_logits, targets)
    ref_loss.backward()
    loss = ours.backward(tokens, targets)
    assert abs(loss - ref_loss.item()) < 1e-5
    ref_grads, grads = peft_grads(reference), grads_of(ours)
    assert set(grads) == set(ref_grads)
    worst = max(max_rel_diff(grads[k], ref_grads[k]) for k in grads)
    print(f'\n(b) max logit diff {logit_diff:.2e}, loss diff {abs(loss - ref_loss.item()):.2e}, '
          f'max relative grad diff {worst:.2e}')
    assert worst < 1e-4


def test_packed_documents_equal_each_document_alone_in_transformers_peft(tiny_prepared, tmp_path):
    """Rows packed from several documents, with positions restarting at each: every document's
    logits, and the loss and LoRA gradients of the whole batch, as transformers + peft give for
    the documents run one by one, unpacked."""
    model_dir, _, hf_model = tiny_prepared
    reference = peft_model(hf_model)
    reference.save_pretrained(tmp_path / 'adapter')
    ours = slowllama.load(model_dir, adapter=tmp_path / 'adapter')
    tokens, targets = random_batch(ours.cfg.vocab_size, batch=2, seq=16, seed=5)
    documents = [[(0, 0, 5), (0, 5, 12), (0, 12, 16)], [(1, 0, 9), (1, 9, 16)]]  # (row, start, end)
    positions = torch.zeros_like(tokens)
    for row, start, end in sum(documents, []):
        positions[row, start:end] = torch.arange(end - start)

    logits = ours.logits(tokens, positions=positions)
    loss = ours.backward(tokens, targets, positions=positions)
    total, counted, worst_logit = 0.0, int((targets != -100).sum()), 0.0
    for row, start, end in sum(documents, []):
        alone = reference(input_ids=tokens[row:row + 1, start:end]).logits[0]
        worst_logit = max(worst_logit, (logits[row, start:end] - alone).abs().max().item())
        total = total + torch.nn.functional.cross_entropy(alone, targets[row, start:end], ignore_index=-100,
                                                          reduction='sum')
    ref_loss = total / counted
    ref_loss.backward()
    ref_grads, grads = peft_grads(reference), grads_of(ours)
    worst = max(max_rel_diff(grads[k], ref_grads[k]) for k in grads)
    print(f'\npacked: max logit diff {worst_logit:.2e}, loss diff {abs(loss - ref_loss.item()):.2e}, '
          f'max relative grad diff {worst:.2e}')
    assert worst_logit < 1e-4 and abs(loss - ref_loss.item()) < 1e-5 and worst < 1e-4
    assert (logits - ours.logits(tokens)).abs().max() > 1e-2  # the documents did see each other unmasked


@pytest.mark.parametrize('offload, dtype', [('ram', torch.float32), ('device', torch.float32),
                                           ('ram', torch.bfloat16)])
def test_offload_modes_give_identical_gradients(tiny_prepared, offload, dtype):
    """(c): disk, ram and device tiers, and saved inputs spilled to disk, give the same bits. In bf16
    the fp32 file's blocks are converted as they stream from disk (in the reader thread, into the
    two reused buffers), and once at load for ram."""
    model_dir, _, _ = tiny_prepared
    lora = slowllama.LoraConfig(rank=4, dropout=0.1, targets=('q', 'v', 'down'))
    baseline = slowllama.load(model_dir, lora=lora, offload='disk', dropout=0.1, dtype=dtype)
    other = slowllama.load(model_dir, lora=lora, offload=offload, dropout=0.1, stash_ram_bytes=0, dtype=dtype,
                           keep_activations='none')  # recomputed: the saved inputs spill to disk
    assert_same_loss_and_gradients(baseline, other, seed=7)


def test_gradients_accumulate_across_calls(tiny_prepared):
    model_dir, _, _ = tiny_prepared
    model = slowllama.load(model_dir)
    randomize_adapters(model.adapters)
    tokens, targets = random_batch(model.cfg.vocab_size)
    model.backward(tokens, targets)
    once = grads_of(model)
    model.backward(tokens, targets)
    twice = grads_of(model)
    assert all(torch.allclose(twice[k], 2 * once[k]) for k in once)


def test_generate_greedy_equals_transformers(tiny_prepared):
    model_dir, _, hf_model = tiny_prepared
    ours = slowllama.load(model_dir)
    prompt = torch.tensor([[5, 17, 42, 9]])
    want = hf_model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones_like(prompt))
    ours.cfg = type(ours.cfg).from_dict({**ours.cfg.to_dict(), 'eos_id': None})
    assert torch.equal(ours.generate(prompt, 12), want)


def test_a_failed_pass_hands_its_blocks_back(tiny_prepared, monkeypatch):
    """Out of memory (or Ctrl-C) inside a block leaves no block held: the next step runs normally."""
    model_dir, _, _ = tiny_prepared
    model = slowllama.load(model_dir, offload='ram')
    tokens, targets = random_batch(model.cfg.vocab_size)
    expected = model.backward(tokens, targets)
    real = forward.run_block

    def failing(block, *args, **kwargs):
        if block is model.blocks[1]:
            raise RuntimeError('CUDA out of memory (simulated)')
        return real(block, *args, **kwargs)
    monkeypatch.setattr(forward, 'run_block', failing)
    with pytest.raises(RuntimeError, match='out of memory'):
        model.backward(tokens, targets)
    assert not model.store._held and not model.store._pending
    monkeypatch.setattr(forward, 'run_block', real)
    for p in model.trainable_parameters().values():
        p.grad = None
    assert model.backward(tokens, targets) == expected


def test_nucleus_sampling_keeps_to_the_top_p_set_without_a_boolean_index():
    from test_head import OperatorLog

    from slowllama.generation.decode import sample
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))  # top_p 0.7: tokens 0 and 1 only
    torch.manual_seed(0)
    with OperatorLog() as log:
        picked = {int(sample(logits, temperature=1.0, top_p=0.7)) for _ in range(200)}
    assert picked == {0, 1}
    assert not [name for name in log.names if name.startswith('boolean-mask')]
