"""The benchmark: slowllama in each offload mode beside transformers + peft (whole model resident,
with and without gradient checkpointing), same shape, batch and LoRA. Each configuration runs in its
own subprocess so peak memory is its own. Prints a table of ratios and writes JSON."""
import json
import os
import subprocess
import sys
import time

import torch

from .config import ModelConfig
from .plan import GIB, model_params, predict

SHAPES = {  # name -> HF config fields
    'tiny': dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=4096),
    '0.4b': dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),
    '7b': dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    '70b-block': dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=2, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000),
}


# --- the worker: one configuration in a fresh process ----------------------------------------

def host_rss():
    with open('/proc/self/status') as f:
        fields = dict(line.split(':', 1) for line in f)
    return int(fields['VmRSS'].split()[0]) * 1024, int(fields['VmHWM'].split()[0]) * 1024


def reset_peak_rss():
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:
        pass


def run_worker(spec):
    device = torch.device(spec['device'])
    dtype = {'bf16': torch.bfloat16, 'fp32': torch.float32, 'fp16': torch.float16}[spec['dtype']]
    torch.manual_seed(0)
    tokens = torch.randint(0, spec['vocab'], (spec['batch'], spec['seq']))
    targets = torch.cat([tokens[:, 1:], torch.full((spec['batch'], 1), -100)], dim=1)
    reset_peak_rss()
    rss_start, _ = host_rss()
    started = time.perf_counter()
    step, params = (_slowllama_step if spec['system'] == 'slowllama' else _hf_step)(spec, device, dtype,
                                                                                   tokens, targets)
    load_s = time.perf_counter() - started
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for _ in range(spec['warmup'] + spec['steps']):
        begin = time.perf_counter()
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    timed = sorted(times[spec['warmup']:])
    step_s = timed[len(timed) // 2]
    _, rss_peak = host_rss()
    result = {'step_s': step_s, 'tokens_per_s': spec['batch'] * spec['seq'] / step_s, 'load_s': load_s,
              'host_gain_bytes': rss_peak - rss_start}
    if device.type == 'cuda':
        result['device_peak_bytes'] = torch.cuda.max_memory_allocated(device)
    return result


def _slowllama_step(spec, device, dtype, tokens, targets):
    import slowllama
    lora = slowllama.LoraConfig(rank=spec['rank'], alpha=2.0 * spec['rank'], targets=tuple(spec['targets']))
    model = slowllama.load(spec['model_dir'], device=device, dtype=dtype, lora=lora, offload=spec['mode'],
                           batch_hint=(spec['batch'], spec['seq']))
    return (lambda: model.backward(tokens, targets)), list(model.trainable_parameters().values())


def _hf_step(spec, device, dtype, tokens, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(spec['hf_dir'], dtype=dtype, attn_implementation='sdpa').to(device)
    if spec['system'] == 'hf-ckpt':
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        model.enable_input_require_grads()
    names = {'q': 'q_proj', 'k': 'k_proj', 'v': 'v_proj', 'o': 'o_proj', 'gate': 'gate_proj', 'up': 'up_proj',
             'down': 'down_proj'}
    model = get_peft_model(model, LoraConfig(r=spec['rank'], lora_alpha=2 * spec['rank'],
                                             target_modules=[names[t] for t in spec['targets']]))
    model.train()
    tokens, targets = tokens.to(device), targets.to(device)

    def step():
        logits = model(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        loss.backward()
        return loss.item()
    return step, [p for p in model.parameters() if p.requires_grad]


# --- the driver ----------------------------------------------------------------------------

def make_models(shape, work, dtype):
    """A random HF model of the shape (saved once) and its prepared twin."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import slowllama
    hf_dir, prepared = os.path.join(work, f'{shape}-hf-{dtype}'), os.path.join(work, f'{shape}-{dtype}')
    if not os.path.exists(os.path.join(hf_dir, 'config.json')):
        print(f'bench: writing a random {shape} model to {hf_dir}', file=sys.stderr)
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
        model = LlamaForCausalLM(config).to({'bf16': torch.bfloat16, 'fp32': torch.float32}[dtype])
        model.save_pretrained(hf_dir, max_shard_size='2GB')
        del model
    if not os.path.exists(os.path.join(prepared, 'manifest.json')):
        slowllama.prepare(hf_dir, prepared, dtype=dtype)
    return hf_dir, prepared


def run_in_subprocess(spec):
    out = subprocess.run([sys.executable, '-m', 'slowllama.bench', '--worker', json.dumps(spec)],
                         capture_output=True, text=True)
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ['?'])[-1]
        return {'error': last}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(device='cpu', shape='0.4b', batch=4, seq=128, steps=3, warmup=1, rank=4, targets=('q', 'v'),
          modes=('disk', 'ram', 'device'), peers=('hf', 'hf-ckpt'), dtype=None, work='models/bench',
          json_out='bench.json'):
    dtype = dtype or ('fp32' if device == 'cpu' else 'bf16')
    hf_dir, prepared = make_models(shape, work, dtype)
    cfg = ModelConfig.from_dict(json.load(open(os.path.join(prepared, 'manifest.json')))['config'])
    base = dict(device=device, dtype=dtype, batch=batch, seq=seq, steps=steps, warmup=warmup, rank=rank,
                targets=list(targets), vocab=cfg.vocab_size, model_dir=prepared, hf_dir=hf_dir)
    rows = []
    for system, mode in [('slowllama', m) for m in modes] + [(p, '-') for p in peers]:
        print(f'bench: {system} {mode} ...', file=sys.stderr, flush=True)
        result = run_in_subprocess({**base, 'system': system, 'mode': mode})
        rows.append({'system': system, 'mode': mode, **result})
    model_bytes = model_params(cfg) * (4 if dtype == 'fp32' else 2)
    plan = predict(cfg, batch, seq, dtype, rank=rank, targets=targets, device_is_host=device == 'cpu')
    report = {'device': device, 'shape': shape, 'dtype': dtype, 'batch': batch, 'seq': seq, 'rank': rank,
              'targets': list(targets), 'model_bytes': model_bytes, 'plan_streamed': plan.__dict__, 'rows': rows}
    print_table(report)
    with open(json_out, 'w') as f:
        json.dump(report, f, indent=2)
    print(f'bench: wrote {json_out}')
    return report


def print_table(report):
    rows = report['rows']
    peer = next((r for r in rows if r['system'] == 'hf-ckpt' and 'step_s' in r), None)
    print(f"\n{report['shape']} on {report['device']} ({report['dtype']}), batch {report['batch']} x seq "
          f"{report['seq']}, LoRA r={report['rank']} on {','.join(report['targets'])}; "
          f"model {report['model_bytes'] / GIB:.2f} GiB; planned peak (streamed) "
          f"{report['plan_streamed']['device_bytes'] / GIB:.2f} GiB")
    head = f"{'system':<10} {'mode':<7} {'step s':>8} {'tok/s':>9} {'dev GiB':>8} {'host+ GiB':>9} " \
           f"{'host+/model':>11} {'time vs hf-ckpt':>15}"
    print(head + '\n' + '-' * len(head))
    for r in rows:
        if 'error' in r:
            print(f"{r['system']:<10} {r['mode']:<7} error: {r['error']}")
            continue
        ratio = f"{r['step_s'] / peer['step_s']:.2f}x" if peer else '-'
        dev = f"{r['device_peak_bytes'] / GIB:.2f}" if 'device_peak_bytes' in r else '-'
        print(f"{r['system']:<10} {r['mode']:<7} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} {dev:>8} "
              f"{r['host_gain_bytes'] / GIB:>9.2f} {r['host_gain_bytes'] / report['model_bytes']:>10.0%} "
              f"{ratio:>15}")


if __name__ == '__main__' and len(sys.argv) > 2 and sys.argv[1] == '--worker':
    print(json.dumps(run_worker(json.loads(sys.argv[2]))))
