"""Blocks that keep their activations: the forward runs under autograd and the graph it builds is
kept until the backward, which is then one pass, with no recompute.

The graph would also keep the block's frozen weights (a linear saves its weight for its input's
gradient), which for a streamed block are a buffer the next block overwrites. So each saved tensor
that is a weight (or a view of one: F.linear saves the transpose) is kept as its name and view
instead, and resolved in the backward to the same weight as the store hands it out again then (that
fetch happens anyway): a block keeps its activations only, never a second copy of its weights.
"""
from typing import NamedTuple

import torch

from . import forward
from .gradients import push_gradient


class _WeightView(NamedTuple):
    """A saved tensor that is a view of the block's weight `name`."""
    name: str
    size: torch.Size
    stride: tuple
    offset: int  # storage offset from the weight's own


class WeightNames:
    """The saved-tensor hooks of one block's forward: weights out by name, back from `fetched`."""

    def __init__(self, weights):
        self.forward = weights  # {name: tensor} as the store handed them out for the forward
        self._names = {tensor.data_ptr(): name for name, tensor in weights.items()}
        self.fetched = None  # the same names, as fetched for the backward
        self.fetch_again = dict  # () -> the weights fetched during the forward beside `weights`, again

    def add(self, weights, again):
        """More weights of the block, fetched during its forward (a MoE block's chosen experts);
        again() fetches them for the backward."""
        self.forward = {**self.forward, **weights}
        self._names.update({tensor.data_ptr(): name for name, tensor in weights.items()})
        self.fetch_again = again

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor):
        name = self._names.get(tensor.data_ptr())
        if name is None or tensor.untyped_storage().data_ptr() != self.forward[name].untyped_storage().data_ptr():
            return tensor  # an activation, a LoRA parameter, a rope table: kept as it is
        weight = self.forward[name]
        return _WeightView(name, tensor.size(), tensor.stride(), tensor.storage_offset() - weight.storage_offset())

    def _unpack(self, packed):
        if not isinstance(packed, _WeightView):
            return packed
        weight = self.fetched[packed.name]
        return weight.as_strided(packed.size, packed.stride, weight.storage_offset() + packed.offset)


class KeptBlock(NamedTuple):
    """One micro-batch's pass through a block whose activations are kept."""
    input: torch.Tensor   # the block's input, a leaf that requires grad
    output: torch.Tensor  # its output, the graph's end
    names: WeightNames
    routed: list          # a MoE block's router probability sums when the load-balancing loss is on


def run_block_keeping(block, weights, names, x, layout, experts=None, balance=None):
    """A block under autograd, its graph kept for the backward (its weights by name: WeightNames)
    -> (output, detached, KeptBlock). experts: a MoE block's fetcher (experts.fetcher, told of names);
    balance: (Balance, micro-batch) when the load-balancing loss is on."""
    leaf, routed = x.detach().requires_grad_(True), []
    routing = balance[0].tally(balance[1], routed) if balance else None
    with torch.enable_grad(), names.hooks():
        output = forward.run_block(block, weights, leaf, layout, experts=experts, routing=routing)
    return output.detach(), KeptBlock(leaf, output, names, routed)


def kept_backward(params, weights, kept, grad_output, share=1.0, routed_grad=None):
    """Push grad_output through a block's kept graph, its weights resolved to this fetch: adds
    share * the gradients of its LoRA `params` to their .grad and returns d loss / d input.
    routed_grad: the load-balancing loss's gradient at the block's router (engine/balance.py)."""
    kept.names.fetched = {**weights, **kept.names.fetch_again()}  # a MoE block's experts too
    try:
        return push_gradient(params, kept.input, kept.output, grad_output, share, kept.routed, routed_grad)
    finally:
        kept.names.fetched = None
