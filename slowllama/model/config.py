"""ModelConfig: the shape of a Llama-family model and what its family changes in the block, checked.
How Meta params.json, HF config.json and GGUF metadata map onto it is weights/formats/model_config.py's."""
import contextlib
import dataclasses
import math
from dataclasses import dataclass

from ..errors import SlowLlamaError

# The families whose blocks we build (HF model_type names)
FAMILIES = ('llama', 'mistral', 'qwen2', 'qwen3', 'phi3', 'smollm3', 'olmo2', 'granite', 'gemma3_text', 'gemma2',
            'qwen3_moe', 'mixtral')
LAYER_TYPES = ('full_attention', 'sliding_attention')
MLP_ACTIVATIONS = ('silu', 'gelu_tanh')
NORM_KINDS = ('llama', 'fp32_scale', 'plus_one')


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
    # what the families built on the Llama block differ in (FAMILIES)
    model_type: str = 'llama'
    qkv_bias: bool = False               # qwen2: bias on q, k and v (frozen like the weights)
    qk_norm: bool = False                # qwen3: RMSNorm over each head's q and k, before rope
    sliding_window: int | None = None    # mistral, phi3: a position sees itself and the window - 1 before it
    # per layer (lists of n_layers), None: every layer alike
    layer_types: list | None = None      # gemma2, gemma3: 'sliding_attention' layers have the window, 'full_attention' none
    no_rope_layers: list | None = None   # smollm3: 1 where a layer rotates q and k, 0 where it has no rope
    rope_local_theta: float | None = None  # gemma3: the sliding layers' rope base, unscaled (rope_theta and
                                           # rope_scaling are the full layers')
    # norms: before attention and the MLP (Llama), after them (olmo2: post only), or both (gemma: four a block)
    pre_norms: bool = True               # olmo2: False, no input_layernorm
    post_norms: bool = False             # olmo2, gemma2, gemma3: a norm on the attention's and the MLP's outputs
    norm_kind: str = 'llama'             # how every RMSNorm applies its weight: 'llama' (cast, then scale),
                                         # 'fp32_scale' (olmo2: scale in fp32, then cast), 'plus_one'
                                         # (gemma2, gemma3: (1 + weight), in fp32, then cast)
    qk_norm_whole: bool = False          # olmo2: the q and k norms span the whole projection, not each head
    mlp_activation: str = 'silu'         # gemma2, gemma3: 'gelu_tanh'
    attn_scale: float | None = None      # None: head_dim ** -0.5; granite: attention_multiplier;
                                         # gemma: query_pre_attn_scalar ** -0.5
    attn_softcap: float | None = None    # gemma2: scores -> cap * tanh(scores / cap) before the softmax
    final_softcap: float | None = None   # gemma2: logits -> cap * tanh(logits / cap)
    embed_multiplier: float = 1.0        # granite: embedding_multiplier; gemma: sqrt(dim), in the compute dtype
    residual_multiplier: float = 1.0     # granite: each block's branch output times this before the residual add
    logits_scaling: float = 1.0          # granite: logits divided by this
    # Mixture-of-Experts (qwen3_moe, mixtral): the MLP is a router and n_experts SwiGLU experts of
    # expert_hidden_dim each, experts_per_token of them chosen per token (model/moe.py); 0 experts: dense
    n_experts: int = 0
    experts_per_token: int = 0
    expert_hidden_dim: int = 0
    norm_topk_prob: bool = False         # the chosen experts' weights renormalised to sum 1 (mixtral always)
    router_aux_loss_coef: float = 0.0    # the load-balancing loss's weight when the router trains

    def __post_init__(self):
        check_values(self)
        for name in ('norm_eps', 'rope_theta', 'router_aux_loss_coef'):  # a JSON integer such as 10**40 is a number too, held as one
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.head_dim == 0:
            object.__setattr__(self, 'head_dim', self.dim // self.n_heads)
        if self.head_dim < 2 or self.head_dim % 2:  # rope rotates pairs
            raise SlowLlamaError(f'model config: head_dim {self.head_dim} (dim {self.dim} / n_heads {self.n_heads}) '
                                 'must be even and at least 2')
        for name in ('layer_types', 'no_rope_layers'):  # JSON gives lists; a tuple compares and hashes alike
            if getattr(self, name) is not None:
                object.__setattr__(self, name, list(getattr(self, name)))
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
    if not isinstance(cfg.model_type, str) or cfg.model_type not in FAMILIES:
        raise SlowLlamaError(f'model config: model_type must be one of {", ".join(FAMILIES)}, '
                             f'got {cfg.model_type!r:.80}')
    for name in ('qkv_bias', 'qk_norm'):
        if not isinstance(getattr(cfg, name), bool):
            raise SlowLlamaError(f'model config: {name} must be true or false, got {getattr(cfg, name)!r:.80}')
    if cfg.sliding_window is not None and (not _is_int(cfg.sliding_window) or cfg.sliding_window < 1):
        raise SlowLlamaError(f'model config: sliding_window must be a positive integer or null, '
                             f'got {cfg.sliding_window!r:.80}')
    _check_family_values(cfg)
    _check_experts(cfg)
    if not isinstance(cfg.tie_embeddings, bool):
        raise SlowLlamaError(f'model config: tie_embeddings must be true or false, got {cfg.tie_embeddings!r:.80}')
    eos = cfg.eos_id if isinstance(cfg.eos_id, list) else [cfg.eos_id]
    for name, ids in (('bos_id', [cfg.bos_id]), ('eos_id', eos)):
        if not all(i is None or (_is_int(i) and i >= 0) for i in ids):
            raise SlowLlamaError(f'model config: {name} must be a token id, got {getattr(cfg, name)!r:.200}')


def _check_family_values(cfg):
    """The fields of issue 35's families: per-layer lists as long as the layers, positive numbers."""
    for name, allowed in (('layer_types', LAYER_TYPES), ('no_rope_layers', (0, 1))):
        value = getattr(cfg, name)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)) or len(value) != cfg.n_layers:
            length = len(value) if isinstance(value, (list, tuple)) else 'not a list'
            raise SlowLlamaError(f'model config: {name} must list one entry per layer ({cfg.n_layers}), '
                                 f'got {length}')
        if not all(isinstance(v, (str, int)) and v in allowed for v in value):
            raise SlowLlamaError(f'model config: {name} entries must be one of {allowed}, got {value!r:.120}')
    if cfg.layer_types and 'sliding_attention' in cfg.layer_types and cfg.sliding_window is None:
        raise SlowLlamaError('model config: layer_types has sliding_attention layers but sliding_window is null')
    for name in ('pre_norms', 'post_norms', 'qk_norm_whole'):
        if not isinstance(getattr(cfg, name), bool):
            raise SlowLlamaError(f'model config: {name} must be true or false, got {getattr(cfg, name)!r:.80}')
    if not cfg.pre_norms and not cfg.post_norms:
        raise SlowLlamaError('model config: a block needs pre_norms or post_norms')
    if cfg.norm_kind not in NORM_KINDS:
        raise SlowLlamaError(f'model config: norm_kind must be one of {", ".join(NORM_KINDS)}, got {cfg.norm_kind!r:.80}')
    if cfg.mlp_activation not in MLP_ACTIVATIONS:
        raise SlowLlamaError(f'model config: mlp_activation must be one of {", ".join(MLP_ACTIVATIONS)}, '
                             f'got {cfg.mlp_activation!r:.80}')
    for name in ('rope_local_theta', 'attn_scale', 'attn_softcap', 'final_softcap'):  # None or a positive number
        value = getattr(cfg, name)
        if value is not None and (not _is_real(value) or value <= 0):
            raise SlowLlamaError(f'model config: {name} must be a positive number or null, got {value!r:.80}')
    for name in ('embed_multiplier', 'residual_multiplier', 'logits_scaling'):
        value = getattr(cfg, name)
        if not _is_real(value) or value <= 0:
            raise SlowLlamaError(f'model config: {name} must be a positive number, got {value!r:.80}')


def layer_window(cfg, i):
    """The sliding window of layer i (None: it sees every earlier position)."""
    if cfg.layer_types is not None and cfg.layer_types[i] == 'full_attention':  # gemma2, gemma3
        return None
    return cfg.sliding_window


def layer_rope(cfg, i):
    """Which rope table layer i uses: None (smollm3's layers without rope), 0 (rope_theta, scaled) or
    1 (gemma3's sliding layers: rope_local_theta)."""
    if cfg.no_rope_layers is not None and not cfg.no_rope_layers[i]:
        return None
    if cfg.rope_local_theta is not None and layer_window(cfg, i) is not None:
        return 1
    return 0


def _check_experts(cfg):
    """Dense (no experts, none chosen) or a Mixture-of-Experts whose numbers agree."""
    for name, limit in (('n_experts', 1 << 12), ('experts_per_token', 1 << 12), ('expert_hidden_dim', 1 << 18)):
        value = getattr(cfg, name)
        if not _is_int(value) or not 0 <= value <= limit:
            raise SlowLlamaError(f'model config: {name} must be an integer in [0, {limit}], got {value!r:.80}')
    if cfg.n_experts and not (1 <= cfg.experts_per_token <= cfg.n_experts and cfg.expert_hidden_dim >= 1):
        raise SlowLlamaError(f'model config: {cfg.n_experts} experts need experts_per_token in [1, {cfg.n_experts}] '
                             f'and expert_hidden_dim >= 1, got {cfg.experts_per_token} and {cfg.expert_hidden_dim}')
    if not cfg.n_experts and (cfg.experts_per_token or cfg.expert_hidden_dim):
        raise SlowLlamaError('model config: experts_per_token and expert_hidden_dim need n_experts > 0')
    if not isinstance(cfg.norm_topk_prob, bool):
        raise SlowLlamaError(f'model config: norm_topk_prob must be true or false, got {cfg.norm_topk_prob!r:.80}')
    if not _is_real(cfg.router_aux_loss_coef) or cfg.router_aux_loss_coef < 0:
        raise SlowLlamaError(f'model config: router_aux_loss_coef must be a number >= 0, '
                             f'got {cfg.router_aux_loss_coef!r:.80}')


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
