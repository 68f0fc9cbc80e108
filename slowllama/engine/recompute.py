"""The backward of a block that did not keep its activations: recomputed from its saved input under
the forward's RNG state, skipping what its gradient never reads (the last product, UnreadProductWeight)."""
import torch
import torch.nn.functional as F

from . import forward
from .devices import set_rng_state
from .gradients import push_gradient

TAIL_WEIGHT = 'mlp.down_proj.weight'  # the block's last product: only adds and dropout come after it


def block_backward(block, params, weights, block_input, grad_output, rng_state, layout, share=1.0, experts=None,
                   balance=None):
    """Recompute a block under autograd with the forward's RNG state, push grad_output through:
    adds share * the gradients of its LoRA `params` to their .grad and returns d loss / d input.
    experts: a MoE block's fetcher (its router asks for the same experts as in the forward);
    balance: (Balance, micro-batch) when the load-balancing loss is on (its gradient enters the router)."""
    block_input = block_input.detach().requires_grad_(True)
    if TAIL_WEIGHT in weights:  # a MoE block ends in its experts' sum instead
        weights = {**weights, TAIL_WEIGHT: UnreadProductWeight(weights[TAIL_WEIGHT])}
    set_rng_state(block_input.device, rng_state)
    routed = []
    routing = balance[0].recount(balance[1], routed) if balance else None
    with torch.enable_grad():  # only the output's gradient is used
        output = forward.run_block(block, weights, block_input, layout, experts=experts, routing=routing)
    return push_gradient(params, block_input, output, grad_output, share, routed,
                         balance[0].grad(balance[1]) if balance else None)


class UnreadProductWeight(torch.Tensor):
    """The frozen weight of a block's last linear while the block is recomputed for its backward.

    That pass is run for its gradients only, and what follows the last product (LoRA's addition,
    dropout, the residual add) needs no value of it to pass a gradient back. So F.linear with this
    weight skips the product, a fifth of the block's forward FLOPs at Llama's shapes, and returns
    zeros; its backward still hands the input its gradient. torch.utils.checkpoint's early stop
    saves the same product."""

    def __new__(cls, weight):
        return torch.Tensor._make_subclass(cls, weight)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        bias = args[2] if len(args) > 2 else (kwargs or {}).get('bias')
        if func is F.linear and isinstance(args[1], cls) and bias is None:
            return _InputGradientOnly.apply(args[0], args[1].as_subclass(torch.Tensor))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class _InputGradientOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):  # x [..., in], weight [out, in] (frozen)
        ctx.save_for_backward(weight)
        return x.new_zeros(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):  # grad [..., out] -> d/dx [..., in]
        weight, = ctx.saved_tensors
        return grad @ weight, None
