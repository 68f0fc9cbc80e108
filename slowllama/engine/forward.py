"""The streamed forward's parts: a batch's embeddings and rope tables, one block with the weights
the store handed out, and every block in turn (no autograd) for logits, a loss and generation."""
from typing import NamedTuple

import torch
from torch.func import functional_call

from ..model.block import document_mask, rope_table, scale_embeddings
from .experts import fetcher
from .head import IGNORE


class Layout(NamedTuple):
    """What every block needs besides its input: the rope tables and, for packed documents, the
    attention mask (None: causal over the whole row)."""
    cos: torch.Tensor  # [seq, head_dim] or [batch, seq, head_dim]
    sin: torch.Tensor
    mask: torch.Tensor | None = None  # [batch, 1, seq, seq] bool


class Parts(NamedTuple):
    """What a pass works on: the store of frozen weights, the block skeletons (their LoRA attached),
    each block's LoRA parameters, the streamed head, and the trainable modules beside the LoRA."""
    store: object
    blocks: list           # Block modules on the meta device, one per layer
    block_params: list     # [[lora_A, lora_B, ...] of block i]
    head: object           # StreamedHead
    attached: dict         # name -> trainable module (the BCI encoder)
    trim_host_heap: object  # () -> None: hand freed heap memory back to the OS (a cpu), else nothing
    router_aux: float = 0.0  # the load-balancing loss's weight in a training step (balance.py); 0: off

    @property
    def cfg(self):
        return self.store.cfg

    @property
    def device(self):
        return self.store.device


def embed(store, tokens, prefix=None, positions=None):
    """-> embeddings [batch, seq, dim] (after the prefix, if any) and the rows' Layout."""
    x = scale_embeddings(store.cfg, store.embed(tokens))  # [batch, seq, dim]; granite, gemma scale them
    if prefix is not None:
        if positions is not None:
            raise ValueError('packed positions and a prefix cannot be combined')
        x = torch.cat([prefix.to(store.device, store.dtype), x], dim=1)
    if positions is None:
        return x, Layout(*rope_table(store.cfg, torch.arange(x.shape[1]), store.device))
    positions = positions.to(store.device)
    return x, Layout(*rope_table(store.cfg, positions, store.device), document_mask(positions))


def with_prefix_targets(targets, prefix):
    """No target for the prefix positions."""
    if prefix is None:
        return targets
    return torch.cat([targets.new_full((targets.shape[0], prefix.shape[1]), IGNORE), targets], dim=1)


def trip_input(store, batch):
    """A MicroBatch's embeddings (after its prefix) [batch, seq, dim], Layout and targets (none for
    the prefix positions), on the device."""
    tokens, targets = batch.tokens.to(store.device), batch.targets.to(store.device)
    prefix = batch.prefix.detach() if batch.prefix is not None else None
    with torch.no_grad():
        x, layout = embed(store, tokens, prefix, batch.positions)
    return x, layout, with_prefix_targets(targets, batch.prefix)


def run_block(block, weights, x, layout, cache=None, experts=None, routing=None):
    """A block with the frozen `weights` the store handed out, and its LoRA. experts: how a MoE block
    asks the store for the experts its router chose (experts.fetcher); routing: told its router's
    choices (engine/balance.py)."""
    return functional_call(block, weights, (x, layout.cos, layout.sin, cache, layout.mask, experts, routing),
                           strict=False)


def forward_blocks(store, blocks, x, layout, caches=None):
    """x through every block (no autograd), each fetched from the store while the next one travels."""
    last = len(blocks) - 1
    for i in range(last + 1):
        weights = store.block(i)
        store.prefetch(i + 1 if i < last else None)
        x = run_block(blocks[i], weights, x, layout, caches[i] if caches else None, fetcher(store, i))
        del weights
        store.release(i)
    return x
