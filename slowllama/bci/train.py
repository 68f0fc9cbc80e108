"""The BCI recipe: `finetune --model M --bci-data DIR [--bci-* flags]` trains the signal encoder and the
decoder's LoRA together with the finetune loop (one AdamW, its schedule, checkpoints, metrics).

The encoder comes from, in order: the run's own adapter/ when resuming, --bci-encoder, the --adapter
folder when it holds one, else a new one built from the --bci-* flags and the train split's statistics.
At each evaluation a few validation trials are decoded and their exact match and WER shown.
"""
import os
import sys

from ..errors import SlowLlamaError
from ..recipes.run_setup import load_model, run_config_of, setup_run, train_and_report
from ..train import Trainer
from .data import TrialBatches, TrialTexts, channel_stats, fixed_trial_batches, read_data
from .decode import decode_trials, exact_match, word_error_rate
from .encoder import (EncoderConfig, SignalEncoder, attach_encoder, embedding_rms, eval_loss, has_encoder,
                      load_encoder, prompt_ids, train_step)

def build(opts, stream=None):
    """-> (model, tokenizer, trainer) for a BCI run, ready to run."""
    run = setup_run(opts, ('model',), 'with --bci-data')
    data = read_data(opts.bci_data)
    model = load_model(opts, run.device)  # seeds --seed first: the LoRA, then the encoder initialisation
    tokenizer = run.tokenizer
    encoder = attach_encoder(model, make_encoder(opts, data, model, tokenizer, run.out).to(run.device))
    prompt = prompt_ids(encoder.cfg, tokenizer)
    trials = TrialTexts(data, tokenizer, encoder.cfg.start_token, opts.seq_len)
    # under torchrun the batches are global; each process trains on its own rows of them
    train = TrialBatches(trials, data.indices('train'), opts.batch_size * run.group.world, opts.seed)
    val_indices = data.indices('val')
    val = fixed_trial_batches(trials, val_indices, opts.batch_size, opts.eval_batches)
    sample_fn = None
    if opts.bci_decode_trials > 0 and val_indices:
        shown = val_indices[:opts.bci_decode_trials]
        sample_fn = lambda m: decode_summary(m, data, tokenizer, shown, opts.seq_len)  # noqa: E731
    trainer = Trainer(model, run.train_cfg, run.out, train, val, step_fn=lambda m, b: train_step(m, b, prompt),
                      eval_fn=lambda m, b: eval_loss(m, b, prompt), sample_fn=sample_fn,
                      run_config=run_config_of(opts), stream=stream, group=run.group,
                      skip_nonfinite=opts.skip_nonfinite, tensorboard=opts.tensorboard)
    trainer.log(data.summary())
    trainer.log(f'encoder: {encoder.cfg.n_patches} prefix positions, '
                f'{sum(p.numel() for p in encoder.parameters()):,} parameters')
    return model, tokenizer, trainer


def run(opts, stream=None):
    """Train as `opts` (resolved finetune flags with --bci-data) say; returns the Trainer's summary."""
    _, _, trainer = build(opts, stream or sys.stderr)
    return train_and_report(trainer, resume=opts.resume)


def make_encoder(opts, data, model, tokenizer, run_dir):
    own = os.path.join(str(run_dir), 'adapter')
    source = next((f for f in (own if opts.resume else None, opts.bci_encoder, opts.adapter) if has_encoder(f)),
                  None)
    if source is None and opts.bci_encoder is not None:
        raise SlowLlamaError(f'{opts.bci_encoder}: no encoder_config.json here (--bci-encoder)')
    if source is not None:
        encoder = load_encoder(source)
        if (encoder.cfg.channels, encoder.cfg.time) != (data.channels, data.time):
            raise SlowLlamaError(f'{source}: the encoder reads {encoder.cfg.channels} channels x {encoder.cfg.time} '
                                 f'samples, {opts.bci_data} has {data.channels} x {data.time}')
        return encoder
    cfg = EncoderConfig(channels=data.channels, time=data.time, out_dim=model.cfg.dim, d_enc=opts.bci_d_enc,
                        layers=opts.bci_layers, heads=opts.bci_heads, ffn=opts.bci_ffn, patch=opts.bci_patch,
                        stride=opts.bci_stride, dropout=opts.bci_dropout, prompt=opts.bci_prompt,
                        start_token=start_token(tokenizer))
    mean, std = channel_stats(data.signals, data.indices('train'))
    return SignalEncoder(cfg, mean, std).match_scale(embedding_rms(model, model.cfg.vocab_size))


def start_token(tokenizer):
    """The token after the prefix that predicts the first word: BOS, else EOS, else 0."""
    return next((i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None), 0)


def decode_summary(model, data, tokenizer, indices, max_new_tokens):
    """'exact 3/8, WER 0.21: "pred" for "ref"' over a few validation trials (shown at evaluations)."""
    predictions = decode_trials(model, data, tokenizer, indices, max_new_tokens)
    references = [data.texts[i] for i in indices]
    hits = round(exact_match(predictions, references) * len(indices))
    return (f'exact {hits}/{len(indices)}, WER {word_error_rate(predictions, references):.3f}: '
            f'{predictions[0]!r} for {references[0]!r}')
