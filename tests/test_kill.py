"""Kill every writer: SIGKILL at random points while prepare, export (hf, meta, peft), save_adapter
and the trainer's checkpoints write; afterwards the destination is the old complete state or the new
one, the next run says what an interrupted write left, and no staging folder stays behind. Some
kill must have landed in the middle of a write (left a staging folder beside the destination);
more kills are made until one does, up to MAX_KILLS.

The writers run in tests/writers.py, alternating between two states until killed, so a random delay
lands at a random point of a write. SLOWLLAMA_KILLS sets the kills per writer (default 2)."""
import contextlib
import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import fuzz
import writers

HERE = os.path.dirname(os.path.abspath(__file__))
KILLS = int(os.environ.get('SLOWLLAMA_KILLS', 2))
MAX_KILLS = 4 * KILLS  # more while none has landed in the middle of a write (left a staging folder)


@pytest.fixture(scope='module')
def corpus(fuzz_corpus, tmp_path_factory):
    paths = dict(fuzz_corpus, adapter=str(tmp_path_factory.mktemp('kill') / 'adapter'))
    writers._adapter(paths['prepared'], 4).save_adapter(paths['adapter'])
    writers._adapter(paths['prepared'], 3).save_adapter(paths['adapter'] + '_other')  # for the peft export
    return paths


def fingerprint(folder):
    """{relative path: sha256} of every file under `folder` (None when it does not exist)."""
    if not os.path.isdir(folder):
        return None
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, 'rb') as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def leftovers(final):
    parent, name = os.path.split(os.path.abspath(final))
    return sorted(n for n in os.listdir(parent) if n.startswith(f'.{name}.'))


def start(*args):
    env = {**os.environ, 'PYTHONPATH': os.path.dirname(HERE)}
    process = subprocess.Popen([sys.executable, os.path.join(HERE, 'writers.py'), *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    if line.strip() != 'ready':
        process.kill()
        pytest.fail(f'the writer did not start: {process.stderr.read()[-2000:]}')
    return process


def kill_after(process, delay):
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, 'the writer ended before it was killed'


def run_quietly(write):
    """-> what `write` printed on stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        write()
    return stderr.getvalue()


def states_of(writer, args):
    """The two complete states (fingerprints) the writer alternates between, made in this process."""
    writes = writers.states(writer, args)
    prints = []
    for write in writes:
        run_quietly(write)
        prints.append(fingerprint(args[-2] if writer == 'export' else args[-1]))
    assert prints[0] != prints[1]
    return writes, prints


@pytest.mark.slow
@pytest.mark.parametrize('writer', ['prepare', 'export-hf', 'export-meta', 'export-peft', 'adapter'])
def test_a_killed_writer_leaves_the_old_or_the_new_state(corpus, tmp_path, writer):
    out = str(tmp_path / 'out')
    args = {'prepare': [corpus['hf'], out], 'adapter': [corpus['prepared'], out]}.get(
        writer, [corpus['prepared'], corpus['adapter'], out, writer.split('-')[-1]])
    writes, prints = states_of(writer.split('-')[0], args)
    rng = random.Random(f'kill {writer}')
    kills = found_leftovers = 0
    while kills < KILLS or (not found_leftovers and kills < MAX_KILLS):  # until one lands mid-write
        kills += 1
        kill_after(start(writer.split('-')[0], *args), rng.uniform(0.0, 0.6))
        assert fingerprint(out) in prints, f'{writer}: the destination is neither the old nor the new state'
        left = leftovers(out)
        said = run_quietly(writes[0])  # the next run: cleans up, says so, and writes the old state again
        assert fingerprint(out) == prints[0] and leftovers(out) == []
        if left:
            found_leftovers += 1
            assert 'an earlier write was interrupted' in said, said
    print(f'{writer}: {kills} kills, {found_leftovers} left a staging folder')
    assert found_leftovers, f'{writer}: none of {kills} kills landed in the middle of a write (left a staging folder)'


@pytest.mark.slow
def test_a_killed_trainer_leaves_complete_checkpoints_and_resumes(corpus, tmp_path):
    import slowllama
    from slowllama.training.checkpoint import list_checkpoints, read_checkpoint
    from slowllama.weights.formats.peft import read_adapter_folder
    rng = random.Random('kill checkpoint')
    run = str(tmp_path / 'run')
    kills = found_leftovers = 0
    while kills < KILLS or (not found_leftovers and kills < MAX_KILLS):
        # a step takes far longer than a checkpoint, so a kill at a random time after a checkpoint
        # seldom lands in the next one: every other kill waits for a checkpoint to be staged
        aimed, kill = kills % 2 == 1, kills
        kills += 1
        process = start('checkpoint', corpus['prepared'], corpus['text.txt'], run)
        first = len(list_checkpoints(run))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoint_staged(run) if aimed else len(list_checkpoints(run)) > first:
                break
            time.sleep(0.0005 if aimed else 0.01)
        kill_after(process, 0.0 if aimed else rng.uniform(0.0, 0.5))
        found = list_checkpoints(run)
        adapters = set()
        for _, name in found:  # every checkpoint listed is complete and readable
            model = slowllama.load(corpus['prepared'], lora=slowllama.LoraConfig(rank=2, targets=('q', 'v')))
            import torch
            params = model.trainable_parameters()
            read_checkpoint(os.path.join(run, 'checkpoints', name), params, torch.optim.AdamW(params.values()))
            adapters.add(fingerprint(os.path.join(run, 'checkpoints', name))['adapter_model.safetensors'])
        if os.path.isdir(os.path.join(run, 'adapter')):  # adapter/ is one of the checkpoints' adapters
            read_adapter_folder(os.path.join(run, 'adapter'))
            assert fingerprint(os.path.join(run, 'adapter'))['adapter_model.safetensors'] in adapters
        left = staging(run)
        last = found[-1][0] if found else 0
        fuzz.run_finetune(corpus['prepared'], corpus['text.txt'], run, last + 1, '--resume')
        log = open(os.path.join(run, 'train.log')).read()
        assert f'at step {last}' in log if found else 'no complete checkpoint' in log
        if left:
            found_leftovers += 1
            assert 'interrupted' in log, log
        assert staging(run) == []
        print(f'kill {kill}{" (aimed)" if aimed else ""}: {len(found)} complete checkpoints, leftovers {left}')
    assert found_leftovers, f'none of {kills} kills landed in the middle of a checkpoint (no staging folder left)'


def checkpoint_staged(run):
    """A checkpoint is being written (its staging folder exists)."""
    folder = os.path.join(run, 'checkpoints')
    return os.path.isdir(folder) and any(n.startswith('.step_') for n in os.listdir(folder))


def staging(run):
    """Hidden folders in a run folder and its checkpoints/ (the lock file is not one)."""
    folders = [run, os.path.join(run, 'checkpoints')]
    return [n for f in folders if os.path.isdir(f) for n in os.listdir(f) if n.startswith('.') and n != '.lock']


def test_a_swap_cut_short_is_put_back(tmp_path):
    """Where the atomic exchange is missing: a crash between the two renames leaves `.NAME.old`,
    which the next reader puts back (the old complete state) and says so."""
    from slowllama.weights.files import clean_leftovers, staging_dir
    final = tmp_path / 'adapter'
    final.mkdir()
    (final / 'weights').write_text('old')
    staging = staging_dir(final)
    with open(os.path.join(staging, 'weights'), 'w') as f:
        f.write('new')
    os.replace(final, tmp_path / '.adapter.old')  # the first rename of the fallback, then the crash
    said = clean_leftovers(final)
    assert (final / 'weights').read_text() == 'old' and leftovers(final) == []
    assert 'restored the previous folder' in said and 'staging' in said


def test_the_exchange_swaps_whole_folders(tmp_path):
    from slowllama.weights.files import staging_dir, swap_dir
    final = tmp_path / 'model'
    final.mkdir()
    (final / 'a').write_text('old')
    staging = staging_dir(final)
    with open(os.path.join(staging, 'b'), 'w') as f:
        f.write('new')
    swap_dir(staging, final)
    assert sorted(os.listdir(final)) == ['b'] and leftovers(final) == []


def test_nested_staging_left_by_a_kill_is_removed(tmp_path):
    """A save_adapter staged inside a checkpoint's (or adapter's) staging folder, killed midway,
    leaves '..NAME.staging-X.staging-Y': the next run removes it and says so."""
    from slowllama.training.checkpoint import remove_leftovers
    nested = [tmp_path / 'checkpoints' / '..step_000006.staging-a1.staging-b2', tmp_path / '..adapter.c3.staging-d4']
    for folder in nested:
        folder.mkdir(parents=True)
        (folder / 'adapter_model.safetensors').write_bytes(b'half')
    (tmp_path / 'checkpoints' / 'step_000004').mkdir()  # a complete checkpoint stays
    found = remove_leftovers(tmp_path)
    assert not any(folder.exists() for folder in nested) and len(found) == 2
    assert (tmp_path / 'checkpoints' / 'step_000004').exists()
