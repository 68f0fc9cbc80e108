"""ModelConfig: the shape of a Llama-family model, read from Meta params.json, HF config.json or GGUF metadata."""
import contextlib
import dataclasses
import math
from dataclasses import dataclass

from ..errors import SlowLlamaError
from .names import FAMILY_FIELDS, HF_ARCHITECTURES, WINDOWED_FAMILIES


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
    rope_scaling: dict | None = None     # Llama-3 style (factor, low/high_freq_factor,
                                         # original_max_position_embeddings), or with a 'rope_type':
                                         # 'linear' (factor) or 'longrope' (see _longrope_scaling)
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    head_dim: int = 0                    # 0: dim // n_heads
    bos_id: int | None = None
    eos_id: int | list | None = None
    # what the families built on the Llama block differ in (see names.HF_ARCHITECTURES)
    model_type: str = 'llama'
    qkv_bias: bool = False               # qwen2: bias on q, k and v (frozen like the weights)
    qk_norm: bool = False                # qwen3: RMSNorm over each head's q and k, before rope
    sliding_window: int | None = None    # mistral, phi3: a position sees itself and the window - 1 before it

    def __post_init__(self):
        check_values(self)
        for name in ('norm_eps', 'rope_theta'):  # a JSON integer such as 10**40 is a number too, held as one
            object.__setattr__(self, name, float(getattr(self, name)))
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
        model_type = hf.get('model_type', 'llama')
        if not isinstance(model_type, str) or model_type not in HF_ARCHITECTURES:
            raise SlowLlamaError(f'config.json: model_type {model_type!r:.80} is not supported '
                                 f'(supported: {", ".join(HF_ARCHITECTURES)})')
        rope = hf.get('rope_parameters') or {}
        n_heads = hf['num_attention_heads']
        return cls(
            dim=hf['hidden_size'], n_layers=hf['num_hidden_layers'], n_heads=n_heads,
            n_kv_heads=hf.get('num_key_value_heads') or n_heads, hidden_dim=hf['intermediate_size'],
            vocab_size=hf['vocab_size'], norm_eps=hf.get('rms_norm_eps', 1e-6),
            rope_theta=float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
            rope_scaling=_hf_rope_scaling(hf.get('rope_scaling') or rope, hf, model_type),
            max_seq_len=hf.get('max_position_embeddings', 4096),
            tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
            head_dim=hf.get('head_dim') or hf['hidden_size'] // n_heads,
            bos_id=hf.get('bos_token_id'), eos_id=hf.get('eos_token_id'), **_hf_family(hf, model_type))

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
        """The config.json transformers needs to load this model with its own class for model_type."""
        rope = {'rope_type': 'default', 'rope_theta': self.rope_theta}
        if self.rope_scaling:
            rope = {'rope_type': 'llama3', **self.rope_scaling, 'rope_theta': self.rope_theta}
        config = {
            'architectures': [HF_ARCHITECTURES[self.model_type]], 'model_type': self.model_type,
            'hidden_size': self.dim,
            'num_hidden_layers': self.n_layers, 'num_attention_heads': self.n_heads,
            'num_key_value_heads': self.n_kv_heads, 'intermediate_size': self.hidden_dim,
            'vocab_size': self.vocab_size, 'rms_norm_eps': self.norm_eps, 'rope_theta': self.rope_theta,
            'rope_scaling': rope if self.rope_scaling else None, 'rope_parameters': rope,
            'max_position_embeddings': self.max_seq_len, 'tie_word_embeddings': self.tie_embeddings,
            'head_dim': self.head_dim, 'hidden_act': 'silu', 'attention_bias': False, 'mlp_bias': False,
            'bos_token_id': self.bos_id, 'eos_token_id': self.eos_id, 'pad_token_id': None,
            'torch_dtype': 'bfloat16'}
        if self.model_type in ('mistral', 'phi3'):
            config['sliding_window'] = self.sliding_window
        if self.model_type in ('qwen2', 'qwen3'):
            config.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.n_layers)
        if self.model_type == 'phi3':
            config['original_max_position_embeddings'] = (self.rope_scaling or {}).get(
                'original_max_position_embeddings', self.max_seq_len)
        return config

    def to_meta(self):
        """Meta's params.json. hidden_dim is recovered exactly through ffn_dim_multiplier where needed."""
        params = {'dim': self.dim, 'n_layers': self.n_layers, 'n_heads': self.n_heads,
                  'n_kv_heads': self.n_kv_heads, 'vocab_size': self.vocab_size, 'norm_eps': self.norm_eps,
                  'rope_theta': self.rope_theta, 'multiple_of': 256}
        params.update(_meta_ffn_params(self.dim, self.hidden_dim))
        if self.rope_scaling:
            if self.rope_scaling.get('rope_type', 'llama3') != 'llama3':
                raise SlowLlamaError('--format meta: Meta checkpoints carry llama3 rope scaling only')
            params['use_scaled_rope'] = True
            params['rope_scaling_factor'] = self.rope_scaling['factor']
        return params


# Ranges wide enough for any released Llama-family model (405B: dim 16384, hidden 53248; vocabularies
# up to 256k), narrow enough that a hostile manifest or config cannot make us allocate terabytes.
LIMITS = {'dim': 1 << 16, 'n_layers': 1024, 'n_heads': 1024, 'n_kv_heads': 1024, 'hidden_dim': 1 << 18,
          'vocab_size': 1 << 22, 'max_seq_len': 1 << 24, 'head_dim': 1 << 12}
# rope_type -> the numbers its rope_scaling must hold (each positive); llama3 is stored without rope_type
ROPE_SCALING_KEYS = {'llama3': ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'),
                     'linear': ('factor',), 'longrope': ('original_max_position_embeddings', 'attention_factor')}
LONGROPE_LISTS = ('short_factor', 'long_factor')


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
        _check_rope_scaling(cfg.rope_scaling, cfg.head_dim or cfg.dim // cfg.n_heads)
    if not isinstance(cfg.model_type, str) or cfg.model_type not in HF_ARCHITECTURES:
        raise SlowLlamaError(f'model config: model_type must be one of {", ".join(HF_ARCHITECTURES)}, '
                             f'got {cfg.model_type!r:.80}')
    for name in ('qkv_bias', 'qk_norm'):
        if not isinstance(getattr(cfg, name), bool):
            raise SlowLlamaError(f'model config: {name} must be true or false, got {getattr(cfg, name)!r:.80}')
    if cfg.sliding_window is not None and (not _is_int(cfg.sliding_window) or cfg.sliding_window < 1):
        raise SlowLlamaError(f'model config: sliding_window must be a positive integer or null, '
                             f'got {cfg.sliding_window!r:.80}')
    if not isinstance(cfg.tie_embeddings, bool):
        raise SlowLlamaError(f'model config: tie_embeddings must be true or false, got {cfg.tie_embeddings!r:.80}')
    eos = cfg.eos_id if isinstance(cfg.eos_id, list) else [cfg.eos_id]
    for name, ids in (('bos_id', [cfg.bos_id]), ('eos_id', eos)):
        if not all(i is None or (_is_int(i) and i >= 0) for i in ids):
            raise SlowLlamaError(f'model config: {name} must be a token id, got {getattr(cfg, name)!r:.200}')


def _check_rope_scaling(scaling, head_dim):
    kind = scaling.get('rope_type', 'llama3') if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALING_KEYS or not all(_is_real(scaling.get(k)) and scaling[k] > 0
                                                for k in ROPE_SCALING_KEYS[kind]):
        raise SlowLlamaError(f'model config: rope_scaling must be llama3, linear or longrope scaling with positive '
                             f'numbers, got {scaling!r:.200}')
    if kind == 'longrope' and not all(isinstance(scaling.get(k), list) and len(scaling[k]) == head_dim // 2
                                      and all(_is_real(f) and f > 0 for f in scaling[k]) for k in LONGROPE_LISTS):
        raise SlowLlamaError(f'model config: longrope short_factor and long_factor must be {head_dim // 2} '
                             'positive numbers each')


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


def _hf_family(hf, model_type):
    """The ModelConfig fields that tell the families apart, refusing what we do not build."""
    where = f'config.json ({model_type})'
    if hf.get('hidden_act', 'silu') != 'silu':
        raise SlowLlamaError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    if hf.get('mlp_bias') or (hf.get('attention_bias') and model_type != 'qwen2'):
        raise SlowLlamaError(f'{where}: attention_bias / mlp_bias are not supported')
    rotary = (hf.get('rope_parameters') or {}).get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
    if rotary != 1.0:
        raise SlowLlamaError(f'{where}: partial_rotary_factor {rotary} is not supported (rope on whole heads only)')
    window = hf.get('sliding_window') if model_type in WINDOWED_FAMILIES else None
    if hf.get('use_sliding_window') and hf.get('max_window_layers', hf['num_hidden_layers']) < hf['num_hidden_layers']:
        raise SlowLlamaError(f'{where}: use_sliding_window on some layers only is not supported')  # qwen
    if len(set(hf.get('layer_types') or [])) > 1:
        raise SlowLlamaError(f'{where}: layer_types mixing attention kinds are not supported')
    return {'model_type': model_type, 'sliding_window': window, **FAMILY_FIELDS.get(model_type, {})}


def _hf_rope_scaling(scaling, hf, model_type):
    """None, llama3, linear or longrope scaling; any other rope_type is refused (it would silently
    change the model)."""
    kind = scaling.get('rope_type', scaling.get('type', 'default'))
    if kind == 'default':
        return None
    if kind == 'llama3':
        return _llama3_scaling(scaling)
    if kind == 'linear':
        return {'rope_type': 'linear', 'factor': float(scaling['factor'])}
    if kind in ('longrope', 'su'):
        return _longrope_scaling(scaling, hf)
    raise SlowLlamaError(f'config.json ({model_type}): rope_type {kind!r} is not supported '
                         '(default, llama3, linear and longrope are)')


def _longrope_scaling(scaling, hf):
    """Phi-3's LongRoPE: per-frequency divisors for short and long sequences, and the cos/sin
    magnitude transformers derives from the context extension when the config does not give it."""
    original = int(scaling.get('original_max_position_embeddings') or hf['original_max_position_embeddings'])
    factor = scaling.get('factor') or hf['max_position_embeddings'] / original
    attention = scaling.get('attention_factor')
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {'rope_type': 'longrope', 'short_factor': [float(f) for f in scaling['short_factor']],
            'long_factor': [float(f) for f in scaling['long_factor']],
            'original_max_position_embeddings': original, 'attention_factor': float(attention)}


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
    except SlowLlamaError as e:  # messages of ModelConfig's own checks name the file here
        message = str(e)
        if message.startswith('model config: '):
            raise SlowLlamaError(f'{where}: {message.removeprefix("model config: ")}') from None
        if message.startswith('config.json'):
            raise SlowLlamaError(f'{where}{message.removeprefix("config.json")}') from None
        raise
    except KeyError as e:
        raise SlowLlamaError(f'{where}: lacks {e.args[0]!r}') from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, OverflowError) as e:
        raise SlowLlamaError(f'{where}: a config value has the wrong type or range ({e})') from None



# Named Llama shapes (Hugging Face config fields) for the benchmark and the memory planner.
SHAPES = {
    'tiny': dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=4096),
    '0.4b': dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),
    '7b': dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    # a few blocks of Llama-2/3 70B's shape, for the time per block against the time to copy it
    '70b-block': dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=4, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000),
}


def shape_config(name):
    """The ModelConfig of a named shape (--shape)."""
    if name not in SHAPES:
        raise SlowLlamaError(f'--shape: unknown shape {name!r} (use {", ".join(SHAPES)})')
    return ModelConfig.from_hf({'model_type': 'llama', **SHAPES[name]})
