"""Data parallel finetuning under torchrun: N gloo processes x batch B end where one process with
batch N x B ends; only rank 0 writes; --resume works the same."""
import json
import os
import subprocess
import sys

import pytest
import torch

from slowllama.files import SafetensorsFile

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
    model_dir, _, _ = tiny_text_model
    finetune(model_dir, story, tmp_path / 'single', batch=4)
    result = finetune(model_dir, story, tmp_path / 'pair', batch=2, processes=2)
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
    finetune(model_dir, story, tmp_path / 'whole', batch=2, processes=2, extra=constant)
    finetune(model_dir, story, tmp_path / 'split', batch=2, processes=2, iters=2, extra=constant)
    finetune(model_dir, story, tmp_path / 'split', batch=2, processes=2, extra=constant + ['--resume'])
    whole, split = adapter(tmp_path / 'whole'), adapter(tmp_path / 'split')
    assert all(torch.equal(whole[k], split[k]) for k in whole)
