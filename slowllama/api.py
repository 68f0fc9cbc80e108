"""The Python API: slowllama.prepare(...) and slowllama.load(...)."""
import dataclasses

import torch

from .engine.devices import compute_dtype, resolve_device
from .engine.options import EngineOptions
from .engine.placement import open_store
from .engine.streamed import StreamedModel
from .errors import SlowLlamaError
from .model.lora import LoraConfig
from .weights.formats import prepare
from .weights.formats.peft import read_peft_adapter
from .weights.prepared import parse_dtype

__all__ = ['EngineOptions', 'load', 'prepare']


def load(model_dir, device='cpu', dtype=torch.float32, lora=None, adapter=None, offload=None, dropout=0.0,
         verify=True, options=None, **engine_settings):
    """A prepared model ready for logits / backward / generate, with LoRA adapters attached.

    `adapter`: a PEFT-layout folder to start from; its rank, alpha and targets win over `lora`
    (as PeftModel.from_pretrained does); LoRA dropout comes from `lora` when given.
    `options`: the engine's settings (EngineOptions: offload, memory caps, keep_activations,
    micro_batches_per_trip, the step's grad_accum and shape); `offload=` and EngineOptions' other
    fields given as keywords are taken too, over `options`.
    """
    options = engine_options(options, offload, engine_settings)
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
    store = open_store(model_dir, device, dtype, options, verify=verify)
    model = StreamedModel(store, lora, dropout=dropout, options=options)
    if state is not None:
        model.load_adapter_state(state, where=str(adapter))
    return model


def engine_options(options, offload, settings):
    """EngineOptions from `options` (or the defaults) with the keywords given over it."""
    if options is not None and not isinstance(options, EngineOptions):
        raise SlowLlamaError('options must be a slowllama.EngineOptions')
    fields = {field.name for field in dataclasses.fields(EngineOptions)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise TypeError(f'load() got unexpected keyword argument(s): {", ".join(unknown)}')
    given = settings | ({'offload': offload} if offload is not None else {})
    return dataclasses.replace(options or EngineOptions(), **given)
