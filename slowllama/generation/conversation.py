"""A multi-turn conversation with a model: the messages so far, rendered with the model's chat
template, and the KV cache of what the model has already read. Each turn renders the whole
conversation again but feeds the model only the tokens its cache does not hold yet, so a turn costs
a pass over the blocks for its own tokens, not for the history."""
import torch

from ..errors import SlowLlamaError
from .completion import TextStream


class Conversation:
    def __init__(self, model, tokenizer, system=None, max_positions=None):
        if not tokenizer.chat_template:
            raise SlowLlamaError(f'{tokenizer.folder or "the model"} has no chat template; give one with '
                                 '--chat-template FILE, or use test_gen for plain completions')
        tokenizer.check_chat_template()
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.max_positions = max_positions or model.cfg.max_seq_len
        self.reset()

    def reset(self):
        """Forget the messages and the cache (the system message stays)."""
        self.messages = [{'role': 'system', 'content': self.system}] if self.system else []
        self.cache = self.model.new_cache()

    def prompt_ids(self):
        """The conversation rendered up to the assistant's next turn, as the model reads it (no BOS
        beyond what the template writes, as training on chat data and transformers do)."""
        return self.tokenizer.encode_chat(self.messages, add_generation_prompt=True)

    def reply(self, user_text, max_new_tokens, temperature=0.0, top_p=1.0, on_text=None):
        """Add the user's message, generate the assistant's answer (on_text(piece) as it comes),
        add it to the conversation and return it."""
        self.messages.append({'role': 'user', 'content': user_text})
        try:
            ids = self.prompt_ids()  # a template may refuse the conversation (raise_exception)
            if len(ids) + max_new_tokens > self.max_positions:
                raise SlowLlamaError(f'the conversation would pass the model\'s {self.max_positions} positions; '
                                     '/reset to start over')
        except SlowLlamaError:
            self.messages.pop()
            raise
        held = self._keep_common_prefix(ids)
        stream = TextStream(self.tokenizer, on_text)
        out = self.model.generate(torch.tensor([ids[held:]]), max_new_tokens, temperature=temperature,
                                  top_p=top_p, on_token=stream.add, cache=self.cache)
        answer = stream.finish(out[0, len(ids) - held:].tolist())
        self.messages.append({'role': 'assistant', 'content': answer})
        return answer

    def _keep_common_prefix(self, ids):
        """Keep the cache's positions that agree with `ids` (at least one token is left to feed);
        a template may render a past answer as other tokens than those generated."""
        held = 0
        for fed, new in zip(self.cache.tokens, ids[:-1]):
            if fed != new:
                break
            held += 1
        return self.cache.keep(held)
