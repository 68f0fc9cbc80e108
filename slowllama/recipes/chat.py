"""The chat recipe: `chat MODEL_DIR [--lora RUN_OR_ADAPTER] [--system TEXT]`, an interactive
conversation, one user turn per line of stdin, each answer printed as it is generated. The KV cache
is kept across turns (slowllama/conversation.py), so a turn streams the blocks for its new tokens only.
/reset starts over, /exit or the end of input (Ctrl-D) ends it."""
import sys

import torch

from ..api import load
from ..conversation import Conversation
from ..devices import default_dtype, resolve_device
from ..errors import SlowLlamaError
from ..formats.tokenizer import load_tokenizer
from ..lora import adapter_folder
from ..store import read_manifest

HELP = '(one message a line; /reset starts over, /exit or Ctrl-D ends)'


def add_arguments(p):
    p.add_argument('model', help='prepared model folder')
    p.add_argument('--lora', default=None, help='adapter folder, or a finetune run folder (uses its adapter/)')
    p.add_argument('--device', default=None, help='cpu | cuda | mps (default: the best present)')
    p.add_argument('--system', default=None, help='a system message that opens the conversation')
    p.add_argument('--max-new-tokens', type=int, default=256, help='tokens per answer at most (default 256)')
    p.add_argument('--temperature', type=float, default=0.0, help='0: greedy (default); > 0: sampling')
    p.add_argument('--top-p', type=float, default=1.0, help='nucleus sampling threshold (default 1.0: off)')
    p.add_argument('--seed', type=int, default=None, help='random seed for sampling')
    p.add_argument('--offload', default='disk', help='disk | ram | device (default disk)')
    p.add_argument('--dtype', default=None, help='bf16 | fp16 | fp32 (default: fp32 on cpu, bf16 elsewhere)')


def run(args):
    if args.max_new_tokens < 1:
        raise SlowLlamaError(f'--max-new-tokens must be at least 1, got {args.max_new_tokens}')
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise SlowLlamaError('--temperature must be >= 0 and --top-p in (0, 1]')
    device = resolve_device(args.device)
    read_manifest(args.model)  # a clear error for a folder that is not a prepared model
    tokenizer = load_tokenizer(args.model)
    model = load(args.model, device, default_dtype(device, args.dtype), adapter=adapter_folder(args.lora),
                 offload=args.offload)
    conversation = Conversation(model, tokenizer, system=args.system)
    if args.seed is not None:
        torch.manual_seed(args.seed)
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
