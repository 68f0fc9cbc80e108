"""What the backward's recompute of a block can skip: the block's last product (UnreadProductWeight)."""
import torch
import torch.nn.functional as F

TAIL_WEIGHT = 'mlp.down_proj.weight'  # the block's last product: only adds and dropout come after it


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
