"""What every training recipe does first, in one place: check the flags, join the process group, pick
the device, open the prepared model (its manifest, tokenizer and weights, with LoRA) and the run folder;
build the supervised (text) trainer; run a trainer to its end and report. Recipes import this module,
never each other."""
import os
import time
from dataclasses import dataclass

import torch

from ..api import load
from ..data.dataset import load_data
from ..engine.devices import default_dtype, resolve_device
from ..engine.options import EngineOptions
from ..errors import SlowLlamaError
from ..generation.completion import complete
from ..model.lora import LoraConfig
from ..tokenizer.tokenizer import load_tokenizer
from ..training.distributed import collective_timeout, init_from_env, shutdown
from ..training.trainer import Trainer
from ..weights.prepared import read_manifest, verify_model
from .options import parse_bytes, train_config


def new_run_dir(root='runs'):
    stamp = time.strftime('%Y%m%d-%H%M%S')
    path, n = os.path.join(root, stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(root, f'{stamp}-{n}')
    return path


@dataclass
class RunSetup:
    group: object      # slowllama.training.distributed.Group
    device: object     # torch.device
    tokenizer: object
    train_cfg: object  # slowllama.training.trainer.TrainConfig
    out: str           # the run folder (rank 0's choice on every process)


def setup_run(opts, required, hint):
    """What every recipe needs first: flags checked, the process group and device, the model's
    manifest (verified with --verify) and tokenizer, the training settings and the run folder."""
    for flag in required:
        if getattr(opts, flag) is None:
            raise SlowLlamaError(f'--{flag} is required ({hint})')
    if opts.resume and opts.out is None:
        raise SlowLlamaError('--resume needs --out RUN_DIR, the run to continue')
    for flag in ('batch_size', 'eval_batches', 'max_new_tokens', 'micro_batches_per_trip'):
        if getattr(opts, flag) is not None and getattr(opts, flag) < 1:
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
    tokenizer = load_tokenizer(opts.model)
    if opts.chat_template is not None:
        if opts.chat_format == 'plain':
            raise SlowLlamaError('--chat-template and --chat-format plain contradict each other; give one')
        tokenizer.use_chat_template(opts.chat_template)
    return RunSetup(group, device, tokenizer, train_cfg, out)


def load_model(opts, device, rows=None):
    """The prepared model with fresh LoRA (seeded by --seed) or --adapter, placed as the flags say,
    and its step planned for --grad-accum micro-batches of `rows` (default --batch-size) x --seq-len:
    what cannot fit (--keep-activations all, say) is refused before the run starts."""
    torch.manual_seed(opts.seed)  # the LoRA initialisation
    lora = LoraConfig(opts.lora_rank, opts.lora_alpha, opts.lora_dropout, opts.targets)
    return load(opts.model, device, default_dtype(device, opts.dtype), lora=lora, adapter=opts.adapter,
                dropout=opts.dropout, options=engine_options(opts, rows))


def engine_options(opts, rows=None):
    """The engine's settings from their flags: the step it plans is --grad-accum micro-batches of
    `rows` (default --batch-size) x --seq-len."""
    return EngineOptions(offload=opts.offload, max_device_mem=parse_bytes(opts.max_device_mem, '--max-device-mem'),
                         max_ram=parse_bytes(opts.max_ram, '--max-ram'), keep_activations=opts.keep_activations,
                         micro_batches_per_trip=opts.micro_batches_per_trip, grad_accum=opts.grad_accum,
                         batch_hint=(opts.batch_size, opts.seq_len), step_rows=rows,
                         packed=bool(getattr(opts, 'pack', False)),
                         router_aux_loss_coef=getattr(opts, 'router_aux_loss_coef', None))


def run_config_of(opts):
    return {k: str(v) if isinstance(v, os.PathLike) else v for k, v in vars(opts).items()}


def build_sft(opts, stream=None):
    """-> (model, tokenizer, trainer) of a supervised run on text data, ready to run."""
    run = setup_run(opts, ('model', 'data'), 'run finetune.py with no flags at all for the demo')
    # under torchrun the data yields global batches; each process trains on its own rows of them
    data = load_data(opts.data, run.tokenizer, opts.seq_len, opts.batch_size * run.group.world, seed=opts.seed,
                     val_fraction=opts.val_fraction, pack=opts.pack, kind=opts.data_format,
                     eval_batches=opts.eval_batches, field=opts.field, split=opts.split,
                     chat_format=opts.chat_format)
    model = load_model(opts, run.device)
    sample_fn = None
    if opts.prompt:
        sample_fn = lambda m: complete(m, run.tokenizer, opts.prompt, opts.max_new_tokens)  # noqa: E731
    trainer = Trainer(model, run.train_cfg, run.out, data.train, data.val, sample_fn=sample_fn,
                      run_config=run_config_of(opts), stream=stream, group=run.group,
                      skip_nonfinite=opts.skip_nonfinite, tensorboard=opts.tensorboard)
    trainer.log(data.summary)
    if data.rendering:
        trainer.log(data.rendering)
    return model, run.tokenizer, trainer


def train_and_report(trainer, resume=False):
    """Run the trainer; close the process group (on failure too); print the summary and the run folder
    on the main process. Returns the Trainer's summary."""
    say = print if trainer.group.is_main else (lambda *a, **k: None)
    say(f'run folder: {trainer.run_dir}', flush=True)
    try:
        summary = trainer.run(resume=resume)
    except BaseException:
        shutdown(ok=False)
        raise
    shutdown()
    say(format_summary(summary), flush=True)
    say(f'run folder: {trainer.run_dir}', flush=True)
    return summary


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
