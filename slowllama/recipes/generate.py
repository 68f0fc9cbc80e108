"""The test_gen recipe: complete a prompt with a prepared model (and optionally a LoRA adapter),
printed as it is generated. Blocks are streamed as in training; the engine keeps a KV cache, so each
new token costs one pass over the blocks for one position."""
import sys

from ..engine.moe_plan import decoded_token_bytes
from ..generation.completion import DecodeTraffic, complete
from .inference import add_sampling_arguments, load_for_inference


def add_arguments(p):
    p.add_argument('model', help='prepared model folder')
    p.add_argument('device', nargs='?', default=None, help='cpu | cuda | mps (default: the best present)')
    p.add_argument('--lora', default=None, help='adapter folder, or a finetune run folder (uses its adapter/)')
    p.add_argument('--prompt', default='The meaning of life is', help='the text to complete')
    p.add_argument('--chat', action='store_true', help="wrap the prompt in the model's chat template")
    add_sampling_arguments(p, max_new_tokens=64)


def run(args):
    model, tokenizer, device = load_for_inference(args)
    prompt_ids = None
    if args.chat:  # the template writes any BOS itself, as transformers' apply_chat_template
        tokenizer.check_chat_template()
        prompt_ids = tokenizer.encode_chat([{'role': 'user', 'content': args.prompt}], add_generation_prompt=True)
    print(f'[{device}] {args.prompt}', file=sys.stderr, flush=True)
    traffic = DecodeTraffic(model)
    complete(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
             on_text=lambda piece: print(piece, end='', flush=True), prompt_ids=prompt_ids, on_token=traffic)
    print()
    report = decode_report(model, traffic.per_token())
    if report:
        print(report, file=sys.stderr)


def decode_report(model, per_token):
    """One line: bytes read (and experts fetched) per decoded token, beside what the plan counts for
    one (engine/moe_plan.decoded_token_bytes); None before a second token."""
    if per_token is None:
        return None
    store, cfg = model.store, model.cfg
    line = f'read per decoded token: {per_token["bytes_read"] / 2 ** 20:.2f} MiB'
    if store.offload == 'disk':
        planned = decoded_token_bytes(cfg, store.manifest['dtype'], store.quant)
        line += (f' (plan: {planned / 2 ** 20:.2f} MiB: each block\'s attention'
                 f'{", router and " + str(cfg.experts_per_token) + " experts" if cfg.n_experts else " and MLP"}, '
                 'the head, one embedding row)')
    if 'experts_fetched' in per_token:
        line += f'; experts fetched per block: {per_token["experts_fetched"] / cfg.n_layers:.1f} of {cfg.n_experts}'
    return line
