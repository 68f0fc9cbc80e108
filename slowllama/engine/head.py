"""The output head, streamed a vocabulary slice at a time: logits, and the cross-entropy loss with
its gradient, without the [tokens, vocab] logits or the [vocab, dim] head ever held whole.

The loss and its gradient take one pass over the slices, each slice's logits formed once: each
position's log-sum-exp is accumulated online (running max and sum), and so is softmax @ rows, the
gradient's big term, rescaled whenever the running max grows (the flash-attention trick).
"""
import torch
import torch.nn.functional as F

from ..model.block import rms_norm
from ..weights.plan import head_slice_rows

IGNORE = -100


class StreamedHead:
    def __init__(self, store):
        self.store, self.cfg = store, store.cfg

    def logits(self, x):
        """x [..., dim] -> float32 logits [..., vocab]."""
        h = rms_norm(x, self.store.head_norm(), self.cfg.norm_eps).reshape(-1, x.shape[-1])
        out = torch.empty(h.shape[0], self.cfg.vocab_size, device=h.device, dtype=torch.float32)
        for start, end in self._slices(h.shape[0]):
            out[:, start:end] = F.linear(h, self.store.head_rows(start, end)).float()
            self.store.release_head_rows(start, end)
        return out.view(*x.shape[:-1], self.cfg.vocab_size)

    def loss_and_grad(self, x, targets, weigh=None):
        """Mean cross-entropy over the targets that are not IGNORE, and its gradient wrt x.

        weigh: another loss on the same per-token log-probs, e.g. DPO's on their per-row sums:
        weigh(logps [batch, seq], 0 where IGNORE) -> (loss, d loss / d each position's cross-entropy
        [batch, seq]); the gradient pass is the same, only the per-position weights change."""
        flat = x.reshape(-1, x.shape[-1]).detach().requires_grad_(True)
        targets = targets.reshape(-1)
        valid = targets != IGNORE
        weight = valid.float() / valid.sum().clamp(min=1)  # d loss / d (each position's loss)
        with torch.enable_grad():
            h = rms_norm(flat, self.store.head_norm(), self.cfg.norm_eps)  # [tokens, dim]
        lse, target_logit, softmax_rows, target_rows = self._one_pass(h.detach(), targets, gradient=True)
        if weigh is None:
            loss = ((lse - target_logit) * weight).sum()
        else:
            logps = torch.where(valid, target_logit - lse, 0.0).view(x.shape[:-1])
            loss, weight = weigh(logps)
            weight = weight.reshape(-1).float() * valid
        # d loss / d h = (softmax - onehot) @ head rows, weighted per position
        h.backward(((softmax_rows - target_rows) * weight[:, None]).to(h.dtype))
        return float(loss), flat.grad.view_as(x)

    @torch.no_grad()
    def loss(self, x, targets):
        """The same mean cross-entropy, without the gradient."""
        hidden = rms_norm(x.reshape(-1, x.shape[-1]), self.store.head_norm(), self.cfg.norm_eps)
        targets = targets.reshape(-1)
        valid = targets != IGNORE
        lse, target_logit, _, _ = self._one_pass(hidden, targets, gradient=False)
        return float(((lse - target_logit) * valid).sum() / valid.sum().clamp(min=1))

    @torch.no_grad()
    def token_logprobs(self, x, targets):
        """x [batch, seq, dim] -> float32 log-prob of each target [batch, seq], 0 where IGNORE."""
        hidden = rms_norm(x.reshape(-1, x.shape[-1]), self.store.head_norm(), self.cfg.norm_eps)
        targets = targets.reshape(-1)
        lse, target_logit, _, _ = self._one_pass(hidden, targets, gradient=False)
        return torch.where(targets != IGNORE, target_logit - lse, 0.0).view(x.shape[:-1])

    def _one_pass(self, hidden, targets, gradient):
        """One sweep over the vocabulary slices, online as in flash attention: each position's
        log-sum-exp (running max and sum) and target logit; with `gradient`, also softmax @ rows
        (its running sum is rescaled whenever the max grows) and each target's head row."""
        tokens, dim = hidden.shape
        running_max = torch.full((tokens,), float('-inf'), device=hidden.device)
        running_sum = torch.zeros(tokens, device=hidden.device)
        target_logit = torch.zeros(tokens, device=hidden.device)
        exp_rows = torch.zeros(tokens, dim, device=hidden.device) if gradient else None
        target_rows = torch.zeros(tokens, dim, device=hidden.device) if gradient else None
        for start, end, rows, logits in self._slice_logits(hidden):
            # gather and where, not boolean-mask indexing: a mask's nonzero() waits for the device
            hit = (targets >= start) & (targets < end)  # [tokens]
            local = (targets - start).clamp(0, end - start - 1)  # [tokens], in range where not hit
            target_logit = torch.where(hit, logits.gather(1, local[:, None])[:, 0], target_logit)
            new_max = torch.maximum(running_max, logits.max(dim=-1).values)
            rescale = torch.exp(running_max - new_max)
            exp_logits = logits.sub_(new_max[:, None]).exp_()  # in place: the logits are not needed again
            running_sum = running_sum * rescale + exp_logits.sum(dim=-1)
            running_max = new_max
            if gradient:
                exp_rows.mul_(rescale[:, None]).add_((exp_logits.to(rows.dtype) @ rows).float())
                target_rows = torch.where(hit[:, None], rows.index_select(0, local).float(), target_rows)
        lse = running_max + torch.log(running_sum)
        return lse, target_logit, exp_rows / running_sum[:, None] if gradient else None, target_rows

    def _slice_logits(self, hidden):
        for start, end in self._slices(hidden.shape[0]):
            rows = self.store.head_rows(start, end)  # [slice, dim]
            yield start, end, rows, F.linear(hidden, rows).float()
            self.store.release_head_rows(start, end)

    def _slices(self, tokens):
        size = head_slice_rows(tokens)  # the planner's number
        vocab = self.cfg.vocab_size
        return [(start, min(vocab, start + size)) for start in range(0, vocab, size)]
