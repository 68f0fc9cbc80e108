"""Every part of the step on Mixture-of-Experts blocks (issue 34): torchrun data parallel, resume,
the BCI encoder prefix through the streamed MoE decoder, and LoRA + block dropout replayed by
recompute. The twins of these tests on dense models are in test_distributed.py, test_train.py,
test_bci.py and test_kept.py; the tiny MoE families come from test_moe.py."""

import pytest
import torch
from conftest import make_hf_model, random_batch, save_tiny_tokenizer
from reference import randomize_adapters
from test_bci import max_rel_diff, prefix_run_beside_whole_model
from test_distributed import adapter, finetune, max_relative_difference
from test_moe import FAMILIES

import slowllama

EXPERT_TARGETS = ('q', 'k', 'v', 'o', 'experts', 'router')
# LoRA dropout is refused on the experts and the router (LoraConfig): it rides on attention here
DROPOUT_TARGETS = ('q', 'k', 'v', 'o')


@pytest.fixture(scope='module')
def moe_text_model(tmp_path_factory):
    """A tiny qwen3_moe model (2 blocks, top-2 of 6 experts) with a tokenizer, prepared in fp32."""
    folder = tmp_path_factory.mktemp('moe_text')
    make_hf_model(folder / 'hf', seed=13, num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                  **FAMILIES['qwen3_moe-top2-norm'])
    save_tiny_tokenizer(folder / 'hf')
    slowllama.prepare(folder / 'hf', folder / 'prepared', dtype='fp32')
    return folder / 'prepared'


@pytest.fixture(scope='module', params=['qwen3_moe-top2-norm', 'mixtral-top2'])
def moe_model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    make_hf_model(folder / 'hf', seed=11, num_hidden_layers=2, **FAMILIES[request.param])
    slowllama.prepare(folder / 'hf', folder / 'prepared', dtype='fp32')
    return folder / 'prepared'


@pytest.fixture
def story(tmp_path):
    path = tmp_path / 'story.txt'
    path.write_text('the keeper of glimmerfen lights a violet lamp at dusk and the boats come home. ' * 12)
    return path


MOE_RUN = ['--targets', 'q,v,experts,router', '--iters', 2, '--dropout', '0.1', '--schedule', 'constant']


@pytest.mark.slow
def test_two_processes_of_batch_2_equal_one_of_batch_4_on_moe(moe_text_model, story, tmp_path):
    """torchrun: each process routes its own rows to its own experts; the all-reduced LoRA gradients
    of experts no row of one process chose are that process's zeros. Without dropout (each process
    draws its own masks) the adapter after two steps is the one of a single process with every row.
    (No router target: the load-balancing loss of a batch is not the mean of its halves' losses.)"""
    run = ['--targets', 'q,v,experts', '--iters', 2, '--grad-accum', 2]
    finetune(moe_text_model, story, tmp_path / 'single', batch=4, extra=run)
    finetune(moe_text_model, story, tmp_path / 'pair', batch=2, processes=2, extra=run)
    single, pair = adapter(tmp_path / 'single'), adapter(tmp_path / 'pair')
    assert set(single) == set(pair) and any('experts' in k for k in single)
    difference = max_relative_difference(pair, single)
    print(f'\nMoE, 2 x batch 2 vs 1 x batch 4: max relative adapter difference {difference:.2e}')
    # an expert row that few tokens reach has gradients near AdamW's eps, where the order of the sum
    # (one process or two, all-reduced) shows as ~1e-5 steps of a few elements; an expert's gradient
    # lost in the all-reduce would move its rows by about lr (1e-2)
    assert difference < 1e-3
    finetune(moe_text_model, story, tmp_path / 'half', batch=2, extra=run)  # half the rows end elsewhere
    assert max_relative_difference(adapter(tmp_path / 'half'), single) > 1e-3


@pytest.mark.slow
def test_resume_after_a_stop_ends_on_the_same_adapter_on_moe(moe_text_model, story, tmp_path):
    """A run stopped after step 1 (its checkpoint) and resumed with --resume ends on the bits of an
    uninterrupted run, block dropout on; the uninterrupted one recomputes every block, the split one
    keeps their activations."""
    run = MOE_RUN + ['--save-every', 1]
    finetune(moe_text_model, story, tmp_path / 'whole', batch=2, extra=run + ['--keep-activations', 'none'])
    finetune(moe_text_model, story, tmp_path / 'split', batch=2, extra=run + ['--iters', 1])
    stopped = adapter(tmp_path / 'split')
    finetune(moe_text_model, story, tmp_path / 'split', batch=2, extra=run + ['--resume'])
    assert 'resumed from' in (tmp_path / 'split' / 'train.log').read_text()
    whole, split = adapter(tmp_path / 'whole'), adapter(tmp_path / 'split')
    assert set(whole) == set(split) and any('experts' in k for k in whole)
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    assert any(not torch.equal(whole[k], stopped[k]) for k in whole)  # step 2 moved it


def test_encoder_gradient_through_streamed_moe_decoder_equals_whole_model_autograd(moe_model):
    """Prompt + encoder prefix + tokens through a streamed MoE decoder (LoRA on attention, every
    expert and the router; dropout 0.1 in the blocks and the encoder, same seed): the same loss,
    encoder and LoRA gradients as autograd over the whole model with every expert in memory."""
    lora = slowllama.LoraConfig(rank=4, alpha=8.0, targets=EXPERT_TARGETS)
    streamed, ref_adapters, loss, ref_loss, encoder_worst = prefix_run_beside_whole_model(
        moe_model, lora, router_aux_loss_coef=0)
    pairs = [(getattr(ours[path], m).weight.grad, getattr(ref[path], m).weight.grad)
             for ours, ref in zip(streamed.adapters, ref_adapters) for path in ours for m in ('lora_A', 'lora_B')]
    assert any('experts' in path for path in streamed.adapters[0])
    lora_worst = max(max_rel_diff(got, want) for got, want in pairs if want.abs().max() > 1e-6)
    # experts no token chose have zero gradients in both
    assert all(got.abs().max() < 1e-6 for got, want in pairs if want.abs().max() <= 1e-6)
    print(f'\nMoE decoder: loss diff {abs(loss - ref_loss.item()):.2e}, max relative grad diff: '
          f'encoder {encoder_worst:.2e}, LoRA {lora_worst:.2e}')
    assert encoder_worst < 1e-4 and lora_worst < 1e-4


def test_lora_and_block_dropout_replayed_by_recompute_on_moe(moe_model):
    """LoRA dropout (attention) and block dropout 0.1, three micro-batches travelling in one trip:
    recomputing each MoE block in the backward replays the forward's masks, so losses and gradients
    are the bits of keeping every activation; and the masks matter (dropout 0 differs)."""
    from slowllama.engine.trip import MicroBatch
    results = []
    for keep, dropout in (('all', 0.1), ('none', 0.1), ('none', 0.0)):
        lora = slowllama.LoraConfig(rank=4, alpha=8.0, dropout=dropout, targets=DROPOUT_TARGETS)
        model = slowllama.load(moe_model, lora=lora, dropout=dropout, keep_activations=keep, micro_batches_per_trip=3)
        randomize_adapters(model.adapters, seed=5)
        batches = [MicroBatch(*random_batch(model.cfg.vocab_size, seed=s)) for s in range(3)]
        torch.manual_seed(7)
        losses = model.accumulate(batches, [0.5, 0.3, 0.2])
        results.append((losses, {k: p.grad.clone() for k, p in model.trainable_parameters().items()}))
    (kept, kept_grads), (recomputed, recomputed_grads), (plain, plain_grads) = results
    assert kept == recomputed and all(torch.equal(kept_grads[k], recomputed_grads[k]) for k in kept_grads)
    assert plain != kept and any(not torch.equal(plain_grads[k], kept_grads[k]) for k in kept_grads)
