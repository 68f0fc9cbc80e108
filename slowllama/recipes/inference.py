"""What the generating recipes (test_gen, chat) share: their sampling and placement flags, and the
model loaded for inference with its adapter and tokenizer. Not a recipe itself."""
import torch

from ..api import load
from ..engine.devices import default_dtype, resolve_device
from ..errors import SlowLlamaError
from ..tokenizer.tokenizer import load_tokenizer
from ..weights.formats.peft import adapter_folder
from ..weights.prepared import read_manifest


def add_sampling_arguments(p, max_new_tokens):
    p.add_argument('--max-new-tokens', type=int, default=max_new_tokens,
                   help=f'tokens to generate at most (default {max_new_tokens})')
    p.add_argument('--temperature', type=float, default=0.0, help='0: greedy (default); > 0: sampling')
    p.add_argument('--top-p', type=float, default=1.0, help='nucleus sampling threshold (default 1.0: off)')
    p.add_argument('--seed', type=int, default=None, help='random seed for sampling')
    p.add_argument('--offload', default='disk', help='disk | ram | device (default disk)')
    p.add_argument('--dtype', default=None, help='bf16 | fp16 | fp32 (default: fp32 on cpu, bf16 elsewhere)')
    p.add_argument('--chat-template', default=None,
                   help="a Jinja chat template file, or the name of one of the model's templates (e.g. tool_use), "
                        "used instead of its default")


def load_for_inference(args):
    """The flags checked, then (model with --lora, tokenizer, device); seeded by --seed."""
    if args.max_new_tokens < 1:
        raise SlowLlamaError(f'--max-new-tokens must be at least 1, got {args.max_new_tokens}')
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise SlowLlamaError('--temperature must be >= 0 and --top-p in (0, 1]')
    device = resolve_device(args.device)
    read_manifest(args.model)  # a clear error for a folder that is not a prepared model
    tokenizer = load_tokenizer(args.model)
    if args.chat_template is not None:
        tokenizer.use_chat_template(args.chat_template)
    model = load(args.model, device, default_dtype(device, args.dtype), adapter=adapter_folder(args.lora),
                 offload=args.offload)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    return model, tokenizer, device
