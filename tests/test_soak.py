"""Long runs: 300 steps of finetuning with evaluation, sample completions and checkpoints every few
steps hold resident memory, open files and threads flat, and the mapped model files stay out of the
resident set; 20 alternating train / generate calls through the Python API do the same."""
import gc
import io
import os
import threading

import pytest
import torch

import slowllama
from fuzz import finetune_argv

MIB = 1 << 20


def measure(model_dir=None):
    """Resident memory, open fds, threads (Python's and the OS's), and the resident bytes of the
    model's mapped files."""
    gc.collect()
    with open('/proc/self/statm') as f:
        rss = int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    with open('/proc/self/status') as f:
        os_threads = next(int(line.split()[1]) for line in f if line.startswith('Threads:'))
    return {'rss': rss, 'fds': len(os.listdir('/proc/self/fd')), 'threads': threading.active_count(),
            'os_threads': os_threads, 'mapped_model': mapped_rss(model_dir) if model_dir else 0}


def mapped_rss(model_dir):
    """Resident bytes of this process's mappings of files under model_dir (/proc/self/smaps)."""
    total, inside = 0, False
    with open('/proc/self/smaps') as f:
        for line in f:
            fields = line.split()
            if '-' in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5].startswith(str(model_dir))
            elif inside and fields[0] == 'Rss:':
                total += int(fields[1]) * 1024
    return total


def assert_flat(early, late, what):
    grown = late['rss'] - early['rss']
    assert grown <= max(0.05 * early['rss'], 20 * MIB), f'{what}: resident memory grew by {grown / MIB:.1f} MiB'
    assert late['fds'] <= early['fds'], f'{what}: open files {early["fds"]} -> {late["fds"]}'
    assert late['threads'] <= early['threads'] and late['os_threads'] <= early['os_threads'], (early, late)
    assert late['mapped_model'] <= max(early['mapped_model'], 1 * MIB), (early, late)


def figures(label, early, late):
    return (f'{label}: rss {early["rss"] / MIB:.1f} -> {late["rss"] / MIB:.1f} MiB, fds {early["fds"]} -> '
            f'{late["fds"]}, threads {early["os_threads"]} -> {late["os_threads"]}, mapped model '
            f'{early["mapped_model"] / 1024:.0f} -> {late["mapped_model"] / 1024:.0f} KiB')


@pytest.mark.slow
def test_300_steps_keep_memory_files_and_threads_flat(tiny_text_model, tmp_path):
    from slowllama.cli import build_parser
    from slowllama.recipes.options import resolve
    from slowllama.recipes.run_setup import build_sft as build
    model_dir, _, _ = tiny_text_model
    data = tmp_path / 'story.txt'
    data.write_text('at dusk the keeper of glimmerfen lights the violet lamp; the boats follow it home. ' * 40)
    argv = finetune_argv(str(model_dir), str(data), str(tmp_path / 'run'), 300, '--save-every', '10',
                         '--eval-every', '10', '--val-fraction', '0.1', '--prompt', 'the keeper',
                         '--max-new-tokens', '4', '--keep-checkpoints', '2', '--offload', 'disk',
                         '--seq-len', '32', '--lora-rank', '4', '--targets', 'q,v,down')
    args = build_parser().parse_args(argv)
    stream = io.StringIO()
    _, _, trainer = build(resolve(args), stream=stream)
    sample, seen = trainer.sample_fn, {}

    def sample_and_measure(model):  # called at every evaluation, after that step's checkpoint
        text = sample(model)
        if trainer.step in (50, 300):
            seen[trainer.step] = measure(model_dir)
        return text
    trainer.sample_fn = sample_and_measure
    summary = trainer.run()
    assert summary['step'] == 300 and sorted(seen) == [50, 300]
    assert len(os.listdir(tmp_path / 'run' / 'checkpoints')) == 2
    assert summary['last_loss'] < summary['first_loss']
    print(figures('300 steps', seen[50], seen[300]))
    assert_flat(seen[50], seen[300], '300 steps')


@pytest.mark.slow
def test_alternating_train_and_generate_through_the_api(tiny_text_model, tmp_path):
    from conftest import random_batch
    model_dir, _, _ = tiny_text_model
    model = slowllama.load(model_dir, lora=slowllama.LoraConfig(rank=4, targets=('q', 'v', 'down')), offload='disk')
    optimizer = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-2)
    tokens, targets = random_batch(128, batch=2, seq=24, seed=1)
    prompt = tokens[:1, :6]
    losses, seen = [], {}
    for call in range(20):
        losses.append(model.backward(tokens, targets))
        optimizer.step()
        optimizer.zero_grad()
        out = model.generate(prompt, max_new_tokens=6)
        # greedy: the first new token is the argmax of the logits the model gives now
        assert out[0, 6] == model.logits(prompt)[0, -1].argmax()
        if call in (4, 19):
            model.save_adapter(tmp_path / 'adapter')
            seen[call] = measure(model_dir)
    assert losses[-1] < losses[0]
    print(figures('20 train/generate calls', seen[4], seen[19]))
    assert_flat(seen[4], seen[19], '20 train/generate calls')
