"""DPO's objective through the streamed engine: the sigmoid loss of Rafailov et al. on each answer's
summed log-probability, as trl's DPOTrainer defines it (loss_type='sigmoid'), its metrics under trl's
names, and the reference log-probabilities, computed once and kept in the run folder.

    loss = -log sigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)))

averaged over pairs. Its gradient wrt an answer's summed log-prob is one number per sequence, so the
chosen and rejected rows go through one streamed forward and manual backward together, and that
number becomes the weight of each of the row's tokens in the head's cross-entropy gradient
(StreamedModel.backward's `weigh`): no [tokens, vocab] logits, no second backward.
"""
import contextlib
import hashlib
import os

import torch
import torch.nn.functional as F

from ..data.preference import collate_pairs
from ..engine.trip import MicroBatch
from ..errors import SlowLlamaError
from ..progress import progress
from ..weights.files import SafetensorsFile, sha256_file, write_safetensors

REFERENCE_FILE = 'reference_logps.safetensors'
REFERENCE_FORMAT = 1


def dpo_loss(policy, reference, beta):
    """policy, reference [pairs, 2] summed log-probs (chosen, rejected) -> (mean loss, trl's metrics)."""
    logratios = policy - reference.to(policy)                  # [pairs, 2]
    loss = -F.logsigmoid(beta * (logratios[:, 0] - logratios[:, 1])).mean()
    rewards = beta * logratios.detach()
    metrics = {'rewards/chosen': rewards[:, 0].mean(), 'rewards/rejected': rewards[:, 1].mean(),
               'rewards/accuracies': (rewards[:, 0] > rewards[:, 1]).float().mean(),
               'rewards/margins': (rewards[:, 0] - rewards[:, 1]).mean(),
               'logps/chosen': policy[:, 0].detach().mean(), 'logps/rejected': policy[:, 1].detach().mean()}
    return loss, {k: float(v) for k, v in metrics.items()}


def sequence_logps(token_logps):
    """[pairs * 2, seq] per-token log-probs (0 where not learned) -> [pairs, 2] summed per answer."""
    return token_logps.sum(dim=-1).view(-1, 2)


def train_step(model, batch, beta):
    """One PairBatch as the MicroBatch the streamed forward and backward take: its weigh turns the
    head's per-token log-probs into the DPO loss and its gradient; its metrics are trl's."""
    tokens, targets = batch.flat()
    found = {}

    def weigh(token_logps):  # [pairs * 2, seq]
        policy = sequence_logps(token_logps).detach().requires_grad_(True)  # [pairs, 2]
        with torch.enable_grad():
            loss, found['metrics'] = dpo_loss(policy, batch.reference.to(policy.device), beta)
            loss.backward()
        # the head's weights are d loss / d (each token's cross-entropy) = - d loss / d log-prob
        return loss.detach(), -policy.grad.reshape(-1, 1).expand_as(token_logps)

    return MicroBatch(tokens, targets, weigh=weigh, metrics=lambda: found['metrics'], mask=batch.flat_mask())


@torch.no_grad()
def eval_step(model, batch, beta):
    """The same loss and metrics in eval mode, without gradients."""
    policy = sequence_logps(model.token_logprobs(*batch.flat()))
    loss, metrics = dpo_loss(policy, batch.reference.to(policy.device), beta)
    return {'loss': float(loss), **metrics}


# --- the reference log-probs ---------------------------------------------------------------------

def compute_reference(model, pairs, batch_size, pad_id, lora_off=True, group=None, stream=None):
    """[pairs, 2] summed log-probs of the reference model: the model with its LoRA switched off (a
    fresh adapter), or as loaded (an adapter to start from, which is then the reference, as in trl).
    Under torchrun each process computes a share of the batches and they are gathered."""
    rank, world = (group.rank, group.world) if group is not None else (0, 1)
    starts = list(range(0, len(pairs), batch_size))
    mine = {}
    with model.lora_disabled() if lora_off else contextlib.nullcontext():
        for start in progress(starts[rank::world], desc='reference log-probs', unit='batch', file=stream):
            batch = collate_pairs(pairs[start:start + batch_size], pad_id)
            mine[start] = sequence_logps(model.token_logprobs(*batch.flat())).cpu()
    shares = group.gather(mine) if group is not None else [mine]
    found = {start: logps for share in shares for start, logps in share.items()}
    if not starts:
        return torch.zeros(0, 2)
    return torch.cat([found[start] for start in starts])


def fingerprint(pairs_fingerprint, model_dir, adapter_dir=None):
    """What the reference log-probs depend on: the pairs' tokens, the base model (its manifest holds a
    sha256 per file) and the adapter to start from, if any."""
    digest = hashlib.sha256(pairs_fingerprint.encode())
    files = [os.path.join(str(model_dir), 'manifest.json')]
    if adapter_dir is not None:
        files += [os.path.join(str(adapter_dir), name) for name in sorted(os.listdir(str(adapter_dir)))
                  if name.endswith(('.safetensors', '.json'))]
    for path in files:
        digest.update(os.path.basename(path).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def read_reference(run_dir, fingerprint):
    """{'train', 'val'} [pairs, 2] from the run folder, or None when absent or made for other data,
    another model or another starting adapter (the fingerprint differs)."""
    path = os.path.join(str(run_dir), REFERENCE_FILE)
    if not os.path.exists(path):
        return None
    try:
        saved = SafetensorsFile(path)
    except SlowLlamaError:
        return None  # a damaged file: computed again
    if saved.metadata.get('fingerprint') != fingerprint or set(saved.names()) != {'train', 'val'}:
        return None
    return {name: saved.tensor(name).clone() for name in ('train', 'val')}


def write_reference(run_dir, fingerprint, reference):
    os.makedirs(str(run_dir), exist_ok=True)
    write_safetensors(os.path.join(str(run_dir), REFERENCE_FILE), reference,
                      metadata={'fingerprint': fingerprint, 'format': str(REFERENCE_FORMAT)})


def attach_reference(pairs, logps):
    for pair, (chosen, rejected) in zip(pairs, logps.tolist()):
        pair.reference = (chosen, rejected)
