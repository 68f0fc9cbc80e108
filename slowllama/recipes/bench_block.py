"""bench --shape 30b-a3b-block: one Qwen3-30B-A3B-shaped Mixture-of-Experts block, our forward and
backward beside transformers + peft's Qwen3MoeDecoderLayer with the same weights and the same LoRA,
at 1 x 256 and 4 x 256 tokens (or --batch-size x --seq-len), each system in a process of its own.

Ours runs the block as the engine does: its attention and router as the store hands them out, the
experts the router chose fetched through fetch_experts (here from memory: the time is the compute's),
under autograd, then the gradient pushed through to the input and the LoRA ('kept' activations); the
'recompute' column adds the engine's no-grad forward before it, as for a block whose activations
are not kept. The peer runs the layer's forward and backward (peft's LoRA on the experts merges
each expert's B A into its weight at every forward, as peft does for target_parameters)."""
import json
import subprocess
import sys
import time

import torch

from .shapes import SHAPES

HF_NAMES = {'q': 'q_proj', 'k': 'k_proj', 'v': 'v_proj', 'o': 'o_proj', 'router': 'gate'}
EXPERT_TENSORS = ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']


def hf_layer(shape, dtype):
    """transformers' decoder layer of the shape, random weights drawn the same way in every process."""
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer
    config = AutoConfig.for_model(**SHAPES[shape])
    config._attn_implementation = 'sdpa'
    torch.manual_seed(0)
    with torch.device('meta'):
        layer = Qwen3MoeDecoderLayer(config, layer_idx=0)
    layer = layer.to_empty(device='cpu')
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator) if 'norm' in name
                        else 0.02 * torch.randn(param.shape, generator=generator))
    return config, layer.to(dtype).requires_grad_(False)


def our_weights(layer):
    """The layer's weights as a prepared block holds them: the attention and router, and each expert alone."""
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith('mlp.experts.')}
    gate_up, down = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj
    hidden = down.shape[2]
    experts = {e: {'gate_proj.weight': gate_up[e, :hidden], 'up_proj.weight': gate_up[e, hidden:],
                   'down_proj.weight': down[e]} for e in range(gate_up.shape[0])}
    return state, experts


def worker(spec):
    from ..weights.formats.model_config import config_from_hf
    dtype = getattr(torch, spec['dtype'])
    config, layer = hf_layer(spec['shape'], dtype)
    batch, seq = spec['batch'], spec['seq']
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, seq, config.hidden_size, generator=generator).to(dtype)
    grad_out = torch.randn(batch, seq, config.hidden_size, generator=generator).to(dtype)
    cfg = config_from_hf(config.to_dict())
    from ..model.block import rope_table
    cos, sin = rope_table(cfg, torch.arange(seq), 'cpu')
    if spec['system'] == 'slowllama':
        step = _ours(spec, cfg, layer, x, grad_out, cos, sin)
    else:
        step = _peft(spec, layer, x, grad_out, cos, sin)
    times = []
    for _ in range(spec['warmup'] + spec['steps']):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    timed = sorted(times[spec['warmup']:])
    result = {'block_s': timed[len(timed) // 2]}
    if spec['system'] == 'slowllama':  # and the forward a recomputed block runs first
        result['forward_s'] = step.forward_s
        result['experts_fetched'] = step.fetched
    return result


def _ours(spec, cfg, layer, x, grad_out, cos, sin):
    from torch.func import functional_call

    from ..model.block import Block
    from ..model.lora import LoraConfig, attach
    state, experts = our_weights(layer)
    with torch.device('meta'):
        block = Block(cfg)
    lora = LoraConfig(rank=spec['rank'], alpha=2.0 * spec['rank'], targets=tuple(spec['targets']))
    adapters = attach(block, lora, 'cpu')
    params = [m.weight for a in adapters.values() for m in (a.lora_A, a.lora_B)]
    fetched = []

    def fetch(ids):
        fetched.append(len(ids))
        return {e: experts[e] for e in ids}

    def run(inputs):
        return functional_call(block, state, (inputs, cos, sin, None, None, fetch), strict=False)

    def step():
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = run(leaf)
        torch.autograd.grad(out, [leaf, *params], grad_out)
    begin = time.perf_counter()
    with torch.no_grad():
        run(x)
    step.forward_s = time.perf_counter() - begin
    step.fetched = fetched[0]
    return step


def _peft(spec, layer, x, grad_out, cos, sin):
    from peft import LoraConfig, inject_adapter_in_model
    modules = [HF_NAMES[t] for t in spec['targets'] if t in HF_NAMES]
    config = LoraConfig(r=spec['rank'], lora_alpha=2 * spec['rank'], target_modules=modules,
                        target_parameters=EXPERT_TENSORS if 'experts' in spec['targets'] else None)
    layer = inject_adapter_in_model(config, layer)
    params = [p for name, p in layer.named_parameters() if 'lora_' in name]
    for p in params:
        p.requires_grad_(True)

    def step():
        leaf = x.detach().requires_grad_(True)
        out = layer(leaf, position_embeddings=(cos[None].to(x.dtype), sin[None].to(x.dtype)))
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, [leaf, *params], grad_out)
    return step


def bench_block(shape='30b-a3b-block', shapes=((1, 256), (4, 256)), targets=('q', 'k', 'v', 'o', 'experts'),
                rank=8, steps=3, warmup=1, dtype='fp32', json_out='bench.json'):
    """Each system and batch in its own process -> the report (also printed, and written as JSON)."""
    torch_dtype = {'fp32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16'}[dtype]
    rows = []
    for batch, seq in shapes:
        row = {'batch': batch, 'seq': seq}
        for system in ('slowllama', 'transformers+peft'):
            spec = dict(shape=shape, system=system, batch=batch, seq=seq, targets=list(targets), rank=rank,
                        steps=steps, warmup=warmup, dtype=torch_dtype)
            print(f'bench: {shape} {system} {batch} x {seq} ...', file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, '-m', 'slowllama.recipes.bench_block', json.dumps(spec)],
                                 capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                row[system] = {'error': (out.stderr.strip().splitlines() or ['?'])[-1]}
            else:
                row[system] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f'bench: {shape} {system} {batch} x {seq}: {row[system]}', file=sys.stderr, flush=True)  # as it comes
        ours, peer = row['slowllama'].get('block_s'), row['transformers+peft'].get('block_s')
        if ours and peer:
            row['ratio'] = ours / peer
            row['ratio_recompute'] = (ours + row['slowllama']['forward_s']) / peer
        rows.append(row)
    report = {'shape': shape, 'dtype': dtype, 'targets': list(targets), 'rank': rank, 'rows': rows}
    print(f'{shape} ({dtype}, LoRA r={rank} on {",".join(targets)}): forward + backward of one block, seconds')
    print(f'{"batch x seq":>12} {"slowllama":>10} {"+recompute":>11} {"peft":>8} {"ratio":>6} {"ratio(rec)":>10} '
          f'{"experts":>8}')
    for row in rows:
        ours, peer = row['slowllama'], row['transformers+peft']
        print(f'{row["batch"]:>5} x {row["seq"]:<5} {ours.get("block_s", float("nan")):>10.3f} '
              f'{ours.get("block_s", float("nan")) + ours.get("forward_s", float("nan")):>11.3f} '
              f'{peer.get("block_s", float("nan")):>8.3f} {row.get("ratio", float("nan")):>6.2f} '
              f'{row.get("ratio_recompute", float("nan")):>10.2f} {ours.get("experts_fetched", 0):>8}')
    with open(json_out, 'w') as f:
        json.dump(report, f, indent=2)
    print(f'bench: wrote {json_out}')
    return report


if __name__ == '__main__':
    print(json.dumps(worker(json.loads(sys.argv[1]))))
