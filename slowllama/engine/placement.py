"""Where a run's frozen weights live: the engine asks the planner (plan.py) how many blocks fit on
the device and in RAM, and opens the store (weights/store.py) with those tiers."""
from ..model.config import ModelConfig
from ..model.quant import Quant
from ..weights.host_memory import (
    free_device_memory,
    free_host_memory,
    host_share,
    unified_memory,
)
from ..weights.prepared import (
    DTYPES,
    EMBED_FILE,
    HEAD_FILE,
    block_file,
    dtype_name,
    read_manifest,
)
from ..weights.store import BlockStore, uniform_tiers
from .plan import cap_budget, model_params, place_blocks


def open_store(model_dir, device, dtype, options, verify=True):
    """The BlockStore of a prepared folder with its files placed as the EngineOptions say (its
    offload, memory caps and batch_hint; see placement)."""
    manifest = read_manifest(model_dir)
    cfg = ModelConfig.from_dict(manifest['config'])
    tiers = placement(cfg, device, dtype, options.offload, manifest['dtype'], options.max_device_mem,
                      options.max_ram, options.batch_hint, Quant.from_dict(manifest.get('quant')))
    return BlockStore(model_dir, device, dtype, tiers, verify=verify, manifest=manifest)


def placement(cfg, device, dtype, offload, stored_dtype, max_device_mem=None, max_ram=None,
              batch_hint=(4, 512), quant=None):
    """{filename: 'device' | 'ram' | 'disk'}. 'auto' asks the planner how many blocks fit on the
    device and in RAM within the free memory and the max_device_mem / max_ram caps."""
    if offload != 'auto':
        return uniform_tiers(cfg, device, offload)
    blocks = [block_file(i) for i in range(cfg.n_layers)]
    if device.type == 'cpu':
        # the page cache already is the RAM tier: mmap'd blocks cost no copy when dtypes match
        tier = 'disk' if DTYPES[stored_dtype] == dtype else 'ram'
        if tier == 'ram' and _over(cfg, dtype, free_host_memory() // host_share(), max_ram):
            tier = 'disk'
        return {f: tier for f in [EMBED_FILE, HEAD_FILE] + blocks}
    ram_budget = cap_budget(free_host_memory() // host_share(), max_ram)  # torchrun: each its share
    if unified_memory(device):  # one memory: no RAM tier beside the device, host buffers count there
        ram_budget = 0
    plan = place_blocks(cfg, *batch_hint, dtype=dtype_name(dtype), quant=quant,
                        device_budget=cap_budget(free_device_memory(device), max_device_mem),
                        ram_budget=ram_budget, unified=unified_memory(device), plain_unpack=device.type == 'mps')
    tiers = {f: 'device' if i < plan.resident_blocks else 'ram' if i < plan.resident_blocks + plan.ram_blocks
             else 'disk' for i, f in enumerate(blocks)}
    everything_fits = plan.resident_blocks == cfg.n_layers
    tiers[HEAD_FILE] = 'device' if everything_fits else 'ram' if plan.ram_blocks else 'disk'
    tiers[EMBED_FILE] = 'device' if everything_fits else 'ram' if plan.ram_blocks else 'disk'
    return tiers


def _over(cfg, dtype, free, cap):
    return model_params(cfg) * dtype.itemsize > cap_budget(free, cap)

