"""LoRA: the adapter linear, attaching adapters to a block, merging, and PEFT's names and config.

y = W x + (alpha / r) * B A dropout(x), with A kaiming-initialised and B zero (PEFT's defaults), so a
fresh adapter leaves the model unchanged. The frozen W is supplied per call (streamed); A and B live
on the device for the whole run.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import SlowLlamaError
from .block import Block
from .config import ModelConfig
from .names import (DENSE_MLP_TARGETS, EXPERT_LORA, MOE_TARGETS, PEFT_PREFIX, TARGET_MODULES, canonical_target,
                    hf_module_name)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ('q', 'v')

    def __post_init__(self):
        if self.rank <= 0:
            raise SlowLlamaError(f'LoraConfig.rank must be positive, got {self.rank}')
        if not 0.0 <= self.dropout < 1.0:
            raise SlowLlamaError(f'LoraConfig.dropout must be in [0, 1), got {self.dropout}')
        targets = self.targets.split(',') if isinstance(self.targets, str) else self.targets
        canonical = []
        for name in targets:
            target = canonical_target(name)
            if target is None:
                raise SlowLlamaError(f'LoraConfig.targets: unknown module {name!r} (use q,k,v,o,gate,up,down; '
                                     'experts,router on Mixture-of-Experts models)')
            if target not in canonical:
                canonical.append(target)
        order = list(TARGET_MODULES)  # one canonical order, whatever order the user or PEFT gave
        object.__setattr__(self, 'targets', tuple(sorted(canonical, key=order.index)))
        moe = [t for t in self.targets if t in MOE_TARGETS]
        if moe and self.dropout:  # as peft refuses it for target_parameters
            raise SlowLlamaError(f'LoraConfig.dropout {self.dropout} with `LoraConfig.targets` {",".join(moe)}: LoRA on the router '
                                 'and expert tensors has no dropout (as in peft); use 0')

    @property
    def scale(self):
        return self.alpha / self.rank

    def to_peft(self, base_model=''):
        """adapter_config.json in PEFT's layout (the experts as target_parameters, in nesting order)."""
        experts = [tensor for tensor, _ in EXPERT_LORA.values()] if 'experts' in self.targets else []
        return {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': self.rank, 'lora_alpha': self.alpha,
                'lora_dropout': self.dropout, 'bias': 'none', 'fan_in_fan_out': False,
                'target_modules': sorted(hf_module_name(t) for t in self.targets if t != 'experts'),
                'target_parameters': experts or None,
                'base_model_name_or_path': base_model, 'inference_mode': False,
                'init_lora_weights': True, 'use_rslora': False, 'use_dora': False, 'modules_to_save': None}

    @classmethod
    def from_peft(cls, cfg, where):
        if not isinstance(cfg, dict):
            raise SlowLlamaError(f'{where}: adapter_config.json is not a JSON object')
        if cfg.get('peft_type', 'LORA') != 'LORA':
            raise SlowLlamaError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA")
        if cfg.get('use_dora') or cfg.get('use_rslora') or cfg.get('fan_in_fan_out'):
            raise SlowLlamaError(f'{where}: DoRA, rsLoRA and fan_in_fan_out adapters are not supported')
        targets = cfg.get('target_modules') or []
        targets = [targets] if isinstance(targets, str) else targets
        parameters = cfg.get('target_parameters') or []
        known = [tensor for tensor, _ in EXPERT_LORA.values()]
        router = [p for p in parameters if p in ROUTER_PARAMETERS]  # peft lists the router's weight here too
        experts = [p for p in parameters if p not in ROUTER_PARAMETERS]
        if experts and sorted(experts) != sorted(known):
            raise SlowLlamaError(f'{where}: target_parameters {parameters} are not read (only {known} together, '
                                 'and the router)')
        if isinstance(targets, list):  # peft's 'gate' is a module named gate: the MoE router (ours: gate_proj)
            targets = ['router' if t == 'gate' else t for t in targets]
            targets += (['router'] if router else []) + (['experts'] if experts else [])
        rank, alpha, dropout = cfg.get('r'), cfg.get('lora_alpha'), cfg.get('lora_dropout') or 0.0
        if (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)
                or not _is_int(rank) or not _is_number(alpha) or not _is_number(dropout)):
            raise SlowLlamaError(f'{where}: adapter_config.json needs an integer r, numbers lora_alpha and '
                                 'lora_dropout, and target_modules as a list of names')
        try:
            return cls(rank=rank, alpha=float(alpha), dropout=dropout, targets=tuple(targets))
        except SlowLlamaError as e:
            raise SlowLlamaError(f'{where}: {e}') from None


# how peft may name the router's weight in target_parameters (it wraps the router as a parameter)
ROUTER_PARAMETERS = ('gate.weight', 'mlp.gate.weight')


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class LoraLinear(nn.Module):
    """A frozen linear (its `weight` supplied at call time, e.g. by functional_call) plus LoRA.

    Names match PEFT's: `weight`, `lora_A.weight` [r, in], `lora_B.weight` [out, r].
    """

    def __init__(self, base: nn.Linear, cfg: LoraConfig, device, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # placeholder on the meta device; the real one arrives per call
        self.weight.requires_grad_(False)
        self.bias = base.bias  # qwen2's q/k/v: frozen like the weight, supplied the same way
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Linear(self.in_features, cfg.rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(cfg.rank, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale = cfg.scale
        self.dropout = cfg.dropout
        self.enabled = True  # False: the frozen linear alone (the base model, e.g. DPO's reference)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return out
        lora_in = x.to(self.lora_A.weight.dtype)
        if self.dropout and self.training:
            lora_in = F.dropout(lora_in, self.dropout, True)
        return out + (self.lora_B(self.lora_A(lora_in)) * self.scale).to(out.dtype)

    def merged_weight(self, weight):
        """W + scale * B A, in W's dtype (the product is formed in fp32)."""
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (weight.float() + self.scale * delta.to(weight.device)).to(weight.dtype)


class ExpertLora(nn.Module):
    """LoRA on one projection of every expert (gate and up together, or down), as PEFT's
    target_parameters puts it on transformers 5's 3D expert tensor: lora_A [r * experts, in] holds
    expert e's A in rows e*r .. e*r + r-1, lora_B [out, r * experts] its B in columns e, e + experts,
    ... (PEFT reshapes B to [out, r, experts]); scale alpha / r. Replaces moe.ExpertProjection."""

    def __init__(self, n_experts, in_features, out_features, cfg: LoraConfig, device, dtype=torch.float32):
        super().__init__()
        self.n_experts, self.rank, self.scale = n_experts, cfg.rank, cfg.scale
        self.lora_A = nn.Linear(in_features, cfg.rank * n_experts, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(cfg.rank * n_experts, out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.enabled = True

    def factors(self, e):
        return expert_factors(self.lora_A.weight, self.lora_B.weight, e, self.n_experts)

    def forward(self, e, x, weights):
        out = torch.cat([F.linear(x, w) for w in weights], dim=-1) if len(weights) > 1 else F.linear(x, weights[0])
        if not self.enabled:
            return out
        a, b = self.factors(e)
        return out + (F.linear(F.linear(x.to(a.dtype), a), b) * self.scale).to(out.dtype)

    def delta(self, e):
        """scale * B A of expert e [out, in] in fp32 (merging)."""
        a, b = self.factors(e)
        return self.scale * (b.float() @ a.float())


def expert_factors(a, b, e, n_experts):
    """Expert e's (A [r, in], B [out, r]) in the stacked matrices a [r * experts, in], b [out, r * experts]
    (views: their gradients land in the stacked ones)."""
    rank = a.shape[0] // n_experts
    return a[e * rank:(e + 1) * rank], b[:, e::n_experts]


def attach(block: nn.Module, cfg: LoraConfig, device, dtype=torch.float32):
    """Replace the targeted linears of a block by LoraLinear (the experts' projections by
    ExpertLora); returns {PEFT module path: adapter}."""
    check_targets(block, cfg.targets)
    adapters = {}
    for target in cfg.targets:
        if target == 'experts':
            adapters.update(_attach_experts(block.mlp, cfg, device, dtype))
            continue
        path = TARGET_MODULES[target]
        parent_name, child_name = path.rsplit('.', 1)
        parent = block.get_submodule(parent_name)
        adapter = LoraLinear(getattr(parent, child_name), cfg, device, dtype)
        setattr(parent, child_name, adapter)
        adapters[path] = adapter
    return adapters


def check_targets(block, targets):
    """A dense block has no router or experts; a MoE block has no dense gate/up/down."""
    moe = hasattr(block.mlp, 'experts')
    wrong = [t for t in targets if (t in MOE_TARGETS) != moe and (t in MOE_TARGETS or t in DENSE_MLP_TARGETS)]
    if wrong and not moe:
        raise SlowLlamaError(f'LoraConfig.targets {",".join(wrong)}: the model has no experts (its MLP is dense)')
    if wrong:
        raise SlowLlamaError(f'LoraConfig.targets {",".join(wrong)}: a Mixture-of-Experts model has no dense MLP; '
                             'use `LoraConfig.targets` experts (every expert\'s gate, up and down) or router')


def _attach_experts(moe, cfg, device, dtype):
    n_experts = len(moe.experts)
    hidden, dim = moe.experts[0].up_proj.out_features, moe.experts[0].up_proj.in_features
    shapes = {'mlp.gate_up': (dim, 2 * hidden), 'mlp.down': (hidden, dim)}  # (in, out)
    adapters = {}
    for peft_path, (_, module) in EXPERT_LORA.items():
        adapter = ExpertLora(n_experts, *shapes[module], cfg, device, dtype)
        setattr(moe, module.split('.')[-1], adapter)
        adapters[peft_path] = adapter
    return adapters


@contextlib.contextmanager
def disabled(layers_adapters):
    """Within: every adapter bypassed (no LoRA term, no LoRA dropout drawn), as PEFT's disable_adapter()."""
    adapters = [adapter for layer in layers_adapters for adapter in layer.values()]
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in adapters:
            adapter.enabled = True


def peft_key(layer, module_path, matrix):
    """(3, 'self_attn.q_proj', 'A') -> base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"""
    return f'{PEFT_PREFIX}{layer}.{module_path}.lora_{matrix}.weight'


def adapter_state(layers_adapters):
    """[{path: LoraLinear}] per layer -> {PEFT key: tensor}."""
    state = {}
    for layer, adapters in enumerate(layers_adapters):
        for path, adapter in adapters.items():
            state[peft_key(layer, path, 'A')] = adapter.lora_A.weight
            state[peft_key(layer, path, 'B')] = adapter.lora_B.weight
    return state


def load_adapter_state(layers_adapters, state, where):
    """Copy PEFT-keyed tensors into our adapters, checking that keys and shapes match exactly."""
    expected = adapter_state(layers_adapters)
    # PEFT may save keys with the adapter name ('lora_A.default.weight'); accept both
    state = {k.replace('.default.weight', '.weight'): v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise SlowLlamaError(f'{where}: adapter keys do not match the model '
                             f'(missing {missing[:2]}, unexpected {extra[:2]})')
    with torch.no_grad():
        for key, param in expected.items():
            if tuple(state[key].shape) != tuple(param.shape):
                raise SlowLlamaError(f'{where}: {key} has shape {tuple(state[key].shape)}, '
                                     f'the model needs {tuple(param.shape)}')
            param.copy_(state[key].to(param.dtype))


def lora_shapes(cfg: ModelConfig, lora: LoraConfig):
    """{'self_attn.q_proj.lora_A.weight': shape, ...} of one block's adapters: attached to the block
    built on the meta device (as block.block_shapes), so LoRA sizing reads the shapes training makes."""
    key = (repr(cfg), lora.rank, lora.targets)
    if key not in _SHAPES:  # milliseconds to build; the planner asks again and again
        with torch.device('meta'):
            adapters = attach(Block(cfg), lora, 'meta')
        _SHAPES[key] = {f'{path}.lora_{matrix}.weight': tuple(getattr(adapter, f'lora_{matrix}').weight.shape)
                        for path, adapter in adapters.items() for matrix in 'AB'}
    return dict(_SHAPES[key])


_SHAPES = {}
