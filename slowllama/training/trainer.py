"""The training loop: AdamW over the trainable parameters only, warm-up then a cosine or constant
learning rate, gradient accumulation and clipping, evaluation, checkpoints that resume exactly,
metrics.jsonl, train.log and a progress bar.

Knows nothing of file formats or tokenizers. It drives any model with trainable_parameters(),
accumulate(micro_batches, shares), loss(...) and save_adapter(folder) (slowllama's StreamedModel;
with traffic(), the bytes each step read and sent to the device are logged too) over any data with
batch(index) -> Batch (slowllama.data.dataset). Other objectives (a prefix encoder, DPO) plug in
through `step_fn` / `eval_fn`.

Run folder:
    adapter/                    the latest adapter (PEFT layout)
    best/                       the adapter of the best validation score (with a score_fn, or --patience)
    checkpoints/step_NNNNNN/    everything --resume needs (see checkpoint.py)
    metrics.jsonl               one JSON object per step
    train.log                   what the console showed, plus the sample completions
    run_config.json             the run's settings
    loss.png                    loss, learning rate (and DPO margins), redrawn at each evaluation
    events.out.tfevents.*       with tensorboard=True: the metrics for TensorBoard
"""
import math
import os
import shutil
import sys
import time
from dataclasses import asdict

import torch

from ..engine.devices import get_rng_state, set_rng_state
from ..engine.moe_plan import experts_line
from ..engine.trip import MicroBatch
from ..errors import SlowLlamaError
from ..weights.files import write_json
from .checkpoint import (CHECKPOINT_DIR, decode_rng, encode_rng, list_checkpoints, read_checkpoint, remove_leftovers,
                         write_checkpoint)
from .distributed import SINGLE
from .plots import LossPlot
from .run_log import RunLog
from .runlock import RunLock, StopSignals
from .settings import TrainConfig, lr_at, optimizer_groups

def default_step(model, batch):
    return MicroBatch(batch.tokens, batch.targets, positions=batch.positions, mask=getattr(batch, 'mask', None))


def default_eval(model, batch):
    return model.loss(batch.tokens, batch.targets, positions=batch.positions)


class Trainer:
    """trainer = Trainer(model, TrainConfig(...), run_dir, data, val=[...]); trainer.run(resume=False)

    data.batch(index) -> a batch with .tokens [batch, seq], .targets and .n_targets (slowllama.data.Batch,
    or a subclass carrying more, e.g. signals); `val` is a list of such batches.
    step_fn(model, batch) -> the MicroBatch (engine/trip.py) the batch sends through the model; the
    step's micro-batches then go through model.accumulate together. Its `metrics` (e.g. DPO's
    rewards), when set, report more than the loss: averaged like the loss, logged in metrics.jsonl
    and on the progress line; every micro-batch must report the same keys.
    eval_fn(model, batch) -> float loss without gradients, or a dict {'loss': ..., other metrics}
    ('eval_' before each in the logs). sample_fn(model) -> str, shown at each evaluation.
    score_fn(model) -> {'score': float (higher is better), other metrics...}: at each evaluation; the
    adapter of the best score is kept as best/ and cfg.patience applies (without score_fn, with
    cfg.patience and validation data, the score is minus the validation loss).
    """

    def __init__(self, model, cfg: TrainConfig, run_dir, data, val=(), step_fn=default_step,
                 eval_fn=default_eval, sample_fn=None, run_config=None, stream=None, group=SINGLE,
                 skip_nonfinite=False, tensorboard=False, score_fn=None, param_groups=None):
        """group: the torch.distributed processes (slowllama.training.distributed); `data` then yields global
        batches, of which this process trains on its own rows. skip_nonfinite: skip a step whose
        loss or gradient is not finite instead of stopping the run. tensorboard: also write the
        metrics as TensorBoard event files. param_groups: {name prefix: {'lr': peak lr,
        'weight_decay': ...}} for parameters with settings of their own (the BCI encoder)."""
        self.model, self.cfg, self.run_dir = model, cfg, str(run_dir)
        self.group, self.skip_nonfinite = group, skip_nonfinite
        self.data, self.val = data, list(val)
        self.step_fn, self.eval_fn, self.sample_fn = step_fn, eval_fn, sample_fn
        self.run_config = run_config or {}
        self.stream = stream or sys.stderr
        self.score_fn = score_fn
        self.params = dict(model.trainable_parameters())
        if not self.params:
            raise SlowLlamaError('the model has no trainable parameters (check `targets`)')
        groups = optimizer_groups(self.params, cfg, param_groups or {})
        self.params = {name: self.params[name] for g in groups for name in g.pop('names')}  # the optimizer's order
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)
        # the selection on held-out data (_select)
        self.best = {'score': None, 'step': None, 'evals_since': 0, 'eval_loss': None}
        self.step = 0
        self.data_position = 0  # micro-batches consumed
        self.metric_names = ()
        self._plan_said = None
        self.run_log = RunLog(self.run_dir, self.stream, enabled=group.is_main)
        self.reports = [LossPlot(self.run_dir, self.log)]  # beside metrics.jsonl, on rank 0
        if tensorboard:
            from .tensorboard_log import TensorBoardLog
            self.reports.append(TensorBoardLog(self.run_dir))

    # --- the loop ------------------------------------------------------------------------------

    def run(self, resume=False):
        """Train up to cfg.iters steps; returns a summary dict. With resume, continue from the newest
        complete checkpoint in run_dir (or start afresh when there is none)."""
        os.makedirs(self.run_dir, exist_ok=True)
        with RunLock(self.run_dir, enabled=self.group.is_main), StopSignals() as stop:
            self._start(resume)
            rows, start = [], time.perf_counter()
            self.run_log.open_bar(self.step, self.cfg.iters)
            self._report('start', self.step)
            try:
                for step in range(self.step + 1, self.cfg.iters + 1):
                    row = self._train_step(step)
                    if self._due(step, self.cfg.eval_every) and (self.val or self.sample_fn or self.score_fn):
                        row.update(self.evaluate(step))
                        row.update(self._select(row))
                        if self.group.active and self.group.gather(bool(row.get('early_stop')))[0]:
                            row['early_stop'] = True  # rank 0 decides, every process stops
                    self.run_log.record(row, self.cfg.iters, self.metric_names)
                    self._report('record', row)
                    if self._due(step, self.cfg.eval_every) and step < self.cfg.iters:
                        self._report('refresh')  # the end's redraw is close()'s
                    rows.append(row)
                    if self._due(step, self.cfg.save_every) or stop.requested or row.get('early_stop'):
                        self.save_checkpoint()
                    if row.get('early_stop'):
                        break
                    if stop.requested:
                        raise SlowLlamaError(f'stopped by {stop.requested} at step {self.step}; checkpoint saved, '
                                             f'continue with `resume` `out` {self.run_dir}')
            finally:
                self.run_log.close_bar()
                self._report('close')
        return self._summary(rows, time.perf_counter() - start)

    def _start(self, resume):
        if self.group.is_main:
            for found in remove_leftovers(self.run_dir):
                self.log(found)
        self.group.barrier()
        if not resume and list_checkpoints(self.run_dir):
            raise SlowLlamaError(f'{self.run_dir}: already holds a run; add `resume` to continue it, '
                                 'or choose another `out`')
        resumed = resume and self._resume()
        if not resumed:
            torch.manual_seed(self.cfg.seed + self.group.rank)  # each process its own dropout masks
        self.run_log.begin(fresh=not resumed, resumed_at=self.step if resumed else None)
        if self.group.is_main:
            write_json(os.path.join(self.run_dir, 'run_config.json'),
                       {**self.run_config, 'train': asdict(self.cfg), 'processes': self.group.world})

    def _due(self, step, every):
        return step == self.cfg.iters or (every > 0 and step % every == 0)

    def _train_step(self, step):
        lr = lr_at(self.cfg, step)
        for group in self.optimizer.param_groups:
            group['lr'] = lr * group['lr_scale']
        started, crossed = time.perf_counter(), self._traffic()
        batches = [self.data.batch(self.data_position + i) for i in range(self.cfg.grad_accum)]
        metrics = self._accumulate(batches)
        self._say_plan(batches)
        loss = metrics.pop('loss')
        self.metric_names = tuple(metrics)  # what step_fn reports beside the loss
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float('inf')
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), max_norm))
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped and not self.skip_nonfinite:
            raise SlowLlamaError(f'step {step}: the loss or gradient is not finite (loss {loss}); stopped, the '
                                 f'last checkpoint in {self.run_dir} is kept. Lower `lr`, or pass '
                                 '`skip_nonfinite` to skip such steps')
        if skipped:
            self.log(f'step {step}: non-finite loss or gradient, step skipped')
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step, self.data_position = step, self.data_position + len(batches)
        seconds = time.perf_counter() - started
        tokens = sum(batch.tokens.numel() for batch in batches)  # over every process
        row = {'step': step, 'loss': loss, **metrics, 'lr': lr, 'grad_norm': grad_norm, 'tokens': tokens,
               'tokens_per_s': tokens / max(seconds, 1e-9), 'step_s': seconds}
        if crossed is not None:  # this process's bytes: what the model read from its files, sent to the device
            row.update({key: value - crossed[key] for key, value in self._traffic().items()})
            row['read_bytes_per_s'] = row['bytes_read'] / max(seconds, 1e-9)
        return {**row, 'skipped': True} if skipped else row

    def _accumulate(self, batches):
        """Gradients of the mean loss over every counted target of the step, whatever the split into
        micro-batches: each micro-batch's mean-loss gradient is weighted by its share of the targets.
        The model takes all the micro-batches at once (StreamedModel.accumulate: they travel through
        each block together)."""
        total = sum(batch.n_targets for batch in batches) or 1  # over the global batches
        micro, shares = [], []
        for batch in batches:
            if self.group.active:
                batch = batch.rows(self.group.rows(batch.tokens.shape[0]))
            if batch.n_targets:  # a share with no counted target adds nothing
                micro.append(self.step_fn(self.model, batch))
                shares.append(batch.n_targets / total)
        for p in self.params.values():
            p.grad = None
        losses = self.model.accumulate(micro, shares) if micro else []
        metrics = {'loss': 0.0}
        for batch, share, loss in zip(micro, shares, losses):
            for key, value in as_metrics({'loss': loss, **(batch.metrics() if batch.metrics else {})}).items():
                metrics[key] = metrics.get(key, 0.0) + share * value
        for p in self.params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.group.sum_([p.grad for p in self.params.values()])  # each process holds its weighted share
        device = next(iter(self.params.values())).device
        return {key: self.group.sum_float(value, device) for key, value in metrics.items()}

    def _say_plan(self, batches=()):
        """Log the model's step plan (how the micro-batches travel, what is recomputed) when it is new;
        on a MoE model, the experts a block fetches for a trip, expected and at worst."""
        plan = getattr(self.model, 'step_plan', None)
        if plan is not None and plan is not self._plan_said:
            self._plan_said = plan
            self.log(f'step plan: {plan.describe()}')
            store, tokens = getattr(self.model, 'store', None), getattr(batches[0], 'tokens', None) if batches else None
            if store is not None and tokens is not None and store.cfg.n_experts:
                self.log(experts_line(store.cfg, plan.trip * tokens.numel(), store.manifest['dtype'], store.quant))

    def _traffic(self):
        return self.model.traffic() if hasattr(self.model, 'traffic') else None

    def evaluate(self, step=None):
        """Validation loss (mean over every counted target) and the sample completion, leaving the
        RNG exactly as it was so that evaluating never changes training. Under torchrun every
        process evaluates its share of the validation batches (the sums are all-reduced) and makes
        the sample too: none waits in the next collective while another evaluates alone."""
        device = getattr(self.model, 'device', torch.device('cpu'))
        rng = get_rng_state(device)
        result = {}
        if self.val:
            share = self.val[self.group.rank::self.group.world]
            counted = self.group.sum_float(sum(batch.n_targets for batch in share), device)
            results = [(b.n_targets, as_metrics(self.eval_fn(self.model, b))) for b in share]
            # a process whose share is empty learns the metric names from the others
            keys = next((k for k in self.group.gather(sorted(results[0][1]) if results else None) if k), ['loss'])
            for key in keys:
                summed = self.group.sum_float(sum(c * r[key] for c, r in results), device)
                result[f'eval_{key}'] = summed / max(counted, 1)
            extra = ''.join(f' {k} {v:.4g}' for k, v in result.items() if k != 'eval_loss')
            self.log(f'step {step}: eval loss {result["eval_loss"]:.4f}{extra}')
        if self.sample_fn:
            result['sample'] = self.sample_fn(self.model)
            self.log(f'step {step}: sample: {result["sample"]!r}')
        if self.score_fn:
            scored = self.score_fn(self.model)
            result.update(scored)
            shown = f', {scored["sample"]}' if 'sample' in scored else ''
            self.log(f'step {step}: score {scored["score"]:.4f}{shown}')
        set_rng_state(device, rng)
        return result

    def _select(self, result):
        """Keep the adapter of the best score so far as best/; -> {'early_stop': True} once cfg.patience
        evaluations in a row have not beaten it. A score that only ties the best (an exact match that
        is already perfect) replaces it when its eval loss is lower: the later, surer model; it does
        not count as better for the patience."""
        score = result.get('score', -result['eval_loss'] if 'eval_loss' in result else None)
        if score is None or not (self.score_fn or self.cfg.patience) or not self.group.is_main:
            return {}
        best, loss = self.best, result.get('eval_loss')
        better = best['score'] is None or score > best['score']
        surer = (not better and score == best['score'] and loss is not None
                 and best.get('eval_loss') is not None and loss < best['eval_loss'])
        if better or surer:
            best.update(score=score, step=self.step, eval_loss=loss)
            self._save_adapter_as('best')
            self.log(f'step {self.step}: ' + (f'best score so far ({score:.4f})' if better else
                                              f'the best score again ({score:.4f}) at a lower eval loss')
                     + ', kept in best/')
        if better:
            best['evals_since'] = 0
            return {}
        best['evals_since'] += 1
        if self.cfg.patience and best['evals_since'] >= self.cfg.patience:
            self.log(f'step {self.step}: no better score in {self.cfg.patience} evaluations (--patience); '
                     f'stopping, the best (step {best["step"]}, {best["score"]:.4f}) is in best/')
            return {'early_stop': True}
        return {}

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self):
        """checkpoints/step_NNNNNN/ (complete or absent), then adapter/."""
        folder = os.path.join(self.run_dir, CHECKPOINT_DIR, f'step_{self.step:06d}')
        state = self._state()
        if not self.group.is_main:
            self.group.barrier()  # rank 0 writes; the others wait until the checkpoint is complete
            return
        write_checkpoint(folder, self.model, self.params, self.optimizer, state)
        self._save_adapter_as('adapter')
        self.group.barrier()
        if self.cfg.keep_checkpoints:
            for _, old in list_checkpoints(self.run_dir)[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(os.path.join(self.run_dir, CHECKPOINT_DIR, old), ignore_errors=True)
        self.log(f'step {self.step}: checkpoint {folder}')

    def _save_adapter_as(self, name):
        self.model.save_adapter(os.path.join(self.run_dir, name))  # whole or not at all (files.atomic_folder)

    def _state(self):
        device = getattr(self.model, 'device', torch.device('cpu'))
        rng = encode_rng(get_rng_state(device))
        state = {'step': self.step, 'data_position': self.data_position, 'iters': self.cfg.iters,
                 'seed': self.cfg.seed, 'rng': rng, 'device': str(device), 'best': self.best}
        if self.group.active:
            state['rng_per_process'] = self.group.gather(rng)
        return state

    def _resume(self):
        found = list_checkpoints(self.run_dir)
        if not found:
            self.log(f'{self.run_dir}: no complete checkpoint, starting at step 0')
            return False
        folder = os.path.join(self.run_dir, CHECKPOINT_DIR, found[-1][1])
        state = read_checkpoint(folder, self.params, self.optimizer)
        device = getattr(self.model, 'device', torch.device('cpu'))
        per_process = state.get('rng_per_process', [state['rng']])
        if len(per_process) != self.group.world:
            raise SlowLlamaError(f'{folder}: saved by {len(per_process)} processes, cannot resume exactly '
                                 f'with {self.group.world}')
        rng, current = decode_rng(per_process[self.group.rank], folder), get_rng_state(device)
        if set(rng) != set(current) or any(rng[k].shape != current[k].shape for k in rng):
            raise SlowLlamaError(f'{folder}: saved on {state.get("device")}, cannot resume exactly on {device}')
        set_rng_state(device, rng)
        self.step, self.data_position = state['step'], state['data_position']
        self.best = state.get('best', self.best)
        self.log(f'resumed from {folder} at step {self.step}')
        return True

    # --- reporting -----------------------------------------------------------------------------

    def _report(self, event, *args):
        """Tell the reports beside metrics.jsonl (loss.png, TensorBoard) what happened; rank 0 only."""
        if self.group.is_main:
            for report in self.reports:
                getattr(report, event)(*args)

    def log(self, message):
        """A line for train.log and the console (above the bar on a terminal); rank 0 only."""
        self.run_log.log(message)

    def _summary(self, rows, seconds):
        losses = [r['loss'] for r in rows]
        evals = [r['eval_loss'] for r in rows if 'eval_loss' in r]
        tokens = sum(r['tokens'] for r in rows)
        return {'run_dir': self.run_dir, 'step': self.step, 'first_loss': losses[0] if losses else None,
                'last_loss': losses[-1] if losses else None, 'eval_loss': evals[-1] if evals else None,
                'tokens_per_s': tokens / max(sum(r['step_s'] for r in rows), 1e-9) if rows else None,
                'seconds': seconds, 'best_score': self.best['score'], 'best_step': self.best['step'],
                'stopped_early': bool(rows and rows[-1].get('early_stop'))}


def as_metrics(result):
    """A step_fn / eval_fn result (a float loss, or a dict with 'loss' and more) -> a dict of floats."""
    return {k: float(v) for k, v in result.items()} if isinstance(result, dict) else {'loss': float(result)}
