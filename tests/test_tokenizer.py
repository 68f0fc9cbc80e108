"""Tokenizers: tokenizer.model through sentencepiece, tokenizer.json through `tokenizers`, and the
tokenizer files built from a GGUF's metadata (SentencePiece `llama` and byte-level BPE `gpt2`)
encoding exactly as the tokenizer they were made from."""
import json

import pytest
from checkpoints import write_gguf
from conftest import make_hf_model

import slowllama
from slowllama.tokenizer.gguf_tokenizer import tokenizer_files
from slowllama.tokenizer.tokenizer import load_tokenizer
from slowllama.weights.formats.gguf import open_reader

CORPUS = [f'The quick brown fox {i} jumps over the lazy dog; Ada wrote {i * 7} notes, naïvely.' for i in range(400)]
TEXTS = ['The quick brown fox', 'Ada wrote 12345 notes, naïvely!', 'zebra 🦓 unseen ünïcödé', 'a  b\nc']
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope='module')
def spm_model(tmp_path_factory):
    import sentencepiece
    folder = tmp_path_factory.mktemp('spm')
    (folder / 'corpus.txt').write_text('\n'.join(CORPUS))
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / 'corpus.txt'), model_prefix=str(folder / 'tokenizer'), vocab_size=320,
        model_type='bpe', byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
        normalization_rule_name='identity', remove_extra_whitespaces=False)
    return folder


@pytest.fixture(scope='module')
def bpe_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    folder = tmp_path_factory.mktemp('bpe')
    tokenizer.save(str(folder / 'tokenizer.json'))
    return folder, tokenizer


def test_sentencepiece_folder(spm_model):
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model / 'tokenizer.model'))
    tok = load_tokenizer(spm_model)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    for text in TEXTS:
        assert tok.encode(text) == [1] + sp.encode(text)
        assert tok.encode(text, bos=False, eos=True) == sp.encode(text) + [2]
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


def test_tokenizer_json_folder_with_config(bpe_tokenizer):
    folder, reference = bpe_tokenizer
    (folder / 'tokenizer_config.json').write_text(json.dumps(
        {'bos_token': '<|im_start|>', 'eos_token': {'content': '<|im_end|>'}, 'pad_token': '<|endoftext|>',
         'add_bos_token': False, 'chat_template': CHAT_TEMPLATE}))
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    rendered = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True)
    assert rendered == '<|im_start|><|user|>hi<|im_end|><|assistant|>'


def sentencepiece_gguf_fields(model_file):
    """The tokenizer metadata llama.cpp's convert_hf_to_gguf writes for a SentencePiece vocabulary."""
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    return {'add_tokenizer_model': 'llama', 'add_token_list': [sp.id_to_piece(i) for i in range(n)],
            'add_token_scores': [sp.get_score(i) for i in range(n)], 'add_token_types': types,
            'add_bos_token_id': sp.bos_id(), 'add_eos_token_id': sp.eos_id(), 'add_unk_token_id': sp.unk_id(),
            'add_pad_token_id': sp.pad_id(), 'add_add_bos_token': True, 'add_chat_template': CHAT_TEMPLATE}


def test_gguf_sentencepiece_tokenizer_round_trips(spm_model, tmp_path):
    import sentencepiece
    hf_model = make_hf_model(tmp_path / 'hf', seed=6, vocab_size=320)
    write_gguf(tmp_path / 'm.gguf', hf_model, {}, tokenizer=sentencepiece_gguf_fields(spm_model / 'tokenizer.model'))
    slowllama.prepare(tmp_path / 'm.gguf', tmp_path / 'out', dtype='fp32')
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_model / 'tokenizer.model'))
    tok = load_tokenizer(tmp_path / 'out')
    assert tok.kind == 'sentencepiece' and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    for text in TEXTS:
        assert tok.encode(text) == [1] + sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    assert tok.apply_chat_template([{'role': 'user', 'content': 'hi'}]) == '<s><|user|>hi</s>'


def test_gguf_byte_level_bpe_tokenizer_round_trips(bpe_tokenizer, tmp_path):
    _, reference = bpe_tokenizer
    vocab = reference.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(reference.to_str())['model']['merges']
    fields = {'add_tokenizer_model': 'gpt2', 'add_tokenizer_pre': 'default', 'add_token_list': tokens,
              'add_token_types': [3 if t.startswith('<|') else 1 for t in tokens],
              'add_token_merges': [' '.join(m) if isinstance(m, list) else m for m in merges],
              'add_bos_token_id': 1, 'add_eos_token_id': 2, 'add_pad_token_id': 0, 'add_add_bos_token': False,
              'add_chat_template': CHAT_TEMPLATE}
    hf_model = make_hf_model(tmp_path / 'hf', seed=7, vocab_size=len(tokens))
    write_gguf(tmp_path / 'm.gguf', hf_model, {}, tokenizer=fields)
    files = tokenizer_files(open_reader(str(tmp_path / 'm.gguf')), 'm.gguf')
    assert set(files) == {'tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'}
    slowllama.prepare(tmp_path / 'm.gguf', tmp_path / 'out', dtype='fp32')
    tok = load_tokenizer(tmp_path / 'out')
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 0, False)
    for text in TEXTS + ['<|im_start|>user hi<|im_end|>']:
        assert tok.encode(text) == reference.encode(text).ids, text
        assert tok.decode(tok.encode(text), skip_special=False) == text


def test_unknown_gguf_tokenizer_type_is_refused(tmp_path):
    hf_model = make_hf_model(tmp_path / 'hf', seed=8)
    fields = {'add_tokenizer_model': 'bert', 'add_token_list': [f't{i}' for i in range(128)]}
    write_gguf(tmp_path / 'm.gguf', hf_model, {}, tokenizer=fields)
    with pytest.raises(slowllama.SlowLlamaError, match="m.gguf: tokenizer type 'bert' is not supported"):
        slowllama.prepare(tmp_path / 'm.gguf', tmp_path / 'out')


def test_llama3_tiktoken_tokenizer_model_becomes_tokenizer_json(bpe_tokenizer, tmp_path):
    """A Meta Llama-3 folder's tokenizer.model (tiktoken ranks) encodes as the BPE it was made from."""
    import base64

    from checkpoints import hf_params, write_meta
    from tokenizers import Regex, Tokenizer, pre_tokenizers

    from slowllama.tokenizer.gguf_tokenizer import LLAMA3_SPLIT
    from slowllama.tokenizer.tiktoken import _byte_spelling
    _, reference = bpe_tokenizer
    reference = Tokenizer.from_str(reference.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([   # Llama-3's pre-tokenizer on the same merges
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    unspell = {c: b for b, c in _byte_spelling().items()}
    vocab = reference.get_vocab(with_added_tokens=False)
    ranked = sorted((i, bytes(unspell[c] for c in token)) for token, i in vocab.items() if i >= 3)
    lines = [f'{base64.b64encode(token).decode()} {rank}' for rank, (_, token) in enumerate(ranked)]
    hf_model = make_hf_model(tmp_path / 'hf', seed=9, vocab_size=len(ranked) + 256, intermediate_size=256)
    write_meta(tmp_path / 'meta', hf_model, 1, hf_params(hf_model, vocab_size=len(ranked) + 256))
    (tmp_path / 'meta' / 'tokenizer.model').write_text('\n'.join(lines) + '\n')
    slowllama.prepare(tmp_path / 'meta', tmp_path / 'out', dtype='fp32')
    tok = load_tokenizer(tmp_path / 'out')
    assert tok.bos_id == len(ranked) and tok.eos_id == len(ranked) + 1 and tok.add_bos
    shift = {i: rank for rank, (i, _) in enumerate(ranked)}  # reference ids -> tiktoken ranks
    for text in TEXTS:
        assert tok.encode(text, bos=False) == [shift[i] for i in reference.encode(text).ids], text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode('<|eot_id|>', bos=False) == [len(ranked) + 9]
