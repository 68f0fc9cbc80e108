"""One small tokenizer interface over tokenizer.json (`tokenizers`) and tokenizer.model (sentencepiece).

Settings that transformers keeps in tokenizer_config.json (add_bos_token, special tokens, chat
template) are read from there when present.
"""
import os

from ...errors import SlowLlamaError
from ..files import read_json

CONFIG_FILE = 'tokenizer_config.json'


class Tokenizer:
    def __init__(self, backend, config, kind):
        self.backend, self.config, self.kind = backend, config, kind
        self.bos_id = self._special_id('bos_token', 'bos')
        self.eos_id = self._special_id('eos_token', 'eos')
        self.pad_id = self._special_id('pad_token', 'pad')
        self.add_bos = bool(config.get('add_bos_token', kind == 'sentencepiece' and self.bos_id is not None))
        self.chat_template = config.get('chat_template')
        self.config_path = CONFIG_FILE  # load_tokenizer sets the full path, for messages

    @property
    def vocab_size(self):
        if self.kind == 'sentencepiece':
            return self.backend.get_piece_size()
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text, bos=None, eos=False):
        """text -> ids; bos defaults to what the model's tokenizer does (add_bos_token)."""
        if self.kind == 'sentencepiece':
            ids = self.backend.encode(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids, skip_special=True):
        ids = [int(i) for i in ids]
        if self.kind == 'sentencepiece':
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def apply_chat_template(self, messages, add_generation_prompt=False):
        """Render chat messages with the model's Jinja chat template (as transformers does)."""
        if not self.chat_template:
            raise SlowLlamaError('this model has no chat template; use plain text or alpaca data')
        import jinja2
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())
        token = lambda key: _token_text(self.config.get(key))  # noqa: E731
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=token('bos_token'), eos_token=token('eos_token'))
        except jinja2.TemplateError as e:
            raise SlowLlamaError(f'{self.config_path}: the chat template fails ({e})') from None

    def _special_id(self, config_key, sp_name):
        text = _token_text(self.config.get(config_key))
        if text:
            token_id = (self.backend.piece_to_id(text) if self.kind == 'sentencepiece'
                        else self.backend.token_to_id(text))
            if token_id is not None:
                return token_id
        if self.kind == 'sentencepiece':
            token_id = getattr(self.backend, f'{sp_name}_id')()
            return token_id if token_id >= 0 else None
        return None


def _token_text(value):
    return value.get('content') if isinstance(value, dict) else value


def check_config(config, path):
    """The tokenizer_config.json values we read have the types transformers gives them."""
    if not isinstance(config, dict):
        raise SlowLlamaError(f'{path}: not a JSON object')
    for key in ('bos_token', 'eos_token', 'pad_token', 'unk_token'):
        if not isinstance(_token_text(config.get(key)), (str, type(None))):
            raise SlowLlamaError(f'{path}: {key} must be a string')
    if not isinstance(config.get('chat_template'), (str, type(None))):
        raise SlowLlamaError(f'{path}: chat_template must be a string')


def load_tokenizer(folder):
    """The tokenizer of a prepared (or Hugging Face / Meta) folder."""
    folder = str(folder)
    config = {}
    config_path = os.path.join(folder, CONFIG_FILE)
    if os.path.exists(config_path):
        config = read_json(config_path, CONFIG_FILE)
        check_config(config, config_path)
    tokenizer = _with_backend(folder, config)
    tokenizer.config_path = config_path
    return tokenizer


def _with_backend(folder, config):
    json_path, model_path = os.path.join(folder, 'tokenizer.json'), os.path.join(folder, 'tokenizer.model')
    if os.path.exists(json_path):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            return Tokenizer(HFTokenizer.from_file(json_path), config, 'tokenizers')
        except BaseException as e:  # a bare Exception on bad files, or a Rust panic (a BaseException)
            if not isinstance(e, Exception) and type(e).__name__ != 'PanicException':
                raise
            raise SlowLlamaError(f'{json_path}: cannot read the tokenizer ({str(e).splitlines()[0]})') from None
    if os.path.exists(model_path):
        import sentencepiece
        try:
            return Tokenizer(sentencepiece.SentencePieceProcessor(model_file=model_path), config, 'sentencepiece')
        except (RuntimeError, OSError) as e:
            raise SlowLlamaError(f'{model_path}: not a sentencepiece model ({e})') from None
    raise SlowLlamaError(f'{folder}: no tokenizer.json or tokenizer.model')
