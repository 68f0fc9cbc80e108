"""Completing a prompt with a prepared model (and optionally a LoRA adapter): test_gen, and the
sample completions shown while finetuning. Blocks are streamed as in training; the engine keeps a
KV cache, so each new token costs one pass over the blocks for one position."""
import os
import sys

import torch

from .errors import SlowLlamaError


def complete(model, tokenizer, prompt, max_new_tokens=48, temperature=0.0, top_p=1.0, on_text=None):
    """The completion of `prompt` as text (the prompt itself not included). on_text(piece) is called
    with each new piece of text as soon as it is known."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise SlowLlamaError('--prompt: the prompt encodes to no tokens')
    stream = _TextStream(tokenizer, on_text)
    out = model.generate(torch.tensor([ids]), max_new_tokens, temperature=temperature, top_p=top_p,
                         on_token=stream.add)
    return stream.finish(out[0, len(ids):].tolist())


class _TextStream:
    """Decodes the tokens so far and emits only what was added since the last call; text that a
    later token may still change (an incomplete UTF-8 sequence) is held back."""

    def __init__(self, tokenizer, on_text):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids, self.shown = [], ''

    def add(self, token):
        self.ids.append(token)
        self._show(self.tokenizer.decode(self.ids))

    def finish(self, ids):
        text = self.tokenizer.decode(ids)
        self._show(text)
        return text

    def _show(self, text):
        if self.on_text is None or text.endswith('\ufffd') or not text.startswith(self.shown):
            return
        if len(text) > len(self.shown):
            self.on_text(text[len(self.shown):])
            self.shown = text


def adapter_folder(path):
    """--lora accepts an adapter folder or a run folder (its adapter/)."""
    if path is None:
        return None
    path = str(path)
    if not os.path.exists(os.path.join(path, 'adapter_config.json')):
        if os.path.exists(os.path.join(path, 'adapter', 'adapter_config.json')):
            return os.path.join(path, 'adapter')
        raise SlowLlamaError(f'{path}: --lora is neither an adapter folder (adapter_config.json) '
                             'nor a run folder with adapter/')
    return path


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
    import slowllama
    from .devices import resolve_device
    from .formats.tokenizer import load_tokenizer
    if args.max_new_tokens < 1:
        raise SlowLlamaError(f'--max-new-tokens must be at least 1, got {args.max_new_tokens}')
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise SlowLlamaError('--temperature must be >= 0 and --top-p in (0, 1]')
    from .store import read_manifest
    device = resolve_device(args.device)
    read_manifest(args.model)  # a clear error for a folder that is not a prepared model
    tokenizer = load_tokenizer(args.model)
    model = slowllama.load(args.model, device, default_dtype(device, args.dtype), adapter=adapter_folder(args.lora),
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


def default_dtype(device, dtype=None):
    """fp32 on the CPU (fast and exact there), bf16 on GPUs, unless --dtype says otherwise."""
    return dtype or ('fp32' if device.type == 'cpu' else 'bf16')
