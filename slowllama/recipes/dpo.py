"""The DPO recipe: `finetune --objective dpo --model M --data PAIRS.jsonl [--beta B] [flags]` tunes the
LoRA on preference pairs (slowllama/data/preference.py) with the sigmoid DPO loss (slowllama/training/dpo.py), in the
finetune loop (AdamW, schedule, checkpoints and exact resume, metrics, torchrun).

The reference log-probs of every pair are computed first, in one streamed pass with the LoRA switched
off (or with the --adapter the run starts from), and kept in the run folder; --resume reads them back
unless the pairs, the model or that adapter changed, in which case they are computed again.
"""
import sys

from ..data.preference import PairBatches, fixed_pair_batches, load_pairs
from ..errors import SlowLlamaError
from ..generation.completion import complete
from ..training.checkpoint import list_checkpoints
from ..training.dpo import (
    REFERENCE_FILE,
    attach_reference,
    compute_reference,
    eval_step,
    fingerprint,
    read_reference,
    train_step,
    write_reference,
)
from ..training.trainer import Trainer
from ..weights.formats.peft import adapter_folder
from .run_setup import load_model, run_config_of, setup_run, train_and_report

REFERENCE_BATCHES = 4  # training batches per batch of the reference pass


def build(opts, stream=None):
    """-> (model, tokenizer, trainer) of a DPO run, ready to run."""
    if opts.beta <= 0:
        raise SlowLlamaError(f'--beta must be positive, got {opts.beta}')
    if opts.pack:
        raise SlowLlamaError('--pack does not apply to --objective dpo (each answer is a row of its own)')
    run = setup_run(opts, ('model', 'data'), 'with --objective dpo, a JSONL file of {"prompt", "chosen", '
                                             '"rejected"} pairs')
    if not opts.resume and list_checkpoints(run.out):  # before the reference file is written there
        raise SlowLlamaError(f'{run.out}: already holds a run; add --resume to continue it, or choose another --out')
    tokenizer = run.tokenizer
    pad_id = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
    pairs = load_pairs(opts.data, tokenizer, opts.seq_len, seed=opts.seed, val_fraction=opts.val_fraction,
                       split=opts.split, chat_format=opts.chat_format)
    model = load_model(opts, run.device, rows=2 * opts.batch_size)  # a chosen and a rejected row per pair
    note = reference_logps(model, pairs, opts, run, pad_id, stream)
    # under torchrun the batches are global; each process trains on its own pairs of them
    train = PairBatches(pairs.train, opts.batch_size * run.group.world, opts.seed, pad_id)
    val = fixed_pair_batches(pairs.val, opts.batch_size, pad_id, opts.eval_batches)
    sample_fn = None
    if opts.prompt:
        sample_fn = lambda m: complete(m, tokenizer, opts.prompt, opts.max_new_tokens)  # noqa: E731
    trainer = Trainer(model, run.train_cfg, run.out, train, val,
                      step_fn=lambda m, b: train_step(m, b, opts.beta), eval_fn=lambda m, b: eval_step(m, b, opts.beta),
                      sample_fn=sample_fn, run_config=run_config_of(opts), stream=stream, group=run.group,
                      skip_nonfinite=opts.skip_nonfinite, tensorboard=opts.tensorboard)
    trainer.log(pairs.summary)
    if pairs.rendering:
        trainer.log(pairs.rendering)
    trainer.log(note)
    return model, tokenizer, trainer


def run(opts, stream=None):
    """Train as `opts` (resolved finetune flags with --objective dpo) say; returns the Trainer's summary."""
    _, _, trainer = build(opts, stream or sys.stderr)
    return train_and_report(trainer, resume=opts.resume)


def reference_logps(model, pairs, opts, run, pad_id, stream):
    """Attach each pair's reference log-probs: read from the run folder when they match, else computed
    (and saved by the main process). Returns a line for the log."""
    adapter = adapter_folder(opts.adapter)
    key = fingerprint(pairs.fingerprint, opts.model, adapter)
    saved = read_reference(run.out, key) if opts.resume else None
    if saved is not None:
        note = f'reference log-probs read from {REFERENCE_FILE}'
    else:
        # no gradients, no saved inputs: larger batches than training's
        size = REFERENCE_BATCHES * opts.batch_size
        saved = {split: compute_reference(model, getattr(pairs, split), size, pad_id, lora_off=adapter is None,
                                          group=run.group, stream=stream)
                 for split in ('train', 'val')}
        if run.group.is_main:
            write_reference(run.out, key, saved)
        run.group.barrier()
        source = 'the base model (LoRA off)' if adapter is None else f'the starting adapter {adapter}'
        note = f'reference log-probs of {len(pairs.train) + len(pairs.val)} pairs computed with {source}'
        if opts.resume:
            note += ' (none saved for these pairs, model and adapter)'
    attach_reference(pairs.train, saved['train'])
    attach_reference(pairs.val, saved['val'])
    return note
