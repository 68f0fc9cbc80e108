"""The load-balancing loss while the router trains, against transformers + peft with
output_router_logits=True (what its ForCausalLM adds: router_aux_loss_coef x load_balancing_loss_func
over every layer's router logits, padding left out by the attention mask): per micro-batch, as
transformers computes it per forward call, over trips of one or two micro-batches, with the blocks'
activations kept or recomputed."""
import copy

import pytest
import torch
from conftest import make_hf_model, random_batch
from reference import masked_mean_ce, peft_grads, randomize_adapters
from test_moe import FAMILIES, TARGETS

import slowllama
from slowllama.engine.trip import MicroBatch
from slowllama.weights.formats.export import export

COEF = 0.5  # larger than the configs' 0.001, so that a wrong term would show at 1e-5
SHARES = (0.6, 0.4)


@pytest.fixture(scope='module', params=['qwen3_moe-top2-norm', 'mixtral-top2'])
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf_model = make_hf_model(folder / 'hf', seed=13, router_aux_loss_coef=COEF, **FAMILIES[request.param])
    slowllama.prepare(folder / 'hf', folder / 'prepared', dtype='fp32')
    return request.param, folder / 'prepared', hf_model


def micro_batches(vocab):
    """Two micro-batches; the second pads its first row after 8 tokens (mask 0, no targets there)."""
    first, second = random_batch(vocab, seed=1), random_batch(vocab, seed=2)
    mask = torch.ones_like(second[0])
    mask[0, 8:] = 0
    second[1][0, 7:] = -100
    return [MicroBatch(*first), MicroBatch(*second, mask=mask)]


def peft_reference(model_dir, hf_model, ours, folder):
    from peft import PeftModel
    ours.save_adapter(folder / 'adapter')
    export(model_dir, folder / 'peft', 'peft', adapter=folder / 'adapter')
    return PeftModel.from_pretrained(copy.deepcopy(hf_model), folder / 'peft', is_trainable=True).train()


def reference_step(reference, batches, coef):
    """transformers' loss per micro-batch (cross-entropy + coef x aux_loss), share x its gradient."""
    losses = []
    for batch, share in zip(batches, SHARES):
        out = reference(input_ids=batch.tokens, attention_mask=batch.mask, output_router_logits=True)
        loss = masked_mean_ce(out.logits, batch.targets) + coef * out.aux_loss
        (share * loss).backward()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize('keep, trip', [('all', 1), ('none', 1), ('all', 2), ('none', 2)])
def test_aux_loss_and_grads_equal_transformers_peft(family, keep, trip, tmp_path):
    name, model_dir, hf_model = family
    lora = slowllama.LoraConfig(rank=4, alpha=8.0, targets=TARGETS)
    ours = slowllama.load(model_dir, lora=lora, keep_activations=keep, micro_batches_per_trip=trip, grad_accum=2)
    assert ours.parts.router_aux == COEF  # from the model's config
    randomize_adapters(ours.adapters, seed=3)
    reference = peft_reference(model_dir, hf_model, ours, tmp_path)
    batches = micro_batches(ours.cfg.vocab_size)

    losses = ours.accumulate(batches, SHARES)
    ref_losses = reference_step(reference, batches, COEF)

    grads = {k: p.grad for k, p in ours.trainable_parameters().items()}
    ref_grads = peft_grads(reference)
    assert set(grads) == set(ref_grads) and any('.mlp.gate.' in k for k in grads)
    worst = max(((grads[k] - ref_grads[k]).abs().max() / ref_grads[k].abs().max()).item() for k in grads)
    loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
    print(f'\n{name} keep={keep} trip={trip}: loss diff {loss_diff:.2e}, max relative grad diff {worst:.2e}')
    assert loss_diff < 1e-5 and worst < 1e-5

    # the term matters: without it, the losses and the router's gradients are another's
    off = slowllama.load(model_dir, lora=lora, keep_activations=keep, micro_batches_per_trip=trip,
                         router_aux_loss_coef=0)
    randomize_adapters(off.adapters, seed=3)
    off_losses = off.accumulate(batches, SHARES)
    assert min(a - b for a, b in zip(losses, off_losses)) > 0.1 * COEF  # the aux loss is >= top_k / ... > 0
    router = [k for k in grads if '.mlp.gate.' in k]
    off_grads = off.trainable_parameters()
    assert max(max_rel(grads[k], off_grads[k].grad) for k in router) > 1e-3


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_aux_loss_is_off_without_the_router_and_when_told(family):
    _, model_dir, _ = family
    assert slowllama.load(model_dir, lora=slowllama.LoraConfig(targets=('q', 'experts'))).parts.router_aux == 0
    told = slowllama.load(model_dir, lora=slowllama.LoraConfig(targets=('q', 'router')), router_aux_loss_coef=0.02)
    assert told.parts.router_aux == 0.02
    with pytest.raises(slowllama.SlowLlamaError, match='router_aux_loss_coef must be a number >= 0'):
        slowllama.load(model_dir, router_aux_loss_coef=-1)


def test_collate_marks_padding_for_the_trainer():
    from slowllama.data.dataset import collate
    from slowllama.data.examples import Example
    from slowllama.training.trainer import default_step
    batch = collate([Example([1, 2, 3], [2, 3, -100]), Example([4, 5], [5, -100])], pad_id=0)
    assert batch.mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert torch.equal(default_step(None, batch).mask, batch.mask)
    assert collate([Example([1, 2], [2, -100])], pad_id=0).mask is None


def test_dpo_pairs_mark_their_padding_for_the_trainer():
    """A DPO pair batch's padding stays out of the load-balancing loss too (trl passes transformers
    the attention mask): the micro-batch carries it in flat()'s row order."""
    from slowllama.data.preference import Pair, collate_pairs
    from slowllama.training.dpo import train_step
    batch = collate_pairs([Pair([1, 2, 3], [1, 4], 1, 1), Pair([5, 6], [5, 7, 8], 1, 1)], pad_id=0)
    micro = train_step(None, batch, beta=0.1)
    assert micro.mask.tolist() == [[1, 1], [1, 0], [1, 0], [1, 1]]  # the last token of each is no input
    assert torch.equal(micro.tokens, batch.flat()[0]) and (micro.tokens[micro.mask == 0] == 0).all()
    assert collate_pairs([Pair([1, 2], [1, 3], 1, 1)], pad_id=0).mask is None


def test_the_flag_reaches_the_engine_options():
    from slowllama import cli
    from slowllama.recipes.options import resolve
    from slowllama.recipes.run_setup import engine_options
    parse = lambda *flags: resolve(cli.build_parser().parse_args(['finetune', '--model', 'm', *flags]))
    assert engine_options(parse('--router-aux-loss-coef', '0')).router_aux_loss_coef == 0.0
    assert engine_options(parse()).router_aux_loss_coef is None
