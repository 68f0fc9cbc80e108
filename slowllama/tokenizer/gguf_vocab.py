"""A prepared folder's tokenizer as llama.cpp's GGUF metadata (the reverse of gguf_tokenizer.py).

Byte-level BPE (tokenizer.json with a ByteLevel pre-tokenizer) becomes `gpt2`: tokens, types and
merges, plus the name of the split rule llama.cpp applies before BPE (`tokenizer.ggml.pre`).
SentencePiece (tokenizer.model), and SentencePiece-style BPE in a tokenizer.json (Metaspace), become
`llama`: tokens, scores and types, which llama.cpp merges by score. Special token ids, add_bos and
the chat templates come from our Tokenizer, which read them from tokenizer_config.json and the
folder's chat template files.
"""
import json
import os

from ..errors import SlowLlamaError
from .chat_template import gguf_template_metadata
from .gguf_tokenizer import BYTE, CONTROL, LLAMA3_SPLIT, NORMAL, SPECIAL_TOKENS, UNKNOWN, UNUSED, USER_DEFINED
from .tokenizer import load_tokenizer

SPM_SPACE = '\u2581'


def vocab_metadata(model_dir, vocab_size):
    """{GGUF key: value} describing the folder's tokenizer, padded to the model's vocab_size rows;
    {} when the folder has no tokenizer."""
    try:
        tokenizer = load_tokenizer(model_dir)
    except SlowLlamaError as e:
        if 'no tokenizer.json or tokenizer.model' in str(e):
            return {}
        raise
    spm_path = os.path.join(str(model_dir), 'tokenizer.model')
    if tokenizer.kind == 'sentencepiece':
        vocab = _sentencepiece(tokenizer.backend)
    elif os.path.exists(spm_path) and not _is_byte_level(json.loads(tokenizer.backend.to_str())):
        import sentencepiece  # Llama-2 folders carry both; the .model has the scores llama.cpp merges by
        vocab = _sentencepiece(sentencepiece.SentencePieceProcessor(model_file=spm_path))
    else:
        vocab = _from_tokenizer_json(json.loads(tokenizer.backend.to_str()))
    tokens = vocab['tokenizer.ggml.tokens']
    if len(tokens) > vocab_size:
        raise SlowLlamaError(f'{model_dir}: the tokenizer has {len(tokens)} tokens but the model only '
                             f'{vocab_size} embedding rows')
    _pad(vocab, vocab_size)
    special = {'bos_token': tokenizer.bos_id, 'eos_token': tokenizer.eos_id, 'pad_token': tokenizer.pad_id,
               'unk_token': vocab.pop('unk_id', None)}
    unk_text = tokenizer.config.get('unk_token')
    unk_text = unk_text.get('content') if isinstance(unk_text, dict) else unk_text
    if special['unk_token'] is None and unk_text in tokens:
        special['unk_token'] = tokens.index(unk_text)
    for name, token_id in special.items():
        if token_id is not None:
            vocab[SPECIAL_TOKENS[name]] = int(token_id)
    vocab['tokenizer.ggml.add_bos_token'] = bool(tokenizer.add_bos)
    vocab['tokenizer.ggml.add_eos_token'] = bool(tokenizer.config.get('add_eos_token', False))
    vocab.update(gguf_template_metadata(tokenizer.chat_templates))
    return vocab


def _pad(vocab, vocab_size):
    """Embedding rows past the tokenizer's last id get placeholder tokens (llama.cpp wants one per row)."""
    tokens, types = vocab['tokenizer.ggml.tokens'], vocab['tokenizer.ggml.token_type']
    for i in range(len(tokens), vocab_size):
        tokens.append(f'[PAD{i}]')
        types.append(UNUSED)
        if 'tokenizer.ggml.scores' in vocab:
            vocab['tokenizer.ggml.scores'].append(-1e9)


# --- tokenizer.model ---------------------------------------------------------------------------

def _sentencepiece(sp):
    n = sp.get_piece_size()
    types = [CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i) else BYTE if sp.is_byte(i)
             else UNUSED if sp.is_unused(i) else NORMAL for i in range(n)]
    return {'tokenizer.ggml.model': 'llama', 'tokenizer.ggml.tokens': [sp.id_to_piece(i) for i in range(n)],
            'tokenizer.ggml.scores': [float(sp.get_score(i)) for i in range(n)],
            'tokenizer.ggml.token_type': types,
            # the model's normalizer is not exposed; whether "a" becomes "▁a" tells if it adds a space first
            'tokenizer.ggml.add_space_prefix': sp.encode_as_pieces('a')[0].startswith(SPM_SPACE),
            'unk_id': sp.unk_id() if sp.unk_id() >= 0 else None}


# --- tokenizer.json ----------------------------------------------------------------------------

def _from_tokenizer_json(spec):
    model = spec.get('model') or {}
    if model.get('type') != 'BPE':
        raise SlowLlamaError(f"tokenizer.json: a {model.get('type')} tokenizer cannot be written to GGUF "
                             '(BPE and SentencePiece can)')
    tokens, types = _tokens_and_types(model['vocab'], spec.get('added_tokens') or [])
    merges = [m if isinstance(m, str) else ' '.join(m) for m in model.get('merges') or []]
    unk = model.get('unk_token')
    unk_id = model['vocab'].get(unk) if unk else None
    if unk_id is not None:
        types[unk_id] = UNKNOWN
    if _is_byte_level(spec):
        return {'tokenizer.ggml.model': 'gpt2', 'tokenizer.ggml.pre': _pre_name(spec.get('pre_tokenizer')),
                'tokenizer.ggml.tokens': tokens, 'tokenizer.ggml.token_type': types,
                'tokenizer.ggml.merges': merges, 'unk_id': unk_id}
    if _is_metaspace(spec):
        return {'tokenizer.ggml.model': 'llama', 'tokenizer.ggml.tokens': tokens,
                'tokenizer.ggml.scores': _merge_scores(tokens, merges), 'tokenizer.ggml.token_type': types,
                'tokenizer.ggml.add_space_prefix': True, 'unk_id': unk_id}
    raise SlowLlamaError('tokenizer.json: neither byte-level (GPT-2 style) nor SentencePiece-style BPE; '
                         'llama.cpp has no equivalent')


def _tokens_and_types(vocab, added):
    size = 1 + max([*vocab.values(), *(t['id'] for t in added)])
    tokens, types = [f'[PAD{i}]' for i in range(size)], [UNUSED] * size
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = BYTE if len(token) == 6 and token.startswith('<0x') and token.endswith('>') else NORMAL
    for t in added:
        tokens[t['id']] = t['content']
        types[t['id']] = CONTROL if t.get('special') else USER_DEFINED
    return tokens, types


def _merge_scores(tokens, merges):
    """SentencePiece merges the pair whose result scores highest: earlier BPE merges score higher."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(' ', ''), r)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _steps(component):
    """A pre-tokenizer or decoder as a flat list of its steps."""
    if not component:
        return []
    if component.get('type') == 'Sequence':
        return [s for part in component.get('pretokenizers', component.get('decoders', [])) for s in _steps(part)]
    return [component]


def _is_byte_level(spec):
    return any(s.get('type') == 'ByteLevel' for s in _steps(spec.get('pre_tokenizer')) + _steps(spec.get('decoder')))


def _is_metaspace(spec):
    """Spaces written as U+2581: a Metaspace step, or (Llama-2's tokenizer.json) a normalizer that
    prepends or substitutes it."""
    steps = _steps(spec.get('pre_tokenizer')) + _steps(spec.get('decoder'))
    normalizer = spec.get('normalizer') or {}
    rules = normalizer.get('normalizers', [normalizer]) if normalizer.get('type') == 'Sequence' else [normalizer]
    return (any(s.get('type') == 'Metaspace' for s in steps)
            or any(SPM_SPACE in (r.get('prepend') or r.get('content') or '') for r in rules))


def _pre_name(pre_tokenizer):
    """llama.cpp's name for the split rule a ByteLevel BPE applies before merging."""
    steps = _steps(pre_tokenizer)
    kinds = [s.get('type') for s in steps]
    if kinds == ['ByteLevel'] and steps[0].get('use_regex', True):
        return 'gpt-2'
    if kinds == ['Split', 'ByteLevel'] and steps[0].get('pattern', {}).get('Regex') == LLAMA3_SPLIT:
        return 'llama-bpe'
    if kinds == ['Digits', 'ByteLevel'] and steps[0].get('individual_digits'):
        return 'smollm'
    return 'default'
