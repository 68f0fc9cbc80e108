"""The BCI encoder head: neural recordings -> prefix embeddings for a Llama decoder.

signals [batch, channels, time] -> per-channel z-score (train statistics, fixed) -> (training only: the
augmentation, augment.py) -> a front end -> a TransformerEncoder -> LayerNorm + Linear to the decoder's
hidden size: the prefix [batch, positions, dim].

Front ends (`stem`):
  conv  (default) small-kernel Conv1d + GELU + average pooling, `conv_layers` times (as EEGNet and
        BrainDecode's shallow/deep nets start): a word's pattern gives the same features wherever it
        falls in the trial, and no absolute position is added, so the features do not tie a word to a
        time. Order still reaches the decoder: the prefix positions sit in its sequence, under its
        rotary (relative) positions.
  patch (the first encoder) a strided Conv1d over patches + learned absolute positions; it learns the
        timing of the training trials and generalizes poorly when new trials are shifted (issue 17).

The decoder reads [fixed prompt tokens][prefix][start token, text tokens] and learns the text only.
The encoder is an ordinary nn.Module trained with the decoder's LoRA: attached to the model, its
parameters appear in trainable_parameters() as `encoder.<param>` and save_adapter writes it beside
the adapter as encoder.safetensors + encoder_config.json. Knows nothing of how the decoder streams.
"""
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from ..engine.trip import MicroBatch
from ..errors import SlowLlamaError
from ..weights.files import SafetensorsFile, read_json, write_json, write_safetensors

ENCODER_WEIGHTS = 'encoder.safetensors'
ENCODER_CONFIG = 'encoder_config.json'
ENCODER_NAME = 'encoder'  # the prefix of its parameters in model.trainable_parameters()
ENCODER_FORMAT = 2  # 1: before the conv stem (its configs have no 'stem': they are 'patch')
STEMS = ('conv', 'patch')


@dataclass(frozen=True)
class EncoderConfig:
    channels: int                # input channels (electrodes)
    time: int                    # samples per trial
    out_dim: int                 # the decoder's hidden size
    d_enc: int = 128             # the encoder's width
    layers: int = 2
    heads: int = 4
    ffn: int = 0                 # feed-forward width; 0: 4 * d_enc
    patch: int = 8               # stem 'patch': samples per temporal patch
    stride: int = 0              # stem 'patch': samples between patch starts; 0: = patch (no overlap)
    dropout: float = 0.1
    stem: str = 'conv'           # 'conv' | 'patch' (see the module's docstring)
    kernel: int = 5              # stem 'conv': samples per convolution kernel
    pool: int = 2                # stem 'conv': average pooling after each convolution
    conv_layers: int = 2         # stem 'conv': convolutions (the prefix is time / pool ** conv_layers long)
    prompt: str = ''             # fixed text placed before the prefix ('' : none)
    start_token: int = 0         # the token fed right after the prefix, that predicts the first text token

    def __post_init__(self):
        positive = {'channels': self.channels, 'time': self.time, 'out_dim': self.out_dim, 'd-enc': self.d_enc,
                    'layers': self.layers, 'heads': self.heads, 'patch': self.patch}
        for flag, value in positive.items():
            if value < 1:
                raise SlowLlamaError(f'--bci-{flag} must be at least 1, got {value}')
        if self.d_enc % self.heads:
            raise SlowLlamaError(f'--bci-d-enc ({self.d_enc}) must be a multiple of --bci-heads ({self.heads})')
        if self.ffn < 0 or self.stride < 0 or not 0.0 <= self.dropout < 1.0:
            raise SlowLlamaError('--bci-ffn and --bci-stride must be >= 0 and --bci-dropout in [0, 1)')
        if self.stem not in STEMS:
            raise SlowLlamaError(f'--bci-stem must be conv or patch, got {self.stem!r}')
        if self.stem == 'conv' and (self.kernel < 1 or self.pool < 1 or self.conv_layers < 1):
            raise SlowLlamaError('--bci-kernel, --bci-pool and --bci-conv-layers must be at least 1')
        if self.stem == 'conv' and self.time < self.pool ** self.conv_layers:
            raise SlowLlamaError(f'a trial of {self.time} samples is shorter than the pooling '
                                 f'(--bci-pool {self.pool} ** --bci-conv-layers {self.conv_layers})')
        if self.stem == 'patch' and self.patch > self.time:
            raise SlowLlamaError(f'--bci-patch ({self.patch}) is longer than a trial ({self.time} samples)')

    @property
    def step(self):
        return self.stride or self.patch

    @property
    def n_patches(self):
        """Prefix positions per trial."""
        if self.stem == 'conv':
            length = self.time
            for _ in range(self.conv_layers):
                length //= self.pool
            return length
        return (self.time - self.patch) // self.step + 1


class SignalEncoder(nn.Module):
    """[batch, channels, time] float -> prefix embeddings [batch, n_patches, out_dim] (float32)."""

    def __init__(self, cfg: EncoderConfig, mean=None, std=None):
        super().__init__()
        self.cfg = cfg
        mean = torch.zeros(cfg.channels) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std = torch.ones(cfg.channels) if std is None else torch.as_tensor(std, dtype=torch.float32)
        self.register_buffer('channel_mean', mean.reshape(cfg.channels).clone())
        self.register_buffer('channel_std', std.reshape(cfg.channels).clamp(min=1e-6).clone())
        if cfg.stem == 'conv':
            self.stem = conv_stem(cfg)
        else:
            self.patches = nn.Conv1d(cfg.channels, cfg.d_enc, kernel_size=cfg.patch, stride=cfg.step)
            self.positions = nn.Parameter(torch.randn(cfg.n_patches, cfg.d_enc) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.d_enc, cfg.heads, cfg.ffn or 4 * cfg.d_enc, cfg.dropout,
                                           activation='gelu', batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, norm=nn.LayerNorm(cfg.d_enc),
                                             enable_nested_tensor=False)
        self.projection = nn.Linear(cfg.d_enc, cfg.out_dim)

    def match_scale(self, rms):
        """Start the prefix at the scale of the decoder's token embeddings (root mean square `rms`):
        the projection's input is layer-normed, so weights of std rms / sqrt(d_enc) give outputs of about rms."""
        with torch.no_grad():
            self.projection.weight.normal_(0.0, rms / self.cfg.d_enc ** 0.5)
            self.projection.bias.zero_()
        return self

    def forward(self, signals, augment=None):
        """augment: a callable on the z-scored signals [batch, channels, time] (training only)."""
        return self.projection(self.features(signals, augment))  # [batch, n_patches, out_dim]

    def features(self, signals, augment=None):
        """[batch, channels, time] -> the encoder's output before the projection [batch, n_patches, d_enc]."""
        expected = (self.cfg.channels, self.cfg.time)
        if signals.dim() != 3 or tuple(signals.shape[1:]) != expected:
            raise SlowLlamaError(f'signals of shape {tuple(signals.shape)}: the encoder needs '
                                 f'[batch, {expected[0]}, {expected[1]}]')
        device = self.channel_mean.device
        x = (signals.to(device, torch.float32) - self.channel_mean[:, None]) / self.channel_std[:, None]
        if augment is not None:
            x = augment(x)
        if self.cfg.stem == 'conv':
            x = self.stem(x).transpose(1, 2)     # [batch, n_patches, d_enc]
        else:
            x = self.patches(x).transpose(1, 2) + self.positions
        return self.encoder(x)

    def save(self, folder):
        """encoder.safetensors (weights and z-score statistics), then encoder_config.json."""
        tensors = {k: v.detach().float().cpu() for k, v in self.state_dict().items()}
        write_safetensors(os.path.join(folder, ENCODER_WEIGHTS), tensors, metadata={'format': 'pt'})
        write_json(os.path.join(folder, ENCODER_CONFIG), {'format': ENCODER_FORMAT, **asdict(self.cfg),
                                                          'channel_mean': self.channel_mean.tolist(),
                                                          'channel_std': self.channel_std.tolist()})


def conv_stem(cfg: EncoderConfig):
    """[batch, channels, time] -> [batch, d_enc, time / pool ** conv_layers]: conv (same length), GELU,
    dropout, average pooling, `conv_layers` times."""
    layers, width = [], cfg.channels
    for _ in range(cfg.conv_layers):
        layers += [nn.Conv1d(width, cfg.d_enc, cfg.kernel, padding='same'), nn.GELU(),
                   nn.Dropout(cfg.dropout), nn.AvgPool1d(cfg.pool)]
        width = cfg.d_enc
    return nn.Sequential(*layers)


def has_encoder(folder):
    return folder is not None and os.path.exists(os.path.join(str(folder), ENCODER_CONFIG))


def read_encoder_config(folder):
    path = os.path.join(str(folder), ENCODER_CONFIG)
    if not os.path.exists(path):
        raise SlowLlamaError(f'{path}: no BCI encoder here (expected {ENCODER_CONFIG} and {ENCODER_WEIGHTS})')
    raw = read_json(path, ENCODER_CONFIG)
    if raw.get('format') not in (1, ENCODER_FORMAT):
        raise SlowLlamaError(f'{path}: unknown encoder format {raw.get("format")!r}')
    if raw['format'] == 1:
        raw = {**raw, 'stem': 'patch'}
    names = {f.name for f in fields(EncoderConfig)}
    try:
        return EncoderConfig(**{k: v for k, v in raw.items() if k in names})
    except TypeError as e:
        raise SlowLlamaError(f'{path}: incomplete encoder config ({e})') from None


def load_encoder(folder, device='cpu'):
    """A saved encoder (weights, statistics and config) on `device`, float32."""
    cfg = read_encoder_config(folder)
    encoder = SignalEncoder(cfg).to(device)
    path = os.path.join(str(folder), ENCODER_WEIGHTS)
    weights = SafetensorsFile(path)
    expected = encoder.state_dict()
    if set(weights.names()) != set(expected):
        missing = sorted(set(expected) - set(weights.names()))
        raise SlowLlamaError(f'{path}: does not match {ENCODER_CONFIG} (missing {missing[:2]})')
    for name, value in expected.items():
        if tuple(weights.shape(name)) != tuple(value.shape):
            raise SlowLlamaError(f'{path}: {name} has shape {weights.shape(name)}, the config needs '
                                 f'{tuple(value.shape)}')
    encoder.load_state_dict({name: weights.tensor(name).clone() for name in expected})
    return encoder


def attach_encoder(model, encoder):
    """Make the encoder train with the model's LoRA (see StreamedModel.attach_module)."""
    if encoder.cfg.out_dim != model.cfg.dim:
        raise SlowLlamaError(f'the encoder projects to {encoder.cfg.out_dim}, the decoder needs {model.cfg.dim} '
                             '(was it trained for another model?)')
    return model.attach_module(ENCODER_NAME, encoder)


def embedding_rms(model, vocab_size, samples=1024):
    """Root mean square of the decoder's token embeddings over a spread of ids."""
    ids = torch.linspace(0, vocab_size - 1, min(samples, vocab_size)).long()[None]
    return float(model.embed(ids).float().pow(2).mean().sqrt())


def prompt_ids(cfg: EncoderConfig, tokenizer):
    return tokenizer.encode(cfg.prompt) if cfg.prompt else []


# --- conditioning: [prompt][prefix][tokens] ----------------------------------------------------------

def prefix_embeddings(model, encoder, signals, prompt, augment=None):
    """The embeddings placed before the text tokens: the fixed prompt's (no gradient) then the
    encoder's prefix (with gradient when training). -> [batch, len(prompt) + n_patches, dim]"""
    prefix = encoder(signals, augment)
    if not prompt:
        return prefix
    fixed = model.embed(torch.tensor([prompt]))  # [1, P, dim]
    fixed = fixed.to(prefix.device, prefix.dtype).expand(prefix.shape[0], -1, -1)
    return torch.cat([fixed, prefix], dim=1)


def train_step(model, batch, prompt=(), augment=None):
    """The Trainer's step: the trial's prefix embeddings (the encoder's graph kept) before its text,
    as a MicroBatch: the streamed backward carries the gradient at the prefix on into the encoder."""
    encoder = model.attached[ENCODER_NAME]
    encoder.train()
    prefix = prefix_embeddings(model, encoder, batch.signals, list(prompt), augment)
    return MicroBatch(batch.tokens, batch.targets, prefix=prefix)


@torch.no_grad()
def eval_loss(model, batch, prompt=()):
    encoder = model.attached[ENCODER_NAME]
    encoder.eval()
    prefix = prefix_embeddings(model, encoder, batch.signals, list(prompt))
    return model.loss(batch.tokens, batch.targets, prefix=prefix)


@torch.no_grad()
def decode_signal(model, signal, max_new_tokens, prompt=(), start_token=0):
    """One trial [channels, time] -> the generated token ids (greedy, KV cache), stopping at EOS."""
    encoder = model.attached[ENCODER_NAME]
    encoder.eval()
    prefix = prefix_embeddings(model, encoder, signal[None], list(prompt))
    out = model.generate(torch.tensor([[start_token]]), max_new_tokens, temperature=0.0, prefix=prefix)
    return out[0, 1:].tolist()
