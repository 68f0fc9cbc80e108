"""The benchmark on this cpu: each configuration measured in its own process with the planner's
prediction beside it; the peer (transformers + peft) trains what we train, on the same model, batch
and LoRA; memory read through psutil (no /proc, as on macOS), the device synchronized before every
clock read, and models in fp16 as well."""
import builtins
import subprocess
import sys

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
    assert result['host_gain_bytes'] >= 0 and isinstance(result['host_gain_bytes'], int)
    assert synchronized.count('cpu') >= 3  # after each of the three steps (and before the block times)
    assert result['block_s'] > 0 and result['copy_s'] > 0


def test_peak_memory_sees_an_allocation():
    from slowllama.weights.host_memory import peak_rss, process_rss, reset_peak_rss
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
    probe = ('from slowllama.weights.host_memory import peak_rss, process_rss, reset_peak_rss; reset_peak_rss(); '
             'print(peak_rss() - process_rss())')
    out = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 64 << 20


def test_an_unknown_dtype_is_one_clear_line(tmp_path):
    from slowllama.errors import SlowLlamaError
    with pytest.raises(SlowLlamaError, match='^dtype: unknown dtype'):
        bench.bench(device='cpu', shape='tiny', dtype='fp8', work=str(tmp_path))


def slowllama_config(prepared):
    import json
    import os
    with open(os.path.join(prepared, 'manifest.json')) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def tiny_bench_models(tmp_path_factory):
    work = str(tmp_path_factory.mktemp('bench'))
    return work, bench.make_models('tiny', work, 'fp32')


def test_the_peer_trains_what_we_train(tiny_bench_models):
    """The peer's configuration (transformers + peft on the HF twin) and ours on the same tokens: the
    same trainable parameters, the same loss with a fresh LoRA (which changes nothing), and the same
    loss again once every LoRA matrix is set to one constant (the LoRA sits on the same projections
    with the same alpha / r)."""
    _, (hf_dir, prepared) = tiny_bench_models
    spec = dict(batch=2, seq=16, rank=4, targets=['q', 'v', 'down'], model_dir=prepared, hf_dir=hf_dir, mode='ram',
                dtype='fp32')
    torch.manual_seed(0)
    tokens = torch.randint(0, slowllama_config(prepared)['config']['vocab_size'], (2, 16))
    targets = torch.cat([tokens[:, 1:], torch.full((2, 1), -100)], dim=1)
    losses, shapes = {}, {}
    for system in ('slowllama', 'hf'):
        step, params = (bench._slowllama_step if system == 'slowllama' else bench._hf_step)(
            dict(spec, system=system), torch.device('cpu'), torch.float32, tokens, targets)
        fresh = step()
        with torch.no_grad():
            for p in params:
                p.fill_(0.05)
        losses[system], shapes[system] = (fresh, step()), sorted(tuple(p.shape) for p in params)
    assert losses['slowllama'] == pytest.approx(losses['hf'], abs=1e-5)
    assert abs(losses['hf'][1] - losses['hf'][0]) > 1e-3  # the constant LoRA changes the loss
    assert shapes['slowllama'] == shapes['hf'] and len(shapes['hf']) == 2 * 3 * 4  # A and B, 3 targets, 4 layers


@pytest.mark.slow
def test_each_configuration_runs_in_its_own_process_beside_its_prediction(tiny_bench_models, monkeypatch, capsys):
    """bench(): every configuration a worker process of its own (the driver measures nothing itself),
    and each slowllama row carries the planner's prediction for its mode beside what was measured."""
    import json
    import subprocess

    from slowllama.engine.plan import predict
    from slowllama.recipes.shapes import shape_config
    work, _ = tiny_bench_models
    workers, real_run = [], subprocess.run

    def run(command, *args, **kwargs):
        if '--worker' in command:
            workers.append(json.loads(command[command.index('--worker') + 1]))
        return real_run(command, *args, **kwargs)
    monkeypatch.setattr(bench.subprocess, 'run', run)
    monkeypatch.setattr(bench, 'run_worker', lambda spec: pytest.fail('a configuration was measured in the driver'))
    report = bench.bench(device='cpu', shape='tiny', batch=2, seq=16, steps=1, warmup=0, rank=4, modes=('ram',),
                         peers=('hf',), dtype='fp32', work=work, json_out=f'{work}/bench.json')
    assert [(w['system'], w['mode']) for w in workers] == [('slowllama', 'ram'), ('hf', '-')]
    assert workers[0]['model_dir'] != workers[1]['hf_dir'] and workers[0]['batch'] == workers[1]['batch'] == 2
    ours, peer = report['rows']
    assert 'error' not in ours and 'error' not in peer, report['rows']
    cfg = shape_config('tiny')
    assert ours['kept_blocks'] == cfg.n_layers  # a tiny model keeps every block's activations
    plan = predict(cfg, 2, 16, 'fp32', rank=4, targets=('q', 'v'), ram_blocks=cfg.n_layers, device_is_host=True,
                   kept_blocks=ours['kept_blocks'])
    assert (ours['planned_device_bytes'], ours['planned_host_bytes']) == (plan.device_bytes, plan.host_bytes)
    assert 'planned_device_bytes' not in peer  # no prediction for the peer
    for row in (ours, peer):
        assert row['host_gain_bytes'] > 0 and row['step_times'] == [row['step_s']]
    with open(f'{work}/bench.json') as f:
        assert json.load(f) == json.loads(json.dumps(report))
    table = capsys.readouterr().out
    assert f"({plan.device_bytes / 2 ** 30:.2f})" in table  # the prediction printed beside the measurement


@pytest.mark.slow
def test_several_keep_settings_run_a_row_each(tiny_bench_models):
    """--keep-activations auto,none: ours runs once per setting in one table (keeping beside recomputing,
    as issue 39 compares them), each row planned with the blocks it kept."""
    work, _ = tiny_bench_models
    report = bench.bench(device='cpu', shape='tiny', batch=2, seq=16, steps=1, warmup=0, rank=4, modes=('ram',),
                         peers=(), dtype='fp32', work=work, json_out=f'{work}/keeps.json', keeps=('auto', 'none'))
    kept = {row['mode']: row['kept_blocks'] for row in report['rows']}
    assert kept == {'ram/auto': 4, 'ram/none': 0}, report['rows']
    auto, none = report['rows']
    assert auto['planned_host_bytes'] > none['planned_host_bytes']  # the kept activations are in the plan
    assert auto['bytes_read_per_step'] == none['bytes_read_per_step']


@pytest.mark.slow
def test_ours_runs_on_a_prepared_folder_with_its_own_quantization(tmp_path):
    """bench --model DIR: ours on a prepared folder (gpu_check's whole MoE model, written packed), its
    row planned with the folder's own nf4 blocks; the peers cannot run on it and are refused."""
    from slowllama.engine.plan import predict
    from slowllama.model.quant import parse_quant
    from slowllama.recipes.random_model import write_random_prepared
    from slowllama.recipes.shapes import shape_config
    cfg = shape_config('tiny')
    model = write_random_prepared(cfg, str(tmp_path / 'tiny-nf4'), quant='nf4')
    report = bench.bench(device='cpu', shape='tiny', batch=2, seq=16, steps=1, warmup=0, rank=4, modes=('disk',),
                         peers=(), dtype='fp32', work=str(tmp_path), json_out=str(tmp_path / 'b.json'), model=model)
    (row,) = report['rows']
    assert 'error' not in row and row['step_s'] > 0 and row['bytes_read_per_step'] > 0, row
    plan = predict(cfg, 2, 16, 'fp32', rank=4, targets=('q', 'v'), device_is_host=True, quant=parse_quant('nf4'),
                   kept_blocks=row['kept_blocks'])
    assert row['planned_host_bytes'] == plan.host_bytes and report['shape'] == 'tiny-nf4'
    assert not (tmp_path / 'tiny').exists()  # no random float model was made
    done = subprocess.run([sys.executable, '-m', 'slowllama', 'bench', '--model', model, '--peers', 'hf'],
                          capture_output=True, text=True)
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        f"error: --model {model}: transformers+peft run on --shape's random model only (pass --peers '')"]
