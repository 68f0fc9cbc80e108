"""Nothing lost, nothing silently wrong: killed runs resume exactly, failing runs damage nothing,
two runs never share a folder, non-finite steps stop the run, signals save a checkpoint, and bad
input is one clear line."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from slowllama.weights.files import SafetensorsFile
from slowllama.training.runlock import RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'finetune.py')


def args(model_dir, data, out, iters, *extra):
    return [sys.executable, SCRIPT, '--model', model_dir, '--data', data, '--out', out, '--device', 'cpu',
            '--iters', iters, '--batch-size', 4, '--seq-len', 32, '--lr', 5e-3, '--targets', 'q,v,gate',
            '--seed', 3, '--dropout', 0.1, '--lora-dropout', 0.1, '--schedule', 'constant', *extra]


def run(model_dir, data, out, iters, *extra):
    command = [str(a) for a in args(model_dir, data, out, iters, *extra)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


def start(model_dir, data, out, iters, *extra):
    command = [str(a) for a in args(model_dir, data, out, iters, *extra)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def wait_for(path, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert process.poll() is None, 'the run ended before it could be interrupted'
        assert time.monotonic() < deadline
        time.sleep(0.005)


def adapter_bytes(run_dir):
    return (run_dir / 'adapter' / 'adapter_model.safetensors').read_bytes()


@pytest.fixture
def story(tmp_path):
    path = tmp_path / 'story.txt'
    path.write_text('at dusk the keeper of glimmerfen lights the violet lamp; the fishing boats follow it home. ' * 30)
    return path


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tiny_text_model, story, tmp_path):
    model_dir, _, _ = tiny_text_model
    assert run(model_dir, story, tmp_path / 'whole', 40).returncode == 0
    process = start(model_dir, story, tmp_path / 'killed', 40, '--save-every', 5)
    wait_for(tmp_path / 'killed' / 'checkpoints' / 'step_000010', process)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    resumed = run(model_dir, story, tmp_path / 'killed', 40, '--save-every', 5, '--resume')
    assert resumed.returncode == 0, resumed.stderr
    assert 'resumed from' in resumed.stderr
    assert adapter_bytes(tmp_path / 'killed') == adapter_bytes(tmp_path / 'whole')


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops_cleanly(tiny_text_model, story, tmp_path):
    model_dir, _, _ = tiny_text_model
    process = start(model_dir, story, tmp_path / 'run', 10_000, '--save-every', 1000)
    wait_for(tmp_path / 'run' / 'metrics.jsonl', process)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert 'stopped by SIGTERM' in stderr and 'Traceback' not in stderr
    checkpoints = os.listdir(tmp_path / 'run' / 'checkpoints')
    assert len(checkpoints) == 1 and (tmp_path / 'run' / 'adapter').is_dir()


@pytest.mark.slow
def test_a_failing_run_leaves_the_earlier_adapter_untouched(tiny_text_model, story, tmp_path):
    model_dir, _, _ = tiny_text_model
    assert run(model_dir, story, tmp_path / 'run', 2).returncode == 0
    before = adapter_bytes(tmp_path / 'run')
    failing = run(model_dir, story, tmp_path / 'run', 8, '--resume', '--lr', 1e30)
    assert failing.returncode == 2
    assert 'not finite' in failing.stderr and 'Traceback' not in failing.stderr
    assert adapter_bytes(tmp_path / 'run') == before
    skipping = run(model_dir, story, tmp_path / 'run', 8, '--resume', '--lr', 1e30, '--skip-nonfinite')
    assert skipping.returncode == 0 and 'step skipped' in skipping.stderr
    weights = SafetensorsFile(tmp_path / 'run' / 'adapter' / 'adapter_model.safetensors')
    assert all(torch.isfinite(weights.tensor(n)).all() for n in weights.names())


def test_two_runs_never_write_one_folder(tiny_text_model, story, tmp_path):
    model_dir, _, _ = tiny_text_model
    (tmp_path / 'run').mkdir()
    with RunLock(str(tmp_path / 'run')):
        second = run(model_dir, story, tmp_path / 'run', 2)
    assert second.returncode == 2 and 'Traceback' not in second.stderr
    assert second.stderr.strip().splitlines()[-1] == (
        f'error: {tmp_path / "run"}: another run is writing to this folder (wait for it, or choose another --out)')


@pytest.mark.parametrize('extra, message', [
    (['--seq-len', 100000], '--seq-len 100000 is above'),
    (['--lora-rank', 0], '--lora-rank must be positive'),
    (['--batch-size', 0], '--batch-size must be at least 1'),
    (['--device', 'mps'], '--device mps'),
    (['--max-ram', 'lots'], '--max-ram'),
    (['--offload', 'tape'], '--offload'),
])
def test_bad_flags_are_one_clear_line(tiny_text_model, story, tmp_path, extra, message):
    model_dir, _, _ = tiny_text_model
    result = run(model_dir, story, tmp_path / 'run', 2, *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and message in lines[0], result.stderr
    assert not (tmp_path / 'run' / 'adapter').exists()


def test_debug_shows_the_traceback(tiny_text_model, story, tmp_path):
    model_dir, _, _ = tiny_text_model
    result = run(model_dir, story, tmp_path / 'run', 2, '--lora-rank', 0, '--debug')
    assert result.returncode != 0 and 'Traceback' in result.stderr


def test_out_of_memory_names_the_flags_that_lower_it(monkeypatch, capsys):
    from slowllama import cli
    from slowllama.recipes import finetune

    def exhausted(args):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    monkeypatch.setattr(finetune, 'run', exhausted)
    assert cli.main(['finetune', '--model', 'm', '--data', 'd']) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '--batch-size' in err[0] and '--seq-len' in err[0] and 'out of memory' in err[0]
