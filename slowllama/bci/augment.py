"""Augmentation of the training trials, so that the encoder learns the word patterns rather than each
trial's noise and timing: random time shifts and stretches, amplitude scaling, Gaussian noise and
channel dropout, drawn afresh for every trial of every step from torch's generator (checkpointed, so
a resumed run draws the same). Applied inside the encoder to the z-scored signals, in training only.
"""
from dataclasses import dataclass

import torch

from ..errors import SlowLlamaError


@dataclass(frozen=True)
class Augment:
    shift: int = 8            # largest time shift, in samples, either way
    stretch: float = 0.1      # time scaled by a factor in [1 - stretch, 1 + stretch]
    scale: float = 0.2        # amplitude scaled by a factor in [1 - scale, 1 + scale]
    noise: float = 0.3        # standard deviation of the added noise (the signals are z-scored)
    channel_drop: float = 0.1  # probability that a channel of a trial is zeroed

    def __post_init__(self):
        if self.shift < 0 or min(self.noise, self.stretch, self.scale) < 0 or self.stretch >= 1 or self.scale >= 1:
            raise SlowLlamaError('--bci-shift and --bci-noise must be >= 0, --bci-stretch and --bci-scale in [0, 1)')
        if not 0 <= self.channel_drop < 1:
            raise SlowLlamaError(f'--bci-channel-drop must be in [0, 1), got {self.channel_drop}')

    def __call__(self, x):
        """[batch, channels, time] -> the same shape, each trial changed in its own way."""
        batch, channels, time = x.shape
        x = warp_time(x, self._uniform(batch, self.shift, x).round(), 1 + self._uniform(batch, self.stretch, x))
        x = x * (1 + self._uniform(batch, self.scale, x))[:, None, None]
        x = x + self.noise * torch.randn_like(x)
        keep = (torch.rand(batch, channels, 1, device=x.device) >= self.channel_drop).to(x.dtype)
        return x * keep

    @staticmethod
    def _uniform(n, half_width, like):
        return (torch.rand(n, device=like.device, dtype=like.dtype) * 2 - 1) * half_width


def warp_time(x, shift, factor):
    """Trial b read at (t - shift[b]) / factor[b] by linear interpolation, zero (the z-scored mean)
    outside the recording: later by `shift` samples, slower by `factor`. x [batch, channels, time]."""
    time = x.shape[-1]
    source = (torch.arange(time, device=x.device, dtype=x.dtype)[None] - shift[:, None]) / factor[:, None]  # [b, t]
    left = source.floor()
    weight = (source - left)[:, None, :]                                     # [batch, 1, time]
    inside = lambda i: ((i >= 0) & (i <= time - 1)).to(x.dtype)[:, None, :]  # noqa: E731
    gather = lambda i: x.gather(2, i.clamp(0, time - 1).long()[:, None, :].expand(-1, x.shape[1], -1))  # noqa: E731
    return (gather(left) * inside(left) * (1 - weight) + gather(left + 1) * inside(left + 1) * weight)
