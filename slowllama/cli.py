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


@command('prepare', 'turn a Meta / Hugging Face / GGUF checkpoint into a prepared folder')
@arguments(_prepare_arguments)
def run_prepare(args):
    from .formats import prepare
    out = prepare(args.src, args.out, dtype=args.dtype)
    print(f'prepared model written to {os.path.abspath(out)}')


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
