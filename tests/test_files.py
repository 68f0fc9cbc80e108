"""The one atomic writer (weights/files.py) for files and folders: a write killed midway leaves the
old target whole and a leftover under a recognizable name beside it, which the next write of that
target removes (and says so); a live writer's staging is never pulled from under it; a failed write
leaves nothing; an adapter written inside a checkpoint's staging is written there directly."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from slowllama.weights.files import (
    STAGING,
    atomic_folder,
    atomic_open,
    clean_leftovers,
    sweep_leftovers,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a writer that stages `target` (a file or a folder), writes into it, then waits to be killed
WRITER = textwrap.dedent('''
    import sys, time
    from slowllama.weights.files import atomic_folder, atomic_open
    kind, target = sys.argv[1:]
    if kind == 'file':
        with atomic_open(target, 'w') as f:
            f.write('half of the new')
            f.flush()
            print('ready', flush=True)
            time.sleep(120)
    else:
        with atomic_folder(target) as staging:
            open(staging + '/weights', 'w').write('half of the new')
            print('ready', flush=True)
            time.sleep(120)
''')


def start_writer(kind, target):
    process = subprocess.Popen([sys.executable, '-c', WRITER, kind, str(target)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONPATH': ROOT})
    assert process.stdout.readline().strip() == 'ready', process.stderr.read()
    return process


def leftovers(target):
    parent, name = os.path.split(str(target))
    return sorted(n for n in os.listdir(parent) if n.startswith(f'.{name}.'))


def old_state(tmp_path, kind):
    target = tmp_path / ('notes.txt' if kind == 'file' else 'adapter')
    if kind == 'file':
        target.write_text('old')
    else:
        target.mkdir()
        (target / 'weights').write_text('old')
    return target


def read(target):
    return target.read_text() if target.is_file() else (target / 'weights').read_text()


def write_again(kind, target, text):
    if kind == 'file':
        with atomic_open(target, 'w') as f:
            f.write(text)
    else:
        with atomic_folder(target) as staging:
            Path(staging, 'weights').write_text(text)


@pytest.mark.parametrize('kind', ['file', 'folder'])
def test_a_killed_write_leaves_the_old_target_and_the_next_write_removes_its_leftover(tmp_path, kind, capfd):
    target = old_state(tmp_path, kind)
    writer = start_writer(kind, target)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert read(target) == 'old'  # never half old, half new
    left = leftovers(target)
    assert left == [n for n in left if n.startswith(f'.{target.name}{STAGING}{writer.pid}-')] and len(left) == 1
    write_again(kind, target, 'new')
    assert read(target) == 'new' and leftovers(target) == []
    said = capfd.readouterr().err
    assert 'an earlier write was interrupted' in said and left[0] in said


@pytest.mark.parametrize('kind', ['file', 'folder'])
def test_a_live_writers_staging_is_left_alone(tmp_path, kind):
    target = old_state(tmp_path, kind)
    writer = start_writer(kind, target)
    try:
        write_again(kind, target, 'new')  # another process writes the same target meanwhile
        assert read(target) == 'new' and len(leftovers(target)) == 1  # the live one's staging
        assert clean_leftovers(target) is None
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert 'removed' in clean_leftovers(target) and leftovers(target) == []


@pytest.mark.parametrize('kind', ['file', 'folder'])
def test_a_write_that_fails_leaves_the_old_target_and_nothing_beside_it(tmp_path, kind):
    target = old_state(tmp_path, kind)
    with pytest.raises(RuntimeError, match='disk on fire'):
        if kind == 'file':
            with atomic_open(target, 'w') as f:
                f.write('half')
                raise RuntimeError('disk on fire')
        with atomic_folder(target) as staging:
            Path(staging, 'weights').write_text('half')
            raise RuntimeError('disk on fire')
    assert read(target) == 'old' and leftovers(target) == []


def test_leftovers_of_older_versions_and_a_cut_fallback_swap_are_recognized(tmp_path):
    run = tmp_path / 'run'
    (run / 'checkpoints').mkdir(parents=True)
    left = [run / '.adapter.staging-k2x9q1zz', run / '.train.log.a1b2c3d4.tmp', run / 'checkpoints' / '.step_000003.old',
            run / '.best.staging-999999999-abcdefgh']  # no pid, mkstemp's old name, the fallback's old, a dead pid
    for path in left:
        path.mkdir() if 'staging' in path.name or path.name.endswith('.old') else path.write_text('half')
    (run / '.lock').write_text('')  # not ours to touch
    (run / 'adapter.staging-notes').write_text('')  # not hidden: a user's file
    found = sweep_leftovers(run) + sweep_leftovers(run / 'checkpoints')
    assert len(found) == 4 and not any(path.exists() for path in left[:2] + left[3:])
    assert (run / 'checkpoints' / 'step_000003').is_dir()  # put back: its swap was cut between the renames
    assert sorted(os.listdir(run)) == ['.lock', 'adapter.staging-notes', 'checkpoints']


class FolderModel:
    """A model whose save_adapter is itself an atomic folder write (as StreamedModel's is)."""

    def __init__(self, fail=False):
        self.fail, self.wrote_into = fail, None

    def save_adapter(self, folder):
        with atomic_folder(folder) as staging:
            self.wrote_into = staging
            Path(staging, 'adapter_model.safetensors').write_text('adapter')
            if self.fail:
                raise RuntimeError('killed in the adapter')


def test_a_checkpoint_writes_its_adapter_in_place_and_a_failure_leaves_nothing(tmp_path):
    from slowllama.training.checkpoint import write_checkpoint
    params = {'w': torch.nn.Parameter(torch.ones(2))}
    optimizer = torch.optim.AdamW(params.values())
    folder = tmp_path / 'checkpoints' / 'step_000001'
    model = FolderModel()
    write_checkpoint(folder, model, params, optimizer, {'step': 1})
    assert os.path.basename(model.wrote_into).startswith(f'.step_000001{STAGING}{os.getpid()}-')  # no nested one
    assert sorted(os.listdir(folder)) == ['adapter_model.safetensors', 'optimizer.json', 'optimizer.safetensors',
                                          'state.json', 'trainable.safetensors']
    with pytest.raises(RuntimeError, match='killed in the adapter'):
        write_checkpoint(tmp_path / 'checkpoints' / 'step_000002', FolderModel(fail=True), params, optimizer,
                         {'step': 2})
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['step_000001']


def test_a_failed_save_adapter_keeps_the_old_adapter(tiny_text_model, tmp_path, monkeypatch):
    import slowllama
    from slowllama.weights.formats import peft
    model = slowllama.load(tiny_text_model[0], lora=slowllama.LoraConfig(rank=2, targets=('q', 'v')))
    folder = tmp_path / 'adapter'
    model.save_adapter(folder)
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}

    def half_then_fail(staging, *args):
        Path(staging, 'adapter_model.safetensors').write_text('half')
        raise RuntimeError('killed mid-save')
    monkeypatch.setattr(peft, 'save_adapter_folder', half_then_fail)
    with pytest.raises(RuntimeError, match='killed mid-save'):
        model.save_adapter(folder)
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    assert leftovers(folder) == []
