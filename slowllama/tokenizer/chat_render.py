"""Chat templates rendered as transformers renders them (transformers/utils/chat_template_utils.py
and PreTrainedTokenizerBase.apply_chat_template), without importing it.

Its environment: Jinja's immutable sandbox (templates come from the hub: untrusted code),
trim_blocks and lstrip_blocks, the loopcontrols extension, `raise_exception`, `strftime_now`, a
`tojson` filter that does not escape HTML, and a `{% generation %}` tag that records which
characters an assistant produced (what trl's assistant_only_loss learns). Its variables: `messages`
(None-valued keys dropped, reasoning copied under the names templates read), `tools`, `documents`,
`add_generation_prompt`, the special tokens (`bos_token`, `eos_token`, ...) and any extra keyword.
"""
import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache

GENERATION_TAG = re.compile(r'\{\%-?\s*generation\s*-?\%\}')  # transformers' test for the tag
REASONING_FIELDS = ('reasoning_content', 'thinking', 'reasoning')  # the first is the one templates read

# (blocks rendered so far, generation spans found) of the render in progress, as transformers tracks them
_tracking = ContextVar('chat_generation_tracking', default=None)


def has_generation_marks(template):
    return bool(GENERATION_TAG.search(template))


def render(template, messages, add_generation_prompt=False, special_tokens=None, tools=None, documents=None,
           **kwargs):
    """-> (text, spans): `spans` are the [start, end) character ranges the template's
    {% generation %} blocks wrote, in order ([] for a template without them). Raises what the
    template raises (jinja2.TemplateError for raise_exception, an undefined variable, ...)."""
    compiled = compile_template(template)
    variables = {**(special_tokens or {}), **kwargs}
    blocks, spans = [], []
    token = _tracking.set((blocks, spans))
    try:
        for block in compiled.generate(messages=normalize_messages(messages), tools=tools, documents=documents,
                                       add_generation_prompt=add_generation_prompt, **variables):
            blocks.append(block)
    finally:
        _tracking.reset(token)
    return ''.join(blocks), spans


def normalize_messages(messages):
    """What the template sees: keys with a None value dropped (many templates break on
    `content: null` but handle a missing key), reasoning under every name templates read."""
    normalized = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {'thinking': reasoning, **message, 'reasoning_content': reasoning}
        normalized.append(message)
    return normalized


def error_line(error):
    """A template's error as one line: its own message, and the line for a syntax error."""
    import jinja2
    message = getattr(error, 'message', None) or str(error) or type(error).__name__
    if isinstance(error, jinja2.TemplateSyntaxError) and error.lineno:
        message = f'line {error.lineno}: {message}'
    return ' '.join(str(message).split())


@lru_cache(maxsize=16)
def compile_template(template):
    """The template compiled in transformers' environment (cached: a data set renders it per record)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(Extension):
        """{% generation %}...{% endgeneration %}: records where its text lands in the output."""
        tags = {'generation'}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method('_track'), [], [], body).set_lineno(lineno)

        def _track(self, caller):
            text = caller()
            tracking = _tracking.get()
            if tracking is not None:
                blocks, spans = tracking
                start = len(''.join(blocks))  # as transformers: the top-level output so far
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTracker, loopcontrols])
    env.filters['tojson'] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=_TemplateDict(),
                       namespace=_namespace_class())
    return env.from_string(template)


class _TemplateDict:
    """`dict(...)` inside a template, without the attribute access a real dict type would give."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _namespace_class():
    """Jinja's namespace, refusing underscore names (no way into CPython's internals), as transformers."""
    import jinja2

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith('_'):
                raise jinja2.exceptions.SecurityError(
                    f'Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}')

    return TemplateNamespace
