"""The streamed head queues its whole pass without waiting for the device: no operator in it
needs a value back on the host (boolean-mask indexing does: its nonzero() syncs, per slice)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import slowllama
from conftest import random_batch

SYNCING = {'nonzero', '_local_scalar_dense', 'masked_select', 'item'}


class OperatorLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith('index') and any(getattr(i, 'dtype', None) == torch.bool for i in _indices(args)):
            name = 'boolean-mask ' + name  # expanded by nonzero() inside the kernel
        self.names.append(name)
        return func(*args, **(kwargs or {}))


def _indices(args):
    for arg in args:
        if isinstance(arg, (list, tuple)):
            yield from arg


def test_the_pass_over_the_head_slices_never_syncs(tiny_text_model, monkeypatch):
    model_dir, _, _ = tiny_text_model
    monkeypatch.setattr(slowllama.engine.plan, 'SLICE_ELEMENTS', 1)  # many slices
    model = slowllama.load(model_dir, offload='disk')
    tokens, targets = random_batch(model.cfg.vocab_size, seq=16)
    hidden = torch.randn(tokens.numel(), model.cfg.dim)
    with OperatorLog() as log:
        lse, target_logit, softmax_rows, target_rows = model.head._one_pass([hidden], [targets.reshape(-1)], True)[0]
    syncing = {name for name in log.names if name in SYNCING or name.startswith('boolean-mask')}
    assert len(log.names) > 20 and not syncing, sorted(syncing)
    # and it is still the cross-entropy: against the logits formed whole
    logits = hidden @ model.store.head_rows(0, model.cfg.vocab_size).T
    valid = targets.reshape(-1) != -100
    want = torch.nn.functional.cross_entropy(logits, targets.reshape(-1), reduction='none', ignore_index=-100)
    assert torch.allclose((lse - target_logit)[valid], want[valid], atol=1e-5)
    rows = model.store.head_rows(0, model.cfg.vocab_size)
    assert torch.allclose(target_rows[valid], rows[targets.reshape(-1)[valid]])
    assert torch.allclose(softmax_rows, torch.softmax(logits, -1) @ rows, atol=1e-5)
