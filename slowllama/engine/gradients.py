"""Where the backward's gradients go: through one block's graph into its LoRA's .grad (recomputed
and kept blocks alike), and from a prefix into the modules that made it."""
import torch


def push_gradient(params, block_input, output, grad_output, share, routed=(), routed_grad=None):
    """grad_output through a block's graph from block_input to output: share * the gradients of the
    block's LoRA `params` into their .grad; returns d loss / d block_input. routed: the block's router
    probability sums, which receive routed_grad (the load-balancing loss's, engine/balance.py)."""
    ends, grads_at = [output], [grad_output]
    if routed_grad is not None:
        ends += list(routed)
        grads_at += [routed_grad.to(r.dtype) for r in routed]
    grads = torch.autograd.grad(ends, [block_input, *params], grads_at, allow_unused=True)
    add_gradients(params, grads[1:], share)
    return grads[0]


def prefix_backward(attached, prefix, grad, share=1.0):
    """share * d loss / d prefix into what made the prefix: the attached modules' parameters add
    it to their .grad (a prefix that is a leaf of its own gets the plain gradient)."""
    params = [p for module in attached.values() for p in module.parameters() if p.requires_grad]
    held = [p.grad for p in params]
    for p in params:
        p.grad = None
    prefix.backward(grad.to(prefix.dtype))
    grads = [p.grad for p in params]
    for p, before in zip(params, held):
        p.grad = before
    add_gradients(params, grads, share)


def add_gradients(params, grads, share):
    """p.grad += share * g for each parameter that has a gradient: the step's weighted sum of its
    micro-batches' gradients, formed in their order (the same arithmetic as summing them afterwards)."""
    for p, g in zip(params, grads):
        if g is not None:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(g, alpha=share)
