"""Checkpoints of a training run: checkpoints/step_NNNNNN/ holding the adapter (PEFT layout),
trainable.safetensors (every trainable parameter by name), optimizer.safetensors + optimizer.json
(the optimizer's per-parameter state and its settings) and state.json (step, data position, RNG
states as base64 of their uint8 tensors). Written into a hidden staging folder and renamed into place
when complete; state.json is written last. Safetensors and JSON only, no pickle."""
import base64
import math
import os
import re
import shutil

import numpy as np
import torch

from ..errors import SlowLlamaError
from ..weights.files import (SafetensorsFile, clean_leftovers, read_json, staging_dir, swap_dir, write_json,
                             write_safetensors)

CHECKPOINT_DIR = 'checkpoints'
CHECKPOINT_NAME = re.compile(r'^step_(\d{6,})$')
ADAM_FIELDS = ('step', 'exp_avg', 'exp_avg_sq', 'max_exp_avg_sq')  # what AdamW keeps per parameter


def write_checkpoint(folder, model, params, optimizer, state):
    staging = staging_dir(folder)
    try:
        model.save_adapter(staging)
        write_safetensors(os.path.join(staging, 'trainable.safetensors'),
                          {n: p.detach().cpu() for n, p in params.items()})
        tensors, meta = optimizer_state(optimizer, list(params))
        write_safetensors(os.path.join(staging, 'optimizer.safetensors'), tensors)
        write_json(os.path.join(staging, 'optimizer.json'), meta)
        write_json(os.path.join(staging, 'state.json'), state)  # last: marks the checkpoint complete
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_checkpoint(folder, params, optimizer):
    """Load parameters and optimizer state in place; returns state.json."""
    state = read_json(os.path.join(folder, 'state.json'), 'checkpoint state')
    check_state(state, os.path.join(folder, 'state.json'))
    load_trainable(params, SafetensorsFile(os.path.join(folder, 'trainable.safetensors')), folder)
    load_optimizer_state(optimizer, list(params), SafetensorsFile(os.path.join(folder, 'optimizer.safetensors')),
                         folder)
    return state


def check_state(state, path):
    """state.json holds what resuming reads, with the types it needs."""
    def count(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def rng(value):
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    per_process = state.get('rng_per_process', [state.get('rng')]) if isinstance(state, dict) else None
    def number(value):
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                 and math.isfinite(value))

    def best(value):  # the selection on held-out data (train.Trainer._select); older runs have no eval_loss
        return (isinstance(value, dict) and set(value) - {'eval_loss'} == {'score', 'step', 'evals_since'}
                and number(value['score']) and number(value.get('eval_loss'))
                and (value['step'] is None or count(value['step'])) and count(value['evals_since']))
    if (not isinstance(state, dict) or not count(state.get('step')) or not count(state.get('data_position'))
            or not isinstance(per_process, list) or not all(rng(r) for r in per_process)
            or not best(state.get('best', {'score': None, 'step': None, 'evals_since': 0}))):
        raise SlowLlamaError(f'{path}: damaged checkpoint state (step, data_position, rng or best); '
                             'remove this checkpoint to resume from the one before')


def remove_leftovers(run_dir):
    """Staging folders that a killed run left behind (never a complete checkpoint or adapter/), and
    an old folder put back where a non-atomic swap was cut short. Returns what was found (sentences)."""
    finals = [os.path.join(str(run_dir), 'adapter'), os.path.join(str(run_dir), 'best')]
    checkpoints = os.path.join(str(run_dir), CHECKPOINT_DIR)
    if os.path.isdir(checkpoints):
        finals += [os.path.join(checkpoints, name[1:].split('.')[0]) for name in os.listdir(checkpoints)
                   if name.startswith('.step_')]
    found = [clean_leftovers(final) for final in sorted(set(finals))]
    # any other staging, nested ones included (a save_adapter staged inside a checkpoint's staging)
    for folder, prefixes in ((str(run_dir), ('adapter.', 'best.')), (checkpoints, ('step_',))):
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            if name.startswith('.') and name.lstrip('.').startswith(prefixes):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
                found.append(f'{os.path.join(folder, name)}: removed, left unfinished by an interrupted run')
    return [line for line in found if line]


def encode_rng(states):
    return {kind: base64.b64encode(state.cpu().numpy().tobytes()).decode('ascii') for kind, state in states.items()}


def decode_rng(encoded, where='state.json'):
    try:
        return {kind: torch.from_numpy(np.frombuffer(base64.b64decode(text, validate=True), dtype=np.uint8).copy())
                for kind, text in encoded.items()}
    except ValueError:  # binascii.Error is one
        raise SlowLlamaError(f'{where}: damaged RNG state (not base64)') from None


def optimizer_state(optimizer, names):
    """AdamW state -> ({'<param name>.<field>': tensor}, JSON-able hyperparameters)."""
    saved = optimizer.state_dict()
    tensors = {f'{names[index]}.{key}': value.detach().cpu()
               for index, fields in saved['state'].items() for key, value in fields.items()}
    groups = [{k: v for k, v in g.items() if k != 'params'} for g in saved['param_groups']]
    return tensors, {'type': type(optimizer).__name__, 'param_names': names, 'param_groups': groups}


def load_optimizer_state(optimizer, names, file, where):
    index = {name: i for i, name in enumerate(names)}
    params = [p for group in optimizer.param_groups for p in group['params']]
    state = {}
    for key in file.names():
        name, _, field_name = key.rpartition('.')
        if name not in index:
            raise SlowLlamaError(f'{where}: optimizer state for {key}, which the model does not train')
        value = file.tensor(key)
        shape = () if field_name == 'step' else tuple(params[index[name]].shape)
        if field_name not in ADAM_FIELDS or tuple(value.shape) != shape or not value.is_floating_point():
            raise SlowLlamaError(f'{where}: optimizer state {key} has shape {tuple(value.shape)} and dtype '
                                 f'{value.dtype}; the model needs {shape}')
        if not _plausible(field_name, value):
            raise SlowLlamaError(f'{where}: optimizer state {key} holds impossible values (damaged file)')
        state.setdefault(index[name], {})[field_name] = value.clone()
    for i, fields in state.items():  # AdamW needs every moment of a parameter it has a step for
        lacking = sorted(set(ADAM_FIELDS[:3]) - set(fields))
        if lacking:
            raise SlowLlamaError(f'{where}: optimizer state of {names[i]} lacks {lacking[0]} (damaged file)')
    saved = optimizer.state_dict()
    saved['state'] = state
    optimizer.load_state_dict(saved)


def _plausible(field_name, value):
    """Finite moments, a second moment >= 0, a whole step count (AdamW overflows on a huge one)."""
    if not torch.isfinite(value).all():
        return False
    if field_name == 'step':
        return 0 <= value.item() < 2 ** 40 and value.item() == int(value.item())
    return field_name == 'exp_avg' or bool((value >= 0).all())


def load_trainable(params, file, where):
    missing, extra = sorted(set(params) - set(file.names())), sorted(set(file.names()) - set(params))
    if missing or extra:
        raise SlowLlamaError(f'{where}: the checkpoint does not fit the model (missing {missing[:2]}, '
                             f'unexpected {extra[:2]}); resume with the same `targets` and `lora_rank`')
    with torch.no_grad():
        for name, p in params.items():
            if tuple(file.shape(name)) != tuple(p.shape):
                raise SlowLlamaError(f'{where}: {name} has shape {file.shape(name)}, the model needs '
                                     f'{tuple(p.shape)}')
            if not torch.isfinite(file.tensor(name).float()).all():
                raise SlowLlamaError(f'{where}: {name} holds values that are not finite (damaged checkpoint)')
            p.copy_(file.tensor(name))


def list_checkpoints(run_dir):
    """[(step, folder name)] of the complete checkpoints (those with a state.json), oldest first."""
    folder = os.path.join(str(run_dir), CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = CHECKPOINT_NAME.match(name)
        if match and os.path.exists(os.path.join(folder, name, 'state.json')):
            found.append((int(match.group(1)), name))
    return sorted(found)


def replace_folder(staging, final):
    """Put a complete staging folder at `final`, replacing an older one (see files.swap_dir)."""
    swap_dir(staging, final)
