"""The prepare recipe: a Meta checkpoint, a Hugging Face folder or a GGUF file -> a prepared folder."""
import os

from ..weights.formats import prepare


def add_arguments(p):
    p.add_argument('src', help='Meta checkpoint folder, Hugging Face folder, or .gguf file')
    p.add_argument('out', help='the prepared folder to write')
    p.add_argument('--dtype', default='bf16', help='bf16 | fp16 | fp32 (default bf16)')
    p.add_argument('--quant', default=None, help='nf4 | int8: store the blocks\' projection weights quantized')
    p.add_argument('--double-quant', action='store_true', help='nf4: quantize the absmax too (QLoRA)')
    p.add_argument('--quant-head', action='store_true',
                   help='pack the embeddings and output head with --quant too (by default they stay in --dtype)')


def run(args):
    out = prepare(args.src, args.out, dtype=args.dtype, quant=args.quant, double_quant=args.double_quant,
                  quant_head=args.quant_head)
    print(f'prepared model written to {os.path.abspath(out)}')
