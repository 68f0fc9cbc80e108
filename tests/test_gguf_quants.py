"""GGUF K-quants written by export (q4_k_m, q5_k_m, q6_k, q4_k_s, q5_k_s, q3_k_m, q4_0, q5_0):

(a) the `gguf` package's own dequantize of our bytes is the tensor within the error llama.cpp's own
    bytes reach on the same rows;
(b) our bytes are llama.cpp's, block for block, and our type per tensor is llama-quantize's, for two
    tiny models quantized once by llama.cpp (tests/fixtures/llama_cpp_quants.npz, made by
    scripts/make_gguf_quant_fixture.py);
(c) where llama-cpp-python is installed, llama.cpp runs our Q4_K_M file of a tiny model to next-token
    logits as close to the f32 model's as its own Q4_K_M file's;
(d) a Q4_K_M file is read back by prepare and runs to the logits of the file's dequantized weights
    (transformers' GGUF loader, which dequantizes with the gguf package; llama.cpp's own logits where
    it is installed).
"""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import slowllama
from conftest import CORPUS, make_hf_model, save_tiny_tokenizer
from gguf_fixture_model import MODELS, SCHEMES, digest, shapes, weights
from slowllama.weights.formats.export import export
from slowllama.weights.formats.gguf_mixture import more_bits, tensor_types
from slowllama.weights.formats.gguf_quants import quantize

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'llama_cpp_quants.npz')
QK = {'q3_k': 256, 'q4_k': 256, 'q5_k': 256, 'q6_k': 256, 'q4_0': 32, 'q5_0': 32, 'q5_1': 32, 'q8_0': 32}
BLOCK_BYTES = {'q3_k': 110, 'q4_k': 144, 'q5_k': 176, 'q6_k': 210, 'q4_0': 18, 'q5_0': 22, 'q5_1': 24, 'q8_0': 34}
HAVE_LLAMA_CPP = importlib.util.find_spec('llama_cpp') is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAVE_LLAMA_CPP, reason='llama-cpp-python is not installed (CMAKE_ARGS="-DGGML_NATIVE=off" pip install '
    'llama-cpp-python builds it, 10-30 minutes); (a), (b) and the dequantized-reference half of (d) still ran')


def dequantize(data, kind):
    import gguf
    return gguf.quants.dequantize(np.asarray(data), gguf.GGMLQuantizationType[kind.upper()])


@pytest.fixture(scope='module')
def fixture():
    data = np.load(FIXTURE)
    meta = json.loads(str(data['meta']))
    samples = {tuple(key.split('|')): data[key] for key in data.files if key != 'meta'}
    return meta, samples


def sample_input(meta, model, name):
    spec = meta['models'][model]
    shape = tuple(shapes(spec)[name])
    values = weights(spec, name, shape)
    assert digest(values) == meta['digests'][model][name], f'{model} {name}: the regenerated input is not ' \
        'the one llama.cpp quantized (numpy changed its random streams?)'
    return values[:meta['sampled_rows']]


# --- the arithmetic ---------------------------------------------------------------------------------

def test_sums_add_in_order_as_ggml_does():
    """ggml adds a group's values left to right in float32; our encoders rely on numpy reducing axis 0
    of a C-ordered array row after row (not pairwise) to do the same."""
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((32, 4096)) * rng.exponential(1.0, (32, 4096)) ** 3).astype(np.float32)
    running = np.zeros(4096, dtype=np.float32)
    for row in a:
        running = running + row
    assert np.array_equal(np.add.reduce(a, axis=0), running)
    assert not np.array_equal(np.add.reduce(np.ascontiguousarray(a.T), axis=1), running)  # pairwise differs


# --- (b) bit-exact against llama.cpp's quantizer ------------------------------------------------------

def test_bytes_equal_llama_cpps_block_for_block(fixture):
    meta, samples = fixture
    blocks = differ = 0
    kinds = set()
    for (model, name, kind), theirs in samples.items():
        ours = quantize(sample_input(meta, model, name), kind)
        assert ours.shape == theirs.shape, (model, name, kind)
        per_block = (ours.reshape(-1, BLOCK_BYTES[kind]) != theirs.reshape(-1, BLOCK_BYTES[kind])).any(axis=1)
        blocks, differ = blocks + per_block.size, differ + int(per_block.sum())
        kinds.add(kind)
        assert not per_block.any(), f'{model} {name} {kind}: {per_block.sum()} of {per_block.size} blocks differ'
    print(f'llama.cpp {meta["llama_cpp_python"]}: {differ} of {blocks} blocks differ ({sorted(kinds)})')
    assert kinds >= {'q3_k', 'q4_k', 'q5_k', 'q6_k', 'q4_0', 'q5_0', 'q5_1', 'q8_0'}


@needs_llama_cpp
def test_halfway_values_round_to_even_as_ggml_does():
    """Random weights never land exactly half-way between two levels, so the fixture cannot tell
    round-half-to-even (ggml's nearest_int) from round-half-up; weights on a power-of-two grid (a
    model dequantized from another format) do: a step of 2^-6, some values half a step, each
    16-value group's peak the format's largest level (Q6_K: 31 steps, Q3_K: -4). The scales come
    out exactly that step and the levels meet the ties."""
    from gguf_fixture_model import ggml_quantize
    rng = np.random.default_rng(0)
    for low, high, peak, halves in ((-31, 31, 31, 0.15), (-3, 3, -4, 0.3)):
        steps = rng.integers(low, high + 1, (8, 256)).astype(np.float32)
        half = rng.random(steps.shape) < halves
        steps[half] = rng.choice([-0.5, 0.5], int(half.sum()))
        steps[:, ::16] = peak
        x = steps * np.float32(2.0 ** -6)
        for kind in ('q3_k', 'q4_k', 'q5_k', 'q6_k'):
            assert np.array_equal(quantize(x, kind), ggml_quantize(x, kind)), (peak, kind)


@pytest.mark.parametrize('model', sorted(MODELS))
def test_types_are_llama_quantizes(fixture, model):
    meta, _ = fixture
    spec = meta['models'][model]
    table = {name: tuple(shape) for name, shape in shapes(spec).items()}
    for scheme in SCHEMES:
        ours, notes = tensor_types(table, scheme, spec['n_layers'], spec['heads'], spec['kv_heads'])
        theirs = meta['types'][model][scheme]
        assert ours == theirs, (model, scheme, {n: (ours[n], theirs[n]) for n in ours if ours[n] != theirs[n]})
        assert all(name.split(':')[0] in theirs for name in notes)
    # what the fixture exercises: the head, more_bits layers, fallbacks and tied embeddings
    q4km = meta['types'][model]['q4_k_m']
    head = 'output.weight' if not spec['tied'] else 'token_embd.weight'
    assert q4km[head] == 'q6_k'
    for i in range(spec['n_layers']):
        big = spec['n_layers'] == 80 and spec['heads'] != spec['kv_heads']  # llama.cpp's 70B: Q5_K at least
        assert q4km[f'blk.{i}.attn_v.weight'] == ('q6_k' if more_bits(i, spec['n_layers']) else
                                                  'q5_k' if big else 'q4_k')
        assert q4km[f'blk.{i}.ffn_down.weight'] == (('q8_0' if more_bits(i, spec['n_layers']) else 'q5_0')
                                                    if spec['hidden'] % 256 else
                                                    ('q6_k' if more_bits(i, spec['n_layers']) else 'q4_k'))


# --- (a) gguf's dequantize of our bytes --------------------------------------------------------------

def test_gguf_dequantizes_our_bytes_within_llama_cpps_error(fixture):
    meta, samples = fixture
    worst = {}
    for (model, name, kind), theirs in samples.items():
        x = sample_input(meta, model, name)
        ours = dequantize(quantize(x, kind), kind)
        assert ours.shape == x.shape
        err_ours = np.sqrt(np.mean((ours - x) ** 2))
        err_theirs = np.sqrt(np.mean((dequantize(theirs, kind) - x) ** 2))
        assert err_ours <= err_theirs * (1 + 1e-6), (model, name, kind, err_ours, err_theirs)
        worst[kind] = max(worst.get(kind, 0.0), err_ours / np.sqrt(np.mean(x ** 2)))
    print('relative rms error, ours (= llama.cpp\'s):', {k: f'{v:.4f}' for k, v in sorted(worst.items())})
    # and in absolute terms: fewer bits, more error, each well under what would break a model
    assert worst['q8_0'] < worst['q6_k'] < worst['q5_k'] < worst['q4_k'] < worst['q3_k'] < 0.2


@pytest.mark.parametrize('kind', ['q3_k', 'q4_k', 'q5_k', 'q6_k'])
def test_corner_cases_decode_to_what_they_were(kind):
    """All-zero rows and groups stay exactly zero; a constant row comes back close; a large row's
    values within the format's step; nothing is NaN."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x[0] = 0
    x[1, :256] = 0
    x[2] = 0.25
    x[3] *= 1e4
    x[4] *= 1e-3
    x[5, ::7] = 0
    back = dequantize(quantize(x, kind), kind)
    assert np.isfinite(back).all()
    assert (back[0] == 0).all() and (back[1, :256] == 0).all()
    for row in (2, 3, 4, 5):
        assert np.abs(back[row] - x[row]).max() <= 0.3 * np.abs(x[row]).max(), row


def test_rows_that_do_not_fit_are_refused_by_the_encoder():
    with pytest.raises(ValueError, match='256'):
        quantize(np.zeros((2, 320), dtype=np.float32), 'q4_k')


def large_tensor_differences():
    """Beyond the fixture, where llama.cpp is here: 1 M values of every row scale through ggml's own
    ggml_quantize_chunk, for every type we write -> {type: (blocks that differ, blocks)}."""
    from gguf_fixture_model import ggml_quantize
    spec = MODELS['untied']
    x = np.concatenate([weights(spec, f'large.{i}', (64, 4096)) for i in range(4)])
    out = {}
    for kind in ('q3_k', 'q4_k', 'q5_k', 'q6_k', 'q4_0', 'q5_0', 'q5_1', 'q8_0'):
        ours, theirs = quantize(x, kind), ggml_quantize(x, kind)
        per_block = (ours.reshape(-1, BLOCK_BYTES[kind]) != theirs.reshape(-1, BLOCK_BYTES[kind])).any(axis=1)
        out[kind] = (int(per_block.sum()), per_block.size)
    return out


# --- export, prepare, and llama.cpp itself --------------------------------------------------------------

WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=2, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=3)


@pytest.fixture(scope='module')
def wide(tmp_path_factory):
    """(prepared folder, its f32 GGUF): a 256-wide tiny llama (K-quants take rows of 256) with a tokenizer."""
    folder = tmp_path_factory.mktemp('wide')
    model = make_hf_model(folder / 'hf', seed=5, **WIDE)
    with torch.no_grad():  # weights of a trained model's size (std 0.15 over 256 inputs compounds chaotically)
        for name, param in model.named_parameters():
            if 'norm' not in name:
                param.mul_(0.2)
    model.save_pretrained(folder / 'hf')
    save_tiny_tokenizer(folder / 'hf')
    slowllama.prepare(folder / 'hf', folder / 'model', dtype='fp32')
    return folder / 'model', export(folder / 'model', folder / 'f32.gguf', 'gguf', dtype='f32')


def read_gguf(path):
    """{name: (raw data, type name)} and the metadata fields."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith('GGUF.')}
    return {t.name: (np.array(t.data), t.tensor_type.name.lower()) for t in reader.tensors}, fields


def test_export_writes_llama_cpps_mixture_of_our_encodings(wide, tmp_path):
    model_dir, f32 = wide
    out = export(model_dir, tmp_path / 'q4km.gguf', 'gguf', dtype='Q4_K_M')
    tensors, fields = read_gguf(out)
    plain, _ = read_gguf(f32)
    assert fields['general.file_type'] == 15 and fields['general.quantization_version'] == 2  # MOSTLY_Q4_K_M
    # two layers: more_bits is layer 1 only (the last eighth); the head Q6_K; the rest Q4_K
    want = {'blk.0.attn_v.weight': 'q4_k', 'blk.1.attn_v.weight': 'q6_k', 'blk.0.ffn_down.weight': 'q4_k',
            'blk.1.ffn_down.weight': 'q6_k', 'output.weight': 'q6_k', 'token_embd.weight': 'q4_k'}
    for name, (data, kind) in tensors.items():
        values = plain[name][0]
        if values.ndim == 1:
            assert kind == 'f32'
            continue
        assert kind == want.get(name, 'q4_k'), name
        assert np.array_equal(data, quantize(values, kind)), name  # the merged weights, encoded once
        back = dequantize(data, kind)
        assert np.sqrt(np.mean((back - values) ** 2)) < 0.09 * np.sqrt(np.mean(values ** 2)), name  # Q4_K: 0.07 on normal values


def test_rows_that_take_no_k_quant_fall_back_and_are_named(tiny_prepared, tmp_path, capsys):
    model_dir = tiny_prepared[0]  # 64 wide: no row splits into 256-value super-blocks
    out = export(model_dir, tmp_path / 'small.gguf', 'gguf', dtype='q4_k_m')
    printed = capsys.readouterr().out
    tensors, _ = read_gguf(out)
    for name, (_, kind) in tensors.items():
        if kind != 'f32':
            assert f'gguf: {name}: rows of' in printed, name
            assert kind in ('q5_0', 'q8_0'), (name, kind)
    head = 'output.weight' if 'output.weight' in tensors else 'token_embd.weight'
    assert tensors[head][1] == 'q8_0'  # the head's own rule (Q8_0 where Q6_K cannot go)
    assert tensors['blk.0.attn_q.weight'][1] == 'q5_0'


def test_prepare_reads_a_q4_k_m_file_to_its_dequantized_logits(wide, tmp_path):
    """(d) without llama.cpp: transformers' GGUF loader (gguf's dequantize) is the reference."""
    from transformers import AutoModelForCausalLM
    model_dir, _ = wide
    out = export(model_dir, tmp_path / 'q4km.gguf', 'gguf', dtype='q4_k_m')
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file='q4km.gguf', dtype=torch.float32).eval()
    slowllama.prepare(out, tmp_path / 'again', dtype='fp32')
    model = slowllama.load(tmp_path / 'again')
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(tokens).logits
    diff = (model.logits(tokens) - want).abs().max().item()
    print(f'q4_k_m through prepare vs transformers on the dequantized file: max |logit diff| {diff:.2e}')
    assert diff < 1e-4 * want.abs().max().item()
    full = slowllama.load(model_dir).logits(tokens)
    assert 0 < (full - want).abs().max().item()  # the file is quantized, and the reference knows it


def llama_cpp_logits(path, prompts):
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=128, n_threads=2, n_batch=128, logits_all=True, verbose=False)
    out = []
    for tokens in prompts:
        llm.reset()
        llm.eval(tokens)
        out.append(np.array(llm.scores[len(tokens) - 1], dtype=np.float32))
    del llm
    return np.stack(out)


@needs_llama_cpp
def test_llama_cpp_runs_our_q4_k_m_as_close_as_its_own(wide, tmp_path):
    """(c), and (d) against llama.cpp: its own Q4_K_M of our f32 file, prepared, runs to its logits; and
    (b) once more on a large tensor straight through ggml."""
    from gguf_fixture_model import llama_cpp_quantize
    from slowllama.tokenizer.tokenizer import load_tokenizer
    model_dir, f32 = wide
    differ = large_tensor_differences()
    print('blocks that differ from ggml_quantize_chunk on 1 M values:', differ)
    assert all(n == 0 for n, _ in differ.values())
    ours = export(model_dir, tmp_path / 'ours.gguf', 'gguf', dtype='q4_k_m')
    theirs = llama_cpp_quantize(f32, tmp_path / 'theirs.gguf', 'q4_k_m')
    mine, other = read_gguf(ours)[0], read_gguf(theirs)[0]
    assert {n: k for n, (_, k) in mine.items()} == {n: k for n, (_, k) in other.items()}
    same = [np.array_equal(mine[n][0], other[n][0]) for n in mine]
    print(f'q4_k_m: {sum(same)} of {len(same)} tensors byte-identical to llama-quantize\'s')
    assert all(same)
    tokenizer = load_tokenizer(model_dir)
    prompts = [tokenizer.encode(text) for text in CORPUS[:3]]
    exact, ours_q, theirs_q = (llama_cpp_logits(p, prompts) for p in (f32, ours, theirs))
    corr = [min(np.corrcoef(exact[i], q[i])[0, 1] for i in range(len(prompts))) for q in (ours_q, theirs_q)]
    print(f'llama.cpp next-token logits vs f32: our q4_k_m corr {corr[0]:.6f}, llama-quantize\'s {corr[1]:.6f}')
    assert corr[0] >= corr[1] - 1e-4 and corr[0] > 0.95  # a random tiny model: 4 bits cost it some
    # (d): llama.cpp's own file through prepare runs to llama.cpp's logits on it
    slowllama.prepare(theirs, tmp_path / 'prepared', dtype='fp32')
    model = slowllama.load(tmp_path / 'prepared')
    for tokens, want in zip(prompts, theirs_q):
        got = model.logits(torch.tensor([tokens]))[0, -1].numpy()
        c = np.corrcoef(got, want)[0, 1]
        print(f'prepared llama.cpp q4_k_m vs llama.cpp: corr {c:.6f}, max |diff| {np.abs(got - want).max():.3e}')
        assert c > 0.999 and int(got.argmax()) == int(want.argmax())


def test_export_command_line_names_the_schemes_and_the_fallbacks(tiny_prepared, tmp_path):
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'export.py')
    run = lambda *args: subprocess.run([sys.executable, script, *map(str, args)],  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    assert all(s in run('--help').stdout for s in SCHEMES)
    done = run('--model', tiny_prepared[0], '--format', 'gguf', '--dtype', 'q5_k_m', '--out', tmp_path / 'm.gguf')
    assert done.returncode == 0, done.stderr
    assert 'gguf: blk.0.attn_q.weight: rows of 64 values do not split into q5_k blocks of 256; written as q5_1' \
        in done.stdout
    assert read_gguf(tmp_path / 'm.gguf')[1]['general.file_type'] == 17  # MOSTLY_Q5_K_M
    done = run('--model', tiny_prepared[0], '--format', 'gguf', '--dtype', 'iq2_xs', '--out', tmp_path / 'x.gguf')
    assert done.returncode != 0 and 'q4_k_m' in done.stderr and 'Traceback' not in done.stderr
