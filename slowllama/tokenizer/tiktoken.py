"""Llama-3's tokenizer.model as Meta ships it: a tiktoken BPE file (one `base64(token) rank` per line),
turned into a tokenizer.json for the `tokenizers` library, as transformers' TikTokenConverter does.

tiktoken merges the adjacent pair whose join has the lowest rank; the equivalent BPE merges are,
for each multi-byte token, the last merge tiktoken makes to build it, ordered by rank. Meta's
tokenizer.py adds 256 special tokens after the ranked ones; their names are Llama-3.1's.
"""
import base64
import json
import re

from ..errors import SlowLlamaError
from .gguf_tokenizer import LLAMA3_SPLIT

LINE = re.compile(rb'^[A-Za-z0-9+/]+=* \d+$')
SPECIAL_NAMES = ['<|begin_of_text|>', '<|end_of_text|>', '<|reserved_special_token_0|>',
                 '<|reserved_special_token_1|>', '<|finetune_right_pad_id|>', '<|step_id|>',
                 '<|start_header_id|>', '<|end_header_id|>', '<|eom_id|>', '<|eot_id|>', '<|python_tag|>']


def is_tiktoken(data: bytes):
    first = data.split(b'\n', 1)[0].strip()
    return bool(LINE.match(first))


def read_ranks(data, path):
    ranks = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise SlowLlamaError(f'{path}: line {n} is not `base64-token rank` (corrupt tiktoken file)') from None
    return ranks


def special_tokens(count):
    names = SPECIAL_NAMES[:count]
    return names + [f'<|reserved_special_token_{i}|>' for i in range(2, 2 + count - len(names))]


def tokenizer_files(data, path, vocab_size):
    """{'tokenizer.json': bytes, 'tokenizer_config.json': bytes} for a tiktoken file."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    ranks = read_ranks(data, path)
    spell = _byte_spelling()
    vocab = {''.join(spell[b] for b in token): rank for token, rank in ranks.items()}
    merges = [(''.join(spell[b] for b in left), ''.join(spell[b] for b in right))
              for left, right in _merges(ranks)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    specials = special_tokens(max(vocab_size - len(ranks), 0))
    tokenizer.add_special_tokens([AddedToken(name, normalized=False, special=True) for name in specials])
    config = {'add_bos_token': True}
    if specials:
        config.update(bos_token=specials[0], eos_token=specials[1] if len(specials) > 1 else specials[0])
    return {'tokenizer.json': tokenizer.to_str().encode(),
            'tokenizer_config.json': (json.dumps(config, indent=2) + '\n').encode()}


def _merges(ranks):
    """[(left, right)] ordered by the rank of left + right."""
    found = []
    for token, rank in ranks.items():
        if len(token) > 1:
            parts = _bpe(ranks, token, rank)
            if len(parts) == 2:
                found.append((rank, parts[0], parts[1]))
    return [(left, right) for _, left, right in sorted(found)]


def _bpe(ranks, token, max_rank):
    """tiktoken's merging of `token`'s bytes, stopping before any merge ranked max_rank or later."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        pair_ranks = [ranks.get(a + b) for a, b in zip(parts[:-1], parts[1:])]
        best = min((r, i) for i, r in enumerate(pair_ranks) if r is not None) if any(
            r is not None for r in pair_ranks) else None
        if best is None or best[0] >= max_rank:
            break
        i = best[1]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def _byte_spelling():
    """GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
    printable = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + \
        list(range(ord('®'), ord('ÿ') + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
