"""The PEFT adapter as peft applies it to the transformers class of the model's family.

Most families name their projections as we do, so the adapter is written as it is. Phi-3's class
fuses q/k/v into qkv_proj and gate/up into gate_up_proj, while we train one LoRA per projection.
There the parts' LoRAs are stacked into one LoRA of the fused module, exactly: the A matrices
[r, in] stacked on rows into [parts * r, in], the B matrices [out_p, r] placed on the diagonal of a
[sum out_p, parts * r] block matrix, so B A is the parts' B_p A_p stacked on rows. Its rank is
parts * r, and peft's rank_pattern / alpha_pattern give that module rank and alpha both times parts,
keeping the scale alpha / r. (peft applies one dropout to the fused module's input where we draw
one per projection: the same model, trained slightly differently.)
"""
import os

import torch

from ..files import write_json, write_safetensors
from ..lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_key
from ..names import FUSED_TARGETS, TARGET_MODULES
from ..store import block_shapes


def peft_adapter(cfg, lora, state, base_model=''):
    """(adapter_config.json dict, {PEFT key: tensor}) for the HF class of cfg.model_type."""
    config, state = lora.to_peft(base_model), dict(state)
    fused = {module: [t for t in parts if t in lora.targets]
             for module, parts in FUSED_TARGETS.get(cfg.model_type, {}).items()}
    fused = {module: parts for module, parts in fused.items() if parts}
    if not fused:
        return config, state
    shapes = block_shapes(cfg)
    for module, targeted in fused.items():
        parts = FUSED_TARGETS[cfg.model_type][module]
        rows = [shapes[TARGET_MODULES[t] + '.weight'][0] for t in parts]
        for i in range(cfg.n_layers):
            keys = {t: (peft_key(i, TARGET_MODULES[t], 'A'), peft_key(i, TARGET_MODULES[t], 'B')) for t in targeted}
            a = torch.cat([state.pop(keys[t][0]) for t in targeted])  # [len(targeted) * r, in]
            b = torch.zeros(sum(rows), len(targeted) * lora.rank)  # block diagonal
            for n, t in enumerate(targeted):
                top = sum(rows[:parts.index(t)])
                b[top:top + rows[parts.index(t)], n * lora.rank:(n + 1) * lora.rank] = state.pop(keys[t][1])
            where = TARGET_MODULES[parts[0]].rsplit('.', 1)[0] + '.' + module
            state[peft_key(i, where, 'A')], state[peft_key(i, where, 'B')] = a, b
    names = {TARGET_MODULES[t].split('.')[-1] for parts in fused.values() for t in parts}
    config['target_modules'] = sorted(set(config['target_modules']) - names | set(fused))
    config['rank_pattern'] = {module: len(parts) * lora.rank for module, parts in fused.items()}
    config['alpha_pattern'] = {module: len(parts) * lora.alpha for module, parts in fused.items()}
    return config, state


def save_peft_adapter(folder, cfg, lora, state, base_model=''):
    """Write adapter_model.safetensors, then adapter_config.json (which marks the folder complete)."""
    config, state = peft_adapter(cfg, lora, state, base_model)
    write_safetensors(os.path.join(folder, ADAPTER_WEIGHTS),
                      {k: v.detach().float().cpu().contiguous() for k, v in state.items()}, metadata={'format': 'pt'})
    write_json(os.path.join(folder, ADAPTER_CONFIG), config)
