"""The math of a Llama: RMSNorm, rope, attention, feed-forward, block, embedding and head.

Plain nn.Modules in the Hugging Face layout (names and rotate-half rope), so a state dict from a
prepared block file or from transformers loads as it is. Nothing here knows where weights come from
or that LoRA exists.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, layer_rope, layer_window
from .moe import MoE
from .names import BLOCK_TENSORS


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, kind='llama'):
        super().__init__()
        self.eps, self.kind = eps, kind
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.kind)


def rms_norm(x, weight, eps, kind='llama'):
    # normalise in fp32 whatever the compute dtype, as Meta and HF both do
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if kind == 'plus_one':  # gemma2, gemma3: scaled by (1 + weight) in fp32, then cast
        return (x32 * (1.0 + weight.float())).to(x.dtype)
    if kind == 'fp32_scale':  # olmo2: scaled in fp32, then cast
        return (weight.float() * x32).to(x.dtype)
    return weight * x32.to(x.dtype)  # Llama: cast, then scaled


# --- rotary position embedding -------------------------------------------------------------

def rope_inv_freq(cfg: ModelConfig, seq_len=None, local=False):
    """Inverse frequencies [head_dim / 2], with Llama-3, linear or LongRoPE scaling when the config
    has it. seq_len (the last position + 1) picks LongRoPE's short or long factors. local: gemma3's
    sliding layers, rope_local_theta unscaled."""
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    scaling = cfg.rope_scaling
    if not scaling or local:
        return inv_freq.float()
    if scaling.get('rope_type') == 'linear':  # positions divided by factor
        return (inv_freq / scaling['factor']).float()
    if scaling.get('rope_type') == 'longrope':  # Phi-3: a divisor per frequency, long ones past the original length
        long = seq_len is not None and seq_len > scaling['original_max_position_embeddings']
        divisors = torch.tensor(scaling['long_factor' if long else 'short_factor'], dtype=torch.float64)
        return (inv_freq / divisors).float()
    factor, low, high = scaling['factor'], scaling['low_freq_factor'], scaling['high_freq_factor']
    old_len = scaling['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled).float()


def rope_table(cfg: ModelConfig, positions, device):
    """cos, sin for the given positions [T] or [batch, T]: [..., T, head_dim] each, float32. With two
    rope bases (gemma3) both tables, stacked: [2, ..., T, head_dim] (config.layer_rope says which a
    layer takes)."""
    scaling = cfg.rope_scaling or {}
    if scaling.get('rope_type') == 'longrope':  # the factors depend on how far this call reaches, as in HF
        inv_freq = rope_inv_freq(cfg, int(positions.max()) + 1).to(device)
    else:
        inv_freq = rope_inv_freq(cfg).to(device)
    magnitude = scaling.get('attention_factor', 1.0)  # LongRoPE scales cos and sin alike
    cos, sin = _cos_sin(positions, inv_freq, device, magnitude)
    if cfg.rope_local_theta is None:
        return cos, sin
    local_cos, local_sin = _cos_sin(positions, rope_inv_freq(cfg, local=True).to(device), device, 1.0)
    return torch.stack([cos, local_cos]), torch.stack([sin, local_sin])


def _cos_sin(positions, inv_freq, device, magnitude):
    angles = positions.to(device=device, dtype=torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * magnitude, angles.sin() * magnitude


def rope_changes_past(cfg: ModelConfig, cached, total):
    """True when a KV cache of `cached` positions no longer holds valid keys at `total` positions:
    LongRoPE switches every position to its long factors once the sequence passes the original
    length, so a cache filled before must be recomputed (as transformers' Phi-3 does)."""
    scaling = cfg.rope_scaling or {}
    return scaling.get('rope_type') == 'longrope' and cached <= scaling['original_max_position_embeddings'] < total


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x, cos, sin):
    """x: [batch, heads, seq, head_dim]; cos, sin: [seq, head_dim] or [batch, seq, head_dim]."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if cos.dim() == 3:  # positions per row (packed documents)
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin


def document_mask(positions):
    """[batch, seq] positions, restarting at 0 where a packed document starts -> bool attention mask
    [batch, 1, seq, seq]: each position sees the earlier positions of its own document only."""
    document = (positions == 0).cumsum(dim=-1)  # [batch, seq]
    same = document[:, :, None] == document[:, None, :]
    causal = torch.ones(positions.shape[-1], positions.shape[-1], dtype=torch.bool, device=positions.device).tril()
    return (same & causal)[:, None]


def visible_keys(query_start, n_queries, key_start, n_keys, window, device):
    """bool [n_queries, n_keys]: the query at absolute position p sees the key at position j when
    j <= p and, with a sliding window, j > p - window (itself and the window - 1 before it)."""
    queries = torch.arange(query_start, query_start + n_queries, device=device)[:, None]
    keys = torch.arange(key_start, key_start + n_keys, device=device)[None]
    visible = keys <= queries
    return visible & (keys > queries - window) if window else visible


# --- the block -----------------------------------------------------------------------------

class KVCache:
    """Keys and values of one attention layer for generation. Without a sliding window they are
    preallocated to max_len; with one, only the last window - 1 positions are kept between steps
    (no later query can see further back), so the cache never outgrows the window and a chunk."""

    def __init__(self, batch, n_kv_heads, max_len, head_dim, device, dtype, window=None):
        self.window = window
        self.k = torch.zeros(batch, n_kv_heads, 0 if window else max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # positions seen so far
        self.start = 0   # absolute position of the first key kept

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch, max_len, device, dtype, layer=0):
        return cls(batch, cfg.n_kv_heads, max_len, cfg.head_dim, device, dtype, layer_window(cfg, layer))

    def append(self, k, v):
        """k, v [batch, kv_heads, new, head_dim] -> every key and value kept, these included."""
        if self.window:
            drop = max(0, self.k.shape[2] - (self.window - 1))
            self.k = torch.cat([self.k[:, :, drop:], k], dim=2)
            self.v = torch.cat([self.v[:, :, drop:], v], dim=2)
            self.start += drop
            self.length += k.shape[2]
            return self.k, self.v
        start, end = self.length, self.length + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer=0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = layer_window(cfg, layer)
        self.rope = layer_rope(cfg, layer)
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap  # granite, gemma; gemma2
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.qk_norm_whole, self.two_tables = cfg.qk_norm_whole, cfg.rope_local_theta is not None
        if cfg.qk_norm:  # qwen3, gemma3: one RMSNorm over head_dim, shared by all heads; olmo2: over the projection
            q_width, k_width = (cfg.n_heads, cfg.n_kv_heads) if cfg.qk_norm_whole else (1, 1)
            self.q_norm = RMSNorm(q_width * cfg.head_dim, cfg.norm_eps, cfg.norm_kind)
            self.k_norm = RMSNorm(k_width * cfg.head_dim, cfg.norm_eps, cfg.norm_kind)
        self.dropout = 0.0

    def forward(self, x, cos, sin, cache=None, mask=None):
        batch, seq, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm_whole:  # olmo2: before the heads are split
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, 'q_norm') and not self.qk_norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [batch, heads, seq, head_dim]
        if self.rope is not None:  # smollm3: some layers have no rope
            if self.two_tables:  # gemma3: rope_table stacked the global and the local table
                cos, sin = cos[self.rope], sin[self.rope]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past, key_start = 0, 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
            key_start = cache.start  # the window may have let the oldest keys go
        windowed = self.window is not None and past + seq > self.window  # some key falls out of some query's window
        causal = mask is None and past == 0 and seq > 1 and not windowed
        if (past and seq > 1) or windowed:  # after a cached prefix, or a window: say which keys each query sees
            visible = visible_keys(past, seq, key_start, k.shape[2], self.window, x.device)  # [seq, keys]
            mask = visible if mask is None else mask & visible
        dropout = self.dropout if self.training else 0.0
        if x.device.type == 'mps':
            # mps' fast attention kernel gave silently wrong outputs for non-contiguous q, k, v in
            # several releases (PyTorch issues 163597, 181133), and it is taken under no_grad only:
            # the forward (and generation) and the recompute under autograd could disagree
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if self.softcap is not None:
            out = softcapped_attention(q, k, v, mask, causal, self.scale, self.softcap, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout,
                                                 scale=self.scale, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def softcapped_attention(q, k, v, mask, causal, scale, cap, dropout):
    """gemma2: the scores pass through cap * tanh(scores / cap) before the mask and softmax. SDPA's
    fused kernels (flash, memory-efficient) have no hook between the scores and the softmax, so this
    is the math kernel written out, as transformers' eager attention: the scores [batch, heads, q, keys]
    formed whole, softmax in fp32. q [batch, heads, q, head_dim]; k, v [batch, kv_heads, keys, head_dim]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / cap) * cap
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    if mask is not None:
        scores = scores.masked_fill(~mask, float('-inf'))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, dropout)
    return probs @ v


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.gelu = cfg.mlp_activation == 'gelu_tanh'  # gemma2, gemma3 (transformers' gelu_pytorch_tanh)

    def forward(self, x):
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate='tanh') if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    """h = x + attn(norm(x)); out = h + ffn(norm(h)) (Llama). Where a family puts norms after the
    attention and the MLP too (gemma) or only there (olmo2): h = x + norm(attn(norm(x))), and so for
    the MLP. `dropout` drops attention probabilities and both residual branches, in training mode only."""

    def __init__(self, cfg: ModelConfig, dropout=0.0, layer=0):
        super().__init__()
        def norm():
            return RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_kind)
        self.pre_norms, self.post_norms = cfg.pre_norms, cfg.post_norms
        self.residual_multiplier = cfg.residual_multiplier  # granite
        if cfg.pre_norms:  # olmo2 has none before the attention
            self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = norm()  # Llama: before the MLP; post_norms: on the attention's output
        if cfg.post_norms:  # olmo2, gemma2, gemma3
            self.post_feedforward_layernorm = norm()
            if cfg.pre_norms:  # gemma: four norms a block
                self.pre_feedforward_layernorm = norm()
        self.mlp = MoE(cfg) if cfg.n_experts else FeedForward(cfg)  # qwen3_moe, mixtral: router and experts
        self.set_dropout(dropout)

    def set_dropout(self, p):
        self.dropout = p
        self.self_attn.dropout = p

    def forward(self, x, cos, sin, cache=None, mask=None, fetch_experts=None, routing=None):
        """fetch_experts: how a MoE block gets the weights of the experts its router chose; routing:
        told its router's probabilities and choices (moe.py)."""
        if not self.post_norms:
            h = x + self._branch(self.self_attn(self.input_layernorm(x), cos, sin, cache, mask))
            return h + self._branch(self._mlp(self.post_attention_layernorm(h), fetch_experts, routing))
        attn_in = self.input_layernorm(x) if self.pre_norms else x
        h = x + self._branch(self.post_attention_layernorm(self.self_attn(attn_in, cos, sin, cache, mask)))
        mlp_in = self.pre_feedforward_layernorm(h) if self.pre_norms else h
        return h + self._branch(self.post_feedforward_layernorm(self._mlp(mlp_in, fetch_experts, routing)))

    def _mlp(self, x, fetch_experts, routing):
        if fetch_experts is None and routing is None:
            return self.mlp(x)
        return self.mlp(x, fetch_experts, routing)

    def _branch(self, x):
        if self.residual_multiplier != 1.0:  # granite
            x = x * self.residual_multiplier
        return F.dropout(x, self.dropout, self.training) if self.dropout else x


def scale_embeddings(cfg: ModelConfig, x):
    """Token embeddings as the first block takes them: granite multiplies them by embedding_multiplier,
    gemma by sqrt(dim), rounded to the compute dtype first as transformers does."""
    if cfg.embed_multiplier == 1.0:
        return x
    return x * torch.tensor(cfg.embed_multiplier, dtype=x.dtype, device=x.device)


def shape_logits(cfg: ModelConfig, z):
    """The head's output z -> logits, and d logits / d z (None: 1): granite divides by logits_scaling,
    gemma2 soft-caps them (cap * tanh(z / cap))."""
    slope = None
    if cfg.final_softcap is not None:
        t = torch.tanh(z / cfg.final_softcap)
        z, slope = t * cfg.final_softcap, 1.0 - t * t
    if cfg.logits_scaling != 1.0:
        z = z / cfg.logits_scaling
        slope = (1.0 / cfg.logits_scaling) if slope is None else slope / cfg.logits_scaling
    return z, slope


class Head(nn.Module):
    """Final norm and output projection. With tied embeddings lm_head.weight is the embedding matrix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_kind)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, x):
        return shape_logits(self.cfg, self.lm_head(self.norm(x)))[0]


class Transformer(nn.Module):
    """The whole model held in memory: the reference the streamed engine must equal, and a
    convenience for small models. Same module names as the blocks of a prepared folder."""

    def __init__(self, cfg: ModelConfig, dropout=0.0):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, dropout, i) for i in range(cfg.n_layers))
        self.head = Head(cfg)

    def forward(self, tokens):
        cos, sin = rope_table(self.cfg, torch.arange(tokens.shape[1]), tokens.device)
        x = scale_embeddings(self.cfg, self.embed_tokens(tokens))
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.head(x)


# --- a block's tensors, read off the block itself ---------------------------------------------

def block_shapes(cfg: ModelConfig):
    """{name: shape} of one block's tensors, those of the model's family only, in file order: the
    block built on the meta device (no memory), so the shapes the prepared files, the plan and LoRA
    sizing use are the ones the math loads. Every family's tensors in names.BLOCK_TENSORS' order
    first (the order block files have always had), any other after them in the block's own."""
    key = repr(cfg)  # every field of the config
    if key not in _SHAPES:  # building a block takes milliseconds; the writers ask once a block
        with torch.device('meta'):
            state = Block(cfg).state_dict()
        order = {name: n for n, name in enumerate(BLOCK_TENSORS)}
        names = sorted(state, key=lambda name: order.get(name, len(order)))  # stable: the rest keep theirs
        _SHAPES[key] = {name: tuple(state[name].shape) for name in names}
    return dict(_SHAPES[key])


_SHAPES = {}
