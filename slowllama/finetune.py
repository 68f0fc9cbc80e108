"""The finetune recipe: flags (and a YAML --config with the same keys), then data + model + Trainer.

Every flag defaults to None in argparse, so that "given on the command line" can be told apart from
"not given": the command line wins over the YAML file, which wins over DEFAULTS below.
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

from .bci_train import BCI_DEFAULTS, BCI_FLAGS
from .distributed import shutdown
from .errors import SlowLlamaError

# flag -> (type, default, help); the dest is the flag with '-' -> '_'
FLAGS = {
    'model': (str, None, 'prepared model folder (prepare_model.py)'),
    'data': (str, None, 'training data: .txt, or .jsonl / .json with "text", alpaca or chat records'),
    'out': (str, None, 'run folder (default: a new folder under runs/)'),
    'device': (str, None, 'cpu | cuda | mps (default: cuda, then mps, then cpu)'),
    'iters': (int, 100, 'optimizer steps'),
    'batch-size': (int, 1, 'sequences per micro-batch'),
    'seq-len': (int, 256, 'tokens per sequence'),
    'lr': (float, 1e-4, 'peak learning rate'),
    'lora-rank': (int, 8, 'LoRA rank r'),
    'lora-alpha': (float, 16.0, 'LoRA alpha (scale = alpha / r)'),
    'lora-dropout': (float, 0.0, 'dropout on the LoRA input'),
    'dropout': (float, 0.0, "dropout in the model's blocks (attention and residual branches)"),
    'targets': (str, 'q,v', 'LoRA targets: q,k,v,o,gate,up,down (or wq..w3, q_proj..down_proj)'),
    'seed': (int, 0, 'random seed (LoRA init, data order, dropout)'),
    'save-every': (int, 0, 'checkpoint every N steps (0: at the end only)'),
    'resume': (bool, False, 'continue the run in --out from its newest complete checkpoint'),
    'offload': (str, 'auto', 'where frozen weights wait: auto | disk | ram | device'),
    'max-device-mem': (str, None, 'cap on device memory for --offload auto, e.g. 20GB'),
    'max-ram': (str, None, 'cap on host memory for frozen weights with --offload auto, e.g. 48GB'),
    'skip-nonfinite': (bool, False, 'skip a step whose loss or gradient is not finite instead of stopping'),
    'verify': (bool, False, 'check every model file against its manifest checksum before starting'),
    'dtype': (str, None, 'bf16 | fp16 | fp32 (default: fp32 on cpu, bf16 elsewhere)'),
    'adapter': (str, None, 'start from this adapter folder'),
    'data-format': (str, None, 'text | jsonl | alpaca | chat (default: from the file)'),
    'pack': (bool, False, 'pack short samples (or text chunks) into full --seq-len rows; each sample attends '
                          'to itself only'),
    'val-fraction': (float, 0.0, 'share of the data held out for validation'),
    'eval-every': (int, 0, 'evaluate every N steps (0: at the end only)'),
    'eval-batches': (int, 16, 'validation batches per evaluation at most'),
    'prompt': (str, None, 'prompt to complete at each evaluation'),
    'max-new-tokens': (int, 32, 'length of that completion'),
    'grad-accum': (int, 1, 'micro-batches per optimizer step'),
    'warmup': (int, 0, 'steps of linear learning-rate warm-up'),
    'schedule': (str, 'cosine', 'cosine | constant (after the warm-up)'),
    'min-lr-ratio': (float, 0.0, 'cosine floor, as a fraction of --lr'),
    'weight-decay': (float, 0.0, 'AdamW weight decay'),
    'beta1': (float, 0.9, 'AdamW beta1'),
    'beta2': (float, 0.999, 'AdamW beta2'),
    'adam-eps': (float, 1e-8, 'AdamW epsilon'),
    'grad-clip': (float, 1.0, 'clip the global gradient norm to this (0: off)'),
    'keep-checkpoints': (int, 0, 'keep only the newest N checkpoints (0: all)'),
    'config': (str, None, 'YAML file whose keys are these flag names; flags on the command line win'),
}
FLAGS.update(BCI_FLAGS)  # --bci-data DIR switches to the BCI recipe (bci_train.py)


def dest(flag):
    return flag.replace('-', '_')


def add_arguments(p):
    for flag, (kind, default, help) in FLAGS.items():
        shown = f'{help} (default {default})' if default not in (None, False) else help
        if kind is bool:
            p.add_argument(f'--{flag}', action='store_true', default=None, help=shown)
        else:
            p.add_argument(f'--{flag}', type=kind, default=None, help=shown)


def resolve(args):
    """argparse Namespace (None = not given) -> Namespace with YAML values and defaults filled in."""
    given = {dest(f): getattr(args, dest(f), None) for f in FLAGS}
    from_file = read_config(given['config']) if given['config'] else {}
    values = {}
    bci = given['bci_data'] is not None or from_file.get('bci_data') is not None
    for flag, (_, default, _) in FLAGS.items():
        name = dest(flag)
        default = BCI_DEFAULTS.get(flag, default) if bci else default
        values[name] = next((v for v in (given[name], from_file.get(name)) if v is not None), default)
    return argparse.Namespace(**values)


def read_config(path):
    import yaml
    try:
        with open(path, encoding='utf-8') as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise SlowLlamaError(f'{path}: config file not found (--config)') from None
    except yaml.YAMLError as e:
        raise SlowLlamaError(f'{path}: not valid YAML ({str(e).splitlines()[0]})') from None
    if not isinstance(raw, dict):
        raise SlowLlamaError(f'{path}: the config must be a mapping of flag names to values')
    values = {}
    for key, value in raw.items():
        flag = str(key).replace('_', '-')
        if flag not in FLAGS or flag == 'config':
            raise SlowLlamaError(f'{path}: unknown key {key!r} (keys are the finetune flag names)')
        values[dest(flag)] = _convert(path, key, FLAGS[flag][0], value)
    return values


def _convert(path, key, kind, value):
    if value is None:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise SlowLlamaError(f'{path}: {key} must be true or false')
        return value
    if kind is str and isinstance(value, (list, tuple)):  # targets: [q, v]
        return ','.join(str(v) for v in value)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise SlowLlamaError(f'{path}: {key} must be a {kind.__name__}, got {value!r}') from None


def nothing_given(args):
    return all(getattr(args, dest(f), None) is None for f in FLAGS)


def new_run_dir(root='runs'):
    stamp = time.strftime('%Y%m%d-%H%M%S')
    path, n = os.path.join(root, stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(root, f'{stamp}-{n}')
    return path


# --- the recipe ----------------------------------------------------------------------------------

@dataclass
class RunSetup:
    group: object      # slowllama.distributed.Group
    device: object     # torch.device
    tokenizer: object
    train_cfg: object  # slowllama.train.TrainConfig
    out: str           # the run folder (rank 0's choice on every process)


def setup_run(opts, required, hint):
    """What every recipe needs first: flags checked, the process group and device, the model's
    manifest (verified with --verify) and tokenizer, the training settings and the run folder."""
    from .devices import resolve_device
    from .distributed import collective_timeout, init_from_env
    from .formats.tokenizer import load_tokenizer
    from .store import read_manifest, verify_model
    for flag in required:
        if getattr(opts, flag) is None:
            raise SlowLlamaError(f'--{flag} is required ({hint})')
    if opts.resume and opts.out is None:
        raise SlowLlamaError('--resume needs --out RUN_DIR, the run to continue')
    for flag in ('batch_size', 'eval_batches', 'max_new_tokens'):
        if getattr(opts, flag) < 1:
            raise SlowLlamaError(f'--{flag.replace("_", "-")} must be at least 1, got {getattr(opts, flag)}')
    train_cfg = train_config(opts)
    manifest = read_manifest(opts.model)  # a clear error for a folder that is not a prepared model
    model_bytes = sum(f['size'] for f in manifest['files'].values())
    sample_tokens = opts.max_new_tokens if opts.prompt else 0
    group, device_name = init_from_env(opts.device, collective_timeout(model_bytes, opts.grad_accum,
                                                                       opts.eval_batches, sample_tokens))
    device = resolve_device(device_name)
    if opts.verify:
        verify_model(opts.model)
    if opts.seq_len > manifest['config']['max_seq_len']:
        raise SlowLlamaError(f'--seq-len {opts.seq_len} is above the model\'s maximum of '
                             f'{manifest["config"]["max_seq_len"]} positions')
    out = group.gather(opts.out or new_run_dir())[0]  # every process writes (or reads) rank 0's folder
    return RunSetup(group, device, load_tokenizer(opts.model), train_cfg, out)


def train_config(opts):
    from .train import TrainConfig
    return TrainConfig(iters=opts.iters, grad_accum=opts.grad_accum, lr=opts.lr, betas=(opts.beta1, opts.beta2),
                       eps=opts.adam_eps, weight_decay=opts.weight_decay, warmup=opts.warmup, schedule=opts.schedule,
                       min_lr_ratio=opts.min_lr_ratio, grad_clip=opts.grad_clip, seed=opts.seed,
                       save_every=opts.save_every, eval_every=opts.eval_every, keep_checkpoints=opts.keep_checkpoints)


def load_model(opts, device):
    """The prepared model with fresh LoRA (seeded by --seed) or --adapter, placed as the flags say."""
    import slowllama
    from .generate import default_dtype
    torch.manual_seed(opts.seed)  # the LoRA initialisation
    lora = slowllama.LoraConfig(opts.lora_rank, opts.lora_alpha, opts.lora_dropout, opts.targets)
    return slowllama.load(opts.model, device, default_dtype(device, opts.dtype), lora=lora, adapter=opts.adapter,
                          offload=opts.offload, dropout=opts.dropout,
                          max_device_mem=parse_bytes(opts.max_device_mem, '--max-device-mem'),
                          max_ram=parse_bytes(opts.max_ram, '--max-ram'), batch_hint=(opts.batch_size, opts.seq_len))


def run_config_of(opts):
    return {k: str(v) if isinstance(v, os.PathLike) else v for k, v in vars(opts).items()}


def build(opts, stream=None):
    """-> (model, tokenizer, trainer) ready to run."""
    if getattr(opts, 'bci_data', None) is not None:
        from .bci_train import build_bci
        return build_bci(opts, stream)
    from .data import load_data
    from .generate import complete
    from .train import Trainer
    run = setup_run(opts, ('model', 'data'), 'run finetune.py with no flags at all for the demo')
    # under torchrun the data yields global batches; each process trains on its own rows of them
    data = load_data(opts.data, run.tokenizer, opts.seq_len, opts.batch_size * run.group.world, seed=opts.seed,
                     val_fraction=opts.val_fraction, pack=opts.pack, kind=opts.data_format,
                     eval_batches=opts.eval_batches)
    model = load_model(opts, run.device)
    sample_fn = None
    if opts.prompt:
        sample_fn = lambda m: complete(m, run.tokenizer, opts.prompt, opts.max_new_tokens)  # noqa: E731
    trainer = Trainer(model, run.train_cfg, run.out, data.train, data.val, sample_fn=sample_fn,
                      run_config=run_config_of(opts), stream=stream, group=run.group,
                      skip_nonfinite=opts.skip_nonfinite)
    trainer.log(data.summary)
    return model, run.tokenizer, trainer


def finetune(opts, stream=None):
    """Run the recipe; returns the Trainer's summary."""
    stream = stream or sys.stderr
    model, _, trainer = build(opts, stream)
    say = print if trainer.group.is_main else (lambda *a, **k: None)
    say(f'run folder: {trainer.run_dir}', flush=True)
    try:
        summary = trainer.run(resume=opts.resume)
    except BaseException:
        shutdown(ok=False)
        raise
    shutdown()
    say(format_summary(summary), flush=True)
    say(f'run folder: {trainer.run_dir}', flush=True)
    return summary


def parse_bytes(text, flag):
    """'20GB', '3.5GiB', '512MB' or a plain number of bytes -> int (None stays None)."""
    if text is None:
        return None
    units = {'': 1, 'b': 1, 'kb': 1e3, 'mb': 1e6, 'gb': 1e9, 'tb': 1e12, 'kib': 2 ** 10, 'mib': 2 ** 20,
             'gib': 2 ** 30, 'tib': 2 ** 40, 'k': 2 ** 10, 'm': 2 ** 20, 'g': 2 ** 30, 't': 2 ** 40}
    number = str(text).strip().lower()
    digits = number.rstrip('abcdefghijklmnopqrstuvwxyz ')
    unit = number[len(digits):].strip()
    try:
        value = float(digits) * units[unit]
    except (KeyError, ValueError):
        raise SlowLlamaError(f'{flag}: cannot read {text!r} as a size (e.g. 20GB, 3.5GiB)') from None
    if value <= 0:
        raise SlowLlamaError(f'{flag} must be positive, got {text!r}')
    return int(value)


def format_summary(summary):
    parts = [f'step {summary["step"]}']
    if summary['first_loss'] is not None:
        parts.append(f'loss {summary["first_loss"]:.4f} -> {summary["last_loss"]:.4f}')
    if summary['eval_loss'] is not None:
        parts.append(f'eval loss {summary["eval_loss"]:.4f}')
    if summary['tokens_per_s']:
        parts.append(f'{summary["tokens_per_s"]:.0f} tokens/s')
    parts.append(f'{summary["seconds"]:.1f}s')
    return 'done: ' + ', '.join(parts)


def run(args):
    if nothing_given(args):
        from .demo import run_demo
        run_demo()
        return 0
    finetune(resolve(args))
    return 0
