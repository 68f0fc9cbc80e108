"""How checkpoints name our tensors: Meta's and GGUF's names, Hugging Face's prefixes, the families'
fused tensors and config.json classes. Our own names (= Hugging Face's) are model/names.py's.

Our prepared folders use Hugging Face names and the Hugging Face q/k layout (rotate-half rope), so a
PEFT adapter maps onto our modules with no translation. Meta and GGUF store q/k in the interleaved
rope layout; formats/ permutes those two when reading and writing.
"""
from ...model.config import FAMILIES
from ...model.names import BLOCK_WEIGHTS, EMBED_TENSOR, HEAD_TENSOR, NORM_TENSOR, OPTIONAL_BLOCK_TENSORS

# Per-block tensors: ours -> (Meta name, GGUF name, Meta model-parallel split dim or None if replicated)
BLOCK_TENSORS = {
    'self_attn.q_proj.weight': ('attention.wq.weight', 'attn_q.weight', 0),
    'self_attn.k_proj.weight': ('attention.wk.weight', 'attn_k.weight', 0),
    'self_attn.v_proj.weight': ('attention.wv.weight', 'attn_v.weight', 0),
    'self_attn.o_proj.weight': ('attention.wo.weight', 'attn_output.weight', 1),
    'mlp.gate_proj.weight': ('feed_forward.w1.weight', 'ffn_gate.weight', 0),
    'mlp.up_proj.weight': ('feed_forward.w3.weight', 'ffn_up.weight', 0),
    'mlp.down_proj.weight': ('feed_forward.w2.weight', 'ffn_down.weight', 1),
    'input_layernorm.weight': ('attention_norm.weight', 'attn_norm.weight', None),
    'post_attention_layernorm.weight': ('ffn_norm.weight', 'ffn_norm.weight', None),
}

assert tuple(BLOCK_TENSORS) == BLOCK_WEIGHTS

# GGUF names of the block tensors only some families have (model/names.OPTIONAL_BLOCK_TENSORS)
GGUF_OPTIONAL = {
    'self_attn.q_proj.bias': 'attn_q.bias', 'self_attn.k_proj.bias': 'attn_k.bias',
    'self_attn.v_proj.bias': 'attn_v.bias',
    'self_attn.q_norm.weight': 'attn_q_norm.weight', 'self_attn.k_norm.weight': 'attn_k_norm.weight',
    'post_feedforward_layernorm.weight': 'post_ffw_norm.weight', 'pre_feedforward_layernorm.weight': 'ffn_norm.weight',
}
assert set(GGUF_OPTIONAL) == set(OPTIONAL_BLOCK_TENSORS)
# With post_norms (olmo2, gemma2, gemma3) post_attention_layernorm is on the attention's output, a
# tensor llama.cpp names apart from Llama's pre-MLP ffn_norm
GGUF_POST_NORMS = {'post_attention_layernorm.weight': 'post_attention_norm.weight'}


def gguf_block_name(ours, cfg=None):
    """Our block tensor name -> llama.cpp's ('self_attn.q_proj.bias' -> 'attn_q.bias')."""
    if cfg is not None and cfg.post_norms and ours in GGUF_POST_NORMS:
        return GGUF_POST_NORMS[ours]
    return BLOCK_TENSORS[ours][1] if ours in BLOCK_TENSORS else GGUF_OPTIONAL[ours]


# The families we build: HF model_type -> the transformers class that loads it
HF_ARCHITECTURES = {
    'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM', 'qwen2': 'Qwen2ForCausalLM',
    'qwen3': 'Qwen3ForCausalLM', 'phi3': 'Phi3ForCausalLM', 'smollm3': 'SmolLM3ForCausalLM',
    'olmo2': 'Olmo2ForCausalLM', 'granite': 'GraniteForCausalLM', 'gemma3_text': 'Gemma3ForCausalLM',
    'gemma2': 'Gemma2ForCausalLM', 'qwen3_moe': 'Qwen3MoeForCausalLM', 'mixtral': 'MixtralForCausalLM',
}
assert tuple(HF_ARCHITECTURES) == FAMILIES
# Multimodal model_types whose language model we build: model_type -> the text model's
TEXT_MODELS = {'gemma3': 'gemma3_text'}
# Where peft keys the LoRAs of a multimodal model's language model (model/names.PEFT_PREFIX for ours)
PEFT_LANGUAGE_MODEL_PREFIX = 'base_model.model.model.language_model.layers.'

# What a family's blocks carry beyond Llama's: model_type -> ModelConfig fields (flags of OPTIONAL_BLOCK_TENSORS)
_GEMMA = {'post_norms': True, 'norm_kind': 'plus_one', 'mlp_activation': 'gelu_tanh'}
FAMILY_FIELDS = {'qwen2': {'qkv_bias': True}, 'qwen3': {'qk_norm': True},
                 'olmo2': {'pre_norms': False, 'post_norms': True, 'qk_norm': True, 'qk_norm_whole': True,
                           'norm_kind': 'fp32_scale'},
                 'gemma2': _GEMMA, 'gemma3_text': {**_GEMMA, 'qk_norm': True}, 'qwen3_moe': {'qk_norm': True}}
# Families whose config.json sliding_window is a window of every layer
WINDOWED_FAMILIES = ('mistral', 'phi3', 'mixtral')
# Families whose config.json layer_types say which layers have the window (the others see everything)
LAYERED_FAMILIES = ('gemma2', 'gemma3_text', 'smollm3')

# Tensors a family's HF checkpoints keep fused: model_type -> {HF name: our names, stacked on rows in order}.
# Split at prepare, fused again at export.
FUSED_TENSORS = {
    'phi3': {'self_attn.qkv_proj.weight': ('self_attn.q_proj.weight', 'self_attn.k_proj.weight',
                                           'self_attn.v_proj.weight'),
             'mlp.gate_up_proj.weight': ('mlp.gate_proj.weight', 'mlp.up_proj.weight')},
}

# Mixture-of-Experts blocks in HF checkpoints, as the hub stores them (one tensor per expert and
# projection): model_type -> (router, an expert's projection, {our projection: theirs})
HF_EXPERTS = {
    'qwen3_moe': ('mlp.gate.weight', 'mlp.experts.{e}.{p}.weight',
                  {'gate_proj': 'gate_proj', 'up_proj': 'up_proj', 'down_proj': 'down_proj'}),
    'mixtral': ('block_sparse_moe.gate.weight', 'block_sparse_moe.experts.{e}.{p}.weight',
                {'gate_proj': 'w1', 'up_proj': 'w3', 'down_proj': 'w2'}),
}
# ... and as transformers 5 holds them: every expert in one 3D tensor per projection, gate and up
# stacked on rows ([experts, 2 * expert_hidden, dim]), down [experts, dim, expert_hidden]
HF_FUSED_EXPERTS = ('mlp.gate.weight', 'mlp.experts.gate_up_proj', 'mlp.experts.down_proj')

# GGUF general.architecture -> (HF model_type, q/k stored rope-interleaved). llama.cpp permutes q/k
# for its 'llama' architecture only; qwen2 and qwen3 keep the rotate-half (NEOX) layout.
# granite and smollm3 are converted as Llama (permuted); olmo2 and the gemmas are not.
GGUF_ARCHITECTURES = {'llama': ('llama', True), 'qwen2': ('qwen2', False), 'qwen3': ('qwen3', False),
                      'phi3': ('phi3', False), 'smollm3': ('smollm3', True), 'granite': ('granite', True),
                      'olmo2': ('olmo2', False), 'gemma2': ('gemma2', False), 'gemma3': ('gemma3_text', False),
                      'qwen3moe': ('qwen3_moe', False)}
# Architectures whose every RMSNorm weight llama.cpp stores plus one (gemma's (1 + w) folded in)
GGUF_NORMS_PLUS_ONE = ('gemma2', 'gemma3')
# llama.cpp keeps Mixtral as architecture llama with an expert count
GGUF_EXPERT_FAMILIES = {'llama': 'mixtral', 'qwen3moe': 'qwen3_moe'}
# llama.cpp's Mixture-of-Experts tensors of a block: the router, and each projection of every expert
# in one 3D tensor ([experts, out, in] in torch's order)
GGUF_ROUTER = 'ffn_gate_inp.weight'
GGUF_EXPERTS = {'gate_proj': 'ffn_gate_exps.weight', 'up_proj': 'ffn_up_exps.weight',
                'down_proj': 'ffn_down_exps.weight'}
# llama.cpp's fused block tensors: architecture -> {GGUF name: our names, stacked on rows in order}
GGUF_FUSED = {
    'phi3': {'attn_qkv.weight': ('self_attn.q_proj.weight', 'self_attn.k_proj.weight', 'self_attn.v_proj.weight'),
             'ffn_up.weight': ('mlp.gate_proj.weight', 'mlp.up_proj.weight')},
}

# Tensors outside the blocks: ours -> (Meta name, GGUF name, Meta split dim)
OUTER_TENSORS = {
    EMBED_TENSOR: ('tok_embeddings.weight', 'token_embd.weight', 1),
    NORM_TENSOR: ('norm.weight', 'output_norm.weight', None),
    HEAD_TENSOR: ('output.weight', 'output.weight', 0),
}

# Hugging Face checkpoint prefixes for the same tensors
HF_BLOCK_PREFIX = 'model.layers.{i}.'
HF_OUTER = {EMBED_TENSOR: 'model.embed_tokens.weight', NORM_TENSOR: 'model.norm.weight', HEAD_TENSOR: 'lm_head.weight'}

# Families whose HF class fuses LoRA targets: model_type -> {PEFT module name: our targets, stacked in order}
FUSED_TARGETS = {'phi3': {'qkv_proj': ('q', 'k', 'v'), 'gate_up_proj': ('gate', 'up')}}

# q and k are stored rope-interleaved by Meta and GGUF: ours -> the ModelConfig field giving their head count
ROPE_PERMUTED = {'self_attn.q_proj.weight': 'n_heads', 'self_attn.k_proj.weight': 'n_kv_heads'}

# Meta checkpoint files
META_PARAMS = 'params.json'
META_SHARD = 'consolidated.{:02d}.pth'
META_BLOCK_PREFIX = 'layers.{i}.'
META_IGNORED = ('rope.freqs',)  # precomputed rope table in Llama-1/2 shards; recomputed from the config

# GGUF block tensor prefix, and the per-frequency llama3 rope table it may carry
GGUF_BLOCK_PREFIX = 'blk.{i}.'
GGUF_ROPE_FREQS = 'rope_freqs.weight'
# llama.cpp LoRA adapter tensors: '{GGUF tensor name}.lora_a' (A) and '.lora_b' (B)
GGUF_LORA_SUFFIXES = {'A': '.lora_a', 'B': '.lora_b'}
