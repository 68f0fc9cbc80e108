"""Chat records -> tokens and which of them are learned: the assistant's turns only.

A conversation is rendered whole with the model's chat template (or --chat-template's), as
transformers' apply_chat_template renders it, and tokenized as trl's SFTTrainer tokenizes it. Which
tokens are learned:
- a template that marks answers with {% generation %}: the tokens those blocks wrote, exactly as
  transformers' return_assistant_tokens_mask (what trl's assistant_only_loss learns);
- any other template: each assistant turn, its answer and its end of turn, located by rendering the
  conversation cut before it (with the generation prompt) and after it, as trl's training twins of
  the shipped templates mark them (their {% generation %} blocks; tests/test_chat_twins.py compares):
  the answer starts after the generation prompt's first line, the role's header (a prefill after
  it, DeepSeek-R1's or Nemotron's '<think>\n', is learned; a header the answer does not begin with
  is too); it ends where the cut after it stops agreeing with the whole, or, as more follows, where
  that cut less the generation prompt does (gpt-oss: '<|end|>', where the last turn has
  '<|return|>'); an answer the whole renders otherwise (earlier reasoning dropped) is found by its
  content and the end of turn the cut writes after it. A final EOS the template writes only at the
  very end is learned only there. Only an answer found by none of these, or a conversation whose
  earlier part renders differently once the answer follows, stops the record with one line naming
  the fix (a template with {% generation %} marks);
- --chat-format plain (no template): `role: content` lines, each assistant content and EOS learned.
A model without a template never falls back to plain lines silently: the run stops and names both fixes.
"""
from ..errors import SlowLlamaError
from ..tokenizer.chat_render import has_generation_marks
from .examples import IGNORE, Example, example_from_segments

TEMPLATE, PLAIN = 'template', 'plain'
CHAT_FORMATS = (TEMPLATE, PLAIN)


def chat_rendering(tokenizer, chat_format, where):
    """The rendering chat records get, TEMPLATE or PLAIN (--chat-format); stops when the model has
    no template and plain lines were not asked for."""
    chat_format = chat_format or TEMPLATE
    if chat_format not in CHAT_FORMATS:
        raise SlowLlamaError(f'--chat-format must be one of {", ".join(CHAT_FORMATS)}, got {chat_format!r}')
    if chat_format == PLAIN:
        return PLAIN
    if not tokenizer.chat_template:
        model = tokenizer.folder or 'the model'
        raise SlowLlamaError(f'{where}: chat records, but {model} has no chat template; add --chat-template FILE '
                             '(a Jinja chat template), or --chat-format plain to train on "role: content" lines')
    tokenizer.check_chat_template()
    return TEMPLATE


def describe_rendering(tokenizer, rendering):
    """The line a run starts with: which rendering the chat data used, and what is learned."""
    if rendering == PLAIN:
        return ('chat rendering: plain "role: content" lines (--chat-format plain), not a chat template; '
                'learned: each assistant message and EOS')
    learned = ('what its {% generation %} blocks mark (as trl\'s assistant_only_loss)'
               if has_generation_marks(tokenizer.chat_template)
               else 'each assistant turn, from the generation prompt to its end as the template writes it')
    return f'chat rendering: the chat template {tokenizer.chat_template_source}; learned: {learned}'


def check_messages(messages, where, key='messages'):
    """A list of {"role": str, "content": str | list | null, ...} objects (tool calls may have no content)."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get('role'), str)
            and isinstance(m.get('content'), (str, list, type(None))) for m in messages):
        raise SlowLlamaError(f'{where}: "{key}" must be a non-empty list of {{"role", "content"}} objects')
    return messages


def template_kwargs(record, where):
    """What trl passes to the template besides the messages: the record's "tools" and
    "chat_template_kwargs"."""
    kwargs = record.get('chat_template_kwargs') or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise SlowLlamaError(f'{where}: "chat_template_kwargs" must be an object')
    tools = record.get('tools')
    if tools is not None and not isinstance(tools, list):
        raise SlowLlamaError(f'{where}: "tools" must be a list of function schemas')
    return {**kwargs, 'tools': tools}


def chat_example(tokenizer, record, where, rendering=TEMPLATE):
    """One chat record -> Example (tokens, targets), the assistant's turns learned."""
    messages = check_messages(record.get('messages'), where)
    if rendering == PLAIN:
        return example_from_segments(plain_segments(tokenizer, messages, where))
    kwargs = template_kwargs(record, where)
    ids, learn = template_tokens(tokenizer, messages, where, **kwargs)
    return example_from_mask(ids, learn)


def example_from_mask(ids, learn):
    """ids [n] and learn [n] -> Example: tokens ids[:-1], targets ids[1:] where learned."""
    return Example(ids[:-1], [i if keep else IGNORE for i, keep in zip(ids[1:], learn[1:])])


def template_tokens(tokenizer, messages, where, **kwargs):
    """-> (ids of the whole conversation, learn: one bool per id)."""
    text, spans = tokenizer.render_chat(messages, where=where, **kwargs)
    if has_generation_marks(tokenizer.chat_template_for(kwargs.get('tools'))):
        ids, offsets = tokenizer.encode_with_offsets(text)
        return ids, marked(offsets, spans)
    ids = tokenizer.encode_rendered(text)
    return ids, turns(tokenizer, messages, text, ids, where, kwargs)


def marked(offsets, spans):
    """Tokens overlapping a generation span: transformers' assistant mask, one pass over both."""
    learn, span = [False] * len(offsets), 0
    for n, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        learn[n] = end > spans[span][0]
    return learn


def turns(tokenizer, messages, text, ids, where, kwargs):
    """Each assistant turn located by rendering the conversation cut before and after it."""
    learn = [False] * len(ids)
    for i, message in enumerate(messages):
        if message['role'] != 'assistant':
            continue
        turn = f'{where}: message {i + 1} (assistant)'
        render = lambda m, g: tokenizer.apply_chat_template(m, g, where=where, **kwargs)  # noqa: E731
        start, at, prompt = answer_start(tokenizer, render, messages[:i], text, ids, turn)
        end = answer_end(tokenizer, render, messages[:i + 1], prompt, text, ids, (start, at), turn)
        learn[start:end] = [True] * max(0, end - start)
    return learn


def answer_start(tokenizer, render, before, text, ids, turn):
    """-> (the answer's first token in `ids`, its first character in `text`, the generation prompt).
    The generation prompt's first line (through its line breaks; all of it when it has none) is the
    role's header, given to the model; what the template writes after it (a prefill such as
    '<think>\n') is the answer's start, learned; where the rendered answer does not begin with that
    header (DeepSeek-R1's '<｜Assistant｜><think>\n' before '<｜Assistant｜>answer'), the answer starts
    where the prompt did: where trl's training templates put their {% generation %} marks."""
    with_prompt, without = render(before, True), render(before, False)
    prompt = with_prompt[len(without):] if with_prompt.startswith(without) else ''
    header = base = len(with_prompt) - len(prompt)
    line = prompt.find('\n')
    header += len(prompt) - (len(prompt[line:].lstrip('\n')) if line >= 0 else 0)
    if not text.startswith(with_prompt[:header]):
        header = base
    if not text.startswith(with_prompt[:header]):
        raise SlowLlamaError(f'{turn}: the chat template renders the conversation before this answer '
                             'differently once the answer follows, so the answer cannot be told apart; give a '
                             'template that marks answers with {% generation %} (--chat-template FILE)')
    return common_prefix(tokenizer.encode_rendered(with_prompt[:header]), ids), header, prompt


def answer_end(tokenizer, render, through, prompt, text, ids, start, turn):
    """The token after the answer's end of turn. The conversation cut after the answer, as it ends
    the conversation and, less the generation prompt, as more follows (gpt-oss ends the last turn
    with '<|return|>', the others with '<|end|>'): where one agrees with the whole to its end, the
    turn ends there. Else the answer is rendered otherwise once later messages follow (earlier
    reasoning dropped: Qwen3, Nemotron, gpt-oss): it ends where its content, and the end of turn the
    cut writes after it, are found in the whole; failing that, where the cut stops agreeing."""
    cut = render(through, False)
    end, whole = agreement(tokenizer, cut, ids)
    if not whole and prompt:
        followed = followed_cut(render, through, prompt)
        if followed is not None:
            cut, (agree, whole) = followed, agreement(tokenizer, followed, ids)
            end = max(end, agree)
    if whole:
        return end
    found = find_answer(cut, text, through[-1].get('content'), start[1])
    if found is not None:
        return common_prefix(tokenizer.encode_rendered(text[:found]), ids)
    if end <= start[0]:
        raise SlowLlamaError(f'{turn}: the chat template renders this answer differently once later messages '
                             'follow, and its content is not found in it; give a template that marks answers '
                             'with {% generation %} (--chat-template FILE)')
    return end  # the cut parts from the whole only after the answer (an EOS written at the very end)


def agreement(tokenizer, cut, ids):
    """-> (how many of the cut's tokens agree with `ids`, whether all of them do)."""
    ids_cut = tokenizer.encode_rendered(cut)
    agree = common_prefix(ids_cut, ids)
    return agree, agree == len(ids_cut)


def followed_cut(render, through, prompt):
    """The conversation through the answer as a later message would follow it: rendered with the
    generation prompt, less that prompt; None where the template does not write it so."""
    try:
        followed = render(through, True)
    except SlowLlamaError:  # a template may refuse a generation prompt after an answer
        return None
    return followed[:-len(prompt)] if followed.endswith(prompt) else None


def find_answer(cut, text, content, start):
    """The character after the answer's end of turn in `text`: its content (as the template trims
    it), then what `cut` writes after the content, found from `start` on; None when not found."""
    if not isinstance(content, str) or not content.strip():
        return None
    content = content.strip()
    at = cut.rfind(content)
    if at < 0:
        return None
    found = text.find(content + cut[at + len(content):], start)
    return None if found < 0 else found + len(cut) - at


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def plain_segments(tokenizer, messages, where, add_generation_prompt=False):
    """--chat-format plain: 'role: content' lines -> [(ids, learned)], each assistant content and
    EOS learned; the generation prompt is 'assistant: '."""
    segments = [(tokenizer.encode(''), False)]  # the BOS token, when the model's tokenizer adds one
    for n, message in enumerate(messages):
        if not isinstance(message.get('content'), str):
            raise SlowLlamaError(f'{where}: --chat-format plain needs a string "content" in every message')
        learn = message['role'] == 'assistant'
        if n:
            segments.append((tokenizer.encode('\n', bos=False), False))
        segments.append((tokenizer.encode(f"{message['role']}: ", bos=False), False))
        segments.append((tokenizer.encode(message['content'], bos=False, eos=learn), learn))
    if add_generation_prompt:  # the same pieces as an assistant message's, so it is their prefix
        segments += [(tokenizer.encode('\n', bos=False), False), (tokenizer.encode('assistant: ', bos=False), False)]
    return segments
