"""Pretraining the encoder alone, before it meets the decoder: a linear head over its features reads
the words of each training trial with CTC (blank = 0), as speech BCIs decode phonemes or words before
a language model. A few hundred steps of this cost seconds, where each step through the decoder costs
a streamed pass over every block; the joint training then starts from features that already tell
the words apart, and the decoder learns to read them in far fewer steps. The head is thrown away.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import words_of


def pretrain_encoder(encoder, data, indices, steps, batch_size, lr, weight_decay, augment=None, seed=0):
    """Train `encoder` (in place) to read the words of trials `indices` by CTC; -> the loss of each step."""
    vocab = {w: n + 1 for n, w in enumerate(sorted({w for i in indices for w in words_of(data.texts[i])}))}
    device = encoder.channel_mean.device
    head = nn.Linear(encoder.cfg.d_enc, len(vocab) + 1).to(device)
    optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=lr,
                                  weight_decay=weight_decay)
    order = torch.Generator().manual_seed(seed)
    encoder.train()
    losses = []
    for _ in range(steps):
        picks = [indices[int(i)] for i in torch.randint(len(indices), (batch_size,), generator=order)]
        signals = torch.from_numpy(data.signals[sorted(picks)].copy())
        targets = [torch.tensor([vocab[w] for w in words_of(data.texts[i])]) for i in sorted(picks)]
        log_probs = head(encoder.features(signals, augment)).log_softmax(-1).transpose(0, 1)  # [P, batch, V]
        loss = F.ctc_loss(log_probs, torch.cat(targets).to(device),
                          torch.full((len(picks),), log_probs.shape[0], dtype=torch.long),
                          torch.tensor([len(t) for t in targets]), zero_infinity=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses
