"""The test_gen recipe: complete a prompt with a prepared model (and optionally a LoRA adapter),
printed as it is generated. Blocks are streamed as in training; the engine keeps a KV cache, so each
new token costs one pass over the blocks for one position."""
import sys

import torch

from ..api import load
from ..completion import complete
from ..devices import default_dtype, resolve_device
from ..errors import SlowLlamaError
from ..formats.tokenizer import load_tokenizer
from ..lora import adapter_folder
from ..store import read_manifest


def add_arguments(p):
    p.add_argument('model', help='prepared model folder')
    p.add_argument('device', nargs='?', default=None, help='cpu | cuda | mps (default: the best present)')
    p.add_argument('--lora', default=None, help='adapter folder, or a finetune run folder (uses its adapter/)')
    p.add_argument('--prompt', default='The meaning of life is', help='the text to complete')
    p.add_argument('--max-new-tokens', type=int, default=64, help='tokens to generate at most (default 64)')
    p.add_argument('--temperature', type=float, default=0.0, help='0: greedy (default); > 0: sampling')
    p.add_argument('--top-p', type=float, default=1.0, help='nucleus sampling threshold (default 1.0: off)')
    p.add_argument('--seed', type=int, default=None, help='random seed for sampling')
    p.add_argument('--chat', action='store_true', help="wrap the prompt in the model's chat template")
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
    if args.seed is not None:
        torch.manual_seed(args.seed)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{'role': 'user', 'content': prompt}], add_generation_prompt=True)
    print(f'[{device}] {args.prompt}', file=sys.stderr, flush=True)
    complete(model, tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_p,
             on_text=lambda piece: print(piece, end='', flush=True))
    print()
