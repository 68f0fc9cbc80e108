"""Meta's weight layout, shared by Meta shards and GGUF: the rope-interleaved q/k rows and the
model-parallel split.

Meta (and llama.cpp, which copies it) keeps each head's rows as interleaved (real, imaginary) pairs;
Hugging Face, and we, keep the two halves apart (rotate-half rope). The permutation is per head, so
q uses n_heads and k uses n_kv_heads.
"""
import torch

from ...errors import SlowLlamaError
from .names import FUSED_TENSORS, ROPE_PERMUTED


def meta_to_hf(weight, n_heads):
    """[n_heads * head_dim, dim] interleaved rows -> halves (transformers' convert_llama_weights_to_hf)."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta(weight, n_heads):
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def block_to_hf(tensors, cfg):
    """Un-permute q/k of a block given in Meta's layout (names ours)."""
    return {name: meta_to_hf(t, getattr(cfg, ROPE_PERMUTED[name])) if name in ROPE_PERMUTED else t
            for name, t in tensors.items()}


def block_to_meta(tensors, cfg):
    return {name: hf_to_meta(t, getattr(cfg, ROPE_PERMUTED[name])) if name in ROPE_PERMUTED else t
            for name, t in tensors.items()}


def join(pieces, dim):
    """Model-parallel pieces -> one tensor: concatenated on `dim`, or the first copy if replicated."""
    if dim is None or len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces, dim=dim)


def split(tensor, dim, n_shards, name):
    """One tensor -> n_shards pieces as Meta splits them (replicated when dim is None)."""
    if dim is None:
        return [tensor] * n_shards
    if tensor.shape[dim] % n_shards:
        raise SlowLlamaError(f'shards {n_shards}: {name} has {tensor.shape[dim]} along dim {dim}, '
                             f'which does not split into {n_shards} equal parts')
    return [piece.contiguous() for piece in tensor.chunk(n_shards, dim=dim)]


# --- fused projections (Phi-3's qkv_proj and gate_up_proj) -----------------------------------

def fused_parts(cfg):
    """{HF fused name: our names it holds} for this model's family (empty for most)."""
    return FUSED_TENSORS.get(cfg.model_type, {})


def unfused_names(ours, fused):
    """Our block tensor names that a checkpoint keeps apart (not inside one of `fused`)."""
    inside = {part for parts in fused.values() for part in parts}
    return [name for name in ours if name not in inside]


def hf_block_names(cfg, ours):
    """Our block tensor names -> the HF checkpoint's names: fused tensors replace their parts."""
    return unfused_names(ours, fused_parts(cfg)) + list(fused_parts(cfg))


def split_fused(block, fused, shapes, where):
    """A block with fused tensors ({fused name: our names}) -> ours: each cut on rows into its parts."""
    block = dict(block)
    for fused, parts in fused.items():
        tensor = block.pop(fused)
        rows = [shapes[part][0] for part in parts]
        if tensor.shape[0] != sum(rows) or tuple(tensor.shape[1:]) != tuple(shapes[parts[0]][1:]):
            raise SlowLlamaError(f'{where}: {fused} has shape {tuple(tensor.shape)}, the config needs '
                                 f'{(sum(rows), *shapes[parts[0]][1:])}')
        block.update(zip(parts, tensor.split(rows, dim=0)))
    return block


def fuse(block, cfg):
    """Ours -> HF names: the parts of each fused tensor stacked on rows again."""
    block = dict(block)
    for fused, parts in fused_parts(cfg).items():
        block[fused] = torch.cat([block.pop(part) for part in parts], dim=0)
    return block
