"""The Python API: slowllama.prepare(...) and slowllama.load(...)."""
import torch

from .engine.devices import compute_dtype, resolve_device
from .engine.placement import open_store
from .engine.streamed import StreamedModel
from .errors import SlowLlamaError
from .model.lora import LoraConfig
from .weights.formats import prepare
from .weights.formats.peft import read_peft_adapter
from .weights.prepared import parse_dtype

__all__ = ['load', 'prepare']


def load(model_dir, device='cpu', dtype=torch.float32, lora=None, adapter=None, offload='auto',
         dropout=0.0, verify=True, max_device_mem=None, max_ram=None, batch_hint=(4, 512),
         **engine_options):
    """A prepared model ready for logits / backward / generate, with LoRA adapters attached.

    `adapter`: a PEFT-layout folder to start from; its rank, alpha and targets win over `lora`
    (as PeftModel.from_pretrained does); LoRA dropout comes from `lora` when given.
    """
    device = resolve_device(device)
    dtype = compute_dtype(device, parse_dtype(dtype))
    state = None
    if adapter is not None:
        saved_cfg, state = read_peft_adapter(adapter, model_dir)
        lora = LoraConfig(saved_cfg.rank, saved_cfg.alpha, lora.dropout if lora else saved_cfg.dropout,
                          saved_cfg.targets)
    lora = lora or LoraConfig()
    if not isinstance(lora, LoraConfig):
        raise SlowLlamaError('lora must be a slowllama.LoraConfig')
    store = open_store(model_dir, device, dtype, offload, verify=verify, max_device_mem=max_device_mem,
                       max_ram=max_ram, batch_hint=batch_hint)
    model = StreamedModel(store, lora, dropout=dropout, **engine_options)
    if state is not None:
        model.load_adapter_state(state, where=str(adapter))
    return model
