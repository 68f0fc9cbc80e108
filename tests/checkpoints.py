"""Test checkpoints written independently of slowllama's readers: Meta shards and GGUF files made
from a transformers model's weights, with their own (llama.cpp / Meta style) q/k permutation."""
import json
import os

import numpy as np
import torch

# HF block tensor -> (Meta name, GGUF name, Meta split dim): spelled out here, not taken from slowllama
BLOCK = {
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
# Tensors only qwen2 (biases) and qwen3 (q/k norms) have, and llama.cpp's names for them
GGUF_EXTRA = {
    'self_attn.q_proj.bias': 'attn_q.bias', 'self_attn.k_proj.bias': 'attn_k.bias',
    'self_attn.v_proj.bias': 'attn_v.bias', 'self_attn.q_norm.weight': 'attn_q_norm.weight',
    'self_attn.k_norm.weight': 'attn_k_norm.weight',
    'self_attn.qkv_proj.weight': 'attn_qkv.weight', 'mlp.gate_up_proj.weight': 'ffn_up.weight',  # phi3, fused
    'post_feedforward_layernorm.weight': 'post_ffw_norm.weight',  # olmo2, gemma2, gemma3
}
# olmo2 and the gemmas: the norm on the attention's output, and gemma's norm before the MLP
POST_NORM_ARCHS = ('olmo2', 'gemma2', 'gemma3')
POST_NORMS = {'post_attention_layernorm.weight': 'post_attention_norm.weight',
              'pre_feedforward_layernorm.weight': 'ffn_norm.weight'}
PERMUTED_ARCHS = ('llama', 'granite', 'smollm3')  # converted by llama.cpp's LlamaModel: q/k interleaved
PLUS_ONE_ARCHS = ('gemma2', 'gemma3')  # llama.cpp stores every norm weight + 1
OUTER = {
    'model.embed_tokens.weight': ('tok_embeddings.weight', 'token_embd.weight', 1),
    'model.norm.weight': ('norm.weight', 'output_norm.weight', None),
    'lm_head.weight': ('output.weight', 'output.weight', 0),
}


def to_interleaved(w, n_heads):
    """HF rotate-half rows -> Meta/llama.cpp interleaved rows (llama.cpp's LlamaModel.permute)."""
    w = np.asarray(w)
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_interleaved(w, n_heads):
    """Meta -> HF, as transformers' convert_llama_weights_to_hf permute()."""
    w = np.asarray(w)
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def meta_state(hf_model):
    """The whole model as one Meta-named, Meta-layout state dict (fp32)."""
    cfg, sd = hf_model.config, hf_model.state_dict()
    heads = {'self_attn.q_proj.weight': cfg.num_attention_heads, 'self_attn.k_proj.weight': cfg.num_key_value_heads}
    state = {}
    for i in range(cfg.num_hidden_layers):
        for hf, (meta, _, _) in BLOCK.items():
            w = sd[f'model.layers.{i}.{hf}'].float()
            if hf in heads:
                w = torch.from_numpy(to_interleaved(w.numpy(), heads[hf]).copy())
            state[f'layers.{i}.{meta}'] = w
    for hf, (meta, _, _) in OUTER.items():
        state[meta] = sd.get(hf, sd['model.embed_tokens.weight']).float()
    return state


def split_dims():
    dims = {meta: dim for meta, _, dim in OUTER.values()}
    dims.update({meta: dim for meta, _, dim in BLOCK.values()})
    return dims


def write_meta(folder, hf_model, n_shards, params, extra=None):
    """consolidated.NN.pth shards split as Meta splits them, plus params.json."""
    os.makedirs(folder, exist_ok=True)
    dims = split_dims()
    shards = [dict(extra or {}) for _ in range(n_shards)]
    for name, w in meta_state(hf_model).items():
        dim = dims[name.split('.', 2)[-1] if name.startswith('layers.') else name]
        pieces = [w] * n_shards if dim is None else list(w.chunk(n_shards, dim=dim))
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    for n, shard in enumerate(shards):
        torch.save(shard, os.path.join(folder, f'consolidated.{n:02d}.pth'))
    with open(os.path.join(folder, 'params.json'), 'w') as f:
        json.dump(params, f)


def hf_params(hf_model, **overrides):
    cfg = hf_model.config
    params = {'dim': cfg.hidden_size, 'n_layers': cfg.num_hidden_layers, 'n_heads': cfg.num_attention_heads,
              'n_kv_heads': cfg.num_key_value_heads, 'vocab_size': cfg.vocab_size, 'multiple_of': 256,
              'norm_eps': cfg.rms_norm_eps, 'rope_theta': cfg.rope_parameters['rope_theta']}
    params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


# --- GGUF ------------------------------------------------------------------------------------------

def random_k_quant(rows, cols, qtype, seed):
    """Valid Q4_K / Q6_K bytes: random quants with small, finite f16 scales."""
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.array([0.002], dtype=np.float16).view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        data[..., 0:2], data[..., 2:4] = scale, np.array([0.001], dtype=np.float16).view(np.uint8)
    else:  # Q6_K: d is the last two bytes
        data[..., 208:210] = scale
    return data.reshape(rows, cols // block * size)


def write_gguf(path, hf_model, types, tokenizer=None, arch='llama', extra_tensors=None, extra_metadata=None):
    """A llama GGUF of hf_model; types: GGUF tensor suffix -> GGMLQuantizationType ('*' default).
    Q4_K / Q6_K tensors are random valid blocks (gguf cannot quantize to them): the returned dict
    holds, per GGUF name, the fp32 values gguf's own dequantize gives, in HF layout."""
    import gguf
    T = gguf.GGMLQuantizationType
    cfg, sd = hf_model.config, hf_model.state_dict()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    writer.add_rope_freq_base(rope.get('full_attention', rope)['rope_theta'])  # gemma3: the full layers'
    head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if getattr(cfg, 'sliding_window', None):
        writer.add_sliding_window(cfg.sliding_window)
    for key, value in {**(tokenizer or {}), **(extra_metadata or {})}.items():
        getattr(writer, key)(value)
    # llama.cpp interleaves q/k rows for the architectures it converts as Llama (qwen2/qwen3 use NEOX rope)
    heads = {'attn_q.weight': cfg.num_attention_heads, 'attn_k.weight': cfg.num_key_value_heads}
    heads = heads if arch in PERMUTED_ARCHS else {}
    names = _gguf_names(hf_model, arch)
    names = {g: hf for g, hf in names.items() if not (hf == 'lm_head.weight' and cfg.tie_word_embeddings)}
    expected = {}
    for seed, (gname, hfname) in enumerate(names.items()):
        w = sd[hfname].float().numpy()
        suffix = gname.split('.', 2)[-1] if gname.startswith('blk.') else gname
        qtype = types.get(suffix, types.get('*', T.F32)) if w.ndim == 2 else T.F32
        if suffix in heads:
            w = to_interleaved(w, heads[suffix])
        plus_one = arch in PLUS_ONE_ARCHS and gname.endswith('norm.weight')
        if plus_one:
            w = w + 1.0
        if qtype in (T.Q4_K, T.Q6_K):
            data = random_k_quant(*w.shape, qtype, seed)
        elif qtype == T.F32:
            data = np.ascontiguousarray(w, dtype=np.float32)
        else:
            data = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
        writer.add_tensor(gname, data, raw_dtype=qtype)
        values = gguf.quants.dequantize(data, qtype).reshape(w.shape) - (1.0 if plus_one else 0.0)
        expected[gname] = from_interleaved(values, heads[suffix]) if suffix in heads else values
    for gname, values in (extra_tensors or {}).items():
        writer.add_tensor(gname, np.ascontiguousarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def twin_from_gguf(hf_model, expected, arch='llama'):
    """A copy of hf_model carrying exactly the dequantized GGUF weights (the 'same weights')."""
    import copy
    twin = copy.deepcopy(hf_model)
    names = _gguf_names(hf_model, arch)
    state = {names[g]: torch.from_numpy(np.array(v, dtype=np.float32)) for g, v in expected.items()}
    twin.load_state_dict(state, strict=False)
    return twin


def _gguf_names(hf_model, arch='llama'):
    """{GGUF name: HF name} of every tensor of hf_model llama.cpp would write."""
    cfg, sd = hf_model.config, hf_model.state_dict()
    names = {OUTER[k][1]: k for k in OUTER}
    block = {**{hf: g for hf, (_, g, _) in BLOCK.items()}, **GGUF_EXTRA}
    if arch in POST_NORM_ARCHS:
        block.update(POST_NORMS)
    names.update({f'blk.{i}.{g}': f'model.layers.{i}.{hf}' for i in range(cfg.num_hidden_layers)
                  for hf, g in block.items() if f'model.layers.{i}.{hf}' in sd})
    return names
