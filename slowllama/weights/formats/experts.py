"""Mixture-of-Experts blocks in Hugging Face checkpoints, both layouts found in the wild: one tensor
per expert and projection (the hub's Qwen3-MoE and Mixtral files, names in names.HF_EXPERTS) and the
3D tensors transformers 5 holds (names.HF_FUSED_EXPERTS). Read into ours, each expert alone
('mlp.experts.{e}.gate_proj.weight' ...); written back in the hub's layout, which both transformers 4
and 5 load. GGUF: llama.cpp's router and stacked 3D expert tensors, read and written."""
import torch

from ...errors import SlowLlamaError
from ...model.names import EXPERT_PROJECTIONS, ROUTER_WEIGHT, expert_weight
from .names import GGUF_EXPERTS, GGUF_ROUTER, HF_EXPERTS, HF_FUSED_EXPERTS


def is_expert_tensor(ours):
    """The router and the experts' weights: what this module reads, not the dense block's reader."""
    return ours == ROUTER_WEIGHT or ours.startswith('mlp.experts.')


def read_hf_experts(cfg, prefix, names, get, file_of):
    """{our name: tensor} of one block's router and experts. names: every tensor name of the
    checkpoint; get(name) -> tensor; file_of(name) -> the file that holds it (for messages)."""
    fused_router, gate_up, down = (prefix + n for n in HF_FUSED_EXPERTS)
    if gate_up in names or down in names:
        tensors = _split_fused(cfg, prefix, get(gate_up) if gate_up in names else None,
                               get(down) if down in names else None, file_of(gate_up if gate_up in names else down))
        router_name = fused_router
    else:
        router, expert, theirs = HF_EXPERTS[cfg.model_type]
        router_name, tensors = prefix + router, {}
        for e in range(cfg.n_experts):
            for ours in EXPERT_PROJECTIONS:
                name = prefix + expert.format(e=e, p=theirs[ours])
                if name not in names:
                    raise SlowLlamaError(f'{file_of(prefix + router)}: {prefix.rstrip(".")} expert {e}: {name} is '
                                         'missing')
                tensors[expert_weight(e, ours)] = _checked(cfg, e, ours, get(name), name, file_of(name))
    if router_name not in names:
        raise SlowLlamaError(f'{file_of(gate_up)}: {prefix.rstrip(".")}: the router {router_name} is missing')
    router = get(router_name)
    if tuple(router.shape) != (cfg.n_experts, cfg.dim):
        raise SlowLlamaError(f'{file_of(router_name)}: {router_name} has shape {tuple(router.shape)}: the router '
                             f'must have one row per expert ({cfg.n_experts}) of width {cfg.dim}')
    return {ROUTER_WEIGHT: router, **tensors}


def _split_fused(cfg, prefix, gate_up, down, path):
    """transformers 5's [experts, 2 * hidden, dim] gate_up and [experts, dim, hidden] down -> ours."""
    experts, hidden, dim = cfg.n_experts, cfg.expert_hidden_dim, cfg.dim
    for name, tensor, shape in ((prefix + HF_FUSED_EXPERTS[1], gate_up, (experts, 2 * hidden, dim)),
                                (prefix + HF_FUSED_EXPERTS[2], down, (experts, dim, hidden))):
        if tensor is None or tuple(tensor.shape) != shape:
            got = None if tensor is None else tuple(tensor.shape)
            raise SlowLlamaError(f'{path}: {name} has shape {got}, the config needs {shape} '
                                 f'({experts} experts)')
    tensors = {}
    for e in range(experts):
        tensors[expert_weight(e, 'gate_proj')] = gate_up[e, :hidden]
        tensors[expert_weight(e, 'up_proj')] = gate_up[e, hidden:]
        tensors[expert_weight(e, 'down_proj')] = down[e]
    return tensors


def _checked(cfg, e, ours, tensor, name, path):
    shape = (cfg.dim, cfg.expert_hidden_dim) if ours == 'down_proj' else (cfg.expert_hidden_dim, cfg.dim)
    if tuple(tensor.shape) != shape:
        raise SlowLlamaError(f'{path}: expert {e}: {name} has shape {tuple(tensor.shape)}, the config needs {shape}')
    return tensor


def hf_expert_names(cfg):
    """{our name: the hub's name} of one block's router and experts (for writing)."""
    router, expert, theirs = HF_EXPERTS[cfg.model_type]
    names = {ROUTER_WEIGHT: router}
    names.update({expert_weight(e, p): expert.format(e=e, p=theirs[p])
                  for e in range(cfg.n_experts) for p in EXPERT_PROJECTIONS})
    return names


def read_gguf_experts(cfg, prefix, names, get, path):
    """{our name: tensor} of one block's router and experts from llama.cpp's ffn_gate_inp and
    ffn_{gate,up,down}_exps (3D, [experts, out, in] as torch reads them)."""
    for name in [GGUF_ROUTER, *GGUF_EXPERTS.values()]:
        if prefix + name not in names:
            raise SlowLlamaError(f'{path}: {prefix.rstrip(".")}: {prefix + name} is missing (per-expert '
                                 'ffn_*.E tensors of old Mixtral files are not read)')
    router = get(prefix + GGUF_ROUTER)
    if tuple(router.shape) != (cfg.n_experts, cfg.dim):
        raise SlowLlamaError(f'{path}: {prefix + GGUF_ROUTER} has shape {tuple(router.shape)}: the router must '
                             f'have one row per expert ({cfg.n_experts}) of width {cfg.dim}')
    tensors = {ROUTER_WEIGHT: router}
    for ours, theirs in GGUF_EXPERTS.items():
        stacked = get(prefix + theirs)
        per_expert = (cfg.dim, cfg.expert_hidden_dim) if ours == 'down_proj' else (cfg.expert_hidden_dim, cfg.dim)
        if tuple(stacked.shape) != (cfg.n_experts, *per_expert):
            raise SlowLlamaError(f'{path}: {prefix + theirs} has shape {tuple(stacked.shape)}, the config needs '
                                 f'{(cfg.n_experts, *per_expert)}')
        tensors.update({expert_weight(e, ours): stacked[e] for e in range(cfg.n_experts)})
    return tensors


def gguf_expert_shapes(cfg):
    """{llama.cpp's name: shape in torch order} of one block's router and stacked experts."""
    shapes = {GGUF_ROUTER: (cfg.n_experts, cfg.dim)}
    for ours, theirs in GGUF_EXPERTS.items():
        per_expert = (cfg.dim, cfg.expert_hidden_dim) if ours == 'down_proj' else (cfg.expert_hidden_dim, cfg.dim)
        shapes[theirs] = (cfg.n_experts, *per_expert)
    return shapes


def gguf_expert_tensors(cfg, block):
    """(llama.cpp's name, tensor) of one block's router and each projection of every expert stacked
    [experts, out, in], in gguf_expert_shapes' order; block: our names."""
    yield GGUF_ROUTER, block[ROUTER_WEIGHT]
    for ours, theirs in GGUF_EXPERTS.items():
        yield theirs, torch.stack([block[expert_weight(e, ours)] for e in range(cfg.n_experts)])
