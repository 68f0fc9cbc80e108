"""The Mixture-of-Experts MLP (qwen3_moe, mixtral): the dense block's MLP replaced by a router and
n_experts SwiGLU experts, experts_per_token of them run for each token, their outputs weighed by
the router's probabilities.

The experts' weights are named as the prepared folder stores them, one expert alone:
`experts.{e}.gate_proj.weight` [expert_hidden, dim], `up_proj` the same, `down_proj` [dim, expert_hidden].
Which experts a pass needs is known only once the router has run, so forward() takes `fetch_experts`:
(expert ids) -> {e: {'gate_proj.weight', 'up_proj.weight', 'down_proj.weight'}}; without it the
experts' own parameters are used (a whole model in memory, or weights a functional_call supplied).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

EXPERT_WEIGHTS = ('gate_proj.weight', 'up_proj.weight', 'down_proj.weight')


def expert_tensor_names(e):
    """Our names of expert e's weights inside a block."""
    return [f'mlp.experts.{e}.{name}' for name in EXPERT_WEIGHTS]


class Expert(nn.Module):
    """One expert's frozen weights (held for the names; the math is ExpertProjection's)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)


class ExpertProjection(nn.Module):
    """One projection of every expert: gate and up together, or down. Frozen weights come per call;
    LoRA on the experts (model/lora.py ExpertLora) replaces this module."""

    def forward(self, e, x, weights):
        """x [tokens, in] through expert e's weights (each [out_i, in]) -> [tokens, sum out_i]."""
        return torch.cat([F.linear(x, w) for w in weights], dim=-1) if len(weights) > 1 else F.linear(x, weights[0])


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.experts_per_token, cfg.norm_topk_prob
        self.fp32_weights = cfg.model_type == 'mixtral'  # mixtral weighs the experts' outputs in fp32, qwen3_moe
        #                                                  in the compute dtype (as transformers does each)
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)  # the router
        self.experts = nn.ModuleList(Expert(cfg.dim, cfg.expert_hidden_dim) for _ in range(cfg.n_experts))
        self.gate_up = ExpertProjection()
        self.down = ExpertProjection()

    def route(self, x):
        """x [tokens, dim] -> (router logits [tokens, n_experts], weights [tokens, k], expert ids [tokens, k]).
        Softmax in fp32, top-k, renormalised when norm_topk_prob, as transformers does."""
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights if self.fp32_weights else weights.to(logits.dtype), ids

    def forward(self, x, fetch_experts=None):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [tokens, dim]
        _, weights, ids = self.route(x)
        hit = torch.unique(ids).tolist()  # ascending, as transformers visits them
        fetched = fetch_experts(hit) if fetch_experts is not None else None  # the one point experts are asked for
        out = torch.zeros_like(x)
        for e in hit:
            slot, tokens = torch.where(ids.T == e)  # [k, tokens] mask: which tokens chose e, at which rank
            tensors = fetched[e] if fetched is not None else None
            y = self._expert(e, x[tokens], tensors) * weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out.reshape(shape)

    def _expert(self, e, x, tensors):
        """SwiGLU of expert e on its tokens x [n, dim]."""
        if tensors is None:
            own = self.experts[e]
            gate, up, down = own.gate_proj.weight, own.up_proj.weight, own.down_proj.weight
        else:
            gate, up, down = (tensors[name] for name in EXPERT_WEIGHTS)
        gate_out, up_out = self.gate_up(e, x, (gate, up)).split(gate.shape[0], dim=-1)
        return self.down(e, F.silu(gate_out) * up_out, (down,))
