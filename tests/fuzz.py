"""A seeded fuzzer for slowllama's readers.

Valid files are made once (`build_corpus`): GGUF files (byte-level BPE and sentencepiece tokenizer
metadata, tensors in F32, F16, Q8_0, Q4_0, Q5_1), a Hugging Face folder, a Meta folder, a prepared
folder, an adapter folder, a run folder with a checkpoint, and text / JSONL / alpaca / chat data.
A case is (reader, seed): the seed picks a file of the reader's input, a mutation and its place, so
any case replays exactly (`python scripts/fuzz.py --replay READER SEED`).

Cases run in worker processes under a memory cap (RLIMIT_AS) and a time limit. The one outcome a
reader may end in besides success is a SlowLlamaError whose message names the file; anything else
(another exception, a hang, a crash, a MemoryError from an allocation no file of that size justifies)
is a finding.
"""
import importlib
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
MEMORY_CAP = 3 << 30          # address space a worker may add to what it holds after start-up
CASE_SECONDS = 60             # a case running longer is a hang
FINDINGS = ('bug', 'unnamed', 'hang', 'crash')

# --- the valid corpus ---------------------------------------------------------------------------


def build_corpus(root):
    """Write every valid input under `root`; returns {name: path}."""
    import torch

    import slowllama
    sys.path.insert(0, HERE)
    import gguf
    from checkpoints import hf_params, write_gguf, write_meta
    from conftest import CORPUS, make_hf_model, save_tiny_tokenizer
    T = gguf.GGMLQuantizationType
    root = str(root)
    paths = {name: os.path.join(root, name) for name in
             ('hf', 'meta', 'prepared', 'packed', 'adapter', 'run', 'bpe.gguf', 'spm.gguf')}
    from pathlib import Path
    model = make_hf_model(paths['hf'], seed=5, max_shard_size='100KB', hidden_size=64, intermediate_size=192,
                          num_hidden_layers=2, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    tokenizer = save_tiny_tokenizer(Path(paths['hf']))
    write_meta(paths['meta'], model, 1, hf_params(model, multiple_of=32))  # 192: Meta's rule for dim 64
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [' '.join(m) for m in json.loads(tokenizer.to_str())['model']['merges']]
    types = [3 if t.startswith('<') else 1 for t in tokens]
    quant = {'attn_q.weight': T.Q8_0, 'attn_k.weight': T.Q4_0, 'attn_v.weight': T.Q5_1, 'ffn_up.weight': T.F16}
    common = {'add_token_list': tokens, 'add_token_types': types, 'add_bos_token_id': 1, 'add_eos_token_id': 2,
              'add_chat_template': "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    write_gguf(paths['bpe.gguf'], model, quant, tokenizer={
        'add_tokenizer_model': 'gpt2', 'add_tokenizer_pre': 'llama-bpe', 'add_token_merges': merges, **common})
    write_gguf(paths['spm.gguf'], model, {'*': T.Q8_0}, tokenizer={
        'add_tokenizer_model': 'llama', 'add_token_scores': [-float(i) for i in range(len(tokens))], **common})
    slowllama.prepare(paths['hf'], paths['prepared'], dtype='fp32')
    from slowllama.model.quant import Quant  # blocks and tables packed, the absmax too
    slowllama.prepare(paths['hf'], paths['packed'], dtype='fp32', quant=Quant('nf4', double_quant=True, head=True))
    torch.manual_seed(0)
    lora = slowllama.LoraConfig(rank=2, alpha=4.0, targets=('q', 'v', 'down'))
    loaded = slowllama.load(paths['prepared'], lora=lora)
    with torch.no_grad():
        for p in loaded.trainable_parameters().values():
            p.normal_(0, 0.05)
    loaded.save_adapter(paths['adapter'])
    data = {'text.txt': ' '.join(CORPUS * 4),
            'text.jsonl': ''.join(json.dumps({'text': t}) + '\n' for t in CORPUS),
            'alpaca.jsonl': ''.join(json.dumps({'instruction': t, 'input': '', 'output': t[::-1]}) + '\n'
                                    for t in CORPUS),
            'chat.jsonl': ''.join(json.dumps({'messages': [{'role': 'user', 'content': t},
                                                           {'role': 'assistant', 'content': t.upper()}]}) + '\n'
                                  for t in CORPUS)}
    for name, text in data.items():
        paths[name] = os.path.join(root, name)
        with open(paths[name], 'w') as f:
            f.write(text)
    run_finetune(paths['prepared'], paths['text.txt'], paths['run'], iters=2)
    return paths


def finetune_argv(model, data, out, iters, *extra):
    return ['finetune', '--model', model, '--data', data, '--out', out, '--device', 'cpu', '--iters', str(iters),
            '--batch-size', '2', '--seq-len', '16', '--lora-rank', '2', '--targets', 'q,v', '--save-every', '1',
            '--seed', '1', *extra]


def run_finetune(model, data, out, iters, *extra):
    """The finetune command in this process, a SlowLlamaError left to propagate."""
    import io
    from contextlib import redirect_stdout

    from slowllama.cli import build_parser
    args = build_parser().parse_args(finetune_argv(model, data, out, iters, *extra))
    with redirect_stdout(io.StringIO()):
        from slowllama.recipes import finetune
        from slowllama.recipes.options import resolve
        finetune.run(resolve(args), stream=io.StringIO())


# --- mutations ----------------------------------------------------------------------------------

EXTREMES = [0, 1, 2, 255, 256, (1 << 15) - 1, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
            (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
JSON_VALUES = [None, True, False, '', 'x' * 1000, [], {}, float('nan'), float('inf'), -float('inf'), 1e308,
               10 ** 40, -1, 0, 0.5, 2 ** 63, 2 ** 64 + 1, '64', [1, 2, 3], {'a': 1}, '\udcff']
DEEP = '"@@deep@@"'


def mutate_bytes(data, rng):
    """(kind, new bytes) for an arbitrary file."""
    kind = rng.choice(['flip', 'truncate', 'extend', 'swap', 'extreme', 'utf8'])
    data = bytearray(data)
    n = len(data)
    if kind == 'flip' and n:
        for _ in range(rng.choice([1, 1, 2, 8, 64])):
            data[rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif kind == 'truncate':
        del data[rng.choice([0, 1, 7, 8, 23, 24, rng.randrange(n + 1), max(0, n - 1)]):]
    elif kind == 'extend':
        data += bytes(rng.randrange(256) for _ in range(rng.choice([1, 8, 100, 4096])))
    elif kind == 'swap' and n > 2:
        size = rng.randrange(1, max(2, n // 4))
        a, b = rng.randrange(n - size + 1), rng.randrange(n - size + 1)
        data[a:a + size], data[b:b + size] = data[b:b + size], data[a:a + size]
    elif kind == 'extreme' and n >= 8:
        at = rng.choice([0, 4, 8, 16, rng.randrange(n - 7)])
        width = rng.choice([4, 8])
        data[at:at + width] = (rng.choice(EXTREMES) % (1 << (8 * width))).to_bytes(width, 'little')
    elif kind == 'utf8':
        at = rng.randrange(n + 1)
        data[at:at] = rng.choice([b'\xff', b'\xc0\x80', b'\xed\xa0\x80', b'\xf8\x88\x80\x80\x80', b'\x00'])
    return kind, bytes(data)


def mutate_json(data, rng):
    """(kind, new text) for a JSON document: one value replaced (wrong type, NaN, huge, deep), a key
    dropped, or the document nested deeper than any parser recurses."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return mutate_bytes(data, rng)
    slots = list(_json_slots(doc, ()))
    path = rng.choice(slots) if slots else ()
    kind = rng.choice(['json-value', 'json-value', 'json-drop', 'json-deep'])
    if kind == 'json-drop' and path:
        parent = _json_get(doc, path[:-1])
        del parent[path[-1]]
    else:
        value = DEEP if kind == 'json-deep' else rng.choice(JSON_VALUES)
        doc = _json_set(doc, path, value)
    text = json.dumps(doc, ensure_ascii=False).replace(json.dumps(DEEP), '[' * 100_000 + ']' * 100_000)
    return kind, text.encode('utf-8', 'surrogatepass')


def _json_slots(node, path, depth=0):
    yield path
    if depth > 6:
        return
    items = node.items() if isinstance(node, dict) else enumerate(node[:20]) if isinstance(node, list) else ()
    for key, child in items:
        yield from _json_slots(child, path + (key,), depth + 1)


def _json_get(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def _json_set(doc, path, value):
    if not path:
        return value
    _json_get(doc, path[:-1])[path[-1]] = value
    return doc


def mutate_jsonl(data, rng):
    lines = data.split(b'\n')
    n = rng.randrange(len(lines))
    kind, lines[n] = mutate_json(lines[n], rng)
    return 'line-' + kind, b'\n'.join(lines)


def mutate_safetensors(data, rng):
    """(kind, new bytes): a header field (shape, dtype, offsets, the header length) set to an extreme."""
    length = int.from_bytes(data[:8], 'little')
    try:
        header = json.loads(data[8:8 + length])
    except (ValueError, UnicodeDecodeError):
        return mutate_bytes(data, rng)
    names = [k for k in header if k != '__metadata__']
    kind = rng.choice(['st-shape', 'st-dtype', 'st-offsets', 'st-length', 'st-json'])
    if kind == 'st-length':
        value = rng.choice(EXTREMES + [length - 1, length + 1, len(data)])
        return kind, value.to_bytes(8, 'little') + data[8:]
    if kind == 'st-json' or not names:
        kind, text = mutate_json(data[8:8 + length], rng)
    else:
        entry = header[rng.choice(names)]
        if kind == 'st-shape':
            entry['shape'] = list(entry['shape']) or [1]
            entry['shape'][rng.randrange(len(entry['shape']))] = rng.choice(
                [0, -1, 1 << 62, 10 ** 30, 1.5, '8', None] + EXTREMES)
            if rng.random() < 0.5:
                entry['shape'].append(rng.choice([1, 0, 1 << 40]))
        elif kind == 'st-dtype':
            entry['dtype'] = rng.choice(['F8_E4M3', 'I4', 'XX', 'U64', 'F64', 'BOOL', 'I8', 5, None])
        else:
            entry['data_offsets'] = [rng.choice(EXTREMES + [-1, 1.5]), rng.choice(EXTREMES + [-8, 'x'])]
        text = json.dumps(header).encode()
    return kind, len(text).to_bytes(8, 'little') + text + data[8 + length:]


def gguf_slots(path):
    """[(offset, width, what)] of every integer in a GGUF header: counts, string and array lengths,
    value types, tensor ranks, dims, types and offsets."""
    import gguf
    from numpy.lib.array_utils import byte_bounds
    reader = gguf.GGUFReader(path, 'r')
    base = byte_bounds(reader.data)[0]
    slots = [(8, 8, 'gguf-tensor-count'), (16, 8, 'gguf-kv-count')]
    fields = [(f, 'gguf-kv') for f in reader.fields.values()] + [(t.field, 'gguf-tensor-info') for t in reader.tensors]
    for field, what in fields:
        for part in field.parts:
            if part.dtype.kind in 'ui' and part.size == 1:
                slots.append((byte_bounds(part)[0] - base, part.dtype.itemsize, what))
    return slots


def mutate_gguf(data, rng, slots):
    if rng.random() < 0.3:
        return mutate_bytes(data, rng)
    offset, width, what = slots[rng.randrange(2)] if rng.random() < 0.1 else rng.choice(slots)  # the counts too
    old = int.from_bytes(data[offset:offset + width], 'little')
    value = rng.choice(EXTREMES + [old + 1, max(0, old - 1), old * 2, old << 20]) % (1 << (8 * width))
    return what, data[:offset] + value.to_bytes(width, 'little') + data[offset + width:]


def mutate_file(path, rng, gguf_slot_cache):
    """Mutate `path` in place with the mutator its kind calls for; returns the mutation's kind."""
    with open(path, 'rb') as f:
        data = f.read()
    name = os.path.basename(path)
    if name.endswith('.gguf'):
        kind, data = mutate_gguf(data, rng, gguf_slot_cache[name])
    elif name.endswith('.safetensors') and rng.random() < 0.7:
        kind, data = mutate_safetensors(data, rng)
    elif name.endswith('.jsonl') and rng.random() < 0.7:
        kind, data = mutate_jsonl(data, rng)
    elif name.endswith('.json') and rng.random() < 0.8:
        kind, data = mutate_json(data, rng)
    else:
        kind, data = mutate_bytes(data, rng)
    with open(path, 'wb') as f:
        f.write(data)
    return kind


def reseal(folder, filename):
    """A hostile but self-consistent prepared folder: the manifest's size and sha256 of `filename`
    made to match its (mutated) bytes, so the reader gets past the checksum."""
    from slowllama.weights.files import sha256_file
    manifest_path = os.path.join(folder, 'manifest.json')
    with open(manifest_path) as f:
        manifest = json.load(f)
    path = os.path.join(folder, filename)
    manifest['files'][filename] = {'sha256': sha256_file(path), 'size': os.path.getsize(path)}
    with open(manifest_path, 'w') as f:
        json.dump(manifest, f)


# --- the readers ------------------------------------------------------------------------------
# Each: (the input to copy and mutate, files of it to mutate or None for all, the read).


def _prepare(case):
    import slowllama
    slowllama.prepare(case.input, os.path.join(case.scratch, 'out'), dtype=case.rng.choice(['fp32', 'bf16']))


def _load_prepared(case):
    import torch

    import slowllama
    from slowllama.tokenizer.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(case.input)
    tokenizer.decode(tokenizer.encode('the keeper of the lamp'))
    model = slowllama.load(case.input, offload=case.rng.choice(['disk', 'ram']))
    model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=2)


def _verify(case):
    from slowllama.weights.prepared import verify_model
    verify_model(case.input)


def _adapter(case):
    import torch

    import slowllama
    model = slowllama.load(case.corpus['prepared'], adapter=case.input)
    model.logits(torch.tensor([[1, 5, 9]]))


def _export(case):
    from slowllama.weights.formats.export import export
    fmt = case.rng.choice(['hf', 'meta', 'peft'])
    export(case.given('prepared'), os.path.join(case.scratch, 'out'), fmt, adapter=case.given('adapter'))


def _resume(case):
    run_finetune(case.corpus['prepared'], case.corpus['text.txt'], case.input, 3, '--resume')


def _data(case):
    from slowllama.data.dataset import load_data
    from slowllama.tokenizer.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(case.corpus['prepared'])
    data = load_data(case.input, tokenizer, seq_len=16, batch_size=2, val_fraction=case.rng.choice([0.0, 0.3]),
                     pack=case.rng.random() < 0.5)
    data.train.batch(0)


def _tokenizer(case):
    from slowllama.tokenizer.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(case.input)
    ids = tokenizer.encode('odalys keeps the lamp', eos=True)
    tokenizer.decode(ids)
    if tokenizer.chat_template:
        tokenizer.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True)


def _gguf_config(case):
    from slowllama.weights.formats import gguf
    gguf.read_config(case.input)
    from slowllama.tokenizer.gguf_tokenizer import tokenizer_files
    tokenizer_files(gguf.open_reader(case.input), case.input)


# reader -> (inputs it reads, files to mutate (None: any), the read); weights say how often each runs:
# the header-level readers are fast, so they take many more cases
READERS = {
    'gguf-header': (['bpe.gguf', 'spm.gguf'], None, _gguf_config, 6),
    'prepare-gguf': (['bpe.gguf', 'spm.gguf'], None, _prepare, 2),
    'prepare-hf': (['hf'], None, _prepare, 2),
    'prepare-meta': (['meta'], None, _prepare, 2),
    'load-prepared': (['prepared'], None, _load_prepared, 3),
    'load-packed': (['packed'], None, _load_prepared, 2),
    'verify': (['prepared'], ['manifest.json'], _verify, 2),
    'adapter': (['adapter'], None, _adapter, 2),
    'export': (['adapter', 'prepared'], ['adapter_config.json', 'adapter_model.safetensors', 'manifest.json'],
               _export, 1),
    'resume': (['run'], None, _resume, 1),
    'data': (['text.txt', 'text.jsonl', 'alpaca.jsonl', 'chat.jsonl'], None, _data, 6),
    'tokenizer': (['hf'], ['tokenizer.json', 'tokenizer_config.json'], _tokenizer, 4),
}


class Case:
    """A copy of one valid input in `scratch`, one of its files mutated as the seed says."""

    def __init__(self, name, seed, corpus, scratch, inputs, only=None):
        self.name, self.seed, self.corpus, self.scratch = name, seed, corpus, scratch
        self.rng = random.Random(f'{name}:{seed}')
        self.mutated_input = self.rng.choice(inputs)
        source = corpus[self.mutated_input]
        self.input = os.path.join(scratch, os.path.basename(source))
        if os.path.isdir(source):
            shutil.copytree(source, self.input)
            files = sorted(_files(self.input))
            if only:
                files = [f for f in files if os.path.basename(f) in only] or files
        else:
            shutil.copyfile(source, self.input)
            files = [self.input]
        self.file = self.rng.choice(files)

    def mutate(self, gguf_slot_cache):
        kind = mutate_file(self.file, self.rng, gguf_slot_cache)
        relative = os.path.relpath(self.file, self.input)
        if self.mutated_input in ('prepared', 'packed') and relative != 'manifest.json' and self.rng.random() < 0.5:
            reseal(self.input, relative)  # past the checksum, as a stranger's folder would be
            kind += '+resealed'
        return kind

    def given(self, name):
        """The path of input `name`: the mutated copy when it is the one mutated."""
        return self.input if self.mutated_input == name else self.corpus[name]


def _files(folder):
    for parent, _, names in os.walk(folder):
        for name in names:
            yield os.path.join(parent, name)


def run_case(reader, seed, corpus, gguf_slot_cache, mutate=True):
    """-> (outcome, mutation kind, detail). outcome: ok | refused | bug | unnamed."""
    from slowllama.errors import SlowLlamaError
    scratch = tempfile.mkdtemp(prefix='fuzz-')
    try:
        inputs, only, read, _ = READERS[reader]
        case = Case(reader, seed, corpus, scratch, inputs, only)
        kind = case.mutate(gguf_slot_cache) if mutate else 'none'
        try:
            read(case)
        except SlowLlamaError as e:
            message = str(e)
            if '\n' in message.strip() or scratch not in message:
                return 'unnamed', kind, message[:300]
            return 'refused', kind, message[:300]
        except BaseException as e:  # MemoryError (the cap), RecursionError and the rest: all findings
            return 'bug', kind, f'{type(e).__name__}: {e}'[:300] + '\n' + traceback.format_exc()[-3000:]
        return 'ok', kind, ''
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- workers ----------------------------------------------------------------------------------


def _worker(conn, corpus, memory_cap):
    import resource

    import torch
    torch.set_num_threads(1)
    for module in ('slowllama', 'slowllama.cli', 'slowllama.recipes.finetune', 'slowllama.weights.formats.export'):
        importlib.import_module(module)  # before the cap: the cap is on what a case adds
    used = _address_space()
    resource.setrlimit(resource.RLIMIT_AS, (used + memory_cap, used + memory_cap))
    slots = {name: gguf_slots(corpus[name]) for name in corpus if name.endswith('.gguf')}
    conn.send('ready')
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(run_case(*job, corpus, slots))


def _address_space():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmSize:'):
                return int(line.split()[1]) * 1024
    return 0


class Worker:
    """A spawned process running cases one at a time; replaced when a case hangs or kills it."""

    def __init__(self, corpus, memory_cap):
        context = multiprocessing.get_context('spawn')  # not fork: the parent's torch threads would not survive it
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, corpus, memory_cap), daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(300) or self.conn.recv() != 'ready':
            raise RuntimeError('fuzz worker did not start')
        self.job, self.started = None, None

    def start(self, reader, seed):
        self.job, self.started = (reader, seed), time.monotonic()
        self.conn.send(self.job)

    def result(self):
        """The running case's result, once there is one (None while it runs)."""
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            return 'crash', '?', f'worker died (exit code {self.process.exitcode})'
        if time.monotonic() - self.started > CASE_SECONDS:
            return 'hang', '?', f'no result within {CASE_SECONDS}s'
        return None

    def close(self, kill=False):
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def fuzz(corpus, seconds=None, seed=0, workers=2, max_cases=None, readers=None, memory_cap=MEMORY_CAP, log=None):
    """Run cases round the readers (by weight) until `seconds` pass or `max_cases` have started (None:
    no such limit); returns (counts, findings). The cases are the first draws of Random(seed), so a
    fixed number of them is a fixed set of cases, whatever the machine's speed.
    counts: Counter of (reader, mutation kind, outcome); findings: [(reader, seed, outcome, kind, detail)]."""
    from multiprocessing.connection import wait
    readers = readers or list(READERS)
    schedule = [r for r in readers for _ in range(READERS[r][3])]
    rng = random.Random(seed)
    counts, findings = Counter(), []
    pool = [Worker(corpus, memory_cap) for _ in range(workers)]
    deadline = time.monotonic() + seconds if seconds is not None else float('inf')
    started = 0
    try:
        for worker in pool:
            worker.start(rng.choice(schedule), rng.randrange(1 << 32))
            started += 1
        while any(w.job for w in pool):
            wait([w.conn for w in pool if w.job], timeout=1.0)
            for i, worker in enumerate(pool):
                result = worker.result() if worker.job else None
                if result is None:
                    continue
                (reader, case_seed), (outcome, kind, detail) = worker.job, result
                counts[reader, kind, outcome] += 1
                worker.job = None
                if outcome in FINDINGS:
                    findings.append((reader, case_seed, outcome, kind, detail))
                    if log:
                        log(f'FINDING {outcome} {reader} seed {case_seed} ({kind}): {detail.splitlines()[0]}')
                if outcome in ('hang', 'crash'):
                    worker.close(kill=True)
                    pool[i] = worker = Worker(corpus, memory_cap)
                if time.monotonic() < deadline and (max_cases is None or started < max_cases):
                    worker.start(rng.choice(schedule), rng.randrange(1 << 32))
                    started += 1
    finally:
        for worker in pool:
            worker.close(kill=worker.job is not None)
    return counts, findings


def replay(corpus, reader, seed):
    """One case in this process (no cap): for debugging a finding."""
    slots = {name: gguf_slots(corpus[name]) for name in corpus if name.endswith('.gguf')}
    return run_case(reader, seed, corpus, slots)


def report(counts):
    """Lines: cases per reader, per mutation kind, per outcome."""
    lines = []
    for label, index in (('reader', 0), ('mutation', 1), ('outcome', 2)):
        totals = Counter()
        for key, n in counts.items():
            totals[key[index]] += n
        lines.append(f'{label}: ' + ', '.join(f'{k} {v}' for k, v in sorted(totals.items())))
    by_reader = Counter()
    for (reader, _, outcome), n in counts.items():
        by_reader[reader, outcome] += n
    for reader in sorted({r for r, _ in by_reader}):
        lines.append(f'  {reader}: ' + ', '.join(f'{o} {by_reader[reader, o]}' for o in
                                                  ('ok', 'refused', *FINDINGS) if by_reader[reader, o]))
    return lines


# --- the real command line, in a child process under a memory cap --------------------------------

def _finetune_cli(case, *extra):
    return finetune_argv(case.given('prepared'), case.given('text.txt'), os.path.join(case.scratch, 'run'), 1,
                         '--adapter', case.given('adapter'), *extra)


# command -> (inputs it reads, argv for the case)
COMMANDS = {
    'prepare': (['bpe.gguf', 'spm.gguf', 'hf', 'meta'],
                lambda case: ['prepare', case.input, os.path.join(case.scratch, 'out')]),
    'finetune': (['prepared', 'text.txt', 'chat.jsonl', 'adapter'], lambda case: _finetune_cli(case)),
    'test_gen': (['prepared', 'adapter'], lambda case: ['test_gen', case.given('prepared'), 'cpu', '--lora',
                                                       case.given('adapter'), '--max-new-tokens', '2']),
    'export': (['prepared', 'adapter'], lambda case: [
        'export', '--model', case.given('prepared'), '--lora', case.given('adapter'), '--format',
        case.rng.choice(['hf', 'meta', 'peft']), '--out', os.path.join(case.scratch, 'out')]),
    'verify': (['prepared'], lambda case: ['verify', case.input]),
    'resume': (['run'], lambda case: finetune_argv(case.corpus['prepared'], case.corpus['text.txt'], case.input,
                                                   3, '--resume')),
}
CLI_MEMORY = 6 << 30   # the whole child: torch's import included
CLI_SECONDS = 120


def run_cli_case(command, seed, corpus, gguf_slot_cache):
    """One mutated input through `python -m slowllama COMMAND` -> (outcome, kind, detail):
    ok (exit 0), refused (exit != 0, the last line 'error: ' naming the file, no traceback), or a finding."""
    import resource
    import subprocess

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (CLI_MEMORY, CLI_MEMORY))
    scratch = tempfile.mkdtemp(prefix='fuzz-cli-')
    try:
        inputs, argv = COMMANDS[command]
        case = Case(command, seed, corpus, scratch, inputs)
        kind = case.mutate(gguf_slot_cache)
        env = {**os.environ, 'PYTHONPATH': os.path.dirname(HERE)}
        try:
            result = subprocess.run([sys.executable, '-m', 'slowllama', *argv(case)], capture_output=True,
                                    text=True, timeout=CLI_SECONDS, preexec_fn=cap, env=env, cwd=scratch)
        except subprocess.TimeoutExpired:
            return 'hang', kind, f'no exit within {CLI_SECONDS}s'
        lines = result.stderr.strip().splitlines()
        if result.returncode == 0:
            return 'ok', kind, ''
        if result.returncode < 0:
            return 'crash', kind, f'killed by signal {-result.returncode}: {result.stderr[-2000:]}'
        if 'Traceback' in result.stderr or not lines or not lines[-1].startswith('error: '):
            return 'bug', kind, result.stderr[-3000:]
        return ('refused' if scratch in lines[-1] else 'unnamed'), kind, lines[-1][:300]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def fuzz_cli(corpus, cases_per_command, seed=0, commands=None, log=None):
    rng = random.Random(seed)
    slots = {name: gguf_slots(corpus[name]) for name in corpus if name.endswith('.gguf')}
    counts, findings = Counter(), []
    for command in commands or COMMANDS:
        for _ in range(cases_per_command):
            case_seed = rng.randrange(1 << 32)
            outcome, kind, detail = run_cli_case(command, case_seed, corpus, slots)
            counts['cli-' + command, kind, outcome] += 1
            if outcome in FINDINGS:
                findings.append(('cli-' + command, case_seed, outcome, kind, detail))
                if log:
                    log(f'FINDING {outcome} cli-{command} seed {case_seed} ({kind}): {detail.splitlines()[-1]}')
    return counts, findings
