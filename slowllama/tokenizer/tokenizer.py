"""One small tokenizer interface over tokenizer.json (`tokenizers`) and tokenizer.model (sentencepiece).

Settings that transformers keeps in tokenizer_config.json (add_bos_token, special tokens) are read
from there when present; the chat templates from wherever the folder keeps them (chat_template.py),
rendered as transformers renders them (chat_render.py).
"""
import functools
import os
import re

from ..errors import SlowLlamaError
from ..weights.files import read_json
from .chat_render import compile_template, error_line, render
from .chat_template import DEFAULT, read_templates, read_text, templates_from_value

CONFIG_FILE = 'tokenizer_config.json'
# the special tokens transformers passes to a chat template (PreTrainedTokenizerBase.special_tokens_map)
SPECIAL_TOKENS = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token')
NO_TEMPLATE = 'this model has no chat template; give one with --chat-template FILE'


class Tokenizer:
    def __init__(self, backend, config, kind, templates=None, templates_path=None):
        self.backend, self.config, self.kind = backend, config, kind
        self.bos_id = self._special_id('bos_token', 'bos')
        self.eos_id = self._special_id('eos_token', 'eos')
        self.pad_id = self._special_id('pad_token', 'pad')
        self.add_bos = bool(config.get('add_bos_token', kind == 'sentencepiece' and self.bos_id is not None))
        self.chat_templates = templates or {}  # {name: template}; 'default' is the one used
        self.chat_template = self.chat_templates.get(DEFAULT)
        self.chat_template_source = templates_path  # where it came from, for messages
        self.chat_template_chosen = False  # --chat-template given: tools no longer pick 'tool_use'
        self.folder = None  # load_tokenizer's folder, for messages

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

    # --- chat ---------------------------------------------------------------------------------

    def use_chat_template(self, value, flag='--chat-template'):
        """--chat-template: a Jinja file, or the name of one of the model's templates (`tool_use`)."""
        if value in self.chat_templates and not os.path.isfile(value):
            self.chat_template, source = self.chat_templates[value], f'{self.chat_template_source} ({value})'
        else:
            self.chat_template, source = read_text(value, flag), value
        self.chat_template_source, self.chat_template_chosen = source, True
        self.check_chat_template()

    def check_chat_template(self):
        """The template parses (else one line naming its file); NO_TEMPLATE when there is none."""
        if not self.chat_template:
            raise SlowLlamaError(NO_TEMPLATE)
        try:
            compile_template(self.chat_template)
        except Exception as e:  # jinja2.TemplateSyntaxError, or an extension's error
            raise SlowLlamaError(f'{self.chat_template_source}: the chat template does not parse ({error_line(e)})') \
                from None

    @property
    def special_tokens(self):
        """{'bos_token': '<s>', ...}: the special tokens a template sees, as transformers passes them."""
        texts = {key: _token_text(self.config.get(key)) for key in SPECIAL_TOKENS}
        return {key: text for key, text in texts.items() if text is not None}

    def chat_template_for(self, tools=None):
        """The template a conversation is rendered with: `tool_use` when tools are given and the
        model has one (as transformers picks), else the default (or --chat-template's)."""
        if tools is not None and not self.chat_template_chosen and 'tool_use' in self.chat_templates:
            return self.chat_templates['tool_use']
        if not self.chat_template:
            raise SlowLlamaError(NO_TEMPLATE)
        return self.chat_template

    def render_chat(self, messages, add_generation_prompt=False, where=None, tools=None, **kwargs):
        """-> (text, generation spans) as transformers renders `messages` (chat_render.render);
        a template that fails is one line naming `where` (the record) and the template's message."""
        template = self.chat_template_for(tools)
        try:
            return render(template, messages, add_generation_prompt, self.special_tokens, tools=tools, **kwargs)
        except Exception as e:  # the template's own: raise_exception, an undefined variable, a type error
            prefix = f'{where}: ' if where else ''
            raise SlowLlamaError(f'{prefix}the chat template ({self.chat_template_source}) fails: {error_line(e)}') \
                from None

    def apply_chat_template(self, messages, add_generation_prompt=False, **kwargs):
        """The rendered text (transformers' apply_chat_template(..., tokenize=False))."""
        return self.render_chat(messages, add_generation_prompt, **kwargs)[0]

    def encode_chat(self, messages, add_generation_prompt=False, **kwargs):
        """The rendered conversation's ids, no special tokens added beyond what the template writes
        (transformers' apply_chat_template(..., tokenize=True))."""
        return self.encode_rendered(self.apply_chat_template(messages, add_generation_prompt, **kwargs))

    def encode_rendered(self, text):
        """A rendered conversation's ids: the special tokens it spells are theirs; nothing is added."""
        if self.kind == 'sentencepiece':
            return self._encode_spelled_specials(text)
        return self.encode(text, bos=False)  # `tokenizers` matches special tokens in the text itself

    @functools.cached_property
    def _spelled_specials(self):
        """A regex matching the control pieces' names, longest first (None when there are none)."""
        sp = self.backend
        names = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
        names = sorted((n for n in names if n), key=len, reverse=True)
        return re.compile('|'.join(map(re.escape, names))) if names else None

    def _encode_spelled_specials(self, text):
        """sentencepiece reads '<s>' as three characters: split the text at the control pieces' names
        and encode the pieces between; as transformers' converted tokenizer, only the text's start gets
        the dummy-prefix space (after a special token, encode behind '<unk>' and drop its ids)."""
        sp, specials = self.backend, self._spelled_specials
        if specials is None:
            return sp.encode(text)
        unk = sp.id_to_piece(sp.unk_id())
        ids, start = [], 0
        for match in list(specials.finditer(text)) + [None]:
            piece = text[start:match.start() if match else len(text)]
            if piece:
                ids += sp.encode(piece) if start == 0 else sp.encode(unk + piece)[len(sp.encode(unk)):]
            if match:
                ids.append(sp.piece_to_id(match.group()))
                start = match.end()
        return ids

    def encode_with_offsets(self, text):
        """-> (ids, [(start, end)] character offsets of each token in `text`), no special tokens added."""
        if self.kind == 'sentencepiece':
            raise SlowLlamaError('a chat template with {% generation %} marks needs a tokenizer.json '
                                 '(this model has a sentencepiece tokenizer.model only)')
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

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
    for key in SPECIAL_TOKENS:
        if not isinstance(_token_text(config.get(key)), (str, type(None))):
            raise SlowLlamaError(f'{path}: {key} must be a string')
    templates_from_value(config.get('chat_template'), path)


def load_tokenizer(folder):
    """The tokenizer of a prepared (or Hugging Face / Meta) folder, with its chat templates."""
    folder = str(folder)
    config = {}
    config_path = os.path.join(folder, CONFIG_FILE)
    if os.path.exists(config_path):
        config = read_json(config_path, CONFIG_FILE)
        check_config(config, config_path)
    templates, templates_path = read_templates(folder)
    return _with_backend(folder, config, templates, templates_path)


def _with_backend(folder, config, templates, templates_path):
    json_path, model_path = os.path.join(folder, 'tokenizer.json'), os.path.join(folder, 'tokenizer.model')
    if os.path.exists(json_path):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            backend, kind = HFTokenizer.from_file(json_path), 'tokenizers'
        except BaseException as e:  # a bare Exception on bad files, or a Rust panic (a BaseException)
            if not isinstance(e, Exception) and type(e).__name__ != 'PanicException':
                raise
            raise SlowLlamaError(f'{json_path}: cannot read the tokenizer ({str(e).splitlines()[0]})') from None
    elif os.path.exists(model_path):
        import sentencepiece
        try:
            backend, kind = sentencepiece.SentencePieceProcessor(model_file=model_path), 'sentencepiece'
        except (RuntimeError, OSError) as e:
            raise SlowLlamaError(f'{model_path}: not a sentencepiece model ({e})') from None
    else:
        raise SlowLlamaError(f'{folder}: no tokenizer.json or tokenizer.model')
    tokenizer = Tokenizer(backend, config, kind, templates, templates_path)
    tokenizer.folder = folder
    return tokenizer
