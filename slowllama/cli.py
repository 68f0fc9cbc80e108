"""Command-line entry points. The one place where a SlowLlamaError becomes a single line on stderr
and a non-zero exit (`--debug` shows the traceback). scripts/*.py and `python -m slowllama CMD` call main()."""
import argparse
import os
import sys

from .errors import SlowLlamaError

COMMANDS = {}  # name -> (add_arguments, run)


def command(name, help):
    """Register `run(args)` as a subcommand; the decorated function's `arguments` adds its flags."""
    def register(run):
        COMMANDS[name] = (help, run)
        return run
    return register


def main(argv=None, prog_command=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if prog_command is not None:
        argv = [prog_command] + argv
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, 'debug', False)
    try:
        return args.run(args) or 0
    except SlowLlamaError as e:
        if debug:
            raise
        print(f'error: {e}', file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            raise
        print('error: out of host memory; use --offload disk, or lower --batch-size / --seq-len', file=sys.stderr)
        return 3
    except RuntimeError as e:  # torch.OutOfMemoryError (cuda/mps) is a RuntimeError
        if debug or 'out of memory' not in str(e).lower():
            raise
        print('error: out of memory on the device; lower --batch-size or --seq-len, or cap it with '
              '--max-device-mem / --offload ram', file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit 2), like our other errors."""

    def error(self, message):
        self.exit(2, f'error: {message} (see {self.prog} --help)\n')


def build_parser():
    parser = ArgumentParser(prog='slowllama')
    sub = parser.add_subparsers(dest='command', required=True, parser_class=ArgumentParser)
    for name, (help, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        run.arguments(p)
        p.add_argument('--debug', action='store_true', help='show the full traceback on errors')
        p.set_defaults(run=run)
    return parser


def arguments(add):
    """Attach a flag-adding function to a command: @arguments(lambda p: ...)."""
    def attach(run):
        run.arguments = add
        return run
    return attach


# --- prepare ---------------------------------------------------------------------------------

def _prepare_arguments(p):
    p.add_argument('src', help='Meta checkpoint folder, Hugging Face folder, or .gguf file')
    p.add_argument('out', help='the prepared folder to write')
    p.add_argument('--dtype', default='bf16', help='bf16 | fp16 | fp32 (default bf16)')
    p.add_argument('--quant', default=None, help='nf4 | int8: store the blocks\' projection weights quantized')
    p.add_argument('--double-quant', action='store_true', help='nf4: quantize the absmax too (QLoRA)')


@command('prepare', 'turn a Meta / Hugging Face / GGUF checkpoint into a prepared folder')
@arguments(_prepare_arguments)
def run_prepare(args):
    from .formats import prepare
    out = prepare(args.src, args.out, dtype=args.dtype, quant=args.quant, double_quant=args.double_quant)
    print(f'prepared model written to {os.path.abspath(out)}')


@command('verify', 'check every file of a prepared model against the sha256 in its manifest')
@arguments(lambda p: p.add_argument('model', help='a prepared model folder'))
def run_verify(args):
    from .store import verify_model
    verify_model(args.model)
    print(f'{args.model}: every file matches its manifest checksum')


# --- finetune and test_gen --------------------------------------------------------------------

def _finetune_arguments(p):
    from .finetune import add_arguments
    add_arguments(p)


@command('finetune', 'LoRA-finetune a prepared model (no flags at all: the embedded demo)')
@arguments(_finetune_arguments)
def run_finetune(args):
    from .finetune import run
    return run(args)


def _generate_arguments(p):
    from .generate import add_arguments
    add_arguments(p)


@command('test_gen', 'complete a prompt with a prepared model and an optional LoRA adapter')
@arguments(_generate_arguments)
def run_test_gen(args):
    from .generate import run
    return run(args)


COMMANDS['generate'] = COMMANDS['test_gen']  # an alias


# --- bench and plan --------------------------------------------------------------------------

def _bench_arguments(p):
    p.add_argument('--device', default=None, help='cpu | cuda (default: the best present)')
    p.add_argument('--shape', default=None,
                   help='tiny | 0.4b | 7b | 70b-block (default: 0.4b on cpu, 7b on cuda)')
    p.add_argument('--batch-size', type=int, default=None)
    p.add_argument('--seq-len', type=int, default=None)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--dtype', default=None, help='default: fp32 on cpu, bf16 on cuda')
    p.add_argument('--lora-rank', type=int, default=4)
    p.add_argument('--targets', default='q,v')
    p.add_argument('--modes', default=None, help='slowllama offload modes to run (default: disk,ram,device; '
                   'ram for 70b-block)')
    p.add_argument('--peers', default=None, help='transformers+peft configurations to run (default: '
                   'hf,hf-ckpt; none for 70b-block)')
    p.add_argument('--rounds', type=int, default=1, help='run the configurations in turn this many times '
                   'and keep each one\'s median')
    p.add_argument('--work', default='models/bench', help='where the random benchmark models are kept')
    p.add_argument('--json', default='bench.json', help='where to write the results')
    p.add_argument('--plan', action='store_true', help='only print the memory plan for --model or --shape')
    p.add_argument('--model', default=None, help='with --plan: a prepared model folder')
    p.add_argument('--quant', default=None, help='nf4 | int8: also run slowllama on a quantized twin (and, '
                   'for nf4, transformers+peft+bitsandbytes QLoRA with checkpointing as peer hf-qlora)')


@command('bench', 'benchmark slowllama beside transformers+peft (table + JSON)')
@arguments(_bench_arguments)
def run_bench(args):
    from .bench import bench
    from .devices import best_device
    if args.plan:
        return run_plan(args)
    device = args.device or best_device()
    on_cpu = device == 'cpu'
    shape = _shape(args.shape or ('0.4b' if on_cpu else '7b'))
    if args.rounds < 1 or args.steps < 1:
        raise SlowLlamaError('--rounds and --steps must be at least 1')
    blocks_only = shape == '70b-block'  # per-block timing; no whole-model peer to compare with
    bench(device=device, shape=shape, batch=args.batch_size or (4 if on_cpu else 16), seq=args.seq_len or 128,
          steps=args.steps, rank=args.lora_rank, targets=tuple(args.targets.split(',')),
          modes=_list(args.modes if args.modes is not None else 'ram' if blocks_only else 'disk,ram,device'),
          peers=_list(args.peers if args.peers is not None else '' if blocks_only else 'hf,hf-ckpt'),
          dtype=args.dtype, work=args.work, json_out=args.json, rounds=args.rounds, quant=args.quant)


def _list(text):
    return tuple(x for x in text.split(',') if x)


def _shape(name):
    from .bench import SHAPES
    if name not in SHAPES:
        raise SlowLlamaError(f'--shape: unknown shape {name!r} (use {", ".join(SHAPES)})')
    return name


def _plan_arguments(p):
    p.add_argument('--model', default=None, help='a prepared model folder')
    p.add_argument('--shape', default='7b', help='tiny | 0.4b | 7b | 70b-block, when no --model')
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--seq-len', type=int, default=128)
    p.add_argument('--dtype', default='bf16')
    p.add_argument('--lora-rank', type=int, default=8)
    p.add_argument('--targets', default='q,v')
    p.add_argument('--quant', default=None, help='nf4 | int8 (with --shape; a --model says its own)')


@command('plan', 'predict peak device and host memory of a finetune before running it')
@arguments(_plan_arguments)
def run_plan(args):
    from .config import ModelConfig
    from .plan import GIB, model_params, predict
    from .quant import Quant, parse_quant
    quant = parse_quant(args.quant)
    if args.model:
        from .store import read_manifest
        manifest = read_manifest(args.model)
        cfg, quant = ModelConfig.from_dict(manifest['config']), Quant.from_dict(manifest.get('quant'))
    else:
        from .bench import SHAPES
        cfg = ModelConfig.from_hf({'model_type': 'llama', **SHAPES[_shape(args.shape or '7b')]})
    dtype = args.dtype or 'bf16'
    batch, seq = args.batch_size or 16, args.seq_len or 128
    targets = tuple(args.targets.split(','))
    print(f'model: {model_params(cfg) / 1e9:.2f}B parameters, batch {batch} x seq {seq}, {dtype}'
          f'{", " + quant.type + " blocks" if quant else ""}, '
          f'LoRA r={args.lora_rank} on {",".join(targets)}')
    for label, resident, ram in [('device (all resident)', cfg.n_layers, 0), ('ram (streamed)', 0, cfg.n_layers),
                                 ('disk (streamed)', 0, 0)]:
        plan = predict(cfg, batch, seq, dtype, args.lora_rank, targets, resident_blocks=resident, ram_blocks=ram,
                       quant=quant)
        print(f'  {label:<22} device {plan.device_bytes / GIB:7.2f} GiB   host {plan.host_bytes / GIB:7.2f} GiB')


# --- export ----------------------------------------------------------------------------------

def _export_arguments(p):
    p.add_argument('--model', required=True, help='the prepared model folder')
    p.add_argument('--lora', default=None, help='the adapter folder (PEFT layout) to merge or export')
    p.add_argument('--format', required=True, choices=('meta', 'hf', 'peft'), help='meta | hf | peft')
    p.add_argument('--out', required=True, help='the folder to write (replaced whole, only on success)')
    p.add_argument('--shards', type=int, default=1, help='meta: model-parallel shards (1 for 7B, 2 for 13B, 8 for 70B)')
    p.add_argument('--dtype', default=None, help='bf16 | fp16 | fp32 (default: the prepared model\'s)')
    p.add_argument('--max-shard-size', type=float, default=2.0, help='hf: GiB per safetensors file (default 2)')


@command('export', 'write a prepared model (+ LoRA) as merged Meta shards, a merged HF folder or a PEFT adapter')
@arguments(_export_arguments)
def run_export(args):
    from .formats.export import export
    out = export(args.model, args.out, args.format, adapter=args.lora, shards=args.shards, dtype=args.dtype,
                 max_shard_bytes=int(args.max_shard_size * 2**30))
    print(f'{args.format} export written to {os.path.abspath(out)}')


# --- bci_decode -------------------------------------------------------------------------------

def _bci_decode_arguments(p):
    from .bci_decode import add_arguments
    add_arguments(p)


@command('bci_decode', 'decode the sentences of BCI trials with a trained encoder and decoder; WER and exact match')
@arguments(_bci_decode_arguments)
def run_bci_decode(args):
    from .bci_decode import run
    return run(args)


def _bci_demo_arguments(p):
    from .bci_demo import add_arguments
    add_arguments(p)


@command('bci_demo', 'write a synthetic BCI data set (words as spatio-temporal patterns in noise)')
@arguments(_bci_demo_arguments)
def run_bci_demo(args):
    from .bci_demo import run
    return run(args)
