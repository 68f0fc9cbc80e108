"""The plan recipe: the predicted peak device and host memory of a finetune, for a prepared model or a
named shape, in each offload mode, before running it."""
from ..engine.devices import best_device
from ..engine.plan import print_plan
from ..model.quant import parse_quant
from ..weights.prepared import model_config
from .options import parse_bytes
from .shapes import SHAPES, shape_config


def add_arguments(p):
    p.add_argument('--model', default=None, help='a prepared model folder')
    p.add_argument('--shape', default='7b', help=f'{" | ".join(SHAPES)}, when no --model')
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--seq-len', type=int, default=128)
    p.add_argument('--dtype', default='bf16')
    p.add_argument('--lora-rank', type=int, default=8)
    p.add_argument('--targets', default='q,v')
    p.add_argument('--quant', default=None, help='nf4 | int8 (with --shape; a --model says its own)')
    p.add_argument('--grad-accum', type=int, default=1, help='micro-batches a step (they travel together)')
    p.add_argument('--max-device-mem', default=None, help='bytes the step may take on the device (e.g. 8GB): '
                   'prints the step plan they allow (which blocks keep their activations)')
    p.add_argument('--device', default=None, choices=('cuda', 'mps', 'cpu'),
                   help='the device the step plan is for (default: the best present; on a cpu keeping is '
                        'weighed against what it costs on this machine)')


def run(args):
    cfg, quant = model_config(args.model) if args.model else (shape_config(args.shape or '7b'),
                                                               parse_quant(args.quant))
    print_plan(cfg, args.batch_size or 16, args.seq_len or 128, args.dtype or 'bf16', args.lora_rank,
               tuple(args.targets.split(',')), quant, max(1, args.grad_accum),
               parse_bytes(args.max_device_mem, '--max-device-mem'), args.device or best_device())
