"""The step's schedule, in one place: which block is on the device, which micro-batches pass through
it, what is fetched next and what is released, which activations are kept and which recomputed.

The numbers it follows were decided before the step, once: the StepPlan (planner.py, made when the
model loads from its EngineOptions; the arithmetic in plan.py) says how many micro-batches travel
together (`trip`), how many of the last blocks keep their activations (`kept_blocks`) and how much
room the saved inputs have on the device and in RAM before they spill to disk (stash.py); where
each block lives (device, RAM, disk) was decided at load too (placement.py). What the trip works on
are the model's parts (forward.Parts): the store that fetches a block's frozen weights, the block
skeletons with their LoRA, the streamed head (head.py: its vocabulary slices, plan.head_slice_rows),
the attached modules. Each phase is a function of those parts: a block's forward (forward.py), a
kept block's forward and backward (kept.py), a recomputed block's backward (recompute.py), the
gradients' way into .grad and into a prefix's makers (gradients.py).

The micro-batches of an optimizer step travel in trips.
Within a trip each block is fetched once for the forward of all its micro-batches and once more for
their backward, so a block's weights cross to the device twice a trip, however many micro-batches
ride along:

    forward   block 0 .. L-1   fetch block i (block i+1 starts travelling meanwhile)
                               each micro-batch k: x_k = block_i(x_k), keeping either
                                 - x_k and its RNG state (the block will be recomputed), or
                                 - for the last blocks, as many as memory allows (the plan's
                                   kept_blocks): the graph autograd builds, activations only (kept.py)
                               release block i, but the last two: the backward starts with them
    head      read once, a vocabulary slice at a time, for every micro-batch k: loss_k, d loss_k / d x_k
              (loss_k gains the load-balancing loss of its routing when the router trains: balance.py)
    backward  block L-1 .. 0   fetch block i (block i-1 starts travelling meanwhile)
                               each micro-batch k: its kept graph, or restore its RNG state and
                               recompute block_i(x_k) under autograd; push the gradient through:
                               d/dx_k goes down, share_k times the LoRA gradients is added to .grad
                               release block i
    prefix    each micro-batch k with a prefix that requires grad: share_k times its gradient into
              what made it (the BCI encoder)

Each micro-batch draws its dropout masks from a stream of its own (rng_streams), so a micro-batch's
masks are those it would draw alone from its stream's state, whatever trip it rides in: the trip
size changes the traffic, never the result.
"""
from dataclasses import dataclass

import torch

from . import forward, kept, recompute
from .balance import Balance
from .devices import get_rng_state, seeded_rng_state, set_rng_state
from .experts import fetcher
from .gradients import prefix_backward
from .stash import InputStash

TRIM_EVERY_BLOCKS = 4  # on a CPU, hand freed heap memory back to the OS this often in the backward


@dataclass
class MicroBatch:
    """What one micro-batch sends through the model."""
    tokens: torch.Tensor                   # [batch, seq]
    targets: torch.Tensor                  # [batch, seq]: the token after each position, -100 ignored
    positions: torch.Tensor | None = None  # [batch, seq] packed documents (see StreamedModel.logits)
    prefix: torch.Tensor | None = None     # [batch, p, dim] embeddings before the tokens; when it requires
    #                                        grad, its gradient flows back into what made it
    weigh: object = None                   # another loss on the per-token log-probs (StreamedHead.loss_and_grad)
    metrics: object = None                 # () -> {name: float} read after the backward (DPO's rewards)
    mask: torch.Tensor | None = None       # [batch, seq] 0 at padding: left out of the load-balancing loss
    #                                        (balance.py) as transformers' attention_mask leaves it out


def rng_streams(device, count):
    """The RNG state each of `count` micro-batches starts its dropout from. The first continues the
    global stream (one micro-batch draws exactly as a plain forward would); each other one starts
    from a seed the global CPU stream draws first, one per micro-batch, in order."""
    seeds = torch.randint(0, 2 ** 62, (count - 1,)).tolist() if count > 1 else []
    return [get_rng_state(device)] + [seeded_rng_state(device, seed) for seed in seeds]


def run_step(parts, plan, batches, shares):
    """The micro-batches of one optimizer step (MicroBatch), in trips of plan.trip: adds to .grad the
    gradient of sum_k shares[k] * loss_k and returns the losses. Micro-batch k > 0 draws its dropout
    from a stream of its own (rng_streams); the global RNG ends as after micro-batch 0's forward."""
    streams = rng_streams(parts.device, len(batches))
    losses = []
    for start in range(0, len(batches), plan.trip):
        trip = slice(start, start + plan.trip)
        trip_streams = streams[trip]
        stash = InputStash(parts.device, plan.stash_device_bytes, plan.stash_ram_bytes)
        try:
            losses += run_trip(parts, batches[trip], shares[trip], trip_streams, stash, plan.kept_blocks)
        finally:
            stash.close()
        streams[trip] = trip_streams
    set_rng_state(parts.device, streams[0])  # as if the backward drew nothing, like autograd
    return losses


def run_trip(parts, batches, shares, streams, stash, kept_blocks=0):
    """One trip of `batches` (MicroBatch) through the model's parts. shares[k]: the weight of
    micro-batch k's mean loss in the step's loss; streams[k]: its RNG state, advanced in place;
    stash: where the saved inputs wait (an InputStash); the last `kept_blocks` blocks keep their
    activations (their graph, kept.py) instead. Returns each micro-batch's loss."""
    store, blocks, params, device = parts.store, parts.blocks, parts.block_params, parts.device
    last = len(blocks) - 1
    inputs = [forward.trip_input(store, batch) for batch in batches]  # (x [batch, seq, dim], layout, targets)
    hidden = [x for x, _, _ in inputs]
    rng_before = {}  # (block, micro-batch) -> the RNG state its forward drew from (recomputed blocks)
    graphs = {}  # (block, micro-batch) -> KeptBlock (blocks that keep their activations)
    balance = Balance(parts.router_aux, parts.cfg.n_experts, batches)  # the load-balancing loss, when on

    for i in range(last + 1):  # forward
        weights = store.block(i)
        store.prefetch(i + 1 if i < last else last - 1)
        names = kept.WeightNames(weights) if i > last - kept_blocks else None
        for k, (_, layout, _) in enumerate(inputs):
            set_rng_state(device, streams[k])
            if names is not None:
                hidden[k], graphs[i, k] = kept.run_block_keeping(blocks[i], weights, names, hidden[k], layout,
                                                                 fetcher(store, i, names), (balance, k))
            else:
                rng_before[i, k] = streams[k]
                stash.put((i, k), hidden[k])
                with torch.no_grad():
                    hidden[k] = forward.run_block(blocks[i], weights, hidden[k], layout, experts=fetcher(store, i),
                                                  routing=balance.tally(k))
            streams[k] = get_rng_state(device)
        del weights, names
        if i < last - 1:
            store.release(i)
    parts.trim_host_heap()

    # the head, read once for every micro-batch: the losses and the gradients at the last block's output
    found = parts.head.losses_and_grads(hidden, [targets for _, _, targets in inputs], [b.weigh for b in batches])
    losses, grads = balance.with_losses([loss for loss, _ in found]), [grad for _, grad in found]
    del hidden, found

    for i in reversed(range(last + 1)):  # backward
        weights = store.block(i)
        store.prefetch(i - 1)
        for k, (_, layout, _) in enumerate(inputs):
            if (i, k) in graphs:
                grads[k] = kept.kept_backward(params[i], weights, graphs.pop((i, k)), grads[k], shares[k],
                                              balance.grad(k))
            else:
                grads[k] = recompute.block_backward(blocks[i], params[i], weights, stash.pop((i, k)), grads[k],
                                                    rng_before.pop((i, k)), layout, shares[k], fetcher(store, i),
                                                    (balance, k))
        del weights
        store.release(i)
        if i % TRIM_EVERY_BLOCKS == 0 and i <= last - kept_blocks:  # kept blocks free what the slack keeps
            parts.trim_host_heap()

    for batch, grad, share in zip(batches, grads, shares):  # what made the prefixes
        if batch.prefix is not None and batch.prefix.requires_grad:
            prefix_backward(parts.attached, batch.prefix, grad[:, :batch.prefix.shape[1]], share)
    return losses
