"""The load-balancing loss in the streamed step, when the router trains (`router` among the LoRA
targets): what transformers adds to a forward's loss when output_router_logits is set,
router_aux_loss_coef times load_balancing_loss_func over every layer's router logits.

Its value needs every block's routing, known only after the forward over all of them; its gradient
is then known per block without any graph across blocks (model/moe.py RouterLoad): each micro-batch
tallies its routing in the forward, its loss gains coef x the tally's loss, and each block's backward
pushes coef x RouterLoad.grad() into that block's router probability sums beside the gradient at the
block's output. As transformers computes it per forward call, each micro-batch has its own tally,
whatever trip it rides in."""
import torch

from ..model.moe import RouterLoad


class Balance:
    """The load-balancing terms of one trip's micro-batches (nothing when coef is 0)."""

    def __init__(self, coef, n_experts, batches):
        self.coef = coef if n_experts else 0.0
        self.loads = [RouterLoad(n_experts, counted_positions(b)) for b in batches] if self.coef else None

    def tally(self, k, kept=None):
        """The forward's routing callback for micro-batch k (None when off); a kept block's prob sums
        are also appended to `kept`, its graph's second end."""
        if self.loads is None:
            return None

        def routing(probs, ids):
            sums = self.loads[k].add(probs, ids)
            if kept is not None:
                kept.append(sums)
        return routing

    def recount(self, k, found):
        """The recomputed backward's routing callback: the block's prob sums into `found`, nothing tallied."""
        if self.loads is None:
            return None
        return lambda probs, ids: found.append(self.loads[k].block_sums(probs, ids)[0])

    def with_losses(self, losses):
        """Each micro-batch's loss with coef x its load-balancing loss, as transformers reports it."""
        if self.loads is None:
            return losses
        return [loss + self.coef * load.loss() for loss, load in zip(losses, self.loads)]

    def grad(self, k):
        """d loss_k / d (a block's prob sums), or None when off."""
        return None if self.loads is None or self.loads[k].counts is None else self.coef * self.loads[k].grad()


def counted_positions(batch):
    """[batch, positions] 1 where the load-balancing loss counts the position (transformers' attention
    mask: padding 0), the prefix's positions counted; None: every position."""
    mask = batch.mask
    if mask is None or batch.prefix is None:
        return mask
    return torch.cat([mask.new_ones(mask.shape[0], batch.prefix.shape[1]), mask], dim=1)
