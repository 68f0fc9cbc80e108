"""One record of training data -> one Example: the tokens and, shifted by one, the targets, IGNORE
(-100) where nothing is learned (prompts, the user's turns). Plain text, alpaca instructions and chat
conversations; the tokenizer (encode, bos/eos, chat_template) is all it needs."""
from dataclasses import dataclass

from ..errors import SlowLlamaError

IGNORE = -100
ALPACA_PROMPT = ('Below is an instruction that describes a task{context}. '
                 'Write a response that appropriately completes the request.\n\n'
                 '### Instruction:\n{instruction}\n\n{input_block}### Response:\n')


@dataclass
class Example:
    tokens: list   # [len]
    targets: list  # [len], IGNORE where nothing is learned
    positions: list | None = None  # [len], restarting at 0 at each packed document; None: 0, 1, 2, ...


def example_from_segments(segments):
    """[(ids, learn)] -> Example: the ids concatenated, each id a target iff its segment is learned."""
    ids, learn = [], []
    for segment_ids, segment_learn in segments:
        ids += segment_ids
        learn += [segment_learn] * len(segment_ids)
    return Example(ids[:-1], [i if keep else IGNORE for i, keep in zip(ids[1:], learn[1:])])


def text_example(tokenizer, text):
    return example_from_segments([(tokenizer.encode(text, eos=True), True)])


def alpaca_example(tokenizer, record, where):
    for key in ('instruction', 'output'):
        if not isinstance(record.get(key), str):
            raise SlowLlamaError(f'{where}: alpaca record without a string "{key}"')
    extra = record.get('input') or ''
    prompt = ALPACA_PROMPT.format(
        instruction=record['instruction'],
        context=', paired with an input that provides further context' if extra else '',
        input_block=f'### Input:\n{extra}\n\n' if extra else '')
    return example_from_segments([(tokenizer.encode(prompt), False),
                                  (tokenizer.encode(record['output'], bos=False, eos=True), True)])


def chat_example(tokenizer, record, where):
    """Only the assistant's messages are learned. With a chat template each assistant turn is the
    difference between the rendering up to it (with the generation prompt) and the rendering through it."""
    messages = record.get('messages')
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get('role'), str)
                                                 and isinstance(m.get('content'), str) for m in messages):
        raise SlowLlamaError(f'{where}: "messages" must be a list of {{"role", "content"}} objects')
    if not tokenizer.chat_template:
        return _plain_chat_example(tokenizer, messages)
    segments, done = [], []
    for i, message in enumerate(messages):
        if message['role'] == 'assistant':  # the prompt up to this turn, then the turn itself
            _extend(segments, done, _render(tokenizer, messages[:i], True), False)
            _extend(segments, done, _render(tokenizer, messages[:i + 1], False), True)
        else:
            _extend(segments, done, _render(tokenizer, messages[:i + 1], False), False)
    return example_from_segments(segments)


def _render(tokenizer, messages, add_generation_prompt):
    if not messages:
        return []
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt), bos=False)


def _extend(segments, done, ids, learn):
    """Append the tokens of `ids` beyond those already placed (`done`). Chat templates render each
    conversation as a prefix of its continuation, so these are exactly the new turn's tokens."""
    new = ids[len(done):]
    if new:
        segments.append((new, learn))
        done.extend(new)


def _plain_chat_example(tokenizer, messages):
    """A model without a chat template: 'role: content' lines, the assistant's content learned."""
    segments = [(tokenizer.encode(''), False)]  # the BOS token, when the model's tokenizer adds one
    for message in messages:
        learn = message['role'] == 'assistant'
        segments.append((tokenizer.encode(f"{message['role']}: ", bos=False), False))
        segments.append((tokenizer.encode(message['content'], bos=False, eos=learn), learn))
        segments.append((tokenizer.encode('\n', bos=False), False))
    return example_from_segments(segments)

def text_record(tokenizer, record, where):
    if not isinstance(record.get('text'), str):
        raise SlowLlamaError(f'{where}: no string "text"')
    return text_example(tokenizer, record['text'])
