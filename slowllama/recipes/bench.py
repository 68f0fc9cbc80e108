"""The benchmark: slowllama in each offload mode beside transformers + peft (whole model resident,
with and without gradient checkpointing), same shape, batch and LoRA. Each configuration runs in its
own subprocess so peak memory is its own. Prints a table of ratios and writes JSON."""
import json
import os
import subprocess
import sys
import time

import torch

from ..engine.devices import best_device, synchronize
from ..engine.plan import GIB, block_bytes, model_params, predict, print_plan
from ..engine.trip import MicroBatch
from ..errors import SlowLlamaError
from ..model.quant import parse_quant
from ..weights.host_memory import peak_rss, process_rss, reset_peak_rss
from ..weights.prepared import DTYPES, dtype_name, model_config, parse_dtype
from .bench_block import bench_block
from .shapes import BLOCK_ONLY, SHAPES, shape_config

# --- the command -------------------------------------------------------------------------------

def add_arguments(p):
    p.add_argument('--device', default=None, help='cpu | cuda (default: the best present)')
    p.add_argument('--shape', default=None,
                   help=f'{" | ".join(SHAPES)} (default: 0.4b on cpu, 7b on cuda)')
    p.add_argument('--batch-size', type=int, default=None)
    p.add_argument('--seq-len', type=int, default=None)
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--grad-accum', type=int, default=1, help='micro-batches per optimizer step (ours travel through '
                   'the blocks together; the peers run them one after another)')
    p.add_argument('--keep-activations', default='auto', help='ours: auto | all | none | N blocks that keep their '
                   'activations instead of recomputing them; several, comma-separated (auto,none), run a row each')
    p.add_argument('--dtype', default=None, help='default: fp32 on cpu, bf16 on cuda')
    p.add_argument('--lora-rank', type=int, default=4)
    p.add_argument('--targets', default='q,v')
    p.add_argument('--modes', default=None, help='slowllama offload modes to run (default: disk,ram,device; '
                   'ram for 70b-block)')
    p.add_argument('--peers', default=None, help='transformers+peft configurations to run (default: '
                   'hf,hf-ckpt; none for 70b-block)')
    p.add_argument('--rounds', type=int, default=1, help='run the configurations in turn this many times '
                   'and keep each one\'s median')
    p.add_argument('--work', default='models/bench', help='where the random benchmark models are kept')
    p.add_argument('--json', default='bench.json', help='where to write the results')
    p.add_argument('--plan', action='store_true', help='only print the memory plan for --model or --shape')
    p.add_argument('--model', default=None, help='a prepared model folder to run ours on (or with --plan: to '
                   'plan) instead of --shape\'s random model; transformers+peft cannot run on it (--peers \'\')')
    p.add_argument('--write-model', default=None, metavar='OUT',
                   help='only write a prepared folder of --shape with random weights to OUT, packed with --quant '
                        '(default nf4), block by block: no float model is made (qwen3-30b-a3b: about 17 GB)')
    p.add_argument('--quant', default=None, help='nf4 | int8: also run slowllama on a quantized twin (and, '
                   'for nf4, transformers+peft+bitsandbytes QLoRA with checkpointing as peer hf-qlora)')


def run(args):
    if args.write_model:
        from .random_model import write_model_command
        return write_model_command(args.shape or '7b', args.write_model, args.quant or 'nf4', args.dtype or 'bf16')
    if args.plan:
        cfg, quant = model_config(args.model) if args.model else (shape_config(args.shape or '7b'),
                                                                   parse_quant(args.quant))
        return print_plan(cfg, args.batch_size or 16, args.seq_len or 128, args.dtype or 'bf16', args.lora_rank,
                          _list(args.targets), quant, max(1, args.grad_accum))
    device = args.device or best_device()
    on_cpu = device == 'cpu'
    shape = args.shape or ('0.4b' if on_cpu else '7b')
    shape_config(shape)  # one line for an unknown shape
    if args.model and args.peers:
        raise SlowLlamaError(f'--model {args.model}: transformers+peft run on --shape\'s random model only '
                             '(pass --peers \'\')')
    if args.rounds < 1 or args.steps < 1 or args.grad_accum < 1:
        raise SlowLlamaError('--rounds, --steps and --grad-accum must be at least 1')
    if shape in BLOCK_ONLY:  # one MoE block against transformers' decoder layer
        batches = [(b, args.seq_len or 256) for b in ([args.batch_size] if args.batch_size else [1, 4])]
        return bench_block(shape, batches, targets=_list(args.targets), rank=args.lora_rank, steps=args.steps,
                           dtype=args.dtype or 'fp32', json_out=args.json)
    blocks_only = shape == '70b-block'  # per-block timing; no whole-model peer to compare with
    bench(device=device, shape=shape, batch=args.batch_size or (4 if on_cpu else 16), seq=args.seq_len or 128,
          steps=args.steps, rank=args.lora_rank, targets=_list(args.targets),
          modes=_list(args.modes if args.modes is not None else 'ram' if blocks_only else 'disk,ram,device'),
          peers=_list(args.peers if args.peers is not None else '' if blocks_only else 'hf,hf-ckpt'),
          dtype=args.dtype, work=args.work, json_out=args.json, rounds=args.rounds, quant=args.quant,
          grad_accum=args.grad_accum, keeps=_list(args.keep_activations), model=args.model)


def _list(text):
    return tuple(x for x in text.split(',') if x)


# --- the worker: one configuration in a fresh process ----------------------------------------

def run_worker(spec):
    device = torch.device(spec['device'])
    dtype = DTYPES[spec['dtype']]
    torch.manual_seed(0)
    tokens = torch.randint(0, spec['vocab'], (spec['batch'], spec['seq']))
    targets = torch.cat([tokens[:, 1:], torch.full((spec['batch'], 1), -100)], dim=1)
    reset_peak_rss()
    rss_start = process_rss()
    started = time.perf_counter()
    step, params = (_slowllama_step if spec['system'] == 'slowllama' else _hf_step)(spec, device, dtype,
                                                                                   tokens, targets)
    synchronize(device)
    load_s = time.perf_counter() - started
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, marks, traffic = [], getattr(step, 'block_marks', None), getattr(step, 'traffic', None)
    for n in range(spec['warmup'] + spec['steps']):
        if n == spec['warmup']:
            crossed = traffic() if traffic else None
            if marks is not None:
                marks.clear()  # time the blocks of the timed steps only
        begin = time.perf_counter()
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)  # every kind: an mps clock read before its queue drains times nothing
        times.append(time.perf_counter() - begin)
    timed = sorted(times[spec['warmup']:])
    step_s = timed[len(timed) // 2]
    rss_peak = peak_rss()
    tokens = spec['batch'] * spec['seq'] * spec.get('grad_accum', 1)
    result = {'step_s': step_s, 'tokens_per_s': tokens / step_s, 'load_s': load_s,
              'host_gain_bytes': rss_peak - rss_start}
    if getattr(step, 'plan', None):  # how the step ran: micro-batches a trip, blocks that kept their activations
        result.update(trip=step.plan().trip, kept_blocks=step.plan().kept_blocks)
    if traffic:  # what the store read from the files and sent to the device, a step and a token
        result.update({f'{key}_per_step': (value - crossed[key]) / spec['steps'] for key, value in traffic().items()})
        result['bytes_read_per_token'] = result['bytes_read_per_step'] / tokens
    if device.type == 'cuda':
        result['device_peak_bytes'] = torch.cuda.max_memory_allocated(device)
    if marks:
        result.update(block_times(marks, device), copy_s=copy_seconds(step.block_bytes, device))
    return result


def block_times(marks, device):
    """Median seconds from one block's start to the next's, in the forward and in the backward (the
    turn through the head is left out): where streaming is copy-bound this is the copy time."""
    synchronize(device)
    forward, backward = [], []
    for (i, start), (j, end) in zip(marks, marks[1:]):
        if abs(i - j) == 1:
            seconds = start.elapsed_time(end) / 1e3 if device.type == 'cuda' else end - start
            (forward if j > i else backward).append(seconds)
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    return {'block_forward_s': median(forward), 'block_backward_s': median(backward),
            'block_s': median(forward + backward)}


def copy_seconds(nbytes, device, repeats=3):
    """Seconds to copy `nbytes` to the device from pinned host memory (on cpu: a host memcpy), best of
    a few: the floor for a block that has to travel."""
    source = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == 'cuda')
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float('inf')
    for _ in range(repeats):
        if device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            synchronize(device)
            begin = time.perf_counter()
            target.copy_(source)
            synchronize(device)
            best = min(best, time.perf_counter() - begin)
    return best


def _slowllama_step(spec, device, dtype, tokens, targets):
    import slowllama
    lora = slowllama.LoraConfig(rank=spec['rank'], alpha=2.0 * spec['rank'], targets=tuple(spec['targets']))
    model = slowllama.load(spec['model_dir'], device=device, dtype=dtype, lora=lora, offload=spec['mode'],
                           batch_hint=(spec['batch'], spec['seq']), keep_activations=spec.get('keep', 'auto'),
                           grad_accum=spec.get('grad_accum', 1))

    micro = [MicroBatch(tokens, targets)] * spec.get('grad_accum', 1)

    def step():  # the step's mean loss, as the peer's
        return sum(model.accumulate(micro, [1 / len(micro)] * len(micro))) / len(micro)
    step.traffic = model.traffic
    step.plan = lambda: model.step_plan
    step.block_bytes = block_bytes(model.cfg, spec['dtype'], model.store.quant)  # as it travels (packed or not)
    step.block_marks = mark_block_starts(model.store, device)
    return step, list(model.trainable_parameters().values())


def mark_block_starts(store, device):
    """[(block index, time mark)], one each time the engine takes a block from the store (on cuda a
    CUDA event on the compute stream, so marking costs no synchronisation)."""
    marks, fetch = [], store.block

    def marked_fetch(i):
        tensors = fetch(i)
        if device.type == 'cuda':
            mark = torch.cuda.Event(enable_timing=True)
            mark.record()
        else:
            mark = time.perf_counter()
        marks.append((i, mark))
        return tensors
    store.block = marked_fetch
    return marks


def _hf_step(spec, device, dtype, tokens, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    if spec['system'] == 'hf-qlora':  # QLoRA: bitsandbytes nf4 projections, fp32/bf16 compute
        from transformers import BitsAndBytesConfig
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(spec['hf_dir'], dtype=dtype, attn_implementation='sdpa',
                                                     quantization_config=config, device_map=str(device))
    else:
        model = AutoModelForCausalLM.from_pretrained(spec['hf_dir'], dtype=dtype, attn_implementation='sdpa').to(device)
    if spec['system'] in ('hf-ckpt', 'hf-qlora'):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        model.enable_input_require_grads()
    names = {'q': 'q_proj', 'k': 'k_proj', 'v': 'v_proj', 'o': 'o_proj', 'gate': 'gate_proj', 'up': 'up_proj',
             'down': 'down_proj'}
    model = get_peft_model(model, LoraConfig(r=spec['rank'], lora_alpha=2 * spec['rank'],
                                             target_modules=[names[t] for t in spec['targets']]))
    model.train()
    tokens, targets = tokens.to(device), targets.to(device)

    def step():  # the micro-batches one after another, as a trainer's gradient accumulation; the mean loss
        n, total = spec.get('grad_accum', 1), 0.0
        for _ in range(n):
            logits = model(input_ids=tokens).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                                     ignore_index=-100)
            (loss / n).backward()
            total += loss.item()
        return total / n
    return step, [p for p in model.parameters() if p.requires_grad]


# --- the driver ----------------------------------------------------------------------------

def make_models(shape, work, dtype, quant=None):
    """A random HF model of the shape (saved once) and its prepared twin (quantized with `quant`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import slowllama
    hf_dir = os.path.join(work, f'{shape}-hf-{dtype}')
    prepared = os.path.join(work, f'{shape}-{dtype}' + (f'-{quant}' if quant else ''))
    if not os.path.exists(os.path.join(hf_dir, 'config.json')):
        print(f'bench: writing a random {shape} model to {hf_dir}', file=sys.stderr)
        torch.manual_seed(0)
        fields = {'model_type': 'llama', 'max_position_embeddings': 4096, **SHAPES[shape]}
        config = AutoConfig.for_model(fields.pop('model_type'), **fields)  # llama, or the shape's family
        # built in the benchmark's dtype, not in fp32 first: a 7B model then needs 13.5 GB, not 27
        with torch.device('cuda' if torch.cuda.is_available() else 'cpu'):  # a GPU draws 7B numbers in seconds
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        model.save_pretrained(hf_dir, max_shard_size='2GB')
        del model
    if not os.path.exists(os.path.join(prepared, 'manifest.json')):
        slowllama.prepare(hf_dir, prepared, dtype=dtype, quant=quant)
    return hf_dir, prepared


def run_in_subprocess(spec):
    out = subprocess.run([sys.executable, '-m', 'slowllama.recipes.bench', '--worker', json.dumps(spec)],
                         capture_output=True, text=True)
    if out.returncode:
        lines = out.stderr.strip().splitlines() or ['?']
        print('\n'.join(lines[-20:]), file=sys.stderr)  # the traceback's end, for whoever reads the log
        return {'error': lines[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(device='cpu', shape='0.4b', batch=4, seq=128, steps=3, warmup=1, rank=4, targets=('q', 'v'),
          modes=('disk', 'ram', 'device'), peers=('hf', 'hf-ckpt'), dtype=None, work='models/bench',
          json_out='bench.json', rounds=1, quant=None, grad_accum=1, keeps=('auto',), model=None):
    """Each configuration in its own process; with rounds > 1 the configurations take turns that many
    times and each keeps its median, so a machine that drifts slows them all alike. `quant` ('nf4' |
    'int8') adds the offload modes on a quantized twin, and for nf4 the QLoRA peer 'hf-qlora'. model: a
    prepared folder that ours runs on instead of the shape's random model (no peers; its own quant).
    keeps: ours runs once for each --keep-activations setting (its mode labelled 'disk/none' where there
    are several), so keeping and recomputing meet the peers in one table."""
    dtype = dtype_name(parse_dtype(dtype or ('fp32' if device == 'cpu' else 'bf16')))  # aliases, and a clear error
    quant = parse_quant(quant)
    hf_dir, prepared = (None, model) if model else make_models(shape, work, dtype)
    quantized = make_models(shape, work, dtype, quant.type)[1] if quant and not model else None
    cfg, model_quant = model_config(prepared)
    shape, quant = (os.path.basename(os.path.normpath(model)), None) if model else (shape, quant)
    base = dict(device=device, dtype=dtype, batch=batch, seq=seq, steps=steps, warmup=warmup, rank=rank,
                targets=list(targets), vocab=cfg.vocab_size, model_dir=prepared, hf_dir=hf_dir, grad_accum=grad_accum)
    ours = [m if len(keeps) == 1 else f'{m}/{k}' for m in modes for k in keeps]  # mode, or mode/keep setting
    configs = [('slowllama', m, None) for m in ours] + [(p, '-', None) for p in peers]
    if quant:
        configs += [('slowllama', m, quant.type) for m in ours]
        configs += [('hf-qlora', '-', 'nf4')] if quant.type == 'nf4' else []
    runs = {config: [] for config in configs}
    for turn in range(rounds):
        for system, mode, q in configs:
            print(f'bench: {system} {mode} {q or ""} (round {turn + 1} of {rounds}) ...', file=sys.stderr, flush=True)
            offload, _, keep = mode.partition('/')
            spec = {**base, 'system': system, 'mode': offload, 'keep': keep or keeps[0],
                    'model_dir': quantized if q else prepared}
            runs[(system, mode, q)].append(run_in_subprocess(spec))
            print(f'bench: {system} {mode} {q or ""}: {_one_line(runs[(system, mode, q)][-1])}', file=sys.stderr,
                  flush=True)  # so a run cut off at its time limit still leaves what it measured
    rows = []
    for system, mode, q in configs:
        row = {'system': system, 'mode': mode, 'quant': q, **median_run(runs[(system, mode, q)])}
        rows.append({**row, **planned(cfg, system, mode, batch, seq, dtype, rank, targets, device, parse_quant(q) or model_quant,
                                      grad_accum, row.get('kept_blocks', 0))})
    report = {'device': device, 'shape': shape, 'dtype': dtype, 'batch': batch, 'seq': seq, 'rank': rank,
              'targets': list(targets), 'rounds': rounds, 'grad_accum': grad_accum,
              'model_bytes': model_params(cfg) * (4 if dtype == 'fp32' else 2), 'rows': rows}
    print_table(report)
    with open(json_out, 'w') as f:
        json.dump(report, f, indent=2)
    print(f'bench: wrote {json_out}')
    return report


def _one_line(result):
    return ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in result.items())


def median_run(results):
    """The run with the median step time; the largest memory figures of all runs."""
    good = sorted((r for r in results if 'error' not in r), key=lambda r: r['step_s'])
    if not good:
        return results[0]
    row = dict(good[len(good) // 2], step_times=[r['step_s'] for r in good])
    for key in ('host_gain_bytes', 'device_peak_bytes'):
        if key in row:
            row[key] = max(r[key] for r in good)
    return row


def planned(cfg, system, mode, batch, seq, dtype, rank, targets, device, quant=None, micro_batches=1, kept_blocks=0):
    """The planner's prediction for a slowllama row (with the blocks that kept their activations in
    its run), to print beside the measurement."""
    if system != 'slowllama':
        return {}
    blocks = {'device': (cfg.n_layers, 0), 'ram': (0, cfg.n_layers), 'disk': (0, 0)}[mode.partition('/')[0]]
    plan = predict(cfg, batch, seq, dtype, rank=rank, targets=targets, resident_blocks=blocks[0],
                   ram_blocks=blocks[1], device_is_host=device == 'cpu', quant=quant, micro_batches=micro_batches,
                   kept_blocks=kept_blocks, plain_unpack=device == 'mps')
    return {'planned_device_bytes': plan.device_bytes, 'planned_host_bytes': plan.host_bytes}


def print_table(report):
    rows = report['rows']
    peers = {r['system']: r for r in rows if r['system'] in ('hf', 'hf-ckpt', 'hf-qlora') and 'step_s' in r}
    accum = f" x {report['grad_accum']} micro-batches a step" if report.get('grad_accum', 1) > 1 else ''
    print(f"\n{report['shape']} on {report['device']} ({report['dtype']}), batch {report['batch']} x seq "
          f"{report['seq']}{accum}, LoRA r={report['rank']} on {','.join(report['targets'])}; "
          f"model {report['model_bytes'] / GIB:.2f} GiB; median of {report['rounds']} round(s)")
    head = (f"{'system':<10} {'mode':<10} {'quant':<5} {'kept':>5} {'step s':>7} {'tok/s':>7} {'dev GiB (plan)':>15} "
            f"{'host+ GiB':>9} {'host+/model':>11} {'vs hf-ckpt':>10} {'vs hf':>6} {'vs qlora':>8} "
            f"{'block ms / copy ms':>18} {'read GB/step':>12} {'read B/token':>12} {'to dev GB/step':>14}")
    print(head + '\n' + '-' * len(head))
    for r in rows:
        if 'error' in r:
            print(f"{r['system']:<10} {r['mode']:<10} {r.get('quant') or '-':<5} {'':>5} error: {r['error']}")
            continue
        ratio = {name: f"{r['step_s'] / peer['step_s']:.2f}x" for name, peer in peers.items()}
        device_peak = r.get('device_peak_bytes', r['host_gain_bytes'] if report['device'] == 'cpu' else None)
        plan = f" ({r['planned_device_bytes'] / GIB:.2f})" if 'planned_device_bytes' in r else ''
        dev = f"{device_peak / GIB:.2f}{plan}" if device_peak is not None else '-'
        blocks = f"{r['block_s'] * 1e3:.3g} / {r['copy_s'] * 1e3:.3g}" if r.get('block_s') else '-'
        crossed = (f"{r['bytes_read_per_step'] / 1e9:>12.3f} {r['bytes_read_per_token']:>12.0f} "
                   f"{r['bytes_to_device_per_step'] / 1e9:>14.3f}" if 'bytes_read_per_step' in r else '')
        kept = str(r['kept_blocks']) if 'kept_blocks' in r else '-'  # blocks that kept their activations
        print(f"{r['system']:<10} {r['mode']:<10} {r.get('quant') or '-':<5} {kept:>5} {r['step_s']:>7.3f} "
              f"{r['tokens_per_s']:>7.0f} {dev:>15} "
              f"{r['host_gain_bytes'] / GIB:>9.2f} {r['host_gain_bytes'] / report['model_bytes']:>10.0%} "
              f"{ratio.get('hf-ckpt', '-'):>10} {ratio.get('hf', '-'):>6} {ratio.get('hf-qlora', '-'):>8} {blocks:>18} "
              f"{crossed}")


if __name__ == '__main__' and len(sys.argv) > 2 and sys.argv[1] == '--worker':
    print(json.dumps(run_worker(json.loads(sys.argv[2]))))
