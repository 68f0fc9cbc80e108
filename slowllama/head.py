"""The output head, streamed a vocabulary slice at a time: logits, and the cross-entropy loss with
its gradient, without the [tokens, vocab] logits or the [vocab, dim] head ever held whole.

The loss takes two passes over the slices: the first accumulates each position's log-sum-exp
online (running max and sum) and picks out the target logit; the second forms the gradient
softmax - onehot slice by slice and multiplies it back through the slice's rows.
"""
import torch
import torch.nn.functional as F

from .model import rms_norm

IGNORE = -100
SLICE_ELEMENTS = 1 << 21  # logits held at once: [tokens, slice rows] <= 2M floats (8 MB)
MIN_SLICE_ROWS = 64


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

    def loss_and_grad(self, x, targets):
        """Mean cross-entropy over the targets that are not IGNORE, and its gradient wrt x."""
        flat = x.reshape(-1, x.shape[-1]).detach().requires_grad_(True)
        targets = targets.reshape(-1)
        valid = targets != IGNORE
        weight = valid.float() / valid.sum().clamp(min=1)  # d loss / d (each position's loss)
        with torch.enable_grad():
            h = rms_norm(flat, self.store.head_norm(), self.cfg.norm_eps)  # [tokens, dim]
        hidden = h.detach()
        lse, target_logit = self._log_sum_exp(hidden, targets)
        loss = ((lse - target_logit) * weight).sum()
        grad_h = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
        for start, end, rows, logits in self._slice_logits(hidden):
            probs = logits.sub_(lse[:, None]).exp_()  # in place: the slice's logits are not needed again
            hit = (targets >= start) & (targets < end)
            probs[hit, targets[hit] - start] -= 1.0
            grad_h += probs.mul_(weight[:, None]).to(rows.dtype) @ rows
        h.backward(grad_h.to(h.dtype))
        return float(loss), flat.grad.view_as(x)

    @torch.no_grad()
    def loss(self, x, targets):
        """The same mean cross-entropy, without the gradient (one pass over the slices)."""
        hidden = rms_norm(x.reshape(-1, x.shape[-1]), self.store.head_norm(), self.cfg.norm_eps)
        targets = targets.reshape(-1)
        valid = targets != IGNORE
        lse, target_logit = self._log_sum_exp(hidden, targets)
        return float(((lse - target_logit) * valid).sum() / valid.sum().clamp(min=1))

    def _log_sum_exp(self, hidden, targets):
        running_max = torch.full((hidden.shape[0],), float('-inf'), device=hidden.device)
        running_sum = torch.zeros(hidden.shape[0], device=hidden.device)
        target_logit = torch.zeros(hidden.shape[0], device=hidden.device)
        for start, end, _, logits in self._slice_logits(hidden):
            new_max = torch.maximum(running_max, logits.max(dim=-1).values)
            running_sum = running_sum * torch.exp(running_max - new_max) + \
                torch.exp(logits - new_max[:, None]).sum(dim=-1)
            running_max = new_max
            hit = (targets >= start) & (targets < end)
            target_logit[hit] = logits[hit, targets[hit] - start]
        return running_max + torch.log(running_sum), target_logit

    def _slice_logits(self, hidden):
        for start, end in self._slices(hidden.shape[0]):
            rows = self.store.head_rows(start, end)  # [slice, dim]
            yield start, end, rows, F.linear(hidden, rows).float()
            self.store.release_head_rows(start, end)

    def _slices(self, tokens):
        size = max(MIN_SLICE_ROWS, SLICE_ELEMENTS // max(1, tokens))
        vocab = self.cfg.vocab_size
        return [(start, min(vocab, start + size)) for start in range(0, vocab, size)]
