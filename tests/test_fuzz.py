"""Hostile files: every reader ends in success or one SlowLlamaError naming the file, under a memory
cap and a time limit (see fuzz.py), and the failures found so far stay fixed (the regression cases).

The in-process fuzzing runs a fixed number of cases (SLOWLLAMA_FUZZ_CASES) drawn from a fixed seed
(SLOWLLAMA_FUZZ_SEED), so each run of the suite tries the same cases, however fast the machine is;
`python scripts/fuzz.py --minutes N` runs for a time instead, from a new seed each time."""
import json
import os

import fuzz
import numpy as np
import pytest

import slowllama
from slowllama.errors import SlowLlamaError

CASES = int(os.environ.get('SLOWLLAMA_FUZZ_CASES', 360))  # about half a minute on 2 idle cores
SEED = int(os.environ.get('SLOWLLAMA_FUZZ_SEED', 0))
CLI_CASES = int(os.environ.get('SLOWLLAMA_FUZZ_CLI_CASES', 1))  # per command; each starts a Python


@pytest.fixture(scope='module')
def corpus(fuzz_corpus):
    return fuzz_corpus


@pytest.fixture(scope='module')
def slots(corpus):
    return {name: fuzz.gguf_slots(corpus[name]) for name in corpus if name.endswith('.gguf')}


@pytest.mark.parametrize('reader', list(fuzz.READERS))
def test_every_reader_reads_its_unmutated_input(corpus, slots, reader):
    """The fuzzer starts from valid files: unmutated, each reader succeeds."""
    outcome, _, detail = fuzz.run_case(reader, 0, corpus, slots, mutate=False)
    assert outcome == 'ok', detail


def test_mutated_files_end_in_success_or_one_line_naming_the_file(corpus):
    counts, findings = fuzz.fuzz(corpus, seed=SEED, max_cases=CASES, log=print)
    print('\n'.join(fuzz.report(counts)))
    assert not findings, '\n\n'.join(f'{r} seed {s}: {o} ({k})\n{d}' for r, s, o, k, d in findings[:5])
    per_reader = {r: sum(n for (reader, _, _), n in counts.items() if reader == r) for r in fuzz.READERS}
    outcomes = {o for (_, _, o) in counts}
    assert all(per_reader.values()), per_reader  # every reader was tried
    assert {'ok', 'refused'} <= outcomes  # the mutations both pass and trip the checks
    assert sum(per_reader.values()) == CASES  # every case ran to an outcome


@pytest.mark.slow
def test_the_command_line_on_mutated_files(corpus):
    """Each command as a user runs it: exit 0, or exit != 0 with 'error: <the file>: ...' as the last
    line and no traceback, under RLIMIT_AS and a time limit."""
    counts, findings = fuzz.fuzz_cli(corpus, cases_per_command=CLI_CASES, seed=SEED, log=print)
    print('\n'.join(fuzz.report(counts)))
    assert not findings, '\n\n'.join(f'{r} seed {s}: {o} ({k})\n{d}' for r, s, o, k, d in findings[:5])
    assert sum(counts.values()) == CLI_CASES * len(fuzz.COMMANDS)


# --- regressions: what fuzzing (and the issue's own hostile files) found, fixed at the reader ---------

def _edit_json(path, edit):
    with open(path) as f:
        doc = json.load(f)
    doc = edit(doc) or doc
    with open(path, 'w') as f:
        json.dump(doc, f)


def _copy(corpus, name, tmp_path):
    import shutil
    target = tmp_path / name
    (shutil.copytree if os.path.isdir(corpus[name]) else shutil.copyfile)(corpus[name], target)
    return target


def _refused(call, path):
    with pytest.raises(SlowLlamaError) as e:
        call()
    assert str(path) in str(e.value) and '\n' not in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.parametrize('key, value', [
    ('n_heads', '4'), ('n_heads', 3), ('vocab_size', 10 ** 12), ('vocab_size', 4096), ('norm_eps', 'tiny'),
    ('norm_eps', float('nan')), ('rope_scaling', [8.0]), ('rope_scaling', {'factor': 'x'}), ('dim', 64.0),
    ('n_layers', 1 << 40), ('tie_embeddings', 'no'), ('eos_id', [2, 'x']),
])
def test_manifest_config_of_wrong_type_or_size_is_refused(corpus, tmp_path, key, value):
    """The issue's cases: type errors, and vocab_size 10**12 allocating far more than the files hold."""
    model = _copy(corpus, 'prepared', tmp_path)
    _edit_json(model / 'manifest.json', lambda m: m['config'].__setitem__(key, value))
    message = _refused(lambda: slowllama.load(model), model)  # the manifest, or the file it does not fit
    assert key in message or 'shape' in message or 'n_kv_heads' in message, message


@pytest.mark.parametrize('quant', [{'type': ''}, {'type': [1, 2, 3]}, [1, 2, 3], {'type': 'nf4', 'head': 'yes'},
                                   {'type': 'int8', 'double_quant': True}, {'blocksize': 64}])
def test_a_damaged_quant_record_is_refused_naming_the_manifest(corpus, tmp_path, quant):
    """Found by fuzzing the packed folder: the record's own check said '--quant: ...' without the file."""
    model = _copy(corpus, 'packed', tmp_path)
    _edit_json(model / 'manifest.json', lambda m: m.__setitem__('quant', quant))
    assert 'quant must be a record' in _refused(lambda: slowllama.load(model), model)


def test_config_numbers_are_held_as_floats_and_extra_table_tensors_do_not_break_the_ram_tier(corpus, tmp_path):
    """Found by fuzzing: rope_theta 10**40 (a JSON integer) overflowed in torch at the first forward;
    the tie flag turned on beside a head file that holds the head broke the ram tier with a KeyError."""
    import torch
    model = _copy(corpus, 'prepared', tmp_path)
    _edit_json(model / 'manifest.json', lambda m: m['config'].update(rope_theta=10 ** 40, tie_embeddings=True))
    loaded = slowllama.load(model, offload='ram')
    assert loaded.cfg.rope_theta == 1e40
    assert loaded.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=2).shape[-1] >= 1


def test_a_checkpoint_missing_one_moment_is_refused(corpus, tmp_path):
    """Found by fuzzing: an optimizer file without a parameter's exp_avg reached AdamW's step (KeyError)."""
    from slowllama.weights.files import SafetensorsFile, write_safetensors
    run = _copy(corpus, 'run', tmp_path)
    checkpoint = sorted((run / 'checkpoints').iterdir())[-1]
    tensors = dict(SafetensorsFile(checkpoint / 'optimizer.safetensors').tensors())
    dropped = next(k for k in sorted(tensors) if k.endswith('.exp_avg'))
    write_safetensors(checkpoint / 'optimizer.safetensors', {k: v.clone() for k, v in tensors.items() if k != dropped})
    message = _refused(lambda: fuzz.run_finetune(corpus['prepared'], corpus['text.txt'], str(run), 3, '--resume'),
                       checkpoint)
    assert 'lacks exp_avg' in message


def test_a_manifest_without_its_tensors_is_refused_before_allocating(corpus, tmp_path):
    model = _copy(corpus, 'prepared', tmp_path)
    _edit_json(model / 'manifest.json', lambda m: m['config'].__setitem__('n_layers', 1000))
    assert 'block_002.safetensors' in _refused(lambda: slowllama.load(model), model / 'manifest.json')


@pytest.mark.parametrize('field, value', [
    ('merges', ['<s> nowhere']), ('merges', ['nospace']), ('tokens', [1, 2, 3]), ('token_type', [1]),
    ('bos_token_id', 10 ** 6), ('eos_token_id', 'x'), ('tokens', ['a\udcff']),
])
def test_gguf_with_altered_tokenizer_metadata_is_refused(corpus, tmp_path, field, value):
    """The issue's case: altered tokenizer metadata ended in an exception from building the BPE."""
    from slowllama.tokenizer.gguf_tokenizer import tokenizer_files
    from slowllama.weights.formats.gguf import open_reader
    reader = open_reader(corpus['bpe.gguf'])
    keys = {key.rsplit('.', 1)[-1]: key for key in reader.fields}
    path = tmp_path / 'altered.gguf'
    _rewrite_gguf(reader, path, {keys[field]: value})
    _refused(lambda: tokenizer_files(open_reader(str(path)), str(path)), path)
    _refused(lambda: slowllama.prepare(path, tmp_path / 'out'), path)
    assert not (tmp_path / 'out').exists()


def test_a_gguf_array_longer_than_the_file_is_refused_not_looped_over(corpus, tmp_path):
    """The gguf reader looped over an array's claimed count past the end of the file (a hang)."""
    import gguf
    from numpy.lib.array_utils import byte_bounds
    reader = gguf.GGUFReader(corpus['bpe.gguf'])
    count = reader.fields['tokenizer.ggml.tokens'].parts[4]  # key length, key, type, item type, count
    offset = byte_bounds(count)[0] - byte_bounds(reader.data)[0]
    data = bytearray(open(corpus['bpe.gguf'], 'rb').read())
    data[offset:offset + 8] = (1 << 62).to_bytes(8, 'little')
    path = tmp_path / 'long.gguf'
    path.write_bytes(bytes(data))
    assert 'cannot fit' in _refused(lambda: slowllama.prepare(path, tmp_path / 'out'), path)


def test_a_head_count_leaving_no_head_dim_is_refused(corpus, tmp_path):
    from slowllama.weights.formats.gguf import open_reader
    path = tmp_path / 'heads.gguf'
    _rewrite_gguf(open_reader(corpus['bpe.gguf']), path, {'llama.attention.head_count': 256})
    assert 'head_dim' in _refused(lambda: slowllama.prepare(path, tmp_path / 'out'), path)


def _rewrite_gguf(reader, path, changes):
    """A copy of the GGUF with some metadata values replaced (written with the gguf package)."""
    import gguf
    writer = gguf.GGUFWriter(str(path), 'llama')
    V = gguf.GGUFValueType
    for name, field in reader.fields.items():
        if name.startswith('GGUF.') or name == 'general.architecture':
            continue
        value = changes.get(name, field.contents())
        kind = field.types[0]
        if name in changes:
            sample = value[0] if isinstance(value, list) else value
            kind = V.ARRAY if isinstance(value, list) else V.STRING if isinstance(sample, str) else V.UINT32
            sub = V.STRING if isinstance(sample, str) else V.INT32
            writer.add_key_value(name, [v.encode('utf-8', 'surrogateescape') if isinstance(v, str) else v
                                        for v in value] if kind == V.ARRAY else value, kind,
                                 sub_type=sub if kind == V.ARRAY else None)
        else:
            writer.add_key_value(name, value, kind, sub_type=field.types[-1] if kind == V.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


DEEP = '[' * 100_000 + ']' * 100_000


@pytest.mark.parametrize('name, filename, edit', [
    ('prepared', 'manifest.json', lambda p: p.write_text(DEEP)),
    ('prepared', 'manifest.json', lambda p: p.write_text('"just a string"')),
    ('prepared', 'manifest.json', lambda p: _edit_json(p, lambda m: m.__setitem__('files', 'all of them'))),
    ('prepared', 'manifest.json', lambda p: _edit_json(p, lambda m: m.__setitem__('source', True))),
    ('prepared', 'manifest.json', lambda p: _edit_json(p, lambda m: m['tokenizer'].append('../../escape.json'))),
    ('prepared', 'tokenizer_config.json', lambda p: _edit_json(p, lambda c: c.__setitem__('chat_template', 7))),
    ('prepared', 'tokenizer_config.json', lambda p: _edit_json(p, lambda c: c.__setitem__('bos_token', 1))),
])
def test_damaged_prepared_folder_is_one_line(corpus, tmp_path, name, filename, edit):
    from slowllama.tokenizer.tokenizer import load_tokenizer
    from slowllama.weights.formats.export import export
    model = _copy(corpus, name, tmp_path)
    edit(model / filename)
    if filename == 'manifest.json':
        _refused(lambda: slowllama.load(model), model / filename)
        _refused(lambda: export(model, tmp_path / 'out', 'hf'), model / filename)
    else:
        _refused(lambda: load_tokenizer(model), model / filename)


def test_a_chat_template_that_fails_names_the_file(corpus, tmp_path):
    from slowllama.tokenizer.tokenizer import load_tokenizer
    model = _copy(corpus, 'prepared', tmp_path)
    (model / 'chat_template.jinja').write_text('{{ x + }}')
    tokenizer = load_tokenizer(model)
    _refused(lambda: tokenizer.check_chat_template(), model / 'chat_template.jinja')
    (model / 'chat_template.jinja').write_text('{{ raise_exception("no " ~ messages[0].role) }}')
    with pytest.raises(slowllama.SlowLlamaError, match='chat_template.jinja\\) fails: no user$'):
        load_tokenizer(model).apply_chat_template([{'role': 'user', 'content': 'hi'}])


@pytest.mark.parametrize('line', [
    DEEP, json.dumps({'messages': [{'role': 'user', 'content': 1.5}]}),
    json.dumps({'messages': [{'role': None, 'content': 'x'}]}),
])
def test_damaged_chat_data_is_one_line(corpus, tmp_path, line):
    from slowllama.data.dataset import load_data
    from slowllama.tokenizer.tokenizer import load_tokenizer
    path = tmp_path / 'chat.jsonl'
    path.write_text(open(corpus['chat.jsonl']).read() + line + '\n')
    _refused(lambda: load_data(path, load_tokenizer(corpus['prepared']), 16, 2), path)


@pytest.mark.parametrize('edit', [
    lambda c: c.__setitem__('r', '2'), lambda c: c.__setitem__('r', 0), lambda c: c.pop('lora_alpha'),
    lambda c: c.__setitem__('target_modules', 5), lambda c: c.__setitem__('lora_alpha', {'a': 1}),
    lambda c: c.__setitem__('r', 1 << 30),  # a rank the weights do not have: nothing sized from it
    lambda c: [1, 2],
])
def test_damaged_adapter_config_is_one_line(corpus, tmp_path, edit):
    adapter = _copy(corpus, 'adapter', tmp_path)
    _edit_json(adapter / 'adapter_config.json', edit)
    _refused(lambda: slowllama.load(corpus['prepared'], adapter=adapter), adapter)


@pytest.mark.parametrize('edit', [
    lambda s: s.__setitem__('step', 'two'), lambda s: s.__setitem__('rng', True),
    lambda s: s['rng'].__setitem__('cpu', '!!not base64!!'), lambda s: s['rng'].__setitem__('cpu', 'AAAA'),
    lambda s: [s], lambda s: s.__setitem__('best', {}), lambda s: s.__setitem__('best', 7),
    lambda s: s.__setitem__('best', {'score': float('nan'), 'step': 1, 'evals_since': 0}),
])
def test_damaged_checkpoint_state_is_one_line(corpus, tmp_path, edit):
    run = _copy(corpus, 'run', tmp_path)
    _edit_json(run / 'checkpoints' / 'step_000002' / 'state.json', edit)
    _refused(lambda: fuzz.run_finetune(corpus['prepared'], corpus['text.txt'], str(run), 3, '--resume'),
             run / 'checkpoints' / 'step_000002')


def test_optimizer_state_of_the_wrong_shape_is_one_line(corpus, tmp_path):
    from safetensors.torch import load_file, save_file
    run = _copy(corpus, 'run', tmp_path)
    path = run / 'checkpoints' / 'step_000002' / 'optimizer.safetensors'
    state = load_file(path)
    key = next(k for k in state if k.endswith('exp_avg'))
    state[key] = state[key][:1]
    save_file(state, path)
    _refused(lambda: fuzz.run_finetune(corpus['prepared'], corpus['text.txt'], str(run), 3, '--resume'),
             run / 'checkpoints' / 'step_000002')


def test_a_torn_log_with_invalid_utf8_does_not_stop_the_resume(corpus, tmp_path):
    run = _copy(corpus, 'run', tmp_path)
    with open(run / 'metrics.jsonl', 'ab') as f:
        f.write(b'{"step": \xff\xfe' + DEEP.encode()[:1000])
    fuzz.run_finetune(corpus['prepared'], corpus['text.txt'], str(run), 3, '--resume')
    steps = [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_pickle_the_unpickler_chokes_on_is_one_line(corpus, tmp_path):
    """A flipped byte in a Meta shard's pickle made torch's weights-only unpickler raise a KeyError."""
    import zipfile
    meta = _copy(corpus, 'meta', tmp_path)
    shard = meta / 'consolidated.00.pth'
    with zipfile.ZipFile(shard) as z:
        names = z.namelist()
        files = {n: z.read(n) for n in names}
    pickle_name = next(n for n in names if n.endswith('data.pkl'))
    files[pickle_name] = files[pickle_name].replace(b'q\x01', b'h\x86', 1)  # a memo lookup of a missing key
    with zipfile.ZipFile(shard, 'w', zipfile.ZIP_STORED) as z:
        for n in names:
            z.writestr(n, files[n])
    _refused(lambda: slowllama.prepare(meta, tmp_path / 'out'), shard)


@pytest.mark.parametrize('index', [{'weight_map': {'model.norm.weight': 3}}, {'weight_map': []}, ['x']])
def test_a_damaged_safetensors_index_is_one_line(corpus, tmp_path, index):
    hf = _copy(corpus, 'hf', tmp_path)
    (hf / 'model.safetensors.index.json').write_text(json.dumps(index))
    _refused(lambda: slowllama.prepare(hf, tmp_path / 'out'), hf / 'model.safetensors.index.json')


@pytest.mark.parametrize('entry', [
    {'dtype': 'F32', 'shape': [2], 'data_offsets': ['0', 8]}, {'dtype': 'F32', 'shape': [2.0], 'data_offsets': [0, 8]},
    {'dtype': 'F32', 'shape': [0, 1 << 62], 'data_offsets': [0, 0]},
])
def test_safetensors_offsets_and_dims_must_be_integers(tmp_path, entry):
    from slowllama.weights.files import SafetensorsFile
    header = json.dumps({'w': entry}).encode()
    path = tmp_path / 'bad.safetensors'
    path.write_bytes(len(header).to_bytes(8, 'little') + header + bytes(8))
    _refused(lambda: SafetensorsFile(path).tensor('w'), path)
