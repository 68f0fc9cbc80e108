"""Command-line entry points. Dispatches each command to its recipe (slowllama/recipes/, and the BCI
package's), and is the one place where a SlowLlamaError becomes a single line on stderr and a
non-zero exit (`--debug` shows the traceback). scripts/*.py and `python -m slowllama CMD` call main()."""
import argparse
import importlib
import re
import sys
from typing import NamedTuple

from .errors import SlowLlamaError


class Command(NamedTuple):
    module: str                       # under slowllama/, imported only when the command runs
    help: str
    arguments: str = 'add_arguments'  # the module's function that adds the flags to a parser
    run: str = 'run'                  # the module's function that runs the command on the parsed flags


COMMANDS = {
    'prepare': Command('recipes.prepare', 'turn a Meta / Hugging Face / GGUF checkpoint into a prepared folder'),
    'verify': Command('recipes.verify', 'check every file of a prepared model against the sha256 in its manifest'),
    'finetune': Command('recipes.options', 'LoRA-finetune a prepared model (no flags at all: the embedded demo)',
                        run=None),  # dispatched by run_finetune below
    'test_gen': Command('recipes.generate', 'complete a prompt with a prepared model and an optional LoRA adapter'),
    'chat': Command('recipes.chat', "chat with a prepared model (its chat template, the KV cache kept across turns)"),
    'plot': Command('recipes.plot', 'draw the loss, learning rate (and DPO margins) of one or more runs into a PNG'),
    'bench': Command('recipes.bench', 'benchmark slowllama beside transformers+peft (table + JSON)'),
    'plan': Command('recipes.plan', 'predict peak device and host memory of a finetune before running it'),
    'export': Command('recipes.export', 'write a prepared model (+ LoRA) as merged Meta shards, a merged HF '
                      'folder or a PEFT adapter'),
    'bci': Command('bci.train', "train a BCI signal encoder with the decoder's LoRA (finetune's flags and the "
                   '--bci-* flags; the same run as finetune --bci-data)', run='run_command'),
    'bci_decode': Command('bci.commands', 'decode the sentences of BCI trials with a trained encoder and decoder; '
                          'WER and exact match', 'add_decode_arguments', 'run_decode'),
    'bci_demo': Command('bci.commands', 'write a synthetic BCI data set (words as spatio-temporal patterns in noise)',
                        'add_synthetic_arguments', 'run_synthetic'),
}
COMMANDS['generate'] = COMMANDS['test_gen']  # an alias


def module(name):
    return importlib.import_module(f'{__package__}.{name}')


OBJECTIVES = {'sft': 'recipes.finetune', 'dpo': 'recipes.dpo'}  # finetune --objective -> its recipe


def run_finetune(args):
    """finetune with no flags at all runs the demo; with --bci-data (on the command line or in the YAML
    file) the BCI recipe; else the recipe of --objective (sft: text, dpo: preference pairs)."""
    options = module('recipes.options')
    if options.nothing_given(args):
        module('recipes.demo').run_demo()
        return 0
    opts = options.resolve(args)
    if opts.objective not in OBJECTIVES:
        raise SlowLlamaError(f'--objective: unknown objective {opts.objective!r} (use sft or dpo)')
    if opts.bci_data is not None and opts.objective != 'sft':
        raise SlowLlamaError(f'--objective {opts.objective} does not combine with --bci-data')
    module('bci.train' if opts.bci_data is not None else OBJECTIVES[opts.objective]).run(opts)
    return 0


def main(argv=None, prog_command=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if prog_command is not None:
        argv = [prog_command] + argv
    args = build_parser(argv).parse_args(argv)
    debug = getattr(args, 'debug', False)
    try:
        return args.run(args) or 0
    except SlowLlamaError as e:
        if debug:
            raise
        print(f'error: {as_flags(str(e))}', file=sys.stderr)
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


def build_parser(argv=None):
    """The parser of every command; with argv, only the named command's recipe is imported (a command
    starts without importing the others' dependencies)."""
    parser = ArgumentParser(prog='slowllama')
    sub = parser.add_subparsers(dest='command', required=True, parser_class=ArgumentParser)
    chosen = next((a for a in argv if not a.startswith('-')), None) if argv is not None else None
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if argv is not None and name != chosen:
            continue
        recipe = module(command.module)
        getattr(recipe, command.arguments)(p)
        p.add_argument('--debug', action='store_true', help='show the full traceback on errors')
        p.set_defaults(run=getattr(recipe, command.run) if command.run else run_finetune)
    return parser


# The settings that errors raised below the recipes name (EngineOptions, LoraConfig, TrainConfig,
# prepare's and export's arguments): first in the message, or in backticks within it. On the
# command line each is a flag: '--' and its name with dashes, unless RENAMED says otherwise.
SETTINGS = {'batch_size', 'device', 'double_quant', 'dtype', 'eval_every', 'format', 'grad_accum', 'grad_clip',
            'iters', 'keep_activations', 'keep_checkpoints', 'lora', 'lora_rank', 'lr', 'max_device_mem',
            'micro_batches_per_trip',
            'min_lr_ratio', 'offload', 'out', 'patience', 'quant', 'quant_head', 'resume', 'save_every', 'schedule',
            'seq_len', 'shards', 'skip_nonfinite', 'targets', 'tensorboard', 'warmup', 'weight_decay',
            'LoraConfig.rank', 'LoraConfig.dropout', 'LoraConfig.targets'}
RENAMED = {'LoraConfig.rank': '--lora-rank', 'LoraConfig.dropout': '--lora-dropout', 'LoraConfig.targets': '--targets'}


def as_flags(message):
    """An error's settings as the command line's flags: `keep_activations all: ...` ->
    `--keep-activations all: ...`, `lower `seq_len`` -> `lower --seq-len`."""
    def flag(name):
        return RENAMED.get(name, '--' + name.replace('_', '-'))
    message = re.sub(r'`([\w.]+)`', lambda m: flag(m.group(1)) if m.group(1) in SETTINGS else m.group(0), message)
    lead = re.match(r'[\w.]+(?=[: ]|$)', message)
    if lead and lead.group(0) in SETTINGS:
        message = flag(lead.group(0)) + message[lead.end():]
    return message

