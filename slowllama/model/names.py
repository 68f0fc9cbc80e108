"""Our names for a model's tensors (Hugging Face's, and the Hugging Face q/k layout: rotate-half rope)
and for its LoRA targets. How Meta, Hugging Face checkpoints and GGUF name the same tensors is the
formats' knowledge (weights/formats/names.py)."""

# A block's tensors every family has, in file order
BLOCK_WEIGHTS = (
    'self_attn.q_proj.weight', 'self_attn.k_proj.weight', 'self_attn.v_proj.weight', 'self_attn.o_proj.weight',
    'mlp.gate_proj.weight', 'mlp.up_proj.weight', 'mlp.down_proj.weight',
    'input_layernorm.weight', 'post_attention_layernorm.weight',
)

# The seven projection weights of a block: what --quant packs (norms stay in the model's dtype)
PROJECTION_WEIGHTS = tuple(name for name in BLOCK_WEIGHTS if name.endswith('_proj.weight'))


def is_projection(name):
    """A weight --quant packs: the dense projections and each expert's (not the router)."""
    return name in PROJECTION_WEIGHTS or (name.startswith('mlp.experts.') and name.endswith('_proj.weight'))

# Block tensors only some families have: ours -> the ModelConfig flag that adds them
OPTIONAL_BLOCK_TENSORS = {
    'self_attn.q_proj.bias': 'qkv_bias', 'self_attn.k_proj.bias': 'qkv_bias', 'self_attn.v_proj.bias': 'qkv_bias',
    'self_attn.q_norm.weight': 'qk_norm', 'self_attn.k_norm.weight': 'qk_norm',
    # olmo2, gemma2, gemma3: the norm on the MLP's output (post_attention_layernorm is then the one on
    # the attention's output); gemma: the norm before the MLP too
    'post_feedforward_layernorm.weight': 'post_norms', 'pre_feedforward_layernorm.weight': ('pre_norms', 'post_norms'),
}
# Block tensors of BLOCK_WEIGHTS a family lacks: ours -> the ModelConfig flag without which it is absent
DROPPED_BLOCK_TENSORS = {'input_layernorm.weight': 'pre_norms'}  # olmo2: no norm before attention


# A Mixture-of-Experts block's MLP (qwen3_moe, mixtral): the router, then each expert's three weights
ROUTER_WEIGHT = 'mlp.gate.weight'
DENSE_MLP_WEIGHTS = ('mlp.gate_proj.weight', 'mlp.up_proj.weight', 'mlp.down_proj.weight')
EXPERT_PROJECTIONS = ('gate_proj', 'up_proj', 'down_proj')


def expert_weight(e, projection):
    """(3, 'up_proj') -> 'mlp.experts.3.up_proj.weight'"""
    return f'mlp.experts.{e}.{projection}.weight'


def block_tensor_names(cfg):
    """Our names of one block's tensors for this model's family, in file order (a MoE block: the
    router in place of the dense MLP, then expert 0's weights, expert 1's, ...)."""
    def present(flags):
        return all(getattr(cfg, flag) for flag in ((flags,) if isinstance(flags, str) else flags))
    kept = [name for name in BLOCK_WEIGHTS if present(DROPPED_BLOCK_TENSORS.get(name, ()))]
    names = kept + [name for name, flags in OPTIONAL_BLOCK_TENSORS.items() if present(flags)]
    if not cfg.n_experts:
        return names
    experts = [expert_weight(e, p) for e in range(cfg.n_experts) for p in EXPERT_PROJECTIONS]
    return [n for n in names if n not in DENSE_MLP_WEIGHTS] + [ROUTER_WEIGHT] + experts


# The order of a block file's tensors (model.block.block_shapes): every family's, then the optional ones
BLOCK_TENSORS = BLOCK_WEIGHTS + tuple(OPTIONAL_BLOCK_TENSORS)


# Tensors outside the blocks
EMBED_TENSOR = 'embed_tokens.weight'
NORM_TENSOR = 'norm.weight'
HEAD_TENSOR = 'lm_head.weight'

# LoRA targets: short name -> module path inside a block. Meta and HF spellings are accepted too.
TARGET_MODULES = {
    'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj', 'v': 'self_attn.v_proj', 'o': 'self_attn.o_proj',
    'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj', 'down': 'mlp.down_proj',
    'router': 'mlp.gate', 'experts': 'mlp.experts',  # Mixture-of-Experts blocks only
}
DENSE_MLP_TARGETS = ('gate', 'up', 'down')
MOE_TARGETS = ('router', 'experts')
# LoRA on the experts, as PEFT's target_parameters on transformers 5's two 3D expert tensors: one
# LoRA per tensor (each expert its own rank-r slice), the second nesting the first as its
# base_layer. PEFT key path -> (the tensor it adapts, our ExpertProjection module in the MoE MLP)
EXPERT_LORA = {'mlp.experts.base_layer': ('mlp.experts.gate_up_proj', 'mlp.gate_up'),
               'mlp.experts': ('mlp.experts.down_proj', 'mlp.down')}
TARGET_ALIASES = {
    'wq': 'q', 'wk': 'k', 'wv': 'v', 'wo': 'o', 'w1': 'gate', 'w3': 'up', 'w2': 'down',
    'q_proj': 'q', 'k_proj': 'k', 'v_proj': 'v', 'o_proj': 'o',
    'gate_proj': 'gate', 'up_proj': 'up', 'down_proj': 'down',
}

# The names of trainable LoRA parameters (PEFT's adapter keys):
# base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
PEFT_PREFIX = 'base_model.model.model.layers.'


def canonical_target(name):
    """'wq', 'q_proj' or 'q' -> 'q'; None if the name is not a LoRA target."""
    name = name.strip()
    if name in TARGET_MODULES:
        return name
    return TARGET_ALIASES.get(name)


def hf_module_name(target):
    """'q' -> 'q_proj': the name PEFT's target_modules uses."""
    return TARGET_MODULES[target].split('.')[-1]
