"""The training loop: schedule, accumulation, exact resume with dropout on, the run folder."""
import json
import math
import os

import pytest
import torch
from conftest import random_batch
from reference import randomize_adapters

import slowllama
from slowllama.data.dataset import Batch, load_data
from slowllama.engine.trip import MicroBatch
from slowllama.tokenizer.tokenizer import load_tokenizer
from slowllama.training.trainer import TrainConfig, Trainer, list_checkpoints, lr_at

LORA = slowllama.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=('q', 'v', 'down'))


def load_model(model_dir, seed=0, dropout=0.1):
    """The tiny model with LoRA; `dropout` both in the blocks and on the LoRA inputs."""
    torch.manual_seed(seed)
    lora = slowllama.LoraConfig(LORA.rank, LORA.alpha, dropout, LORA.targets)
    return slowllama.load(model_dir, lora=lora, dropout=dropout)


class FixedBatches:
    """Micro-batch i is rows [i * size, (i + 1) * size) of one fixed batch, cycling."""

    def __init__(self, batch, size):
        self.batch_all, self.size = batch, size

    def batch(self, index):
        rows = self.batch_all.tokens.shape[0]
        start = (index * self.size) % rows
        return Batch(self.batch_all.tokens[start:start + self.size], self.batch_all.targets[start:start + self.size])


def text_data(model_dir, tmp_path, seq_len=16, batch_size=2, val_fraction=0.2):
    path = tmp_path / 'story.txt'
    path.write_text('odalys brenn keeps the violet lamp burning every night. ships at sea look for the light. ' * 6)
    return load_data(path, load_tokenizer(model_dir), seq_len, batch_size, seed=3, val_fraction=val_fraction)


def test_schedule_warmup_then_cosine_or_constant():
    cfg = TrainConfig(iters=10, lr=1.0, warmup=4, schedule='cosine', min_lr_ratio=0.1)
    lrs = [lr_at(cfg, step) for step in range(1, 11)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and 0.1 < lrs[-1] < 0.2  # the last step still learns
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 5 / 6)))
    longer = TrainConfig(iters=12, lr=1.0, warmup=4, min_lr_ratio=0.1)
    assert lr_at(longer, 9) == pytest.approx(0.55)  # halfway through the cosine: the mean of lr and its floor
    constant = TrainConfig(iters=10, lr=1.0, warmup=2, schedule='constant')
    assert [lr_at(constant, s) for s in range(1, 11)] == [0.5] + [1.0] * 9


def test_bad_train_settings_name_the_setting():
    with pytest.raises(slowllama.SlowLlamaError, match='^schedule: unknown schedule'):
        TrainConfig(schedule='linear')
    with pytest.raises(slowllama.SlowLlamaError, match='^grad_accum must be at least 1'):
        TrainConfig(grad_accum=0)


def test_grad_accum_2x2_equals_batch_4(tiny_text_model, tmp_path):
    """Two micro-batches of 2 give the update of one batch of 4, even with unequal target counts."""
    model_dir, _, _ = tiny_text_model
    tokens, targets = random_batch(128, batch=4, seq=10, seed=4)
    targets[2, :6] = -100  # the second micro-batch counts fewer targets than the first
    whole = Batch(tokens, targets)
    results = []
    for size, accum in ((4, 1), (2, 2)):
        model = load_model(model_dir, dropout=0.0)
        randomize_adapters(model.adapters)  # every gradient clearly non-zero (B = 0 zeroes those of A)
        cfg = TrainConfig(iters=1, grad_accum=accum, lr=1e-2, grad_clip=0.0)
        trainer = Trainer(model, cfg, tmp_path / f'run_{accum}', FixedBatches(whole, size))
        summary = trainer.run()
        results.append((summary['last_loss'], {k: v.detach().clone() for k, v in model.trainable_parameters().items()}))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    start = load_model(model_dir, dropout=0.0)
    randomize_adapters(start.adapters)
    before = start.trainable_parameters()
    moved = max((params_a[k] - before[k]).abs().max().item() for k in params_a)
    assert moved > 5e-3  # AdamW's first step moves each weight by about lr
    assert max((params_a[k] - params_b[k]).abs().max().item() for k in params_a) < 1e-6


@pytest.mark.parametrize('grad_clip', [1.0, 0.0])
def test_the_step_is_adamw_on_the_clipped_gradient(tiny_text_model, tmp_path, grad_clip):
    """One optimizer step on gradients of global norm 5: torch's AdamW (its lr, betas, eps and
    decoupled weight decay) applied to the gradient scaled to norm grad_clip (0: not clipped); the
    row logs the norm before clipping. eps is large, so that the step depends on the gradient's size."""
    model_dir, _, _ = tiny_text_model
    model = load_model(model_dir, dropout=0.0)
    randomize_adapters(model.adapters)
    params = model.trainable_parameters()
    g = torch.Generator().manual_seed(5)
    grads = {name: torch.randn(p.shape, generator=g) for name, p in params.items()}
    norm = torch.linalg.vector_norm(torch.cat([x.flatten() for x in grads.values()]))
    grads = {name: x * (5.0 / norm) for name, x in grads.items()}  # global norm 5

    def accumulate(batches, shares):  # the step's gradient, whatever its micro-batches
        for name, p in params.items():
            p.grad = grads[name].clone()
        return [1.0] * len(batches)
    model.accumulate = accumulate
    settings = dict(lr=1e-2, betas=(0.8, 0.9), eps=0.5, weight_decay=0.3)
    before = {name: p.detach().clone() for name, p in params.items()}
    cfg = TrainConfig(iters=1, schedule='constant', grad_clip=grad_clip, **settings)
    Trainer(model, cfg, tmp_path / 'run', FixedBatches(Batch(*random_batch(128)), 2)).run()

    expected = {name: torch.nn.Parameter(x.clone()) for name, x in before.items()}
    scale = min(1.0, grad_clip / 5.0) if grad_clip else 1.0
    for name, p in expected.items():
        p.grad = grads[name] * scale
    torch.optim.AdamW(expected.values(), **settings).step()
    worst = max((params[k].detach() - expected[k].detach()).abs().max().item() for k in params)
    moved = min((params[k].detach() - before[k]).abs().max().item() for k in params)
    assert worst < 1e-7 and moved > 1e-4, (worst, moved)
    assert metrics(tmp_path / 'run')[0]['grad_norm'] == pytest.approx(5.0, rel=1e-5)


def run_training(model_dir, run_dir, data, resume=False, stop_after=None, **overrides):
    settings = dict(iters=6, lr=5e-3, warmup=2, save_every=2, eval_every=3, seed=11)
    settings.update(overrides)
    model = load_model(model_dir, seed=1)
    calls = []

    def step(m, batch):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt  # a crash after `stop_after` micro-batches
        calls.append(1)
        return MicroBatch(batch.tokens, batch.targets)

    trainer = Trainer(model, TrainConfig(**settings), run_dir, data.train, data.val, step_fn=step,
                      sample_fn=lambda m: 'sample')
    summary = trainer.run(resume=resume)
    return summary, model


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]


def test_resume_equals_uninterrupted_run_with_dropout(tiny_text_model, tmp_path):
    model_dir, _, _ = tiny_text_model
    data = text_data(model_dir, tmp_path)
    _, straight = run_training(model_dir, tmp_path / 'straight', data)
    with pytest.raises(KeyboardInterrupt):
        run_training(model_dir, tmp_path / 'resumed', data, stop_after=5)  # dies in step 6, after step_000004
    assert [s for s, _ in list_checkpoints(tmp_path / 'resumed')] == [2, 4]
    with open(tmp_path / 'resumed' / 'metrics.jsonl', 'a') as f:
        f.write('{"step": 6, "lo')  # a line torn by the crash
    (tmp_path / 'resumed' / 'checkpoints' / '.step_000006.abc').mkdir()  # a checkpoint never completed
    _, resumed = run_training(model_dir, tmp_path / 'resumed', data, resume=True)

    want, got = metrics(tmp_path / 'straight'), metrics(tmp_path / 'resumed')
    assert [r['step'] for r in got] == list(range(1, 7))
    assert [r['loss'] for r in got] == [r['loss'] for r in want]
    assert [r.get('eval_loss') for r in got] == [r.get('eval_loss') for r in want]
    assert want[0]['loss'] != want[1]['loss']
    a, b = straight.trainable_parameters(), resumed.trainable_parameters()
    assert all(torch.equal(a[k], b[k]) for k in a)
    final_a = slowllama.load(model_dir, adapter=tmp_path / 'straight' / 'adapter').trainable_parameters()
    final_b = slowllama.load(model_dir, adapter=tmp_path / 'resumed' / 'adapter').trainable_parameters()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert not (tmp_path / 'resumed' / 'checkpoints' / '.step_000006.abc').exists()
    log = (tmp_path / 'resumed' / 'train.log').read_text()
    assert 'resumed from' in log and log.count('step 6/6') == 1


def test_dropout_makes_runs_depend_on_the_seed(tiny_text_model, tmp_path):
    model_dir, _, _ = tiny_text_model
    data = text_data(model_dir, tmp_path, val_fraction=0.0)
    run_training(model_dir, tmp_path / 'a', data, iters=2, save_every=0)
    run_training(model_dir, tmp_path / 'b', data, iters=2, save_every=0, seed=12)
    assert metrics(tmp_path / 'a')[0]['loss'] != metrics(tmp_path / 'b')[0]['loss']


def test_run_folder_layout(tiny_text_model, tmp_path):
    model_dir, _, _ = tiny_text_model
    data = text_data(model_dir, tmp_path)
    run_dir = tmp_path / 'run'
    summary, _ = run_training(model_dir, run_dir, data, iters=5, save_every=2, keep_checkpoints=2)
    assert summary['step'] == 5 and summary['eval_loss'] is not None
    assert [s for s, _ in list_checkpoints(run_dir)] == [4, 5]  # 2 pruned, the final one always saved
    checkpoint = run_dir / 'checkpoints' / 'step_000005'
    assert sorted(os.listdir(checkpoint)) == ['adapter_config.json', 'adapter_model.safetensors', 'optimizer.json',
                                              'optimizer.safetensors', 'state.json', 'trainable.safetensors']
    state = json.loads((checkpoint / 'state.json').read_text())
    assert state['step'] == 5 and state['data_position'] == 5 and 'cpu' in state['rng']
    assert sorted(os.listdir(run_dir / 'adapter')) == ['adapter_config.json', 'adapter_model.safetensors']
    rows = metrics(run_dir)
    assert [r['step'] for r in rows] == [1, 2, 3, 4, 5]
    assert {'step', 'loss', 'tokens_per_s', 'lr', 'grad_norm', 'tokens'} <= set(rows[0])
    assert 'eval_loss' in rows[2] and 'eval_loss' in rows[4] and 'eval_loss' not in rows[1]
    leftovers = [n for _, _, files in os.walk(run_dir) for n in files if n.endswith(('.tmp', '.pt', '.bin'))]
    assert leftovers == [] and not any(n.startswith('.') and n != '.lock' for n in os.listdir(run_dir))
    with pytest.raises(slowllama.SlowLlamaError, match='add `resume` to continue it'):
        run_training(model_dir, run_dir, data)  # an existing run is never overwritten


def test_eval_loss_equals_the_training_loss_without_dropout(tiny_text_model):
    model_dir, _, _ = tiny_text_model
    no_dropout = load_model(model_dir, dropout=0.0)
    randomize_adapters(no_dropout.adapters)
    tokens, targets = random_batch(128, seed=9)
    assert no_dropout.loss(tokens, targets) == pytest.approx(no_dropout.backward(tokens, targets), rel=1e-6)


def test_a_tied_score_at_a_lower_eval_loss_moves_best_but_not_the_patience(tiny_text_model, tmp_path):
    """A validation score that cannot get better (exact match already 1.0) ties at every evaluation:
    best/ follows the lowest eval loss among the ties, and --patience still counts them as no better."""
    model_dir, _, _ = tiny_text_model
    data = text_data(model_dir, tmp_path)
    model = load_model(model_dir, seed=1)
    cfg = TrainConfig(iters=8, lr=5e-3, warmup=1, eval_every=2, seed=11, patience=3)
    trainer = Trainer(model, cfg, tmp_path / 'run', data.train, data.val,
                      step_fn=lambda m, b: MicroBatch(b.tokens, b.targets), score_fn=lambda m: {'score': 1.0})
    trainer.run()
    evals = [r for r in metrics(tmp_path / 'run') if 'eval_loss' in r]
    assert [r['step'] for r in evals] == [2, 4, 6, 8]
    losses = [r['eval_loss'] for r in evals]
    assert losses[1] < losses[0] and losses[2] < losses[1]  # the lr makes the loss fall
    log = (tmp_path / 'run' / 'train.log').read_text()
    assert 'no better score in 3 evaluations' in log  # stopped at step 8: the ties were no better
    assert trainer.best['step'] == evals[losses.index(min(losses))]['step'] > 2
    assert trainer.best['eval_loss'] == min(losses)
    best = slowllama.load(model_dir, adapter=tmp_path / 'run' / 'best').trainable_parameters()
    final = slowllama.load(model_dir, adapter=tmp_path / 'run' / 'adapter').trainable_parameters()
    assert (trainer.best['step'] == 8) == all(torch.equal(best[k], final[k]) for k in best)
