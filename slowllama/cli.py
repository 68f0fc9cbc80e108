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
