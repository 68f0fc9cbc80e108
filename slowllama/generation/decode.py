"""Generation through the streamed model (generate): what it keeps between tokens and turns, the KV
cache of every block (GenerationCache), and how the next token is chosen (greedy or nucleus
sampling) and when to stop."""
import torch

from ..engine.forward import Layout, embed, forward_blocks
from ..model.block import KVCache, rope_changes_past, rope_table


class GenerationCache:
    """The keys and values of every block for the tokens fed so far (`tokens`; a prefix counts in
    `length` only), kept between generate() calls. keep(n) forgets all but the first n positions,
    so a conversation whose new rendering departs from what was fed goes back to where they agree."""

    def __init__(self, cfg, device, dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.layers, self.tokens = [], []

    @property
    def length(self):
        return self.layers[0].length if self.layers else 0

    def reserve(self, more):
        """Room for `more` positions after those held (a bigger copy when needed; a sliding-window
        cache keeps only its window and grows by itself)."""
        need = self.length + more
        if self.layers and (self.cfg.sliding_window or need <= self.layers[0].k.shape[2]):
            return
        grown = [KVCache.for_model(self.cfg, 1, max(need, 2 * self.length), self.device, self.dtype)
                 for _ in range(self.cfg.n_layers)]
        for new, old in zip(grown, self.layers):
            new.append(old.k[:, :, :old.length], old.v[:, :, :old.length])
        self.layers = grown

    def keep(self, n):
        """Forget all but the first n positions (of a cache started without a prefix); returns how
        many it kept: none when a sliding window has already dropped keys it would need."""
        if self.cfg.sliding_window and n < self.length:
            n = 0
        if n == 0:
            self.layers = []
        for layer in self.layers:
            layer.length = min(layer.length, n)
        del self.tokens[n:]
        return n


def sample(logits, temperature=0.0, top_p=1.0):
    """logits [batch, vocab] -> next token [batch, 1] on the logits' device: argmax at temperature 0,
    else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    if logits.device.type == 'mps':
        # multinomial on mps can draw a token of probability 0 (PyTorch issue 192577), and the
        # nucleus makes exactly those zeros; one row of the vocabulary is quick to bring over
        return _nucleus_sample(logits.cpu(), temperature, top_p).to(logits.device)
    return _nucleus_sample(logits, temperature, top_p)


def _nucleus_sample(logits, temperature, top_p):
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)  # not a boolean index: that waits for the device
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1)


def is_eos(cfg, token):
    eos = cfg.eos_id
    return token in eos if isinstance(eos, (list, tuple)) else token == eos


def generate(parts, tokens, max_new_tokens, temperature=0.0, top_p=1.0, prefix=None, on_token=None, cache=None):
    """[1, T] -> [1, T + n] through the streamed model's parts (engine/forward.Parts) with a KV cache;
    greedy at temperature 0. Stops early at EOS. on_token(id) is called as each token is chosen.
    cache: a GenerationCache kept between calls; `tokens` then continue the tokens it holds, and
    only they go through the blocks (a conversation's new turn)."""
    store, cfg = parts.store, parts.cfg
    tokens = tokens.to(store.device)
    cache = GenerationCache(cfg, store.device, store.dtype) if cache is None else cache
    if prefix is not None and cache.tokens:
        raise ValueError('a prefix can only start a sequence, not continue a cached one')
    x, _ = embed(store, tokens, prefix)
    cache.reserve(x.shape[1] + max_new_tokens)
    out, fed = tokens, tokens[0].tolist()
    for _ in range(max_new_tokens):
        position = cache.length
        if position and rope_changes_past(cfg, position, position + x.shape[1]):  # recompute the cache
            fed = cache.tokens + fed
            cache.keep(0)
            x, position = embed(store, torch.tensor([fed], device=store.device), prefix)[0], 0
            cache.reserve(x.shape[1] + max_new_tokens)
        cos, sin = rope_table(cfg, torch.arange(position, position + x.shape[1]), store.device)
        x = forward_blocks(store, parts.blocks, x, Layout(cos, sin), caches=cache.layers)
        cache.tokens += fed
        next_token = sample(parts.head.logits(x[:, -1]), temperature, top_p)
        out = torch.cat([out, next_token], dim=1)
        if on_token:
            on_token(int(next_token))
        if is_eos(cfg, int(next_token)):
            break
        x, fed = store.embed(next_token), [int(next_token)]
    return out
