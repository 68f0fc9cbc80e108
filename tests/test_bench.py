"""The benchmark's worker on this cpu: memory read through psutil (no /proc, as on macOS), the
device synchronized before every clock read, and models in fp16 as well."""
import builtins

import pytest
import torch

import slowllama.recipes.bench as bench


def no_proc(monkeypatch):
    real_open = builtins.open

    def opened(path, *args, **kwargs):
        if str(path).startswith('/proc/self/'):
            raise FileNotFoundError(path)  # a Mac has no /proc (psutil reads it on Linux, by pid)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(builtins, 'open', opened)


def test_the_worker_runs_without_proc_and_synchronizes_every_step(tmp_path, monkeypatch):
    hf_dir, prepared = bench.make_models('tiny', str(tmp_path), 'fp16')
    config = slowllama_config(prepared)
    assert config['dtype'] == 'fp16'
    no_proc(monkeypatch)
    synchronized = []
    monkeypatch.setattr(bench, 'synchronize', lambda device: synchronized.append(device.type))
    spec = dict(device='cpu', dtype='fp16', batch=1, seq=16, steps=2, warmup=1, rank=2, targets=['q', 'v'],
                vocab=config['config']['vocab_size'], model_dir=prepared, hf_dir=hf_dir, system='slowllama',
                mode='disk')
    result = bench.run_worker(spec)
    assert result['step_s'] > 0 and result['tokens_per_s'] == pytest.approx(16 / result['step_s'])
    assert result['host_gain_bytes'] >= 0 and isinstance(result['host_gain_bytes'], int)
    assert synchronized.count('cpu') >= 3  # after each of the three steps (and before the block times)
    assert result['block_s'] > 0 and result['copy_s'] > 0


def test_peak_memory_sees_an_allocation():
    from slowllama.weights.memory import peak_rss, process_rss, reset_peak_rss
    reset_peak_rss()
    before = peak_rss()
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    assert process_rss() > 0 and peak_rss() - before > 48 << 20
    del x


def test_a_worker_does_not_inherit_its_parents_peak():
    """bench's driver builds the random model (its peak: the whole model) and then starts the
    workers: their peak, after the reset, is theirs (getrusage's maxrss carried the driver's over)."""
    import subprocess
    import sys
    big = torch.ones(512 << 20, dtype=torch.uint8)  # this process's peak now holds 512 MiB
    del big
    probe = ('from slowllama.weights.memory import peak_rss, process_rss, reset_peak_rss; reset_peak_rss(); '
             'print(peak_rss() - process_rss())')
    out = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 64 << 20


def test_an_unknown_dtype_is_one_clear_line(tmp_path):
    from slowllama.errors import SlowLlamaError
    with pytest.raises(SlowLlamaError, match='--dtype'):
        bench.bench(device='cpu', shape='tiny', dtype='fp8', work=str(tmp_path))


def slowllama_config(prepared):
    import json
    import os
    with open(os.path.join(prepared, 'manifest.json')) as f:
        return json.load(f)
