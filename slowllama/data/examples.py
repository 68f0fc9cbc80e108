"""One record of training data -> one Example: the tokens and, shifted by one, the targets, IGNORE
(-100) where nothing is learned (prompts). Plain text and alpaca instructions here; chat
conversations in chat.py. The tokenizer (encode, bos/eos) is all it needs."""
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


def text_record(tokenizer, record, where):
    if not isinstance(record.get('text'), str):
        raise SlowLlamaError(f'{where}: no string "text"')
    return text_example(tokenizer, record['text'])
