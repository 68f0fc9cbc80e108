"""Data parallel finetuning under torchrun: N gloo processes x batch B end where one process with
batch N x B ends; only rank 0 writes; --resume works the same."""
import json
import os
import subprocess
import sys

import pytest
import torch

from slowllama.weights.files import SafetensorsFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finetune(model_dir, data, out, batch, processes=1, iters=4, extra=()):
    args = ['--model', model_dir, '--data', data, '--out', out, '--device', 'cpu', '--iters', iters,
            '--batch-size', batch, '--seq-len', 16, '--lr', 1e-2, '--targets', 'q,v,down', '--seed', 5,
            '--save-every', 2, '--grad-clip', 0, *extra]
    script = os.path.join(ROOT, 'scripts', 'finetune.py')
    if processes == 1:
        command = [sys.executable, script]
    else:
        command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
                   str(processes), script]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    result = subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def adapter(run_dir):
    weights = SafetensorsFile(os.path.join(run_dir, 'adapter', 'adapter_model.safetensors'))
    return {name: weights.tensor(name).clone() for name in weights.names()}


def max_relative_difference(a, b):
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b)


@pytest.fixture
def story(tmp_path):
    path = tmp_path / 'story.txt'
    path.write_text('the keeper of glimmerfen lights a violet lamp at dusk and the boats come home. ' * 12)
    return path


@pytest.mark.slow
def test_two_processes_of_batch_2_equal_one_of_batch_4(tiny_text_model, story, tmp_path):
    """Each step: two micro-batches travelling through the blocks together (engine/trip.py)."""
    model_dir, _, _ = tiny_text_model
    finetune(model_dir, story, tmp_path / 'single', batch=4, extra=['--grad-accum', 2])
    result = finetune(model_dir, story, tmp_path / 'pair', batch=2, processes=2, extra=['--grad-accum', 2])
    single, pair = adapter(tmp_path / 'single'), adapter(tmp_path / 'pair')
    assert set(single) == set(pair)
    difference = max_relative_difference(pair, single)
    print(f'\n2 x batch 2 vs 1 x batch 4: max relative adapter difference {difference:.2e}')
    assert difference < 1e-4
    assert max_relative_difference(pair, adapter_at_start(model_dir, tmp_path)) > 1e-2  # training moved it
    # one writer: one metrics row per step, one "run folder" line at the start and the end
    rows = (tmp_path / 'pair' / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(r)['step'] for r in rows] == [1, 2, 3, 4]
    assert result.stdout.count('run folder:') == 2
    state = json.loads((tmp_path / 'pair' / 'checkpoints' / 'step_000004' / 'state.json').read_text())
    assert len(state['rng_per_process']) == 2


def adapter_at_start(model_dir, tmp_path):
    import slowllama
    torch.manual_seed(5)
    model = slowllama.load(model_dir, lora=slowllama.LoraConfig(8, 16.0, 0.0, 'q,v,down'))
    model.save_adapter(tmp_path / 'start' / 'adapter')
    return adapter(tmp_path / 'start')


@pytest.mark.slow
def test_distributed_resume_ends_on_the_same_adapter(tiny_text_model, story, tmp_path):
    model_dir, _, _ = tiny_text_model
    constant = ['--schedule', 'constant', '--dropout', '0.1']  # the schedule must not depend on --iters here
    # the whole run recomputes every block in its backward; the split one keeps their activations
    finetune(model_dir, story, tmp_path / 'whole', batch=2, processes=2,
             extra=constant + ['--keep-activations', 'none'])
    finetune(model_dir, story, tmp_path / 'split', batch=2, processes=2, iters=2, extra=constant)
    finetune(model_dir, story, tmp_path / 'split', batch=2, processes=2, extra=constant + ['--resume'])
    assert 'every block keeps its activations' in (tmp_path / 'split' / 'train.log').read_text()
    whole, split = adapter(tmp_path / 'whole'), adapter(tmp_path / 'split')
    assert all(torch.equal(whole[k], split[k]) for k in whole)


# --- evaluation under torchrun: every process its share, none left waiting --------------------

SLOW_S, TIMEOUT_S = 2.5, 6.0  # four validation batches and a sample at SLOW_S: 12.5 s on one process


class RandomRows:
    def __init__(self, vocab, rows, seed):
        self.vocab, self.rows, self.seed = vocab, rows, seed

    def batch(self, index):
        from conftest import random_batch
        from slowllama.data.dataset import Batch
        return Batch(*random_batch(self.vocab, batch=self.rows, seq=12, seed=self.seed + index))


def evaluate_in_process(rank, world, model_dir, run_dir, port, out):
    """One of `world` gloo processes whose collectives time out after TIMEOUT_S: two steps, each
    followed by an evaluation slower than that timeout."""
    import time
    from datetime import timedelta
    import torch.distributed as dist
    import slowllama
    from slowllama.training.distributed import Group
    from slowllama.training.trainer import Trainer, TrainConfig, default_eval
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same LoRA initialisation in every process, as finetune's --seed gives
    model = slowllama.load(model_dir, lora=slowllama.LoraConfig(rank=4, targets=('q', 'v')))
    val = [RandomRows(model.cfg.vocab_size, 2, seed=100).batch(i) for i in range(4)]

    def slow_eval(model, batch):
        time.sleep(SLOW_S)
        return default_eval(model, batch)

    def slow_sample(model):
        time.sleep(SLOW_S)
        return 'a sample'
    trainer = Trainer(model, TrainConfig(iters=2, eval_every=1, lr=1e-3, grad_clip=0), run_dir,
                      RandomRows(model.cfg.vocab_size, 2 * world, seed=0), val=val, eval_fn=slow_eval,
                      sample_fn=slow_sample, group=Group(rank, world, rank), stream=open(os.devnull, 'w'))
    summary = trainer.run()
    counts = [b.n_targets for b in val]
    expected = sum(c * model.loss(b.tokens, b.targets) for c, b in zip(counts, val)) / sum(counts)
    with open(f'{out}.{rank}', 'w') as f:
        json.dump({'eval_loss': summary['eval_loss'], 'expected': expected}, f)
    dist.destroy_process_group()


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_process_evaluates_its_share_so_a_slow_evaluation_times_nothing_out(tiny_text_model, tmp_path):
    """Evaluating on rank 0 alone would leave rank 1 in the next step's all-reduce for over 12 s,
    twice the collectives' timeout; each evaluating half the batches (and its sample) it waits
    for nothing, and the all-reduced loss is the mean over every batch."""
    import torch.multiprocessing as mp
    model_dir, _, _ = tiny_text_model
    out = tmp_path / 'result'
    mp.spawn(evaluate_in_process, args=(2, str(model_dir), str(tmp_path / 'run'), free_port(), str(out)),
             nprocs=2, join=True)
    results = [json.loads((tmp_path / f'result.{rank}').read_text()) for rank in (0, 1)]
    for result in results:
        assert result['eval_loss'] == pytest.approx(result['expected'], rel=1e-6)
    assert results[0]['eval_loss'] == results[1]['eval_loss']


def test_the_collective_timeout_fits_a_disk_tier_evaluation():
    from datetime import timedelta
    from slowllama.training.distributed import collective_timeout
    assert collective_timeout(10 ** 9) == timedelta(minutes=30)  # small models: the floor
    seventy_b = 140 * 10 ** 9
    timeout = collective_timeout(seventy_b, grad_accum=1, eval_batches=16, sample_tokens=32)
    assert timeout >= timedelta(seconds=49 * seventy_b / 100e6)  # 49 passes over the model from a hard disk
    assert timeout > timedelta(minutes=10)  # nccl's default
