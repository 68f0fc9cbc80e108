"""The adapter folder in PEFT's layout (adapter_config.json, adapter_model.safetensors), and the
adapter as peft applies it to the transformers class of the model's family.

Most families name their projections as we do, so the adapter is written as it is. Phi-3's class
fuses q/k/v into qkv_proj and gate/up into gate_up_proj, while we train one LoRA per projection.
There the parts' LoRAs are stacked into one LoRA of the fused module, exactly: the A matrices
[r, in] stacked on rows into [parts * r, in], the B matrices [out_p, r] placed on the diagonal of a
[sum out_p, parts * r] block matrix, so B A is the parts' B_p A_p stacked on rows. Its rank is
parts * r, and peft's rank_pattern / alpha_pattern give that module rank and alpha both times parts,
keeping the scale alpha / r. (peft applies one dropout to the fused module's input where we draw
one per projection: the same model, trained slightly differently.)

Read back, a fused module's LoRA of the adapter's rank r (as peft trains it on Phi-3) becomes one
LoRA per part, exactly: the parts share its A and take their rows of B. One we stacked (rank
parts * r, B block diagonal) is cut back into the parts' own A and B.
"""
import os

import torch

from ...errors import SlowLlamaError
from ...model.block import block_shapes
from ...model.config import ModelConfig
from ...model.lora import LoraConfig, peft_key
from ...model.names import PEFT_PREFIX, TARGET_MODULES, canonical_target, hf_module_name
from ..files import SafetensorsFile, announce, atomic_folder, clean_leftovers, read_json, write_json, write_safetensors
from ..prepared import read_manifest
from .names import FUSED_TARGETS, PEFT_LANGUAGE_MODEL_PREFIX

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'


def save_adapter_folder(folder, cfg: LoraConfig, state, base_model=''):
    """Write adapter_model.safetensors and adapter_config.json (weights first: the config marks it complete)."""
    write_safetensors(os.path.join(folder, ADAPTER_WEIGHTS),
                      {k: v.detach().float().cpu() for k, v in state.items()}, metadata={'format': 'pt'})
    write_json(os.path.join(folder, ADAPTER_CONFIG), cfg.to_peft(base_model))


def write_adapter(folder, cfg: LoraConfig, state, base_model='', attached=()):
    """Write the adapter folder whole (and each attached module's files: module.save(folder)): beside
    it first, then swapped in, never half old, half new."""
    with atomic_folder(folder) as staging:
        save_adapter_folder(staging, cfg, state, base_model)
        for module in attached:
            module.save(staging)


def adapter_folder(path):
    """--lora accepts an adapter folder or a finetune run folder (its adapter/); None stays None."""
    if path is None:
        return None
    path = str(path)
    if not os.path.exists(os.path.join(path, ADAPTER_CONFIG)):
        if os.path.exists(os.path.join(path, 'adapter', ADAPTER_CONFIG)):
            return os.path.join(path, 'adapter')
        raise SlowLlamaError(f'{path}: `lora` is neither an adapter folder (adapter_config.json) '
                             'nor a run folder with adapter/')
    return path


def read_adapter_folder(folder):
    """-> (LoraConfig, {PEFT key: tensor}) from a PEFT-layout folder."""
    folder = str(folder)
    if not os.path.isdir(folder):
        found = clean_leftovers(folder)  # a save killed mid-way: say so; an old folder may come back
        if not os.path.isdir(folder):
            raise SlowLlamaError(f'{folder}: adapter folder not found' + (f'; {found}' if found else ''))
    config = read_json(os.path.join(folder, ADAPTER_CONFIG), 'adapter_config.json')
    weights = SafetensorsFile(os.path.join(folder, ADAPTER_WEIGHTS))
    rename = _language_model_keys(weights.names(), folder)
    if rename is not None and isinstance(config, dict) and isinstance(config.get('target_modules'), list):
        # the vision tower's own targets (out_proj, fc1, ...) are not ours
        config = {**config, 'target_modules': [t for t in config['target_modules'] if canonical_target(str(t))]}
    cfg = LoraConfig.from_peft(config, folder)
    names = weights.names() if rename is None else list(rename)
    for name in names:  # the rank sizes the LoRA matrices: the file's tensors must justify it
        shape = weights.shape(name)
        rank = shape[0] if '.lora_A.' in name else shape[-1] if '.lora_B.' in name else cfg.rank
        stacked = '.mlp.experts.' in name  # one rank-r slice per expert (load_adapter_state checks the count)
        if len(shape) != 2 or (rank % cfg.rank if stacked else rank != cfg.rank):
            raise SlowLlamaError(f'{weights.path}: {name} has shape {shape}, not one of rank r={cfg.rank}')
        if not torch.isfinite(weights.tensor(name).float()).all():
            raise SlowLlamaError(f'{weights.path}: {name} holds values that are not finite')
    # peft nests gate_up_proj's LoRA under down_proj's whatever order it was given
    return cfg, {name if rename is None else rename[name]: weights.tensor(name).clone() for name in names}


def _language_model_keys(names, folder):
    """None for an adapter of a text model; for one peft trained on a multimodal model (gemma3), {its key
    of a language-model LoRA: ours}, the vision tower's LoRAs left out (said in one line)."""
    inside = [n for n in names if n.startswith(PEFT_LANGUAGE_MODEL_PREFIX)]
    if not inside:
        return None
    if len(inside) < len(names):
        announce(f'{folder}: the LoRAs on the vision tower are skipped (the language model\'s are read)')
    return {n: PEFT_PREFIX + n.removeprefix(PEFT_LANGUAGE_MODEL_PREFIX) for n in inside}


# --- as peft applies it to the family's transformers class ----------------------------------

def peft_adapter(cfg, lora, state, base_model=''):
    """(adapter_config.json dict, {PEFT key: tensor}) for the HF class of cfg.model_type."""
    config, state = lora.to_peft(base_model), dict(state)
    # a fused module takes all its parts once one is targeted; the others are zero (and read back as untargeted)
    fused = {module: parts for module, parts in FUSED_TARGETS.get(cfg.model_type, {}).items()
             if set(parts) & set(lora.targets)}
    if not fused:
        return config, state
    shapes = block_shapes(cfg)
    for module, parts in fused.items():
        rows = [shapes[TARGET_MODULES[t] + '.weight'][0] for t in parts]
        for i in range(cfg.n_layers):
            a = torch.zeros(len(parts) * lora.rank, cfg.dim)  # [parts * r, in]
            b = torch.zeros(sum(rows), len(parts) * lora.rank)  # block diagonal
            for n, t in enumerate(parts):
                if t in lora.targets:
                    top, cols = sum(rows[:n]), slice(n * lora.rank, (n + 1) * lora.rank)
                    a[cols] = state.pop(peft_key(i, TARGET_MODULES[t], 'A'))
                    b[top:top + rows[n], cols] = state.pop(peft_key(i, TARGET_MODULES[t], 'B'))
            where = TARGET_MODULES[parts[0]].rsplit('.', 1)[0] + '.' + module
            state[peft_key(i, where, 'A')], state[peft_key(i, where, 'B')] = a, b
    names = {TARGET_MODULES[t].split('.')[-1] for parts in fused.values() for t in parts}
    # stacked: rank and alpha times the parts, so alpha / r stays
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


def read_peft_adapter(folder, model_dir):
    """-> (LoraConfig, {PEFT key in our modules: tensor}) from a PEFT folder for the prepared model
    in model_dir, a family's fused modules (Phi-3's qkv_proj, gate_up_proj) split into our parts."""
    cfg = ModelConfig.from_dict(read_manifest(model_dir)['config'])
    fused = FUSED_TARGETS.get(cfg.model_type, {})
    if not fused:
        return read_adapter_folder(folder)
    config = read_json(os.path.join(str(folder), ADAPTER_CONFIG), 'adapter_config.json')
    targets = config.get('target_modules') or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not set(targets) & set(fused):
        return read_adapter_folder(folder)
    rank = config['r']
    state = _read_tensors(folder)
    shapes = block_shapes(cfg)
    for module in (m for m in fused if m in targets):
        for i in range(cfg.n_layers):
            state.update(_split_fused_lora(state, i, module, fused[module], shapes, rank, folder))
    # a part whose A is zero in every layer was not targeted when we stacked it
    untargeted = {t for module in fused for t in fused[module]
                  if not any(v.any() for k, v in state.items() if f'.{TARGET_MODULES[t]}.lora_A' in k)}
    state = {k: v for k, v in state.items() if not any(f'.{TARGET_MODULES[t]}.' in k for t in untargeted)}
    plain = [t for t in targets if t not in fused]
    parts = [part for module in fused if module in targets for part in fused[module] if part not in untargeted]
    # in peft's names: its bare 'gate' would be a MoE router
    lora = LoraConfig.from_peft({**config, 'target_modules': plain + [hf_module_name(p) for p in parts]}, str(folder))
    return lora, state


def _read_tensors(folder):
    """The tensors of a PEFT folder, without reading its config as ours (it names fused modules)."""
    weights = SafetensorsFile(os.path.join(str(folder), ADAPTER_WEIGHTS))
    return {name.replace('.default.weight', '.weight'): weights.tensor(name).clone() for name in weights.names()}


def _split_fused_lora(state, layer, module, parts, shapes, rank, folder):
    """Layer `layer`'s LoRA of a fused module -> {PEFT key: tensor} of its parts (popped from state)."""
    where = TARGET_MODULES[parts[0]].rsplit('.', 1)[0] + '.' + module
    key_a, key_b = peft_key(layer, where, 'A'), peft_key(layer, where, 'B')
    if key_a not in state or key_b not in state:
        raise SlowLlamaError(f'{folder}: adapter lacks {key_a if key_a not in state else key_b}')
    a, b = state.pop(key_a), state.pop(key_b)  # [R, in], [sum of the parts' rows, R]
    rows = [shapes[TARGET_MODULES[t] + '.weight'][0] for t in parts]
    if b.shape[0] != sum(rows) or a.shape[0] != b.shape[1]:
        raise SlowLlamaError(f'{folder}: {key_b} has shape {tuple(b.shape)}, the model needs ({sum(rows)}, r)')
    pieces = b.split(rows, dim=0)
    if a.shape[0] == rank:  # one LoRA shared by the parts: each keeps A and its rows of B
        split = {t: (a, piece) for t, piece in zip(parts, pieces)}
    elif a.shape[0] == rank * len(parts) and _block_diagonal(pieces, rank):  # stacked by us
        split = {t: (a[n * rank:(n + 1) * rank], piece[:, n * rank:(n + 1) * rank])
                 for n, (t, piece) in enumerate(zip(parts, pieces))}
    else:
        raise SlowLlamaError(f'{folder}: {key_a} has rank {a.shape[0]}; only rank r (shared by the parts) or '
                             f'{len(parts)} x r with a block-diagonal B can be split into per-projection LoRAs')
    out = {}
    for t, (part_a, part_b) in split.items():
        out[peft_key(layer, TARGET_MODULES[t], 'A')] = part_a.clone()
        out[peft_key(layer, TARGET_MODULES[t], 'B')] = part_b.clone()
    return out


def _block_diagonal(pieces, rank):
    return all(not piece[:, :n * rank].any() and not piece[:, (n + 1) * rank:].any() for n, piece in enumerate(pieces))
