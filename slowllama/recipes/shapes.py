"""Named model shapes (Hugging Face config fields) for the benchmark and the memory planner (--shape)."""
from ..errors import SlowLlamaError
from ..weights.formats.model_config import config_from_hf

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
    # google/gemma-3-1b-pt's config.json: 262k vocabulary, 5 sliding layers (window 512) to each full one
    'gemma3-1b': dict(model_type='gemma3_text', hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                      num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                      query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6, rope_theta=1e6,
                      rope_local_base_freq=10000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                      tie_word_embeddings=True),
    # Qwen3-30B-A3B's Mixture-of-Experts block (128 experts, 8 a token), beside transformers' (bench_block.py)
    '30b-a3b-block': dict(model_type='qwen3_moe', hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=1, vocab_size=151936,
                          rms_norm_eps=1e-6, max_position_embeddings=4096),
    # the whole Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B's config.json): bench --write-model writes it packed
    # from random values (about 17 GB in nf4), bench --plan plans it
    'qwen3-30b-a3b': dict(model_type='qwen3_moe', hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=48, vocab_size=151936,
                          rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1000000.0,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
}
BLOCK_ONLY = ('30b-a3b-block',)  # timed one block against transformers' decoder layer (bench_block.py)


def shape_config(name):
    """The ModelConfig of a named shape (--shape)."""
    if name not in SHAPES:
        raise SlowLlamaError(f'--shape: unknown shape {name!r} (use {", ".join(SHAPES)})')
    return config_from_hf({'model_type': 'llama', **SHAPES[name]})
