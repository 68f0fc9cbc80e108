"""ModelConfig: the shape of a Llama-family model, read from Meta params.json, HF config.json or GGUF metadata."""
import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass

from .errors import SlowLlamaError


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int                      # feed-forward inner size
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # Llama-3 style: factor, low/high_freq_factor, original_max_position_embeddings
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    head_dim: int = 0                    # 0: dim // n_heads
    bos_id: int | None = None
    eos_id: int | list | None = None

    def __post_init__(self):
        check_values(self)
        if self.head_dim == 0:
            object.__setattr__(self, 'head_dim', self.dim // self.n_heads)
        if self.head_dim < 2 or self.head_dim % 2:  # rope rotates pairs
            raise SlowLlamaError(f'model config: head_dim {self.head_dim} (dim {self.dim} / n_heads {self.n_heads}) '
                                 'must be even and at least 2')
        if self.n_heads % self.n_kv_heads:
            raise SlowLlamaError(f'model config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}')

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise SlowLlamaError(f'model config: an object was expected, got {type(d).__name__}')
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise SlowLlamaError(f'model config: {missing[0]} is missing')
        return cls(**{k: v for k, v in d.items() if k in known})

    # --- the three sources -------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf):
        """From a transformers config.json dict (v4 'rope_theta'/'rope_scaling' or v5 'rope_parameters')."""
        if hf.get('model_type', 'llama') not in ('llama', 'mistral'):
            raise SlowLlamaError(f"model config: model_type {hf.get('model_type')!r:.80} is not a Llama-family model")
        rope = hf.get('rope_parameters') or {}
        scaling = hf.get('rope_scaling') or rope
        scaling = dict(scaling) if scaling.get('rope_type', scaling.get('type')) == 'llama3' else None
        n_heads = hf['num_attention_heads']
        return cls(
            dim=hf['hidden_size'], n_layers=hf['num_hidden_layers'], n_heads=n_heads,
            n_kv_heads=hf.get('num_key_value_heads') or n_heads, hidden_dim=hf['intermediate_size'],
            vocab_size=hf['vocab_size'], norm_eps=hf.get('rms_norm_eps', 1e-6),
            rope_theta=float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
            rope_scaling=_llama3_scaling(scaling), max_seq_len=hf.get('max_position_embeddings', 4096),
            tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
            head_dim=hf.get('head_dim') or hf['hidden_size'] // n_heads,
            bos_id=hf.get('bos_token_id'), eos_id=hf.get('eos_token_id'))

    @classmethod
    def from_meta(cls, params, vocab_size=None):
        """From Meta's params.json; hidden_dim follows Meta's multiple_of / ffn_dim_multiplier rule."""
        dim = params['dim']
        vocab = params.get('vocab_size', -1)
        if vocab is None or vocab <= 0:
            vocab = vocab_size
        if not vocab:
            raise SlowLlamaError('params.json: vocab_size is -1 and no tokenizer gives it')
        scaling = None
        if params.get('use_scaled_rope'):
            scaling = {'rope_type': 'llama3', 'factor': params.get('rope_scaling_factor', 8.0),
                       'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                       'original_max_position_embeddings': 8192}
        return cls(
            dim=dim, n_layers=params['n_layers'], n_heads=params['n_heads'],
            n_kv_heads=params.get('n_kv_heads') or params['n_heads'],
            hidden_dim=meta_hidden_dim(dim, params.get('multiple_of', 256), params.get('ffn_dim_multiplier')),
            vocab_size=vocab, norm_eps=params.get('norm_eps', 1e-5),
            rope_theta=float(params.get('rope_theta', 10000.0)), rope_scaling=_llama3_scaling(scaling),
            max_seq_len=params.get('max_seq_len', 4096))

    def to_hf(self):
        """The config.json transformers needs to load this model as LlamaForCausalLM."""
        rope = {'rope_type': 'default', 'rope_theta': self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, 'rope_type': 'llama3', 'rope_theta': self.rope_theta}
        return {
            'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_size': self.dim,
            'num_hidden_layers': self.n_layers, 'num_attention_heads': self.n_heads,
            'num_key_value_heads': self.n_kv_heads, 'intermediate_size': self.hidden_dim,
            'vocab_size': self.vocab_size, 'rms_norm_eps': self.norm_eps, 'rope_theta': self.rope_theta,
            'rope_scaling': rope if self.rope_scaling else None, 'rope_parameters': rope,
            'max_position_embeddings': self.max_seq_len, 'tie_word_embeddings': self.tie_embeddings,
            'head_dim': self.head_dim, 'hidden_act': 'silu', 'attention_bias': False, 'mlp_bias': False,
            'bos_token_id': self.bos_id, 'eos_token_id': self.eos_id, 'torch_dtype': 'bfloat16'}

    def to_meta(self):
        """Meta's params.json. hidden_dim is recovered exactly through ffn_dim_multiplier where needed."""
        params = {'dim': self.dim, 'n_layers': self.n_layers, 'n_heads': self.n_heads,
                  'n_kv_heads': self.n_kv_heads, 'vocab_size': self.vocab_size, 'norm_eps': self.norm_eps,
                  'rope_theta': self.rope_theta, 'multiple_of': 256}
        params.update(_meta_ffn_params(self.dim, self.hidden_dim))
        if self.rope_scaling:
            params['use_scaled_rope'] = True
            params['rope_scaling_factor'] = self.rope_scaling['factor']
        return params


# Ranges wide enough for any released Llama-family model (405B: dim 16384, hidden 53248; vocabularies
# up to 256k), narrow enough that a hostile manifest or config cannot make us allocate terabytes.
LIMITS = {'dim': 1 << 16, 'n_layers': 1024, 'n_heads': 1024, 'n_kv_heads': 1024, 'hidden_dim': 1 << 18,
          'vocab_size': 1 << 22, 'max_seq_len': 1 << 24, 'head_dim': 1 << 12}
ROPE_SCALING_KEYS = ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')


def check_values(cfg):
    """Types and ranges of every field, before any of them sizes an allocation."""
    for name, limit in LIMITS.items():
        value = getattr(cfg, name)
        low = 0 if name == 'head_dim' else 1  # head_dim 0: dim // n_heads
        if not _is_int(value) or not low <= value <= limit:
            raise SlowLlamaError(f'model config: {name} must be an integer in [{low}, {limit}], got {value!r:.80}')
    if not _is_real(cfg.norm_eps) or not 0 < cfg.norm_eps < 1:
        raise SlowLlamaError(f'model config: norm_eps must be a number in (0, 1), got {cfg.norm_eps!r:.80}')
    if not _is_real(cfg.rope_theta) or cfg.rope_theta <= 0:
        raise SlowLlamaError(f'model config: rope_theta must be a positive number, got {cfg.rope_theta!r:.80}')
    if cfg.rope_scaling is not None:
        scaling = cfg.rope_scaling
        if not isinstance(scaling, dict) or not all(_is_real(scaling.get(k)) and scaling[k] > 0
                                                    for k in ROPE_SCALING_KEYS):
            raise SlowLlamaError(f'model config: rope_scaling must hold positive numbers '
                                 f'{", ".join(ROPE_SCALING_KEYS)}, got {scaling!r:.200}')
    if not isinstance(cfg.tie_embeddings, bool):
        raise SlowLlamaError(f'model config: tie_embeddings must be true or false, got {cfg.tie_embeddings!r:.80}')
    eos = cfg.eos_id if isinstance(cfg.eos_id, list) else [cfg.eos_id]
    for name, ids in (('bos_id', [cfg.bos_id]), ('eos_id', eos)):
        if not all(i is None or (_is_int(i) and i >= 0) for i in ids):
            raise SlowLlamaError(f'model config: {name} must be a token id, got {getattr(cfg, name)!r:.200}')


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def meta_hidden_dim(dim, multiple_of, ffn_dim_multiplier=None):
    """Meta's FeedForward size: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _meta_ffn_params(dim, hidden_dim):
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_hidden_dim(dim, multiple_of) == hidden_dim:
            return {'multiple_of': multiple_of}
    # choose a multiplier that lands exactly on hidden_dim with multiple_of = 1
    base = int(2 * (4 * dim) / 3)
    return {'multiple_of': 1, 'ffn_dim_multiplier': (hidden_dim + 0.5) / base}


def _llama3_scaling(scaling):
    if not scaling:
        return None
    return {'factor': float(scaling['factor']), 'low_freq_factor': float(scaling.get('low_freq_factor', 1.0)),
            'high_freq_factor': float(scaling.get('high_freq_factor', 4.0)),
            'original_max_position_embeddings': int(scaling.get('original_max_position_embeddings', 8192))}


@contextlib.contextmanager
def config_errors(where):
    """Inside: a config value missing, of the wrong type or out of range is one line naming `where`."""
    try:
        yield
    except SlowLlamaError as e:
        if not str(e).startswith('model config:'):
            raise
        raise SlowLlamaError(f'{where}: {str(e).removeprefix("model config: ")}') from None
    except KeyError as e:
        raise SlowLlamaError(f'{where}: lacks {e.args[0]!r}') from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise SlowLlamaError(f'{where}: a config value has the wrong type or range ({e})') from None


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SlowLlamaError(f'{path}: {what} not found') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlowLlamaError(f'{path}: not valid JSON ({e})') from None
    except RecursionError:
        raise SlowLlamaError(f'{path}: not valid JSON (nested too deeply)') from None
