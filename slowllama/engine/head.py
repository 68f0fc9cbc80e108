"""The output head, streamed a vocabulary slice at a time: logits, and the cross-entropy loss with
its gradient, without the [tokens, vocab] logits or the [vocab, dim] head ever held whole.

The loss and its gradient take one pass over the slices, each slice's logits formed once: each
position's log-sum-exp is accumulated online (running max and sum), and so is softmax @ rows, the
gradient's big term, rescaled whenever the running max grows (the flash-attention trick).
"""
import torch
import torch.nn.functional as F

from ..model.block import rms_norm
from .plan import head_slice_rows

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
        return self.losses_and_grads([x], [targets], [weigh])[0]

    def losses_and_grads(self, xs, targets, weighs):
        """loss_and_grad of several micro-batches, the head read once for all: each slice of it
        serves every micro-batch in turn, with the arithmetic each would have alone."""
        norm = self.store.head_norm()
        flats, hidden = [], []
        for x in xs:
            flat = x.reshape(-1, x.shape[-1]).detach().requires_grad_(True)
            with torch.enable_grad():
                hidden.append(rms_norm(flat, norm, self.cfg.norm_eps))  # [tokens, dim]
            flats.append(flat)
        flat_targets = [t.reshape(-1) for t in targets]
        sums = self._one_pass([h.detach() for h in hidden], flat_targets, gradient=True)
        results = []
        for x, flat, h, t, weigh, (lse, target_logit, softmax_rows, target_rows) in zip(
                xs, flats, hidden, flat_targets, weighs, sums):
            valid = t != IGNORE
            weight = valid.float() / valid.sum().clamp(min=1)  # d loss / d (each position's loss)
            if weigh is None:
                loss = ((lse - target_logit) * weight).sum()
            else:
                logps = torch.where(valid, target_logit - lse, 0.0).view(x.shape[:-1])
                loss, weight = weigh(logps)
                weight = weight.reshape(-1).float() * valid
            # d loss / d h = (softmax - onehot) @ head rows, weighted per position
            h.backward(((softmax_rows - target_rows) * weight[:, None]).to(h.dtype))
            results.append((float(loss), flat.grad.view_as(x)))
        return results

    @torch.no_grad()
    def loss(self, x, targets):
        """The same mean cross-entropy, without the gradient."""
        hidden = rms_norm(x.reshape(-1, x.shape[-1]), self.store.head_norm(), self.cfg.norm_eps)
        targets = targets.reshape(-1)
        valid = targets != IGNORE
        lse, target_logit, _, _ = self._one_pass([hidden], [targets], gradient=False)[0]
        return float(((lse - target_logit) * valid).sum() / valid.sum().clamp(min=1))

    @torch.no_grad()
    def token_logprobs(self, x, targets):
        """x [batch, seq, dim] -> float32 log-prob of each target [batch, seq], 0 where IGNORE."""
        hidden = rms_norm(x.reshape(-1, x.shape[-1]), self.store.head_norm(), self.cfg.norm_eps)
        targets = targets.reshape(-1)
        lse, target_logit, _, _ = self._one_pass([hidden], [targets], gradient=False)[0]
        return torch.where(targets != IGNORE, target_logit - lse, 0.0).view(x.shape[:-1])

    def _one_pass(self, hiddens, targets, gradient):
        """One sweep over the vocabulary slices for every hidden [tokens, dim] (and its targets),
        online as in flash attention: each position's log-sum-exp (running max and sum) and target
        logit; with `gradient`, also softmax @ rows (its running sum is rescaled whenever the max
        grows) and each target's head row. Hiddens with as many tokens share the sweep (the slices
        are sized by the token count); -> [(lse, target logit, softmax @ rows, target rows)]."""
        sweeps = {}
        for n, h in enumerate(hiddens):
            sweeps.setdefault(h.shape[0], []).append(n)
        found = [None] * len(hiddens)
        for tokens, members in sweeps.items():
            states = [_OnlineSoftmax(hiddens[n], targets[n], gradient) for n in members]
            for start, end in self._slices(tokens):
                rows = self.store.head_rows(start, end)  # [slice, dim]
                for state in states:
                    state.add(start, end, rows)
                self.store.release_head_rows(start, end)
            for n, state in zip(members, states):
                found[n] = state.result()
        return found

    def _slices(self, tokens):
        size = head_slice_rows(tokens)  # the planner's number
        vocab = self.cfg.vocab_size
        return [(start, min(vocab, start + size)) for start in range(0, vocab, size)]


class _OnlineSoftmax:
    """One hidden's running log-sum-exp over the vocabulary slices seen so far (and, with gradient,
    softmax @ rows and the target rows)."""

    def __init__(self, hidden, targets, gradient):
        tokens, dim = hidden.shape
        self.hidden, self.targets, self.gradient = hidden, targets, gradient
        self.running_max = torch.full((tokens,), float('-inf'), device=hidden.device)
        self.running_sum = torch.zeros(tokens, device=hidden.device)
        self.target_logit = torch.zeros(tokens, device=hidden.device)
        self.exp_rows = torch.zeros(tokens, dim, device=hidden.device) if gradient else None
        self.target_rows = torch.zeros(tokens, dim, device=hidden.device) if gradient else None

    def add(self, start, end, rows):
        logits = F.linear(self.hidden, rows).float()  # [tokens, slice]
        # gather and where, not boolean-mask indexing: a mask's nonzero() waits for the device
        hit = (self.targets >= start) & (self.targets < end)  # [tokens]
        local = (self.targets - start).clamp(0, end - start - 1)  # [tokens], in range where not hit
        self.target_logit = torch.where(hit, logits.gather(1, local[:, None])[:, 0], self.target_logit)
        new_max = torch.maximum(self.running_max, logits.max(dim=-1).values)
        rescale = torch.exp(self.running_max - new_max)
        exp_logits = logits.sub_(new_max[:, None]).exp_()  # in place: the logits are not needed again
        self.running_sum = self.running_sum * rescale + exp_logits.sum(dim=-1)
        self.running_max = new_max
        if self.gradient:
            self.exp_rows.mul_(rescale[:, None]).add_((exp_logits.to(rows.dtype) @ rows).float())
            self.target_rows = torch.where(hit[:, None], rows.index_select(0, local).float(), self.target_rows)

    def result(self):
        lse = self.running_max + torch.log(self.running_sum)
        softmax_rows = self.exp_rows / self.running_sum[:, None] if self.gradient else None
        return lse, self.target_logit, softmax_rows, self.target_rows
