"""The chat recipe: `chat MODEL_DIR [--lora RUN_OR_ADAPTER] [--system TEXT]`, an interactive
conversation, one user turn per line of stdin, each answer printed as it is generated. The KV cache
is kept across turns (slowllama/generation/conversation.py), so a turn streams the blocks for its new tokens only.
/reset starts over, /exit or the end of input (Ctrl-D) ends it."""
import sys

from ..errors import SlowLlamaError
from ..generation.conversation import Conversation
from .inference import add_sampling_arguments, load_for_inference

HELP = '(one message a line; /reset starts over, /exit or Ctrl-D ends)'


def add_arguments(p):
    p.add_argument('model', help='prepared model folder')
    p.add_argument('--lora', default=None, help='adapter folder, or a finetune run folder (uses its adapter/)')
    p.add_argument('--device', default=None, help='cpu | cuda | mps (default: the best present)')
    p.add_argument('--system', default=None, help='a system message that opens the conversation')
    add_sampling_arguments(p, max_new_tokens=256)


def run(args):
    model, tokenizer, device = load_for_inference(args)
    conversation = Conversation(model, tokenizer, system=args.system)
    say(f'[{device}] chat with {args.model} {HELP}')
    for line in read_turns():
        if line == '/exit':
            break
        if line == '/reset':
            conversation.reset()
            say('(conversation reset)')
            continue
        try:
            conversation.reply(line, args.max_new_tokens, args.temperature, args.top_p,
                               on_text=lambda piece: print(piece, end='', flush=True))
        except SlowLlamaError as e:  # the conversation is too long: say so and let the user go on
            say(f'error: {e}')
            continue
        print(flush=True)
    return 0


def read_turns():
    """The user's lines (blank ones skipped) until the end of input; the prompt goes to stderr, so
    stdout holds the answers alone."""
    while True:
        if sys.stdin.isatty():
            print('> ', end='', file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def say(message):
    print(message, file=sys.stderr, flush=True)
