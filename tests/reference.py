"""Reference models for the tests: our modules held whole in memory, and transformers + peft."""
import copy

import torch

from slowllama.model.lora import attach
from slowllama.model.block import Transformer
from slowllama.weights.store import BlockStore


def whole_model(model_dir, lora_cfg, dropout=0.0):
    """Our Transformer with every weight of a prepared folder in memory, LoRA attached (fp32, cpu)."""
    store = BlockStore(model_dir, torch.device('cpu'), torch.float32, 'ram')
    model = Transformer(store.cfg, dropout)
    state = {'embed_tokens.weight': store.embed(torch.arange(store.cfg.vocab_size)[None])[0]}
    for i in range(store.cfg.n_layers):
        state.update({f'layers.{i}.{k}': v for k, v in store.block(i).items()})
        for e, tensors in store.experts(i, range(store.cfg.n_experts)).items():  # a MoE block's, fetched alone
            state.update({f'layers.{i}.mlp.experts.{e}.{k}': v for k, v in tensors.items()})
    state['head.norm.weight'] = store.head_norm()
    state['head.lm_head.weight'] = store.head_rows(0, store.cfg.vocab_size)
    model.load_state_dict({k: v.clone() for k, v in state.items()})
    model.requires_grad_(False)
    adapters = [attach(layer, lora_cfg, 'cpu') for layer in model.layers]
    return model, adapters


def copy_adapters(source_adapters, target_adapters):
    with torch.no_grad():
        for src, dst in zip(source_adapters, target_adapters):
            for path in src:
                dst[path].lora_A.weight.copy_(src[path].lora_A.weight)
                dst[path].lora_B.weight.copy_(src[path].lora_B.weight)


def randomize_adapters(adapters, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters:
            for adapter in layer.values():
                for param in (adapter.lora_A.weight, adapter.lora_B.weight):
                    param.copy_(torch.randn(param.shape, generator=g) * scale)


def assert_same_loss_and_gradients(first, second, seed):
    """Two streamed models with the same random adapters, batch and seed: bit-identical loss and
    LoRA gradients."""
    from conftest import random_batch
    randomize_adapters(first.adapters)
    copy_adapters(first.adapters, second.adapters)
    tokens, targets = random_batch(first.cfg.vocab_size)
    torch.manual_seed(seed)
    loss = first.backward(tokens, targets)
    torch.manual_seed(seed)
    assert second.backward(tokens, targets) == loss
    a, b = first.trainable_parameters(), second.trainable_parameters()
    assert all(torch.equal(a[k].grad, b[k].grad) for k in a)


def peft_model(hf_model, rank=4, alpha=8.0, targets=('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj',
                                                     'up_proj', 'down_proj'), seed=0):
    """transformers model + a non-zero PEFT LoRA adapter (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        init_lora_weights=False)
    return get_peft_model(copy.deepcopy(hf_model), config).eval()


def masked_mean_ce(logits, targets):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             ignore_index=-100)


def peft_grads(model):
    """{our PEFT key: grad} from a peft model."""
    return {name.replace('.default.weight', '.weight'): p.grad for name, p in model.named_parameters()
            if 'lora_' in name}


def max_rel_diff(ours, ref):
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12)).item()


def against_whole_model(model_dir, device='cpu', dtype=torch.float32,
                        targets=('q', 'k', 'v', 'o', 'gate', 'up', 'down'), lora_dropout=0.1, **load_options):
    """The streamed backward against autograd over the whole model (same weights, random LoRA on
    every projection, model dropout 0.1 and LoRA dropout 0.1 unless told, same seed) -> (loss,
    loss difference, worst relative LoRA gradient difference)."""
    import slowllama
    from conftest import random_batch
    lora = slowllama.LoraConfig(rank=4, alpha=8.0, dropout=lora_dropout, targets=targets)
    streamed = slowllama.load(model_dir, device=device, dtype=dtype, lora=lora, dropout=0.1, **load_options)
    randomize_adapters(streamed.adapters)
    reference, ref_adapters = whole_model(model_dir, lora, dropout=0.1)
    reference.to(device, dtype)
    for layer in ref_adapters:  # LoRA trains in fp32 whatever the compute dtype, as ours does
        for adapter in layer.values():
            adapter.lora_A.float(), adapter.lora_B.float()
    copy_adapters(streamed.adapters, ref_adapters)
    tokens, targets = random_batch(streamed.cfg.vocab_size)
    torch.manual_seed(123)
    loss = streamed.backward(tokens, targets)
    torch.manual_seed(123)
    reference.train()
    ref_loss = masked_mean_ce(reference(tokens.to(device)), targets.to(device))
    ref_loss.backward()
    worst = 0.0
    for ours, ref in zip(streamed.adapters, ref_adapters):
        for path in ours:
            for matrix in ('lora_A', 'lora_B'):
                want = getattr(ref[path], matrix).weight.grad
                assert want.abs().max() > 0
                worst = max(worst, max_rel_diff(getattr(ours[path], matrix).weight.grad, want))
    print(f'\n{device} {dtype}: loss diff {abs(loss - ref_loss.item()):.2e}, max relative grad diff {worst:.2e}')
    return loss, abs(loss - ref_loss.item()), worst


def step_beside_peft(ours, reference, tokens, targets, seed=5):
    """Our model and a peft one on the same batch: logits in eval mode, then one backward each from
    the same seed (so the same dropout masks where both draw them alike) -> (eval logits of the
    reference, max logit difference, our loss, the reference's loss tensor, already backpropagated)."""
    reference.eval()
    with torch.no_grad():
        ref_logits = reference(input_ids=tokens).logits
    logit_diff = (ours.logits(tokens) - ref_logits).abs().max().item()
    reference.train()
    torch.manual_seed(seed)
    ref_loss = masked_mean_ce(reference(input_ids=tokens).logits, targets)
    ref_loss.backward()
    torch.manual_seed(seed)
    loss = ours.backward(tokens, targets)
    return ref_logits, logit_diff, loss, ref_loss
