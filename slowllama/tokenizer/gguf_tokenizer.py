"""The tokenizer a GGUF file describes in its metadata, written as files our Tokenizer loads.

`gpt2` (byte-level BPE) becomes a tokenizer.json built with the `tokenizers` library; `llama`
(SentencePiece) becomes a tokenizer.model: a sentencepiece ModelProto written field by field (the
handful of protobuf fields it needs, so no protobuf package is required). Both get a
tokenizer_config.json with the special tokens and add_bos_token, and the chat templates as
transformers saves them (chat_template.jinja, additional_chat_templates/NAME.jinja).
"""
import json
import struct

from ..errors import SlowLlamaError
from .chat_template import gguf_templates, template_files

# token_type values (llama.cpp's, which are sentencepiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> the split regex its merges were learned with (as transformers' GGUF loader)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {name: LLAMA3_SPLIT for name in
                        ('llama3', 'llama-v3', 'llama-bpe', 'falcon3', 'pixtral', 'dbrx', 'smaug-bpe')}
# Qwen2 / Qwen2.5 / Qwen3 (llama.cpp's 'qwen2'): Llama 3's split but one digit at a time, after NFC
PRE_TOKENIZER_SPLITS['qwen2'] = LLAMA3_SPLIT.replace(r'\p{N}{1,3}', r'\p{N}')
PRE_TOKENIZER_NFC = ('qwen2',)

# tokenizer_config.json key -> GGUF metadata key holding the token id
SPECIAL_TOKENS = {'bos_token': 'tokenizer.ggml.bos_token_id', 'eos_token': 'tokenizer.ggml.eos_token_id',
                  'unk_token': 'tokenizer.ggml.unknown_token_id', 'pad_token': 'tokenizer.ggml.padding_token_id'}


def metadata(reader, key, default=None):
    """The value of a GGUF metadata key (default when the file lacks it)."""
    field = reader.fields.get(key)
    try:
        return field.contents() if field is not None else default
    except UnicodeDecodeError:
        path = getattr(reader.data, 'filename', 'the GGUF file')
        raise SlowLlamaError(f'{path}: metadata {key} is not valid UTF-8') from None


def tokenizer_files(reader, path):
    """{file name: bytes} for the GGUF's tokenizer (empty if the file has none)."""
    model = metadata(reader, 'tokenizer.ggml.model')
    if model is None:
        return {}
    vocab = {key.rsplit('.', 1)[-1]: metadata(reader, key) for key in
             ('tokenizer.ggml.tokens', 'tokenizer.ggml.scores', 'tokenizer.ggml.token_type',
              'tokenizer.ggml.merges', 'tokenizer.ggml.pre', 'tokenizer.ggml.add_space_prefix',
              'tokenizer.ggml.precompiled_charsmap')}
    if not vocab['tokens']:
        raise SlowLlamaError(f'{path}: tokenizer.ggml.tokens is missing or empty')
    vocab['token_type'] = vocab['token_type'] or [NORMAL] * len(vocab['tokens'])
    special = {key: metadata(reader, gguf_key) for key, gguf_key in SPECIAL_TOKENS.items()}
    check_vocab(vocab, special, path)
    if model == 'gpt2':
        files = {'tokenizer.json': byte_level_bpe(vocab, path)}
        add_bos = metadata(reader, 'tokenizer.ggml.add_bos_token', False)
    elif model == 'llama':
        files = {'tokenizer.model': sentencepiece_model(vocab, special)}
        add_bos = metadata(reader, 'tokenizer.ggml.add_bos_token', True)
    else:
        raise SlowLlamaError(f'{path}: tokenizer type {model!r} is not supported (gpt2 and llama are)')
    config = {key: vocab['tokens'][i] for key, i in special.items() if i is not None and i < len(vocab['tokens'])}
    config.update(add_bos_token=bool(add_bos),
                  add_eos_token=bool(metadata(reader, 'tokenizer.ggml.add_eos_token', False)))
    files['tokenizer_config.json'] = (json.dumps(config, indent=2, ensure_ascii=False) + '\n').encode()
    try:
        templates = gguf_templates(lambda key: metadata(reader, key))
    except SlowLlamaError as e:
        raise SlowLlamaError(f'{path}: {e}') from None
    return {**files, **template_files(templates)}


def check_vocab(vocab, special, path):
    """Every value the tokenizer builders read has the type and length they need (a file edited by
    hand or damaged must not end in an exception from inside `tokenizers`)."""
    n = len(vocab['tokens']) if isinstance(vocab['tokens'], list) else 0
    lists = {'tokens': (str,), 'token_type': (int,), 'scores': (int, float), 'merges': (str,),
             'precompiled_charsmap': (int,)}
    for key, types in lists.items():
        value = vocab[key]
        if value is None and key in ('scores', 'merges', 'precompiled_charsmap'):
            continue
        if not isinstance(value, list) or not all(isinstance(v, types) and not isinstance(v, bool) for v in value):
            raise SlowLlamaError(f'{path}: tokenizer.ggml.{key} is not a list of {types[0].__name__}')
        if key in ('token_type', 'scores') and len(value) != n:
            raise SlowLlamaError(f'{path}: tokenizer.ggml.{key} has {len(value)} entries for {n} tokens')
    if vocab['merges'] and not all(' ' in merge for merge in vocab['merges']):
        raise SlowLlamaError(f'{path}: tokenizer.ggml.merges holds an entry that is not two tokens')
    if vocab['precompiled_charsmap'] and not all(0 <= b < 256 for b in vocab['precompiled_charsmap']):
        raise SlowLlamaError(f'{path}: tokenizer.ggml.precompiled_charsmap is not bytes')
    for key, i in special.items():
        if i is not None and not (isinstance(i, int) and 0 <= i < n):
            raise SlowLlamaError(f'{path}: {SPECIAL_TOKENS[key]} {i!r} is not a token id below {n}')


# --- gpt2: byte-level BPE ----------------------------------------------------------------------

def byte_level_bpe(vocab, path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    if not vocab['merges']:
        raise SlowLlamaError(f'{path}: a gpt2 tokenizer without tokenizer.ggml.merges')
    ids = {token: i for i, token in enumerate(vocab['tokens'])}
    merges = [tuple(merge.split(' ', 1)) for merge in vocab['merges']]
    try:
        tokenizer = Tokenizer(models.BPE(vocab=ids, merges=merges, fuse_unk=False))
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge of unknown tokens
        raise SlowLlamaError(f'{path}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({e})') from None
    split = PRE_TOKENIZER_SPLITS.get(vocab['pre'])
    if vocab['pre'] in PRE_TOKENIZER_NFC:
        tokenizer.normalizer = normalizers.NFC()
    if split:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior='isolated'),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    kinds = {CONTROL: True, USER_DEFINED: False}  # token type -> added as special?
    added = [AddedToken(token, normalized=False, special=kinds[kind])
             for token, kind in zip(vocab['tokens'], vocab['token_type']) if kind in kinds]
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])
    return tokenizer.to_str().encode()


# --- llama: a sentencepiece ModelProto -----------------------------------------------------------

def sentencepiece_model(vocab, special):
    """ModelProto bytes: pieces (1), trainer_spec (2), normalizer_spec (3)."""
    scores = vocab['scores'] or [0.0] * len(vocab['tokens'])
    proto = b''.join(_message(1, _piece(token, score, kind))
                     for token, score, kind in zip(vocab['tokens'], scores, vocab['token_type']))
    ids = {40: special['unk_token'], 41: special['bos_token'], 42: special['eos_token'], 43: special['pad_token']}
    trainer = _varint_field(3, 2) + _varint_field(4, len(vocab['tokens']))  # model_type BPE
    trainer += _varint_field(35, int(BYTE in vocab['token_type']))            # byte_fallback
    trainer += b''.join(_varint_field(field, -1 if i is None else i) for field, i in ids.items())
    charsmap = vocab['precompiled_charsmap']
    normalizer = _bytes_field(1, b'nmt_nfkc' if charsmap else b'identity')
    if charsmap:
        normalizer += _bytes_field(2, bytes(charsmap))
    add_prefix = vocab['add_space_prefix']
    normalizer += _varint_field(3, 1 if add_prefix is None else int(add_prefix))  # add_dummy_prefix
    normalizer += _varint_field(4, 0) + _varint_field(5, 1)  # keep whitespace runs; escape spaces as U+2581
    return proto + _message(2, trainer) + _message(3, normalizer)


def _piece(token, score, kind):
    return _bytes_field(1, token.encode()) + _fixed32_field(2, float(score)) + _varint_field(3, int(kind))


def _varint(n):
    n &= (1 << 64) - 1  # negative int32 values are written as 64-bit two's complement, as protobuf does
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _varint_field(field, value):
    return _varint(field << 3) + _varint(value)


def _bytes_field(field, data):
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _fixed32_field(field, value):
    return _varint(field << 3 | 5) + struct.pack('<f', value)


def _message(field, body):
    return _bytes_field(field, body)
