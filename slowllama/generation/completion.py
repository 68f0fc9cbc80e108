"""Completing a prompt as text: the tokens a model generates (streamed blocks, KV cache), decoded as
they come, so a command can print each piece as soon as it is known. Used by test_gen, chat, the
sample completions shown while finetuning, and the demo."""
import torch

from ..errors import SlowLlamaError


def complete(model, tokenizer, prompt, max_new_tokens=48, temperature=0.0, top_p=1.0, on_text=None,
             prompt_ids=None, on_token=None):
    """The completion of `prompt` as text (the prompt itself not included). on_text(piece) is called
    with each new piece of text as soon as it is known. prompt_ids: the prompt already tokenized (a
    rendered chat, which carries its own BOS). on_token(id): called too as each token is chosen."""
    ids = tokenizer.encode(prompt) if prompt_ids is None else prompt_ids
    if not ids:
        raise SlowLlamaError('--prompt: the prompt encodes to no tokens')
    stream = TextStream(tokenizer, on_text)
    out = model.generate(torch.tensor([ids]), max_new_tokens, temperature=temperature, top_p=top_p,
                         on_token=stream.add if on_token is None else lambda t: (stream.add(t), on_token(t)))
    return stream.finish(out[0, len(ids):].tolist())


class DecodeTraffic:
    """The store's traffic counters (model.traffic()) at each token chosen, as an on_token callback:
    the first token ends the prompt's pass, each later one a decoded token's (its embedding row, the
    blocks as one token fetches them, the head)."""

    def __init__(self, model):
        self.model, self.marks = model, []

    def __call__(self, token):
        self.marks.append(self.model.traffic())

    def per_token(self):
        """{counter: mean per decoded token}, or None before two tokens."""
        if len(self.marks) < 2:
            return None
        first, last, n = self.marks[0], self.marks[-1], len(self.marks) - 1
        return {key: (last[key] - first[key]) / n for key in first}


class TextStream:
    """Decodes the tokens so far and emits only what was added since the last call; text that a
    later token may still change (an incomplete UTF-8 sequence) is held back."""

    def __init__(self, tokenizer, on_text):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids, self.shown = [], ''

    def add(self, token):
        self.ids.append(token)
        self._show(self.tokenizer.decode(self.ids))

    def finish(self, ids):
        text = self.tokenizer.decode(ids)
        self._show(text, final=True)  # no token will complete a broken UTF-8 sequence now: show it as decoded
        return text

    def _show(self, text, final=False):
        if self.on_text is None or (text.endswith('\ufffd') and not final) or not text.startswith(self.shown):
            return
        if len(text) > len(self.shown):
            self.on_text(text[len(self.shown):])
            self.shown = text
