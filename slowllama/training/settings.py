"""The training loop's settings (TrainConfig, checked once) and what they define: the learning rate
of each step (warm-up, then cosine or constant) and AdamW's parameter groups."""
import math
from dataclasses import dataclass

from ..errors import SlowLlamaError

SCHEDULES = ('cosine', 'constant')


@dataclass
class TrainConfig:
    iters: int = 100
    grad_accum: int = 1          # micro-batches per optimizer step
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 0              # steps of linear warm-up from 0 to lr
    schedule: str = 'cosine'     # 'cosine' (towards min_lr_ratio * lr) | 'constant'
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0       # max global gradient norm; 0: no clipping
    seed: int = 0
    save_every: int = 0          # 0: a checkpoint at the end only
    eval_every: int = 0          # 0: evaluate at the end only (when there is validation data)
    keep_checkpoints: int = 0    # 0: keep them all
    patience: int = 0            # stop after this many evaluations without a better score; 0: never

    def __post_init__(self):
        self.betas = tuple(self.betas)
        positive = {'iters': self.iters, 'grad_accum': self.grad_accum}
        for setting, value in positive.items():
            if value < 1:
                raise SlowLlamaError(f'{setting} must be at least 1, got {value}')
        non_negative = {'lr': self.lr, 'weight_decay': self.weight_decay, 'warmup': self.warmup,
                        'grad_clip': self.grad_clip, 'save_every': self.save_every,
                        'eval_every': self.eval_every, 'keep_checkpoints': self.keep_checkpoints,
                        'min_lr_ratio': self.min_lr_ratio, 'patience': self.patience}
        for setting, value in non_negative.items():
            if value < 0:
                raise SlowLlamaError(f'{setting} must not be negative, got {value}')
        if self.schedule not in SCHEDULES:
            raise SlowLlamaError(f'schedule: unknown schedule {self.schedule!r} (use cosine or constant)')


def lr_at(cfg: TrainConfig, step):
    """The learning rate of optimizer step `step` (1-based): linear warm-up to lr over `warmup`
    steps, then constant or a half cosine towards min_lr_ratio * lr (as transformers' cosine schedule)."""
    if cfg.warmup and step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    if cfg.schedule == 'constant':
        return cfg.lr
    progress = (step - 1 - cfg.warmup) / max(1, cfg.iters - cfg.warmup)  # 0 right after the warm-up
    low = cfg.lr * cfg.min_lr_ratio
    return low + 0.5 * (cfg.lr - low) * (1.0 + math.cos(math.pi * progress))


def optimizer_groups(params, cfg: TrainConfig, overrides):
    """AdamW parameter groups: the parameters under each prefix of `overrides` with its own peak lr
    (as lr_scale, a share of cfg.lr, so one schedule drives every group) and weight decay; the rest
    with cfg's. Each group lists its parameter names as 'names'."""
    groups = []
    rest = dict(params)
    for prefix, settings in overrides.items():
        names = [n for n in rest if n.startswith(prefix)]
        for n in names:
            del rest[n]
        lr = settings.get('lr', cfg.lr)
        if names:
            groups.append({'names': names, 'params': [params[n] for n in names],
                           'lr_scale': lr / cfg.lr if cfg.lr else 1.0,
                           'weight_decay': settings.get('weight_decay', cfg.weight_decay)})
    if rest:
        groups.insert(0, {'names': list(rest), 'params': list(rest.values()), 'lr_scale': 1.0,
                          'weight_decay': cfg.weight_decay})
    return groups
