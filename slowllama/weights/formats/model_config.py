"""How checkpoints describe a model, mapped onto ModelConfig both ways: Hugging Face config.json
(transformers v4 and v5 spellings) and Meta params.json. GGUF metadata is read in gguf.py."""
import math

from ...errors import SlowLlamaError
from ...model.config import ModelConfig
from .names import FAMILY_FIELDS, HF_ARCHITECTURES, LAYERED_FAMILIES, TEXT_MODELS, WINDOWED_FAMILIES

# Values transformers' config classes default to, for config.json files that leave them out (the
# text_config of Google's Gemma 3 multimodal checkpoints names only what differs from these)
HF_DEFAULTS = {
    'gemma3_text': {'vocab_size': 262208, 'hidden_size': 2304, 'intermediate_size': 9216, 'num_hidden_layers': 26,
                    'num_attention_heads': 8, 'num_key_value_heads': 4, 'head_dim': 256, 'rms_norm_eps': 1e-6,
                    'hidden_activation': 'gelu_pytorch_tanh', 'max_position_embeddings': 131072,
                    'query_pre_attn_scalar': 256, 'sliding_window': 4096, 'tie_word_embeddings': True,
                    'rope_theta': 1000000.0, 'rope_local_base_freq': 10000.0, 'bos_token_id': 2, 'eos_token_id': 1},
}


def config_from_hf(hf):
    """From a transformers config.json dict (v4 'rope_theta'/'rope_scaling' or v5 'rope_parameters')."""
    model_type = hf.get('model_type', 'llama')
    if isinstance(model_type, str) and model_type in TEXT_MODELS:  # gemma3: its language model, in text_config
        model_type = TEXT_MODELS[model_type]
        hf = {**(hf.get('text_config') or {}), 'model_type': model_type}
    if not isinstance(model_type, str) or model_type not in HF_ARCHITECTURES:
        raise SlowLlamaError(f'config.json: model_type {model_type!r:.80} is not supported '
                             f'(supported: {", ".join([*HF_ARCHITECTURES, *TEXT_MODELS])})')
    hf = {**HF_DEFAULTS.get(model_type, {}), **hf}
    rope = hf.get('rope_parameters') or {}
    if 'full_attention' in rope:  # gemma3 (transformers v5): a rope per layer type
        rope = rope['full_attention'] or {}
    n_heads = hf['num_attention_heads']
    return ModelConfig(
        dim=hf['hidden_size'], n_layers=hf['num_hidden_layers'], n_heads=n_heads,
        n_kv_heads=hf.get('num_key_value_heads') or n_heads, hidden_dim=hf['intermediate_size'],
        vocab_size=hf['vocab_size'], norm_eps=hf.get('rms_norm_eps', 1e-6),
        rope_theta=float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
        rope_scaling=_hf_rope_scaling(hf.get('rope_scaling') or rope, hf, model_type),
        max_seq_len=hf.get('max_position_embeddings', 4096),
        tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
        head_dim=hf.get('head_dim') or hf['hidden_size'] // n_heads,
        bos_id=hf.get('bos_token_id'), eos_id=hf.get('eos_token_id'), **_hf_family(hf, model_type))

def config_from_meta(params, vocab_size=None):
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
    return ModelConfig(
        dim=dim, n_layers=params['n_layers'], n_heads=params['n_heads'],
        n_kv_heads=params.get('n_kv_heads') or params['n_heads'],
        hidden_dim=meta_hidden_dim(dim, params.get('multiple_of', 256), params.get('ffn_dim_multiplier')),
        vocab_size=vocab, norm_eps=params.get('norm_eps', 1e-5),
        rope_theta=float(params.get('rope_theta', 10000.0)), rope_scaling=_llama3_scaling(scaling),
        max_seq_len=params.get('max_seq_len', 4096))

def config_to_hf(cfg):
    """The config.json transformers needs to load this model with its own class for model_type."""
    rope = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {'rope_type': 'llama3', **cfg.rope_scaling, 'rope_theta': cfg.rope_theta}
    config = {
        'architectures': [HF_ARCHITECTURES[cfg.model_type]], 'model_type': cfg.model_type,
        'hidden_size': cfg.dim,
        'num_hidden_layers': cfg.n_layers, 'num_attention_heads': cfg.n_heads,
        'num_key_value_heads': cfg.n_kv_heads, 'intermediate_size': cfg.hidden_dim,
        'vocab_size': cfg.vocab_size, 'rms_norm_eps': cfg.norm_eps, 'rope_theta': cfg.rope_theta,
        'rope_scaling': rope if cfg.rope_scaling else None, 'rope_parameters': rope,
        'max_position_embeddings': cfg.max_seq_len, 'tie_word_embeddings': cfg.tie_embeddings,
        'head_dim': cfg.head_dim, 'hidden_act': 'silu', 'attention_bias': False, 'mlp_bias': False,
        'bos_token_id': cfg.bos_id, 'eos_token_id': cfg.eos_id, 'pad_token_id': None,
        'torch_dtype': 'bfloat16'}
    if cfg.model_type in ('mistral', 'phi3', 'mixtral'):
        config['sliding_window'] = cfg.sliding_window
    config.update(_moe_to_hf(cfg))
    if cfg.model_type in ('qwen2', 'qwen3', 'qwen3_moe'):
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if cfg.model_type == 'phi3':
        config['original_max_position_embeddings'] = (cfg.rope_scaling or {}).get(
            'original_max_position_embeddings', cfg.max_seq_len)
    config.update(_hf_family_config(cfg, rope))
    return config


def _hf_family_config(cfg, rope):
    """config.json keys of issue 35's families (smollm3, olmo2, granite, gemma2, gemma3_text)."""
    config = {}
    if cfg.model_type in LAYERED_FAMILIES:
        config.update(sliding_window=cfg.sliding_window, layer_types=cfg.layer_types or ['full_attention'] * cfg.n_layers)
    if cfg.model_type == 'smollm3':
        config.update(use_sliding_window=cfg.sliding_window is not None and cfg.layer_types is not None,
                      no_rope_layers=cfg.no_rope_layers or [1] * cfg.n_layers)
    if cfg.model_type == 'granite':
        config.update(attention_multiplier=cfg.attn_scale or cfg.head_dim ** -0.5,
                      embedding_multiplier=cfg.embed_multiplier, residual_multiplier=cfg.residual_multiplier,
                      logits_scaling=cfg.logits_scaling)
    if cfg.model_type in ('gemma2', 'gemma3_text'):
        scalar = (cfg.attn_scale or cfg.head_dim ** -0.5) ** -2
        config.update(hidden_act='gelu_pytorch_tanh', hidden_activation='gelu_pytorch_tanh',
                      query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
                      attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap)
    if cfg.model_type == 'gemma3_text':
        local = {'rope_type': 'default', 'rope_theta': cfg.rope_local_theta}
        config.update(rope_parameters={'full_attention': rope, 'sliding_attention': local}, rope_scaling=None,
                      rope_local_base_freq=cfg.rope_local_theta, use_bidirectional_attention=False)
    return config

def config_to_meta(cfg):
    """Meta's params.json. hidden_dim is recovered exactly through ffn_dim_multiplier where needed."""
    params = {'dim': cfg.dim, 'n_layers': cfg.n_layers, 'n_heads': cfg.n_heads,
              'n_kv_heads': cfg.n_kv_heads, 'vocab_size': cfg.vocab_size, 'norm_eps': cfg.norm_eps,
              'rope_theta': cfg.rope_theta, 'multiple_of': 256}
    params.update(_meta_ffn_params(cfg.dim, cfg.hidden_dim))
    if cfg.rope_scaling:
        if cfg.rope_scaling.get('rope_type', 'llama3') != 'llama3':
            raise SlowLlamaError('format meta: Meta checkpoints carry llama3 rope scaling only')
        params['use_scaled_rope'] = True
        params['rope_scaling_factor'] = cfg.rope_scaling['factor']
    return params


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
    gemma = model_type in ('gemma2', 'gemma3_text')
    activation = hf.get('hidden_activation') or hf.get('hidden_act') or ('gelu_pytorch_tanh' if gemma else 'silu')
    if activation != ('gelu_pytorch_tanh' if gemma else 'silu'):
        raise SlowLlamaError(f"{where}: hidden_act {activation!r} is not supported "
                             f"(only {'gelu_pytorch_tanh' if gemma else 'silu'})")
    if hf.get('mlp_bias') or (hf.get('attention_bias') and model_type != 'qwen2'):
        raise SlowLlamaError(f'{where}: attention_bias / mlp_bias are not supported')
    rotary = (hf.get('rope_parameters') or {}).get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))
    if rotary != 1.0:
        raise SlowLlamaError(f'{where}: partial_rotary_factor {rotary} is not supported (rope on whole heads only)')
    window = hf.get('sliding_window') if model_type in WINDOWED_FAMILIES else None
    if model_type == 'qwen3_moe' and hf.get('use_sliding_window'):  # every layer (checked below)
        window = hf.get('sliding_window')
    if hf.get('use_sliding_window') and hf.get('max_window_layers', hf['num_hidden_layers']) < hf['num_hidden_layers']:
        raise SlowLlamaError(f'{where}: use_sliding_window on some layers only is not supported')  # qwen
    layer_types = hf.get('layer_types')
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != hf['num_hidden_layers']):
        raise SlowLlamaError(f'{where}: layer_types lists {len(layer_types) if isinstance(layer_types, list) else 0} '
                             f"layers but num_hidden_layers is {hf['num_hidden_layers']}")
    if model_type not in LAYERED_FAMILIES and len(set(layer_types or [])) > 1:
        raise SlowLlamaError(f'{where}: layer_types mixing attention kinds are not supported')
    if hf.get('use_bidirectional_attention'):
        raise SlowLlamaError(f'{where}: use_bidirectional_attention (an embedding model) is not supported')
    fields = {'model_type': model_type, 'sliding_window': window, **FAMILY_FIELDS.get(model_type, {})}
    fields.update(_layer_fields(hf, model_type))
    fields.update(_hf_experts(hf, model_type, where))
    if model_type == 'granite':
        fields.update(attn_scale=hf.get('attention_multiplier', 1.0), embed_multiplier=hf.get('embedding_multiplier', 1.0),
                      residual_multiplier=hf.get('residual_multiplier', 1.0), logits_scaling=hf.get('logits_scaling', 1.0))
    if gemma:
        for key in ('attn_logit_softcapping', 'final_logit_softcapping'):  # null turns a cap off; 0 is no cap
            value = hf.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or
                                      not 0 < value < math.inf):
                raise SlowLlamaError(f'{where}: {key} must be a positive number or null, got {value!r:.80}')
        fields.update(attn_scale=hf['query_pre_attn_scalar'] ** -0.5, embed_multiplier=hf['hidden_size'] ** 0.5,
                      attn_softcap=hf.get('attn_logit_softcapping'), final_softcap=hf.get('final_logit_softcapping'))
    return fields


def _layer_fields(hf, model_type):
    """Per-layer differences: which layers have the sliding window (gemma2: every other one, gemma3:
    five of six, smollm3: as use_sliding_window says), which have no rope (smollm3), and gemma3's
    second rope base for its sliding layers."""
    n = hf['num_hidden_layers']
    fields = {}
    if model_type in ('gemma2', 'gemma3_text'):
        period = 2 if model_type == 'gemma2' else hf.get('sliding_window_pattern', 6)
        fields['layer_types'] = hf.get('layer_types') or [
            'sliding_attention' if (i + 1) % period else 'full_attention' for i in range(n)]
        fields['sliding_window'] = hf.get('sliding_window')
    if model_type == 'smollm3':
        interval = hf.get('no_rope_layer_interval', 4)
        fields['no_rope_layers'] = hf.get('no_rope_layers') or [int((i + 1) % interval != 0) for i in range(n)]
        if hf.get('use_sliding_window') and hf.get('sliding_window'):
            fields.update(sliding_window=hf['sliding_window'], layer_types=hf.get('layer_types'))
    if model_type == 'gemma3_text':
        rope = hf.get('rope_parameters') or {}
        local = (rope.get('sliding_attention') or {}).get('rope_theta') if 'full_attention' in rope else None
        fields['rope_local_theta'] = float(local or hf.get('rope_local_base_freq', 10000.0))
    return fields


def _hf_experts(hf, model_type, where):
    """The Mixture-of-Experts fields (ModelConfig's n_experts ...) of qwen3_moe and mixtral; none for
    the dense families."""
    if model_type == 'qwen3_moe':
        layers = hf['num_hidden_layers']
        experts = hf.get('num_experts', hf.get('num_local_experts', 128))  # transformers 5 writes the second
        if hf.get('mlp_only_layers') or hf.get('decoder_sparse_step', 1) != 1 or not experts:
            raise SlowLlamaError(f'{where}: dense MLP layers among the experts (mlp_only_layers '
                                 f'{hf.get("mlp_only_layers")}, decoder_sparse_step {hf.get("decoder_sparse_step")}, '
                                 f'num_experts {experts}) are not supported: every one of the '
                                 f'{layers} layers must be sparse')
        return {'n_experts': experts, 'experts_per_token': hf.get('num_experts_per_tok', 8),
                'expert_hidden_dim': hf.get('moe_intermediate_size', 768),
                'norm_topk_prob': bool(hf.get('norm_topk_prob', False)),
                'router_aux_loss_coef': hf.get('router_aux_loss_coef', 0.001)}
    if model_type == 'mixtral':
        if hf.get('router_jitter_noise'):
            raise SlowLlamaError(f'{where}: router_jitter_noise {hf["router_jitter_noise"]} is not supported (only 0)')
        return {'n_experts': hf.get('num_local_experts', 8), 'experts_per_token': hf.get('num_experts_per_tok', 2),
                'expert_hidden_dim': hf['intermediate_size'], 'norm_topk_prob': True,
                'router_aux_loss_coef': hf.get('router_aux_loss_coef', 0.001)}
    return {}


def _moe_to_hf(cfg):
    """config.json's expert fields for qwen3_moe and mixtral."""
    common = {'num_experts_per_tok': cfg.experts_per_token, 'router_aux_loss_coef': cfg.router_aux_loss_coef,
              'output_router_logits': False}
    if cfg.model_type == 'qwen3_moe':
        return {**common, 'num_experts': cfg.n_experts, 'moe_intermediate_size': cfg.expert_hidden_dim,
                'norm_topk_prob': cfg.norm_topk_prob, 'decoder_sparse_step': 1, 'mlp_only_layers': []}
    if cfg.model_type == 'mixtral':
        return {**common, 'num_local_experts': cfg.n_experts, 'router_jitter_noise': 0.0}
    return {}


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
