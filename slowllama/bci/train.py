"""The BCI recipe: `slowllama bci --model M --bci-data DIR [flags]` (or `finetune --bci-data DIR`, the
same run) trains the signal encoder and the decoder's LoRA together with the finetune loop (one AdamW,
its schedule, checkpoints, metrics). `slowllama bci --help` lists finetune's flags and the BCI's own.

The encoder comes from, in order: the run's own adapter/ when resuming, --bci-encoder, the --adapter
folder when it holds one, else a new one built from the --bci-* flags and the train split's statistics.
A new encoder is first pretrained alone to read the words by CTC (pretrain.py, --bci-pretrain steps).
Training trials are augmented (augment.py) unless --bci-no-augment; the encoder has its own learning
rate (--bci-lr, on the same schedule) and weight decay (--bci-weight-decay). At each evaluation the
validation trials (up to --bci-decode-trials) are decoded: their exact match (then WER) is the score
that keeps the best adapter + encoder as best/, which bci_decode reads by default; --patience stops
the run after that many evaluations without a better score. A set without val trials lends one
training trial of each sentence that has three or more to validation.
"""
import os
import sys

from ..errors import SlowLlamaError
from ..recipes.options import add_arguments as add_finetune_arguments
from ..recipes.options import resolve
from ..recipes.run_setup import load_model, run_config_of, setup_run, train_and_report
from ..training.trainer import Trainer
from .augment import Augment
from .data import TrialBatches, TrialTexts, channel_stats, fixed_trial_batches, read_data
from .decode import decode_trials, exact_match, word_error_rate
from .encoder import (ENCODER_NAME, EncoderConfig, SignalEncoder, attach_encoder, embedding_rms, eval_loss, has_encoder,
                      load_encoder, prompt_ids, train_step)
from .pretrain import pretrain_encoder


def build(opts, stream=None):
    """-> (model, tokenizer, trainer) for a BCI run, ready to run."""
    run = setup_run(opts, ('model',), 'with --bci-data')
    data = read_data(opts.bci_data)
    model = load_model(opts, run.device)  # seeds --seed first: the LoRA, then the encoder initialisation
    tokenizer = run.tokenizer
    encoder, is_new = make_encoder(opts, data, model, tokenizer, run.out)
    encoder = attach_encoder(model, encoder.to(run.device))
    prompt = prompt_ids(encoder.cfg, tokenizer)
    trials = TrialTexts(data, tokenizer, encoder.cfg.start_token, opts.seq_len)
    train_indices, val_indices = split_for_selection(data)
    shift = max(1, data.time // 16) if opts.bci_shift is None else opts.bci_shift
    augment = None if opts.bci_no_augment else Augment(shift, opts.bci_stretch, opts.bci_scale, opts.bci_noise,
                                                        opts.bci_channel_drop)
    encoder_settings = {'lr': opts.lr if opts.bci_lr is None else opts.bci_lr, 'weight_decay': opts.bci_weight_decay}
    pretrained = None
    if is_new and opts.bci_pretrain > 0:
        ctc = pretrain_encoder(encoder, data, train_indices, opts.bci_pretrain, opts.batch_size,
                               encoder_settings['lr'], opts.bci_weight_decay, augment, opts.seed)
        pretrained = f'encoder pretrained alone: {len(ctc)} CTC steps, loss {ctc[0]:.3f} -> {ctc[-1]:.3f}'
    # under torchrun the batches are global; each process trains on its own rows of them
    train = TrialBatches(trials, train_indices, opts.batch_size * run.group.world, opts.seed)
    val = fixed_trial_batches(trials, val_indices, opts.batch_size, opts.eval_batches)
    score_fn = None
    if opts.bci_decode_trials > 0 and val_indices:
        scored = val_indices[:opts.bci_decode_trials]
        longest = max(len(trials.text_ids(i)) for i in train_indices)  # an untrained decoder may never stop
        score_fn = lambda m: validation_score(m, data, tokenizer, scored, min(opts.seq_len, longest + 2))  # noqa: E731
    trainer = Trainer(model, run.train_cfg, run.out, train, val,
                      step_fn=lambda m, b: train_step(m, b, prompt, augment),
                      eval_fn=lambda m, b: eval_loss(m, b, prompt), score_fn=score_fn,
                      run_config=run_config_of(opts), stream=stream, group=run.group,
                      skip_nonfinite=opts.skip_nonfinite, tensorboard=opts.tensorboard,
                      param_groups={f'{ENCODER_NAME}.': encoder_settings})
    trainer.log(data.summary())
    if len(train_indices) < len(data.indices('train')):
        trainer.log(f'no val trials: {len(val_indices)} train trials lent to validation')
    trainer.log(f'augmentation: {augment or "off"}')
    if pretrained:
        trainer.log(pretrained)
    trainer.log(f'encoder: {encoder.cfg.n_patches} prefix positions, '
                f'{sum(p.numel() for p in encoder.parameters()):,} parameters')
    return model, tokenizer, trainer


def run(opts, stream=None):
    """Train as `opts` (resolved finetune flags with --bci-data) say; returns the Trainer's summary."""
    _, _, trainer = build(opts, stream or sys.stderr)
    return train_and_report(trainer, resume=opts.resume)


def add_arguments(p):
    """The `bci` command's flags: finetune's, and the BCI's own group listed in its --help."""
    add_finetune_arguments(p, show_bci=True)


def run_command(args):
    """`slowllama bci ...`: the parsed flags resolved as finetune resolves them, then the BCI recipe."""
    opts = resolve(args)
    if opts.bci_data is None:
        raise SlowLlamaError('--bci-data DIR is required (the BCI data folder: signals.npy + texts.jsonl)')
    if opts.objective != 'sft':
        raise SlowLlamaError(f'--objective {opts.objective} does not combine with --bci-data')
    run(opts)
    return 0


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
        return encoder, False
    cfg = EncoderConfig(channels=data.channels, time=data.time, out_dim=model.cfg.dim, d_enc=opts.bci_d_enc,
                        layers=opts.bci_layers, heads=opts.bci_heads, ffn=opts.bci_ffn, patch=opts.bci_patch,
                        stride=opts.bci_stride, dropout=opts.bci_dropout, prompt=opts.bci_prompt,
                        start_token=start_token(tokenizer), stem=opts.bci_stem, kernel=opts.bci_kernel,
                        pool=opts.bci_pool, conv_layers=opts.bci_conv_layers)
    mean, std = channel_stats(data.signals, data.indices('train'))
    return SignalEncoder(cfg, mean, std).match_scale(embedding_rms(model, model.cfg.vocab_size)), True


def start_token(tokenizer):
    """The token after the prefix that predicts the first word: BOS, else EOS, else 0."""
    return next((i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None), 0)


def split_for_selection(data):
    """-> (train indices, val indices): the set's own, or, without val trials, the last training trial
    of each sentence that has three or more lent to validation."""
    train, val = data.indices('train'), data.indices('val')
    if val:
        return train, val
    by_text = {}
    for i in train:
        by_text.setdefault(data.texts[i], []).append(i)
    lent = {trials[-1] for trials in by_text.values() if len(trials) >= 3}
    return [i for i in train if i not in lent], sorted(lent)


def validation_score(model, data, tokenizer, indices, max_new_tokens):
    """The validation trials decoded: exact match, WER and one example; the score is the exact match,
    ties broken by the WER."""
    predictions = decode_trials(model, data, tokenizer, indices, max_new_tokens)
    references = [data.texts[i] for i in indices]
    exact, wer = exact_match(predictions, references), word_error_rate(predictions, references)
    hits = round(exact * len(indices))
    sample = f'val exact {hits}/{len(indices)}, WER {wer:.3f}: {predictions[0]!r} for {references[0]!r}'
    return {'score': exact - wer / 100, 'val_exact': exact, 'val_wer': wer, 'sample': sample}
