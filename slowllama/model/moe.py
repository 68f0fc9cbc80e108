"""The Mixture-of-Experts MLP (qwen3_moe, mixtral): the dense block's MLP replaced by a router and
n_experts SwiGLU experts, experts_per_token of them run for each token, their outputs weighed by
the router's probabilities.

The experts' weights are named as the prepared folder stores them, one expert alone:
`experts.{e}.gate_proj.weight` [expert_hidden, dim], `up_proj` the same, `down_proj` [dim, expert_hidden].
Which experts a pass needs is known only once the router has run, so forward() takes `fetch_experts`:
(expert ids) -> {e: {'gate_proj.weight', 'up_proj.weight', 'down_proj.weight'}}; without it the
experts' own parameters are used (a whole model in memory, or weights a functional_call supplied).
`routing` (optional): told each pass's router probabilities and choices; RouterLoad below tallies
them for the load-balancing loss.
With --quant the fetcher hands out each expert's packed parts and says how to unpack them (its
`unpack` attribute: {name: part} -> the three weights); an expert is then unpacked only while it
computes, and autograd keeps its packed parts and its input, not its unpacked weights (_Unpacked):
a block's experts never all take the compute dtype's bytes at once.
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
        """x [tokens, dim] -> (router probabilities [tokens, n_experts] fp32, weights [tokens, k], expert
        ids [tokens, k]). Softmax in fp32, top-k, renormalised when norm_topk_prob, as transformers does."""
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights if self.fp32_weights else weights.to(logits.dtype), ids

    def forward(self, x, fetch_experts=None, routing=None):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [tokens, dim], batch-major as transformers flattens them
        probs, weights, ids = self.route(x)
        if routing is not None:
            routing(probs, ids)
        hit = torch.unique(ids).tolist()  # ascending, as transformers visits them
        fetched = fetch_experts(hit) if fetch_experts is not None else None  # the one point experts are asked for
        unpack = getattr(fetch_experts, 'unpack', None)
        out = torch.zeros_like(x)
        for e in hit:
            slot, tokens = torch.where(ids.T == e)  # [k, tokens] mask: which tokens chose e, at which rank
            tensors = fetched[e] if fetched is not None else None
            if unpack is None:
                y = self._expert(e, x[tokens], tensors)
            else:
                y = self._packed_expert(e, x[tokens], tensors, unpack)
            y = y * weights[tokens, slot, None]
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

    def _packed_expert(self, e, x, parts, unpack):
        """_expert on weights unpacked from `parts` just before, let go of right after (and again in
        the backward): what autograd keeps of it is x, the packed parts and the expert LoRA's factors."""
        names = list(parts)
        run = lambda x, packed: self._expert(e, x, unpack(dict(zip(names, packed))))  # noqa: E731
        lora = [p for p in (*self.gate_up.parameters(), *self.down.parameters()) if p.requires_grad]
        if not torch.is_grad_enabled() or not (x.requires_grad or lora):
            return run(x, [parts[n] for n in names])
        return _Unpacked.apply(run, len(names), lora, x, *(parts[n] for n in names), *lora)


class _Unpacked(torch.autograd.Function):
    """run(x, packed parts) whose unpacked weights autograd does not keep: the forward runs without a
    graph, the backward runs it again (unpacking again) and takes its gradients with respect to x and
    the LoRA parameters `lora` (passed as inputs after x and the parts, so their gradients land)."""

    @staticmethod
    def forward(ctx, run, n_parts, lora, x, *tensors):
        ctx.run, ctx.n_parts, ctx.lora = run, n_parts, lora
        ctx.save_for_backward(x, *tensors[:n_parts])  # a kept block's hooks keep the parts by name
        with torch.no_grad():
            return run(x, tensors[:n_parts])

    @staticmethod
    def backward(ctx, grad):
        x, *packed = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(ctx.needs_input_grad[3])
            out = ctx.run(leaf, packed)
        wanted = ([leaf] if leaf.requires_grad else []) + list(ctx.lora)
        grads = list(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        dx = grads.pop(0) if leaf.requires_grad else None
        return (None, None, None, dx, *([None] * ctx.n_parts), *grads)


class RouterLoad:
    """One micro-batch's routing through every MoE block of the model, as transformers' load-balancing
    loss reads it (load_balancing_loss_func over all layers' router logits together): per expert, its
    top-k choices counted and its router probabilities summed over layers x tokens, padding (mask 0)
    left out. loss = n_experts * sum_e (counts_e / rows) * (prob_sums_e / rows), rows = layers x tokens.

    The counts carry no gradient, so d loss / d (one block's prob sums) = grad() for every block:
    each block's backward adds it through its own router (what the engine does), with no graph
    across blocks."""

    def __init__(self, n_experts, mask=None):
        self.n_experts = n_experts
        self.mask = None if mask is None else mask.reshape(-1).float()  # [tokens] 1: counted, 0: padding
        self.counts = self.prob_sums = None
        self.rows = 0.0

    def block_sums(self, probs, ids):
        """One block's routing -> (prob sums [n_experts], differentiable where probs are; counts [n_experts]; rows)."""
        mask = self.mask.to(probs.device) if self.mask is not None else probs.new_ones(probs.shape[0])
        prob_sums = (probs * mask[:, None]).sum(dim=0)
        counts = probs.new_zeros(self.n_experts).scatter_add_(0, ids.reshape(-1), mask.repeat_interleave(ids.shape[1]))
        return prob_sums, counts, mask.sum().item()

    def add(self, probs, ids):
        """Tally one block's routing (its forward); returns its prob sums as block_sums does."""
        prob_sums, counts, rows = self.block_sums(probs, ids)
        with torch.no_grad():
            self.counts = counts if self.counts is None else self.counts + counts
            self.prob_sums = prob_sums.detach() if self.prob_sums is None else self.prob_sums + prob_sums.detach()
        self.rows += rows
        return prob_sums

    def loss(self):
        """The load-balancing loss of what was tallied (0.0 before any MoE block)."""
        if self.counts is None:
            return 0.0
        return self.n_experts * float((self.counts / self.rows * (self.prob_sums / self.rows)).sum())

    def grad(self):
        """d loss / d (any one block's prob sums) [n_experts]."""
        return self.n_experts * self.counts / self.rows ** 2
